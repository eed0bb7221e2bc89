//! The runtime's side of an exec in a runc or gVisor Machine: `berth shim exec-guard ...
//! -- <program> exec --pid-file <run>/exec-N.pid <id> <cmd...>`.
//!
//! Neither program can forward SIGKILL, and an `exec` that dies leaves its command
//! running, so the guard ([`super::exec_guard`]) runs the program, enforces the timeout by
//! killing the command itself (runc: through a pidfd on the process runc started, checked
//! to be runc's child in the Machine's pid namespace; runsc: with `runsc kill --pid` of
//! the sandbox pid `--internal-pid-file` wrote), and kills both when the agent dies.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::exec_guard::{GuardArgs, PID_PLACEHOLDER};
use super::shim::Flavor;
use super::OciCli;
use crate::error::RuntimeError;
use crate::exec::{run_helper, ExecOutput, ExecSpec};
use crate::{helper, util, MachineLayout};

pub(crate) async fn oci_exec(
    cli: &OciCli,
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
    let Some((program, leading)) = cli.shim_command.split_first() else {
        return Err(RuntimeError::Internal("shim command is empty".into()));
    };
    let pid_file = exec_pid_file(layout);
    let global = || {
        let mut args: Vec<OsString> = vec![
            cli.binary.clone().into(),
            "--root".into(),
            cli.root.clone().into(),
        ];
        args.extend(cli.global_args.iter().cloned());
        args
    };
    let mut runc = global();
    runc.push("exec".into());
    let sandbox_kill = match cli.flavor {
        Flavor::Runc => {
            runc.push("--pid-file".into());
            Vec::new()
        }
        Flavor::Runsc => {
            runc.push("--internal-pid-file".into());
            let mut kill = global();
            kill.extend(["kill", "--pid", PID_PLACEHOLDER, id, "KILL"].map(OsString::from));
            kill
        }
    };
    runc.push(pid_file.clone().into());
    runc.push(id.into());
    runc.extend(spec.cmd.iter().map(OsString::from));
    let args = GuardArgs {
        timeout: spec.timeout,
        status_fd: helper::STATUS_FD,
        pid_file: pid_file.clone(),
        run_dir: layout.run_dir(),
        runc,
        sandbox_kill,
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
