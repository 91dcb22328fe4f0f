//! TLS between node proxies: TLS 1.3 only, mutual, identities are SPIFFE IDs in URI SANs.
//!
//! - The client (outbound) presents the *source workload's* certificate and accepts the server
//!   only if its chain leads to a mesh root and its SPIFFE ID is exactly the one the destination
//!   pod should have (not merely "some mesh identity").
//! - The server (inbound) picks the certificate of the destination workload by SNI (one port serves
//!   every workload of the node), requires a client certificate chaining to a mesh root, and reads
//!   the client's SPIFFE ID for policy.
use std::sync::Arc;

use mesh_api::identity::SpiffeId;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore, ServerConfig,
    SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};

/// ALPN of the tunnel: HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate does not parse")]
    Parse,
    #[error("certificate has no SPIFFE ID URI SAN")]
    NoSpiffeId,
    #[error("certificate has more than one URI SAN")]
    ManyUris,
    #[error("certificate carries an invalid SPIFFE ID")]
    BadId(#[source] mesh_api::identity::IdentityError),
    #[error("TLS configuration")]
    Config(#[source] rustls::Error),
    #[error("client verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SPIFFE ID of a leaf certificate: its one URI SAN.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|_| TlsError::Parse)?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|_| TlsError::Parse)?
        .ok_or(TlsError::NoSpiffeId)?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = uris.next().ok_or(TlsError::NoSpiffeId)?;
    if uris.next().is_some() {
        return Err(TlsError::ManyUris);
    }
    uri.parse().map_err(TlsError::BadId)
}

/// When a certificate starts and stops being valid.
pub fn validity(
    cert: &CertificateDer<'_>,
) -> Result<(std::time::SystemTime, std::time::SystemTime), TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|_| TlsError::Parse)?;
    let at = |t: x509_parser::time::ASN1Time| {
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.timestamp().max(0) as u64)
    };
    let v = parsed.validity();
    Ok((at(v.not_before), at(v.not_after)))
}

/// Accepts a server whose chain leads to a mesh root and whose SPIFFE ID is `expected`.
#[derive(Debug)]
struct ExpectIdentity {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ExpectIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        match spiffe_id_of(end_entity) {
            Ok(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Ok(id) => {
                tracing::warn!(expected = %self.expected, presented = %id, "peer presented another identity");
                Err(Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure,
                ))
            }
            Err(_) => Err(Error::InvalidCertificate(CertificateError::BadEncoding)),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // The configs below only offer TLS 1.3.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Client side of a tunnel from `src` (its chain and key) to a server that must be `expected`.
pub fn client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    expected: SpiffeId,
    roots: Arc<RootCertStore>,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let algs = provider.signature_verification_algorithms;
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExpectIdentity {
            roots,
            expected,
            algs,
        }))
        .with_client_auth_cert(chain, key)
        .map_err(TlsError::Config)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(cfg)
}

/// Picks the certificate of the workload named by SNI, if this node holds it.
pub trait CertLookup: Send + Sync + std::fmt::Debug {
    fn certified_key(&self, id: &SpiffeId) -> Option<Arc<CertifiedKey>>;
}

#[derive(Debug)]
struct BySni<L> {
    trust_domain: String,
    lookup: Arc<L>,
}

impl<L: CertLookup> ResolvesServerCert for BySni<L> {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let id = SpiffeId::from_server_name(&self.trust_domain, hello.server_name()?)?;
        self.lookup.certified_key(&id)
    }
}

/// Server side of the tunnel listener.
pub fn server_config<L: CertLookup + 'static>(
    trust_domain: &str,
    lookup: Arc<L>,
    roots: Arc<RootCertStore>,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(TlsError::Verifier)?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(BySni {
            trust_domain: trust_domain.into(),
            lookup,
        }));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(cfg)
}

/// Parses a PEM bundle of root certificates.
pub fn root_store(pems: &[String]) -> Result<RootCertStore, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let mut store = RootCertStore::empty();
    for pem in pems {
        for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            store
                .add(der.map_err(|_| TlsError::Parse)?)
                .map_err(TlsError::Config)?;
        }
    }
    Ok(store)
}

/// Classifies a handshake failure for counters: why a peer was refused.
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return "io";
    };
    match inner {
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_issuer",
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired",
        Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
            "unexpected_identity"
        }
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::NoCertificatesPresented => "no_client_certificate",
        Error::AlertReceived(_) => "alert_received",
        Error::General(_) => "general",
        _ => "protocol",
    }
}
