//! Persistent network namespaces, kept alive by a bind mount on a file.
//!
//! Namespace changes are made on a dedicated short-lived thread: network namespaces are
//! per thread, so the caller's threads (and tokio's workers) never change namespace.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::thread::{LinkNameSpaceType, UnshareFlags};

use crate::overlay;

/// Makes a new network namespace, with `lo` up, pinned by a bind mount on `path`.
/// An existing namespace at `path` is kept.
pub fn create(path: &Path) -> io::Result<()> {
    if overlay::is_mount_point(path)? {
        return Ok(());
    }
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| annotate(e, "create netns file", path))?;
    let target = path.to_path_buf();
    let made = on_thread(move || {
        rustix::thread::unshare(UnshareFlags::NEWNET)
            .map_err(|e| annotate(e.into(), "unshare network namespace for", &target))?;
        rustix::mount::mount_bind("/proc/thread-self/ns/net", &target)
            .map_err(|e| annotate(e.into(), "bind mount netns on", &target))?;
        loopback_up().map_err(|e| annotate(e, "bring lo up in", &target))
    });
    if made.is_err() {
        // Best effort: do not leave a half-made namespace that the next call would keep.
        let _ = remove(path);
    }
    made
}

/// Whether `path` pins a network namespace: one statfs, cheap enough for the start path.
pub fn is_pinned(path: &Path) -> bool {
    const NSFS_MAGIC: u64 = 0x6e73_6673;
    rustix::fs::statfs(path).is_ok_and(|stat| stat.f_type as u64 == NSFS_MAGIC)
}

/// Unmounts and deletes the namespace file. Missing is success.
pub fn remove(path: &Path) -> io::Result<()> {
    overlay::unmount(path).map_err(|e| annotate(e, "unmount netns", path))?;
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(annotate(e, "remove netns file", path))
        }
        _ => Ok(()),
    }
}

/// Runs `f` on a fresh thread that has joined the network namespace at `netns_path`.
/// Sockets made by `f` stay in that namespace and work from any thread afterwards.
pub fn in_netns<T, F>(netns_path: &Path, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let ns = File::open(netns_path).map_err(|e| annotate(e, "open netns", netns_path))?;
    let path: PathBuf = netns_path.to_path_buf();
    on_thread(move || {
        join(&ns, &path)?;
        f()
    })
}

/// [`in_netns`] for async callers: the caller's task awaits the thread instead of blocking
/// a runtime worker on it.
pub async fn in_netns_async<T, F>(netns_path: &Path, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let ns = File::open(netns_path).map_err(|e| annotate(e, "open netns", netns_path))?;
    let path: PathBuf = netns_path.to_path_buf();
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("berth-netns".into())
        .spawn(move || {
            let _ = done.send(join(&ns, &path).and_then(|()| f()));
        })?;
    result
        .await
        .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// Moves the calling thread into the network namespace `ns`.
fn join(ns: &File, path: &Path) -> io::Result<()> {
    rustix::thread::move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))
        .map_err(|e| annotate(e.into(), "join netns", path))
}

/// Opens a TCP connection to `addr` from inside the network namespace at `netns_path`.
pub fn connect_tcp(
    netns_path: &Path,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    in_netns(netns_path, move || {
        TcpStream::connect_timeout(&addr, timeout)
    })
}

fn on_thread<T, F>(f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    std::thread::Builder::new()
        .name("berth-netns".into())
        .spawn(f)?
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// Sets IFF_UP on `lo` in the calling thread's network namespace.
pub(crate) fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly made socket owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes ifru_flags of a valid ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS just filled ifru_flags, the active member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads a valid ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn annotate(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}
