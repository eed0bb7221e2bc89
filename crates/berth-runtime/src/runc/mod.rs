//! [`Runtime`] over real runc, an overlayfs rootfs and a persistent network namespace,
//! through the shim, exec guard and start preparation it shares with the gVisor driver
//! ([`crate::oci`]).
//!
//! All state lives in files: runc's state under `runc_root`, the shim's pid and the exit
//! record under the Machine's `run/`. A new `RuncRuntime` (after an agent restart) can
//! therefore signal, wait for and clean up Machines started by an earlier one.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::RuntimeError;
use crate::host::{HostConfig, HostInventory};
use crate::logs;
use crate::oci::shim::Flavor;
use crate::oci::{init::InitPassing, OciCli};
use crate::{BundleSpec, MachineLayout, Runtime, Started};

#[derive(Debug, Clone)]
pub struct RuncConfig {
    pub runc_binary: PathBuf,
    /// runc's `--root`: where it keeps container state.
    pub runc_root: PathBuf,
    /// Program and leading arguments that run the shim, e.g. `[".../berth-shim"]` or
    /// `[".../berth", "shim"]`.
    pub shim_command: Vec<OsString>,
    /// Cap of `output.log` before it rotates.
    pub log_max_bytes: u64,
    /// How long start waits for the shim's report.
    pub start_timeout: Duration,
    /// The network, id registry and disk quotas.
    pub host: HostConfig,
}

impl RuncConfig {
    /// Defaults for everything but the shim.
    pub fn new(shim_command: Vec<OsString>) -> RuncConfig {
        RuncConfig {
            runc_binary: PathBuf::from("runc"),
            runc_root: PathBuf::from("/run/berth/runc"),
            shim_command,
            log_max_bytes: logs::DEFAULT_MAX_BYTES,
            start_timeout: Duration::from_secs(30),
            host: HostConfig::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RuncRuntime {
    config: RuncConfig,
    cli: OciCli,
}

impl RuncRuntime {
    pub fn new(config: RuncConfig) -> RuncRuntime {
        let cli = OciCli {
            driver: "runc",
            flavor: Flavor::Runc,
            binary: config.runc_binary.clone(),
            root: config.runc_root.clone(),
            global_args: Vec::new(),
            init: InitPassing::Fd3,
            shim_command: config.shim_command.clone(),
            log_max_bytes: config.log_max_bytes,
            start_timeout: config.start_timeout,
            host: config.host.clone(),
        };
        RuncRuntime { config, cli }
    }

    pub fn config(&self) -> &RuncConfig {
        &self.config
    }
}

#[async_trait]
impl Runtime for RuncRuntime {
    fn name(&self) -> &'static str {
        "runc"
    }

    async fn freeze(&self, layout: &MachineLayout, frozen: bool) -> Result<(), RuntimeError> {
        let cli = self.cli.clone();
        let id = layout.id.clone();
        crate::host::blocking(move || cli.freeze(&id, frozen)).await
    }

    async fn prepare(&self, layout: &MachineLayout, spec: &BundleSpec) -> Result<(), RuntimeError> {
        self.cli.prepare(layout, spec).await
    }

    async fn start(
        &self,
        layout: &MachineLayout,
        lowerdirs: &[PathBuf],
    ) -> Result<Started, RuntimeError> {
        self.cli.start(layout, lowerdirs, None).await
    }

    async fn cleanup(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        self.cli.cleanup(layout).await
    }

    async fn remove(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        self.cli.remove(layout).await
    }

    async fn exec(
        &self,
        layout: &MachineLayout,
        spec: &crate::exec::ExecSpec,
    ) -> Result<crate::exec::ExecOutput, RuntimeError> {
        self.cli.exec(layout, spec).await
    }

    /// The shared inventory, with the containers in runc's state dir.
    async fn host_inventory(
        &self,
        machines_root: &Path,
        known: &BTreeSet<String>,
    ) -> Result<HostInventory, RuntimeError> {
        HostInventory::list(machines_root, known, Some(&self.config.runc_root)).await
    }

    fn host_config(&self) -> Option<&HostConfig> {
        Some(&self.config.host)
    }
}
