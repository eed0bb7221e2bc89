//! `berth server` (the control plane alone) and `berth agent` (one worker), for running
//! a platform across processes and hosts. Control plane and agents talk HTTP/JSON,
//! authenticated with the join token.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use berth::endpoints::Endpoints;
use berth::platform::{
    join_token, make_drivers, offered_runtimes, worker_network, Programs, RuntimeKind,
    RuntimeParts, HEARTBEAT_INTERVAL,
};
use berth_agent::{Agent, AgentConfig};
use berth_api::{RegisterWorker, Resources, WorkerRegistered};
use berth_control::serve::{serve, ServeLimits};
use berth_control::{ControlConfig, ControlPlane};
use berth_image::{ImagePuller, ImageStore, RegistryOptions, UnpackLimits};
use clap::Args;
use tracing::{info, warn};

use crate::up::{init_tracing, shutdown_signal};

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address of the public API (and of the agents' registration endpoint).
    #[arg(long, default_value = crate::DEFAULT_API_LISTEN)]
    listen: SocketAddr,
    #[arg(long, default_value = crate::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Where orgs, tokens, apps and the Machine index live: sqlite://PATH (the default is
    /// control.db in --data-dir) or postgres://USER:PASSWORD@HOST:PORT/DB.
    #[arg(long, value_name = "URL", value_parser = berth_control::store::Database::parse)]
    database: Option<berth_control::store::Database>,
    /// How create picks a worker among those with room.
    #[arg(long, value_enum, default_value_t = Placement::Spread)]
    placement: Placement,
    /// A registry the replicas share (HOST[:PORT][/NAMESPACE]): `image import` pushes
    /// there and agents pull imported images from there. Needed to import images when
    /// --database is PostgreSQL.
    #[arg(long, value_name = "HOST[:PORT][/NAMESPACE]")]
    image_registry: Option<String>,
    /// Credentials for --image-registry: a docker-style config.json
    /// (`{"auths": {"host": {"auth": …}}}`), as `berth up --registry-auth` reads.
    #[arg(long, value_name = "FILE", requires = "image_registry")]
    image_registry_auth: Option<PathBuf>,
    /// A registry to reach over plain HTTP (loopback always is); may be repeated.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    insecure_registry: Vec<String>,
    /// Seconds a worker may send no heartbeat before the control plane starts, on other
    /// workers, the standbys (Fly's `config.standbys`) of its started Machines. At least
    /// 10, the time after which a silent worker shows as unreachable.
    #[arg(long, default_value_t = berth_control::standbys::DEFAULT_STANDBY_AFTER.as_secs())]
    standby_after_secs: u64,
    #[command(flatten)]
    api: ApiServeOptions,
}

/// `--image-registry` with its credentials, checked before anything starts.
fn image_registry(
    args: &ServerArgs,
) -> Result<Option<berth_control::shared_images::SharedRegistry>> {
    let Some(text) = &args.image_registry else {
        return Ok(None);
    };
    let credentials = match &args.image_registry_auth {
        Some(path) => berth_image::RegistryCredentials::load(path)
            .with_context(|| format!("--image-registry-auth {}", path.display()))?,
        None => berth_image::RegistryCredentials::default(),
    };
    berth_control::shared_images::SharedRegistry::parse(text, &args.insecure_registry, &credentials)
        .map(Some)
        .map_err(|error| anyhow!("--image-registry: {error}"))
}

/// Limits of the API's HTTP server that hold before auth (`berth up`, `berth server`).
#[derive(Debug, Args)]
pub struct ApiServeOptions {
    /// Seconds a connection has to send a complete request head, counted from when it
    /// waits for one; so also how long an idle kept-alive connection stays open.
    #[arg(long, default_value_t = 10)]
    api_header_timeout_secs: u64,
    /// Open API connections from one client address (IPv4, or IPv6 /64); 0 for no cap
    /// (behind a reverse proxy every client has its address). Past it: 503.
    #[arg(long, default_value_t = 128)]
    api_max_connections_per_client: usize,
    /// Open API connections in all. Past it: 503.
    #[arg(long, default_value_t = 1024)]
    api_max_connections: usize,
}

impl ApiServeOptions {
    pub fn limits(&self) -> Result<ServeLimits> {
        if self.api_header_timeout_secs == 0 || self.api_max_connections == 0 {
            bail!("--api-header-timeout-secs and --api-max-connections must be above 0");
        }
        Ok(ServeLimits {
            header_timeout: Duration::from_secs(self.api_header_timeout_secs),
            max_connections_per_client: (self.api_max_connections_per_client > 0)
                .then_some(self.api_max_connections_per_client),
            max_connections: self.api_max_connections,
        })
    }
}

/// `--placement`: which worker a new Machine goes to among those with room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Placement {
    /// The emptiest worker (fewer Machines share a failure).
    Spread,
    /// The fullest worker that fits (keeps whole workers free).
    Binpack,
}

impl From<Placement> for berth_core::placement::Strategy {
    fn from(placement: Placement) -> Self {
        match placement {
            Placement::Spread => berth_core::placement::Strategy::Spread,
            Placement::Binpack => berth_core::placement::Strategy::Binpack,
        }
    }
}

pub async fn server(args: ServerArgs) -> Result<()> {
    init_tracing();
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create {}", args.data_dir.display()))?;
    let data_dir = args.data_dir.canonicalize()?;
    let admin_token = berth_control::load_or_create_admin_token(&data_dir.join("admin-token"))?;
    let join_token = join_token(&data_dir)?;
    let images = Arc::new(ImageStore::open(
        &data_dir.join("images"),
        UnpackLimits::default(),
    )?);
    let mut config = ControlConfig::new(data_dir.clone(), admin_token, join_token);
    config.placement = args.placement.into();
    config.standby_after = Duration::from_secs(args.standby_after_secs);
    berth_control::standbys::check_delay(config.standby_after)
        .map_err(|error| anyhow!("--standby-after-secs {error}"))?;
    config.image_registry = image_registry(&args)?;
    if let Some(database) = args.database {
        tracing::info!(%database, "control store");
        config.database = Some(database);
    }
    let control = ControlPlane::open(config, images)
        .await
        .map_err(|error| anyhow!("opening the control plane: {}", error.body.message))?;
    let limits = args.api.limits()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    println!(
        "Berth control plane listening on http://{}",
        listener.local_addr()?
    );
    println!(
        "admin token in {}, join token in {}",
        data_dir.join("admin-token").display(),
        data_dir.join("join-token").display()
    );
    serve(listener, control.router(), limits, shutdown_signal()).await?;
    control.close().await;
    Ok(())
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The control plane's URL; several, comma-separated, are replicas: registration and
    /// heartbeats go to whichever answers.
    #[arg(long)]
    control_url: String,
    #[arg(long, env = "BERTH_JOIN_TOKEN", hide_env_values = true)]
    join_token: String,
    /// Address of this agent's API; the control plane must reach it.
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long)]
    name: String,
    #[arg(long, default_value = "local")]
    region: String,
    #[arg(long)]
    cpus: u32,
    #[arg(long)]
    memory_mb: u64,
    #[arg(long)]
    disk_mb: u64,
    #[arg(long, default_value = "runc")]
    runc: PathBuf,
    /// gVisor's runsc; the gvisor driver is offered when it is found.
    #[arg(long, default_value = "runsc")]
    runsc: PathBuf,
    /// The driver of Machines whose `config.runtime` names none: the built-in spawner,
    /// runc on every start, or gVisor. Every driver this host can run is offered either way.
    #[arg(long, value_enum, default_value_t = RuntimeKind::Native)]
    runtime: RuntimeKind,
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    log_max_bytes: u64,
    #[arg(long, default_value_t = 4096)]
    pids_limit: i64,
    /// Let Machines reach the outside world: IPv6 forwarding on and nftables masquerade
    /// of this worker's prefix (needs `nft`). Off by default.
    #[arg(long)]
    egress_nat: bool,
    /// Per-Machine disk quotas (`guest.disk_mb`), enforced by the filesystem of the data
    /// dir (btrfs with quotas enabled): `auto` enforces them where it can and warns at
    /// startup where it cannot, `require` refuses to start there, `off` sets none.
    #[arg(long, default_value = "auto")]
    disk_quota: berth_runtime::quota::QuotaMode,
    /// A port (TCP and UDP) of this host that Machines may connect to, e.g. a DNS
    /// resolver on the bridge; repeat for more. Every other new connection from a
    /// Machine to the host is dropped.
    #[arg(long = "allow-host-port", value_name = "PORT")]
    allow_host_ports: Vec<u16>,
    /// Leave the kernel's RCU grace periods as they are. By default Berth makes them
    /// expedited, host-wide: every start's cgroup moves wait for one, and a normal one
    /// makes a start 15-30 ms instead of ~5 (see docs/PERFORMANCE.md).
    #[arg(long)]
    no_expedite_rcu: bool,
    /// The URL the control plane reaches this agent at, when it is not `--listen` as
    /// given (needed when listening on an unspecified address such as `[::]:4301`).
    #[arg(long)]
    advertise_url: Option<String>,
    /// A registry org tokens may pull from besides the control plane's (a bare HOST
    /// covers every port); may be repeated. Without any, registries whose every address
    /// is public; loopback and private addresses only when listed.
    #[arg(long = "allow-registry", value_name = "HOST[:PORT]")]
    allow_registry: Vec<String>,
}

pub async fn agent(args: AgentArgs) -> Result<()> {
    init_tracing();
    if !nix::unistd::geteuid().is_root() {
        bail!("berth agent runs Machines with runc, overlayfs and namespaces, so it needs root");
    }
    if !args.no_expedite_rcu {
        crate::host_tuning::expedite_rcu();
    }
    let programs = Programs {
        runc: args.runc.clone(),
        runsc: args.runsc.clone(),
    };
    args.runtime.require(&programs)?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create {}", args.data_dir.display()))?;
    let data_dir = args.data_dir.canonicalize()?;
    let capacity = Resources {
        cpus: args.cpus,
        memory_mb: args.memory_mb,
        disk_mb: args.disk_mb,
    };
    // Join first: the control plane hands out the worker's network prefix.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let bound = listener.local_addr()?;
    let url = match &args.advertise_url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None if bound.ip().is_unspecified() => bail!(
            "--listen {bound} is every address of this host: say which one the control \
             plane should call with --advertise-url"
        ),
        None => format!("http://{bound}"),
    };
    let registration = RegisterWorker {
        name: args.name.clone(),
        region: args.region.clone(),
        url: url.clone(),
        capacity,
        runtimes: offered_runtimes(args.runtime, &programs),
    };
    let endpoints = Endpoints::parse(&args.control_url).context("--control-url")?;
    let link = ControlLink::new(endpoints, &args.join_token)?;
    let prefix = link.register_until_accepted(&registration).await;
    info!(worker = %args.name, %url, machine_prefix = %prefix, "registered with the control plane");
    let (network, machine_prefix) =
        worker_network(&prefix, args.egress_nat, &args.allow_host_ports).await?;
    let images = Arc::new(ImageStore::open(
        &data_dir.join("images"),
        UnpackLimits::default(),
    )?);
    // One pull path: images come from the control plane's registry, like any registry's.
    let puller = Arc::new(ImagePuller::new(
        images,
        RegistryOptions {
            allowed: args.allow_registry.clone(),
            ..control_registry(link.endpoints.first(), &args.join_token)?
        },
    ));
    let shim_command: Vec<OsString> =
        vec![std::env::current_exe()?.into_os_string(), "shim".into()];
    let drivers = make_drivers(RuntimeParts {
        kind: args.runtime,
        programs,
        shim_command,
        worker_dir: data_dir.clone(),
        log_max_bytes: args.log_max_bytes,
        network: Some(network),
        disk_quota: args.disk_quota,
    })?;
    let agent = Agent::open_with_drivers(
        AgentConfig {
            data_dir: data_dir.clone(),
            name: args.name.clone(),
            region: args.region,
            pids_limit: args.pids_limit,
            capacity,
            machine_prefix: Some(machine_prefix),
            join_token: Some(args.join_token.clone()),
        },
        drivers,
        puller,
    )
    .await?;
    let router = berth_agent::http::router(Arc::new(agent.clone()), &args.join_token);
    // Only the control plane calls the agent, from one address: no per-client cap.
    let limits = ServeLimits {
        max_connections_per_client: None,
        ..ServeLimits::default()
    };
    let server = tokio::spawn(serve(listener, router, limits, shutdown_signal()));
    let heartbeat = tokio::spawn(link.heartbeat_forever(registration, agent.clone()));
    server.await.context("agent API task")??;
    heartbeat.abort();
    info!("agent shutting down; running machines keep running");
    agent.store().close().await;
    Ok(())
}

/// Pull settings that make the control plane's `/v2` the default registry, with the join
/// token as the password.
fn control_registry(control_url: &str, join_token: &str) -> Result<RegistryOptions> {
    let host = control_url
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_owned();
    if host.is_empty() || host.contains('/') {
        bail!("--control-url must be http(s)://HOST:PORT, got {control_url:?}");
    }
    let mut options = RegistryOptions::default();
    options.credentials.insert(&host, "agent", join_token);
    if control_url.starts_with("http://") {
        options.insecure.push(host.clone());
    }
    options.default_registry = Some(host);
    Ok(options)
}

/// The agent's side of the control plane conversation: registration and heartbeats,
/// each with a deadline, retried until they get through.
struct ControlLink {
    http: reqwest::Client,
    endpoints: Endpoints,
    join_token: String,
}

impl ControlLink {
    fn new(endpoints: Endpoints, join_token: &str) -> Result<ControlLink> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            // Below the API's header timeout, which closes idle connections.
            .pool_idle_timeout(Duration::from_secs(5))
            .build()?;
        Ok(ControlLink {
            http,
            endpoints,
            join_token: join_token.to_owned(),
        })
    }

    async fn register(&self, registration: &RegisterWorker) -> Result<String> {
        let request = self
            .http
            .post(format!(
                "{}/v1/internal/workers/register",
                self.endpoints.first()
            ))
            .bearer_auth(&self.join_token)
            .json(registration)
            .build()?;
        // Registering again changes nothing: any replica may take it.
        let response = self.endpoints.send_repeatable(&self.http, request).await?;
        if !response.status().is_success() {
            bail!(
                "the control plane refused the registration: {} {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        Ok(response.json::<WorkerRegistered>().await?.machine_prefix)
    }

    async fn register_until_accepted(&self, registration: &RegisterWorker) -> String {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.register(registration).await {
                Ok(prefix) => return prefix,
                Err(error) => {
                    warn!(%error, "registering with the control plane; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn heartbeat_forever(self, registration: RegisterWorker, agent: Agent) {
        let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
        loop {
            tick.tick().await;
            let stats = match agent.stats().await {
                Ok(stats) => stats,
                Err(error) => {
                    warn!(%error, "collecting heartbeat stats");
                    continue;
                }
            };
            let request = self
                .http
                .post(format!(
                    "{}/v1/internal/workers/{}/heartbeat",
                    self.endpoints.first(),
                    registration.name
                ))
                .bearer_auth(&self.join_token)
                .json(&stats)
                .build();
            let sent = match request {
                // A heartbeat sent twice does no harm.
                Ok(request) => self.endpoints.send_repeatable(&self.http, request).await,
                Err(error) => Err(error),
            };
            match sent {
                Ok(response) if response.status() == reqwest::StatusCode::NOT_FOUND => {
                    // The control plane lost its record of this worker: join again.
                    self.register_until_accepted(&registration).await;
                }
                Ok(_) => {}
                Err(error) => warn!(%error, "heartbeat did not reach the control plane"),
            }
        }
    }
}
