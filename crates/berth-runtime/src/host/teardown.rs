//! Teardown every driver shares: the end of a run (the supervisor gone, the run directory
//! removed) and destroy (the network detached, the quota cleared, the namespaces unpinned
//! and the Machine's directory deleted).

use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
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
    let removed_dir = host.removed_dir.clone();
    blocking(move || {
        driver_teardown(&layout)?;
        release_disk_quota(quota.as_ref(), &layout)?;
        // Read-only snapshots refuse the unlinks of a plain removal.
        crate::checkpoint::delete_all(&layout)
            .ctx(|| format!("delete the checkpoints of machine {}", layout.id))?;
        remove_machine_dir(&layout, &registry, removed_dir.as_deref())
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
/// directory (or moves it to `removed_dir` to be deleted there), then gives its host ids
/// back. Blocking.
fn remove_machine_dir(
    layout: &MachineLayout,
    registry: &IdRegistry,
    removed_dir: Option<&Path>,
) -> Result<(), RuntimeError> {
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
    let deferred = removed_dir.is_some_and(|removed| defer_removal(&layout.dir, removed, id));
    match if deferred {
        Ok(())
    } else {
        fs::remove_dir_all(&layout.dir)
    } {
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

/// Renames `dir` into `removed` and deletes it on a thread of its own: unlinking a large
/// disk's thousands of files takes about a second per GB, which a destroy or a move's
/// answer need not wait for. False when the rename fails (another filesystem, say): the
/// caller deletes it then.
fn defer_removal(dir: &Path, removed: &Path, id: &str) -> bool {
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "{id}.{}.{}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    );
    let target = removed.join(name);
    if fs::create_dir_all(removed).is_err() || fs::rename(dir, &target).is_err() {
        return false;
    }
    let spawned = std::thread::Builder::new()
        .name("berth-remove".into())
        .spawn(move || {
            if let Err(error) = fs::remove_dir_all(&target) {
                tracing::warn!(dir = %target.display(), %error, "deleting a removed Machine's files");
            }
        });
    if let Err(error) = spawned {
        // The files stay in `removed` until the next sweep.
        tracing::warn!(%error, "no thread to delete a removed Machine's files");
    }
    true
}

/// Deletes what an earlier process left in `removed` (it died before its deleting thread
/// finished), on a thread of its own.
pub fn sweep_removed(removed: &Path) {
    let Ok(entries) = fs::read_dir(removed) else {
        return;
    };
    let leftovers: Vec<_> = entries.flatten().map(|entry| entry.path()).collect();
    if leftovers.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("berth-sweep".into())
        .spawn(move || {
            for path in leftovers {
                if let Err(error) = fs::remove_dir_all(&path) {
                    tracing::warn!(dir = %path.display(), %error, "deleting a removed Machine's files");
                }
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "no thread to delete removed Machines' files");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine_dir(root: &Path) -> std::path::PathBuf {
        let dir = root.join("machines").join("m1");
        fs::create_dir_all(dir.join("upper/a/b")).unwrap();
        fs::write(dir.join("upper/a/b/file"), vec![7u8; 1 << 20]).unwrap();
        dir
    }

    fn wait_empty(dir: &Path) -> bool {
        for _ in 0..500 {
            if fs::read_dir(dir).unwrap().next().is_none() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn a_removed_directory_is_gone_at_once_and_deleted_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = machine_dir(tmp.path());
        let removed = tmp.path().join("removed");
        assert!(defer_removal(&dir, &removed, "m1"));
        assert!(!dir.exists());
        assert!(wait_empty(&removed), "the deleting thread left files");
    }

    #[test]
    fn a_directory_that_cannot_be_renamed_is_left_to_the_caller() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = machine_dir(tmp.path());
        // A file where the directory should be: nothing can be renamed into it.
        let blocker = tmp.path().join("removed");
        fs::write(&blocker, b"").unwrap();
        assert!(!defer_removal(&dir, &blocker, "m1"));
        assert!(dir.join("upper/a/b/file").exists());
    }

    #[test]
    fn a_sweep_deletes_what_a_dead_process_left() {
        let tmp = tempfile::tempdir().unwrap();
        let removed = tmp.path().join("removed");
        fs::create_dir_all(removed.join("m1.1.0/upper")).unwrap();
        fs::write(removed.join("m1.1.0/upper/file"), b"x").unwrap();
        sweep_removed(&removed);
        assert!(wait_empty(&removed));
    }
}
