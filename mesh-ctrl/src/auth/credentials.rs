//! What a call presents: the node it claims to be and its bearer token, and why it was refused.
use mesh_api::auth::{AUTHORIZATION, NODE_HEADER};
use tonic::metadata::MetadataMap;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing {0} metadata")]
    Missing(&'static str),
    #[error("unknown node or wrong token for node {0:?}")]
    Rejected(String),
    #[error("token of node {node:?} refused: {reason}")]
    Refused { node: String, reason: String },
    #[error("cannot check the token now: {0}")]
    Unavailable(String),
}

/// The claimed node name and the bearer token of a call.
pub fn credentials(md: &MetadataMap) -> Result<(&str, &str), AuthError> {
    let node = md
        .get(NODE_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or(AuthError::Missing(NODE_HEADER))?;
    let token = md
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(AuthError::Missing(AUTHORIZATION))?;
    Ok((node, token))
}
