//! [`Runtime`] over real runc, an overlayfs rootfs and a persistent network namespace.
//!
//! All state lives in files: runc's state under `runc_root`, the shim's pid and the exit
//! record under the Machine's `run/`. A new `RuncRuntime` (after an agent restart) can
//! therefore signal, wait for and clean up Machines started by an earlier one.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use self::shim::ShimArgs;

use crate::error::{IoContext, RuntimeError};
use crate::host::process::kill_group;
use crate::host::run_dir::RunDir;
use crate::host::HostInventory;
use crate::host::{self, blocking, prepare, teardown, HostConfig};
use crate::network;
use crate::supervisor;
use crate::timing::{micros, StepTimes};
use crate::{logs, overlay};
use crate::{BundleSpec, MachineLayout, Runtime, Started};

mod exec;
pub(crate) mod exec_guard;
mod init;
pub(crate) mod shim;

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
}

impl RuncRuntime {
    pub fn new(config: RuncConfig) -> RuncRuntime {
        RuncRuntime { config }
    }

    pub fn config(&self) -> &RuncConfig {
        &self.config
    }

    fn shim_args(&self, layout: &MachineLayout) -> ShimArgs {
        ShimArgs {
            id: layout.id.clone(),
            bundle: layout.bundle(),
            runc_binary: self.config.runc_binary.clone(),
            runc_root: self.config.runc_root.clone(),
            run_dir: layout.run_dir(),
            log_dir: layout.log_dir(),
            log_max_bytes: self.config.log_max_bytes,
            sync_fd: 1,
        }
    }

    /// Everything before the shim: checks, stale state, overlay. Blocking. True when the
    /// network namespace had to be made again (after a host reboot).
    fn before_start(
        &self,
        layout: &MachineLayout,
        lowerdirs: &[PathBuf],
    ) -> Result<bool, RuntimeError> {
        let id = &layout.id;
        // A container left over from a crash between create and cleanup: create would
        // refuse the id.
        let repinned = prepare::before_start(layout, &self.config.host.id_registry, || {
            self.runc_delete(id)
        })?;
        // A mount left by such a crash may be over an older set of layers: remount.
        let rootfs = layout.rootfs();
        overlay::unmount(&rootfs).ctx(|| format!("unmount stale rootfs of machine {id}"))?;
        let userns = File::open(layout.userns())
            .ctx(|| format!("open the user namespace of machine {id}"))?;
        overlay::mount_idmapped(
            lowerdirs,
            &layout.upper(),
            &layout.work(),
            userns.as_fd(),
            &rootfs,
        )
        .ctx(|| format!("mount rootfs of machine {id}"))?;
        check_kernel_mount_points(&rootfs).map_err(|message| RuntimeError::Start {
            driver: "runc",
            id: id.clone(),
            message,
        })?;
        // runc binds the rootfs recursively, so the volumes go with it.
        if let Err(message) = mount_volumes(&layout.config_json(), &rootfs, userns.as_fd()) {
            let _ = overlay::unmount(&rootfs);
            return Err(RuntimeError::Start {
                driver: "runc",
                id: id.clone(),
                message,
            });
        }
        if let Err(e) = init::before_runc_start(id, &layout.config_json(), &rootfs) {
            let _ = overlay::unmount(&rootfs);
            return Err(e);
        }
        let run = layout.run_dir();
        fs::create_dir_all(&run).ctx(|| format!("create {}", run.display()))?;
        Ok(repinned)
    }

    fn runc_state_dir(&self, id: &str) -> PathBuf {
        self.config.runc_root.join(id)
    }

    /// `runc delete --force`; an absent container is success. Blocking.
    fn runc_delete(&self, id: &str) -> Result<(), RuntimeError> {
        if !self.runc_state_dir(id).exists() {
            return Ok(());
        }
        let out = std::process::Command::new(&self.config.runc_binary)
            .arg("--root")
            .arg(&self.config.runc_root)
            .args(["delete", "--force", id])
            .stdin(Stdio::null())
            .output()
            .ctx(|| {
                format!(
                    "run {} delete for machine {id}",
                    self.config.runc_binary.display()
                )
            })?;
        if out.status.success() || !self.runc_state_dir(id).exists() {
            return Ok(());
        }
        Err(RuntimeError::Cleanup {
            driver: "runc",
            id: id.to_owned(),
            message: format!(
                "runc delete: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }

    /// The end of a run, blocking: the container, the supervisor, the host's rootfs
    /// mount and the run directory.
    fn end_run(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        let id = &layout.id;
        let run = RunDir::of(layout);
        self.runc_delete(id)?;
        // The shim records the exit of the init runc just killed; let it finish so it
        // does not write into the run directory after it is removed.
        teardown::wait_for_supervisor(&run)?;
        let rootfs = layout.rootfs();
        overlay::unmount(&rootfs).ctx(|| format!("unmount rootfs of machine {id}"))?;
        run.remove()
    }

    /// Best-effort teardown after a failed start; the start error is what matters.
    async fn abort_start(&self, layout: &MachineLayout) {
        let this = self.clone();
        let layout = layout.clone();
        let _ = blocking(move || {
            if let Ok(Some(pid)) = RunDir::of(&layout).live_shim() {
                // The shim leads its own process group; killing the group also stops a
                // runc create still in flight, which could otherwise finish after the
                // delete below.
                kill_group(pid, libc::SIGKILL);
            }
            this.end_run(&layout)
        })
        .await;
    }
}

/// Refuses an image whose `/proc`, `/sys` or `/dev` is a symlink (or a file), looked at
/// inside the mounted rootfs. runc refuses the first two itself, but it follows a
/// symlinked `/dev` on the host when it makes `/dev/ptmx` and the fd links.
/// runc's `config.json` runs the Machine's init, which runs the command.
fn runc_config(id: &str, config: Vec<u8>) -> Result<Vec<u8>, RuntimeError> {
    let rewritten = init::runc_config(&config)
        .map_err(|e| RuntimeError::Internal(format!("config of machine {id}: {e}")))?;
    Ok(rewritten.unwrap_or(config))
}

/// Mounts the Machine's volumes (`config.json`'s [`crate::volume::VOLUMES_ANNOTATION`])
/// on its rootfs, each a clone of the worker's mount idmapped through the Machine's user
/// namespace, at its path made inside the rootfs.
fn mount_volumes(config: &Path, rootfs: &Path, userns: BorrowedFd<'_>) -> Result<(), String> {
    let spec = oci_spec::runtime::Spec::load(config)
        .map_err(|e| format!("read {}: {e}", config.display()))?;
    let volumes = crate::volume::mounts_of(&spec)?;
    if volumes.is_empty() {
        return Ok(());
    }
    let owner = crate::spec::id_range(&spec).map(|ids| ids.base);
    let root = rustix::fs::open(
        rootfs,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| format!("open {}: {e}", rootfs.display()))?;
    for volume in &volumes {
        let clone =
            crate::volume::idmapped_clone(&volume.source, userns).map_err(|e| e.to_string())?;
        let target =
            crate::inroot::mount_target(root.as_fd(), Path::new(&volume.destination), owner)?;
        crate::volume::attach(clone.as_fd(), target.as_fd())
            .map_err(|e| format!("mount volume on {}: {e}", volume.destination))?;
    }
    Ok(())
}

fn check_kernel_mount_points(rootfs: &Path) -> Result<(), String> {
    let root = rustix::fs::open(
        rootfs,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| format!("open {}: {e}", rootfs.display()))?;
    for destination in crate::inroot::KERNEL_MOUNT_POINTS {
        crate::inroot::check_not_symlinked(root.as_fd(), Path::new(destination))?;
    }
    Ok(())
}

#[async_trait]
impl Runtime for RuncRuntime {
    fn name(&self) -> &'static str {
        "runc"
    }

    async fn prepare(&self, layout: &MachineLayout, spec: &BundleSpec) -> Result<(), RuntimeError> {
        prepare::prepare(&self.config.host, layout, spec, |_, _| Ok(()), runc_config).await
    }

    async fn start(
        &self,
        layout: &MachineLayout,
        lowerdirs: &[PathBuf],
    ) -> Result<Started, RuntimeError> {
        let t0 = Instant::now();
        let repinned = {
            let this = self.clone();
            let layout = layout.clone();
            let lowerdirs = lowerdirs.to_vec();
            blocking(move || this.before_start(&layout, &lowerdirs)).await?
        };
        if repinned {
            if let Err(e) = network::reattach(self.config.host.network.as_deref(), layout).await {
                self.abort_start(layout).await;
                return Err(e);
            }
        }
        let mount_us = t0.elapsed().as_micros();
        let id = layout.id.clone();

        let Some((program, leading)) = self.config.shim_command.split_first() else {
            return Err(RuntimeError::Internal("shim command is empty".into()));
        };
        let mut child = match tokio::process::Command::new(program)
            .args(leading)
            .args(self.shim_args(layout).to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                self.abort_start(layout).await;
                let shim = PathBuf::from(program);
                return Err(RuntimeError::io(
                    format!("spawn shim {} for machine {id}", shim.display()),
                    e,
                ));
            }
        };
        let Some(stdout) = child.stdout.take() else {
            return Err(RuntimeError::Internal(format!(
                "shim of machine {id} has no stdout"
            )));
        };
        let report = supervisor::read_report(stdout, self.config.start_timeout, "runc", &id).await;
        // The spawned process exits right after detaching the shim; reap it.
        let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
        let started = report
            .and_then(|r| r.into_started("runc", &id))
            .map(|mut started| {
                // overlay_mount: checks, stale state and the overlay; runc create and
                // start from the shim; the rest is spawning and detaching the shim.
                let mut steps = StepTimes::new();
                steps.record("overlay_mount", u64::try_from(mount_us).unwrap_or(u64::MAX));
                steps.append(std::mem::take(&mut started.steps));
                let rest = micros(t0.elapsed()).saturating_sub(steps.total_us());
                steps.record("shim", rest);
                tracing::debug!(machine = %id, mount_us, total_us = t0.elapsed().as_micros(), "machine started");
                started.steps = steps;
                started
            });
        host::settle_start(started, self.abort_start(layout)).await
    }

    async fn cleanup(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        let this = self.clone();
        let layout = layout.clone();
        blocking(move || this.end_run(&layout)).await
    }

    async fn remove(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        let this = self.clone();
        teardown::remove(&self.config.host, layout, move |layout| {
            this.end_run(layout)
        })
        .await
    }

    async fn exec(
        &self,
        layout: &MachineLayout,
        spec: &crate::exec::ExecSpec,
    ) -> Result<crate::exec::ExecOutput, RuntimeError> {
        exec::runc_exec(
            &self.config.shim_command,
            &self.config.runc_binary,
            &self.config.runc_root,
            layout,
            spec,
        )
        .await
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
