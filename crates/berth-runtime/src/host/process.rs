//! Processes by pidfd: open, signal, wait. A pidfd pins its process, so a pid checked
//! once the pidfd is held cannot be reused by another process underneath.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// `None` when the process is gone.
pub(crate) fn pidfd_open(pid: u32) -> io::Result<Option<OwnedFd>> {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return Ok(None);
    };
    match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => Ok(Some(fd)),
        Err(rustix::io::Errno::SRCH) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Raw syscall so any signal number (real-time ones too) can be sent.
pub(crate) fn pidfd_send_signal(fd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: a valid pidfd, a signal number the kernel validates, no siginfo, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Signals a pid through a pidfd; used only on pids just validated by start time.
pub(crate) fn kill_pid(pid: u32, signal: i32) {
    if let Ok(Some(fd)) = pidfd_open(pid) {
        let _ = pidfd_send_signal(&fd, signal);
    }
}

/// Signals the process group led by `leader`, validated by the caller just before.
pub(crate) fn kill_group(leader: u32, signal: i32) {
    if let Ok(pgid) = i32::try_from(leader) {
        // SAFETY: kill(2) on a process group; no memory is involved.
        unsafe { libc::kill(-pgid, signal) };
    }
}

/// Waits for `pid` to exit; true if it did within `timeout`.
pub(crate) fn wait_process_blocking(pid: u32, timeout: Duration) -> bool {
    let Ok(Some(fd)) = pidfd_open(pid) else {
        return true;
    };
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        match rustix::event::poll(&mut fds, ms) {
            Ok(n) if n > 0 => return true,
            Ok(_) => return false,
            Err(rustix::io::Errno::INTR) if !left.is_zero() => continue,
            Err(_) => return false,
        }
    }
}

/// Waits until the process of `fd` exits, up to `timeout` (forever when `None`). False
/// when the time ran out.
pub(crate) async fn wait_pidfd(fd: OwnedFd, timeout: Option<Duration>) -> io::Result<bool> {
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and unchanged until the
    // AsyncFd is dropped.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }?;
    // A pidfd turns readable when the process exits.
    let exited = async { fd.readable().await.map(|_guard| ()) };
    match timeout {
        Some(t) => match tokio::time::timeout(t, exited).await {
            Err(_) => Ok(false),
            Ok(r) => r.map(|()| true),
        },
        None => exited.await.map(|()| true),
    }
}
