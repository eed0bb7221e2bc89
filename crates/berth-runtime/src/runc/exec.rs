//! The runtime's side of an exec in a runc Machine: `berth shim exec-guard ... -- runc
//! exec --pid-file <run>/exec-N.pid <id> <cmd...>`.
//!
//! runc cannot forward SIGKILL, and a `runc exec` that dies leaves its command running,
//! so the guard ([`super::exec_guard`]) runs runc, enforces the timeout by killing the
//! process runc started (through a pidfd, checked to be runc's child in the Machine's pid
//! namespace), and kills both when the agent dies.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::exec_guard::GuardArgs;
use crate::error::RuntimeError;
use crate::exec::{run_helper, ExecOutput, ExecSpec};
use crate::{helper, util, MachineLayout};

pub(crate) async fn runc_exec(
    shim_command: &[OsString],
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
    let Some((program, leading)) = shim_command.split_first() else {
        return Err(RuntimeError::Internal("shim command is empty".into()));
    };
    let pid_file = exec_pid_file(layout);
    let mut runc: Vec<OsString> = vec![
        runc_binary.into(),
        "--root".into(),
        runc_root.into(),
        "exec".into(),
        "--pid-file".into(),
        pid_file.clone().into(),
        id.into(),
    ];
    runc.extend(spec.cmd.iter().map(OsString::from));
    let args = GuardArgs {
        timeout: spec.timeout,
        status_fd: helper::STATUS_FD,
        pid_file: pid_file.clone(),
        run_dir: layout.run_dir(),
        runc,
    };
    let mut command = tokio::process::Command::new(program);
    command.args(leading);
    let output = run_helper(command, args.to_args(), layout, spec, Path::new(program)).await;
    // The guard removes it; this is for a guard that did not get to.
    let _ = util::remove_file_if_exists(&pid_file);
    output
}

/// A fresh pid file name in the Machine's run directory.
fn exec_pid_file(layout: &MachineLayout) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    layout.run_dir().join(format!(
        "exec-{}-{}.pid",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}
