//! Entering namespaces and cgroups, and reading a socket with `splice`: the only `unsafe` in the
//! harness.
//!
//! SAFETY (whole module): `pre_exec` closures run between fork and exec, where only
//! async-signal-safe calls are allowed; they make exactly two raw syscalls (`setns`, `write`) on
//! file descriptors opened before the fork and owned by the closure, and allocate nothing.
//! `setns` on a plain thread changes only that short-lived thread. `splice_read` owns the pipe
//! it creates (closed on return) and passes the kernel only descriptors and a length.
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

/// Reads a socket the way `splice()`-based copiers do (Go's `io.Copy` between TCP connections,
/// haproxy, nginx): socket to pipe with `splice`, then out of the pipe. Calls `each` with every
/// chunk until end of stream; a blocking read longer than the socket's read timeout is an error.
pub fn splice_read(sock: &std::net::TcpStream, mut each: impl FnMut(&[u8])) -> io::Result<u64> {
    let mut fds = [0 as libc::c_int; 2];
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Owned from here: closed on every return.
    let (rd, wr) = unsafe {
        use std::os::fd::FromRawFd;
        (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = unsafe {
            libc::splice(
                sock.as_raw_fd(),
                std::ptr::null_mut(),
                wr.as_raw_fd(),
                std::ptr::null_mut(),
                buf.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(total);
        }
        let mut left = n as usize;
        while left > 0 {
            let got = io::Read::read(&mut &rd, &mut buf[..left])?;
            each(&buf[..got]);
            left -= got;
            total += got as u64;
        }
    }
}
