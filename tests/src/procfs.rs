//! What `/proc` says about a process: CPU time, memory, descriptors, sockets. For the benchmark
//! and the soak.
use anyhow::Context;

/// CPU ticks (user + system) of a process; USER_HZ is 100 on every Linux we build for.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// Resident memory, KiB.
pub fn rss_kb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

/// Open file descriptors.
pub fn open_fds(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// TCP sockets in CLOSE_WAIT in the process's network namespace (IPv4 and IPv6): the peer
/// closed, nobody here did.
pub fn close_wait(pid: u32) -> anyhow::Result<usize> {
    const CLOSE_WAIT: &str = "08";
    let mut n = 0;
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))?;
        n += text
            .lines()
            .skip(1)
            .filter(|l| l.split_whitespace().nth(3) == Some(CLOSE_WAIT))
            .count();
    }
    Ok(n)
}
