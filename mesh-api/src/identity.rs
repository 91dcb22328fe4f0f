//! Workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
use std::{fmt, str::FromStr};

/// A workload's SPIFFE ID. Only the Kubernetes-shaped form is accepted.
///
/// Kept as its URI, shared: the proxies compare, hash, clone and print identities on every
/// connection and request, and none of that should allocate.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: std::sync::Arc<str>,
    /// Where the namespace and the service account start in `uri`.
    ns: usize,
    sa: usize,
}

const SCHEME: &str = "spiffe://";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("{0:?} is not a spiffe:// URI")]
    Scheme(String),
    #[error("{0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Shape(String),
    #[error("invalid trust domain {0:?}: lowercase letters, digits, '.', '-' and '_' only")]
    TrustDomain(String),
    #[error("invalid {field} {value:?}: not a DNS-1123 label")]
    Label { field: &'static str, value: String },
}

/// Kubernetes namespace and service-account names: DNS-1123 labels (service accounts may be
/// subdomains, but labels are what pods use in practice and keep SNI names valid).
pub fn is_dns_label(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-')
}

fn valid_trust_domain(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 255
        && v.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        if !valid_trust_domain(trust_domain) {
            return Err(IdentityError::TrustDomain(trust_domain.into()));
        }
        for (field, value) in [
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            if !is_dns_label(value) {
                return Err(IdentityError::Label {
                    field,
                    value: value.into(),
                });
            }
        }
        let ns = SCHEME.len() + trust_domain.len() + "/ns/".len();
        let sa = ns + namespace.len() + "/sa/".len();
        Ok(Self {
            uri: format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").into(),
            ns,
            sa,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.ns - "/ns/".len()]
    }
    pub fn namespace(&self) -> &str {
        &self.uri[self.ns..self.sa - "/sa/".len()]
    }
    pub fn service_account(&self) -> &str {
        &self.uri[self.sa..]
    }

    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The TLS server name a client asks for to reach this identity at a node proxy: the node
    /// serves many workloads on one port and picks the certificate by SNI.
    pub fn server_name(&self) -> String {
        format!("{}.{}.id.mesh", self.service_account(), self.namespace())
    }

    /// Inverse of [`SpiffeId::server_name`] within a trust domain.
    pub fn from_server_name(trust_domain: &str, sni: &str) -> Option<Self> {
        let rest = sni.strip_suffix(".id.mesh")?;
        let (sa, ns) = rest.split_once('.')?;
        Self::new(trust_domain, ns, sa).ok()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::Scheme(s.into()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => Self::new(td, ns, sa),
            _ => Err(IdentityError::Shape(s.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(
            SpiffeId::from_server_name("cluster.local", &id.server_name()),
            Some(id)
        );
    }

    #[test]
    fn rejects_malformed_ids() {
        let cases = [
            ("http://cluster.local/ns/a/sa/b", "spiffe://"),
            ("spiffe://cluster.local/ns/a", "of the form"),
            ("spiffe://cluster.local/ns/a/sa/b/extra", "of the form"),
            ("spiffe://Cluster/ns/a/sa/b", "trust domain"),
            ("spiffe://cluster.local/ns/A/sa/b", "namespace"),
            ("spiffe://cluster.local/ns/a/sa/", "service account"),
            ("spiffe://cluster.local/pods/a/sa/b", "of the form"),
        ];
        for (input, why) in cases {
            let e = input.parse::<SpiffeId>().unwrap_err();
            assert!(e.to_string().contains(why), "{input}: {e}");
        }
    }

    #[test]
    fn server_names_outside_the_scheme_are_not_identities() {
        for sni in [
            "web.default.svc",
            "a.id.mesh",
            "x.y.z.id.mesh",
            ".default.id.mesh",
        ] {
            assert_eq!(SpiffeId::from_server_name("td", sni), None, "{sni}");
        }
    }
}
