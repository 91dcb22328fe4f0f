//! Pattern streams: every byte depends on its position in the stream, so a byte lost, repeated
//! or overtaken anywhere on the way shows at the receiver. For the socket acceleration tests:
//! order across the switch between TCP and the shortcut, a fast writer held back by a slow
//! reader, and readers using `splice`.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

/// The byte at `offset` of a pattern stream.
pub fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 ^ offset as u8
}

fn fill(buf: &mut [u8], start: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(start + i as u64);
    }
}

/// Checks a pattern stream as it arrives.
#[derive(Default)]
pub struct Checker {
    next: u64,
    first_bad: Option<u64>,
}

impl Checker {
    pub fn feed(&mut self, data: &[u8]) {
        if self.first_bad.is_none()
            && let Some(i) = data
                .iter()
                .enumerate()
                .position(|(i, b)| *b != pattern(self.next + i as u64))
        {
            self.first_bad = Some(self.next + i as u64);
        }
        self.next += data.len() as u64;
    }

    pub fn report(&self) -> Value {
        json!({"bytes": self.next, "ok": self.first_bad.is_none(), "first_bad": self.first_bad})
    }
}

/// One connection of a pattern sink: wait `read_after`, read the stream to its end checking it,
/// answer with the report as one JSON line.
pub async fn sink_conn(mut s: TcpStream, read_after: Duration) {
    tokio::time::sleep(read_after).await;
    let mut c = Checker::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => c.feed(&buf[..n]),
        }
    }
    let _ = s.write_all(format!("{}\n", c.report()).as_bytes()).await;
}

/// How [`send`] writes.
pub struct Plan {
    pub bytes: u64,
    pub chunk: usize,
    pub bursts: u64,
    pub gap: Duration,
    pub stall: Duration,
}

/// Writes a pattern stream in bursts (the first right after connecting), then reads the sink's
/// report. Prints what was written, the longest wait in one write, and how far the stream had
/// got when a write first waited longer than `stall`.
pub async fn send(to: SocketAddr, plan: Plan) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(to).await.context("connect")?;
    let _ = s.set_nodelay(true);
    let per_burst = plan.bytes.div_ceil(plan.bursts.max(1));
    let mut buf = vec![0u8; plan.chunk];
    let (mut written, mut stalled_at, mut longest) = (0u64, None, Duration::ZERO);
    while written < plan.bytes {
        if written > 0 && written % per_burst == 0 {
            tokio::time::sleep(plan.gap).await;
        }
        let n = (plan.chunk as u64)
            .min(plan.bytes - written)
            .min(per_burst - written % per_burst) as usize;
        fill(&mut buf[..n], written);
        let started = Instant::now();
        s.write_all(&buf[..n]).await.context("write")?;
        let took = started.elapsed();
        longest = longest.max(took);
        if took > plan.stall && stalled_at.is_none() {
            stalled_at = Some(written);
        }
        written += n as u64;
    }
    s.shutdown().await?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .await
        .context("the sink's report")?;
    let report: Value = serde_json::from_str(line.trim()).context("the sink's report")?;
    println!(
        "{}",
        json!({"written": written, "stalled_at": stalled_at,
               "longest_write_ms": longest.as_millis() as u64, "report": report})
    );
    Ok(())
}

/// One connection of a pattern source: a pattern stream of `bytes`, then the end of the stream.
pub async fn source_conn(mut s: TcpStream, bytes: u64) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (buf.len() as u64).min(bytes - sent) as usize;
        fill(&mut buf[..n], sent);
        if s.write_all(&buf[..n]).await.is_err() {
            return;
        }
        sent += n as u64;
    }
    let _ = s.shutdown().await;
}

/// Reads a pattern stream to its end, with `splice(2)` when asked, and checks it.
pub async fn recv(from: SocketAddr, splice: bool, connect_timeout: Duration) -> anyhow::Result<()> {
    let report = tokio::task::spawn_blocking(move || -> anyhow::Result<Value> {
        let s = std::net::TcpStream::connect_timeout(&from, connect_timeout).context("connect")?;
        // A reader that never sees the rest of the stream fails instead of hanging.
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut c = Checker::default();
        let outcome = if splice {
            mesh_tests::sys::splice_read(&s, |chunk| c.feed(chunk)).map(|_| ())
        } else {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match std::io::Read::read(&mut &s, &mut buf) {
                    Ok(0) => break Ok(()),
                    Ok(n) => c.feed(&buf[..n]),
                    Err(e) => break Err(e),
                }
            }
        };
        let mut report = c.report();
        if let Err(e) = outcome {
            report["ok"] = false.into();
            report["error"] = e.to_string().into();
        }
        Ok(report)
    })
    .await??;
    println!("{report}");
    Ok(())
}

/// Sends `count` writes of `size` bytes with `MSG_ZEROCOPY` to a sink, then waits up to three
/// seconds for the kernel's completion notifications (an app owes its buffers to the kernel until
/// they arrive). `SO_ZEROCOPY` goes on before connecting, as client apps do, or after with `late`.
pub async fn zerocopy(to: SocketAddr, count: u32, size: usize, late: bool) -> anyhow::Result<()> {
    let report = tokio::task::spawn_blocking(move || -> anyhow::Result<Value> {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(to),
            socket2::Type::STREAM,
            None,
        )?;
        if !late {
            mesh_tests::sys::enable_zerocopy(&sock)?;
        }
        sock.connect(&to.into()).context("connect")?;
        let s: std::net::TcpStream = sock.into();
        if late {
            mesh_tests::sys::enable_zerocopy(&s)?;
        }
        // Kept alive and unchanged until the completions are in.
        let buf = vec![0x5au8; size];
        let mut sent = 0usize;
        for _ in 0..count {
            sent += mesh_tests::sys::send_zerocopy(&s, &buf)?;
            std::thread::sleep(Duration::from_millis(5));
        }
        let (mut completed, deadline) = (0u32, Instant::now() + Duration::from_secs(3));
        while completed < count && Instant::now() < deadline {
            match mesh_tests::sys::zerocopy_completion(&s)? {
                Some((_, last)) => completed = completed.max(last + 1),
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        Ok(json!({"calls": count, "bytes": sent, "completed": completed}))
    })
    .await??;
    println!("{report}");
    Ok(())
}
