//! [`Runtime`] over gVisor's `runsc`: each Machine runs on a kernel in user space (the
//! Sentry), which answers every system call itself; the host kernel sees the sandbox
//! process, its gofer (the file proxy) and, on the ptrace platform, one stub process per
//! address space.
//!
//! The create-time layout is the other drivers': the overlay rootfs (mounted idmapped on
//! the host at start, served to the sandbox by the gofer), the persistent network
//! namespace (runsc's netstack takes over the Machine's veth inside it), the cgroups
//! runsc makes from `config.json` (memory, CPU and pids limits on the sandbox's host
//! processes). The flags ([`GvisorConfig::global_args`]):
//! - `--platform=ptrace`: no usable KVM on the hosts Berth runs on;
//! - `--network=sandbox`: gVisor's own network stack, in the Machine's netns;
//! - `--oci-seccomp`: `config.json`'s seccomp profile applies inside the sandbox too.
//!
//! Start, signal, wait, status and recovery after an agent restart go through the shim
//! and run directory every driver shares: the shim runs `runsc create` and `runsc start`
//! (or `runsc restore`), and "init" in the run directory is the sandbox process, which
//! exits with the status of the Machine's init. Signals other than SIGKILL are forwarded
//! by the sandbox to the Machine's PID 1, Berth's init; SIGKILL ends the sandbox.
//!
//! Suspend is `runsc checkpoint` into a memory image ([`image`]), resume is `runsc
//! restore` from it.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::error::{IoContext, RuntimeError};
use crate::host::{blocking, HostConfig, HostInventory};
use crate::oci::shim::Flavor;
use crate::oci::{init::InitPassing, OciCli};
use crate::timing::{micros, StepTimes};
use crate::{logs, machine_init};
use crate::{BundleSpec, MachineLayout, Runtime, Started, Status};

pub mod image;

#[derive(Debug, Clone)]
pub struct GvisorConfig {
    pub runsc_binary: PathBuf,
    /// runsc's `--root`: where it keeps sandbox state. One per worker.
    pub runsc_root: PathBuf,
    /// The host copy of the Machines' init that `config.json` bind-mounts (read-only).
    /// Written when the runtime is made.
    pub init_path: PathBuf,
    /// Where runsc writes its debug logs (`--debug --debug-log=<dir>/`); off when `None`.
    pub debug_log_dir: Option<PathBuf>,
    /// Program and leading arguments that run the shim, as for runc.
    pub shim_command: Vec<OsString>,
    /// Cap of `output.log` before it rotates.
    pub log_max_bytes: u64,
    /// How long start waits for the shim's report.
    pub start_timeout: Duration,
    /// The network, id registry and disk quotas.
    pub host: HostConfig,
}

impl GvisorConfig {
    /// Defaults for everything but the shim.
    pub fn new(shim_command: Vec<OsString>) -> GvisorConfig {
        GvisorConfig {
            runsc_binary: PathBuf::from("runsc"),
            runsc_root: PathBuf::from("/run/berth/runsc"),
            init_path: PathBuf::from("/run/berth/gvisor-init/berth-init"),
            debug_log_dir: None,
            shim_command,
            log_max_bytes: logs::DEFAULT_MAX_BYTES,
            start_timeout: Duration::from_secs(30),
            host: HostConfig::default(),
        }
    }

    /// The flags every runsc call gets after `--root` (see the module's doc).
    pub fn global_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = ["--platform=ptrace", "--network=sandbox", "--oci-seccomp"]
            .map(OsString::from)
            .to_vec();
        if let Some(dir) = &self.debug_log_dir {
            args.push("--debug".into());
            let mut flag = OsString::from("--debug-log=");
            flag.push(dir.as_os_str());
            flag.push("/");
            args.push(flag);
        }
        args
    }
}

#[derive(Debug, Clone)]
pub struct GvisorRuntime {
    config: GvisorConfig,
    cli: OciCli,
}

impl GvisorRuntime {
    /// Writes the host copy of init and makes runsc's root.
    pub fn new(config: GvisorConfig) -> Result<GvisorRuntime, RuntimeError> {
        machine_init::install_file(&config.init_path)
            .ctx(|| format!("write berth-init to {}", config.init_path.display()))?;
        std::fs::create_dir_all(&config.runsc_root)
            .ctx(|| format!("create {}", config.runsc_root.display()))?;
        if let Some(dir) = &config.debug_log_dir {
            std::fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
        }
        let cli = OciCli {
            driver: "gvisor",
            flavor: Flavor::Runsc,
            binary: config.runsc_binary.clone(),
            root: config.runsc_root.clone(),
            global_args: config.global_args(),
            init: InitPassing::Mounted(config.init_path.clone()),
            shim_command: config.shim_command.clone(),
            log_max_bytes: config.log_max_bytes,
            start_timeout: config.start_timeout,
            host: config.host.clone(),
        };
        Ok(GvisorRuntime { config, cli })
    }

    pub fn config(&self) -> &GvisorConfig {
        &self.config
    }

    /// Sandboxes runsc keeps state for under its root: `<id>_sandbox:<id>.state`.
    fn sandboxes(&self) -> BTreeSet<String> {
        let Ok(entries) = std::fs::read_dir(&self.config.runsc_root) else {
            return BTreeSet::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.split_once("_sandbox:").map(|(id, _)| id.to_owned())
            })
            .collect()
    }

    /// Suspend's host work, blocking: checkpoint into a `.partial` directory, seal it
    /// into place, then end the run.
    fn checkpoint(&self, layout: &MachineLayout, image_dir: &Path) -> Result<(), RuntimeError> {
        let id = &layout.id;
        let partial =
            image::begin(image_dir).ctx(|| format!("make the memory image of machine {id}"))?;
        let t0 = Instant::now();
        let out = self
            .cli
            .command()
            .arg("checkpoint")
            .arg("--image-path")
            .arg(&partial)
            .arg(id)
            .output()
            .ctx(|| format!("run {} checkpoint", self.config.runsc_binary.display()));
        let checkpointed = match out {
            Ok(out) if out.status.success() => Ok(()),
            // netstack's own refusal: it saves no connected endpoint (this runsc has no
            // way to drop them on save).
            Ok(out)
                if String::from_utf8_lossy(&out.stderr)
                    .contains("cannot be saved in connected state") =>
            {
                Err(RuntimeError::ConnectionsOpen {
                    driver: "gvisor",
                    id: id.clone(),
                })
            }
            Ok(out) => Err(RuntimeError::Checkpoint {
                driver: "gvisor",
                id: id.clone(),
                message: format!(
                    "runsc checkpoint: {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            }),
            Err(e) => Err(e),
        };
        if let Err(e) = checkpointed {
            let _ = image::discard(&partial);
            return Err(e);
        }
        let checkpoint_us = micros(t0.elapsed());
        let sealed = image::seal(&partial, image_dir)
            .ctx(|| format!("seal the memory image of machine {id}"));
        if sealed.is_err() {
            let _ = image::discard(&partial);
        }
        // The sandbox exits once checkpointed; whatever happened to the image, the run
        // is over.
        let ended = self.cli.end_run(layout);
        tracing::debug!(machine = %id, checkpoint_us, total_us = micros(t0.elapsed()), "machine suspended");
        sealed.and(ended)
    }
}

impl GvisorRuntime {
    /// The Machine's TCP endpoints that are neither listening nor closed, as its init
    /// counts them from inside the sandbox; `None` when it could not tell.
    async fn open_connections(&self, layout: &MachineLayout) -> Option<usize> {
        let spec = crate::exec::ExecSpec {
            cmd: vec![machine_init::GVISOR_INIT.into(), "--tcp-connections".into()],
            stdin: None,
            timeout: Duration::from_secs(10),
            max_output_bytes: 64,
        };
        match self.cli.exec(layout, &spec).await {
            Ok(out) if out.exit_code == Some(0) => {
                String::from_utf8_lossy(&out.stdout).trim().parse().ok()
            }
            Ok(out) => {
                tracing::warn!(machine = %layout.id, code = ?out.exit_code,
                    stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                    "counting the machine's connections failed");
                None
            }
            Err(e) => {
                tracing::warn!(machine = %layout.id, error = %e, "counting the machine's connections failed");
                None
            }
        }
    }
}

#[async_trait]
impl Runtime for GvisorRuntime {
    fn name(&self) -> &'static str {
        "gvisor"
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

    /// The shared inventory, with the sandboxes in runsc's root.
    async fn host_inventory(
        &self,
        machines_root: &Path,
        known: &BTreeSet<String>,
    ) -> Result<HostInventory, RuntimeError> {
        let sandboxes = self.sandboxes();
        let mut known = known.clone();
        known.extend(sandboxes.iter().cloned());
        let mut inventory = HostInventory::list(machines_root, &known, None).await?;
        inventory.containers = sandboxes;
        Ok(inventory)
    }

    fn can_suspend(&self) -> bool {
        true
    }

    async fn suspend(&self, layout: &MachineLayout, image_dir: &Path) -> Result<(), RuntimeError> {
        if !matches!(self.status(layout).await?, Status::Running { .. }) {
            return Err(RuntimeError::NotRunning {
                id: layout.id.clone(),
            });
        }
        // netstack saves no connected endpoint and the sandbox ends in the attempt: asked
        // first, a Machine holding one keeps running. One opened after the question still
        // fails the checkpoint below, as before.
        if self.open_connections(layout).await.is_some_and(|n| n > 0) {
            return Err(RuntimeError::ConnectionsOpen {
                driver: "gvisor",
                id: layout.id.clone(),
            });
        }
        let this = self.clone();
        let layout = layout.clone();
        let image_dir = image_dir.to_path_buf();
        blocking(move || this.checkpoint(&layout, &image_dir)).await
    }

    async fn resume(
        &self,
        layout: &MachineLayout,
        lowerdirs: &[PathBuf],
        image_dir: &Path,
    ) -> Result<Started, RuntimeError> {
        let t0 = Instant::now();
        let id = layout.id.clone();
        let checked = {
            let image_dir = image_dir.to_path_buf();
            blocking(move || Ok(image::verify(&image_dir))).await?
        };
        if let Err(message) = checked {
            return Err(RuntimeError::MemoryImage {
                id,
                path: image_dir.to_path_buf(),
                message,
            });
        }
        let verify_us = micros(t0.elapsed());
        let mut started = self.cli.start(layout, lowerdirs, Some(image_dir)).await?;
        // The Machine runs on from here: the image is stale, and a second resume from it
        // would fork the Machine's past.
        let discarded = {
            let image_dir = image_dir.to_path_buf();
            blocking(move || {
                image::discard(&image_dir).ctx(|| "discard a resumed memory image".into())
            })
            .await
        };
        if let Err(error) = discarded {
            tracing::warn!(machine = %layout.id, %error, "the resumed Machine's memory image stays");
        }
        let mut steps = StepTimes::new();
        steps.record("image_verify", verify_us);
        steps.append(std::mem::take(&mut started.steps));
        started.steps = steps;
        Ok(started)
    }

    fn host_config(&self) -> Option<&HostConfig> {
        Some(&self.config.host)
    }
}
