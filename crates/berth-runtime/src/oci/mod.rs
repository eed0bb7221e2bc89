//! What the drivers over an OCI runtime program share: runc's `runc` and gVisor's `runsc`
//! take the same command line (`--root`, `create --bundle --pid-file`, `start`, `exec`,
//! `delete --force`), so one [`OciCli`] runs either through one shim ([`shim`]), one exec
//! guard ([`exec_guard`]) and one start preparation. The two drivers differ in how the
//! Machine's init gets into the container ([`init::InitPassing`]) and in the flags they
//! give their program.
//!
//! All state lives in files: the program's state under its root, the shim's pid and the
//! exit record under the Machine's `run/`. A new runtime (after an agent restart) can
//! therefore signal, wait for and clean up Machines started by an earlier one.

use std::ffi::OsString;
use std::fs::{self, File};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use self::shim::{Flavor, ShimArgs};

use crate::error::{IoContext, RuntimeError};
use crate::host::process::kill_group;
use crate::host::run_dir::RunDir;
use crate::host::{self, blocking, prepare, teardown, HostConfig};
use crate::network;
use crate::overlay;
use crate::supervisor;
use crate::timing::{micros, StepTimes};
use crate::{BundleSpec, MachineLayout, Started};

pub(crate) mod exec;
pub(crate) mod exec_guard;
pub(crate) mod init;
pub(crate) mod shim;

/// One OCI runtime program as a driver runs it.
#[derive(Debug, Clone)]
pub(crate) struct OciCli {
    /// The driver's name, in errors.
    pub(crate) driver: &'static str,
    pub(crate) flavor: Flavor,
    pub(crate) binary: PathBuf,
    /// The program's `--root`: where it keeps container state.
    pub(crate) root: PathBuf,
    /// Flags every call of the program gets after `--root` (runsc's platform, network).
    pub(crate) global_args: Vec<OsString>,
    /// How the Machine's init gets into the container.
    pub(crate) init: init::InitPassing,
    pub(crate) shim_command: Vec<OsString>,
    pub(crate) log_max_bytes: u64,
    pub(crate) start_timeout: Duration,
    pub(crate) host: HostConfig,
}

impl OciCli {
    fn shim_args(&self, layout: &MachineLayout, restore_from: Option<&Path>) -> ShimArgs {
        ShimArgs {
            id: layout.id.clone(),
            bundle: layout.bundle(),
            runc_binary: self.binary.clone(),
            runc_root: self.root.clone(),
            run_dir: layout.run_dir(),
            log_dir: layout.log_dir(),
            log_max_bytes: self.log_max_bytes,
            sync_fd: 1,
            flavor: self.flavor,
            global_args: self.global_args.clone(),
            restore_from: restore_from.map(Path::to_path_buf),
        }
    }

    /// The program with its root and global flags, for one subcommand.
    pub(crate) fn command(&self) -> std::process::Command {
        let mut command = std::process::Command::new(&self.binary);
        command
            .arg("--root")
            .arg(&self.root)
            .args(&self.global_args)
            .stdin(Stdio::null());
        command
    }

    /// `Runtime::prepare`: the shared one, with `config.json` as this driver runs it.
    pub(crate) async fn prepare(
        &self,
        layout: &MachineLayout,
        spec: &BundleSpec,
    ) -> Result<(), RuntimeError> {
        prepare::prepare(
            &self.host,
            layout,
            spec,
            |_, _| Ok(()),
            |id, config| self.finish_config(id, config),
        )
        .await
    }

    /// `config.json` as this driver runs it (see [`init::InitPassing`]).
    fn finish_config(&self, id: &str, config: Vec<u8>) -> Result<Vec<u8>, RuntimeError> {
        let rewritten = self
            .init
            .config(&config)
            .map_err(|e| RuntimeError::Internal(format!("config of machine {id}: {e}")))?;
        Ok(rewritten.unwrap_or(config))
    }

    /// Everything before the shim: checks, stale state, overlay. Blocking. True when the
    /// network namespace had to be made again (after a host reboot).
    fn before_start(
        &self,
        layout: &MachineLayout,
        lowerdirs: &[PathBuf],
    ) -> Result<bool, RuntimeError> {
        let id = &layout.id;
        let driver = self.driver;
        // A container left over from a crash between create and cleanup: create would
        // refuse the id.
        let repinned = prepare::before_start(layout, &self.host.id_registry, || self.delete(id))?;
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
            driver,
            id: id.clone(),
            message,
        })?;
        // The program binds (runc) or serves (runsc's gofer) the rootfs recursively, so
        // the volumes go with it.
        if let Err(message) = mount_volumes(&layout.config_json(), &rootfs, userns.as_fd()) {
            let _ = overlay::unmount(&rootfs);
            return Err(RuntimeError::Start {
                driver,
                id: id.clone(),
                message,
            });
        }
        if let Err(e) = init::before_start(driver, &self.init, id, &layout.config_json(), &rootfs) {
            let _ = overlay::unmount(&rootfs);
            return Err(e);
        }
        let run = layout.run_dir();
        fs::create_dir_all(&run).ctx(|| format!("create {}", run.display()))?;
        Ok(repinned)
    }

    pub(crate) fn state_dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Whether the program keeps state of the container `id`.
    pub(crate) fn has_state(&self, id: &str) -> bool {
        match self.flavor {
            Flavor::Runc => self.state_dir(id).exists(),
            // runsc keeps `<id>_sandbox:<id>.state` (and a lock file) in its root.
            Flavor::Runsc => fs::read_dir(&self.root).is_ok_and(|entries| {
                let prefix = format!("{id}_sandbox:");
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            }),
        }
    }

    /// `<program> pause` or `resume`: the container's freezer. Blocking.
    pub(crate) fn freeze(&self, id: &str, frozen: bool) -> Result<(), RuntimeError> {
        let verb = if frozen { "pause" } else { "resume" };
        let out = self
            .command()
            .args([verb, id])
            .output()
            .ctx(|| format!("run {} {verb} for machine {id}", self.binary.display()))?;
        if out.status.success() {
            return Ok(());
        }
        Err(RuntimeError::Freeze {
            id: id.to_owned(),
            message: format!(
                "{} {verb}: {}: {}",
                self.flavor.program(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }

    /// `<program> delete --force`; an absent container is success. Blocking.
    pub(crate) fn delete(&self, id: &str) -> Result<(), RuntimeError> {
        if !self.has_state(id) {
            return Ok(());
        }
        let out = self
            .command()
            .args(["delete", "--force", id])
            .output()
            .ctx(|| format!("run {} delete for machine {id}", self.binary.display()))?;
        if out.status.success() || !self.has_state(id) {
            return Ok(());
        }
        Err(RuntimeError::Cleanup {
            driver: self.driver,
            id: id.to_owned(),
            message: format!(
                "{} delete: {}: {}",
                self.flavor.program(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }

    /// The end of a run, blocking: the container, the supervisor, the host's rootfs
    /// mount and the run directory.
    pub(crate) fn end_run(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        let id = &layout.id;
        let run = RunDir::of(layout);
        self.delete(id)?;
        // The shim records the exit of the init the program just killed; let it finish
        // so it does not write into the run directory after it is removed.
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
                // create still in flight, which could otherwise finish after the delete
                // below.
                kill_group(pid, libc::SIGKILL);
            }
            this.end_run(&layout)
        })
        .await;
    }

    /// `Runtime::start`, or with `restore_from` a start from that checkpoint image.
    pub(crate) async fn start(
        &self,
        layout: &MachineLayout,
        lowerdirs: &[PathBuf],
        restore_from: Option<&Path>,
    ) -> Result<Started, RuntimeError> {
        let t0 = Instant::now();
        let driver = self.driver;
        let repinned = {
            let this = self.clone();
            let layout = layout.clone();
            let lowerdirs = lowerdirs.to_vec();
            blocking(move || this.before_start(&layout, &lowerdirs)).await?
        };
        if repinned {
            if let Err(e) = network::reattach(self.host.network.as_deref(), layout).await {
                self.abort_start(layout).await;
                return Err(e);
            }
        }
        let mount_us = t0.elapsed().as_micros();
        let id = layout.id.clone();

        let Some((program, leading)) = self.shim_command.split_first() else {
            return Err(RuntimeError::Internal("shim command is empty".into()));
        };
        let mut child = match tokio::process::Command::new(program)
            .args(leading)
            .args(self.shim_args(layout, restore_from).to_args())
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
        let report = supervisor::read_report(stdout, self.start_timeout, driver, &id).await;
        // The spawned process exits right after detaching the shim; reap it.
        let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
        let started = report
            .and_then(|r| r.into_started(driver, &id))
            .map(|mut started| {
                // overlay_mount: checks, stale state and the overlay; the program's create
                // and start (or restore) from the shim; the rest is spawning and
                // detaching the shim.
                let mut steps = StepTimes::new();
                steps.record("overlay_mount", u64::try_from(mount_us).unwrap_or(u64::MAX));
                steps.append(std::mem::take(&mut started.steps));
                let rest = micros(t0.elapsed()).saturating_sub(steps.total_us());
                steps.record("shim", rest);
                tracing::debug!(machine = %id, driver, mount_us, total_us = t0.elapsed().as_micros(), "machine started");
                started.steps = steps;
                started
            });
        host::settle_start(started, self.abort_start(layout)).await
    }

    pub(crate) async fn cleanup(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        let this = self.clone();
        let layout = layout.clone();
        blocking(move || this.end_run(&layout)).await
    }

    pub(crate) async fn remove(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        let this = self.clone();
        teardown::remove(&self.host, layout, move |layout| this.end_run(layout)).await
    }

    pub(crate) async fn exec(
        &self,
        layout: &MachineLayout,
        spec: &crate::exec::ExecSpec,
    ) -> Result<crate::exec::ExecOutput, RuntimeError> {
        exec::oci_exec(self, layout, spec).await
    }
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

/// Refuses an image whose `/proc`, `/sys` or `/dev` is a symlink (or a file), looked at
/// inside the mounted rootfs. runc refuses the first two itself, but it follows a
/// symlinked `/dev` on the host when it makes `/dev/ptmx` and the fd links.
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
