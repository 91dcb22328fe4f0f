//! Runs inside a test pod (its network namespace and cgroup): the workloads of the end-to-end tests,
//! the benchmark and the demo. Results are one JSON object on stdout.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

mod stream;

mod pb {
    tonic::include_proto!("testpod.v1");
}

#[derive(Parser)]
struct Cli {
    /// How long a connect may take before it counts as failed.
    #[arg(long, global = true, default_value_t = 5000)]
    connect_timeout_ms: u64,
    /// Put this IPv6 extension header in front of what IPv6 connections send (their SYN too).
    #[arg(long, global = true, value_enum)]
    ipv6_ext: Option<mesh_tests::sys::Ipv6Ext>,
    #[command(subcommand)]
    cmd: Cmd,
}

static CONNECT_TIMEOUT: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
static IPV6_EXT: std::sync::OnceLock<Option<mesh_tests::sys::Ipv6Ext>> = std::sync::OnceLock::new();

#[derive(Subcommand)]
enum Cmd {
    /// Accept connections; greet each with `HELLO peer=.. local=..` then echo (or count, with --sink).
    Serve {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        /// Read everything, then answer with the byte count: for bulk throughput.
        #[arg(long)]
        sink: bool,
    },
    /// HTTP/1.1 and HTTP/2 (prior knowledge) server: a small 200 with `x-pod: NAME` (for wrk and
    /// h2load); `/echo...` answers with what it received as JSON; `/status/N` answers N;
    /// `/delay/MS` answers after MS milliseconds; `/reset` drops the connection.
    Http {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        /// Who this server is (a pod name, a version).
        #[arg(long, default_value = "")]
        name: String,
        /// Answer every request with this status (a broken endpoint).
        #[arg(long)]
        status: Option<u16>,
    },
    /// Open connections, send a pattern unique to each, check the echo byte for byte.
    Client {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value_t = 1024)]
        bytes: usize,
        /// Keep every connection open until all are established (proves concurrency).
        #[arg(long)]
        hold: bool,
        /// Send this text, repeated, instead of the per-connection binary pattern (recognisable
        /// in a packet capture).
        #[arg(long)]
        text: Option<String>,
    },
    /// What a hostile pod does to fill the node's shared redirect-record maps: narrows its
    /// ephemeral port range to --ports ports and binds them all, so that each of --connects
    /// connects to --to fails (EADDRNOTAVAIL) after the redirect program has run. Prints the
    /// connect outcomes as one JSON line; with --hold keeps every socket until stdin closes.
    Hog {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 64)]
        ports: u16,
        #[arg(long)]
        connects: usize,
        #[arg(long)]
        hold: bool,
    },
    /// Connection rate: connect, one echo round trip, close; as fast as possible.
    Rate {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// Request/response over persistent connections: throughput and latency.
    Rr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 16)]
        conns: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Requests per second per connection (0 = as fast as possible): latency under light load.
        #[arg(long, default_value_t = 0)]
        pace: u64,
        /// HTTP/1.1 GETs to an HTTP server instead of echoed bytes (`size` is then unused).
        #[arg(long)]
        http: bool,
    },
    /// HTTP requests over keep-alive connections; reports answers by status and by `x-pod`.
    Get {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        /// `name: value`, repeatable.
        #[arg(long)]
        header: Vec<String>,
        /// HTTP/2 with prior knowledge instead of HTTP/1.1.
        #[arg(long)]
        h2: bool,
        #[arg(long, default_value = "GET")]
        method: String,
        /// Wait this long before each request after a connection's first (idle connections).
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        /// Wait this long after connecting before the first request (a pool's connection opened
        /// ahead of use, a slow client).
        #[arg(long, default_value_t = 0)]
        connect_wait_ms: u64,
    },
    /// WebSocket client: sends each message, reads each echo (`NAME: message` from an `http`
    /// server's `/ws`); reports the replies as JSON.
    Ws {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "/ws")]
        path: String,
        #[arg(long)]
        send: Vec<String>,
    },
    /// An OTLP/gRPC trace collector: prints each span it receives as a JSON line.
    Otlp {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// gRPC server (tonic, HTTP/2 cleartext) of `testpod.v1.Greeter`.
    Grpc {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// gRPC calls over one channel: `count` unary Hellos, then a Chat stream of `chat` messages;
    /// reports gRPC codes and which servers answered.
    GrpcCall {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        chat: usize,
        /// Ask the server to fail with this code.
        #[arg(long, default_value_t = 0)]
        fail_with: u32,
        /// Wait this long between chat messages (a stream that lives a while).
        #[arg(long, default_value_t = 0)]
        chat_gap_ms: u64,
    },
    /// Bulk transfer to a --sink server: --bytes in all, split over --streams connections that
    /// send at once.
    Bulk {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        streams: u64,
    },
    /// Open --conns echo connections, one round trip on each, then hold them idle: prints one
    /// JSON line once all are open and closes them when stdin closes.
    Idle {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        conns: usize,
    },
    /// Receive a pattern stream on each connection (after waiting --read-after-ms), check it byte
    /// for byte, and answer with the report when the sender is done.
    PatternSink {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long, default_value_t = 0)]
        read_after_ms: u64,
    },
    /// Send a pattern stream to a pattern-sink: --bytes in --bursts bursts --gap-ms apart (the
    /// first right after connecting), in writes of --chunk; report what was written, when a
    /// write first waited longer than --stall-ms, and the sink's check.
    PatternSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1 << 20)]
        bytes: u64,
        #[arg(long, default_value_t = 16 * 1024)]
        chunk: usize,
        #[arg(long, default_value_t = 1)]
        bursts: u64,
        #[arg(long, default_value_t = 50)]
        gap_ms: u64,
        #[arg(long, default_value_t = 300)]
        stall_ms: u64,
    },
    /// Send a pattern stream of --bytes on each connection, then close it.
    PatternSource {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        #[arg(long, default_value_t = 1 << 20)]
        bytes: u64,
    },
    /// Send --count writes of --size bytes with MSG_ZEROCOPY and count the kernel's completion
    /// notifications (SO_ZEROCOPY set before connecting; after, with --late).
    ZerocopySend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 50)]
        count: u32,
        #[arg(long, default_value_t = 65536)]
        size: usize,
        #[arg(long)]
        late: bool,
    },
    /// Read a pattern stream to its end (with splice(2) given --splice) and check it.
    PatternRecv {
        #[arg(long)]
        from: SocketAddr,
        #[arg(long)]
        splice: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    CONNECT_TIMEOUT.get_or_init(|| Duration::from_millis(cli.connect_timeout_ms));
    IPV6_EXT.get_or_init(|| cli.ipv6_ext);
    match cli.cmd {
        Cmd::Serve { listen, sink } => serve(listen, sink).await,
        Cmd::Http {
            listen,
            name,
            status,
        } => http(listen, name, status).await,
        Cmd::Client {
            to,
            conns,
            concurrency,
            bytes,
            hold,
            text,
        } => client(to, conns, concurrency, bytes, hold, text).await,
        Cmd::Hog {
            to,
            ports,
            connects,
            hold,
        } => hog(to, ports, connects, hold).await,
        Cmd::Rate {
            to,
            duration_ms,
            concurrency,
        } => rate(to, Duration::from_millis(duration_ms), concurrency).await,
        Cmd::Rr {
            to,
            duration_ms,
            conns,
            size,
            pace,
            http,
        } => {
            let load = Load {
                duration: Duration::from_millis(duration_ms),
                conns,
                pace,
            };
            if http {
                rr_http(to, load).await
            } else {
                rr(to, load, size).await
            }
        }
        Cmd::Bulk { to, bytes, streams } => bulk(to, bytes, streams).await,
        Cmd::Idle { to, conns } => idle(to, conns).await,
        Cmd::PatternSink {
            listen,
            read_after_ms,
        } => {
            let wait = Duration::from_millis(read_after_ms);
            accept_all(listen, move |s, _| stream::sink_conn(s, wait)).await
        }
        Cmd::PatternSend {
            to,
            bytes,
            chunk,
            bursts,
            gap_ms,
            stall_ms,
        } => {
            let plan = stream::Plan {
                bytes,
                chunk,
                bursts,
                gap: Duration::from_millis(gap_ms),
                stall: Duration::from_millis(stall_ms),
            };
            stream::send(to, plan).await
        }
        Cmd::PatternSource { listen, bytes } => {
            accept_all(listen, move |s, _| stream::source_conn(s, bytes)).await
        }
        Cmd::ZerocopySend {
            to,
            count,
            size,
            late,
        } => stream::zerocopy(to, count, size, late).await,
        Cmd::PatternRecv { from, splice } => {
            stream::recv(from, splice, *CONNECT_TIMEOUT.get().expect("set at start")).await
        }
        Cmd::Ws { to, path, send } => ws(to, path, send).await,
        Cmd::Otlp { listen } => otlp::serve(listen).await,
        Cmd::Grpc { listen, name } => grpc_serve(listen, name).await,
        Cmd::GrpcCall {
            to,
            count,
            chat,
            fail_with,
            chat_gap_ms,
        } => {
            grpc_call(
                to,
                count,
                (chat, Duration::from_millis(chat_gap_ms)),
                fail_with,
            )
            .await
        }
        Cmd::Get {
            to,
            path,
            count,
            conns,
            header,
            h2,
            method,
            pause_ms,
            connect_wait_ms,
        } => {
            let waits = (
                Duration::from_millis(pause_ms),
                Duration::from_millis(connect_wait_ms),
            );
            get(to, path, count, conns, header, h2, method, waits).await
        }
    }
}

/// Binds every address, says "ready", then hands each accepted connection to `handle`.
async fn accept_all<F, Fut>(addrs: Vec<SocketAddr>, handle: F) -> anyhow::Result<()>
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut listeners = Vec::new();
    for a in addrs {
        listeners.push(bind(a).with_context(|| format!("bind {a}"))?);
    }
    println!("ready");
    for l in listeners {
        tokio::spawn(async move {
            loop {
                if let Ok((s, peer)) = l.accept().await {
                    tokio::spawn(handle(s, peer));
                }
            }
        });
    }
    // Serves until killed.
    std::future::pending().await
}

async fn serve(addrs: Vec<SocketAddr>, sink: bool) -> anyhow::Result<()> {
    accept_all(addrs, move |s, peer| async move {
        let _ = if sink {
            sink_conn(s).await
        } else {
            echo_conn(s, peer).await
        };
    })
    .await
}

static HTTP_NAME: std::sync::OnceLock<(String, Option<u16>)> = std::sync::OnceLock::new();

async fn http(addrs: Vec<SocketAddr>, name: String, status: Option<u16>) -> anyhow::Result<()> {
    HTTP_NAME.get_or_init(|| (name, status));
    accept_all(addrs, |s, peer| async move {
        let _ = s.set_nodelay(true);
        let svc = hyper::service::service_fn(move |req| http_answer(req, peer));
        let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(s), svc)
            .await;
    })
    .await
}

type HttpBody = http_body_util::Full<bytes::Bytes>;

async fn http_answer(
    req: hyper::Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> Result<hyper::Response<HttpBody>, std::io::Error> {
    use http_body_util::BodyExt;
    let (name, fixed) = HTTP_NAME.get().expect("set at start");
    let path = req.uri().path().to_string();
    let mut status = fixed.unwrap_or(200);
    let mut body = bytes::Bytes::from_static(b"ok\n");
    if let Some(code) = path.strip_prefix("/status/") {
        status = code.parse().unwrap_or(400);
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    } else if path == "/ws" {
        return Ok(ws_accept(req, name.clone()));
    } else if path == "/reset" {
        return Err(std::io::Error::other("reset as asked"));
    } else if path.starts_with("/echo") {
        let (parts, b) = req.into_parts();
        let received = b.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        let headers: BTreeMap<String, String> = parts
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
            .collect();
        body = serde_json::to_vec(&json!({
            "pod": name,
            "peer": peer.to_string(),
            "version": format!("{:?}", parts.version),
            "method": parts.method.as_str(),
            "uri": parts.uri.to_string(),
            "headers": headers,
            "body_bytes": received.len(),
        }))
        .expect("JSON")
        .into();
    }
    let mut resp = hyper::Response::new(http_body_util::Full::new(body));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    if let Ok(v) = name.parse() {
        resp.headers_mut().insert("x-pod", v);
    }
    Ok(resp)
}

/// Answers a WebSocket handshake with `101` and echoes each message as `NAME: message`.
fn ws_accept(
    mut req: hyper::Request<hyper::body::Incoming>,
    name: String,
) -> hyper::Response<HttpBody> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, handshake::derive_accept_key, protocol::Role};
    let key = req.headers().get("sec-websocket-key").cloned();
    let Some(key) = key.filter(|_| req.headers().contains_key(hyper::header::UPGRADE)) else {
        let mut resp = hyper::Response::new(HttpBody::default());
        *resp.status_mut() = hyper::StatusCode::BAD_REQUEST;
        return resp;
    };
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(io) = on.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(io),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(t) = msg else {
                if msg.is_close() {
                    break;
                }
                continue;
            };
            if ws
                .send(Message::text(format!("{name}: {t}")))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut resp = hyper::Response::new(HttpBody::default());
    *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    h.insert(
        hyper::header::UPGRADE,
        hyper::header::HeaderValue::from_static("websocket"),
    );
    if let Ok(v) = derive_accept_key(key.as_bytes()).parse() {
        h.insert("sec-websocket-accept", v);
    }
    resp
}

async fn ws(to: SocketAddr, path: String, send: Vec<String>) -> anyhow::Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let tcp = TcpStream::connect(to).await.context("connect")?;
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{to}{path}"), tcp)
        .await
        .context("WebSocket handshake")?;
    let mut replies = Vec::new();
    for m in send {
        ws.send(Message::text(m)).await?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) => replies.push(t.to_string()),
            other => anyhow::bail!("no echo: {other:?}"),
        }
    }
    ws.close(None).await?;
    println!(
        "{}",
        json!({"status": resp.status().as_u16(), "replies": replies})
    );
    Ok(())
}

/// IPv6 listeners are IPv6-only so an IPv4 listener can share the port and peers keep their family.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

async fn echo_conn(mut s: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let local = s.local_addr()?;
    s.write_all(format!("HELLO peer={peer} local={local}\n").as_bytes())
        .await?;
    let (mut r, mut w) = s.split();
    tokio::io::copy(&mut r, &mut w).await?;
    w.shutdown().await
}

async fn sink_conn(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    s.write_all(format!("{total}\n").as_bytes()).await?;
    s.shutdown().await
}

fn pattern(conn: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| ((conn * 31 + k * 7) % 251) as u8)
        .collect()
}

/// Connects and reads the server's greeting.
async fn open(to: SocketAddr) -> anyhow::Result<(BufReader<TcpStream>, String)> {
    let timeout = *CONNECT_TIMEOUT.get().expect("set in main");
    let connect = async {
        match (to, IPV6_EXT.get().copied().flatten()) {
            (SocketAddr::V6(_), Some(ext)) => {
                let sock = tokio::net::TcpSocket::new_v6()?;
                mesh_tests::sys::set_ipv6_ext(std::os::fd::AsFd::as_fd(&sock), ext)?;
                sock.connect(to).await
            }
            _ => TcpStream::connect(to).await,
        }
    };
    let s = tokio::time::timeout(timeout, connect)
        .await
        .context("connect timed out")?
        .context("connect")?;
    s.set_nodelay(true)?;
    let mut r = BufReader::new(s);
    let mut hello = String::new();
    tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut hello))
        .await
        .context("greeting timed out")?
        .context("greeting")?;
    anyhow::ensure!(hello.starts_with("HELLO "), "unexpected greeting {hello:?}");
    Ok((r, hello.trim_end().to_string()))
}

#[derive(Default)]
struct Report {
    ok: usize,
    failed: usize,
    errors: Vec<String>,
    peers: BTreeSet<String>,
    hellos: BTreeMap<String, usize>,
}

async fn client(
    to: SocketAddr,
    conns: usize,
    concurrency: usize,
    bytes: usize,
    hold: bool,
    text: Option<String>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let text = Arc::new(text);
    let report = Arc::new(Mutex::new(Report::default()));
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    // With --hold every connection waits here until all are open.
    let barrier = Arc::new(tokio::sync::Barrier::new(if hold { conns } else { 1 }));
    let mut tasks = Vec::new();
    for id in 0..conns {
        let (report, sem, barrier) = (report.clone(), sem.clone(), barrier.clone());
        let data = match text.as_deref() {
            Some(t) => t.bytes().cycle().take(bytes).collect(),
            None => pattern(id, bytes),
        };
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            let result = one_conn(to, data, &barrier).await;
            let mut r = report.lock().unwrap();
            match result {
                Ok((peer, hello)) => {
                    r.ok += 1;
                    r.peers.insert(peer);
                    // The server-side peer port varies per connection; keep the address part only.
                    *r.hellos.entry(strip_peer_port(&hello)).or_default() += 1;
                }
                Err(e) => {
                    r.failed += 1;
                    if r.errors.len() < 10 {
                        r.errors.push(format!("conn {id}: {e:#}"));
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let r = report.lock().unwrap();
    let out = json!({
        "attempted": conns,
        "ok": r.ok,
        "failed": r.failed,
        "errors": r.errors,
        "peer_addrs": r.peers,
        "hellos": r.hellos,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    });
    println!("{out}");
    Ok(())
}

fn strip_peer_port(hello: &str) -> String {
    hello
        .split(' ')
        .map(|part| match part.strip_prefix("peer=") {
            Some(p) => format!(
                "peer={}",
                p.parse::<SocketAddr>()
                    .map(|a| a.ip().to_string())
                    .unwrap_or(p.into())
            ),
            None => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

async fn one_conn(
    to: SocketAddr,
    data: Vec<u8>,
    barrier: &tokio::sync::Barrier,
) -> anyhow::Result<(String, String)> {
    let (r, hello) = open(to).await?;
    let stream = r.into_inner();
    let peer = stream.peer_addr()?.to_string();
    barrier.wait().await;
    let (mut rd, mut wr) = stream.into_split();
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&data).await?;
        wr.shutdown().await
    });
    let mut got = Vec::with_capacity(expected.len());
    tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut got))
        .await
        .context("echo timed out")??;
    writer.await??;
    anyhow::ensure!(
        got.len() == expected.len(),
        "echo length {} != sent {}",
        got.len(),
        expected.len()
    );
    anyhow::ensure!(
        got == expected,
        "echo differs from what this connection sent (mixed up?)"
    );
    Ok((peer, hello))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn rate(to: SocketAddr, duration: Duration, concurrency: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let res: anyhow::Result<()> = async {
                    let (mut r, _) = open(to).await?;
                    r.get_mut().write_all(b"x").await?;
                    let mut b = [0u8; 1];
                    r.read_exact(&mut b).await?;
                    Ok(())
                }
                .await;
                match res {
                    Ok(()) => lat.push(t.elapsed().as_micros() as u64),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    println!(
        "{}",
        json!({
            "connects": lat.len(),
            "errors": errors,
            "connects_per_s": lat.len() as f64 / secs,
            "p50_us": percentile(&lat, 0.5),
            "p99_us": percentile(&lat, 0.99),
        })
    );
    Ok(())
}

/// A request/response load: for how long, over how many connections, at what rate each.
#[derive(Clone, Copy)]
struct Load {
    duration: Duration,
    conns: usize,
    /// Requests per second per connection (0: as fast as possible).
    pace: u64,
}

impl Load {
    /// Paces connection `id`. Connections start a fraction of the interval apart, so that
    /// together they send at an even rate: started together they would send bursts of `conns`
    /// requests that queue behind each other (what a fixed-rate load means is evenly spaced
    /// requests).
    fn pacer(self, id: usize) -> Pacer {
        let interval = (self.pace > 0).then(|| Duration::from_secs_f64(1.0 / self.pace as f64));
        Pacer {
            deadline: Instant::now() + self.duration,
            next: Instant::now()
                + interval.map_or(Duration::ZERO, |i| i * id as u32 / self.conns.max(1) as u32),
            interval,
        }
    }
}

/// When one connection sends its next request.
struct Pacer {
    deadline: Instant,
    next: Instant,
    interval: Option<Duration>,
}

impl Pacer {
    /// Waits for the next request's turn; `false` once the load's time is up.
    async fn tick(&mut self) -> bool {
        if Instant::now() >= self.deadline {
            return false;
        }
        if let Some(i) = self.interval {
            tokio::time::sleep_until(self.next.into()).await;
            self.next += i;
        }
        true
    }
}

async fn rr(to: SocketAddr, load: Load, size: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for id in 0..load.conns.max(1) {
        tasks.push(tokio::spawn(async move {
            let (mut r, _) = open(to).await?;
            let req = pattern(id, size);
            let mut resp = vec![0u8; size];
            let (mut pacer, mut lat) = (load.pacer(id), Vec::new());
            while pacer.tick().await {
                let t = Instant::now();
                r.get_mut().write_all(&req).await?;
                r.read_exact(&mut resp).await?;
                lat.push(t.elapsed().as_micros() as u64);
            }
            anyhow::ensure!(resp == req, "response differs from request");
            anyhow::Ok(lat)
        }));
    }
    report_rr(tasks, started).await
}

/// [`rr`] with HTTP/1.1 GETs on keep-alive connections: each exchange is a request and its whole
/// answer (head, then `content-length` bytes of body), which must be a 200.
async fn rr_http(to: SocketAddr, load: Load) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for id in 0..load.conns.max(1) {
        tasks.push(tokio::spawn(async move {
            let s = TcpStream::connect(to).await.context("connect")?;
            let mut r = BufReader::new(s);
            let req = format!("GET / HTTP/1.1\r\nhost: {to}\r\n\r\n");
            let (mut pacer, mut lat) = (load.pacer(id), Vec::new());
            let mut line = String::new();
            while pacer.tick().await {
                let t = Instant::now();
                r.get_mut().write_all(req.as_bytes()).await?;
                let (mut status, mut length) = (String::new(), 0usize);
                loop {
                    line.clear();
                    anyhow::ensure!(r.read_line(&mut line).await? > 0, "connection closed");
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    if status.is_empty() {
                        status = l.to_string();
                    } else if let Some((k, v)) = l.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        length = v.trim().parse()?;
                    }
                }
                anyhow::ensure!(status.starts_with("HTTP/1.1 200"), "answer: {status}");
                let mut body = vec![0u8; length];
                r.read_exact(&mut body).await?;
                lat.push(t.elapsed().as_micros() as u64);
            }
            anyhow::Ok(lat)
        }));
    }
    report_rr(tasks, started).await
}

/// Prints the latencies of every connection's exchanges: count, rate, p50, p99.
async fn report_rr(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Vec<u64>>>>,
    started: Instant,
) -> anyhow::Result<()> {
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    println!(
        "{}",
        json!({
            "requests": lat.len(),
            "rps": lat.len() as f64 / secs,
            "p50_us": percentile(&lat, 0.5),
            "p99_us": percentile(&lat, 0.99),
        })
    );
    Ok(())
}

async fn bulk(to: SocketAddr, bytes: u64, streams: u64) -> anyhow::Result<()> {
    anyhow::ensure!(streams > 0, "--streams must be at least 1");
    let each = bytes / streams;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..streams {
        tasks.push(tokio::spawn(bulk_stream(to, each)));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let total = each * streams;
    println!(
        "{}",
        json!({"bytes": total, "streams": streams, "gbps": total as f64 * 8.0 / secs / 1e9})
    );
    Ok(())
}

/// Sends `bytes` on one connection to a sink and checks the count it answers with.
async fn bulk_stream(to: SocketAddr, bytes: u64) -> anyhow::Result<()> {
    let s = TcpStream::connect(to).await.context("connect")?;
    let (rd, mut wr) = s.into_split();
    let chunk = vec![0x5au8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        wr.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    wr.shutdown().await?;
    let mut line = String::new();
    BufReader::new(rd).read_line(&mut line).await?;
    let got: u64 = line.trim().parse().context("sink count")?;
    anyhow::ensure!(got == bytes, "sink received {got} of {bytes} bytes");
    Ok(())
}

async fn idle(to: SocketAddr, conns: usize) -> anyhow::Result<()> {
    let mut held = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (mut r, _hello) = open(to).await?;
        r.get_mut().write_all(b"ping\n").await?;
        let mut echo = String::new();
        r.read_line(&mut echo).await?;
        anyhow::ensure!(echo == "ping\n", "echo answered {echo:?}");
        held.push(r);
    }
    println!("{}", json!({"open": held.len()}));
    let mut rest = Vec::new();
    tokio::io::stdin().read_to_end(&mut rest).await?;
    Ok(())
}

/// Answers counted by status and by the `x-pod` header that served them.
#[derive(Default, serde::Serialize)]
struct GetReport {
    statuses: BTreeMap<String, u64>,
    pods: BTreeMap<String, u64>,
    flags: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    /// Connections opened (a closed one is replaced).
    connections: u64,
    /// Requests sent again on a new connection because the server never processed them (a
    /// GOAWAY that came first, a close that raced them).
    retried: u64,
    /// The last body seen, for a look at what came back.
    last_body: String,
}

impl GetReport {
    fn error(&mut self, e: impl std::fmt::Display) {
        *self.errors.entry(e.to_string()).or_default() += 1;
    }
}

#[allow(clippy::too_many_arguments)]
async fn get(
    to: SocketAddr,
    path: String,
    count: usize,
    conns: usize,
    headers: Vec<String>,
    h2: bool,
    method: String,
    // Before each request after a connection's first; after connecting, before its first.
    (pause, connect_wait): (Duration, Duration),
) -> anyhow::Result<()> {
    use http_body_util::{BodyExt, Empty};
    let report = Arc::new(Mutex::new(GetReport::default()));
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(count));
    let mut tasks = Vec::new();
    for _ in 0..conns.max(1) {
        let (report, left, path, headers, method) = (
            report.clone(),
            left.clone(),
            path.clone(),
            headers.clone(),
            method.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut sender: Option<Sender> = None;
            let mut retried = 0;
            loop {
                if left
                    .fetch_update(
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                        |n| n.checked_sub(1),
                    )
                    .is_err()
                {
                    return;
                }
                if sender.is_some() && !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                if sender.as_ref().is_none_or(Sender::is_closed) {
                    match Sender::connect(to, h2).await {
                        Ok(s) => {
                            report.lock().unwrap().connections += 1;
                            sender = Some(s);
                            tokio::time::sleep(connect_wait).await;
                        }
                        Err(e) => {
                            report.lock().unwrap().error(e);
                            continue;
                        }
                    }
                }
                let mut req = hyper::Request::builder()
                    .method(method.as_str())
                    .uri(if h2 {
                        format!("http://{to}{path}")
                    } else {
                        path.clone()
                    })
                    .body(Empty::<bytes::Bytes>::new())
                    .expect("request");
                if !h2 {
                    req.headers_mut()
                        .insert("host", to.to_string().parse().unwrap());
                }
                for h in &headers {
                    if let Some((k, v)) = h.split_once(':') {
                        req.headers_mut().append(
                            hyper::header::HeaderName::from_bytes(k.trim().as_bytes()).unwrap(),
                            v.trim().parse().unwrap(),
                        );
                    }
                }
                let s = sender.as_mut().expect("connected above");
                let sent = s.send(req).await;
                if let Err(e) = &sent
                    && never_processed(e)
                    && retried < MAX_RETRIES
                {
                    // What clients with a pool and gRPC clients do (RFC 9113 section 8.7): the
                    // request goes again on a new connection; it counts once.
                    retried += 1;
                    report.lock().unwrap().retried += 1;
                    left.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    sender = None;
                    continue;
                }
                retried = 0;
                match sent {
                    Ok(resp) => {
                        let status = resp.status().as_u16().to_string();
                        let pod = resp
                            .headers()
                            .get("x-pod")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let flag = resp
                            .headers()
                            .get("x-nodemesh-flag")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        // An answer counts once its body has arrived whole; a body cut short
                        // is an error (and the connection is not used again).
                        let body = match resp.into_body().collect().await {
                            Ok(b) => b.to_bytes(),
                            Err(e) => {
                                report.lock().unwrap().error(format!("{status} body: {e}"));
                                sender = None;
                                continue;
                            }
                        };
                        let mut r = report.lock().unwrap();
                        *r.statuses.entry(status).or_default() += 1;
                        *r.pods.entry(pod).or_default() += 1;
                        if !flag.is_empty() {
                            *r.flags.entry(flag).or_default() += 1;
                        }
                        r.last_body = String::from_utf8_lossy(&body).into();
                    }
                    Err(e) => {
                        report.lock().unwrap().error(e.into_error());
                        sender = None;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let r = report.lock().unwrap();
    println!("{}", serde_json::to_string(&*r)?);
    Ok(())
}

type GetBody = http_body_util::Empty<bytes::Bytes>;

/// Times one request goes again before its failure counts.
const MAX_RETRIES: u32 = 3;

/// Whether a gRPC call never reached the server: hyper did not send it, or the server refused
/// its stream.
fn never_left(s: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        if let Some(h) = e.downcast_ref::<hyper::Error>()
            && h.is_canceled()
        {
            return true;
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return (h2.is_go_away() && h2.is_remote())
                || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = e.source();
    }
    false
}

/// Whether the server never processed the request: the connection did not send it, or the
/// server refused its stream (a GOAWAY naming an earlier last stream, or REFUSED_STREAM).
fn never_processed(e: &hyper::client::conn::TrySendError<hyper::Request<GetBody>>) -> bool {
    if e.message().is_some() {
        return true;
    }
    let mut source = std::error::Error::source(e.error());
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return (h2.is_go_away() && h2.is_remote())
                || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = s.source();
    }
    false
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<GetBody>),
    H2(hyper::client::conn::http2::SendRequest<GetBody>),
}

impl Sender {
    async fn connect(to: SocketAddr, h2: bool) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(to).await?;
        tcp.set_nodelay(true)?;
        let io = hyper_util::rt::TokioIo::new(tcp);
        Ok(if h2 {
            let (s, c) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await?;
            tokio::spawn(c);
            Sender::H2(s)
        } else {
            let (s, c) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(c);
            Sender::H1(s)
        })
    }

    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Sends `req`; a request the connection never sent comes back with the error (what
    /// clients with a pool retry on a new connection: a GOAWAY, a close that raced it).
    async fn send(
        &mut self,
        req: hyper::Request<GetBody>,
    ) -> Result<
        hyper::Response<hyper::body::Incoming>,
        hyper::client::conn::TrySendError<hyper::Request<GetBody>>,
    > {
        match self {
            Sender::H1(s) => {
                if s.ready().await.is_err() {
                    return s.try_send_request(req).await;
                }
                s.try_send_request(req).await
            }
            Sender::H2(s) => {
                if s.ready().await.is_err() {
                    return s.try_send_request(req).await;
                }
                s.try_send_request(req).await
            }
        }
    }
}

struct Greeter {
    name: String,
}

#[tonic::async_trait]
impl pb::greeter_server::Greeter for Greeter {
    async fn hello(
        &self,
        req: tonic::Request<pb::HelloRequest>,
    ) -> Result<tonic::Response<pb::HelloReply>, tonic::Status> {
        let r = req.into_inner();
        if r.fail_with != 0 {
            return Err(tonic::Status::new(
                tonic::Code::from(r.fail_with as i32),
                "failing as asked",
            ));
        }
        Ok(tonic::Response::new(pb::HelloReply {
            message: format!("hello {}", r.name),
            server: self.name.clone(),
        }))
    }

    type ChatStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::HelloReply, tonic::Status>> + Send>,
    >;

    async fn chat(
        &self,
        req: tonic::Request<tonic::Streaming<pb::HelloRequest>>,
    ) -> Result<tonic::Response<Self::ChatStream>, tonic::Status> {
        use tokio_stream::StreamExt;
        let name = self.name.clone();
        let out = req.into_inner().map(move |m| {
            m.map(|m| pb::HelloReply {
                message: m.name,
                server: name.clone(),
            })
        });
        Ok(tonic::Response::new(Box::pin(out)))
    }
}

async fn grpc_serve(addrs: Vec<SocketAddr>, name: String) -> anyhow::Result<()> {
    let mut listeners = Vec::new();
    for a in addrs {
        listeners.push(bind(a).with_context(|| format!("bind {a}"))?);
    }
    println!("ready");
    let mut tasks = Vec::new();
    for l in listeners {
        let svc = pb::greeter_server::GreeterServer::new(Greeter { name: name.clone() });
        tasks.push(tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        ));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn grpc_call(
    to: SocketAddr,
    count: usize,
    (chat, chat_gap): (usize, Duration),
    fail_with: u32,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{to}"))?
        .connect()
        .await?;
    let mut client = pb::greeter_client::GreeterClient::new(channel);
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    let mut servers: BTreeMap<String, u64> = BTreeMap::new();
    let mut messages: BTreeMap<String, u64> = BTreeMap::new();
    let mut retried = 0u64;
    for i in 0..count {
        let req = || pb::HelloRequest {
            name: format!("n{i}"),
            fail_with,
        };
        let mut r = client.hello(req()).await;
        // gRPC's transparent retry: a call that never left (the connection had a GOAWAY, or
        // the server refused the stream) goes again; grpc-go and grpc-java do this, tonic not.
        if let Err(s) = &r
            && never_left(s)
        {
            retried += 1;
            r = client.hello(req()).await;
        }
        match r {
            Ok(r) => {
                *codes.entry("0".into()).or_default() += 1;
                *servers.entry(r.into_inner().server).or_default() += 1;
            }
            Err(s) => {
                *codes.entry((s.code() as i32).to_string()).or_default() += 1;
                *messages.entry(s.message().to_string()).or_default() += 1;
            }
        }
    }
    let mut echoed = 0;
    if chat > 0 {
        let (mut tx, rx) = tokio::sync::mpsc::channel(16);
        let resp = match client
            .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            Err(s) if never_left(&s) => {
                retried += 1;
                let (tx2, rx) = tokio::sync::mpsc::channel(16);
                tx = tx2;
                client
                    .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await?
            }
            r => r?,
        };
        let mut inbound = resp.into_inner();
        // One message at a time: each answer must come back before the next is sent (the
        // stream is live end to end, not buffered until the request ends).
        for i in 0..chat {
            if i > 0 {
                tokio::time::sleep(chat_gap).await;
            }
            tx.send(pb::HelloRequest {
                name: format!("m{i}"),
                fail_with: 0,
            })
            .await?;
            match inbound.message().await? {
                Some(m) if m.message == format!("m{i}") => echoed += 1,
                other => anyhow::bail!("chat: unexpected {other:?}"),
            }
        }
        drop(tx);
        anyhow::ensure!(
            inbound.message().await?.is_none(),
            "chat: stream did not end"
        );
    }
    println!(
        "{}",
        json!({"codes": codes, "servers": servers, "messages": messages, "chat_echoed": echoed, "retried": retried})
    );
    Ok(())
}

/// A minimal OTLP trace collector for the tracing tests.
mod otlp {
    use std::net::SocketAddr;

    use opentelemetry_proto::tonic::{
        collector::trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
        common::v1::{AnyValue, KeyValue, any_value::Value as V},
    };
    use serde_json::{Map, Value, json};

    struct Collector;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn value(v: &Option<AnyValue>) -> Value {
        match v.as_ref().and_then(|v| v.value.as_ref()) {
            Some(V::StringValue(s)) => json!(s),
            Some(V::IntValue(i)) => json!(i),
            Some(V::BoolValue(b)) => json!(b),
            Some(V::DoubleValue(d)) => json!(d),
            _ => Value::Null,
        }
    }

    fn attrs(kv: &[KeyValue]) -> Map<String, Value> {
        kv.iter()
            .map(|a| (a.key.clone(), value(&a.value)))
            .collect()
    }

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            req: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            for rs in req.into_inner().resource_spans {
                let resource = rs
                    .resource
                    .map(|r| attrs(&r.attributes))
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for s in ss.spans {
                        println!(
                            "{}",
                            json!({
                                "trace_id": hex(&s.trace_id),
                                "span_id": hex(&s.span_id),
                                "parent_span_id": hex(&s.parent_span_id),
                                "name": s.name,
                                "kind": s.kind,
                                "resource": resource,
                                "attributes": attrs(&s.attributes),
                            })
                        );
                    }
                }
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector))
            .serve(listen)
            .await?;
        Ok(())
    }
}

async fn hog(to: SocketAddr, ports: u16, connects: usize, hold: bool) -> anyhow::Result<()> {
    let (low, high) = (40_000u32, 40_000 + u32::from(ports.max(2)) - 1);
    std::fs::write(
        "/proc/sys/net/ipv4/ip_local_port_range",
        format!("{low} {high}"),
    )
    .context("narrowing the pod's port range")?;
    let mut bound = Vec::new();
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    while let Ok(l) = std::net::TcpListener::bind(any) {
        bound.push(l);
    }
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut held = Vec::new();
    for _ in 0..connects {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(to),
            socket2::Type::STREAM,
            None,
        )?;
        let outcome = match s.connect(&to.into()) {
            Ok(()) => "ok".to_string(),
            Err(e) => match e.raw_os_error() {
                Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL".to_string(),
                Some(libc::EPERM) => "EPERM".to_string(),
                _ => e.to_string(),
            },
        };
        *outcomes.entry(outcome).or_default() += 1;
        if hold {
            held.push(s);
        }
    }
    println!("{}", json!({"bound": bound.len(), "outcomes": outcomes}));
    if hold {
        let mut rest = Vec::new();
        tokio::io::stdin().read_to_end(&mut rest).await?;
    }
    Ok(())
}
