//! Running a command inside a running Machine (`runc exec`): its namespaces, its cgroups,
//! the user and environment of its spec. Output is capped; a timeout kills the process.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::error::{IoContext, RuntimeError};
use crate::{shim, util, MachineLayout};

/// How long output is still read after the process ended: a background child of the
/// command may hold the pipes open forever.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);
/// How long runc gets to report after the process was killed.
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
    run_exec(command, &pid_file, layout, spec, runc_binary).await
}

/// A fresh pid file name in the Machine's run directory.
pub(crate) fn exec_pid_file(layout: &MachineLayout) -> std::path::PathBuf {
    layout.run_dir().join(format!(
        "exec-{}-{}.pid",
        std::process::id(),
        unique_suffix()
    ))
}

/// Runs an exec command that writes the pid of the process inside the Machine to
/// `pid_file`, with its output capped and its run time bounded.
pub(crate) async fn run_exec(
    mut command: tokio::process::Command,
    pid_file: &Path,
    layout: &MachineLayout,
    spec: &ExecSpec,
    program: &Path,
) -> Result<ExecOutput, RuntimeError> {
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
    let (exit_code, timed_out) = match tokio::time::timeout(spec.timeout, child.wait()).await {
        Ok(status) => {
            let status = status.ctx(|| format!("wait for exec in machine {id}"))?;
            (status.code(), false)
        }
        Err(_) => {
            // SIGKILL cannot be forwarded by runc: kill the process itself, inside the
            // Machine, then runc, which reaps it and exits.
            if let Ok(Some(pid)) = shim::read_pid_file(pid_file) {
                crate::runc::kill_pid(pid, libc::SIGKILL);
            }
            if tokio::time::timeout(KILL_WAIT, child.wait()).await.is_err() {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
            (None, true)
        }
    };
    for reader in readers {
        let abort = reader.abort_handle();
        if tokio::time::timeout(DRAIN_AFTER_EXIT, reader)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    let _ = util::remove_file_if_exists(pid_file);
    let (stdout, stdout_cut) = take(&stdout);
    let (stderr, stderr_cut) = take(&stderr);
    Ok(ExecOutput {
        exit_code,
        stdout,
        stderr,
        truncated: stdout_cut || stderr_cut,
        timed_out,
    })
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
