//! `berth shim nsexec`: runs a command inside a running Machine for the native driver,
//! as `runc exec` does for runc.
//!
//! The helper holds host resources and, until its child execs, root's capabilities inside
//! the Machine, so the order matters:
//! 1. it makes itself not dumpable, first, so no process of the Machine can ptrace it or
//!    read its `/proc` files (memory, environ, descriptors, exe), and closes every
//!    inherited descriptor but the status pipe;
//! 2. it opens a pidfd on its parent (the agent), then on the Machine's init, checked by
//!    start time, reads the init's cgroups and joins them (host paths), and joins all its
//!    namespaces at once through the pidfd;
//! 3. it forks into the pid namespace; the child sets SIGKILL as its parent-death signal,
//!    closes every descriptor above stdio, and [`init::exec_process`] drops to the spec's
//!    user and capabilities and loads seccomp before it looks up anything in the Machine;
//! 4. the parent polls pidfds of the child and of the agent: the child's exit is
//!    reported, a timeout or the agent's death SIGKILLs the child through its pidfd.
//!
//! The outcome goes to the status descriptor as one line (`exit N`, `signal N` or
//! `timeout`); the exit code is the command's (128 + signal when killed).

use std::ffi::OsString;
use std::fs;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use rustix::event::{PollFd, PollFlags};
use rustix::process::{Pid, PidfdFlags, Signal};

use super::init;
use crate::util;

pub const NSEXEC_ARG: &str = "nsexec";

/// `nsexec --pid PID --pid-start TICKS --config FILE --timeout-ms MS --status-fd FD -- CMD...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NsexecArgs {
    /// The Machine's init, and its start time (clock ticks since boot): a recycled pid is
    /// never taken for it.
    pub(crate) pid: u32,
    pub(crate) pid_start: u64,
    pub(crate) config: PathBuf,
    pub(crate) timeout: Duration,
    /// Where the one status line goes.
    pub(crate) status_fd: RawFd,
    pub(crate) cmd: Vec<String>,
}

impl NsexecArgs {
    fn parse(args: Vec<OsString>) -> Result<NsexecArgs, String> {
        let mut pid = None;
        let mut pid_start = None;
        let mut config = None;
        let mut timeout_ms = None;
        let mut status_fd = None;
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            if flag == "--" {
                break;
            }
            let value = it
                .next()
                .ok_or_else(|| format!("missing value for {flag:?}"))?;
            let number = || {
                value
                    .to_str()
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| format!("{flag:?} wants a number, got {value:?}"))
            };
            match flag.to_str() {
                Some("--pid") => pid = Some(u32::try_from(number()?).map_err(|e| e.to_string())?),
                Some("--pid-start") => pid_start = Some(number()?),
                Some("--config") => config = Some(PathBuf::from(&value)),
                Some("--timeout-ms") => timeout_ms = Some(number()?),
                Some("--status-fd") => {
                    status_fd = Some(RawFd::try_from(number()?).map_err(|e| e.to_string())?)
                }
                _ => return Err(format!("unknown argument {flag:?}")),
            }
        }
        let cmd = it
            .map(|a| {
                a.into_string()
                    .map_err(|a| format!("non-utf8 argument {a:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if cmd.is_empty() {
            return Err("no command".into());
        }
        let status_fd = status_fd.ok_or("missing --status-fd")?;
        if status_fd <= 2 {
            return Err("the status descriptor must not be stdio".into());
        }
        Ok(NsexecArgs {
            pid: pid.ok_or("missing --pid")?,
            pid_start: pid_start.ok_or("missing --pid-start")?,
            config: config.ok_or("missing --config")?,
            timeout: Duration::from_millis(timeout_ms.ok_or("missing --timeout-ms")?),
            status_fd,
            cmd,
        })
    }

    pub(crate) fn to_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = vec![
            NSEXEC_ARG.into(),
            "--pid".into(),
            self.pid.to_string().into(),
            "--pid-start".into(),
            self.pid_start.to_string().into(),
            "--config".into(),
            self.config.clone().into(),
            "--timeout-ms".into(),
            self.timeout.as_millis().to_string().into(),
            "--status-fd".into(),
            self.status_fd.to_string().into(),
            "--".into(),
        ];
        out.extend(self.cmd.iter().map(OsString::from));
        out
    }
}

/// How the command ended, as the status line says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Exited(i32),
    Signaled(i32),
    TimedOut,
}

impl Outcome {
    fn line(self) -> String {
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

    fn exit_code(self) -> i32 {
        match self {
            Outcome::Exited(code) => code,
            Outcome::Signaled(signal) => 128 + signal,
            Outcome::TimedOut => 128 + libc::SIGKILL,
        }
    }
}

pub fn main_with_args(args: Vec<OsString>) -> i32 {
    // First of all, before it holds anything worth taking: a process that is not
    // dumpable cannot be ptraced or have its /proc files opened by the Machine.
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        eprintln!("berth-shim nsexec: make the helper not dumpable: {e}");
        return 126;
    }
    let args = match NsexecArgs::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("berth-shim nsexec: {e}");
            return 2;
        }
    };
    // Whatever the agent leaked (descriptors without close-on-exec) goes, but for the
    // status pipe, which stays only until this process ends.
    let status = close_fds_except(&[args.status_fd]).and_then(|()| {
        // SAFETY: the caller handed this descriptor over for the status line; nothing
        // else in this process owns it.
        let fd = unsafe { BorrowedFd::borrow_raw(args.status_fd) };
        rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC).map_err(|e| e.to_string())?;
        Ok(fd)
    });
    let status = match status {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("berth-shim nsexec: descriptors: {e}");
            return 126;
        }
    };
    match run(&args) {
        Ok(outcome) => {
            let _ = rustix::io::write(status, outcome.line().as_bytes());
            outcome.exit_code()
        }
        Err(e) => {
            eprintln!("berth-shim nsexec: {e}");
            126
        }
    }
}

fn run(args: &NsexecArgs) -> Result<Outcome, String> {
    let agent = parent_pidfd()?;
    let text =
        fs::read(&args.config).map_err(|e| format!("read {}: {e}", args.config.display()))?;
    let mut spec: oci_spec::runtime::Spec =
        serde_json::from_slice(&text).map_err(|e| format!("parse config: {e}"))?;
    let mut process = spec.process().clone().ok_or("config has no process")?;
    process.set_args(Some(args.cmd.clone()));
    spec.set_process(Some(process.clone()));

    let (init, cgroups) = open_init(args.pid, args.pid_start)?;
    for file in cgroup_procs_files(&cgroups) {
        fs::write(&file, b"0").map_err(|e| format!("join cgroup {}: {e}", file.display()))?;
    }
    // All at once through the pidfd: no /proc path of a pid that may have been reused,
    // and host paths resolve until the call returns.
    nix::sched::setns(
        &init,
        CloneFlags::CLONE_NEWCGROUP
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNS,
    )
    .map_err(|e| format!("join the machine's namespaces: {e}"))?;
    // Alone and last: in one call the others would be checked against the new user
    // namespace's privileges, which do not cover namespaces the host's user namespace owns.
    nix::sched::setns(&init, CloneFlags::CLONE_NEWUSER)
        .map_err(|e| format!("join the machine's user namespace: {e}"))?;
    drop(init);
    // SAFETY: this process is single-threaded (a fresh exec), so the child may run any
    // code.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            let message = match child(&spec, &process) {
                Err(message) => message,
                Ok(never) => match never {},
            };
            eprintln!("berth-shim nsexec: {message}");
            // SAFETY: ends the forked child without running the parent's exit paths.
            unsafe { libc::_exit(126) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            let deadline = Instant::now() + args.timeout;
            watch(child, &agent, deadline)
        }
        Err(e) => Err(format!("fork: {e}")),
    }
}

/// The forked child, in the Machine's pid namespace. Only returns on failure.
fn child(
    spec: &oci_spec::runtime::Spec,
    process: &oci_spec::runtime::Process,
) -> Result<std::convert::Infallible, String> {
    rustix::process::set_parent_process_death_signal(Some(Signal::Kill))
        .map_err(|e| format!("set the parent-death signal: {e}"))?;
    // The parent is outside this pid namespace, so it reads as 0; anything else means it
    // already exited and the signal will never come.
    if rustix::process::getppid().is_some() {
        return Err("the helper exited".into());
    }
    // The pidfds and the status pipe are the parent's business.
    close_fds_except(&[])?;
    // SAFETY: fds 1 and 2 are this process's stdio and stay open until exec.
    let (stdout, stderr) = unsafe { (BorrowedFd::borrow_raw(1), BorrowedFd::borrow_raw(2)) };
    init::exec_process(
        spec,
        process,
        None,
        stdout,
        stderr,
        &mut init::InitClock::off(),
    )
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

/// A pidfd on the Machine's init, if `pid` is still the process that started at `start`,
/// and its `/proc/<pid>/cgroup`, read while that was so.
fn open_init(pid: u32, start: u64) -> Result<(OwnedFd, String), String> {
    let gone = || "the machine's init is gone".to_owned();
    let raw = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(gone)?;
    let fd = rustix::process::pidfd_open(raw, PidfdFlags::empty()).map_err(|_| gone())?;
    match util::proc_stat(pid) {
        Ok(Some(stat)) if stat.start_time == start && stat.state != 'Z' => {}
        _ => return Err(gone()),
    }
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(|_| gone())?;
    // Not exited after the reads, so they were of this very process.
    if exited(&fd)? {
        return Err(gone());
    }
    Ok((fd, cgroups))
}

fn exited(pidfd: &OwnedFd) -> Result<bool, String> {
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    loop {
        match rustix::event::poll(&mut fds, 0) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(format!("poll pidfd: {e}")),
        }
    }
}

/// Waits for the child, killing it (through its pidfd, so never another process) at the
/// deadline or when the agent dies.
fn watch(child: nix::unistd::Pid, agent: &OwnedFd, deadline: Instant) -> Result<Outcome, String> {
    let kill_and_reap = |pidfd: Option<&OwnedFd>| {
        match pidfd {
            Some(fd) => {
                let _ = rustix::process::pidfd_send_signal(fd, Signal::Kill);
            }
            // Not reaped yet, so the pid is still the child's.
            None => {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            }
        }
        reap(child)
    };
    let pidfd = Pid::from_raw(child.as_raw())
        .ok_or("fork returned no pid")
        .and_then(|pid| {
            rustix::process::pidfd_open(pid, PidfdFlags::empty()).map_err(|_| "pidfd_open")
        });
    let pidfd = match pidfd {
        Ok(fd) => fd,
        Err(e) => {
            let _ = kill_and_reap(None);
            return Err(format!("pidfd of the command: {e}"));
        }
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            kill_and_reap(Some(&pidfd))?;
            return Ok(Outcome::TimedOut);
        }
        let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
        let mut fds = [
            PollFd::new(&pidfd, PollFlags::IN),
            PollFd::new(agent, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, ms) {
            Ok(_) => {
                if !fds[1].revents().is_empty() {
                    // Nobody is left to read the output or enforce anything.
                    kill_and_reap(Some(&pidfd))?;
                    return Ok(Outcome::Signaled(libc::SIGKILL));
                }
                if !fds[0].revents().is_empty() {
                    return reap(child);
                }
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                kill_and_reap(Some(&pidfd))?;
                return Err(format!("poll: {e}"));
            }
        }
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

/// Host `cgroup.procs` files of the cgroups in a `/proc/<pid>/cgroup` text.
fn cgroup_procs_files(proc_cgroup: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    proc_cgroup
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let path = path.trim_start_matches('/');
            if controllers.starts_with("name=") {
                return None;
            }
            let dir = if controllers.is_empty() {
                let unified = root.join("unified");
                if unified.exists() {
                    unified.join(path)
                } else {
                    root.join(path)
                }
            } else {
                root.join(controllers).join(path)
            };
            let file = dir.join("cgroup.procs");
            file.exists().then_some(file)
        })
        .collect()
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
    fn args_round_trip() {
        let args = NsexecArgs {
            pid: 42,
            pid_start: 123_456,
            config: "/m/bundle/config.json".into(),
            timeout: Duration::from_millis(2500),
            status_fd: 3,
            cmd: vec!["sh".into(), "-c".into(), "echo --pid".into()],
        };
        let mut raw = args.to_args();
        assert_eq!(raw.remove(0), NSEXEC_ARG);
        assert_eq!(NsexecArgs::parse(raw).unwrap(), args);
        let stdio = NsexecArgs {
            status_fd: 1,
            ..args.clone()
        };
        let mut raw = stdio.to_args();
        raw.remove(0);
        assert!(NsexecArgs::parse(raw).is_err());
    }

    #[test]
    fn status_lines_round_trip() {
        for outcome in [Outcome::Exited(3), Outcome::Signaled(9), Outcome::TimedOut] {
            assert_eq!(Outcome::parse(&outcome.line()), Some(outcome));
        }
        assert_eq!(Outcome::parse("exit x"), None);
        assert_eq!(Outcome::Signaled(9).exit_code(), 137);
    }
}
