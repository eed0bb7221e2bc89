//! What every driver does to the host, whichever runs the Machine: process helpers, the
//! run directory, create-time preparation, teardown, and the inventory the doctor reads.
//!
//! Imports flow one way: each driver (`native`, `runc`) uses this module; nothing here
//! knows a driver.

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{IoContext, RuntimeError};
use crate::network::WorkerNetwork;
use crate::quota::{DiskQuota, DiskUsage};
use crate::userns::IdRegistry;
use crate::MachineLayout;

pub mod cgroup;
pub mod inventory;
pub(crate) mod prepare;
pub(crate) mod process;
pub mod procs;
pub mod run_dir;
pub(crate) mod teardown;

pub use inventory::HostInventory;
pub use run_dir::RunDir;
pub use teardown::sweep_removed;

/// How long remove waits for a killed Machine before tearing it down anyway.
pub(crate) const KILL_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The host parts every driver is configured with.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The worker's Machine network. Without one, Machines get only loopback, and a spec
    /// with a `private_ip` is refused.
    pub network: Option<Arc<WorkerNetwork>>,
    /// Where Machines' host id ranges are claimed (host-wide).
    pub id_registry: IdRegistry,
    /// Per-Machine disk quotas on the Machines' filesystem; `None` enforces none.
    pub disk_quota: Option<DiskQuota>,
    /// Where a removed Machine's directory is renamed to be deleted in the background,
    /// on the Machines' filesystem; `None` deletes it before `remove` returns.
    pub removed_dir: Option<PathBuf>,
}

impl Default for HostConfig {
    /// No network, no quotas, the default id registry.
    fn default() -> HostConfig {
        HostConfig {
            network: None,
            id_registry: IdRegistry::new(crate::userns::DEFAULT_REGISTRY),
            disk_quota: None,
            removed_dir: None,
        }
    }
}

impl HostConfig {
    /// `Runtime::restore_network`: pins the namespaces again and plugs the Machine in.
    pub(crate) async fn restore_network(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        crate::network::restore(self.network.as_deref(), layout, &self.id_registry).await
    }

    /// `Runtime::disk_usage`: the Machine's use against its quota; `None` without one.
    pub(crate) async fn disk_usage(
        &self,
        layout: &MachineLayout,
    ) -> Result<Option<DiskUsage>, RuntimeError> {
        let Some(quota) = self.disk_quota.clone() else {
            return Ok(None);
        };
        let layout = layout.clone();
        blocking(move || {
            quota
                .usage(&layout)
                .ctx(|| format!("disk usage of machine {}", layout.id))
        })
        .await
    }
}

/// A start's result, once `abort` has torn down what a failed start left behind (the
/// start's error is what matters, so the teardown's own is not).
pub(crate) async fn settle_start<T>(
    result: Result<T, RuntimeError>,
    abort: impl std::future::Future<Output = ()>,
) -> Result<T, RuntimeError> {
    if result.is_err() {
        abort.await;
    }
    result
}

/// Runs blocking host work (files, mounts, namespaces) off the async threads.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, RuntimeError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, RuntimeError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RuntimeError::Internal(format!("blocking task failed: {e}")))?
}
