//! `berth shim nsexec`: runs a command inside a running Machine for the native driver,
//! as `runc exec` does for runc.
//!
//! The helper holds host resources and, until its child execs, root's capabilities inside
//! the Machine, so the order matters:
//! 1. as every exec helper does ([`crate::helper`]), it makes itself not dumpable, first,
//!    so no process of the Machine can ptrace it or read its `/proc` files (memory,
//!    environ, descriptors, exe), and closes every inherited descriptor but the status
//!    pipe;
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
use rustix::process::{Pid, PidfdFlags, Signal};

use super::init;
use super::syscall::LinuxSyscall;
use crate::helper::{self, Ended, Flags, Outcome};
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
    fn parse(args: Vec<OsString>) -> Result<(NsexecArgs, RawFd), String> {
        let mut flags = Flags::parse(
            args,
            &[
                "--pid",
                "--pid-start",
                "--config",
                "--timeout-ms",
                "--status-fd",
            ],
        )?;
        let cmd = std::mem::take(&mut flags.cmd)
            .into_iter()
            .map(|a| {
                a.into_string()
                    .map_err(|a| format!("non-utf8 argument {a:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let args = NsexecArgs {
            pid: flags.number("--pid")?,
            pid_start: flags.number("--pid-start")?,
            config: PathBuf::from(flags.take("--config")?),
            timeout: Duration::from_millis(flags.number("--timeout-ms")?),
            status_fd: flags.status_fd()?,
            cmd,
        };
        Ok((args.clone(), args.status_fd))
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

pub fn main_with_args(args: Vec<OsString>) -> i32 {
    helper::main(NSEXEC_ARG, args, NsexecArgs::parse, |args, agent| {
        run(&args, agent)
    })
}

fn run(args: &NsexecArgs, agent: &OwnedFd) -> Result<Outcome, String> {
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
            watch(child, agent, deadline)
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
    helper::close_fds_except(&[])?;
    // SAFETY: fds 1 and 2 are this process's stdio and stay open until exec.
    let (stdout, stderr) = unsafe { (BorrowedFd::borrow_raw(1), BorrowedFd::borrow_raw(2)) };
    init::exec_process(
        &LinuxSyscall,
        spec,
        process,
        None,
        stdout,
        stderr,
        &mut init::InitClock::off(),
    )
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
    if helper::exited(&fd)? {
        return Err(gone());
    }
    Ok((fd, cgroups))
}

/// Waits for the child, killing it (through its pidfd, so never another process) at the
/// deadline or when the agent dies.
fn watch(child: nix::unistd::Pid, agent: &OwnedFd, deadline: Instant) -> Result<Outcome, String> {
    let child = helper::Child::adopt(child.as_raw())?;
    match helper::watch(&child, agent, deadline, || None) {
        Ok(Ended::Exited) => child.reap(),
        Ok(Ended::TimedOut) => {
            child.kill();
            child.reap()?;
            Ok(Outcome::TimedOut)
        }
        Ok(Ended::AgentGone) => {
            // Nobody is left to read the output or enforce anything.
            child.kill();
            child.reap()?;
            Ok(Outcome::Signaled(libc::SIGKILL))
        }
        Err(e) => {
            child.kill();
            let _ = child.reap();
            Err(e)
        }
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
        assert_eq!(NsexecArgs::parse(raw).unwrap(), (args.clone(), 3));
        let stdio = NsexecArgs {
            status_fd: 1,
            ..args.clone()
        };
        let mut raw = stdio.to_args();
        raw.remove(0);
        assert!(NsexecArgs::parse(raw).is_err());
    }
}
