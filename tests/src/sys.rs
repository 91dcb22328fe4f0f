//! Entering namespaces and cgroups: the only `unsafe` in the harness.
//!
//! SAFETY (whole module): `pre_exec` closures run between fork and exec, where only
//! async-signal-safe calls are allowed; they make exactly two raw syscalls (`setns`, `write`) on
//! file descriptors opened before the fork and owned by the closure, and allocate nothing.
//! `setns` on a plain thread changes only that short-lived thread.
use std::{
    fs::{File, OpenOptions},
    io,
    os::fd::AsRawFd,
    path::Path,
};

/// Makes `cmd`'s child join the network namespace at `netns` and the cgroup `cgroup` before it
/// execs, so every socket it ever creates belongs to both.
pub fn enter_before_exec(
    cmd: &mut tokio::process::Command,
    netns: &Path,
    cgroup: &Path,
) -> io::Result<()> {
    let ns = File::open(netns)?;
    let procs = OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))?;
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            // "0" moves the writing process, i.e. this child.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Runs `f` on a thread inside the network namespace at `netns`. Sockets created there stay in
/// that namespace after the thread ends, so callers can connect in a namespace and use the
/// stream from anywhere. (Cgroup membership cannot be per thread: use a child process when the
/// cgroup matters, as for anything that must be redirected.)
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let ns = File::open(netns)?;
    std::thread::scope(|s| {
        s.spawn(move || {
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join()
        .map_err(|_| io::Error::other("thread in netns panicked"))?
    })
}

/// Sends `sig` to `pid`.
pub fn kill(pid: u32, sig: i32) -> io::Result<()> {
    if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
