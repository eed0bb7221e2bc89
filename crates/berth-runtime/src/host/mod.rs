//! What every driver does to the host, whichever runs the Machine: process helpers, the
//! run directory, create-time preparation, teardown, and the inventory the doctor reads.
//!
//! Imports flow one way: each driver (`native`, `runc`) uses this module; nothing here
//! knows a driver.

use std::sync::Arc;

use crate::error::{IoContext, RuntimeError};
use crate::network::WorkerNetwork;
use crate::quota::{DiskQuota, DiskUsage};
use crate::userns::IdRegistry;
use crate::MachineLayout;

pub mod inventory;
pub(crate) mod prepare;
pub(crate) mod process;
pub mod run_dir;
pub(crate) mod teardown;

pub use inventory::HostInventory;
pub use run_dir::RunDir;

/// How long remove waits for a killed Machine before tearing it down anyway.
pub(crate) const KILL_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// What every driver holds of the host, borrowed from its configuration: the worker's
/// Machine network, the host id registry and the disk quotas.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Host<'a> {
    pub(crate) network: Option<&'a Arc<WorkerNetwork>>,
    pub(crate) id_registry: &'a IdRegistry,
    pub(crate) disk_quota: Option<&'a DiskQuota>,
}

impl Host<'_> {
    /// `Runtime::restore_network`: pins the namespaces again and plugs the Machine in.
    pub(crate) async fn restore_network(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        crate::network::restore(self.network.map(|n| &**n), layout, self.id_registry).await
    }

    /// `Runtime::disk_usage`: the Machine's use against its quota; `None` without one.
    pub(crate) async fn disk_usage(
        &self,
        layout: &MachineLayout,
    ) -> Result<Option<DiskUsage>, RuntimeError> {
        let Some(quota) = self.disk_quota.cloned() else {
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
