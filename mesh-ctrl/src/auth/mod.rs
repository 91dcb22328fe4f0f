//! Who is calling: node credentials on certificate-service calls.
//!
//! Local mode uses bootstrap tokens, one per node, from a JSON file `{"node-name": "token"}`
//! readable only by the controller. Cluster mode checks projected service-account tokens with
//! TokenReview (`token_review`).
use std::{collections::HashMap, path::Path};

mod credentials;
pub mod token_review;

pub use credentials::{AuthError, credentials};
pub use token_review::TokenReviewAuth;

use tonic::metadata::MetadataMap;

/// Decides which node a call comes from: one of the two ways `--node-auth` chooses.
pub enum NodeAuth {
    Tokens(NodeTokens),
    TokenReview(TokenReviewAuth),
}

impl NodeAuth {
    pub async fn authenticate(&self, md: &MetadataMap) -> Result<String, AuthError> {
        match self {
            NodeAuth::Tokens(t) => t.check(md),
            NodeAuth::TokenReview(r) => r.authenticate(md).await,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("cannot read node tokens {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("node tokens {path} is not a JSON object of node name to token")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("node tokens {path}: the token of {node:?} is shorter than 16 characters")]
    Weak { path: String, node: String },
}

pub struct NodeTokens(HashMap<String, String>);

/// Equal-time comparison, so response timing does not reveal how much of a token matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl NodeTokens {
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| TokensError::Read {
            path: p.clone(),
            source,
        })?;
        let map: HashMap<String, String> =
            serde_json::from_slice(&bytes).map_err(|source| TokensError::Parse {
                path: p.clone(),
                source,
            })?;
        if let Some((node, _)) = map.iter().find(|(_, t)| t.len() < 16) {
            return Err(TokensError::Weak {
                path: p,
                node: node.clone(),
            });
        }
        Ok(Self(map))
    }

    pub fn from_map(map: HashMap<String, String>) -> Self {
        Self(map)
    }

    /// The authenticated node's name.
    pub fn check(&self, md: &MetadataMap) -> Result<String, AuthError> {
        let (node, token) = credentials(md)?;
        match self.0.get(node) {
            Some(expected) if same(expected.as_bytes(), token.as_bytes()) => Ok(node.to_string()),
            _ => Err(AuthError::Rejected(node.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::auth::{AUTHORIZATION, NODE_HEADER};

    fn md(node: Option<&str>, auth: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(n) = node {
            m.insert(NODE_HEADER, n.parse().unwrap());
        }
        if let Some(a) = auth {
            m.insert(AUTHORIZATION, a.parse().unwrap());
        }
        m
    }

    type Case = (
        Option<&'static str>,
        Option<&'static str>,
        Result<&'static str, AuthError>,
    );

    #[test]
    fn table() {
        let tokens =
            NodeTokens::from_map([("n1".to_string(), "t1-0123456789abcdef".to_string())].into());
        let cases: &[Case] = &[
            (Some("n1"), Some("Bearer t1-0123456789abcdef"), Ok("n1")),
            (
                Some("n1"),
                Some("Bearer t1-0123456789abcdeX"),
                Err(AuthError::Rejected("n1".into())),
            ),
            (
                Some("n2"),
                Some("Bearer t1-0123456789abcdef"),
                Err(AuthError::Rejected("n2".into())),
            ),
            (
                Some("n1"),
                Some("t1-0123456789abcdef"),
                Err(AuthError::Missing(AUTHORIZATION)),
            ),
            (
                None,
                Some("Bearer t1-0123456789abcdef"),
                Err(AuthError::Missing(NODE_HEADER)),
            ),
        ];
        for (node, auth, expected) in cases {
            let got = tokens.check(&md(*node, *auth));
            assert_eq!(
                got.as_deref().map_err(Clone::clone),
                expected.clone(),
                "{node:?} {auth:?}"
            );
        }
    }
}
