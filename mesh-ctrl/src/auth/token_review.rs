//! Cluster mode: a node proxy authenticates with its projected service-account token, which the
//! controller checks with a TokenReview. The token must be the node proxy's service account,
//! issued for the controller's audience, and bound to a pod on the very node the caller claims to
//! be (`authentication.kubernetes.io/node-name`, Kubernetes 1.30+): a stolen token cannot be
//! replayed from another node to obtain that node's identities.
use mesh_api::sync::LockExt;
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};
use tonic::metadata::MetadataMap;

use super::credentials::{AuthError, credentials};

/// The user-info extra key carrying the node of the pod a token is bound to.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// How long a refusal is remembered: the same bad token (for the same node) is refused again
/// without asking the API server.
pub const REFUSED_TTL: Duration = Duration::from_secs(60);
/// Refusals remembered at most; beyond, the oldest is forgotten.
const REFUSED_MAX: usize = 4096;
/// TokenReviews in flight at once: a flood of distinct bad tokens waits here, not at the API
/// server.
const REVIEWS_IN_FLIGHT: usize = 16;

pub struct TokenReviewAuth {
    client: Client,
    /// `system:serviceaccount:<namespace>:<name>` of the node proxy.
    username: String,
    /// The audience node proxies request their tokens for.
    audience: String,
    /// Recent refusals by SHA-256 of (node, token): when, and why.
    refused: Mutex<HashMap<[u8; 32], (Instant, String)>>,
    reviews: tokio::sync::Semaphore,
}

impl TokenReviewAuth {
    pub fn new(client: Client, sa_namespace: &str, sa_name: &str, audience: &str) -> Self {
        Self {
            client,
            username: format!("system:serviceaccount:{sa_namespace}:{sa_name}"),
            audience: audience.into(),
            refused: Mutex::default(),
            reviews: tokio::sync::Semaphore::new(REVIEWS_IN_FLIGHT),
        }
    }

    fn key(node: &str, token: &str) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(node.as_bytes());
        ctx.update(&[0]);
        ctx.update(token.as_bytes());
        ctx.finish().as_ref().try_into().expect("32 bytes")
    }

    fn refused_before(&self, key: &[u8; 32]) -> Option<String> {
        let mut m = self.refused.locked();
        match m.get(key) {
            Some((at, reason)) if at.elapsed() < REFUSED_TTL => Some(reason.clone()),
            Some(_) => {
                m.remove(key);
                None
            }
            None => None,
        }
    }

    fn remember(&self, key: [u8; 32], reason: &str) {
        let mut m = self.refused.locked();
        if m.len() >= REFUSED_MAX {
            m.retain(|_, (at, _)| at.elapsed() < REFUSED_TTL);
        }
        if m.len() >= REFUSED_MAX
            && let Some(oldest) = m.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| *k)
        {
            m.remove(&oldest);
        }
        m.insert(key, (Instant::now(), reason.to_string()));
    }
}

impl TokenReviewAuth {
    pub async fn authenticate(&self, md: &MetadataMap) -> Result<String, AuthError> {
        let (node, token) = credentials(md)?;
        let key = Self::key(node, token);
        if let Some(reason) = self.refused_before(&key) {
            return Err(AuthError::Refused {
                node: node.to_string(),
                reason,
            });
        }
        let _review = self
            .reviews
            .acquire()
            .await
            .map_err(|_| AuthError::Unavailable("shutting down".into()))?;
        let result = self.review(node, token).await;
        if let Err(AuthError::Refused { reason, .. }) = &result {
            self.remember(key, reason);
        }
        result
    }
}

impl TokenReviewAuth {
    async fn review(&self, node: &str, token: &str) -> Result<String, AuthError> {
        let refused = |reason: String| AuthError::Refused {
            node: node.to_string(),
            reason,
        };
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.into()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(refused(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        if !status
            .audiences
            .unwrap_or_default()
            .contains(&self.audience)
        {
            return Err(refused(format!(
                "not issued for audience {:?}",
                self.audience
            )));
        }
        let user = status.user.unwrap_or_default();
        if user.username.as_deref() != Some(self.username.as_str()) {
            return Err(refused(format!(
                "{:?} is not the node proxy's service account",
                user.username
            )));
        }
        let bound = user
            .extra
            .as_ref()
            .and_then(|e| e.get(NODE_NAME_EXTRA))
            .and_then(|v| v.first());
        match bound {
            Some(n) if n == node => Ok(node.to_string()),
            Some(n) => Err(refused(format!("token is bound to a pod on node {n:?}"))),
            None => Err(refused("token is not bound to a pod (no node name)".into())),
        }
    }
}
