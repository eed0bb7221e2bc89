//! Running Machines on a host.
//!
//! The [`Runtime`] trait is the seam between the agent (which decides) and the host (which
//! acts). Three drivers implement it as peers over an overlayfs rootfs inside a persistent
//! network namespace, plugged into the worker's bridge by [`network::WorkerNetwork`]:
//! [`native::NativeRuntime`] (a spawner forks each Machine's init),
//! [`runc::RuncRuntime`] (real runc) and [`gvisor::GvisorRuntime`] (gVisor's runsc, a
//! kernel in user space; the only one that can suspend a Machine with its memory). Each
//! uses the shared [`host`] layer (processes, the run directory, preparation, teardown,
//! the doctor's inventory) and the per-Machine [`supervisor`]; runc and gvisor share the
//! shim of `oci` (their programs' command lines are alike); no driver imports another.
//! [`fake::FakeRuntime`] records calls for unit tests.
//!
//! The split between [`Runtime::prepare`] and [`Runtime::start`] is the product: prepare
//! runs once at create and may be slow; start runs many times and must only do what
//! booting needs.

use std::collections::BTreeSet;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub mod checkpoint;
pub mod exec;
pub mod extents;
pub mod fake;
pub mod gvisor;
pub mod host;
pub mod isolation;
pub mod logs;
pub mod native;
pub mod netns;
pub mod network;
pub mod overlay;
pub mod quota;
pub mod rootfs_files;
pub mod runc;
pub mod seccomp;
pub mod shim;
pub mod spec;
pub mod supervisor;
pub mod timing;
pub mod userns;
pub mod volume;

mod error;
mod helper;
mod inroot;
mod machine_init;
pub use machine_init::{init_environment, InitProcess};
mod oci;
mod util;
pub use error::RuntimeError;
pub use host::HostInventory;
pub use util::{remove_file_if_exists, write_atomic, write_replace};

/// Where one Machine's files live on the host. Everything the Machine owns is below `dir`,
/// so destroy is one directory removal once the mounts are gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineLayout {
    pub id: String,
    pub dir: PathBuf,
}

impl MachineLayout {
    pub fn new(machines_root: &Path, id: &str) -> MachineLayout {
        MachineLayout {
            id: id.to_owned(),
            dir: machines_root.join(id),
        }
    }
    /// The Machine's own writable layer. Survives stop, start and agent restarts.
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }
    /// overlayfs work directory, on the same filesystem as the upperdir.
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    /// Mount point of the overlay rootfs while the Machine runs.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    /// The OCI bundle directory: it holds `config.json`.
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }
    pub fn config_json(&self) -> PathBuf {
        self.bundle().join("config.json")
    }
    /// Bind-mounted network namespace file, made at create.
    /// The pinned user namespace (see [`userns`]).
    pub fn userns(&self) -> PathBuf {
        self.dir.join("userns")
    }

    pub fn netns(&self) -> PathBuf {
        self.dir.join("netns")
    }
    /// Per-run state written by the shim: pid files and the exit record.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    /// Captured stdout and stderr.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }
    /// Where the Machine's memory image goes while it is suspended (see
    /// [`Runtime::suspend`]); removed with the Machine.
    pub fn memory_image(&self) -> PathBuf {
        self.dir.join("memory")
    }
}

fn volume_error(what: &str, layout: &volume::VolumeLayout, error: std::io::Error) -> RuntimeError {
    RuntimeError::Io {
        context: format!("{what} volume {}", layout.id),
        error,
    }
}

/// What the bundle's `config.json` is built from. Written at create and update only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSpec {
    /// Also the hostname inside the Machine.
    pub machine_id: String,
    pub args: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub cpus: u32,
    pub memory_mb: u32,
    pub pids_limit: i64,
    /// The Machine's disk quota (its writable layer) in MiB. Enforced by the filesystem
    /// when the runtime has a [`quota::DiskQuota`]; `None` sets no limit.
    pub disk_mb: Option<u64>,
    /// The Machine's address on its worker's network. When set, the runtime must have a
    /// [`network::WorkerNetwork`], and prepare plugs the Machine into it.
    pub private_ip: Option<Ipv6Addr>,
    /// The Machine's org: on the worker network it reaches the Machines of its own org
    /// only. `None` is the default group (Machines made before orgs were recorded).
    pub org: Option<String>,
    /// Give the Machine CAP_NET_RAW (off by default). The bridge filter holds with it.
    pub net_raw: bool,
    /// Volumes mounted into the Machine at every start, listed in `config.json`.
    pub volumes: Vec<volume::VolumeMount>,
}

/// A Machine whose init process is running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// The Machine's init process, in the host's pid namespace.
    pub pid: u32,
    /// The shim that holds the Machine's stdio and reaps it.
    pub shim_pid: u32,
    /// Milliseconds since the Unix epoch.
    pub started_at_ms: i64,
    /// Where the start's time went inside the runtime.
    #[serde(default, skip_serializing_if = "timing::StepTimes::is_empty")]
    pub steps: timing::StepTimes,
}

/// How a Machine's init process ended, written by the shim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    /// Milliseconds since the Unix epoch.
    pub exited_at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Running {
        pid: u32,
    },
    Exited(ExitRecord),
    /// No container and no exit record: never started, or already cleaned up.
    NotRunning,
}

#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Create-time work: make the Machine's directories, its network namespace (plugged
    /// into the worker network when the spec has a `private_ip`) and the bundle's
    /// `config.json`. Called again by update with a new spec; it must keep the upperdir,
    /// the network namespace and the address.
    async fn prepare(&self, layout: &MachineLayout, spec: &BundleSpec) -> Result<(), RuntimeError>;

    /// Boots the prepared Machine over the given image layers (bottom first) and returns
    /// once its init process is running. Does no image, bundle or network work.
    async fn start(
        &self,
        layout: &MachineLayout,
        lowerdirs: &[PathBuf],
    ) -> Result<Started, RuntimeError>;

    /// Sends a signal to the Machine's init process. A Machine that is not running is not
    /// an error. By default through the run directory every driver's supervisor keeps
    /// ([`host::RunDir`]).
    async fn signal(&self, layout: &MachineLayout, signal: i32) -> Result<(), RuntimeError> {
        host::run_dir::signal_init(layout, signal).await
    }

    /// Waits until the Machine's init process has exited, up to `timeout` (forever when
    /// `None`). Works for Machines started by an earlier agent process too. By default
    /// through the run directory.
    async fn wait_exit(
        &self,
        layout: &MachineLayout,
        timeout: Option<Duration>,
    ) -> Result<Option<ExitRecord>, RuntimeError> {
        host::run_dir::wait_for_exit(layout, timeout).await
    }

    /// After an exit: removes the runtime's container state and unmounts the rootfs.
    /// Keeps the upperdir. Idempotent.
    async fn cleanup(&self, layout: &MachineLayout) -> Result<(), RuntimeError>;

    /// What the host says about the Machine right now. By default from the run directory
    /// and /proc.
    async fn status(&self, layout: &MachineLayout) -> Result<Status, RuntimeError> {
        host::run_dir::read_status(layout).await
    }

    /// After a host restart, for a Machine that is not running: pins its network
    /// namespace again and plugs it in with its recorded address, as start would, so a
    /// stopped Machine has its network before its next start. Nothing when it is pinned.
    async fn restore_network(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        match self.host_config() {
            Some(host) => host.restore_network(layout).await,
            None => Ok(()),
        }
    }

    /// Destroy: kills anything left, removes mounts, the veth pair, the network namespace
    /// and every file of the Machine. Idempotent.
    async fn remove(&self, layout: &MachineLayout) -> Result<(), RuntimeError>;

    /// The Machine's disk use against its quota, as the filesystem counts it; `None` when
    /// the Machine has no quota. Cheap (an ioctl and two small reads), for stop and the
    /// periodic storage sample, never for start.
    async fn disk_usage(
        &self,
        layout: &MachineLayout,
    ) -> Result<Option<quota::DiskUsage>, RuntimeError> {
        match self.host_config() {
            Some(host) => host.disk_usage(layout).await,
            None => Ok(None),
        }
    }

    /// What the host holds that looks like Machines of this worker, for the doctor:
    /// directories and mounts under `machines_root`, veths and cgroups of `known` ids (the
    /// ids the worker has held; those are host-wide) and of the ids found there. The
    /// default lists what every driver leaves; a driver with state of its own (runc's
    /// containers) adds it.
    async fn host_inventory(
        &self,
        machines_root: &Path,
        known: &BTreeSet<String>,
    ) -> Result<HostInventory, RuntimeError> {
        HostInventory::list(machines_root, known, None).await
    }

    /// Runs a command inside the running Machine's namespaces and cgroups, with its
    /// output capped and its run time bounded.
    async fn exec(
        &self,
        layout: &MachineLayout,
        spec: &exec::ExecSpec,
    ) -> Result<exec::ExecOutput, RuntimeError>;

    /// The processes of the running Machine, from its init's pid namespace; `None` when it
    /// does not run. By default through the run directory and /proc.
    async fn processes(
        &self,
        layout: &MachineLayout,
    ) -> Result<Option<Vec<host::procs::MachineProcess>>, RuntimeError> {
        let Status::Running { pid } = self.status(layout).await? else {
            return Ok(None);
        };
        let id = layout.id.clone();
        host::blocking(move || {
            error::IoContext::ctx(host::procs::machine_processes(pid).map(Some), || {
                format!("list the processes of machine {id}")
            })
        })
        .await
    }

    /// Makes a volume ([`volume::create`]): its image (a copy of the snapshot image `from`
    /// when given), filesystem and mount. Leaves nothing behind when it fails.
    async fn volume_create(
        &self,
        layout: &volume::VolumeLayout,
        size_bytes: u64,
        from: Option<PathBuf>,
    ) -> Result<(), RuntimeError> {
        let layout = layout.clone();
        host::blocking(move || {
            volume::create(&layout, size_bytes, from.as_deref())
                .map_err(|error| volume_error("create", &layout, error))
        })
        .await
    }

    /// Makes the volume `layout` a copy of the volume `source` at one instant
    /// ([`volume::fork`]), grown to `size_bytes`, and mounts it. Leaves nothing behind
    /// when it fails.
    async fn volume_fork(
        &self,
        source: &volume::VolumeLayout,
        layout: &volume::VolumeLayout,
        size_bytes: u64,
    ) -> Result<(), RuntimeError> {
        let (source, layout) = (source.clone(), layout.clone());
        host::blocking(move || {
            volume::fork(&source, &layout, size_bytes)
                .map_err(|error| volume_error("fork", &layout, error))
        })
        .await
    }

    /// Mounts a volume that is not mounted (after an agent or host restart).
    async fn volume_mount(&self, layout: &volume::VolumeLayout) -> Result<(), RuntimeError> {
        let layout = layout.clone();
        host::blocking(move || {
            volume::mount(&layout).map_err(|error| volume_error("mount", &layout, error))
        })
        .await
    }

    /// Whether the volume's filesystem is mounted on the worker.
    async fn volume_mounted(&self, layout: &volume::VolumeLayout) -> Result<bool, RuntimeError> {
        let layout = layout.clone();
        host::blocking(move || {
            volume::is_mounted(&layout).map_err(|error| volume_error("inspect", &layout, error))
        })
        .await
    }

    /// Grows a volume to `size_bytes` ([`volume::extend`]): online, or unmounted when
    /// `offline_ok` and the host cannot grow a mounted filesystem.
    async fn volume_extend(
        &self,
        layout: &volume::VolumeLayout,
        size_bytes: u64,
        offline_ok: bool,
    ) -> Result<(), RuntimeError> {
        let layout = layout.clone();
        host::blocking(move || {
            volume::extend(&layout, size_bytes, offline_ok)
                .map_err(|error| volume_error("extend", &layout, error))
        })
        .await
    }

    /// The volume's blocks as its filesystem counts them.
    async fn volume_stats(
        &self,
        layout: &volume::VolumeLayout,
    ) -> Result<volume::VolumeStats, RuntimeError> {
        let layout = layout.clone();
        host::blocking(move || {
            volume::stats(&layout).map_err(|error| volume_error("inspect", &layout, error))
        })
        .await
    }

    /// Copies the volume, consistent at one instant, to the new file `to`; answers the
    /// bytes of data copied and their digest.
    async fn volume_snapshot(
        &self,
        layout: &volume::VolumeLayout,
        to: PathBuf,
    ) -> Result<volume::SnapshotImage, RuntimeError> {
        let layout = layout.clone();
        host::blocking(move || {
            volume::snapshot(&layout, &to).map_err(|error| volume_error("snapshot", &layout, error))
        })
        .await
    }

    /// Unmounts the volume and waits until no mount anywhere keeps its filesystem alive
    /// ([`volume::release`]): its image is then still. Idempotent.
    async fn volume_release(&self, layout: &volume::VolumeLayout) -> Result<(), RuntimeError> {
        let layout = layout.clone();
        host::blocking(move || {
            volume::release(&layout).map_err(|error| volume_error("unmount", &layout, error))
        })
        .await
    }

    /// Unmounts the volume and removes its files. Idempotent.
    async fn volume_remove(&self, layout: &volume::VolumeLayout) -> Result<(), RuntimeError> {
        let layout = layout.clone();
        host::blocking(move || {
            volume::remove(&layout).map_err(|error| volume_error("remove", &layout, error))
        })
        .await
    }

    /// Freezes (`true`) or thaws the running Machine's processes, so that a checkpoint of
    /// its disk catches no write halfway. Frozen processes keep their memory and run on
    /// once thawed. A driver without a freezer answers [`RuntimeError::Unsupported`].
    async fn freeze(&self, layout: &MachineLayout, frozen: bool) -> Result<(), RuntimeError> {
        let _ = (layout, frozen);
        Err(RuntimeError::Unsupported {
            driver: self.name(),
            what: "freeze",
        })
    }

    /// Whether [`Runtime::suspend`] and [`Runtime::resume`] work with this driver.
    fn can_suspend(&self) -> bool {
        false
    }

    /// Checkpoints the running Machine (memory, processes, open files, sockets) into the
    /// new directory `image_dir`, written whole or not at all (with a manifest that
    /// [`Runtime::resume`] checks), then ends the run as [`Runtime::cleanup`] does:
    /// nothing of the Machine runs on the host afterwards, and its upperdir stays. A
    /// Machine that is not running is [`RuntimeError::NotRunning`]; a driver that cannot
    /// suspend answers [`RuntimeError::Unsupported`].
    async fn suspend(&self, layout: &MachineLayout, image_dir: &Path) -> Result<(), RuntimeError> {
        let _ = (layout, image_dir);
        Err(RuntimeError::Unsupported {
            driver: self.name(),
            what: "suspend",
        })
    }

    /// Starts the prepared Machine from the image [`Runtime::suspend`] wrote, over the
    /// given image layers as start does: its processes go on with their memory, open
    /// files and listening sockets. A missing, half-written or damaged image is
    /// [`RuntimeError::MemoryImage`] and nothing runs (the caller can boot fresh). Once
    /// the Machine runs the image is removed: it is stale from then on.
    async fn resume(
        &self,
        layout: &MachineLayout,
        lowerdirs: &[PathBuf],
        image_dir: &Path,
    ) -> Result<Started, RuntimeError> {
        let _ = (layout, lowerdirs, image_dir);
        Err(RuntimeError::Unsupported {
            driver: self.name(),
            what: "resume",
        })
    }

    /// The host parts the driver was made with (network, id registry, disk quotas), which
    /// the defaults of `restore_network` and `disk_usage` use; `None` for a runtime that touches no host (the fake).
    fn host_config(&self) -> Option<&host::HostConfig> {
        None
    }
}
