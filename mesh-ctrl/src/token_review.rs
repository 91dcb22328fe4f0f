//! Cluster mode: a node proxy authenticates with its projected service-account token, which the
//! controller checks with a TokenReview. The token must be the node proxy's service account,
//! issued for the controller's audience, and bound to a pod on the very node the caller claims to
//! be (`authentication.kubernetes.io/node-name`, Kubernetes 1.30+): a stolen token cannot be
//! replayed from another node to obtain that node's identities.
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};
use tonic::metadata::MetadataMap;

use crate::auth::{AuthError, NodeAuth, credentials};

/// The user-info extra key carrying the node of the pod a token is bound to.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

pub struct TokenReviewAuth {
    client: Client,
    /// `system:serviceaccount:<namespace>:<name>` of the node proxy.
    username: String,
    /// The audience node proxies request their tokens for.
    audience: String,
}

impl TokenReviewAuth {
    pub fn new(client: Client, sa_namespace: &str, sa_name: &str, audience: &str) -> Self {
        Self {
            client,
            username: format!("system:serviceaccount:{sa_namespace}:{sa_name}"),
            audience: audience.into(),
        }
    }
}

#[async_trait::async_trait]
impl NodeAuth for TokenReviewAuth {
    async fn authenticate(&self, md: &MetadataMap) -> Result<String, AuthError> {
        let (node, token) = credentials(md)?;
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
