//! The native driver: [`Runtime`] without runc on the start path.
//!
//! A per-worker spawner (see [`spawner`]) is started once; each start is one request to
//! it, and it forks the Machine's supervisor, which forks init into new pid, mount, uts,
//! ipc and cgroup namespaces inside the Machine's persistent network namespace. Init
//! mounts the overlay inside its own mount namespace (nothing is mounted on the host),
//! pivots into it and applies the same `config.json` runc would: mounts, devices,
//! masked and read-only paths, hostname, rlimits, capabilities, no_new_privs and the
//! seccomp profile. The cgroups are made and limited at create ([`cgroup`]).
//!
//! The supervisor keeps the shim's files (`run/shim.pid`, `run/init.pid`,
//! `run/exit.json`), so status, signal, wait and recovery after an agent restart are
//! the runc driver's own code.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

use crate::error::{IoContext, RuntimeError};
use crate::network::{self, WorkerNetwork};
use crate::quota::{DiskQuota, DiskUsage};
use crate::runc::{self, blocking, live_shim};
use crate::shim::{self, ShimReport};
use crate::timing::{micros, StepTimes};
use crate::userns::IdRegistry;
use crate::{exec, logs, spec, util};
use crate::{BundleSpec, ExitRecord, MachineLayout, Runtime, Started, Status};

pub mod cgroup;
pub(crate) mod exec_in;
pub(crate) mod init;
pub mod spawner;

pub use exec_in::NSEXEC_ARG;

/// How long cleanup waits for a supervisor to finish after its Machine was killed.
const SHIM_EXIT_GRACE: Duration = Duration::from_secs(3);
/// How long remove waits for a killed Machine before tearing it down anyway.
const KILL_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct NativeConfig {
    /// Program and leading arguments that run the shim; the spawner is `… spawner`.
    pub shim_command: Vec<OsString>,
    /// Where the spawner's socket lives.
    pub state_dir: PathBuf,
    /// Cap of `output.log` before it rotates.
    pub log_max_bytes: u64,
    /// How long start waits for the supervisor's report.
    pub start_timeout: Duration,
    /// The worker's Machine network; as for [`runc::RuncConfig::network`].
    pub network: Option<Arc<WorkerNetwork>>,
    /// As for [`runc::RuncConfig::id_registry`].
    pub id_registry: IdRegistry,
    /// As for [`runc::RuncConfig::disk_quota`].
    pub disk_quota: Option<DiskQuota>,
}

impl NativeConfig {
    pub fn new(shim_command: Vec<OsString>, state_dir: PathBuf) -> NativeConfig {
        NativeConfig {
            shim_command,
            state_dir,
            log_max_bytes: logs::DEFAULT_MAX_BYTES,
            start_timeout: Duration::from_secs(30),
            network: None,
            id_registry: IdRegistry::new(crate::userns::DEFAULT_REGISTRY),
            disk_quota: None,
        }
    }
}

/// The running spawner: its stdin is the lifeline (closing it ends the spawner).
struct SpawnerProcess {
    _child: tokio::process::Child,
    socket: PathBuf,
}

pub struct NativeRuntime {
    config: NativeConfig,
    cgroups: cgroup::CgroupRoots,
    spawner: Mutex<Option<SpawnerProcess>>,
}

impl std::fmt::Debug for NativeRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeRuntime")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl NativeRuntime {
    /// Fails on a host without the cgroup controllers the driver needs.
    pub fn new(config: NativeConfig) -> Result<NativeRuntime, RuntimeError> {
        let cgroups = cgroup::CgroupRoots::discover().ctx(|| "find cgroup hierarchies".into())?;
        Ok(NativeRuntime {
            config,
            cgroups,
            spawner: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &NativeConfig {
        &self.config
    }

    /// Starts the spawner and waits until it listens.
    async fn spawn_spawner(&self) -> Result<SpawnerProcess, RuntimeError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = &self.config.state_dir;
        fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
        // One socket per spawner: several runtimes (and processes) may share the dir.
        let socket = dir.join(format!(
            "spawner-{}-{}.sock",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let Some((program, leading)) = self.config.shim_command.split_first() else {
            return Err(RuntimeError::Internal("shim command is empty".into()));
        };
        let mut child = tokio::process::Command::new(program)
            .args(leading)
            .arg(spawner::SPAWNER_ARG)
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ctx(|| format!("spawn the spawner {}", Path::new(program).display()))?;
        let Some(stdout) = child.stdout.take() else {
            return Err(RuntimeError::Internal("spawner has no stdout".into()));
        };
        let mut line = String::new();
        let ready = tokio::time::timeout(
            self.config.start_timeout,
            BufReader::new(stdout).read_line(&mut line),
        )
        .await;
        match ready {
            Ok(Ok(_)) if line.trim() == spawner::READY_LINE => Ok(SpawnerProcess {
                _child: child,
                socket,
            }),
            other => Err(RuntimeError::Internal(format!(
                "the spawner did not come up: {other:?} {line:?}"
            ))),
        }
    }

    /// A connection to a live spawner, starting one when there is none or it died.
    async fn connect(&self) -> Result<UnixStream, RuntimeError> {
        let mut spawner = self.spawner.lock().await;
        if let Some(running) = spawner.as_ref() {
            if let Ok(stream) = UnixStream::connect(&running.socket).await {
                return Ok(stream);
            }
        }
        let fresh = self.spawn_spawner().await?;
        let stream = UnixStream::connect(&fresh.socket)
            .await
            .ctx(|| format!("connect to the spawner at {}", fresh.socket.display()))?;
        *spawner = Some(fresh);
        Ok(stream)
    }

    /// Checks and stale state before a start, all cheap syscalls. True when the network
    /// namespace had to be made again (after a host reboot).
    fn before_start(&self, layout: &MachineLayout) -> Result<bool, RuntimeError> {
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
        let repinned = crate::userns::ensure(layout, &self.config.id_registry)?;
        for name in [shim::EXIT_FILE, shim::INIT_PID_FILE] {
            let path = run.join(name);
            util::remove_file_if_exists(&path).ctx(|| format!("remove {}", path.display()))?;
        }
        Ok(repinned)
    }

    /// Makes the Machine's cgroups again with the limits in its `config.json`.
    async fn prepare_cgroups_again(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        let cgroups = self.cgroups.clone();
        let config = layout.config_json();
        let id = layout.id.clone();
        blocking(move || {
            let spec = oci_spec::runtime::Spec::load(&config)
                .map_err(|e| RuntimeError::Internal(format!("read {}: {e}", config.display())))?;
            let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
            cgroups
                .prepare(&id, resources.as_ref())
                .ctx(|| format!("cgroups of machine {id}"))
        })
        .await
    }

    async fn ask_spawner(
        &self,
        layout: &MachineLayout,
        lowerdirs: &[PathBuf],
    ) -> Result<ShimReport, RuntimeError> {
        let id = &layout.id;
        let request = spawner::StartRequest {
            id: id.clone(),
            dir: layout.dir.clone(),
            lowerdirs: lowerdirs.to_vec(),
            cgroup_procs: self.cgroups.procs_files(id),
            log_max_bytes: self.config.log_max_bytes,
        };
        let mut line = serde_json::to_vec(&request)
            .map_err(|e| RuntimeError::Internal(format!("encode start request: {e}")))?;
        line.push(b'\n');
        let mut stream = self.connect().await?;
        stream
            .write_all(&line)
            .await
            .ctx(|| format!("send start of machine {id} to the spawner"))?;
        let mut reply = String::new();
        let read = tokio::time::timeout(
            self.config.start_timeout,
            BufReader::new(stream).read_line(&mut reply),
        )
        .await;
        match read {
            Err(_) => Err(RuntimeError::StartTimeout {
                id: id.clone(),
                timeout: self.config.start_timeout,
            }),
            Ok(Err(e)) => Err(RuntimeError::io(
                format!("read start report of machine {id}"),
                e,
            )),
            Ok(Ok(0)) => Err(RuntimeError::Start {
                driver: "native",
                id: id.clone(),
                message: "the supervisor exited without a report".into(),
            }),
            Ok(Ok(_)) => serde_json::from_str(reply.trim()).map_err(|e| RuntimeError::Start {
                driver: "native",
                id: id.clone(),
                message: format!("bad start report {:?}: {e}", reply.trim()),
            }),
        }
    }

    /// After an exit (or a failed start): waits for the supervisor, removes the run dir.
    fn cleanup_blocking(layout: &MachineLayout) -> Result<(), RuntimeError> {
        let run = layout.run_dir();
        if let Some(pid) = live_shim(&run)? {
            if !runc::wait_process_blocking(pid, SHIM_EXIT_GRACE) {
                runc::kill_pid(pid, libc::SIGKILL);
                runc::wait_process_blocking(pid, SHIM_EXIT_GRACE);
            }
        }
        match fs::remove_dir_all(&run) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(RuntimeError::io(format!("remove {}", run.display()), e))
            }
            _ => Ok(()),
        }
    }

    /// Best-effort teardown after a failed start; the start error is what matters.
    async fn abort_start(&self, layout: &MachineLayout) {
        let layout = layout.clone();
        let _ = blocking(move || {
            if let Ok(Some(pid)) = live_shim(&layout.run_dir()) {
                // The supervisor's pid namespace dies with its init; kill the supervisor,
                // its init (pid 1 there) takes everything else with it.
                if let Ok(Some(init)) =
                    shim::read_pid_file(&layout.run_dir().join(shim::INIT_PID_FILE))
                {
                    runc::kill_pid(init, libc::SIGKILL);
                }
                runc::kill_pid(pid, libc::SIGKILL);
            }
            NativeRuntime::cleanup_blocking(&layout)
        })
        .await;
    }
}

#[async_trait]
impl Runtime for NativeRuntime {
    fn name(&self) -> &'static str {
        "native"
    }

    async fn prepare(&self, layout: &MachineLayout, spec: &BundleSpec) -> Result<(), RuntimeError> {
        let id = layout.id.clone();
        let network = runc::machine_network(self.config.network.as_ref(), &id, spec.private_ip)?;
        let oci = spec::build(spec, &layout.rootfs(), &layout.netns())?;
        let ids = {
            let layout = layout.clone();
            let cgroups = self.cgroups.clone();
            let registry = self.config.id_registry.clone();
            let resources = oci.linux().as_ref().and_then(|l| l.resources().clone());
            let quota = self.config.disk_quota.clone();
            let disk_mb = spec.disk_mb;
            blocking(move || {
                runc::prepare_disk_quota(quota.as_ref(), &layout, disk_mb)?;
                let ids = runc::make_dirs_and_namespaces(&layout, &registry)?;
                cgroups
                    .prepare(&layout.id, resources.as_ref())
                    .ctx(|| format!("cgroups of machine {}", layout.id))?;
                Ok(ids)
            })
            .await?
        };
        let config = spec::render(layout, spec, ids)?;
        if let Some((network, address)) = network {
            network
                .attach(&id, &layout.netns(), address, spec.org.as_deref())
                .await?;
        }
        // Written last: a config.json means the Machine is fully prepared.
        let path = layout.config_json();
        blocking(move || {
            util::write_atomic(&path, &config).ctx(|| format!("write {}", path.display()))
        })
        .await
    }

    async fn start(
        &self,
        layout: &MachineLayout,
        lowerdirs: &[PathBuf],
    ) -> Result<Started, RuntimeError> {
        let t0 = Instant::now();
        let id = layout.id.clone();
        // A handful of stats and unlinks: cheaper inline than a hop to a blocking thread.
        let repinned = self.before_start(layout)?;
        if repinned {
            if let Err(e) = network::reattach(self.config.network.as_deref(), layout).await {
                self.abort_start(layout).await;
                return Err(e);
            }
        }
        // A host reboot (or the doctor's repair) took the cgroups made at create.
        if self
            .cgroups
            .machine_dirs(&id)
            .iter()
            .any(|dir| !dir.exists())
        {
            if let Err(e) = self.prepare_cgroups_again(layout).await {
                self.abort_start(layout).await;
                return Err(e);
            }
        }
        let checked_us = micros(t0.elapsed());
        let report = self.ask_spawner(layout, lowerdirs).await;
        let started = report.and_then(|r| match (r.error, r.pid, r.shim_pid, r.started_at_ms) {
            (None, Some(pid), Some(shim_pid), Some(started_at_ms)) => {
                let total_us = micros(t0.elapsed());
                tracing::debug!(
                    machine = %id,
                    checked_us,
                    supervisor_us = r.create_us,
                    total_us,
                    "machine started"
                );
                let mut steps = StepTimes::new();
                steps.record("checks", checked_us);
                let supervisor_us = r.steps.total_us();
                // The socket round trip, the spawner's fork, and waking this task.
                let hop_us = total_us.saturating_sub(checked_us + supervisor_us);
                steps.record("spawner_hop", hop_us);
                steps.append(r.steps);
                Ok(Started {
                    pid,
                    shim_pid,
                    started_at_ms,
                    steps,
                })
            }
            (Some(message), ..) => Err(RuntimeError::Start {
                driver: "native",
                id: id.clone(),
                message,
            }),
            _ => Err(RuntimeError::Start {
                driver: "native",
                id: id.clone(),
                message: "incomplete start report".into(),
            }),
        });
        if started.is_err() {
            self.abort_start(layout).await;
        }
        started
    }

    async fn signal(&self, layout: &MachineLayout, signal: i32) -> Result<(), RuntimeError> {
        runc::signal_init(layout, signal).await
    }

    async fn wait_exit(
        &self,
        layout: &MachineLayout,
        timeout: Option<Duration>,
    ) -> Result<Option<ExitRecord>, RuntimeError> {
        runc::wait_for_exit(layout, timeout).await
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
        let layout = layout.clone();
        blocking(move || NativeRuntime::cleanup_blocking(&layout)).await
    }

    async fn status(&self, layout: &MachineLayout) -> Result<Status, RuntimeError> {
        runc::read_status(layout).await
    }

    async fn disk_usage(&self, layout: &MachineLayout) -> Result<Option<DiskUsage>, RuntimeError> {
        runc::disk_usage(self.config.disk_quota.as_ref(), layout).await
    }

    async fn remove(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        if matches!(self.status(layout).await?, Status::Running { .. }) {
            self.signal(layout, libc::SIGKILL).await?;
            self.wait_exit(layout, Some(KILL_GRACE)).await?;
        }
        if let Some(network) = &self.config.network {
            network.detach(&layout.id).await?;
        }
        let layout = layout.clone();
        let cgroups = self.cgroups.clone();
        let registry = self.config.id_registry.clone();
        let quota = self.config.disk_quota.clone();
        blocking(move || {
            let id = &layout.id;
            NativeRuntime::cleanup_blocking(&layout)?;
            cgroups
                .remove(id)
                .ctx(|| format!("remove cgroups of machine {id}"))?;
            // Native mounts the rootfs only inside the Machine's mount namespace; a host
            // mount here is the runc driver's, from before the worker switched drivers.
            crate::overlay::unmount(&layout.rootfs())
                .ctx(|| format!("unmount the rootfs of machine {id}"))?;
            runc::release_disk_quota(quota.as_ref(), &layout)?;
            runc::remove_machine_dir(&layout, &registry)
        })
        .await
    }

    async fn exec(
        &self,
        layout: &MachineLayout,
        spec: &exec::ExecSpec,
    ) -> Result<exec::ExecOutput, RuntimeError> {
        let id = &layout.id;
        if spec.cmd.is_empty() {
            return Err(RuntimeError::InvalidSpec {
                id: id.clone(),
                message: "exec needs a command".into(),
            });
        }
        let Some((pid, pid_start)) = running_init(layout).await? else {
            return Err(RuntimeError::NotRunning { id: id.clone() });
        };
        let Some((program, leading)) = self.config.shim_command.split_first() else {
            return Err(RuntimeError::Internal("shim command is empty".into()));
        };
        let mut command = tokio::process::Command::new(program);
        command.args(leading);
        let args = exec_in::NsexecArgs {
            pid,
            pid_start,
            config: layout.config_json(),
            timeout: spec.timeout,
            status_fd: 0,
            cmd: spec.cmd.clone(),
        };
        exec::nsexec(command, args, layout, spec, Path::new(program)).await
    }
}

/// The pid of the Machine's running init and its start time, read in one go with the
/// check that it is the supervisor's child, so the helper can tell it from a process
/// that took the pid later.
async fn running_init(layout: &MachineLayout) -> Result<Option<(u32, u64)>, RuntimeError> {
    let run = layout.run_dir();
    let id = layout.id.clone();
    blocking(move || {
        let Some(shim_pid) = live_shim(&run)? else {
            return Ok(None);
        };
        let init_file = run.join(shim::INIT_PID_FILE);
        let Some(pid) =
            shim::read_pid_file(&init_file).ctx(|| format!("read {}", init_file.display()))?
        else {
            return Ok(None);
        };
        Ok(
            match util::proc_stat(pid).ctx(|| format!("stat machine {id} init"))? {
                Some(st) if st.ppid == shim_pid && st.state != 'Z' => Some((pid, st.start_time)),
                _ => None,
            },
        )
    })
    .await
}
