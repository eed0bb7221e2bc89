//! What the two exec helpers share: `berth shim nsexec` (native driver) and `berth shim
//! exec-guard` (runc driver). Each runs one exec for the agent and holds host resources
//! while it does, so each:
//! - makes itself not dumpable before anything else, so no process of the Machine can
//!   ptrace it or open its `/proc` files, and closes every inherited descriptor but its
//!   status pipe;
//! - opens a pidfd on the agent, its parent, and watches it with its own child: the
//!   agent's death kills the command, as does the exec's timeout, which the helper
//!   enforces itself (nothing depends on the agent being alive to do it);
//! - says how the command ended as one line on the status descriptor (`exit N`,
//!   `signal N` or `timeout`), and exits with the command's code (128 + signal).

use std::ffi::OsString;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::process::{Pid, PidfdFlags, Signal};

/// The descriptor the agent hands a helper for its status line.
pub(crate) const STATUS_FD: RawFd = 3;

/// How the command ended, as the status line says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Exited(i32),
    Signaled(i32),
    TimedOut,
}

impl Outcome {
    pub(crate) fn line(self) -> String {
        match self {
            Outcome::Exited(code) => format!("exit {code}\n"),
            Outcome::Signaled(signal) => format!("signal {signal}\n"),
            Outcome::TimedOut => "timeout\n".to_owned(),
        }
    }

    pub(crate) fn parse(line: &str) -> Option<Outcome> {
        let line = line.trim();
        if line == "timeout" {
            return Some(Outcome::TimedOut);
        }
        let (word, number) = line.split_once(' ')?;
        let number = number.parse().ok()?;
        match word {
            "exit" => Some(Outcome::Exited(number)),
            "signal" => Some(Outcome::Signaled(number)),
            _ => None,
        }
    }

    pub(crate) fn exit_code(self) -> i32 {
        match self {
            Outcome::Exited(code) => code,
            Outcome::Signaled(signal) => 128 + signal,
            Outcome::TimedOut => 128 + libc::SIGKILL,
        }
    }
}

/// `--flag value` pairs up to `--`, then the command.
pub(crate) struct Flags {
    values: Vec<(String, OsString)>,
    pub(crate) cmd: Vec<OsString>,
}

impl Flags {
    /// Fails on a flag not in `known`, a flag without a value, or no command.
    pub(crate) fn parse(args: Vec<OsString>, known: &[&str]) -> Result<Flags, String> {
        let mut values = Vec::new();
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            if flag == "--" {
                break;
            }
            let name = flag
                .to_str()
                .filter(|f| known.contains(f))
                .ok_or_else(|| format!("unknown argument {flag:?}"))?;
            let value = it
                .next()
                .ok_or_else(|| format!("missing value for {flag:?}"))?;
            values.push((name.to_owned(), value));
        }
        let cmd: Vec<OsString> = it.collect();
        if cmd.is_empty() {
            return Err("no command".into());
        }
        Ok(Flags { values, cmd })
    }

    pub(crate) fn take(&mut self, name: &str) -> Result<OsString, String> {
        let at = self
            .values
            .iter()
            .rposition(|(n, _)| n == name)
            .ok_or_else(|| format!("missing {name}"))?;
        Ok(self.values.remove(at).1)
    }

    /// Every value of a flag that may be repeated, in order; none is fine.
    pub(crate) fn take_all(&mut self, name: &str) -> Vec<OsString> {
        let (taken, kept) = std::mem::take(&mut self.values)
            .into_iter()
            .partition(|(n, _)| n == name);
        self.values = kept;
        taken.into_iter().map(|(_, value)| value).collect()
    }

    pub(crate) fn number<T: TryFrom<u64>>(&mut self, name: &str) -> Result<T, String> {
        let value = self.take(name)?;
        value
            .to_str()
            .and_then(|v| v.parse::<u64>().ok())
            .and_then(|v| T::try_from(v).ok())
            .ok_or_else(|| format!("{name} wants a number, got {value:?}"))
    }

    /// The status descriptor (`--status-fd`), which must not be stdio.
    pub(crate) fn status_fd(&mut self) -> Result<RawFd, String> {
        let fd: RawFd = self.number("--status-fd")?;
        if fd <= 2 {
            return Err("the status descriptor must not be stdio".into());
        }
        Ok(fd)
    }
}

/// Runs a helper: `parse` turns the arguments into the helper's own and its status
/// descriptor, `run` does the work with a pidfd on the agent. Returns the exit code.
pub(crate) fn main<A>(
    name: &str,
    args: Vec<OsString>,
    parse: impl FnOnce(Vec<OsString>) -> Result<(A, RawFd), String>,
    run: impl FnOnce(A, &OwnedFd) -> Result<Outcome, String>,
) -> i32 {
    // First of all, before it holds anything worth taking: a process that is not
    // dumpable cannot be ptraced or have its /proc files opened by the Machine.
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        eprintln!("berth-shim {name}: make the helper not dumpable: {e}");
        return 126;
    }
    let (args, status_fd) = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("berth-shim {name}: {e}");
            return 2;
        }
    };
    // Whatever the agent leaked (descriptors without close-on-exec) goes, but for the
    // status pipe, which stays only until this process ends.
    let status = close_fds_except(&[status_fd]).and_then(|()| {
        // SAFETY: the caller handed this descriptor over for the status line; nothing
        // else in this process owns it.
        let fd = unsafe { BorrowedFd::borrow_raw(status_fd) };
        rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC).map_err(|e| e.to_string())?;
        Ok(fd)
    });
    let status = match status {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("berth-shim {name}: descriptors: {e}");
            return 126;
        }
    };
    match parent_pidfd().and_then(|agent| run(args, &agent)) {
        Ok(outcome) => {
            let _ = rustix::io::write(status, outcome.line().as_bytes());
            outcome.exit_code()
        }
        Err(e) => {
            eprintln!("berth-shim {name}: {e}");
            126
        }
    }
}

/// A pidfd on the agent that started this helper: it turns readable when the agent dies.
fn parent_pidfd() -> Result<OwnedFd, String> {
    let parent = rustix::process::getppid().ok_or("the agent is gone")?;
    let fd = rustix::process::pidfd_open(parent, PidfdFlags::empty())
        .map_err(|e| format!("pidfd of the agent: {e}"))?;
    // Had the agent died before pidfd_open, this process would have a new parent by now.
    if rustix::process::getppid() != Some(parent) {
        return Err("the agent is gone".into());
    }
    Ok(fd)
}

/// True once the pidfd's process has exited.
pub(crate) fn exited(pidfd: &OwnedFd) -> Result<bool, String> {
    exits_within(pidfd, Duration::ZERO)
}

/// True if the pidfd's process has exited or does so within `wait`.
pub(crate) fn exits_within(pidfd: &OwnedFd, wait: Duration) -> Result<bool, String> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, ms) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(format!("poll pidfd: {e}")),
        }
    }
}

/// A child of this process, held by a pidfd until it is reaped: signals never reach
/// another process, even one that took over its pid.
pub(crate) struct Child {
    pid: nix::unistd::Pid,
    pidfd: OwnedFd,
}

/// Why [`watch`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The child exited (it is not reaped yet).
    Exited,
    TimedOut,
    AgentGone,
}

impl Child {
    /// Takes over `pid`, a child of this process not reaped yet; should no pidfd open, it
    /// is killed by pid (still its own, as it is not reaped) and reaped.
    pub(crate) fn adopt(pid: i32) -> Result<Child, String> {
        let child = nix::unistd::Pid::from_raw(pid);
        let pidfd = Pid::from_raw(pid).ok_or("no pid").and_then(|raw| {
            rustix::process::pidfd_open(raw, PidfdFlags::empty()).map_err(|_| "pidfd_open")
        });
        match pidfd {
            Ok(pidfd) => Ok(Child { pid: child, pidfd }),
            Err(e) => {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                let _ = reap(child);
                Err(format!("pidfd of the child: {e}"))
            }
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid.as_raw().unsigned_abs()
    }

    pub(crate) fn pidfd(&self) -> &OwnedFd {
        &self.pidfd
    }

    pub(crate) fn kill(&self) {
        let _ = rustix::process::pidfd_send_signal(&self.pidfd, Signal::Kill);
    }

    /// Waits for the child's end and says how it ended.
    pub(crate) fn reap(self) -> Result<Outcome, String> {
        reap(self.pid)
    }
}

fn reap(child: nix::unistd::Pid) -> Result<Outcome, String> {
    loop {
        match nix::sys::wait::waitpid(child, None) {
            Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => return Ok(Outcome::Exited(code)),
            Ok(nix::sys::wait::WaitStatus::Signaled(_, signal, _)) => {
                return Ok(Outcome::Signaled(signal as i32))
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("wait: {e}")),
        }
    }
}

/// Waits until `child` exits, the deadline passes or the agent dies. `tick` runs before
/// every wait and returns how soon it wants to run again (`None`: only when something
/// happens).
pub(crate) fn watch(
    child: &Child,
    agent: &OwnedFd,
    deadline: Instant,
    mut tick: impl FnMut() -> Option<Duration>,
) -> Result<Ended, String> {
    loop {
        let again = tick();
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Ended::TimedOut);
        }
        let wait = again.map_or(left, |again| again.min(left));
        let ms = i32::try_from(wait.as_millis().max(1)).unwrap_or(i32::MAX);
        let mut fds = [
            PollFd::new(&child.pidfd, PollFlags::IN),
            PollFd::new(agent, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, ms) {
            Ok(_) => {
                if !fds[1].revents().is_empty() {
                    return Ok(Ended::AgentGone);
                }
                if !fds[0].revents().is_empty() {
                    return Ok(Ended::Exited);
                }
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
    }
}

/// Closes every descriptor above stdio except `keep`. Only for a process that owns no
/// other descriptor through a Rust object it will use (a fresh exec, or a forked child
/// that never returns to its caller's frames).
pub(crate) fn close_fds_except(keep: &[RawFd]) -> Result<(), String> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|&fd| u32::try_from(fd).ok())
        .filter(|&fd| fd > 2)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first = 3u32;
    for fd in keep {
        if fd > first {
            close_range(first, fd - 1)?;
        }
        first = fd + 1;
    }
    close_range(first, u32::MAX)
}

fn close_range(first: u32, last: u32) -> Result<(), String> {
    // SAFETY: close_range only closes descriptors; see `close_fds_except` for why none of
    // them is owned by code that runs afterwards.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            last as libc::c_uint,
            0 as libc::c_uint,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "close_range {first}..={last}: {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// Keeps `fd` open across the exec of the helper as descriptor `target` (for a
/// `pre_exec` hook: dup2 and fcntl only, both async-signal-safe).
pub(crate) fn inherit_as(fd: RawFd, target: RawFd) -> std::io::Result<()> {
    // SAFETY: plain descriptor syscalls on descriptors this process holds.
    let rc = unsafe {
        if fd == target {
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, target)
        }
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_round_trip() {
        for outcome in [Outcome::Exited(3), Outcome::Signaled(9), Outcome::TimedOut] {
            assert_eq!(Outcome::parse(&outcome.line()), Some(outcome));
        }
        assert_eq!(Outcome::parse("exit x"), None);
        assert_eq!(Outcome::Signaled(9).exit_code(), 137);
    }

    #[test]
    fn flags_want_known_names_values_and_a_command() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        let mut flags =
            Flags::parse(args(&["--a", "1", "--", "cmd", "--a"]), &["--a", "--b"]).unwrap();
        assert_eq!(flags.number::<u32>("--a"), Ok(1));
        assert!(flags.take("--b").is_err());
        assert_eq!(flags.cmd, args(&["cmd", "--a"]));
        assert!(Flags::parse(args(&["--c", "1", "--", "x"]), &["--a"]).is_err());
        assert!(Flags::parse(args(&["--a", "1", "--"]), &["--a"]).is_err());
        assert!(Flags::parse(args(&["--a"]), &["--a"]).is_err());
    }
}
