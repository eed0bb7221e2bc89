//! The per-Machine supervisor, in the spirit of conmon.
//!
//! The agent spawns it with a sync pipe (stdout by default). It detaches from the agent,
//! creates and starts the container with runc, reports the outcome as one JSON line on
//! the sync pipe, then holds the Machine's stdout and stderr pipes, writes them to the
//! log, reaps the Machine's init (it is the child subreaper) and records how it ended in
//! `run/exit.json`. Nothing it does after the report involves the agent, so the agent
//! may exit or restart at any time.
//!
//! Files in the run directory: `shim.pid` (`<pid> <start time>`), `init.pid` (written by
//! runc), `runc.log`, `exit.json`.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigHandler, Signal};
use rustix::event::{PollFd, PollFlags};
use serde::{Deserialize, Serialize};

use crate::host::run_dir::{read_pid_file, RunDir};
use crate::logs::{LineBuffer, LogWriter, DEFAULT_MAX_BYTES};
use crate::timing::{micros, StepTimes};
use crate::{util, ExitRecord};

pub use crate::host::run_dir::INIT_PID_FILE;
pub const RUNC_LOG_FILE: &str = "runc.log";

/// Set on the re-executed copy when the shim had to detach without fork.
const DETACHED_ENV: &str = "BERTH_SHIM_DETACHED";
/// How long output is still collected after init exits. Processes outside the Machine's
/// pid namespace (none today) could hold the pipes open forever.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);
const READ_CHUNK: usize = 64 * 1024;

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
}

impl ShimArgs {
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
        })
    }
}

/// The one JSON line on the sync pipe: either the started fields or `error`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimReport {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shim_pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Time spent in `runc create` and `runc start`, for measurements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_us: Option<u64>,
    /// Where the supervisor's part of a start went, step by step.
    #[serde(default, skip_serializing_if = "StepTimes::is_empty")]
    pub steps: StepTimes,
}

impl ShimReport {
    pub(crate) fn error(message: impl Into<String>) -> ShimReport {
        ShimReport {
            error: Some(message.into()),
            ..ShimReport::default()
        }
    }
}

/// Entry point of the `berth-shim` binary and of `berth shim`. `args` excludes the
/// program name (and subcommand). Best called before the program starts threads: it then
/// detaches with fork. Otherwise it re-executes the program (same argv) to detach, which
/// costs an exec.
pub fn main_with_args(args: Vec<OsString>) -> i32 {
    if args
        .first()
        .is_some_and(|a| a == crate::native::spawner::SPAWNER_ARG)
    {
        return crate::native::spawner::main_with_args(args.into_iter().skip(1).collect());
    }
    if args.first().is_some_and(|a| a == crate::native::NSEXEC_ARG) {
        return crate::native::exec_in::main_with_args(args.into_iter().skip(1).collect());
    }
    if args
        .first()
        .is_some_and(|a| a == crate::exec_guard::EXEC_GUARD_ARG)
    {
        return crate::exec_guard::main_with_args(args.into_iter().skip(1).collect());
    }
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
            report(
                sync,
                &ShimReport::error(format!("shim for {} failed to detach: {e}", opts.id)),
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
    // SAFETY: sync_fd was handed to us by the spawner and is not used as anything else.
    let sync = unsafe { OwnedFd::from_raw_fd(opts.sync_fd) };
    let supervisor = match Supervisor::setup(&opts, sync.as_raw_fd()) {
        Ok(s) => s,
        Err(e) => {
            report(
                sync.as_fd(),
                &ShimReport::error(format!("shim setup for {}: {e}", opts.id)),
            );
            return 1;
        }
    };
    supervisor.run(sync)
}

/// The part of a supervisor's set-up that is the same for every Machine, so a spare
/// supervisor can do it before it knows which Machine it will run: root as cwd, the
/// signals a daemon wants, /dev/null as stdio (but for `keep`), no stray descriptors, and
/// the subreaper bit (orphans of the Machine come back to it).
pub(crate) fn prepare_process(keep: &[RawFd]) -> io::Result<()> {
    std::env::set_current_dir("/")?;
    // Process-wide, so it holds for any thread the host program started. runc gets
    // both back to default (see `runc()`), so the Machine does not inherit them.
    for sig in [Signal::SIGHUP, Signal::SIGPIPE] {
        // SAFETY: SIG_IGN installs no handler code.
        unsafe { nix::sys::signal::signal(sig, SigHandler::SigIgn) }?;
    }
    // An inherited SIG_IGN would make the kernel reap init before the shim can.
    // SAFETY: SIG_DFL installs no handler code.
    unsafe { nix::sys::signal::signal(Signal::SIGCHLD, SigHandler::SigDfl) }?;

    let null = File::options().read(true).write(true).open("/dev/null")?;
    for fd in [0, 1, 2] {
        if !keep.contains(&fd) {
            nix::unistd::dup2(null.as_raw_fd(), fd)?;
        }
    }
    drop(null);
    let mut kept = vec![0, 1, 2];
    kept.extend_from_slice(keep);
    close_inherited_fds(&kept);
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))?;
    Ok(())
}

/// This process's pid and start time (clock ticks since boot): what `shim.pid` holds, so
/// a recycled pid is never mistaken for the shim.
pub(crate) fn own_identity() -> io::Result<(u32, u64)> {
    let me = std::process::id();
    let start = util::proc_stat(me)?
        .ok_or_else(|| io::Error::other("own /proc entry missing"))?
        .start_time;
    Ok((me, start))
}

pub(crate) struct Supervisor {
    opts: ShimArgs,
    stdout_r: OwnedFd,
    stderr_r: OwnedFd,
    /// Write ends, handed to `runc create` and then dropped.
    child_stdio: Option<(OwnedFd, OwnedFd)>,
}

impl Supervisor {
    pub(crate) fn setup(opts: &ShimArgs, sync_fd: RawFd) -> io::Result<Supervisor> {
        prepare_process(&[sync_fd])?;
        Supervisor::for_machine(opts, own_identity()?)
    }

    /// The part of the set-up that names the Machine; `identity` is [`own_identity`].
    pub(crate) fn for_machine(opts: &ShimArgs, identity: (u32, u64)) -> io::Result<Supervisor> {
        fs::create_dir_all(&opts.run_dir)?;
        RunDir::new(&opts.run_dir).write_shim_pid(identity)?;
        util::remove_file_if_exists(&opts.run_dir.join(RUNC_LOG_FILE))?;

        let (stdout_r, stdout_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let (stderr_r, stderr_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        Ok(Supervisor {
            opts: opts.clone(),
            stdout_r,
            stderr_r,
            child_stdio: Some((stdout_w, stderr_w)),
        })
    }

    /// The write ends of the Machine's stdout and stderr pipes, once.
    pub(crate) fn take_child_stdio(&mut self) -> Option<(OwnedFd, OwnedFd)> {
        self.child_stdio.take()
    }

    fn runc(&self) -> Command {
        let mut cmd = Command::new(&self.opts.runc_binary);
        cmd.arg("--root")
            .arg(&self.opts.runc_root)
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
                report(sync.as_fd(), &report_ok);
                init
            }
            Err(message) => {
                report(sync.as_fd(), &ShimReport::error(message));
                return 1;
            }
        };
        drop(sync);
        self.supervise(init);
        0
    }

    /// Runs `runc create` and `runc start`. The error is runc's own message.
    fn create_and_start(&mut self) -> Result<(InitProcess, ShimReport), String> {
        let id = self.opts.id.clone();
        let run_dir = self.opts.run_dir.clone();
        let (out_w, err_w) = self
            .child_stdio
            .take()
            .ok_or_else(|| "shim stdio already used".to_owned())?;
        let pid_file = run_dir.join(INIT_PID_FILE);
        let t0 = Instant::now();
        let status = {
            let mut cmd = self.runc();
            cmd.arg("--log")
                .arg(run_dir.join(RUNC_LOG_FILE))
                .arg("--log-format")
                .arg("json")
                .arg("create")
                .arg("--bundle")
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
            .ok_or_else(|| format!("runc create left no pid in {}", pid_file.display()))?;
        let oom = OomCounter::for_process(pid);

        let t1 = Instant::now();
        let started = self
            .runc()
            .arg("start")
            .arg(&id)
            .stdin(Stdio::null())
            .output();
        let start_us = micros(t1.elapsed());
        let failure = match started {
            Ok(out) if out.status.success() => None,
            Ok(out) => Some(format!(
                "runc start {id}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Some(format!(
                "run {} start: {e}",
                self.opts.runc_binary.display()
            )),
        };
        if let Some(message) = failure {
            // The created init would wait forever on its exec fifo.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
            return Err(message);
        }
        let report = ShimReport {
            pid: Some(pid),
            shim_pid: Some(std::process::id()),
            started_at_ms: Some(util::now_ms()),
            error: None,
            create_us: Some(create_us),
            start_us: Some(start_us),
            steps: StepTimes::new(),
        };
        Ok((InitProcess { pid, oom }, report))
    }

    /// runc's error from its json log, or whatever it printed.
    fn create_error(&self, status: &str) -> String {
        let log = fs::read_to_string(self.opts.run_dir.join(RUNC_LOG_FILE)).unwrap_or_default();
        let mut messages: Vec<String> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| matches!(v["level"].as_str(), Some("error" | "fatal")))
            .filter_map(|v| v["msg"].as_str().map(str::to_owned))
            .collect();
        messages.dedup();
        if messages.is_empty() {
            let printed = read_available(&self.stderr_r);
            let printed = String::from_utf8_lossy(&printed).trim().to_owned();
            if !printed.is_empty() {
                messages.push(printed);
            }
        }
        if messages.is_empty() {
            format!("runc create exited with {status}")
        } else {
            messages.join("; ")
        }
    }

    /// Copies output to the log and reaps children until init has exited and the pipes
    /// are drained (or the drain deadline passes).
    pub(crate) fn supervise(self, init: InitProcess) {
        let mut log = LogWriter::open(&self.opts.log_dir, self.opts.log_max_bytes).ok();
        let mut streams = [
            Stream {
                fd: Some(self.stdout_r),
                lines: LineBuffer::default(),
            },
            Stream {
                fd: Some(self.stderr_r),
                lines: LineBuffer::default(),
            },
        ];
        // Readable once init has exited. Opened after runc create returned, when init is
        // already the shim's child, so the pid cannot have been reused.
        let init_fd = rustix::process::Pid::from_raw(init.pid as i32).and_then(|pid| {
            rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
        });
        let mut deadline: Option<Instant> = None;
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            if deadline.is_none() {
                if let Some(record) = reap(init.pid, &init.oom) {
                    // Nowhere to report a failure: stderr is /dev/null. The runtime
                    // treats a missing record as an unknown exit.
                    let _ = RunDir::new(&self.opts.run_dir).write_exit(&record);
                    deadline = Some(Instant::now() + DRAIN_AFTER_EXIT);
                }
            }
            let open = streams.iter().any(|s| s.fd.is_some());
            let timeout_ms = match deadline {
                Some(d) if !open || Instant::now() >= d => break,
                Some(d) => i32::try_from(d.saturating_duration_since(Instant::now()).as_millis())
                    .unwrap_or(i32::MAX)
                    .max(1),
                // Without a pidfd, fall back to polling for init's exit.
                None if init_fd.is_none() => 100,
                None => -1,
            };
            let ready = {
                let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(3);
                if let (Some(fd), None) = (&init_fd, deadline) {
                    fds.push(PollFd::new(fd, PollFlags::IN));
                }
                let first_stream = fds.len();
                for s in streams.iter() {
                    if let Some(fd) = &s.fd {
                        fds.push(PollFd::new(fd, PollFlags::IN));
                    }
                }
                match rustix::event::poll(&mut fds, timeout_ms) {
                    Ok(_) => fds
                        .iter()
                        .skip(first_stream)
                        .map(|f| !f.revents().is_empty())
                        .collect::<Vec<_>>(),
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(_) => {
                        // poll cannot fail on valid fds; avoid a busy loop regardless.
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                }
            };
            let mut ready = ready.into_iter();
            for s in streams.iter_mut().filter(|s| s.fd.is_some()) {
                if ready.next() == Some(true) {
                    s.pump(&mut buf, log.as_mut());
                }
            }
        }
        for s in streams.iter_mut() {
            if let Some(log) = log.as_mut() {
                let _ = s.lines.flush(log);
            }
        }
    }
}

pub(crate) struct InitProcess {
    pub(crate) pid: u32,
    pub(crate) oom: OomCounter,
}

struct Stream {
    fd: Option<OwnedFd>,
    lines: LineBuffer,
}

impl Stream {
    /// One read; EOF or error closes the stream. Log write errors (disk full) drop the
    /// output rather than stop reading, which would block the Machine.
    fn pump(&mut self, buf: &mut [u8], log: Option<&mut LogWriter>) {
        let Some(fd) = &self.fd else { return };
        match rustix::io::read(fd, &mut *buf) {
            Ok(0) => self.fd = None,
            Ok(n) => {
                if let Some(log) = log {
                    let _ = self.lines.push(&buf[..n], log);
                }
            }
            Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
            Err(_) => self.fd = None,
        }
    }
}

/// Reaps every exited child; returns init's record once init is among them.
fn reap(init: u32, oom: &OomCounter) -> Option<ExitRecord> {
    let mut record = None;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes only to `status`, a valid local.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return record;
        }
        if pid as u32 == init {
            let exited = libc::WIFEXITED(status);
            record = Some(ExitRecord {
                exit_code: exited.then(|| libc::WEXITSTATUS(status)),
                signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
                oom_killed: oom.fired(),
                exited_at_ms: util::now_ms(),
            });
        }
    }
}

/// The Machine cgroup's `oom_kill` counter, found while init is alive because the path
/// comes from `/proc/<init>/cgroup`.
pub(crate) struct OomCounter {
    file: Option<PathBuf>,
    baseline: u64,
}

impl OomCounter {
    pub(crate) fn for_process(pid: u32) -> OomCounter {
        let file = fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|text| oom_file_candidates(&text).into_iter().find(|p| p.exists()));
        let baseline = file.as_deref().and_then(read_oom_kills).unwrap_or(0);
        OomCounter { file, baseline }
    }

    fn fired(&self) -> bool {
        self.file
            .as_deref()
            .and_then(read_oom_kills)
            .is_some_and(|n| n > self.baseline)
    }
}

/// v1 `memory.oom_control` first (the memory controller lives there on hybrid hosts),
/// then v2 `memory.events` on a pure or hybrid mount.
fn oom_file_candidates(proc_cgroup: &str) -> Vec<PathBuf> {
    let mut v1 = Vec::new();
    let mut v2 = Vec::new();
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            v2.push(Path::new("/sys/fs/cgroup").join(path).join("memory.events"));
            v2.push(
                Path::new("/sys/fs/cgroup/unified")
                    .join(path)
                    .join("memory.events"),
            );
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = Path::new("/sys/fs/cgroup").join(controllers);
            v1.push(dir.join(path).join("memory.oom_control"));
        }
    }
    v1.extend(v2);
    v1
}

fn read_oom_kills(file: &Path) -> Option<u64> {
    let text = fs::read_to_string(file).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

/// Writes the report line; a vanished reader is not the shim's problem.
pub(crate) fn report(sync: BorrowedFd<'_>, report: &ShimReport) {
    let mut line =
        serde_json::to_vec(report).unwrap_or_else(|_| b"{\"error\":\"report\"}".to_vec());
    line.push(b'\n');
    let mut written = 0;
    while written < line.len() {
        match rustix::io::write(sync, &line[written..]) {
            Ok(0) => return,
            Ok(n) => written += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return,
        }
    }
}

/// Whatever is buffered in the pipe right now, without blocking.
fn read_available(fd: &OwnedFd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, 0) {
            Ok(n) if n > 0 && fds[0].revents().contains(PollFlags::IN) => {}
            _ => return out,
        }
        match rustix::io::read(fd, &mut buf) {
            Ok(n) if n > 0 && out.len() < 64 * 1024 => out.extend_from_slice(&buf[..n]),
            _ => return out,
        }
    }
}

/// Closes every descriptor inherited through exec (those without close-on-exec), except
/// `keep`, so the shim pins nothing of the agent's: no sockets, no pipe ends. Descriptors
/// this process opened itself carry close-on-exec and may belong to other threads of a
/// host program, so they stay.
fn close_inherited_fds(keep: &[RawFd]) {
    let Ok(dir) = fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| !keep.contains(fd))
        .collect();
    for fd in fds {
        // SAFETY: F_GETFD only reads descriptor flags; a closed fd (the directory handle
        // above) fails with EBADF.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            // SAFETY: an inherited descriptor no Rust object in this process owns.
            unsafe { libc::close(fd) };
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
        };
        assert_eq!(ShimArgs::parse(a.to_args()).unwrap(), a);
        assert!(ShimArgs::parse(vec!["--id".into()]).is_err());
        assert!(ShimArgs::parse(vec!["--bogus".into(), "x".into()]).is_err());
    }

    #[test]
    fn finds_oom_files() {
        let text = "4:memory:/agent/berth/m1\n1:cpu:/berth/m1\n0::/berth/m1\n";
        let c = oom_file_candidates(text);
        assert_eq!(
            c[0],
            Path::new("/sys/fs/cgroup/memory/agent/berth/m1/memory.oom_control")
        );
        assert_eq!(c[1], Path::new("/sys/fs/cgroup/berth/m1/memory.events"));
        assert_eq!(
            c[2],
            Path::new("/sys/fs/cgroup/unified/berth/m1/memory.events")
        );
    }

    #[test]
    fn report_shapes() {
        let ok = ShimReport {
            pid: Some(5),
            shim_pid: Some(4),
            started_at_ms: Some(9),
            ..ShimReport::default()
        };
        let v: serde_json::Value = serde_json::to_value(&ok).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"pid": 5, "shim_pid": 4, "started_at_ms": 9})
        );
        let v = serde_json::to_value(ShimReport::error("boom")).unwrap();
        assert_eq!(v, serde_json::json!({"error": "boom"}));
    }
}
