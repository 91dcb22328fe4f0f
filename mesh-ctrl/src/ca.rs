//! The mesh certificate authority.
//!
//! Either a root generated on first start and persisted in the state directory (local mode), or an
//! operator-supplied root or intermediate. Leaves carry exactly one URI SAN, the workload's SPIFFE
//! ID, decided here from what the controller knows about the pod, never from the CSR: the CSR only
//! contributes its (signature-checked) public key.
use std::{
    fs,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use mesh_api::identity::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not a usable PEM {kind}")]
    Pem {
        what: String,
        kind: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error(
        "the certificate signing request is invalid (unparsable, bad signature or unsupported extension)"
    )]
    Csr(#[source] rcgen::Error),
    #[error("signing failed")]
    Sign(#[source] rcgen::Error),
    #[error("no randomness for a serial number")]
    Random(#[source] getrandom::Error),
}

/// A signed workload certificate.
#[derive(Clone, Debug)]
pub struct Signed {
    /// Leaf first, then the issuing chain up to (not including) the root.
    pub chain_pem: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// Intermediates between the issuer and a root (empty when the issuer is a root).
    chain_pem: Vec<String>,
    /// Every root the mesh trusts: the issuer's root plus any being rotated in or out.
    roots_pem: Vec<String>,
}

/// Clock skew tolerated between nodes: leaves are valid from a minute ago.
const BACKDATE: Duration = Duration::from_secs(60);
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.into(),
        source,
    })
}

/// Splits a PEM bundle into its certificates.
fn split_pem(bundle: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in bundle.lines() {
        if line.starts_with("-----BEGIN CERTIFICATE") {
            cur.clear();
        }
        cur.push_str(line);
        cur.push('\n');
        if line.starts_with("-----END CERTIFICATE") {
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

fn write_private(path: &Path, contents: &str, mode: u32) -> Result<(), CaError> {
    let err = |source| CaError::Write {
        path: path.into(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

fn serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(CaError::Random)?;
    bytes[0] &= 0x7f; // positive INTEGER
    Ok(SerialNumber::from_slice(&bytes))
}

impl Ca {
    /// Local mode: the root in `dir` (`root-cert.pem`, `root-key.pem`), generated on first start.
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &str,
        extra_roots: &[String],
    ) -> Result<Self, CaError> {
        let cert_path = dir.join("root-cert.pem");
        let key_path = dir.join("root-key.pem");
        if !cert_path.exists() {
            fs::create_dir_all(dir).map_err(|source| CaError::Write {
                path: dir.into(),
                source,
            })?;
            let (cert, key) = Self::generate_root(trust_domain)?;
            // Key first: a cert without its key would make the next start fail.
            write_private(&key_path, &key, 0o600)?;
            write_private(&cert_path, &cert, 0o644)?;
            tracing::info!(path = %cert_path.display(), "generated a new mesh root CA");
        }
        Self::from_files(&cert_path, &key_path, None, trust_domain, extra_roots)
    }

    /// A new self-signed root: (certificate PEM, private key PEM).
    pub fn generate_root(trust_domain: &str) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(CaError::Sign)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "mesh root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        params.serial_number = Some(serial()?);
        let cert = params.self_signed(&key).map_err(CaError::Sign)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// An operator-supplied CA. With `chain`, the issuer is an intermediate and `chain` holds the
    /// certificates up to and including the root(s), which then form the trust bundle.
    pub fn from_files(
        cert: &Path,
        key: &Path,
        chain: Option<&Path>,
        trust_domain: &str,
        extra_roots: &[String],
    ) -> Result<Self, CaError> {
        let chain_pem = chain.map(read).transpose()?;
        Self::from_pems(
            &read(cert)?,
            &read(key)?,
            chain_pem.as_deref(),
            trust_domain,
            extra_roots,
            &cert.display().to_string(),
        )
    }

    /// Like [`Ca::from_files`], from PEM text; `origin` names it in errors.
    pub fn from_pems(
        cert_pem: &str,
        key_pem: &str,
        chain_pem: Option<&str>,
        trust_domain: &str,
        extra_roots: &[String],
        origin: &str,
    ) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|source| CaError::Pem {
            what: format!("{origin} (key)"),
            kind: "private key",
            source,
        })?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|source| CaError::Pem {
            what: origin.to_string(),
            kind: "CA certificate",
            source,
        })?;
        let (chain_pem, mut roots_pem) = match chain_pem {
            // The issuer is a root: nothing to send after a leaf, and it is the trust anchor.
            None => (Vec::new(), vec![cert_pem.to_string()]),
            // The issuer is an intermediate: send it (and any intermediates above it) after each
            // leaf; the chain's last certificate is the root everyone trusts.
            Some(bundle) => {
                let mut above = split_pem(bundle);
                let root = above.pop().ok_or_else(|| CaError::Read {
                    path: format!("{origin} chain").into(),
                    source: std::io::Error::other("no certificate in the chain"),
                })?;
                let mut chain = vec![cert_pem.to_string()];
                chain.extend(above);
                (chain, vec![root])
            }
        };
        for r in extra_roots {
            if !roots_pem.contains(r) {
                roots_pem.push(r.clone());
            }
        }
        Ok(Self {
            trust_domain: trust_domain.into(),
            issuer,
            chain_pem,
            roots_pem,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn roots_pem(&self) -> &[String] {
        &self.roots_pem
    }

    /// Signs the CSR's public key for `id`, valid for `ttl`.
    pub fn sign_workload(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<Signed, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::Csr)?;
        let now = SystemTime::now();
        let (not_before, not_after) = (now - BACKDATE, now + ttl);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = id.to_string().try_into().map_err(CaError::Sign)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(serial()?);
        let leaf = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(CaError::Sign)?;
        let mut chain_pem = vec![leaf.pem()];
        chain_pem.extend(self.chain_pem.iter().cloned());
        Ok(Signed {
            chain_pem,
            not_before,
            not_after,
        })
    }

    /// A TLS serving certificate for the controller itself (DNS SANs), with a fresh key.
    pub fn serving_cert(
        &self,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(CaError::Sign)?;
        let mut params = CertificateParams::new(dns_names.to_vec()).map_err(CaError::Sign)?;
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ttl).into();
        params.serial_number = Some(serial()?);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Sign)?;
        let mut chain = cert.pem();
        for c in &self.chain_pem {
            chain.push_str(c);
        }
        Ok((chain, key.serialize_pem()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr() -> (KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        (key, csr.pem().unwrap())
    }

    fn uri_sans(pem: &str) -> Vec<String> {
        let der = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1;
        let cert = der.parse_x509().unwrap();
        cert.subject_alternative_name()
            .unwrap()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn root_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Ca::load_or_create(dir.path(), "cluster.local", &[]).unwrap();
        let b = Ca::load_or_create(dir.path(), "cluster.local", &[]).unwrap();
        assert_eq!(a.roots_pem(), b.roots_pem());
        let mode = fs::metadata(dir.path().join("root-key.pem"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[test]
    fn leaves_carry_only_the_identity_the_controller_chose() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "cluster.local", &[]).unwrap();
        // The CSR asks for another identity; it must be ignored.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://cluster.local/ns/kube-system/sa/admin"
                .try_into()
                .unwrap(),
        )];
        let csr_pem = params.serialize_request(&key).unwrap().pem().unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        let signed = ca
            .sign_workload(&csr_pem, &id, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(uri_sans(&signed.chain_pem[0]), vec![id.to_string()]);
        let life = signed.not_after.duration_since(signed.not_before).unwrap();
        assert_eq!(life, Duration::from_secs(3600) + BACKDATE);
    }

    #[test]
    fn a_tampered_csr_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "td", &[]).unwrap();
        let (_, pem) = csr();
        let mut bytes = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .unwrap()
            .1
            .contents;
        let n = bytes.len();
        bytes[n - 5] ^= 0xff; // inside the signature
        let tampered = pem_encode("CERTIFICATE REQUEST", &bytes);
        let id: SpiffeId = "spiffe://td/ns/a/sa/b".parse().unwrap();
        assert!(matches!(
            ca.sign_workload(&tampered, &id, Duration::from_secs(60)),
            Err(CaError::Csr(_))
        ));
    }

    #[test]
    fn an_intermediate_issues_with_its_chain_and_the_root_is_trusted() {
        let dir = tempfile::tempdir().unwrap();
        // Operator's offline root and an intermediate for the mesh.
        let root_key = KeyPair::generate().unwrap();
        let mut rp = CertificateParams::default();
        rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = rp.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(rp, root_key);
        let int_key = KeyPair::generate().unwrap();
        let mut ip = CertificateParams::default();
        ip.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let int = ip.signed_by(&int_key, &root_issuer).unwrap();
        let p = |name: &str, s: &str| {
            let path = dir.path().join(name);
            fs::write(&path, s).unwrap();
            path
        };
        let ca = Ca::from_files(
            &p("int.pem", &int.pem()),
            &p("int-key.pem", &int_key.serialize_pem()),
            Some(&p("chain.pem", &root.pem())),
            "td",
            &[],
        )
        .unwrap();
        assert_eq!(ca.roots_pem(), &[root.pem()]);
        let (_, csr_pem) = csr();
        let id: SpiffeId = "spiffe://td/ns/a/sa/b".parse().unwrap();
        let signed = ca
            .sign_workload(&csr_pem, &id, Duration::from_secs(60))
            .unwrap();
        assert_eq!(signed.chain_pem.len(), 2, "leaf then intermediate");
        assert_eq!(signed.chain_pem[1], int.pem());
    }

    fn pem_encode(tag: &str, der: &[u8]) -> String {
        const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for chunk in der.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = ((b[0] as u32) << 16) | ((b[1] as u32) << 8) | b[2] as u32;
            for i in 0..4 {
                if i <= chunk.len() {
                    s.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    s.push('=');
                }
            }
        }
        let body: Vec<String> = s
            .as_bytes()
            .chunks(64)
            .map(|c| String::from_utf8_lossy(c).into())
            .collect();
        format!(
            "-----BEGIN {tag}-----\n{}\n-----END {tag}-----\n",
            body.join("\n")
        )
    }
}
