//! `berth shim exec-guard`: what the runc driver runs for an exec, in place of `runc exec`
//! itself, so that the exec has the same guarantees as the native driver's `nsexec`
//! ([`crate::helper`]): the timeout is enforced without the agent, and the agent's death
//! kills the command.
//!
//! runc cannot forward SIGKILL, and a `runc exec` killed leaves its command running in the
//! Machine, so the guard kills the command itself:
//! 1. it starts `runc exec --pid-file FILE ...` (given after `--`) on its own stdio, with
//!    SIGKILL as runc's parent-death signal;
//! 2. once runc's pid file shows up, it takes a pidfd on the process runc started, checked
//!    to be runc's child in the pid namespace of the Machine's init (the pid file is only
//!    a hint, see [`runc_exec_process`]), and holds it;
//! 3. it polls runc and the agent: runc's exit (the command's code) is reported; at the
//!    timeout the command is SIGKILLed through the held pidfd and runc gets a moment to
//!    report before it is killed too; when the agent dies, both are killed at once.
//!
//! Under gVisor the command is no host process: it runs inside the sandbox's kernel.
//! `runsc exec --internal-pid-file` writes its pid there, and the guard is given a kill
//! command (`runsc kill --pid {pid} <id> KILL`) to run in place of the pidfd's signal.

use std::ffi::OsString;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::process::Signal;

use crate::helper::{self, Child, Ended, Flags, Outcome};
use crate::host::process::pidfd_open;
use crate::host::run_dir::{read_pid_file, RunDir};
use crate::util;

pub(crate) const EXEC_GUARD_ARG: &str = "exec-guard";

/// How often the pid file is looked for, and how often the command is looked for once it
/// is there, until it is found.
const FIND_EVERY: Duration = Duration::from_millis(5);
const FIND_AGAIN: Duration = Duration::from_millis(50);
/// How long runc gets to report after its command was killed; below the agent's own
/// grace (`exec::KILL_WAIT`), so the guard always reports first.
const REPORT_WAIT: Duration = Duration::from_secs(2);

/// `exec-guard --timeout-ms MS --status-fd FD --pid-file FILE --run-dir DIR -- RUNC...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GuardArgs {
    pub(crate) timeout: Duration,
    pub(crate) status_fd: RawFd,
    /// Where runc writes the pid of the process it starts.
    pub(crate) pid_file: PathBuf,
    /// The Machine's run directory, with the shim's and the init's pid files.
    pub(crate) run_dir: PathBuf,
    /// `runc ... exec --pid-file FILE ID CMD...`.
    pub(crate) runc: Vec<OsString>,
    /// For a command inside a sandbox (runsc): the command that kills it, with
    /// [`PID_PLACEHOLDER`] for the sandbox pid the pid file holds. Empty for runc.
    pub(crate) sandbox_kill: Vec<OsString>,
}

/// Where the sandbox pid goes in [`GuardArgs::sandbox_kill`].
pub(crate) const PID_PLACEHOLDER: &str = "{pid}";

impl GuardArgs {
    fn parse(args: Vec<OsString>) -> Result<(GuardArgs, RawFd), String> {
        let mut flags = Flags::parse(
            args,
            &[
                "--timeout-ms",
                "--status-fd",
                "--pid-file",
                "--run-dir",
                "--kill-arg",
            ],
        )?;
        let args = GuardArgs {
            timeout: Duration::from_millis(flags.number("--timeout-ms")?),
            status_fd: flags.status_fd()?,
            pid_file: flags.take("--pid-file")?.into(),
            run_dir: flags.take("--run-dir")?.into(),
            sandbox_kill: flags.take_all("--kill-arg"),
            runc: std::mem::take(&mut flags.cmd),
        };
        let fd = args.status_fd;
        Ok((args, fd))
    }

    pub(crate) fn to_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = vec![
            EXEC_GUARD_ARG.into(),
            "--timeout-ms".into(),
            self.timeout.as_millis().to_string().into(),
            "--status-fd".into(),
            self.status_fd.to_string().into(),
            "--pid-file".into(),
            self.pid_file.clone().into(),
            "--run-dir".into(),
            self.run_dir.clone().into(),
        ];
        for arg in &self.sandbox_kill {
            out.push("--kill-arg".into());
            out.push(arg.clone());
        }
        out.push("--".into());
        out.extend(self.runc.iter().cloned());
        out
    }
}

pub(crate) fn main_with_args(args: Vec<OsString>) -> i32 {
    helper::main(EXEC_GUARD_ARG, args, GuardArgs::parse, |args, agent| {
        let outcome = run(&args, agent);
        let _ = util::remove_file_if_exists(&args.pid_file);
        outcome
    })
}

fn run(args: &GuardArgs, agent: &OwnedFd) -> Result<Outcome, String> {
    let deadline = Instant::now() + args.timeout;
    let (program, rest) = args.runc.split_first().ok_or("no command")?;
    let mut command = std::process::Command::new(program);
    command.args(rest);
    // SAFETY: the hook only calls prctl, which is async-signal-safe. This process is
    // single-threaded and alive, so the signal is armed for as long as runc runs.
    unsafe {
        command.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(Signal::Kill))?;
            Ok(())
        });
    }
    let spawned = command
        .spawn()
        .map_err(|e| format!("run {}: {e}", Path::new(program).display()))?;
    let runc = Child::adopt(i32::try_from(spawned.id()).map_err(|e| e.to_string())?)?;
    if !args.sandbox_kill.is_empty() {
        return run_in_sandbox(args, runc, agent, deadline);
    }
    let runc_pid = runc.pid();
    let find = || runc_exec_process(&args.pid_file, runc_pid, &args.run_dir);
    let mut target = None;
    let ended = helper::watch(&runc, agent, deadline, || {
        if target.is_some() {
            return None;
        }
        if !args.pid_file.exists() {
            return Some(FIND_EVERY);
        }
        target = find();
        // Found, or not yet told apart (runc may still be on its way).
        target.is_none().then_some(FIND_AGAIN)
    });
    // A last look (runc's children) if the pid file never showed up or did not tell.
    let kill_target = |target: Option<OwnedFd>| match target.or_else(find) {
        Some(target) => {
            let _ = rustix::process::pidfd_send_signal(&target, Signal::Kill);
            true
        }
        None => false,
    };
    match ended {
        Ok(Ended::Exited) => runc.reap(),
        Ok(Ended::TimedOut) => {
            // runc reaps the killed process and exits; if it does not, or the process
            // could not be told apart, runc goes too.
            let killed = kill_target(target);
            if !killed || !helper::exits_within(runc.pidfd(), REPORT_WAIT).unwrap_or(false) {
                runc.kill();
            }
            runc.reap()?;
            Ok(Outcome::TimedOut)
        }
        Ok(Ended::AgentGone) => {
            // Nobody is left to read the output or enforce anything.
            kill_target(target);
            runc.kill();
            runc.reap()?;
            Ok(Outcome::Signaled(libc::SIGKILL))
        }
        Err(e) => {
            kill_target(target);
            runc.kill();
            let _ = runc.reap();
            Err(e)
        }
    }
}

/// [`run`] for a command inside a sandbox: there is no host process to hold, so the kill
/// is the sandbox's own, by the pid `runsc exec` wrote.
fn run_in_sandbox(
    args: &GuardArgs,
    runsc: Child,
    agent: &OwnedFd,
    deadline: Instant,
) -> Result<Outcome, String> {
    let kill = || {
        let Some(pid) = read_pid_file(&args.pid_file).ok().flatten() else {
            return false;
        };
        let pid = pid.to_string();
        let command: Vec<OsString> = args
            .sandbox_kill
            .iter()
            .map(|arg| {
                if arg == PID_PLACEHOLDER {
                    OsString::from(&pid)
                } else {
                    arg.clone()
                }
            })
            .collect();
        let Some((program, rest)) = command.split_first() else {
            return false;
        };
        std::process::Command::new(program)
            .args(rest)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    match helper::watch(&runsc, agent, deadline, || None) {
        Ok(Ended::Exited) => runsc.reap(),
        Ok(Ended::TimedOut) => {
            let killed = kill();
            if !killed || !helper::exits_within(runsc.pidfd(), REPORT_WAIT).unwrap_or(false) {
                runsc.kill();
            }
            runsc.reap()?;
            Ok(Outcome::TimedOut)
        }
        Ok(Ended::AgentGone) => {
            kill();
            runsc.kill();
            runsc.reap()?;
            Ok(Outcome::Signaled(libc::SIGKILL))
        }
        Err(e) => {
            kill();
            runsc.kill();
            let _ = runsc.reap();
            Err(e)
        }
    }
}

/// A pidfd on the process `runc exec` (pid `runc`) started, if one is found that is
/// runc's child in the Machine's pid namespace; `None` when anything is off. The pid file
/// is only a hint: its pid is checked like the rest, and runc's own children list is the
/// fallback, so a wrong pid there (which only the host could write) is never signalled.
fn runc_exec_process(pid_file: &Path, runc: u32, run_dir: &Path) -> Option<OwnedFd> {
    let machine = machine_pid_namespace(run_dir)?;
    let hinted = read_pid_file(pid_file).ok().flatten();
    hinted
        .into_iter()
        .chain(children(runc))
        .find_map(|pid| checked_child(pid, runc, machine))
}

/// A pidfd on `pid` if it is a live child of `parent` in the pid namespace `ns`.
fn checked_child(pid: u32, parent: u32, ns: (u64, u64)) -> Option<OwnedFd> {
    let fd = pidfd_open(pid).ok()??;
    let stat = util::proc_stat(pid).ok()??;
    let its_ns = pid_namespace(pid)?;
    // Checked with the pidfd held and the process not exited after the reads, so the
    // pid was that process all along.
    (stat.ppid == parent && stat.state != 'Z' && its_ns == ns && !exited(&fd)).then_some(fd)
}

/// The children of `pid`, as its threads list them.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// (device, inode) of the pid namespace of the Machine's init, found through the shim's
/// files as `status` finds it.
fn machine_pid_namespace(run: &Path) -> Option<(u64, u64)> {
    let init = RunDir::new(run).live_init().ok()??;
    let ns = pid_namespace(init.pid)?;
    (!exited(&init.pidfd)).then_some(ns)
}

fn pid_namespace(pid: u32) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(format!("/proc/{pid}/ns/pid")).ok()?;
    Some((meta.dev(), meta.ino()))
}

/// True once the pidfd's process has exited (or the pidfd cannot be polled).
fn exited(pidfd: &OwnedFd) -> bool {
    helper::exited(pidfd).unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_round_trip() {
        let args = GuardArgs {
            timeout: Duration::from_millis(1500),
            status_fd: 3,
            pid_file: "/m/run/exec-1.pid".into(),
            run_dir: "/m/run".into(),
            runc: ["runc", "exec", "--pid-file", "/m/run/exec-1.pid", "m", "sh"]
                .map(OsString::from)
                .to_vec(),
            sandbox_kill: Vec::new(),
        };
        let mut raw = args.to_args();
        assert_eq!(raw.remove(0), EXEC_GUARD_ARG);
        assert_eq!(GuardArgs::parse(raw).unwrap(), (args.clone(), 3));
        let stdio = GuardArgs {
            status_fd: 2,
            ..args
        };
        let mut raw = stdio.to_args();
        raw.remove(0);
        assert!(GuardArgs::parse(raw).is_err());
        let sandboxed = GuardArgs {
            status_fd: 3,
            sandbox_kill: ["runsc", "kill", "--pid", PID_PLACEHOLDER, "m", "KILL"]
                .map(OsString::from)
                .to_vec(),
            ..stdio
        };
        let mut raw = sandboxed.to_args();
        raw.remove(0);
        assert_eq!(GuardArgs::parse(raw).unwrap(), (sandboxed, 3));
    }
}
