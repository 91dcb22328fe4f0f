//! Thin, safe wrappers over the few raw syscalls mesh-node needs. The only `unsafe` in the crate.
//!
//! SAFETY (whole module): every call passes pointers to live, correctly sized locals or to
//! NUL-terminated `CString`s that outlive the call, and checks the return value. `setns` runs
//! either on a short-lived thread created for it, or (`socket_in`) on the calling thread around
//! one `socket()` call with no other code in between, undone before returning; if it cannot be
//! undone the process aborts rather than let the thread serve anything from the wrong namespace.
use std::{
    ffi::CString,
    fs::File,
    io,
    mem::MaybeUninit,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The filesystem magic number of `path` (statfs `f_type`).
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut st = MaybeUninit::<libc::statfs>::uninit();
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { st.assume_init() }.f_type)
}

/// Mounts a bpf filesystem at `path` (which must exist).
pub fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let src = c"bpf";
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The network-namespace cookie of a socket's namespace (`SO_NETNS_COOKIE`, Linux 5.14+): the same
/// value `bpf_get_netns_cookie` returns in the kernel programs.
pub fn socket_netns_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    getsockopt_u64(sock, libc::SO_NETNS_COOKIE)
}

/// The socket's cookie (`SO_COOKIE`): what `bpf_get_socket_cookie` returns for it.
pub fn socket_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    getsockopt_u64(sock, libc::SO_COOKIE)
}

fn getsockopt_u64(sock: &impl AsRawFd, opt: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// A TCP socket of the network namespace `netns` (an open `/proc/PID/ns/net` or similar): it
/// routes, and takes its address, as a socket of a process there would. Made on the calling
/// thread, which enters the namespace for the one `socket()` call and comes back.
pub fn socket_in(netns: &File, domain: socket2::Domain) -> io::Result<socket2::Socket> {
    let home = File::open("/proc/thread-self/ns/net")?;
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP));
    if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        // This thread runs other tasks next: they must never run in a pod's namespace.
        eprintln!(
            "fatal: cannot return to the proxy's network namespace: {}",
            io::Error::last_os_error()
        );
        std::process::abort();
    }
    sock
}

/// Cookie of the network namespace this process runs in.
pub fn own_netns_cookie() -> io::Result<u64> {
    let sock =
        std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| std::net::UdpSocket::bind("[::]:0"))?;
    socket_netns_cookie(&sock)
}

/// Cookie of the network namespace behind `path` (`/proc/PID/ns/net`, `/run/netns/NAME`).
///
/// Enters the namespace on a throwaway thread: `setns` changes only the calling thread.
pub fn netns_cookie_of(path: &Path) -> io::Result<u64> {
    let ns = File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            // A socket made now belongs to the namespace just entered.
            let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)
                .or_else(|_| {
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
                })?;
            socket_netns_cookie(&sock)
        })
        .join()
        .map_err(|_| io::Error::other("netns probe thread panicked"))?
    })
}

/// Raises the soft limit on open files to the hard limit (one proxy holds two descriptors per
/// relayed connection; a VM or container default of 1,024 is far too low). Returns the soft
/// limit before and after.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read or write the struct passed by reference.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, lim.rlim_cur))
}

/// Effective capability bits of this process.
pub fn effective_caps() -> io::Result<u64> {
    proc_status_field("CapEff", |v| u64::from_str_radix(v, 16).ok())
}

/// This process's effective user id (what files it creates belong to).
pub fn effective_uid() -> io::Result<u32> {
    // "Uid:" lists the real, effective, saved and filesystem ids.
    proc_status_field("Uid", |v| v.split_whitespace().nth(1)?.parse().ok())
}

/// One field of `/proc/self/status`, parsed.
fn proc_status_field<T>(name: &str, parse: impl Fn(&str) -> Option<T>) -> io::Result<T> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| parse(v.trim()))
        .ok_or_else(|| io::Error::other(format!("no {name} in /proc/self/status")))
}

/// Registers the kernel log ring buffer with tokio's reactor.
///
/// SAFETY: `EbpfLogger` owns its ring-buffer map fd for its whole life and always returns that same
/// fd from `as_raw_fd`; the `AsyncFd` owns the logger, so the fd outlives the registration.
pub fn async_logger(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> io::Result<tokio::io::unix::AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>> {
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)
}

/// Maps `len` bytes of `fd` from its start.
fn map(
    len: usize,
    prot: libc::c_int,
    flags: libc::c_int,
    fd: std::os::fd::RawFd,
) -> io::Result<std::ptr::NonNull<libc::c_void>> {
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    std::ptr::NonNull::new(ptr).ok_or_else(|| io::Error::other("mmap returned null"))
}

/// The values of a BPF array map created with `BPF_F_MMAPABLE`, mapped into this process and
/// shared with the kernel programs that read them.
///
/// Sound because: the mapping lives until `Drop`, `T` has the map's value layout (callers assert
/// its size and alignment) and is built from atomics only, so shared access from both sides is
/// data-race free; the length is checked against what was mapped.
pub struct MappedArray<T> {
    ptr: std::ptr::NonNull<T>,
    len: usize,
    bytes: usize,
}

// SAFETY: see the type's comment; `T` is made of atomics.
unsafe impl<T: Sync> Send for MappedArray<T> {}
unsafe impl<T: Sync> Sync for MappedArray<T> {}

impl<T: Sync> MappedArray<T> {
    /// Maps the first `len` values of the array behind `fd`.
    ///
    /// # Safety
    /// `fd` must be a BPF array map created with `BPF_F_MMAPABLE`, with at least `len` entries
    /// whose value size and alignment are `T`'s; `T` must be valid for any bit pattern and made
    /// of atomics only (the kernel programs write the same memory concurrently).
    pub unsafe fn new(fd: std::os::fd::BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        use std::os::fd::AsRawFd as _;
        // The kernel rounds the mapping to whole pages (of whatever size this machine has).
        let bytes = len * std::mem::size_of::<T>();
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let ptr = map(bytes, prot, libc::MAP_SHARED, fd.as_raw_fd())?.cast::<T>();
        Ok(Self { ptr, len, bytes })
    }

    pub fn get(&self, i: usize) -> Option<&T> {
        (i < self.len).then(|| unsafe { &*self.ptr.as_ptr().add(i) })
    }
}

impl<T> Drop for MappedArray<T> {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// A file mapped read-only: large files read once (the kernel's BTF) stay out of the heap, and
/// their pages go back to the page cache on `Drop`.
///
/// Sound because: the mapping is private and read-only, lives until `Drop`, and the slice never
/// outlives `self`. A file truncated while mapped would fault on access; the files mapped here
/// (sysfs BTF) never change while the system runs.
pub struct MappedFile {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: see the type's comment; the mapping is read-only.
unsafe impl Send for MappedFile {}
unsafe impl Sync for MappedFile {}

impl MappedFile {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len() as usize;
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "empty file"));
        }
        let ptr = map(len, libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd())?.cast::<u8>();
        Ok(Self { ptr, len })
    }

    pub fn bytes(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Most descriptors one hand-over message carries (SCM_RIGHTS allows 253).
pub const MAX_FDS: usize = 64;

/// Sends `data` with the descriptors `fds` attached (`SCM_RIGHTS`): the receiver gets its own
/// descriptors of the same open files.
pub fn send_with_fds(sock: &impl AsRawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS || data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad hand-over message",
        ));
    }
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // u64 words: control messages must be aligned like `cmsghdr`.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes as usize,
            );
        }
    }
    let sent = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent as usize != data.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "hand-over message sent in part",
        ));
    }
    Ok(())
}

/// Receives one message and the descriptors attached to it (close-on-exec). A message whose
/// descriptors did not all fit is an error, and those that did are closed.
pub fn recv_with_fds(sock: &impl AsRawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) };
    let mut control = vec![0u64; (space as usize).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to msg_controllen; the CMSG_* macros walk it within
    // those bounds, and each descriptor received is ours to own exactly once.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("hand-over descriptors truncated"));
    }
    Ok((n as usize, fds))
}

/// A root-only Unix socket bound under a temporary name beside its real one. [`Self::publish`]
/// renames it into place once the start succeeded, so a start that fails never takes the name
/// from the generation still running; dropped unpublished, it removes itself.
pub struct PendingSocket {
    listener: Option<tokio::net::UnixListener>,
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
}

impl PendingSocket {
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Moves the socket to its real name, replacing whatever was there.
    pub fn publish(mut self) -> std::io::Result<tokio::net::UnixListener> {
        std::fs::rename(&self.tmp, &self.path)?;
        Ok(self.listener.take().expect("published once"))
    }
}

impl Drop for PendingSocket {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Binds `<state_dir>/<name>` as a [`PendingSocket`], mode 0600.
pub fn bind_root_socket(state_dir: &std::path::Path, name: &str) -> std::io::Result<PendingSocket> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(state_dir)?;
    let path = state_dir.join(name);
    let tmp = state_dir.join(format!(".{name}.{}", std::process::id()));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    Ok(PendingSocket {
        listener: Some(listener),
        tmp,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_cookie_matches_proc_self() {
        let own = own_netns_cookie().unwrap();
        assert_ne!(own, 0);
        assert_eq!(
            netns_cookie_of(Path::new("/proc/self/ns/net")).unwrap(),
            own
        );
    }

    #[test]
    fn descriptors_pass_with_their_message() {
        use std::io::{Read, Write};
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        send_with_fds(&a, b"hello", &[listener.as_raw_fd()]).unwrap();
        let mut buf = [0u8; 64];
        let (n, fds) = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"hello"[..], 1));
        // The same listening socket: a connect to it is accepted through the received copy.
        let got = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(got.local_addr().unwrap(), addr);
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        let (mut s, _) = got.accept().unwrap();
        c.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).unwrap();
        // Too many descriptors, or none with no message, are refused before sending.
        assert!(send_with_fds(&a, b"", &[]).is_err());
        assert!(send_with_fds(&a, b"x", &[0; MAX_FDS + 1]).is_err());
    }

    #[test]
    fn proc_filesystem_magic_is_not_bpffs() {
        assert_ne!(fs_magic(Path::new("/proc")).unwrap(), BPF_FS_MAGIC);
    }
}
