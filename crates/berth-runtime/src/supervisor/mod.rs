//! The per-Machine supervisor, in the spirit of conmon, whichever driver started the
//! Machine: it holds the Machine's stdout and stderr pipes and writes them to the capped
//! log, reaps the Machine's init (it is the child subreaper) and records how it ended in
//! the run directory ([`RunDir`]). Nothing it does involves the agent, so the agent may
//! exit or restart at any time.
//!
//! A driver starts init from it (runc's shim with `runc create` and `runc start`, the
//! native spawner's spare by forking init) and then sends the runtime one JSON line, the
//! [`Report`], before it only supervises.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigHandler, Signal};
use rustix::event::{PollFd, PollFlags};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use crate::error::RuntimeError;
use crate::host::run_dir::RunDir;
use crate::logs::{LineBuffer, LogWriter};
use crate::timing::StepTimes;
use crate::{util, ExitRecord, Started};

/// How long output is still collected after init exits. Processes outside the Machine's
/// pid namespace (none today) could hold the pipes open forever.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);
const READ_CHUNK: usize = 64 * 1024;

/// Which Machine a supervisor runs, and where its files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorArgs {
    pub id: String,
    pub run_dir: PathBuf,
    pub log_dir: PathBuf,
    pub log_max_bytes: u64,
}

/// The one JSON line a supervisor sends the runtime once init runs, or why it does not.
/// On the wire, `{"pid", "shim_pid", "started_at_ms", "steps"}` or `{"error"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Report {
    /// Listed first: a line with an `error` is a failure whatever else it holds.
    Failed { error: String },
    Started {
        /// The Machine's init, in the host's pid namespace.
        pid: u32,
        /// The supervisor.
        shim_pid: u32,
        /// Milliseconds since the Unix epoch.
        started_at_ms: i64,
        /// Where the supervisor's part of the start went, step by step.
        #[serde(default, skip_serializing_if = "StepTimes::is_empty")]
        steps: StepTimes,
    },
}

impl Report {
    pub(crate) fn failed(message: impl Into<String>) -> Report {
        Report::Failed {
            error: message.into(),
        }
    }

    /// Init `pid` runs under this process, started now.
    pub(crate) fn started(pid: u32, steps: StepTimes) -> Report {
        Report::Started {
            pid,
            shim_pid: std::process::id(),
            started_at_ms: util::now_ms(),
            steps,
        }
    }

    /// The Machine as started, or the supervisor's error as the start error of `driver`.
    pub(crate) fn into_started(
        self,
        driver: &'static str,
        id: &str,
    ) -> Result<Started, RuntimeError> {
        match self {
            Report::Started {
                pid,
                shim_pid,
                started_at_ms,
                steps,
            } => Ok(Started {
                pid,
                shim_pid,
                started_at_ms,
                steps,
            }),
            Report::Failed { error } => Err(RuntimeError::Start {
                driver,
                id: id.to_owned(),
                message: error,
            }),
        }
    }
}

/// The runtime's side: reads the report line from `reader` within `timeout`.
pub(crate) async fn read_report(
    reader: impl AsyncRead + Unpin,
    timeout: Duration,
    driver: &'static str,
    id: &str,
) -> Result<Report, RuntimeError> {
    let mut line = String::new();
    let read = tokio::time::timeout(timeout, BufReader::new(reader).read_line(&mut line)).await;
    let failed = |message: String| RuntimeError::Start {
        driver,
        id: id.to_owned(),
        message,
    };
    match read {
        Err(_) => Err(RuntimeError::StartTimeout {
            id: id.to_owned(),
            timeout,
        }),
        Ok(Err(e)) => Err(RuntimeError::io(
            format!("read the start report of machine {id}"),
            e,
        )),
        Ok(Ok(0)) => Err(failed("the supervisor exited without a report".into())),
        Ok(Ok(_)) => serde_json::from_str(line.trim())
            .map_err(|e| failed(format!("bad start report {:?}: {e}", line.trim()))),
    }
}

/// The part of a supervisor's set-up that is the same for every Machine, so a spare
/// supervisor can do it before it knows which Machine it will run: root as cwd, the
/// signals a daemon wants, /dev/null as stdio (but for `keep`), no stray descriptors, and
/// the subreaper bit (orphans of the Machine come back to it).
pub(crate) fn prepare_process(keep: &[RawFd]) -> io::Result<()> {
    std::env::set_current_dir("/")?;
    // Process-wide, so it holds for any thread the host program started. Whatever
    // starts init puts both back to default, so the Machine does not inherit them.
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
    args: SupervisorArgs,
    stdout_r: OwnedFd,
    stderr_r: OwnedFd,
    /// Write ends, handed to the Machine's init and then dropped.
    child_stdio: Option<(OwnedFd, OwnedFd)>,
}

impl Supervisor {
    /// The part of the set-up that names the Machine; `identity` is [`own_identity`].
    pub(crate) fn for_machine(
        args: &SupervisorArgs,
        identity: (u32, u64),
    ) -> io::Result<Supervisor> {
        fs::create_dir_all(&args.run_dir)?;
        RunDir::new(&args.run_dir).write_shim_pid(identity)?;

        let (stdout_r, stdout_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let (stderr_r, stderr_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        Ok(Supervisor {
            args: args.clone(),
            stdout_r,
            stderr_r,
            child_stdio: Some((stdout_w, stderr_w)),
        })
    }

    /// The write ends of the Machine's stdout and stderr pipes, once.
    pub(crate) fn take_child_stdio(&mut self) -> Option<(OwnedFd, OwnedFd)> {
        self.child_stdio.take()
    }

    /// What the Machine's init wrote to stderr so far, without blocking: the reason a
    /// start failed, when the starter did not say.
    pub(crate) fn stderr_so_far(&self) -> Vec<u8> {
        read_available(&self.stderr_r)
    }

    /// Copies output to the log and reaps children until init has exited and the pipes
    /// are drained (or the drain deadline passes).
    pub(crate) fn supervise(self, init: InitProcess) {
        let mut log = LogWriter::open(&self.args.log_dir, self.args.log_max_bytes).ok();
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
                    let _ = RunDir::new(&self.args.run_dir).write_exit(&record);
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
pub(crate) fn report(sync: BorrowedFd<'_>, report: &Report) {
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
        let ok = Report::Started {
            pid: 5,
            shim_pid: 4,
            started_at_ms: 9,
            steps: StepTimes::new(),
        };
        let v: serde_json::Value = serde_json::to_value(&ok).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"pid": 5, "shim_pid": 4, "started_at_ms": 9})
        );
        assert_eq!(serde_json::from_value::<Report>(v).unwrap(), ok);
        let v = serde_json::to_value(Report::failed("boom")).unwrap();
        assert_eq!(v, serde_json::json!({"error": "boom"}));
        // An error wins over whatever else the line holds; a line with neither is bad.
        let both = serde_json::json!({"pid": 5, "shim_pid": 4, "started_at_ms": 9, "error": "x"});
        assert_eq!(
            serde_json::from_value::<Report>(both).unwrap(),
            Report::failed("x")
        );
        assert!(serde_json::from_value::<Report>(serde_json::json!({"pid": 5})).is_err());
    }

    #[tokio::test]
    async fn the_runtime_reads_a_report_or_says_why_not() {
        let line = b"{\"pid\":5,\"shim_pid\":4,\"started_at_ms\":9}\n";
        let report = read_report(&line[..], Duration::from_secs(1), "native", "m1")
            .await
            .unwrap();
        let started = report.into_started("native", "m1").unwrap();
        assert_eq!((started.pid, started.shim_pid), (5, 4));

        let failed = read_report(
            &b"{\"error\":\"no such file\"}\n"[..],
            Duration::from_secs(1),
            "runc",
            "m1",
        )
        .await
        .unwrap()
        .into_started("runc", "m1")
        .unwrap_err();
        assert_eq!(failed.code(), "runtime_failed");
        assert_eq!(
            failed.to_string(),
            "runc could not start machine m1: no such file"
        );

        let silent = read_report(&b""[..], Duration::from_secs(1), "native", "m1").await;
        assert!(
            matches!(silent, Err(RuntimeError::Start { .. })),
            "{silent:?}"
        );
        let (_keep, never) = tokio::io::duplex(8);
        let late = read_report(never, Duration::from_millis(10), "native", "m1").await;
        assert!(
            matches!(late, Err(RuntimeError::StartTimeout { .. })),
            "{late:?}"
        );
    }
}
