//! [`Runtime`] over real runc, an overlayfs rootfs and a persistent network namespace.
//!
//! All state lives in files: runc's state under `runc_root`, the shim's pid and the exit
//! record under the Machine's `run/`. A new `RuncRuntime` (after an agent restart) can
//! therefore signal, wait for and clean up Machines started by an earlier one.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::error::{IoContext, RuntimeError};
use crate::network::{self, WorkerNetwork};
use crate::quota::{DiskQuota, DiskUsage};
use crate::shim::{self, ShimArgs, ShimReport};
use crate::timing::{micros, StepTimes};
use crate::userns::{self, IdRange, IdRegistry};
use crate::{logs, netns, overlay, spec, util};
use crate::{BundleSpec, ExitRecord, MachineLayout, Runtime, Started, Status};

/// How long cleanup waits for a shim to finish after its Machine was killed.
const SHIM_EXIT_GRACE: Duration = Duration::from_secs(3);
/// How long remove waits for a killed Machine before tearing it down anyway.
const KILL_GRACE: Duration = Duration::from_secs(5);

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
    /// The worker's Machine network. Without one, Machines get only loopback, and a spec
    /// with a `private_ip` is refused.
    pub network: Option<Arc<WorkerNetwork>>,
    /// Where Machines' host id ranges are claimed (host-wide).
    pub id_registry: IdRegistry,
    /// Per-Machine disk quotas on the Machines' filesystem; `None` enforces none.
    pub disk_quota: Option<DiskQuota>,
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
            network: None,
            id_registry: IdRegistry::new(userns::DEFAULT_REGISTRY),
            disk_quota: None,
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

    /// Everything before the shim: checks, overlay, stale state. Blocking. True when the
    /// network namespace had to be made again (after a host reboot).
    fn before_start(
        &self,
        layout: &MachineLayout,
        lowerdirs: &[PathBuf],
    ) -> Result<bool, RuntimeError> {
        let id = &layout.id;
        let config = layout.config_json();
        if !config.exists() {
            return Err(RuntimeError::NotPrepared {
                id: id.clone(),
                path: config,
            });
        }
        let run = layout.run_dir();
        if let Some(pid) = live_shim(&run)? {
            return Err(RuntimeError::AlreadyRunning {
                id: id.clone(),
                shim_pid: pid,
            });
        }
        // Left over from a crash between create and cleanup: create would refuse the id.
        self.runc_delete(id)?;
        // Only a host reboot unpins the namespaces made at create; make them again then.
        let repinned = userns::ensure(layout, &self.config.id_registry)?;
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
        fs::create_dir_all(&run).ctx(|| format!("create {}", run.display()))?;
        for name in [shim::EXIT_FILE, shim::INIT_PID_FILE] {
            let path = run.join(name);
            util::remove_file_if_exists(&path).ctx(|| format!("remove {}", path.display()))?;
        }
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

    /// The cleanup steps, blocking.
    fn cleanup_blocking(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        let id = &layout.id;
        let run = layout.run_dir();
        self.runc_delete(id)?;
        // The shim records the exit of the init runc just killed; let it finish so it
        // does not write into the run directory after it is removed.
        if let Some(pid) = live_shim(&run)? {
            if !wait_process_blocking(pid, SHIM_EXIT_GRACE) {
                kill_pid(pid, libc::SIGKILL);
                wait_process_blocking(pid, SHIM_EXIT_GRACE);
            }
        }
        let rootfs = layout.rootfs();
        overlay::unmount(&rootfs).ctx(|| format!("unmount rootfs of machine {id}"))?;
        match fs::remove_dir_all(&run) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(RuntimeError::io(format!("remove {}", run.display()), e))
            }
            _ => Ok(()),
        }
    }

    /// Best-effort teardown after a failed start; the start error is what matters.
    async fn abort_start(&self, layout: &MachineLayout) {
        let this = self.clone();
        let layout = layout.clone();
        let _ = blocking(move || {
            if let Ok(Some(pid)) = live_shim(&layout.run_dir()) {
                // The shim leads its own process group; killing the group also stops a
                // runc create still in flight, which could otherwise finish after the
                // delete below.
                if let Ok(pgid) = i32::try_from(pid) {
                    // SAFETY: kill(2) on the process group of the shim validated just above.
                    unsafe { libc::kill(-pgid, libc::SIGKILL) };
                }
            }
            this.cleanup_blocking(&layout)
        })
        .await;
    }
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

/// The worker network and address a Machine is attached with: the address must be one
/// the network can give, and an address without a network is refused. Both drivers.
pub(crate) fn machine_network<'a>(
    network: Option<&'a Arc<WorkerNetwork>>,
    id: &str,
    private_ip: Option<std::net::Ipv6Addr>,
) -> Result<Option<(&'a Arc<WorkerNetwork>, std::net::Ipv6Addr)>, RuntimeError> {
    match (network, private_ip) {
        (Some(network), Some(address)) => {
            network.check_address(id, address)?;
            Ok(Some((network, address)))
        }
        (None, Some(address)) => Err(RuntimeError::InvalidSpec {
            id: id.to_owned(),
            message: format!("private address {address} given, but this runtime has no network"),
        }),
        (_, None) => Ok(None),
    }
}

#[async_trait]
impl Runtime for RuncRuntime {
    fn name(&self) -> &'static str {
        "runc"
    }

    async fn prepare(&self, layout: &MachineLayout, spec: &BundleSpec) -> Result<(), RuntimeError> {
        let id = layout.id.clone();
        let network = machine_network(self.config.network.as_ref(), &id, spec.private_ip)?;
        // Fails on a bad spec before anything is made on the host.
        spec::build(spec, &layout.rootfs(), &layout.netns())?;
        let t0 = Instant::now();
        let ids = {
            let layout = layout.clone();
            let registry = self.config.id_registry.clone();
            let quota = self.config.disk_quota.clone();
            let disk_mb = spec.disk_mb;
            blocking(move || {
                prepare_disk_quota(quota.as_ref(), &layout, disk_mb)?;
                make_dirs_and_namespaces(&layout, &registry)
            })
            .await?
        };
        let config = spec::render(layout, spec, ids)?;
        let netns_done = t0.elapsed();
        if let Some((network, address)) = network {
            network
                .attach(&id, &layout.netns(), address, spec.org.as_deref())
                .await?;
        }
        let netns_us = netns_done.as_micros();
        let attach_us = (t0.elapsed() - netns_done).as_micros();
        // Written last: a config.json means the Machine is fully prepared.
        let path = layout.config_json();
        blocking(move || {
            util::write_atomic(&path, &config).ctx(|| format!("write {}", path.display()))
        })
        .await?;
        tracing::debug!(machine = %id, netns_us, attach_us, "machine prepared");
        Ok(())
    }

    async fn start(
        &self,
        layout: &MachineLayout,
        lowerdirs: &[PathBuf],
    ) -> Result<Started, RuntimeError> {
        let t0 = Instant::now();
        let id = layout.id.clone();
        let repinned = {
            let this = self.clone();
            let layout = layout.clone();
            let lowerdirs = lowerdirs.to_vec();
            blocking(move || this.before_start(&layout, &lowerdirs)).await?
        };
        if repinned {
            if let Err(e) = network::reattach(self.config.network.as_deref(), layout).await {
                self.abort_start(layout).await;
                return Err(e);
            }
        }
        let mount_us = t0.elapsed().as_micros();

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
        let mut line = String::new();
        let read = tokio::time::timeout(
            self.config.start_timeout,
            BufReader::new(stdout).read_line(&mut line),
        )
        .await;
        // The spawned process exits right after detaching the shim; reap it.
        let status = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;

        let report: Result<ShimReport, RuntimeError> = match read {
            Err(_) => Err(RuntimeError::StartTimeout {
                id: id.clone(),
                timeout: self.config.start_timeout,
            }),
            Ok(Err(e)) => Err(RuntimeError::io(
                format!("read shim report of machine {id}"),
                e,
            )),
            Ok(Ok(0)) => Err(RuntimeError::Start {
                driver: "runc",
                id: id.clone(),
                message: format!("shim exited without a report ({status:?})"),
            }),
            Ok(Ok(_)) => serde_json::from_str(line.trim()).map_err(|e| RuntimeError::Start {
                driver: "runc",
                id: id.clone(),
                message: format!("bad shim report {:?}: {e}", line.trim()),
            }),
        };
        let started = report.and_then(|r| match (r.error, r.pid, r.shim_pid, r.started_at_ms) {
            (None, Some(pid), Some(shim_pid), Some(started_at_ms)) => {
                // mount_us: checks, stale state and the overlay; the rest of total_us
                // beyond runc create and start is spawning and detaching the shim.
                tracing::debug!(
                    machine = %id,
                    mount_us,
                    create_us = r.create_us,
                    start_us = r.start_us,
                    total_us = t0.elapsed().as_micros(),
                    "machine started"
                );
                let mut steps = StepTimes::new();
                steps.record("overlay_mount", u64::try_from(mount_us).unwrap_or(u64::MAX));
                steps.record("runc_create", r.create_us.unwrap_or(0));
                steps.record("runc_start", r.start_us.unwrap_or(0));
                // What is left: spawning and detaching the shim, and its report.
                let rest = micros(t0.elapsed()).saturating_sub(steps.total_us());
                steps.record("shim", rest);
                Ok(Started {
                    pid,
                    shim_pid,
                    started_at_ms,
                    steps,
                })
            }
            (Some(message), ..) => Err(RuntimeError::Start {
                driver: "runc",
                id: id.clone(),
                message,
            }),
            _ => Err(RuntimeError::Start {
                driver: "runc",
                id: id.clone(),
                message: format!("incomplete shim report {:?}", line.trim()),
            }),
        });
        if started.is_err() {
            self.abort_start(layout).await;
        }
        started
    }

    async fn signal(&self, layout: &MachineLayout, signal: i32) -> Result<(), RuntimeError> {
        signal_init(layout, signal).await
    }

    async fn wait_exit(
        &self,
        layout: &MachineLayout,
        timeout: Option<Duration>,
    ) -> Result<Option<ExitRecord>, RuntimeError> {
        wait_for_exit(layout, timeout).await
    }

    async fn restore_network(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        network::restore(
            self.config.network.as_deref(),
            layout,
            &self.config.id_registry,
        )
        .await
    }

    async fn cleanup(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        let this = self.clone();
        let layout = layout.clone();
        blocking(move || this.cleanup_blocking(&layout)).await
    }

    async fn status(&self, layout: &MachineLayout) -> Result<Status, RuntimeError> {
        read_status(layout).await
    }

    async fn disk_usage(&self, layout: &MachineLayout) -> Result<Option<DiskUsage>, RuntimeError> {
        disk_usage(self.config.disk_quota.as_ref(), layout).await
    }

    async fn exec(
        &self,
        layout: &MachineLayout,
        spec: &crate::exec::ExecSpec,
    ) -> Result<crate::exec::ExecOutput, RuntimeError> {
        crate::exec::runc_exec(
            &self.config.shim_command,
            &self.config.runc_binary,
            &self.config.runc_root,
            layout,
            spec,
        )
        .await
    }

    async fn remove(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        if matches!(self.status(layout).await?, Status::Running { .. }) {
            self.signal(layout, libc::SIGKILL).await?;
            self.wait_exit(layout, Some(KILL_GRACE)).await?;
        }
        // Before the namespace goes: its veth would go with it, but only some time later.
        if let Some(network) = &self.config.network {
            network.detach(&layout.id).await?;
        }
        let this = self.clone();
        let layout = layout.clone();
        blocking(move || {
            this.cleanup_blocking(&layout)?;
            release_disk_quota(this.config.disk_quota.as_ref(), &layout)?;
            remove_machine_dir(&layout, &this.config.id_registry)
        })
        .await
    }
}

/// Destroy's last step for either driver, once nothing runs: unpins the namespaces,
/// deletes the Machine's directory, then gives its host ids back. Blocking.
pub(crate) fn remove_machine_dir(
    layout: &MachineLayout,
    registry: &IdRegistry,
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

/// Sends `signal` to the Machine's init, found through the shim's files.
pub(crate) async fn signal_init(layout: &MachineLayout, signal: i32) -> Result<(), RuntimeError> {
    let run = layout.run_dir();
    let id = layout.id.clone();
    blocking(move || {
        let Some(shim_pid) = live_shim(&run)? else {
            return Ok(());
        };
        let init_file = run.join(shim::INIT_PID_FILE);
        let Some(pid) =
            shim::read_pid_file(&init_file).ctx(|| format!("read {}", init_file.display()))?
        else {
            return Ok(());
        };
        let Some(fd) = pidfd_open(pid).ctx(|| format!("pidfd of machine {id} init"))? else {
            return Ok(());
        };
        // With the pidfd held, the pid cannot be reused; check it is still the shim's
        // child (the Machine's init) and not an unrelated process that took the pid.
        match util::proc_stat(pid).ctx(|| format!("stat machine {id} init"))? {
            Some(st) if st.ppid == shim_pid && st.state != 'Z' => {}
            _ => return Ok(()),
        }
        match pidfd_send_signal(&fd, signal) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other.ctx(|| format!("send signal {signal} to machine {id}")),
        }
    })
    .await
}

/// Waits for the shim of the Machine to exit and reads its exit record.
pub(crate) async fn wait_for_exit(
    layout: &MachineLayout,
    timeout: Option<Duration>,
) -> Result<Option<ExitRecord>, RuntimeError> {
    let run = layout.run_dir();
    let id = &layout.id;
    let shim = match shim::read_shim_pid(&run).ctx(|| format!("read shim pid of machine {id}"))? {
        Some((pid, start)) => {
            let fd = pidfd_open(pid).ctx(|| format!("pidfd of machine {id} shim"))?;
            // Checked after opening the pidfd, so the pid cannot change underneath.
            fd.filter(|_| util::is_same_live_process(pid, start))
        }
        None => None,
    };
    if let Some(fd) = shim {
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and unchanged until
        // the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)
            .ctx(|| format!("watch shim of machine {id}"))?;
        // A pidfd turns readable when the process exits.
        let exited = async { fd.readable().await.map(|_guard| ()) };
        let waited = match timeout {
            Some(t) => match tokio::time::timeout(t, exited).await {
                Err(_) => return Ok(None),
                Ok(r) => r,
            },
            None => exited.await,
        };
        waited.ctx(|| format!("wait for shim of machine {id}"))?;
    }
    let record = shim::read_exit_record(&run)
        .ctx(|| format!("read exit record of machine {id}"))?
        .unwrap_or(ExitRecord {
            exit_code: None,
            signal: None,
            oom_killed: false,
            exited_at_ms: util::now_ms(),
        });
    Ok(Some(record))
}

/// What the shim's files and /proc say about the Machine.
pub(crate) async fn read_status(layout: &MachineLayout) -> Result<Status, RuntimeError> {
    let run = layout.run_dir();
    let id = layout.id.clone();
    blocking(move || {
        if let Some(record) =
            shim::read_exit_record(&run).ctx(|| format!("read exit record of machine {id}"))?
        {
            return Ok(Status::Exited(record));
        }
        let Some(shim_pid) = live_shim(&run)? else {
            return Ok(Status::NotRunning);
        };
        let init_file = run.join(shim::INIT_PID_FILE);
        let init =
            shim::read_pid_file(&init_file).ctx(|| format!("read {}", init_file.display()))?;
        Ok(match init.map(|pid| (pid, util::proc_stat(pid))) {
            Some((pid, Ok(Some(st)))) if st.ppid == shim_pid && st.state != 'Z' => {
                Status::Running { pid }
            }
            _ => Status::NotRunning,
        })
    })
    .await
}

/// The Machine's quota subvolume with its limit, before the directories are made (the
/// upper and work links must come first). Blocking; both drivers.
pub(crate) fn prepare_disk_quota(
    quota: Option<&DiskQuota>,
    layout: &MachineLayout,
    disk_mb: Option<u64>,
) -> Result<(), RuntimeError> {
    let (Some(quota), Some(disk_mb)) = (quota, disk_mb) else {
        return Ok(());
    };
    let id = &layout.id;
    let t0 = Instant::now();
    let limited = quota
        .prepare(layout, disk_mb)
        .ctx(|| format!("disk quota of machine {id}"))?;
    if limited {
        tracing::debug!(machine = %id, disk_mb, quota_us = micros(t0.elapsed()), "disk quota set");
    } else {
        tracing::warn!(machine = %id, "machine predates disk quotas: its disk has no limit");
    }
    Ok(())
}

/// Clears the Machine's limit before its files go. Blocking; both drivers.
pub(crate) fn release_disk_quota(
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

pub(crate) async fn disk_usage(
    quota: Option<&DiskQuota>,
    layout: &MachineLayout,
) -> Result<Option<DiskUsage>, RuntimeError> {
    let Some(quota) = quota.cloned() else {
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

/// The Machine's directories, its host ids and its user and network namespaces (`lo`
/// up). Blocking.
pub(crate) fn make_dirs_and_namespaces(
    layout: &MachineLayout,
    registry: &IdRegistry,
) -> Result<IdRange, RuntimeError> {
    let id = &layout.id;
    for dir in [
        layout.upper(),
        layout.work(),
        layout.rootfs(),
        layout.bundle(),
        layout.run_dir(),
        layout.log_dir(),
    ] {
        fs::create_dir_all(&dir).ctx(|| format!("create {} for machine {id}", dir.display()))?;
    }
    userns::prepare(layout, registry)
}

pub(crate) async fn blocking<T, F>(f: F) -> Result<T, RuntimeError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, RuntimeError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RuntimeError::Internal(format!("blocking task failed: {e}")))?
}

/// The pid of the shim recorded in `run`, if that very process is still alive.
pub(crate) fn live_shim(run: &Path) -> Result<Option<u32>, RuntimeError> {
    let recorded =
        shim::read_shim_pid(run).ctx(|| format!("read shim pid in {}", run.display()))?;
    Ok(recorded.and_then(|(pid, start)| util::is_same_live_process(pid, start).then_some(pid)))
}

/// `None` when the process is gone.
pub(crate) fn pidfd_open(pid: u32) -> io::Result<Option<OwnedFd>> {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return Ok(None);
    };
    match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => Ok(Some(fd)),
        Err(rustix::io::Errno::SRCH) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Raw syscall so any signal number (real-time ones too) can be sent.
fn pidfd_send_signal(fd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: a valid pidfd, a signal number the kernel validates, no siginfo, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Signals a pid through a pidfd; used only on pids just validated by start time.
pub(crate) fn kill_pid(pid: u32, signal: i32) {
    if let Ok(Some(fd)) = pidfd_open(pid) {
        let _ = pidfd_send_signal(&fd, signal);
    }
}

/// Waits for `pid` to exit; true if it did within `timeout`.
pub(crate) fn wait_process_blocking(pid: u32, timeout: Duration) -> bool {
    let Ok(Some(fd)) = pidfd_open(pid) else {
        return true;
    };
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        match rustix::event::poll(&mut fds, ms) {
            Ok(n) if n > 0 => return true,
            Ok(_) => return false,
            Err(rustix::io::Errno::INTR) if !left.is_zero() => continue,
            Err(_) => return false,
        }
    }
}
