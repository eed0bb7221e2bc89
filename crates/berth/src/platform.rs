//! Wiring: the image store, the runc runtime, the agents and the control plane, in one
//! process. Used by `berth up` and by the bench harness, so both run the same thing.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use berth_agent::{Agent, AgentConfig, Drivers};
use berth_api::{RegisterWorker, Resources};
use berth_control::{ControlConfig, ControlPlane};
use berth_core::billing::Prices;
use berth_image::{ImagePuller, ImageStore, RegistryOptions, UnpackLimits};
use berth_runtime::gvisor::{GvisorConfig, GvisorRuntime};
use berth_runtime::host::HostConfig;
use berth_runtime::native::{NativeConfig, NativeRuntime};
use berth_runtime::network::{Ipv6Net, NetworkConfig, WorkerNetwork};
use berth_runtime::quota::{DiskQuota, QuotaMode, QuotaSupport};
use berth_runtime::runc::{RuncConfig, RuncRuntime};
use berth_runtime::userns::{self, IdRegistry};
use berth_runtime::Runtime;
use tracing::{info, warn};

/// The name of the in-process worker when there is one.
pub const LOCAL_WORKER: &str = "local";
/// How often a worker reports its use to the control plane.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// A driver that runs Machines. A worker offers every one this host can run; `--runtime`
/// picks the default, for Machines whose `config.runtime` names none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RuntimeKind {
    /// The built-in spawner: start forks, no runc on the start path.
    #[default]
    Native,
    /// runc create and runc start on every start.
    Runc,
    /// gVisor's runsc: a kernel in user space per Machine; the driver that can suspend.
    Gvisor,
}

/// The programs the drivers run, as given on the command line (`--runc`, `--runsc`):
/// a name looked up on PATH, or a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Programs {
    pub runc: PathBuf,
    pub runsc: PathBuf,
}

impl Default for Programs {
    fn default() -> Programs {
        Programs {
            runc: PathBuf::from("runc"),
            runsc: PathBuf::from("runsc"),
        }
    }
}

impl RuntimeKind {
    /// Every driver, in the order a worker tries to offer them.
    pub const ALL: [RuntimeKind; 3] = [RuntimeKind::Native, RuntimeKind::Runc, RuntimeKind::Gvisor];

    /// Its name in `config.runtime` and in a worker's `runtimes`.
    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Native => "native",
            RuntimeKind::Runc => "runc",
            RuntimeKind::Gvisor => "gvisor",
        }
    }

    /// Its program on this host, when it needs one: `None` when that is not installed.
    fn program(self, programs: &Programs) -> Option<Option<PathBuf>> {
        match self {
            RuntimeKind::Native => Some(None),
            RuntimeKind::Runc => find_program(&programs.runc).map(Some),
            RuntimeKind::Gvisor => find_program(&programs.runsc).map(Some),
        }
    }

    /// Fails, naming the program and its package, when this driver cannot run here: the
    /// default driver must.
    pub fn require(self, programs: &Programs) -> Result<()> {
        match (self, self.program(programs)) {
            (_, Some(_)) => Ok(()),
            (RuntimeKind::Gvisor, None) => Err(anyhow!(
                "cannot find {:?}; install runsc (Debian's package of gVisor)",
                programs.runsc
            )),
            (_, None) => Err(anyhow!(
                "cannot find the OCI runtime {:?}; install runc",
                programs.runc
            )),
        }
    }
}

/// The names of the drivers [`make_drivers`] offers with these programs, sorted as a
/// worker reports them: what a worker registers with before its drivers are made (they
/// need the network its registration hands out).
pub fn offered_runtimes(default: RuntimeKind, programs: &Programs) -> Vec<String> {
    let mut names: Vec<String> = RuntimeKind::ALL
        .into_iter()
        .filter(|kind| *kind == default || kind.program(programs).is_some())
        .map(|kind| kind.name().to_owned())
        .collect();
    names.sort();
    names
}

/// What a worker's drivers are made from.
pub struct RuntimeParts {
    /// The default driver.
    pub kind: RuntimeKind,
    /// runc and runsc, as given (`--runc`, `--runsc`); each driver is offered when its
    /// program is found.
    pub programs: Programs,
    pub shim_command: Vec<OsString>,
    /// The worker's data dir: runc keeps `runc/` there, the native spawner `native/`.
    pub worker_dir: PathBuf,
    pub log_max_bytes: u64,
    pub network: Option<Arc<WorkerNetwork>>,
    /// Whether each Machine's disk gets a quota (`--disk-quota`).
    pub disk_quota: QuotaMode,
}

/// The drivers of one worker: `parts.kind` as the default, and beside it every other
/// driver this host can run. The default must be runnable.
pub fn make_drivers(parts: RuntimeParts) -> Result<Drivers> {
    let disk_quota = disk_quota(&parts.worker_dir, parts.disk_quota)?;
    // Beside `machines/`, so a Machine's directory is renamed there, not copied.
    let removed_dir = parts.worker_dir.join("removed");
    berth_runtime::host::sweep_removed(&removed_dir);
    let host = HostConfig {
        network: parts.network.clone(),
        id_registry: IdRegistry::new(userns::DEFAULT_REGISTRY),
        disk_quota,
        removed_dir: Some(removed_dir),
    };
    let default = make_driver(parts.kind, &parts, &host)?
        .with_context(|| format!("the {} runtime cannot run on this host", parts.kind.name()))?;
    let mut drivers = Drivers::new(parts.kind.name(), default);
    for kind in RuntimeKind::ALL {
        if kind == parts.kind {
            continue;
        }
        match make_driver(kind, &parts, &host)? {
            Some(driver) => drivers = drivers.with(kind.name(), driver),
            None => info!(
                runtime = kind.name(),
                "not offered: its program is not installed"
            ),
        }
    }
    Ok(drivers)
}

/// One driver, or `None` when this host lacks its program.
fn make_driver(
    kind: RuntimeKind,
    parts: &RuntimeParts,
    host: &HostConfig,
) -> Result<Option<Arc<dyn Runtime>>> {
    let start_timeout = Duration::from_secs(30);
    let Some(program) = kind.program(&parts.programs) else {
        return Ok(None);
    };
    Ok(match kind {
        RuntimeKind::Gvisor => match program {
            Some(runsc_binary) => {
                let mut config = GvisorConfig::new(parts.shim_command.clone());
                config.runsc_binary = runsc_binary;
                // Beside runc's: recovery reads both to tell a host restart.
                config.runsc_root = parts.worker_dir.join("runsc");
                config.init_path = parts.worker_dir.join("gvisor-init").join("berth-init");
                config.log_max_bytes = parts.log_max_bytes;
                config.start_timeout = start_timeout;
                config.host = host.clone();
                Some(
                    Arc::new(GvisorRuntime::new(config).context("the gvisor runtime")?)
                        as Arc<dyn Runtime>,
                )
            }
            None => None,
        },
        RuntimeKind::Runc => program.map(|runc_binary| {
            Arc::new(RuncRuntime::new(RuncConfig {
                runc_binary,
                runc_root: parts.worker_dir.join("runc"),
                shim_command: parts.shim_command.clone(),
                log_max_bytes: parts.log_max_bytes,
                start_timeout,
                host: host.clone(),
            })) as Arc<dyn Runtime>
        }),
        RuntimeKind::Native => Some(Arc::new(
            NativeRuntime::new(NativeConfig {
                shim_command: parts.shim_command.clone(),
                state_dir: parts.worker_dir.join("native"),
                log_max_bytes: parts.log_max_bytes,
                start_timeout,
                host: host.clone(),
            })
            .context("the native runtime")?,
        )),
    })
}

/// Checks once, at startup, whether the worker's Machines dir can enforce disk quotas;
/// says so in the log when it cannot, and refuses to go on under `require`.
fn disk_quota(worker_dir: &Path, mode: QuotaMode) -> Result<Option<DiskQuota>> {
    let machines = worker_dir.join("machines");
    std::fs::create_dir_all(&machines).with_context(|| format!("create {}", machines.display()))?;
    match QuotaSupport::detect(&machines, mode).map_err(|why| anyhow!(why))? {
        QuotaSupport::Enforced(quota) => {
            info!(dir = %machines.display(), "per-Machine disk quotas are enforced");
            Ok(Some(quota))
        }
        QuotaSupport::NotEnforced(why) => {
            if mode != QuotaMode::Off {
                warn!(dir = %machines.display(), %why, "per-Machine disk quotas are NOT enforced: a Machine can fill this disk");
            }
            Ok(None)
        }
    }
}

#[derive(Debug, Clone)]
pub struct PlatformOptions {
    /// Which driver runs the Machines.
    pub runtime: RuntimeKind,
    pub data_dir: PathBuf,
    /// runc and runsc, as given.
    pub programs: Programs,
    /// Program and leading arguments that run the shim.
    pub shim_command: Vec<OsString>,
    pub region: String,
    pub log_max_bytes: u64,
    pub pids_limit: i64,
    pub prices: Prices,
    /// In-process workers, each with its own data dir, for trying placement on one host.
    pub workers: usize,
    /// What each in-process worker offers.
    pub worker_capacity: Resources,
    /// Credentials, insecure hosts and the default registry for pulls.
    pub registry: RegistryOptions,
    /// Cap on each of exec's stdout and stderr; the control plane's default when `None`.
    pub exec_max_output_bytes: Option<usize>,
    /// Changes to the built-in default quotas and rate limits of every org.
    pub default_limits: Option<berth_api::SetOrgLimitsRequest>,
    /// Masquerade the workers' Machine networks to the host's uplinks (off by default).
    pub egress_nat: bool,
    /// Ports of the host the Machines may connect to (none by default).
    pub allow_host_ports: Vec<u16>,
    /// How create picks among the in-process workers.
    pub placement: berth_core::placement::Strategy,
    /// Whether each Machine's disk gets a quota.
    pub disk_quota: QuotaMode,
    /// Where the control plane keeps its state; `control.db` in the data dir when `None`.
    pub database: Option<berth_control::store::Database>,
}

pub struct LocalPlatform {
    pub data_dir: PathBuf,
    pub admin_token: String,
    /// The first worker; `agents` holds them all.
    pub agent: Agent,
    pub agents: Vec<(String, Agent)>,
    pub control: Arc<ControlPlane>,
    /// Shared by the agent's creates and `POST /v1/images/pull`.
    pub puller: Arc<ImagePuller>,
}

/// What a worker on this host offers by default: CPU is a CFS quota and overcommits well,
/// so eight per core; memory and disk as the host has them.
pub fn host_capacity(data_dir: &Path) -> Resources {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let memory_mb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(1024);
    let disk_mb = nix::sys::statvfs::statvfs(data_dir)
        .map(|stat| stat.blocks() * stat.fragment_size() / (1024 * 1024))
        .unwrap_or(100 * 1024);
    Resources {
        cpus: cores * 8,
        memory_mb,
        disk_mb,
    }
}

/// Opens (or makes) the join token of a control plane's data dir.
pub fn join_token(data_dir: &Path) -> Result<String> {
    let path = data_dir.join("join-token");
    berth_control::load_or_create_token(&path, "berthjoin")
        .with_context(|| format!("write {}", path.display()))
}

impl LocalPlatform {
    pub async fn open(options: PlatformOptions) -> Result<LocalPlatform> {
        std::fs::create_dir_all(&options.data_dir)
            .with_context(|| format!("create {}", options.data_dir.display()))?;
        let data_dir = options.data_dir.canonicalize()?;
        let token_path = data_dir.join("admin-token");
        let admin_token = berth_control::load_or_create_admin_token(&token_path)
            .with_context(|| format!("write {}", token_path.display()))?;
        let join_token = join_token(&data_dir)?;
        let images = Arc::new(ImageStore::open(
            &data_dir.join("images"),
            UnpackLimits::default(),
        )?);
        let puller = Arc::new(ImagePuller::new(images, options.registry));
        let mut control_config =
            ControlConfig::new(data_dir.clone(), admin_token.clone(), join_token);
        control_config.prices = options.prices;
        control_config.placement = options.placement;
        control_config.database = options.database.clone();
        // One process with its workers: never a replica beside others.
        control_config.sole = true;
        if let Some(bytes) = options.exec_max_output_bytes {
            control_config.exec_max_output_bytes = bytes;
        }
        if let Some(changes) = &options.default_limits {
            control_config.default_limits =
                berth_control::limits::effective(&control_config.default_limits, changes);
        }
        let control = ControlPlane::open_with_puller(control_config, puller.clone())
            .await
            .map_err(|error| anyhow!("opening the control plane: {}", error.body.message))?;
        let mut agents = Vec::new();
        let mut services = Vec::new();
        for index in 0..options.workers.max(1) {
            // One worker keeps the plain names, so a data dir from a one-worker run stays valid.
            let (name, dir) = if options.workers <= 1 {
                (LOCAL_WORKER.to_owned(), data_dir.join("worker"))
            } else {
                (
                    format!("{LOCAL_WORKER}-{}", index + 1),
                    data_dir.join(format!("worker-{}", index + 1)),
                )
            };
            let prefix = control.worker_prefix(&name).await.map_err(|error| {
                anyhow!(
                    "the network prefix of worker {name}: {}",
                    error.body.message
                )
            })?;
            let (network, machine_prefix) =
                worker_network(&prefix, options.egress_nat, &options.allow_host_ports).await?;
            let drivers = make_drivers(RuntimeParts {
                kind: options.runtime,
                programs: options.programs.clone(),
                shim_command: options.shim_command.clone(),
                worker_dir: dir.clone(),
                log_max_bytes: options.log_max_bytes,
                network: Some(network),
                disk_quota: options.disk_quota,
            })?;
            let agent = Agent::open_with_drivers(
                AgentConfig {
                    data_dir: dir,
                    name: name.clone(),
                    region: options.region.clone(),
                    pids_limit: options.pids_limit,
                    capacity: options.worker_capacity,
                    machine_prefix: Some(machine_prefix),
                    join_token: None,
                },
                drivers,
                puller.clone(),
            )
            .await?;
            let registration = RegisterWorker {
                name: name.clone(),
                region: options.region.clone(),
                url: String::new(),
                capacity: options.worker_capacity,
                runtimes: agent.runtimes(),
            };
            let service: Arc<dyn berth_agent::WorkerService> = Arc::new(agent.clone());
            control
                .add_local_worker(registration, service.clone())
                .await
                .map_err(|error| anyhow!("registering worker {name}: {}", error.body.message))?;
            spawn_local_heartbeat(control.clone(), name.clone(), agent.clone());
            services.push((name.clone(), service));
            agents.push((name, agent));
        }
        // Each in-process worker reaches the others directly as a migration's source.
        for (_, agent) in &agents {
            for (name, service) in &services {
                agent.add_peer(name, service);
            }
        }
        let agent = agents
            .first()
            .map(|(_, agent)| agent.clone())
            .context("no worker")?;
        Ok(LocalPlatform {
            data_dir,
            admin_token,
            agent,
            agents,
            control,
            puller,
        })
    }

    pub async fn close(&self) {
        self.control.close().await;
        for (_, agent) in &self.agents {
            agent.store().close().await;
        }
    }
}

/// The worker's bridge: named after its prefix, so several workers on one host (or
/// several test platforms) never share one.
pub fn bridge_name(prefix: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(prefix.as_bytes());
    format!("bz{}", &hex_string(&digest)[..12])
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Makes (or finds) the worker's bridge for its /64. Called once at agent start, before
/// any Machine is attached: a host reboot drops the bridge too.
pub async fn worker_network(
    prefix: &str,
    egress_nat: bool,
    allow_host_ports: &[u16],
) -> Result<(Arc<WorkerNetwork>, Ipv6Net)> {
    let net: Ipv6Net = prefix
        .parse()
        .with_context(|| format!("the control plane gave a bad prefix {prefix:?}"))?;
    let config = NetworkConfig {
        egress_nat,
        allow_host_ports: allow_host_ports.to_vec(),
        ..NetworkConfig::new(bridge_name(prefix), net)
    };
    let network = WorkerNetwork::ensure(config)
        .await
        .with_context(|| format!("setting up the Machine network {prefix}"))?;
    Ok((Arc::new(network), net))
}

fn spawn_local_heartbeat(control: Arc<ControlPlane>, name: String, agent: Agent) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
        loop {
            tick.tick().await;
            match agent.stats().await {
                Ok(stats) => {
                    if let Err(error) = control.local_heartbeat(&name, stats).await {
                        warn!(worker = %name, error = %error.body.message, "recording a heartbeat");
                    }
                }
                Err(error) => warn!(worker = %name, %error, "collecting heartbeat stats"),
            }
        }
    });
}

/// Finds a program on PATH (and in the sbin directories, where Debian puts runc).
pub fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_is_offered_beside_the_default_only_where_it_is_found() {
        let missing = Programs {
            runc: "/nonexistent/runc".into(),
            runsc: "/nonexistent/runsc".into(),
        };
        assert_eq!(offered_runtimes(RuntimeKind::Native, &missing), ["native"]);
        let dir = tempfile::tempdir().expect("tempdir");
        let runc = dir.path().join("runc");
        std::fs::write(&runc, "").expect("a runc");
        let with_runc = Programs {
            runc: runc.clone(),
            ..missing.clone()
        };
        for default in [RuntimeKind::Native, RuntimeKind::Runc] {
            assert_eq!(offered_runtimes(default, &with_runc), ["native", "runc"]);
        }
        // Without the gvisor kind, runsc on the host changed nothing: it was never offered.
        let runsc = dir.path().join("runsc");
        std::fs::write(&runsc, "").expect("a runsc");
        let with_both = Programs {
            runc,
            runsc: runsc.clone(),
        };
        assert_eq!(
            offered_runtimes(RuntimeKind::Native, &with_both),
            ["gvisor", "native", "runc"]
        );
        let with_runsc = Programs {
            runsc,
            ..missing.clone()
        };
        assert_eq!(
            offered_runtimes(RuntimeKind::Native, &with_runsc),
            ["gvisor", "native"]
        );
        RuntimeKind::Gvisor.require(&with_runsc).expect("found");
        let error = RuntimeKind::Gvisor
            .require(&missing)
            .expect_err("no runsc")
            .to_string();
        assert!(error.contains("install runsc"), "{error}");
        RuntimeKind::Native
            .require(&missing)
            .expect("needs nothing");
        // Every driver a worker can offer is one a Machine may name.
        for kind in RuntimeKind::ALL {
            assert!(
                berth_core::validate::RUNTIMES.contains(&kind.name()),
                "{kind:?}"
            );
        }
    }
}
