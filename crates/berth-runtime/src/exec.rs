//! Running a command inside a running Machine (`runc exec`, or the native driver's
//! `berth shim nsexec`): its namespaces, its cgroups, the user and environment of its
//! spec. Output is capped; a timeout kills the process, through a pidfd.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use rustix::pipe::PipeFlags;

use crate::error::{IoContext, RuntimeError};
use crate::native::exec_in::{self, NsexecArgs, Outcome};
use crate::{shim, util, MachineLayout};

/// How long output is still read after the process ended: a background child of the
/// command may hold the pipes open forever.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);
/// How long runc gets to report after the process was killed, and how long past the
/// timeout the native helper may take before the agent kills it.
const KILL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    pub cmd: Vec<String>,
    pub stdin: Option<Vec<u8>>,
    pub timeout: Duration,
    /// Cap of stdout and of stderr, each.
    pub max_output_bytes: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// `None` when the process was killed for its timeout.
    pub exit_code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub truncated: bool,
    pub timed_out: bool,
}

/// Output kept up to a cap; the rest is read and dropped so the process never blocks.
#[derive(Debug, Default)]
pub struct CappedBuffer {
    pub data: Vec<u8>,
    pub truncated: bool,
}

impl CappedBuffer {
    pub fn push(&mut self, chunk: &[u8], cap: usize) {
        let room = cap.saturating_sub(self.data.len());
        if chunk.len() > room {
            self.truncated = true;
        }
        self.data.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
}

fn unique_suffix() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

async fn pump(mut source: impl AsyncRead + Unpin, sink: Arc<Mutex<CappedBuffer>>, cap: usize) {
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match source.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => {
                if let Ok(mut sink) = sink.lock() {
                    sink.push(&chunk[..read], cap);
                }
            }
        }
    }
}

fn take(buffer: &Arc<Mutex<CappedBuffer>>) -> (Vec<u8>, bool) {
    match buffer.lock() {
        Ok(mut buffer) => (std::mem::take(&mut buffer.data), buffer.truncated),
        Err(_) => (Vec::new(), false),
    }
}

/// `runc exec --pid-file <run>/exec-N.pid <id> <cmd...>`.
///
/// runc cannot forward SIGKILL, so on timeout Berth kills the process runc started. Its
/// pid comes from the pid file runc writes in the Machine's run directory, on the host
/// (no Machine can reach it); even so the pid is only signalled through a pidfd opened
/// first and checked to be runc's child in the Machine's pid namespace.
pub(crate) async fn runc_exec(
    runc_binary: &Path,
    runc_root: &Path,
    layout: &MachineLayout,
    spec: &ExecSpec,
) -> Result<ExecOutput, RuntimeError> {
    let id = &layout.id;
    if spec.cmd.is_empty() {
        return Err(RuntimeError::InvalidSpec {
            id: id.clone(),
            message: "exec needs a command".into(),
        });
    }
    let pid_file = exec_pid_file(layout);
    let mut command = tokio::process::Command::new(runc_binary);
    command
        .arg("--root")
        .arg(runc_root)
        .arg("exec")
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(id)
        .args(&spec.cmd);
    let mut running = Running::spawn(command, layout, spec, runc_binary)?;
    let result = match tokio::time::timeout(spec.timeout, running.child.wait()).await {
        Ok(status) => status
            .ctx(|| format!("wait for exec in machine {id}"))
            .map(|status| (status.code(), false)),
        Err(_) => {
            let runc_pid = running.child.id();
            let target = runc_pid.and_then(|runc| runc_exec_process(&pid_file, runc, layout));
            // runc reaps the killed process and exits; if it does not, or the process
            // could not be told apart, kill runc.
            let reported = match &target {
                Some(target) => {
                    let _ =
                        rustix::process::pidfd_send_signal(target, rustix::process::Signal::Kill);
                    tokio::time::timeout(KILL_WAIT, running.child.wait())
                        .await
                        .is_ok()
                }
                None => false,
            };
            if !reported {
                let _ = running.child.start_kill();
                let _ = running.child.wait().await;
            }
            Ok((None, true))
        }
    };
    let _ = util::remove_file_if_exists(&pid_file);
    let (exit_code, timed_out) = result?;
    Ok(running.finish(exit_code, timed_out).await)
}

/// A fresh pid file name in the Machine's run directory.
fn exec_pid_file(layout: &MachineLayout) -> std::path::PathBuf {
    layout.run_dir().join(format!(
        "exec-{}-{}.pid",
        std::process::id(),
        unique_suffix()
    ))
}

/// A pidfd on the process `runc exec` (pid `runc`) started, if one is found that is
/// runc's child in the Machine's pid namespace; `None` when anything is off. The pid file
/// is only a hint: its pid is checked like the rest, and runc's own children list is the
/// fallback, so a wrong pid there (which only the host could write) is never signalled.
fn runc_exec_process(pid_file: &Path, runc: u32, layout: &MachineLayout) -> Option<OwnedFd> {
    let machine = machine_pid_namespace(layout)?;
    let hinted = shim::read_pid_file(pid_file).ok().flatten();
    hinted
        .into_iter()
        .chain(children(runc))
        .find_map(|pid| checked_child(pid, runc, machine))
}

/// A pidfd on `pid` if it is a live child of `parent` in the pid namespace `ns`.
fn checked_child(pid: u32, parent: u32, ns: (u64, u64)) -> Option<OwnedFd> {
    let fd = crate::runc::pidfd_open(pid).ok()??;
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
fn machine_pid_namespace(layout: &MachineLayout) -> Option<(u64, u64)> {
    let run = layout.run_dir();
    let shim_pid = crate::runc::live_shim(&run).ok()??;
    let init = shim::read_pid_file(&run.join(shim::INIT_PID_FILE)).ok()??;
    let fd = crate::runc::pidfd_open(init).ok()??;
    let stat = util::proc_stat(init).ok()??;
    let ns = pid_namespace(init)?;
    (stat.ppid == shim_pid && stat.state != 'Z' && !exited(&fd)).then_some(ns)
}

fn pid_namespace(pid: u32) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(format!("/proc/{pid}/ns/pid")).ok()?;
    Some((meta.dev(), meta.ino()))
}

/// True once the pidfd's process has exited (or the pidfd cannot be polled).
fn exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(
        pidfd,
        rustix::event::PollFlags::IN,
    )];
    !matches!(rustix::event::poll(&mut fds, 0), Ok(0))
}

/// The descriptor `berth shim nsexec` writes its status line to.
const NSEXEC_STATUS_FD: RawFd = 3;

/// `berth shim nsexec`: the helper enforces the timeout itself (a pidfd on its child)
/// and says how the command ended on a status pipe. Should it hang anyway, the agent
/// kills the helper it spawned, and its child goes with it (parent-death signal).
pub(crate) async fn nsexec(
    mut command: tokio::process::Command,
    mut args: NsexecArgs,
    layout: &MachineLayout,
    spec: &ExecSpec,
    program: &Path,
) -> Result<ExecOutput, RuntimeError> {
    let id = &layout.id;
    let (status_r, status_w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)
        .map_err(std::io::Error::from)
        .ctx(|| format!("status pipe for exec in machine {id}"))?;
    args.status_fd = NSEXEC_STATUS_FD;
    args.timeout = spec.timeout;
    command.args(args.to_args());
    let raw = status_w.as_raw_fd();
    // SAFETY: the hook runs between fork and exec and only calls dup2 or fcntl, which are
    // async-signal-safe; `raw` stays open until after spawn returns.
    unsafe {
        command.pre_exec(move || exec_in::inherit_as(raw, NSEXEC_STATUS_FD));
    }
    let mut running = Running::spawn(command, layout, spec, program)?;
    drop(status_w);
    let waited = tokio::time::timeout(spec.timeout + KILL_WAIT, running.child.wait()).await;
    let (exit_code, timed_out) = match waited {
        Ok(status) => {
            let status = status.ctx(|| format!("wait for exec in machine {id}"))?;
            match read_status(&status_r) {
                Some(Outcome::TimedOut) => (None, true),
                Some(Outcome::Exited(code)) => (Some(code), false),
                Some(Outcome::Signaled(signal)) => (Some(128 + signal), false),
                // The helper failed before the command ran (its message is on stderr).
                None => (status.code(), false),
            }
        }
        Err(_) => {
            let _ = running.child.start_kill();
            let _ = running.child.wait().await;
            (None, true)
        }
    };
    Ok(running.finish(exit_code, timed_out).await)
}

/// The helper's status line, once it has exited (so nothing more will come).
fn read_status(pipe: &OwnedFd) -> Option<Outcome> {
    let mut buf = [0u8; 64];
    let n = rustix::io::read(pipe, &mut buf).ok()?;
    Outcome::parse(std::str::from_utf8(&buf[..n]).ok()?)
}

/// An exec helper with its output being read into capped buffers.
struct Running {
    child: tokio::process::Child,
    readers: Vec<tokio::task::JoinHandle<()>>,
    stdout: Arc<Mutex<CappedBuffer>>,
    stderr: Arc<Mutex<CappedBuffer>>,
}

impl Running {
    fn spawn(
        mut command: tokio::process::Command,
        layout: &MachineLayout,
        spec: &ExecSpec,
        program: &Path,
    ) -> Result<Running, RuntimeError> {
        let id = &layout.id;
        command
            .stdin(if spec.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .ctx(|| format!("run {} exec in machine {id}", program.display()))?;
        if let (Some(mut pipe), Some(input)) = (child.stdin.take(), spec.stdin.clone()) {
            // A command that never reads its stdin must not block the exec.
            tokio::spawn(async move {
                let _ = pipe.write_all(&input).await;
            });
        }
        let stdout = Arc::new(Mutex::new(CappedBuffer::default()));
        let stderr = Arc::new(Mutex::new(CappedBuffer::default()));
        let mut readers = Vec::new();
        if let Some(pipe) = child.stdout.take() {
            readers.push(tokio::spawn(pump(
                pipe,
                stdout.clone(),
                spec.max_output_bytes,
            )));
        }
        if let Some(pipe) = child.stderr.take() {
            readers.push(tokio::spawn(pump(
                pipe,
                stderr.clone(),
                spec.max_output_bytes,
            )));
        }
        Ok(Running {
            child,
            readers,
            stdout,
            stderr,
        })
    }

    async fn finish(self, exit_code: Option<i32>, timed_out: bool) -> ExecOutput {
        for reader in self.readers {
            let abort = reader.abort_handle();
            if tokio::time::timeout(DRAIN_AFTER_EXIT, reader)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        let (stdout, stdout_cut) = take(&self.stdout);
        let (stderr, stderr_cut) = take(&self.stderr);
        ExecOutput {
            exit_code,
            stdout,
            stderr,
            truncated: stdout_cut || stderr_cut,
            timed_out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_output_and_says_so() {
        let mut buffer = CappedBuffer::default();
        buffer.push(b"hello ", 8);
        assert!(!buffer.truncated);
        buffer.push(b"world", 8);
        assert_eq!(buffer.data, b"hello wo");
        assert!(buffer.truncated);
    }
}
