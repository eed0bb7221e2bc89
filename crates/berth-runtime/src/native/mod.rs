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
//! The supervisor keeps the run directory's files ([`crate::host::RunDir`]), so status,
//! signal, wait and recovery after an agent restart are the host layer's, shared with
//! every driver.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

use crate::error::{IoContext, RuntimeError};
use crate::host::process::kill_pid;
use crate::host::run_dir::RunDir;
use crate::host::{self, blocking, prepare, teardown, HostConfig};
use crate::network;
use crate::supervisor::{self, Report};
use crate::timing::{micros, StepTimes};
use crate::{exec, logs};
use crate::{BundleSpec, MachineLayout, Runtime, Started};

pub mod cgroup;
pub(crate) mod devices;
pub(crate) mod exec_in;
pub(crate) mod init;
pub mod spawner;
pub(crate) mod syscall;

pub use exec_in::NSEXEC_ARG;

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
    /// The network, id registry and disk quotas.
    pub host: HostConfig,
}

impl NativeConfig {
    pub fn new(shim_command: Vec<OsString>, state_dir: PathBuf) -> NativeConfig {
        NativeConfig {
            shim_command,
            state_dir,
            log_max_bytes: logs::DEFAULT_MAX_BYTES,
            start_timeout: Duration::from_secs(30),
            host: HostConfig::default(),
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
    ) -> Result<Report, RuntimeError> {
        let id = &layout.id;
        let request = spawner::StartRequest {
            id: id.clone(),
            dir: layout.dir.clone(),
            lowerdirs: lowerdirs.to_vec(),
            cgroup_procs: self.cgroups.procs_files(id),
            cgroup_v2: self.cgroups.v2_dir(id),
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
        supervisor::read_report(stream, self.config.start_timeout, "native", id).await
    }

    /// After an exit (or a failed start): waits for the supervisor, removes the run dir.
    fn end_run(layout: &MachineLayout) -> Result<(), RuntimeError> {
        let run = RunDir::of(layout);
        teardown::wait_for_supervisor(&run)?;
        run.remove()
    }

    /// Best-effort teardown after a failed start; the start error is what matters.
    async fn abort_start(&self, layout: &MachineLayout) {
        let layout = layout.clone();
        let _ = blocking(move || {
            let run = RunDir::of(&layout);
            if let Ok(Some(pid)) = run.live_shim() {
                // The supervisor's pid namespace dies with its init; kill the supervisor,
                // its init (pid 1 there) takes everything else with it.
                if let Ok(Some(init)) = run.read_init_pid() {
                    kill_pid(init, libc::SIGKILL);
                }
                kill_pid(pid, libc::SIGKILL);
            }
            NativeRuntime::end_run(&layout)
        })
        .await;
    }
}

#[async_trait]
impl Runtime for NativeRuntime {
    fn name(&self) -> &'static str {
        "native"
    }

    async fn freeze(&self, layout: &MachineLayout, frozen: bool) -> Result<(), RuntimeError> {
        let Some(dir) = self.cgroups.v2_dir(&layout.id) else {
            return Err(RuntimeError::Unsupported {
                driver: "native",
                what: "freeze (no unified cgroup hierarchy)",
            });
        };
        let id = layout.id.clone();
        crate::host::blocking(move || {
            cgroup::freeze(&dir, frozen).map_err(|error| RuntimeError::Freeze {
                id,
                message: error.to_string(),
            })
        })
        .await
    }

    async fn prepare(&self, layout: &MachineLayout, spec: &BundleSpec) -> Result<(), RuntimeError> {
        let cgroups = self.cgroups.clone();
        let make_cgroups = move |layout: &MachineLayout, oci: &oci_spec::runtime::Spec| {
            let resources = oci.linux().as_ref().and_then(|l| l.resources().as_ref());
            cgroups
                .prepare(&layout.id, resources)
                .ctx(|| format!("cgroups of machine {}", layout.id))
        };
        prepare::prepare(
            &self.config.host,
            layout,
            spec,
            make_cgroups,
            |_, config| Ok(config),
        )
        .await
    }

    async fn start(
        &self,
        layout: &MachineLayout,
        lowerdirs: &[PathBuf],
    ) -> Result<Started, RuntimeError> {
        let id = layout.id.clone();
        let t0 = Instant::now();
        // A handful of stats and unlinks: cheaper inline than a hop to a blocking thread.
        let repinned = prepare::before_start(layout, &self.config.host.id_registry, || Ok(()))?;
        if repinned {
            if let Err(e) = network::reattach(self.config.host.network.as_deref(), layout).await {
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
        let started = report
            .and_then(|r| r.into_started("native", &id))
            .map(|mut started| {
                let total_us = micros(t0.elapsed());
                let supervisor_us = started.steps.total_us();
                tracing::debug!(machine = %id, checked_us, supervisor_us, total_us, "machine started");
                let mut steps = StepTimes::new();
                steps.record("checks", checked_us);
                // The socket round trip, the spawner's fork, and waking this task.
                let hop_us = total_us.saturating_sub(checked_us + supervisor_us);
                steps.record("spawner_hop", hop_us);
                steps.append(std::mem::take(&mut started.steps));
                started.steps = steps;
                started
            });
        host::settle_start(started, self.abort_start(layout)).await
    }

    async fn cleanup(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        let layout = layout.clone();
        blocking(move || NativeRuntime::end_run(&layout)).await
    }

    async fn remove(&self, layout: &MachineLayout) -> Result<(), RuntimeError> {
        let cgroups = self.cgroups.clone();
        teardown::remove(&self.config.host, layout, move |layout| {
            let id = &layout.id;
            NativeRuntime::end_run(layout)?;
            cgroups
                .remove(id)
                .ctx(|| format!("remove cgroups of machine {id}"))?;
            // Native mounts the rootfs only inside the Machine's mount namespace; a host
            // mount here is the runc driver's, from before the worker switched drivers.
            crate::overlay::unmount(&layout.rootfs())
                .ctx(|| format!("unmount the rootfs of machine {id}"))
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
        let run = RunDir::of(layout);
        let Some(init) = blocking(move || run.live_init()).await? else {
            return Err(RuntimeError::NotRunning { id: id.clone() });
        };
        let Some((program, leading)) = self.config.shim_command.split_first() else {
            return Err(RuntimeError::Internal("shim command is empty".into()));
        };
        let mut command = tokio::process::Command::new(program);
        command.args(leading);
        let args = exec_in::NsexecArgs {
            pid: init.pid,
            pid_start: init.start_time,
            config: layout.config_json(),
            timeout: spec.timeout,
            status_fd: crate::helper::STATUS_FD,
            cmd: spec.cmd.clone(),
        };
        exec::run_helper(command, args.to_args(), layout, spec, Path::new(program)).await
    }

    fn host_config(&self) -> Option<&HostConfig> {
        Some(&self.config.host)
    }
}
