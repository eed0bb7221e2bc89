//! Teardown every driver shares: the end of a run (the supervisor gone, the run directory
//! removed) and destroy (the network detached, the quota cleared, the namespaces unpinned
//! and the Machine's directory deleted).

use std::fs;
use std::io;
use std::time::Duration;

use super::process::{kill_pid, wait_process_blocking};
use super::run_dir::{read_status, signal_init, wait_for_exit, RunDir};
use super::{blocking, HostConfig, KILL_GRACE};
use crate::error::{IoContext, RuntimeError};
use crate::quota::DiskQuota;
use crate::userns::{self, IdRegistry};
use crate::{netns, overlay, MachineLayout, Status};

/// How long the end of a run waits for a supervisor to finish after its Machine was
/// killed.
const SHIM_EXIT_GRACE: Duration = Duration::from_secs(3);

/// Waits for the Machine's supervisor to finish recording the exit (killing it after
/// the grace), so nothing writes into the run directory once it is removed. Blocking.
pub(crate) fn wait_for_supervisor(run: &RunDir) -> Result<(), RuntimeError> {
    if let Some(pid) = run.live_shim()? {
        if !wait_process_blocking(pid, SHIM_EXIT_GRACE) {
            kill_pid(pid, libc::SIGKILL);
            wait_process_blocking(pid, SHIM_EXIT_GRACE);
        }
    }
    Ok(())
}

/// `Runtime::remove` for every driver: kills a running Machine, detaches its network,
/// then (blocking) the driver's own teardown, the quota and the Machine's files.
pub(crate) async fn remove<F>(
    host: &HostConfig,
    layout: &MachineLayout,
    driver_teardown: F,
) -> Result<(), RuntimeError>
where
    F: FnOnce(&MachineLayout) -> Result<(), RuntimeError> + Send + 'static,
{
    if matches!(read_status(layout).await?, Status::Running { .. }) {
        signal_init(layout, libc::SIGKILL).await?;
        wait_for_exit(layout, Some(KILL_GRACE)).await?;
    }
    // Before the namespace goes: its veth would go with it, but only some time later.
    if let Some(network) = &host.network {
        network.detach(&layout.id).await?;
    }
    let layout = layout.clone();
    let registry = host.id_registry.clone();
    let quota = host.disk_quota.clone();
    blocking(move || {
        driver_teardown(&layout)?;
        release_disk_quota(quota.as_ref(), &layout)?;
        remove_machine_dir(&layout, &registry)
    })
    .await
}

/// Clears the Machine's limit before its files go. Blocking.
fn release_disk_quota(
    quota: Option<&DiskQuota>,
    layout: &MachineLayout,
) -> Result<(), RuntimeError> {
    match quota {
        Some(quota) => quota
            .release(layout)
            .ctx(|| format!("clear the disk quota of machine {}", layout.id)),
        None => Ok(()),
    }
}

/// Destroy's last step, once nothing runs: unpins the namespaces, deletes the Machine's
/// directory, then gives its host ids back. Blocking.
fn remove_machine_dir(layout: &MachineLayout, registry: &IdRegistry) -> Result<(), RuntimeError> {
    let id = &layout.id;
    let ns = layout.netns();
    netns::remove(&ns).ctx(|| format!("remove network namespace of machine {id}"))?;
    userns::remove_pin(&layout.userns())
        .ctx(|| format!("remove the user namespace of machine {id}"))?;
    // remove_dir_all would descend into a mount and delete its contents.
    for path in [layout.rootfs(), ns, layout.userns()] {
        if overlay::is_mount_point(&path).ctx(|| format!("check {}", path.display()))? {
            return Err(RuntimeError::Internal(format!(
                "{} of machine {id} is still mounted",
                path.display()
            )));
        }
    }
    match fs::remove_dir_all(&layout.dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(RuntimeError::io(
                format!("remove {}", layout.dir.display()),
                e,
            ))
        }
        _ => {}
    }
    registry
        .release(&layout.dir)
        .ctx(|| format!("release the host ids of machine {id}"))
}
