//! The shim of the runc and gVisor drivers: `berth shim --id … --bundle …` (or the
//! standalone `berth-shim`). The runtime spawns it with a sync pipe (stdout by default).
//! It detaches from the agent, becomes the Machine's [`Supervisor`], creates and starts
//! the container with the OCI runtime program (runc, or runsc: [`Flavor`]), or restores
//! it from a checkpoint image, reports the outcome as one JSON line on the sync pipe, then
//! supervises the Machine like any other. Nothing it does after the report involves the
//! agent, so the agent may exit or restart at any time.
//!
//! Besides the run directory's files (see [`crate::host::RunDir`]; the program writes
//! `init.pid` with `--pid-file`) it keeps the program's own log, `run/runc.log` or
//! `run/runsc.log`. Under runsc, "init" is the sandbox process: the Machine's processes
//! run inside it, and it exits with the status of the Machine's init (128 + N for a
//! death by signal N).

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use nix::sys::signal::Signal;

use crate::host::run_dir::{read_pid_file, INIT_PID_FILE};
use crate::logs::DEFAULT_MAX_BYTES;
use crate::machine_init;
use crate::supervisor::{self, InitProcess, OomCounter, Report, Supervisor, SupervisorArgs};
use crate::timing::{micros, StepTimes};
use crate::util;

pub const RUNC_LOG_FILE: &str = "runc.log";
pub const RUNSC_LOG_FILE: &str = "runsc.log";

/// Which OCI runtime program the shim runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// runc: init passed as fd 3 (`--preserve-fds 1`).
    Runc,
    /// gVisor's runsc: init is in `config.json` (a bind mount); no descriptors pass.
    Runsc,
}

impl Flavor {
    pub fn program(self) -> &'static str {
        match self {
            Flavor::Runc => "runc",
            Flavor::Runsc => "runsc",
        }
    }

    fn log_file(self) -> &'static str {
        match self {
            Flavor::Runc => RUNC_LOG_FILE,
            Flavor::Runsc => RUNSC_LOG_FILE,
        }
    }

    fn parse(value: &str) -> Result<Flavor, String> {
        match value {
            "runc" => Ok(Flavor::Runc),
            "runsc" => Ok(Flavor::Runsc),
            other => Err(format!("unknown --flavor {other}")),
        }
    }

    /// The start's step names: the bench reads them.
    fn steps(self) -> [&'static str; 3] {
        match self {
            Flavor::Runc => ["runc_create", "runc_start", "runc_restore"],
            Flavor::Runsc => ["runsc_create", "runsc_start", "runsc_restore"],
        }
    }
}

/// Set on the re-executed copy when the shim had to detach without fork.
const DETACHED_ENV: &str = "BERTH_SHIM_DETACHED";

/// The shim's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimArgs {
    pub id: String,
    pub bundle: PathBuf,
    pub runc_binary: PathBuf,
    pub runc_root: PathBuf,
    pub run_dir: PathBuf,
    pub log_dir: PathBuf,
    pub log_max_bytes: u64,
    /// Where the report goes; 1 (stdout) unless given.
    pub sync_fd: RawFd,
    pub flavor: Flavor,
    /// Flags for every call of the program, after `--root`.
    pub global_args: Vec<OsString>,
    /// Restore the container from this checkpoint image instead of creating it.
    pub restore_from: Option<PathBuf>,
}

impl ShimArgs {
    /// What the supervisor needs of the shim's arguments.
    fn supervisor_args(&self) -> SupervisorArgs {
        SupervisorArgs {
            id: self.id.clone(),
            run_dir: self.run_dir.clone(),
            log_dir: self.log_dir.clone(),
            log_max_bytes: self.log_max_bytes,
        }
    }

    pub fn to_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = Vec::with_capacity(16);
        let mut push = |flag: &str, value: &OsStr| {
            out.push(flag.into());
            out.push(value.to_owned());
        };
        push("--id", OsStr::new(&self.id));
        push("--bundle", self.bundle.as_os_str());
        push("--runc", self.runc_binary.as_os_str());
        push("--runc-root", self.runc_root.as_os_str());
        push("--run-dir", self.run_dir.as_os_str());
        push("--log-dir", self.log_dir.as_os_str());
        push(
            "--log-max-bytes",
            OsStr::new(&self.log_max_bytes.to_string()),
        );
        push("--sync-fd", OsStr::new(&self.sync_fd.to_string()));
        push("--flavor", OsStr::new(self.flavor.program()));
        for arg in &self.global_args {
            push("--runtime-arg", arg);
        }
        if let Some(image) = &self.restore_from {
            push("--restore-from", image.as_os_str());
        }
        out
    }

    pub fn parse(args: Vec<OsString>) -> Result<ShimArgs, String> {
        let mut id = None;
        let mut bundle = None;
        let mut runc = None;
        let mut root = None;
        let mut run_dir = None;
        let mut log_dir = None;
        let mut log_max_bytes = DEFAULT_MAX_BYTES;
        let mut sync_fd = 1;
        let mut flavor = Flavor::Runc;
        let mut global_args = Vec::new();
        let mut restore_from = None;
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            let flag = flag.to_string_lossy().into_owned();
            let value = it
                .next()
                .ok_or_else(|| format!("missing value for {flag}"))?;
            let number = |v: &OsString| {
                v.to_str()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| format!("{flag} wants a number, got {v:?}"))
            };
            match flag.as_str() {
                "--id" => id = Some(value.to_string_lossy().into_owned()),
                "--bundle" => bundle = Some(PathBuf::from(value)),
                "--runc" => runc = Some(PathBuf::from(value)),
                "--runc-root" => root = Some(PathBuf::from(value)),
                "--run-dir" => run_dir = Some(PathBuf::from(value)),
                "--log-dir" => log_dir = Some(PathBuf::from(value)),
                "--log-max-bytes" => log_max_bytes = number(&value)?,
                "--sync-fd" => {
                    sync_fd = RawFd::try_from(number(&value)?).map_err(|e| e.to_string())?
                }
                "--flavor" => flavor = Flavor::parse(&value.to_string_lossy())?,
                "--runtime-arg" => global_args.push(value),
                "--restore-from" => restore_from = Some(PathBuf::from(value)),
                other => return Err(format!("unknown argument {other}")),
            }
        }
        let need = |v: Option<PathBuf>, name: &str| v.ok_or_else(|| format!("missing {name}"));
        Ok(ShimArgs {
            id: id.ok_or("missing --id")?,
            bundle: need(bundle, "--bundle")?,
            runc_binary: need(runc, "--runc")?,
            runc_root: need(root, "--runc-root")?,
            run_dir: need(run_dir, "--run-dir")?,
            log_dir: need(log_dir, "--log-dir")?,
            log_max_bytes,
            sync_fd,
            flavor,
            global_args,
            restore_from,
        })
    }
}

/// runsc's network setup (in `start`, and in `restore`, which starts too) refuses a
/// network namespace that has `/proc/sys/net/core/rmem_default`, which it takes for a sign
/// of the host's own; since Linux 6.x every namespace has it (gVisor issue 10704, fixed
/// after Debian's 20221219). So those two run in a mount namespace of their own (private,
/// so nothing propagates to the host's) with a fresh procfs mounted over `/proc/sys/net`,
/// where there is no `core/`. Not an empty tmpfs: the gofer and sandbox `restore` makes
/// mount their own procfs in new user namespaces, which the kernel allows only while a
/// procfs mount without covered files is in sight (`mount_too_revealing`); the fresh one
/// is that.
fn hide_proc_sys_net(cmd: &mut Command) {
    use rustix::mount::{MountFlags, MountPropagationFlags};
    // SAFETY: the hook makes only the unshare(2) and mount(2) calls, async-signal-safe,
    // with constant C strings, in the child before it execs runsc.
    unsafe {
        cmd.pre_exec(|| {
            rustix::thread::unshare(rustix::thread::UnshareFlags::NEWNS)?;
            rustix::mount::mount_change(
                c"/",
                MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
            )?;
            rustix::mount::mount(
                c"proc",
                c"/proc/sys/net",
                c"proc",
                MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                c"",
            )?;
            Ok(())
        });
    }
}

/// The shim's own entry point, once `berth shim` has found no other subcommand. Best
/// called before the program starts threads: it then detaches with fork. Otherwise it
/// re-executes the program (same argv) to detach, which costs an exec.
pub(crate) fn main_with_args(args: Vec<OsString>) -> i32 {
    let opts = match ShimArgs::parse(args) {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("berth-shim: {msg}");
            return 2;
        }
    };
    match detach() {
        Ok(Detached::Parent) => 0,
        Ok(Detached::Daemon) => run(opts),
        Err(e) => {
            // SAFETY: sync_fd came from the caller and stays open for the whole call.
            let sync = unsafe { BorrowedFd::borrow_raw(opts.sync_fd) };
            supervisor::report(
                sync,
                &Report::failed(format!("shim for {} failed to detach: {e}", opts.id)),
            );
            1
        }
    }
}

enum Detached {
    /// The process the agent spawned: it exits at once so the agent can reap it.
    Parent,
    /// The long-lived shim, in its own session.
    Daemon,
}

fn detach() -> io::Result<Detached> {
    if std::env::var_os(DETACHED_ENV).is_none() {
        if thread_count()? == 1 {
            // SAFETY: the process is single-threaded here, so the child may run any code.
            match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
                nix::unistd::ForkResult::Parent { .. } => return Ok(Detached::Parent),
                nix::unistd::ForkResult::Child => {}
            }
        } else {
            // fork would only be safe for async-signal-safe code; exec a fresh copy.
            let mut args = std::env::args_os();
            let _program = args.next();
            Command::new("/proc/self/exe")
                .args(args)
                .env(DETACHED_ENV, "1")
                .spawn()?;
            return Ok(Detached::Parent);
        }
    }
    nix::unistd::setsid().map_err(io::Error::from)?;
    Ok(Detached::Daemon)
}

fn thread_count() -> io::Result<usize> {
    Ok(fs::read_dir("/proc/self/task")?.count())
}

/// The daemon: returns the process exit code.
fn run(opts: ShimArgs) -> i32 {
    // SAFETY: sync_fd was handed to us by the runtime and is not used as anything else.
    let sync = unsafe { OwnedFd::from_raw_fd(opts.sync_fd) };
    let shim = match Shim::setup(opts.clone(), sync.as_raw_fd()) {
        Ok(s) => s,
        Err(e) => {
            supervisor::report(
                sync.as_fd(),
                &Report::failed(format!("shim setup for {}: {e}", opts.id)),
            );
            return 1;
        }
    };
    shim.run(sync)
}

/// A supervisor that starts its Machine with runc or runsc.
struct Shim {
    opts: ShimArgs,
    supervisor: Supervisor,
}

impl Shim {
    fn setup(opts: ShimArgs, sync_fd: RawFd) -> io::Result<Shim> {
        supervisor::prepare_process(&[sync_fd])?;
        let supervisor =
            Supervisor::for_machine(&opts.supervisor_args(), supervisor::own_identity()?)?;
        util::remove_file_if_exists(&opts.run_dir.join(opts.flavor.log_file()))?;
        Ok(Shim { opts, supervisor })
    }

    fn runc(&self) -> Command {
        let mut cmd = Command::new(&self.opts.runc_binary);
        cmd.arg("--root")
            .arg(&self.opts.runc_root)
            .args(&self.opts.global_args)
            .env_remove(DETACHED_ENV);
        // SAFETY: the hook only calls signal(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                for sig in [libc::SIGHUP, libc::SIGPIPE] {
                    if libc::signal(sig, libc::SIG_DFL) == libc::SIG_ERR {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd
    }

    fn run(mut self, sync: OwnedFd) -> i32 {
        let init = match self.create_and_start() {
            Ok((init, report_ok)) => {
                supervisor::report(sync.as_fd(), &report_ok);
                init
            }
            Err(message) => {
                supervisor::report(sync.as_fd(), &Report::failed(message));
                return 1;
            }
        };
        drop(sync);
        self.supervisor.supervise(init);
        0
    }

    /// Runs the program's `create` and `start`, or its `restore`. The error is the
    /// program's own message.
    fn create_and_start(&mut self) -> Result<(InitProcess, Report), String> {
        let id = self.opts.id.clone();
        let run_dir = self.opts.run_dir.clone();
        let program = self.opts.flavor.program();
        let [create_step, start_step, restore_step] = self.opts.flavor.steps();
        let (out_w, err_w) = self
            .supervisor
            .take_child_stdio()
            .ok_or_else(|| "shim stdio already used".to_owned())?;
        let pid_file = run_dir.join(INIT_PID_FILE);
        let t0 = Instant::now();
        let status = {
            // runc: the Machine's PID 1, passed as fd 3; this copy closes with the block.
            let init = match self.opts.flavor {
                Flavor::Runc => {
                    Some(machine_init::sealed_memfd().map_err(|e| format!("berth-init: {e}"))?)
                }
                Flavor::Runsc => None,
            };
            let mut cmd = self.runc();
            if let Some(init) = &init {
                super::init::pass_to_runc(&mut cmd, init.as_fd());
            }
            cmd.arg("--log")
                .arg(run_dir.join(self.opts.flavor.log_file()))
                .arg("--log-format")
                .arg("json");
            match (&self.opts.restore_from, init.is_some()) {
                (Some(image), _) => {
                    // create, restore and start in one; --detach leaves the sandbox to
                    // this shim (the subreaper) as `create` does.
                    hide_proc_sys_net(&mut cmd);
                    cmd.arg("restore")
                        .arg("--detach")
                        .arg("--image-path")
                        .arg(image);
                }
                (None, true) => {
                    cmd.arg("create").args(super::init::RUNC_CREATE_ARGS);
                }
                (None, false) => {
                    cmd.arg("create");
                }
            }
            cmd.arg("--bundle")
                .arg(&self.opts.bundle)
                .arg("--pid-file")
                .arg(&pid_file)
                .arg(&id)
                .stdin(Stdio::null())
                .stdout(Stdio::from(out_w))
                .stderr(Stdio::from(err_w));
            // The command, and with it the write ends, is dropped at the end of this block
            // so the pipes see EOF once the Machine is gone.
            cmd.status()
        };
        let create_us = micros(t0.elapsed());
        let status = status.map_err(|e| format!("run {}: {e}", self.opts.runc_binary.display()))?;
        if !status.success() {
            return Err(self.create_error(&status.to_string()));
        }
        let pid = read_pid_file(&pid_file)
            .ok()
            .flatten()
            .ok_or_else(|| format!("{program} left no pid in {}", pid_file.display()))?;
        let oom = OomCounter::for_process(pid);
        if self.opts.restore_from.is_some() {
            let mut steps = StepTimes::new();
            steps.record(restore_step, create_us);
            return Ok((InitProcess { pid, oom }, Report::started(pid, steps)));
        }

        let t1 = Instant::now();
        let mut start = self.runc();
        if self.opts.flavor == Flavor::Runsc {
            hide_proc_sys_net(&mut start);
        }
        let started = start.arg("start").arg(&id).stdin(Stdio::null()).output();
        let start_us = micros(t1.elapsed());
        let failure = match started {
            Ok(out) if out.status.success() => None,
            Ok(out) => Some(format!(
                "{program} start {id}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Some(format!(
                "run {} start: {e}",
                self.opts.runc_binary.display()
            )),
        };
        if let Some(message) = failure {
            // The created init would wait forever on its exec fifo (runc), or the sandbox
            // for its start (runsc).
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
            return Err(message);
        }
        let mut steps = StepTimes::new();
        steps.record(create_step, create_us);
        steps.record(start_step, start_us);
        Ok((InitProcess { pid, oom }, Report::started(pid, steps)))
    }

    /// The program's error from its json log, or whatever it printed.
    fn create_error(&self, status: &str) -> String {
        let log = fs::read_to_string(self.opts.run_dir.join(self.opts.flavor.log_file()))
            .unwrap_or_default();
        let mut messages: Vec<String> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| matches!(v["level"].as_str(), Some("error" | "fatal")))
            .filter_map(|v| v["msg"].as_str().map(str::to_owned))
            .collect();
        messages.dedup();
        if messages.is_empty() {
            let printed = self.supervisor.stderr_so_far();
            let printed = String::from_utf8_lossy(&printed).trim().to_owned();
            if !printed.is_empty() {
                messages.push(printed);
            }
        }
        if messages.is_empty() {
            format!("{} create exited with {status}", self.opts.flavor.program())
        } else {
            messages.join("; ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_round_trip() {
        let a = ShimArgs {
            id: "m1".into(),
            bundle: "/m/bundle".into(),
            runc_binary: "/usr/sbin/runc".into(),
            runc_root: "/run/berth/runc".into(),
            run_dir: "/m/run".into(),
            log_dir: "/m/logs".into(),
            log_max_bytes: 1234,
            sync_fd: 1,
            flavor: Flavor::Runc,
            global_args: Vec::new(),
            restore_from: None,
        };
        assert_eq!(ShimArgs::parse(a.to_args()).unwrap(), a);
        let gvisor = ShimArgs {
            flavor: Flavor::Runsc,
            global_args: vec!["--platform=ptrace".into(), "--network=sandbox".into()],
            restore_from: Some("/m/memory".into()),
            ..a.clone()
        };
        assert_eq!(ShimArgs::parse(gvisor.to_args()).unwrap(), gvisor);
        assert!(ShimArgs::parse(vec!["--id".into()]).is_err());
        assert!(ShimArgs::parse(vec!["--bogus".into(), "x".into()]).is_err());
    }
}
