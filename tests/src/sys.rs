//! Entering namespaces and cgroups, and reading a socket with `splice`: the only `unsafe` in the
//! harness.
//!
//! SAFETY (whole module): `pre_exec` closures run between fork and exec, where only
//! async-signal-safe calls are allowed; they make exactly two raw syscalls (`setns`, `write`) on
//! file descriptors opened before the fork and owned by the closure, and allocate nothing.
//! `setns` on a plain thread changes only that short-lived thread. `splice_read` owns the pipe
//! it creates (closed on return) and passes the kernel only descriptors and a length. The
//! zerocopy calls pass a borrowed buffer for the call's duration (the kernel pins its pages, and
//! the test keeps the buffer alive and unchanged until every completion is in), and read the
//! error queue into a local control buffer whose headers are walked with libc's CMSG macros.
//! `getrlimit`/`setrlimit` read and write a local `rlimit` for the call's duration.
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
/// An IPv6 extension header a client socket puts in front of everything it sends (its SYN too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Ipv6Ext {
    /// Hop-by-Hop Options (`IPV6_HOPOPTS`).
    Hopopts,
    /// Destination Options (`IPV6_DSTOPTS`).
    Dstopts,
}

/// Sets `ext` on an IPv6 socket: an 8-byte header holding one PadN option (needs CAP_NET_RAW).
pub fn set_ipv6_ext(fd: std::os::fd::BorrowedFd<'_>, ext: Ipv6Ext) -> io::Result<()> {
    // Next header and length (the kernel fills the first; 0 means 8 bytes), then PadN of 4.
    let header: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
    let opt = match ext {
        Ipv6Ext::Hopopts => libc::IPV6_HOPOPTS,
        Ipv6Ext::Dstopts => libc::IPV6_DSTOPTS,
    };
    // SAFETY: the buffer is valid for its length during the call; the fd is open (borrowed).
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            opt,
            header.as_ptr().cast(),
            header.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

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

/// Turns `SO_ZEROCOPY` on: `MSG_ZEROCOPY` sends then take effect.
pub fn enable_zerocopy(sock: &impl AsRawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ZEROCOPY,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `buf` with `MSG_ZEROCOPY`: the kernel then owes the app a completion notification on
/// the socket's error queue before the buffer may be reused.
pub fn send_zerocopy(sock: &std::net::TcpStream, buf: &[u8]) -> io::Result<usize> {
    let n = unsafe {
        libc::send(
            sock.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_ZEROCOPY,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `linux/errqueue.h` (not in the libc crate).
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;

/// Reads one notification from the socket's error queue without waiting: for a zerocopy
/// completion, the range of send calls it completes (`ee_info..=ee_data`). `Ok(None)` when the
/// queue is empty or holds something else.
pub fn zerocopy_completion(sock: &std::net::TcpStream) -> io::Result<Option<(u32, u32)>> {
    let mut control = [0u64; 16];
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(e),
        };
    }
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        let err = unsafe { libc::CMSG_DATA(cmsg) } as *const libc::sock_extended_err;
        let err = unsafe { std::ptr::read_unaligned(err) };
        if err.ee_origin == SO_EE_ORIGIN_ZEROCOPY {
            return Ok(Some((err.ee_info, err.ee_data)));
        }
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(None)
}

/// Raises this process's soft limit of open files to its hard limit (tests that hold thousands
/// of connections): the new soft limit.
pub fn raise_nofile() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    lim.rlim_cur = lim.rlim_max;
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim.rlim_cur)
}
