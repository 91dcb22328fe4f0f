//! Peers the mesh must refuse, and count: forged, expired and mismatched certificates, and
//! authenticated peers that hold a connection without using it.
use std::{sync::Arc, time::Duration};

use mesh_tests::{ClusterBuilder, Pair, connect_in, listen_in, n};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::{
    ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PORT: u16 = 8080;

/// A leaf for `spiffe_id`, signed by `issuer`, valid in [now + from, now + to].
fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    spiffe_id: &str,
    from: i64,
    to: i64,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now + time::Duration::seconds(from);
    p.not_after = now + time::Duration::seconds(to);
    let cert = p.signed_by(&key, issuer).unwrap();
    (
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

fn rogue_ca() -> Issuer<'static, KeyPair> {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    Issuer::new(p, key)
}

fn mesh_ca(cluster: &mesh_tests::Cluster) -> Issuer<'static, KeyPair> {
    let (cert, key) = cluster.ctrl.as_ref().unwrap().root_ca();
    let key = KeyPair::from_pem(&std::fs::read_to_string(key).unwrap()).unwrap();
    Issuer::from_ca_cert_pem(&std::fs::read_to_string(cert).unwrap(), key).unwrap()
}

/// Accepts any server: these tests are about what the *server* refuses.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS 1.3 connection (ALPN h2) from node 0 to node 1's tunnel port, presenting `chain` and
/// asking for `sni`, as node 0's proxy would.
async fn tls_to_node1(
    cluster: &mesh_tests::Cluster,
    (chain, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_client_auth_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let node1 = std::net::SocketAddr::new(cluster.nodes[1].ipv4.into(), 15008);
    let tcp = connect_in(&cluster.nodes[0].netns, node1).await.unwrap();
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
}

/// The client's SPIFFE ID, and the name that asks node 1's proxy for the server's identity.
fn client_id_and_sni(client: &mesh_tests::Pod, server: &mesh_tests::Pod) -> (String, String) {
    (
        format!(
            "spiffe://cluster.local/ns/default/sa/{}",
            client.service_account
        ),
        format!("{}.default.id.mesh", server.service_account),
    )
}

/// Presents `chain` to node 1's tunnel port as if it were node 0's proxy, asking for `sni`.
/// Returns whether the server let the connection live long enough to answer a request.
async fn present(
    cluster: &mesh_tests::Cluster,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    sni: &str,
) -> bool {
    // In TLS 1.3 the client finishes first; a refused client certificate shows as an alert on
    // the next read.
    let Ok(mut tls) = tls_to_node1(cluster, (chain, key), sni).await else {
        return false;
    };
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(Duration::from_secs(3), tls.read(&mut buf)).await, Ok(Ok(n)) if n > 0)
}

#[tokio::test]
async fn forged_and_expired_client_certificates_are_refused_and_counted() {
    let Pair {
        cluster,
        client,
        server,
        server_process: _s,
    } = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .with_controller()
        .start_pair(PORT)
        .await
        .unwrap();
    let (client_id, sni) = client_id_and_sni(&client, &server);

    // Control: a certificate from the mesh CA, currently valid, is accepted.
    let (chain, key) = leaf(&mesh_ca(&cluster), &client_id, -60, 3600);
    assert!(
        present(&cluster, chain, key, &sni).await,
        "a valid mesh certificate was refused"
    );

    let (chain, key) = leaf(&rogue_ca(), &client_id, -60, 3600);
    assert!(
        !present(&cluster, chain, key, &sni).await,
        "certificate from another CA accepted"
    );
    let (chain, key) = leaf(&mesh_ca(&cluster), &client_id, -7200, -3600);
    assert!(
        !present(&cluster, chain, key, &sni).await,
        "expired certificate accepted"
    );

    let c1 = cluster.nodes[1].counters().await.unwrap();
    let refused = &c1["tunnel"]["inbound_tls_refused"];
    assert_eq!(n(refused, &["unknown_issuer"]), 1, "{c1}");
    assert_eq!(n(refused, &["expired"]), 1, "{c1}");
    // The proxy kept serving everyone else.
    let report = client
        .client(server.addr(false, PORT), 2, 128)
        .await
        .unwrap();
    assert_eq!(n(&report, &["ok"]), 2, "{report}");
}

/// Reads HTTP/2 frames from `s` until the peer closes: the frame types seen, and when it closed.
async fn frames_until_closed(
    s: &mut (impl tokio::io::AsyncRead + Unpin),
    within: Duration,
) -> Option<(Vec<u8>, Duration)> {
    let start = std::time::Instant::now();
    let mut types = Vec::new();
    let mut head = [0u8; 9];
    loop {
        let read = tokio::time::timeout_at((start + within).into(), s.read_exact(&mut head))
            .await
            .ok()?;
        if read.is_err() {
            return Some((types, start.elapsed()));
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        types.push(head[3]);
        let mut payload = vec![0u8; len];
        if s.read_exact(&mut payload).await.is_err() {
            return Some((types, start.elapsed()));
        }
    }
}

#[tokio::test]
async fn an_authenticated_peer_that_holds_a_connection_idle_is_told_to_go() {
    let Pair {
        cluster,
        client,
        server,
        server_process: _s,
    } = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .with_controller()
        .node_args(&["--tunnel-idle-timeout", "2s"])
        .start_pair(PORT)
        .await
        .unwrap();
    let (client_id, sni) = client_id_and_sni(&client, &server);
    // A genuine certificate, a complete HTTP/2 handshake, then nothing: memory held for free
    // unless the server lets idle connections go.
    let (chain, key) = leaf(&mesh_ca(&cluster), &client_id, -60, 3600);
    let mut tls = tls_to_node1(&cluster, (chain, key), &sni).await.unwrap();
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let (types, after) = frames_until_closed(&mut tls, Duration::from_secs(15))
        .await
        .expect("an idle authenticated connection was kept past its idle timeout");
    const GOAWAY: u8 = 7;
    assert!(
        types.contains(&GOAWAY),
        "closed without a GOAWAY: {types:?}"
    );
    assert!(
        after >= Duration::from_millis(1500),
        "closed after {after:?}"
    );
    let c1 = cluster.nodes[1].counters().await.unwrap();
    assert!(n(&c1, &["tunnel", "inbound_idle_closed"]) >= 1, "{c1}");

    // Honest pooled connections that idle out are replaced: requests on either side of the
    // timeout all succeed.
    for _ in 0..3 {
        let report = client
            .client(server.addr(false, PORT), 2, 128)
            .await
            .unwrap();
        assert_eq!(n(&report, &["ok"]), 2, "{report}");
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let c0 = cluster.nodes[0].counters().await.unwrap();
    assert!(
        n(&c0, &["tunnel", "outbound_connections"]) >= 3,
        "the client's connection was never closed for idling: {c0}"
    );
}

#[tokio::test]
async fn a_server_with_a_valid_certificate_but_the_wrong_identity_is_refused() {
    let Pair {
        cluster,
        client,
        server,
        server_process: _s,
    } = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .with_controller()
        .start_pair(PORT)
        .await
        .unwrap();
    // An impostor on the fabric, holding a genuine mesh certificate - of another workload.
    let impostor_id = format!(
        "spiffe://cluster.local/ns/default/sa/{}",
        server.service_account
    );
    let (chain, key) = leaf(&mesh_ca(&cluster), &impostor_id, -60, 3600);
    let ctrl_ns = cluster.ctrl.as_ref().unwrap().netns.clone();
    let listener = listen_in(&ctrl_ns, "10.250.0.254:15008".parse().unwrap()).unwrap();
    let cfg =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let impostor = tokio::spawn(async move {
        let mut handshakes = 0;
        while let Ok(Ok((tcp, _))) =
            tokio::time::timeout(Duration::from_secs(2), listener.accept()).await
        {
            handshakes += 1;
            let _ = acceptor.accept(tcp).await;
        }
        handshakes
    });
    // Node 0 is told a workload "victim" (identity sa/victim) lives behind the impostor's address.
    let placement_path = cluster
        .dir
        .join(format!("placement-{}.json", cluster.nodes[0].name));
    let mut placement: Value =
        serde_json::from_slice(&std::fs::read(&placement_path).unwrap()).unwrap();
    placement["nodes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "elsewhere", "addresses": ["10.250.0.254"]}));
    placement["pods"].as_array_mut().unwrap().push(json!({
        "namespace": "default", "name": "victim", "node": "elsewhere", "service_account": "victim", "ips": ["10.77.0.1"]
    }));
    mesh_tests::ctrl::write_json(&placement_path, &placement).unwrap();
    let reloaded = || {
        cluster.nodes[0]
            .log_records()
            .iter()
            .any(|r| r["fields"]["message"] == "placement reloaded")
    };
    for _ in 0..40 {
        if reloaded() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloaded(), "node 0 did not pick up the new placement");

    let report = client
        .client("10.77.0.1:80".parse().unwrap(), 1, 64)
        .await
        .unwrap();
    assert_eq!(
        n(&report, &["ok"]),
        0,
        "connected through an impostor: {report}"
    );
    let c0 = cluster.nodes[0].counters().await.unwrap();
    assert_eq!(n(&c0, &["tunnel", "outbound_tls_refused"]), 1, "{c0}");
    assert!(
        cluster.nodes[0]
            .log_records()
            .iter()
            .any(
                |r| r["fields"]["message"] == "peer presented another identity"
                    && r["fields"]["presented"] == impostor_id.as_str()
                    && r["fields"]["expected"] == "spiffe://cluster.local/ns/default/sa/victim"
            ),
        "{}",
        cluster.nodes[0].log_tail(10)
    );
    assert!(
        impostor.await.unwrap() >= 1,
        "the impostor was never reached"
    );
}

#[tokio::test]
async fn during_a_root_rotation_both_roots_are_trusted() {
    // The next root, trusted alongside the current one before anything is issued from it.
    let next_key = KeyPair::generate().unwrap();
    let mut next_params = CertificateParams::default();
    next_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    next_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "next mesh root");
    let next_cert = next_params.self_signed(&next_key).unwrap();
    let next = Issuer::new(next_params, next_key);
    let dir = tempfile_dir();
    let roots = dir.join("next-root.pem");
    std::fs::write(&roots, next_cert.pem()).unwrap();

    let Pair {
        cluster,
        client,
        server,
        server_process: _s,
    } = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(1)
        .with_controller()
        .ctrl_args(&["--extra-roots", roots.to_str().unwrap()])
        .start_pair(PORT)
        .await
        .unwrap();
    // Current root: mesh traffic flows, and the nodes learned the two-root bundle with it.
    let report = client
        .client(server.addr(false, PORT), 2, 128)
        .await
        .unwrap();
    assert_eq!(n(&report, &["ok"]), 2, "{report}");
    let bundle = std::fs::read_to_string(cluster.ctrl.as_ref().unwrap().trust_bundle()).unwrap();
    assert_eq!(
        bundle.matches("BEGIN CERTIFICATE").count(),
        2,
        "published bundle: {bundle}"
    );

    // A peer whose certificate already comes from the next root is accepted by node 1...
    let (client_id, sni) = client_id_and_sni(&client, &server);
    let (chain, key) = leaf(&next, &client_id, -60, 3600);
    assert!(
        present(&cluster, chain, key, &sni).await,
        "a certificate from the rotating-in root was refused"
    );
    // ...while a root nobody configured still is not.
    let (chain, key) = leaf(&rogue_ca(), &client_id, -60, 3600);
    assert!(!present(&cluster, chain, key, &sni).await);
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mesh-rotation-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Opens a tunnel connection to node 1 as the holder of `chain`, asks for `sni`, and sends one
/// CONNECT for `target` claiming the source `forwarded`: the answer's status (0: no answer).
async fn connect_claiming(
    cluster: &mesh_tests::Cluster,
    (chain, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    sni: &str,
    target: std::net::SocketAddr,
    forwarded: &str,
) -> u16 {
    let tls = tls_to_node1(cluster, (chain, key), sni).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(hyper::Method::CONNECT)
        .uri(target.to_string())
        .header("forwarded", forwarded)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(5), send.send_request(req)).await {
        Ok(Ok(resp)) => resp.status().as_u16(),
        _ => 0,
    }
}

/// `Forwarded: for=` from an authenticated peer decides `ipBlocks`: a peer holding one
/// workload's identity must not claim another workload's address. Refused and counted; the same
/// claim with the identity that owns the address passes.
#[tokio::test]
async fn a_peer_cannot_claim_another_workloads_source_address() {
    let cluster = ClusterBuilder::new()
        .nodes(2)
        .pods_per_node(2)
        .config_stream()
        .start()
        .await
        .unwrap();
    let (mallory, allowed) = (cluster.pod(0, 0).clone(), cluster.pod(0, 1).clone());
    let server = cluster.pod(1, 0).clone();
    let _s = server.serve(PORT, false).await.unwrap();
    for p in [&mallory, &allowed, &server] {
        cluster.enroll(p).await.unwrap();
    }
    let policy = format!(
        "apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-one-address, namespace: {ns}}}\nspec:\n  action: ALLOW\n  rules:\n  - from: [{{ipBlocks: ['{ip}/32']}}]\n",
        ns = server.namespace,
        ip = allowed.ipv4
    );
    cluster
        .change_config("authz.yaml", Some(&policy))
        .await
        .unwrap();
    let dst = server.addr(false, PORT);
    assert_eq!(n(&allowed.client(dst, 1, 64).await.unwrap(), &["ok"]), 1);
    assert_eq!(n(&mallory.client(dst, 1, 64).await.unwrap(), &["ok"]), 0);

    let id = |p: &mesh_tests::Pod| {
        format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            p.namespace, p.service_account
        )
    };
    let sni = format!("{}.{}.id.mesh", server.service_account, server.namespace);
    let claim = format!("for=\"{}:40000\"", allowed.ipv4);
    let ca = mesh_ca(&cluster);
    // Control: the address's own identity, through this raw client, is let in.
    let status = connect_claiming(
        &cluster,
        leaf(&ca, &id(&allowed), -60, 3600),
        &sni,
        dst,
        &claim,
    )
    .await;
    assert_eq!(status, 200, "the owner of the address was refused");
    // Mallory's (valid) identity claiming that address.
    let status = connect_claiming(
        &cluster,
        leaf(&ca, &id(&mallory), -60, 3600),
        &sni,
        dst,
        &claim,
    )
    .await;
    assert_eq!(status, 403, "a peer borrowed another workload's address");
    let c1 = cluster.nodes[1].counters().await.unwrap();
    assert_eq!(
        n(&c1, &["tunnel", "inbound_refused_spoofed_source"]),
        1,
        "{}",
        c1["tunnel"]
    );
}
