//! Cluster mode: the generated root lives in a Kubernetes Secret, so it survives the controller's
//! pod and every replica uses the same one. Two replicas starting together both try to create it;
//! the loser of the race reads the winner's.
use std::collections::BTreeMap;

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};

use crate::ca::{Ca, CaError};

pub const CERT_KEY: &str = "root-cert.pem";
pub const KEY_KEY: &str = "root-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("Kubernetes API ({action} Secret {name})")]
    Api {
        action: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {name} lacks {key}")]
    Missing { name: String, key: &'static str },
    #[error("Secret {name}")]
    Ca {
        name: String,
        #[source]
        source: CaError,
    },
}

fn field(s: &Secret, name: &str, key: &'static str) -> Result<String, SecretError> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .ok_or_else(|| SecretError::Missing {
            name: name.into(),
            key,
        })
}

fn to_ca(
    s: &Secret,
    name: &str,
    trust_domain: &str,
    extra_roots: &[String],
) -> Result<Ca, SecretError> {
    let (cert, key) = (field(s, name, CERT_KEY)?, field(s, name, KEY_KEY)?);
    Ca::from_pems(
        &cert,
        &key,
        None,
        trust_domain,
        extra_roots,
        &format!("Secret {name}"),
    )
    .map_err(|source| SecretError::Ca {
        name: name.into(),
        source,
    })
}

/// Loads the root from Secret `name` in `api`'s namespace, creating it on first start.
pub async fn load_or_create(
    api: &Api<Secret>,
    name: &str,
    trust_domain: &str,
    extra_roots: &[String],
) -> Result<Ca, SecretError> {
    let get = |e| SecretError::Api {
        action: "reading",
        name: name.into(),
        source: e,
    };
    if let Some(s) = api.get_opt(name).await.map_err(get)? {
        return to_ca(&s, name, trust_domain, extra_roots);
    }
    let (cert, key) = Ca::generate_root(trust_domain).map_err(|source| SecretError::Ca {
        name: name.into(),
        source,
    })?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "mesh-ctrl".to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (CERT_KEY.to_string(), ByteString(cert.into_bytes())),
            (KEY_KEY.to_string(), ByteString(key.into_bytes())),
        ])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(created) => {
            tracing::info!(secret = name, "generated a new mesh root CA");
            to_ca(&created, name, trust_domain, extra_roots)
        }
        // Another replica created it first: use theirs, so there is only ever one root.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let s = api.get(name).await.map_err(get)?;
            to_ca(&s, name, trust_domain, extra_roots)
        }
        Err(e) => Err(SecretError::Api {
            action: "creating",
            name: name.into(),
            source: e,
        }),
    }
}

/// The key of the published trust bundle in its ConfigMap.
pub const BUNDLE_KEY: &str = "trust-bundle.pem";

/// Publishes the roots node proxies trust (PEM) in ConfigMap `name` of `api`'s namespace, which
/// the DaemonSet mounts: a node proxy can then verify the controller before its first stream.
/// Server-side apply, so a restart or a second replica converges on the same content.
pub async fn publish_bundle(
    api: &Api<k8s_openapi::api::core::v1::ConfigMap>,
    name: &str,
    pem: &str,
) -> Result<(), SecretError> {
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/managed-by": "mesh-ctrl"},
        },
        "data": {BUNDLE_KEY: pem},
    });
    api.patch(
        name,
        &kube::api::PatchParams::apply("mesh-ctrl").force(),
        &kube::api::Patch::Apply(&cm),
    )
    .await
    .map(|_| ())
    .map_err(|source| SecretError::Api {
        action: "publishing the trust bundle in ConfigMap",
        name: name.into(),
        source,
    })
}
