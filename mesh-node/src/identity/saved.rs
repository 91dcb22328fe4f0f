//! Workload certificates kept in the state directory, so a proxy that starts while the controller
//! is away (the next generation of an upgrade, or a restart after a crash) serves at once with
//! the certificates the node already held, instead of failing connections until the controller
//! is back.
//!
//! The file holds private keys. It is written with mode 0600 by this process's user (root) in the
//! state directory; whoever can read it is root on the node and could read the proxy's memory as
//! well (kubelet keeps its own client key the same way). It does not outlive the boot it was
//! written in: the first start after a reboot deletes it unread, since the pods it was for are
//! gone. Certificates are short-lived, and [`super::Identities`] drops restored ones no pod of the
//! node claims. On the way in nothing is taken on trust: a file that others could write is
//! ignored whole, and each entry must chain to the configured trust bundle, carry the identity
//! it is filed under, hold the key of its leaf and not be expired; anything else is skipped with
//! its reason.
use std::{
    io::Write,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mesh_api::identity::SpiffeId;
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivatePkcs8KeyDer, UnixTime, pem::PemObject},
};
use serde::{Deserialize, Serialize};

use super::{WorkloadCert, tls};

/// The file's name in the state directory.
pub const FILE: &str = "certificates.json";

#[derive(Debug, thiserror::Error)]
pub enum SavedError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} belongs to uid {owner}, not to this process's uid {euid}: ignored")]
    Owner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error("{path} has mode {mode:o}: others could have written it, ignored")]
    Mode { path: PathBuf, mode: u32 },
    #[error("{path} does not parse")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Why one saved certificate is not served.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("the chain or the key does not parse")]
    Pem,
    #[error("the leaf carries no usable identity")]
    Leaf(#[source] tls::TlsError),
    #[error("filed under {filed}, but the certificate is {found}'s")]
    Identity { filed: String, found: String },
    #[error("not of this trust domain")]
    TrustDomain,
    #[error("expired")]
    Expired,
    #[error("does not chain to the trust bundle")]
    Chain(#[source] rustls::Error),
    #[error("the key is not the certificate's")]
    Key(#[source] rustls::Error),
}

#[derive(Serialize, Deserialize)]
struct File {
    /// The kernel's boot id when written (`/proc/sys/kernel/random/boot_id`).
    boot_id: String,
    certificates: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    identity: String,
    chain_pem: String,
    key_pem: String,
    /// When the node received it: rotation at half-life counts from here.
    received_unix: u64,
}

/// What [`load`] found.
pub struct Loaded {
    pub certs: Vec<WorkloadCert>,
    pub skipped: Vec<(String, EntryError)>,
}

/// Writes `certs` to `path` atomically (a temporary file of this process's own, renamed over).
pub fn save<'a>(path: &Path, certs: impl Iterator<Item = &'a WorkloadCert>) -> std::io::Result<()> {
    let file = File {
        boot_id: boot_id()?,
        certificates: certs
            .map(|c| Entry {
                identity: c.id.to_string(),
                chain_pem: pem::encode_many(
                    &c.chain
                        .iter()
                        .map(|d| pem::Pem::new("CERTIFICATE", d.to_vec()))
                        .collect::<Vec<_>>(),
                ),
                key_pem: pem::encode(&pem::Pem::new(
                    "PRIVATE KEY",
                    c.key.secret_pkcs8_der().to_vec(),
                )),
                received_unix: unix(c.received),
            })
            .collect(),
    };
    let body = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Two generations run side by side during an upgrade: each writes its own temporary file.
    // Always a new file (O_EXCL, which follows no symlink), so the keys get mode 0600 and go
    // nowhere a planted file or link would take them.
    let tmp = tmp_of(path, std::process::id());
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&body))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn tmp_of(path: &Path, pid: u32) -> PathBuf {
    path.with_extension(format!("{pid}.tmp"))
}

/// Deletes temporary files that processes killed in the middle of a write left beside `path`:
/// they hold keys too, and nothing else would ever remove them.
fn sweep_leftovers(path: &Path) {
    let (Some(dir), Some(stem)) = (path.parent(), path.file_stem().and_then(|s| s.to_str())) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| {
                n.strip_prefix(stem)?
                    .strip_prefix('.')?
                    .strip_suffix(".tmp")
            })
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Reads what an earlier generation saved at `path`. A missing file is an empty one.
pub fn load(
    path: &Path,
    roots: &RootCertStore,
    trust_domain: &str,
    now: SystemTime,
) -> Result<Loaded, SavedError> {
    let read_err = |source| SavedError::Read {
        path: path.to_path_buf(),
        source,
    };
    sweep_leftovers(path);
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Loaded {
                certs: Vec::new(),
                skipped: Vec::new(),
            });
        }
        Err(e) => return Err(read_err(e)),
    };
    let euid = crate::sys::effective_uid().map_err(read_err)?;
    if meta.uid() != euid {
        return Err(SavedError::Owner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            euid,
        });
    }
    if meta.mode() & 0o077 != 0 {
        return Err(SavedError::Mode {
            path: path.to_path_buf(),
            mode: meta.mode() & 0o7777,
        });
    }
    let bytes = std::fs::read(path).map_err(read_err)?;
    let file: File = serde_json::from_slice(&bytes).map_err(|source| SavedError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    let mut loaded = Loaded {
        certs: Vec::new(),
        skipped: Vec::new(),
    };
    if file.boot_id != boot_id().map_err(read_err)? {
        tracing::info!(path = %path.display(), "certificates saved before the node rebooted: deleted unread");
        std::fs::remove_file(path).map_err(read_err)?;
        return Ok(loaded);
    }
    for e in file.certificates {
        match entry(&e, roots, trust_domain, now) {
            Ok(c) => loaded.certs.push(c),
            Err(why) => loaded.skipped.push((e.identity, why)),
        }
    }
    Ok(loaded)
}

fn entry(
    e: &Entry,
    roots: &RootCertStore,
    trust_domain: &str,
    now: SystemTime,
) -> Result<WorkloadCert, EntryError> {
    let chain = CertificateDer::pem_slice_iter(e.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| EntryError::Pem)?;
    let key =
        PrivatePkcs8KeyDer::from_pem_slice(e.key_pem.as_bytes()).map_err(|_| EntryError::Pem)?;
    let leaf = chain.first().ok_or(EntryError::Pem)?;
    let id: SpiffeId = tls::spiffe_id_of(leaf).map_err(EntryError::Leaf)?;
    if id.as_str() != e.identity {
        return Err(EntryError::Identity {
            filed: e.identity.clone(),
            found: id.to_string(),
        });
    }
    if id.trust_domain() != trust_domain {
        return Err(EntryError::TrustDomain);
    }
    let parsed = rustls::server::ParsedCertificate::try_from(leaf).map_err(EntryError::Chain)?;
    let at = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        &chain[1..],
        at,
        tls::provider().signature_verification_algorithms.all,
    )
    .map_err(|e| match e {
        rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
        ) => EntryError::Expired,
        e => EntryError::Chain(e),
    })?;
    let (not_before, not_after) = tls::validity(leaf).map_err(|_| EntryError::Pem)?;
    // A clock that went back since: count the half-life from now, not from the future.
    let received = (UNIX_EPOCH + Duration::from_secs(e.received_unix)).min(now);
    let cert = WorkloadCert::new(id, chain, key, not_before, not_after, received)
        .map_err(EntryError::Key)?;
    cert.certified.keys_match().map_err(EntryError::Key)?;
    Ok(cert)
}

/// Deletes the file in `state_dir`, if there is one (uninstall).
pub fn remove(state_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(state_dir.join(FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn boot_id() -> std::io::Result<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string())
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };
    use std::os::unix::fs::PermissionsExt;

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// A workload certificate for `id` from `ca`, valid from `from` to `to` seconds around now.
    fn issue(ca: &Ca, id: &str, from: i64, to: i64) -> WorkloadCert {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        p.is_ca = IsCa::ExplicitNoCa;
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let at = |s: i64| {
            let now = SystemTime::now();
            if s >= 0 {
                now + Duration::from_secs(s as u64)
            } else {
                now - Duration::from_secs((-s) as u64)
            }
        };
        p.not_before = at(from).into();
        p.not_after = at(to).into();
        let leaf = p.signed_by(&key, &ca.issuer).unwrap();
        let chain = vec![leaf.der().clone()];
        let (nb, na) = tls::validity(&chain[0]).unwrap();
        WorkloadCert::new(
            id.parse().unwrap(),
            chain,
            PrivatePkcs8KeyDer::from(key.serialize_der()),
            nb,
            na,
            SystemTime::now() - Duration::from_secs(30),
        )
        .unwrap()
    }

    fn roots(ca: &Ca) -> RootCertStore {
        tls::root_store(std::slice::from_ref(&ca.pem)).unwrap()
    }

    const A: &str = "spiffe://td/ns/a/sa/a";
    const B: &str = "spiffe://td/ns/b/sa/b";

    #[test]
    fn what_one_generation_saves_the_next_serves_with_the_same_keys_and_half_life() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join(FILE);
        let ca = ca();
        let certs = [issue(&ca, A, -60, 3600), issue(&ca, B, -60, 3600)];
        save(&path, certs.iter()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "private keys readable by others");
        let loaded = load(&path, &roots(&ca), "td", SystemTime::now()).unwrap();
        assert!(loaded.skipped.is_empty(), "{:?}", loaded.skipped);
        assert_eq!(loaded.certs.len(), 2);
        for (before, after) in certs.iter().zip(&loaded.certs) {
            assert_eq!(before.id, after.id);
            assert_eq!(before.chain, after.chain);
            assert_eq!(before.key.secret_pkcs8_der(), after.key.secret_pkcs8_der());
            assert_eq!(unix(before.received), unix(after.received));
            assert_eq!(before.not_after, after.not_after);
        }
        // Nothing left behind but the file itself.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE]);
        // What a write killed halfway left is swept at the next load; a live writer's is not.
        let dead = tmp_of(&path, u32::MAX - 1);
        let live = tmp_of(&path, std::process::id());
        for t in [&dead, &live] {
            std::fs::write(t, "{").unwrap();
        }
        load(&path, &roots(&ca), "td", SystemTime::now()).unwrap();
        assert!(!dead.exists() && live.exists());
        std::fs::remove_file(&live).unwrap();
        // No file yet: nothing to serve, no error.
        let none = load(
            &dir.path().join("absent"),
            &roots(&ca),
            "td",
            SystemTime::now(),
        );
        assert!(none.unwrap().certs.is_empty());
    }

    /// What a tampered, stale or foreign entry gets: skipped with its reason, and the good
    /// entries beside it still served.
    #[test]
    fn entries_that_are_not_what_they_claim_are_skipped_and_the_rest_served() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, other_ca) = (ca(), ca());
        let good = issue(&ca, A, -60, 3600);
        let key_of_another = issue(&ca, B, -60, 3600);
        type Tamper = fn(&mut Entry, &WorkloadCert);
        type Expect = fn(&EntryError) -> bool;
        let cases: [(&str, WorkloadCert, Tamper, Expect); 6] = [
            (
                "filed under another identity",
                issue(&ca, B, -60, 3600),
                |e, _| e.identity = "spiffe://td/ns/victim/sa/admin".into(),
                |e| matches!(e, EntryError::Identity { .. }),
            ),
            (
                "another trust domain",
                issue(&ca, "spiffe://other/ns/b/sa/b", -60, 3600),
                |_, _| {},
                |e| matches!(e, EntryError::TrustDomain),
            ),
            (
                "expired",
                issue(&ca, B, -7200, -60),
                |_, _| {},
                |e| matches!(e, EntryError::Expired),
            ),
            (
                "from a CA the node does not trust",
                issue(&other_ca, B, -60, 3600),
                |_, _| {},
                |e| matches!(e, EntryError::Chain(_)),
            ),
            (
                "with another certificate's key",
                issue(&ca, B, -60, 3600),
                |e, other| {
                    e.key_pem = pem::encode(&pem::Pem::new(
                        "PRIVATE KEY",
                        other.key.secret_pkcs8_der().to_vec(),
                    ))
                },
                |e| matches!(e, EntryError::Key(_)),
            ),
            (
                "garbled",
                issue(&ca, B, -60, 3600),
                |e, _| e.chain_pem = "-----BEGIN CERTIFICATE-----\nnot base64\n".into(),
                |e| matches!(e, EntryError::Pem),
            ),
        ];
        for (what, bad, tamper, expect) in cases {
            let path = dir.path().join(FILE);
            save(&path, [&good, &bad].into_iter()).unwrap();
            let mut file: File = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            tamper(&mut file.certificates[1], &key_of_another);
            std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
            let loaded = load(&path, &roots(&ca), "td", SystemTime::now()).unwrap();
            let ids: Vec<String> = loaded.certs.iter().map(|c| c.id.to_string()).collect();
            assert_eq!(ids, [A], "{what}: the good entry alone is served");
            assert_eq!(loaded.skipped.len(), 1, "{what}");
            assert!(
                expect(&loaded.skipped[0].1),
                "{what}: {:?}",
                loaded.skipped[0].1
            );
        }
    }

    #[test]
    fn certificates_saved_before_a_reboot_are_deleted_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let ca = ca();
        save(&path, [issue(&ca, A, -60, 3600)].iter()).unwrap();
        let mut file: File = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        file.boot_id = "00000000-0000-0000-0000-000000000000".into();
        std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
        let loaded = load(&path, &roots(&ca), "td", SystemTime::now()).unwrap();
        assert!(loaded.certs.is_empty() && loaded.skipped.is_empty());
        assert!(!path.exists(), "keys of an earlier boot left behind");
    }

    /// A node holds only its pods' identities: what was restored and no pod claims is dropped,
    /// from memory and from the file.
    #[tokio::test]
    async fn restored_certificates_no_pod_claims_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let ca = ca();
        save(
            &path,
            [issue(&ca, A, -60, 3600), issue(&ca, B, -60, 3600)].iter(),
        )
        .unwrap();
        let bundle = dir.path().join("bundle.pem");
        let token = dir.path().join("token");
        std::fs::write(&bundle, &ca.pem).unwrap();
        std::fs::write(&token, "t").unwrap();
        let ids = super::super::Identities::new(
            super::super::CaConfig {
                endpoint: "https://127.0.0.1:1".into(),
                server_name: "ctrl".into(),
                trust_bundle: bundle,
                token_file: token,
                node: "n".into(),
                trust_domain: "td".into(),
                ttl: Duration::from_secs(3600),
            },
            path.clone(),
        )
        .unwrap();
        let (a, b): (SpiffeId, SpiffeId) = (A.parse().unwrap(), B.parse().unwrap());
        assert!(ids.cached(&a).is_some() && ids.cached(&b).is_some());
        tokio::spawn(ids.clone().keep_saved());
        ids.add_owner(a.clone(), "a", "pod-a");
        ids.drop_unclaimed();
        assert!(
            ids.cached(&a).is_some(),
            "a claimed certificate was dropped"
        );
        assert!(
            ids.cached(&b).is_none(),
            "an unclaimed certificate is still served"
        );
        // The file follows, written in the background.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left = load(&path, &roots(&ca), "td", SystemTime::now()).unwrap();
            let left: Vec<String> = left.certs.iter().map(|c| c.id.to_string()).collect();
            if left == [A] {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the file still holds {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A file someone else could have written (planted through a hostPath, or left by a process
    /// of another user) is not served at all.
    #[test]
    fn a_file_others_could_write_is_ignored_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let ca = ca();
        save(&path, [issue(&ca, A, -60, 3600)].iter()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let r = load(&path, &roots(&ca), "td", SystemTime::now());
        assert!(
            matches!(r, Err(SavedError::Mode { mode: 0o644, .. })),
            "{:?}",
            r.err()
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let euid = crate::sys::effective_uid().unwrap();
        if euid == 0 {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            let r = load(&path, &roots(&ca), "td", SystemTime::now());
            assert!(
                matches!(r, Err(SavedError::Owner { owner: 65534, .. })),
                "{:?}",
                r.err()
            );
        }
    }

    /// Someone who can plant a file where the temporary file goes (a symlink to a file they
    /// read, or a world-readable file) must not get the keys written through it.
    #[test]
    fn keys_are_never_written_through_a_planted_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let ca = ca();
        let tmp = tmp_of(&path, std::process::id());
        let bait = dir.path().join("bait");
        std::fs::write(&bait, "").unwrap();
        std::os::unix::fs::symlink(&bait, &tmp).unwrap();
        save(&path, [issue(&ca, A, -60, 3600)].iter()).unwrap();
        assert_eq!(
            std::fs::read(&bait).unwrap(),
            b"",
            "keys written through the link"
        );
        std::fs::write(&tmp, "").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        save(&path, [issue(&ca, A, -60, 3600)].iter()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "keys kept in a file others can read");
        assert_eq!(
            load(&path, &roots(&ca), "td", SystemTime::now())
                .unwrap()
                .certs
                .len(),
            1
        );
    }
}
