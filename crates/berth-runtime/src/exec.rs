//! Running a command inside a running Machine: its namespaces, its cgroups, the user and
//! environment of its spec, through an exec helper each driver names (`runc exec` under
//! `berth shim exec-guard`, or the native driver's `berth shim nsexec`). Output is capped;
//! the helper kills the process through a pidfd at the timeout, or when the agent dies.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use rustix::pipe::PipeFlags;

use crate::error::{IoContext, RuntimeError};
use crate::helper::{self, Outcome};
use crate::MachineLayout;

/// How long output is still read after the process ended: a background child of the
/// command may hold the pipes open forever.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);
/// How long past the timeout a helper may take before the agent kills it.
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

/// Runs an exec helper (`command` with `args`, which name [`helper::STATUS_FD`] as the
/// status descriptor and the spec's timeout): the helper enforces the timeout itself and
/// says how the command ended on a status pipe. Should it hang anyway, the agent kills
/// the helper it spawned, and runc or the command goes with it (parent-death signal).
pub(crate) async fn run_helper(
    mut command: tokio::process::Command,
    args: Vec<OsString>,
    layout: &MachineLayout,
    spec: &ExecSpec,
    program: &Path,
) -> Result<ExecOutput, RuntimeError> {
    let id = &layout.id;
    let (status_r, status_w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)
        .map_err(std::io::Error::from)
        .ctx(|| format!("status pipe for exec in machine {id}"))?;
    command.args(args);
    let raw = status_w.as_raw_fd();
    // SAFETY: the hook runs between fork and exec and only calls dup2 or fcntl, which are
    // async-signal-safe; `raw` stays open until after spawn returns.
    unsafe {
        command.pre_exec(move || helper::inherit_as(raw, helper::STATUS_FD));
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
