//! `berth up`: the whole platform in one process, on an embedded store.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use berth::platform::{host_capacity, LocalPlatform, PlatformOptions, Programs, RuntimeKind};
use berth_api::Resources;
use berth_core::billing::Prices;
use berth_image::{ImageReference, RegistryCredentials, RegistryOptions};
use clap::Args;
use tracing::info;

use crate::{DEFAULT_API_LISTEN, DEFAULT_DATA_DIR};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where all state lives: stores, images, Machine disks, logs.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Address of the HTTP API.
    #[arg(long, default_value = DEFAULT_API_LISTEN)]
    api_listen: SocketAddr,
    /// Import a busybox image, boot a Machine that serves HTTP, and report timings.
    #[arg(long)]
    demo: bool,
    /// The OCI runtime binary (for `--runtime runc`).
    #[arg(long, default_value = "runc")]
    runc: PathBuf,
    /// gVisor's runsc (for `--runtime gvisor`); the gvisor driver is offered when found.
    #[arg(long, default_value = "runsc")]
    runsc: PathBuf,
    /// What runs Machines whose `config.runtime` names none: the built-in spawner, runc on
    /// every start, or gVisor. Every driver this host can run is offered either way.
    #[arg(long, value_enum, default_value_t = RuntimeKind::Native)]
    runtime: RuntimeKind,
    /// Region label of this worker.
    #[arg(long, default_value = "local")]
    region: String,
    /// Cap on each Machine's captured output before it rotates.
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    log_max_bytes: u64,
    /// Most processes inside one Machine.
    #[arg(long, default_value_t = 4096)]
    pids_limit: i64,
    /// Let Machines reach the outside world: IPv6 forwarding on and nftables masquerade
    /// of the workers' prefixes (needs `nft`). Off by default.
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
    /// How create picks among the `--workers`: the emptiest (`spread`) or the fullest
    /// that fits (`binpack`).
    #[arg(long, value_enum, default_value_t = crate::cluster::Placement::Spread)]
    placement: crate::cluster::Placement,
    /// Leave the kernel's RCU grace periods as they are. By default Berth makes them
    /// expedited, host-wide: every start's cgroup moves wait for one, and a normal one
    /// makes a start 15-30 ms instead of ~5 (see docs/PERFORMANCE.md).
    #[arg(long)]
    no_expedite_rcu: bool,
    /// In-process workers, each with its own data dir, for trying placement on one host.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Where the control plane keeps orgs, tokens, apps and the Machine index:
    /// sqlite://PATH (the default is control.db in --data-dir) or
    /// postgres://USER:PASSWORD@HOST:PORT/DB, as `berth server --database`. `berth up` is
    /// one process: its database is its own, never shared with `berth server` replicas.
    #[arg(long, value_name = "URL", value_parser = berth_control::store::Database::parse)]
    database: Option<berth_control::store::Database>,
    /// CPUs each in-process worker offers (default: 8 per host core).
    #[arg(long)]
    worker_cpus: Option<u32>,
    /// Memory each in-process worker offers, in MB (default: the host's).
    #[arg(long)]
    worker_memory_mb: Option<u64>,
    /// Disk each in-process worker offers, in MB (default: the data dir's filesystem).
    #[arg(long)]
    worker_disk_mb: Option<u64>,
    /// Price of one vCPU-second of running time.
    #[arg(long, default_value_t = Prices::default().per_vcpu_second)]
    price_vcpu_second: f64,
    /// Price of one GB-second of memory while running.
    #[arg(long, default_value_t = Prices::default().per_gb_second)]
    price_gb_second: f64,
    /// Price of one GB-month of Machine storage (billed while the Machine exists).
    #[arg(long, default_value_t = Prices::default().per_gb_month_storage)]
    price_gb_month: f64,
    /// Registry credentials: a docker-style config.json (`{"auths": {"host": {"auth": …}}}`).
    #[arg(long, value_name = "FILE")]
    registry_auth: Option<PathBuf>,
    /// A registry to reach over plain HTTP (loopback always is); may be repeated.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    insecure_registry: Vec<String>,
    /// Where image names without a registry are pulled from when no local tag matches.
    #[arg(long, value_name = "HOST[:PORT]")]
    default_registry: Option<String>,
    /// A registry org tokens may pull from (a bare HOST covers every port); may be
    /// repeated. Without any, org tokens may pull from registries whose every address is
    /// public; loopback and private addresses need to be listed here either way. The
    /// admin token and the default registry are not limited.
    #[arg(long = "allow-registry", value_name = "HOST[:PORT]")]
    allow_registry: Vec<String>,
    /// Cap on each of exec's stdout and stderr, in bytes.
    #[arg(long, default_value_t = berth_control::DEFAULT_EXEC_OUTPUT_BYTES)]
    exec_max_output_bytes: usize,
    /// A JSON file changing the default quotas and rate limits of orgs, in the shape of
    /// `PUT /v1/orgs/{slug}/limits`: `{"quotas": {...}, "rate_limits": {"read": {...}}}`.
    #[arg(long)]
    default_limits: Option<PathBuf>,
    /// Where the wake-on-request proxy listens (`<app>.<domain>` → the app's Machines).
    /// [default: 127.0.0.1:8080; when that is taken, Berth runs without the proxy and
    /// says so, while a taken address given here is an error]
    #[arg(long)]
    proxy_listen: Option<SocketAddr>,
    /// Run no proxy.
    #[arg(long)]
    no_proxy: bool,
    #[command(flatten)]
    proxy: crate::proxy_cmd::ProxyOptions,
    #[command(flatten)]
    api: crate::cluster::ApiServeOptions,
}

/// Registry settings from the flags, checked before anything starts.
fn registry_options(args: &UpArgs) -> Result<RegistryOptions> {
    let mut options = RegistryOptions::default();
    if let Some(path) = &args.registry_auth {
        options.credentials = RegistryCredentials::load(path)
            .with_context(|| format!("--registry-auth {}", path.display()))?;
    }
    for host in args
        .insecure_registry
        .iter()
        .chain(&args.default_registry)
        .chain(&args.allow_registry)
    {
        let parsed = ImageReference::parse(&format!("{host}/probe"))
            .ok()
            .and_then(|reference| reference.registry);
        if parsed.as_deref() != Some(host.as_str()) {
            bail!("{host:?} is not a registry host (HOST or HOST:PORT, with a '.' or ':' or localhost)");
        }
    }
    options.insecure = args.insecure_registry.clone();
    options.allowed = args.allow_registry.clone();
    options.default_registry = args.default_registry.clone();
    Ok(options)
}

pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Where `berth up`'s proxy listens unless told otherwise.
const DEFAULT_PROXY_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);

pub async fn run(args: UpArgs) -> Result<()> {
    init_tracing();
    if !nix::unistd::geteuid().is_root() {
        bail!("berth up runs Machines with runc, overlayfs and namespaces, so it needs root");
    }
    if !args.no_expedite_rcu {
        crate::host_tuning::expedite_rcu();
    }
    let registry = registry_options(&args)?;
    // The default's program must be there; every other driver is offered if found.
    let programs = Programs {
        runc: args.runc.clone(),
        runsc: args.runsc.clone(),
    };
    args.runtime.require(&programs)?;
    let shim_command: Vec<OsString> =
        vec![std::env::current_exe()?.into_os_string(), "shim".into()];
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create {}", args.data_dir.display()))?;
    let host = host_capacity(&args.data_dir);
    let worker_capacity = Resources {
        cpus: args.worker_cpus.unwrap_or(host.cpus),
        memory_mb: args.worker_memory_mb.unwrap_or(host.memory_mb),
        disk_mb: args.worker_disk_mb.unwrap_or(host.disk_mb),
    };
    let serve_limits = args.api.limits()?;
    let default_limits = match &args.default_limits {
        Some(path) => {
            let text = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
            let limits: berth_api::SetOrgLimitsRequest = serde_json::from_slice(&text)
                .with_context(|| format!("{} is not a limits document", path.display()))?;
            berth_control::limits::validate_limits(&limits)
                .map_err(|error| anyhow::anyhow!("{}: {}", path.display(), error.body.message))?;
            Some(limits)
        }
        None => None,
    };
    let platform = LocalPlatform::open(PlatformOptions {
        runtime: args.runtime,
        workers: args.workers,
        worker_capacity,
        data_dir: args.data_dir.clone(),
        programs,
        shim_command,
        region: args.region.clone(),
        log_max_bytes: args.log_max_bytes,
        pids_limit: args.pids_limit,
        prices: Prices {
            per_vcpu_second: args.price_vcpu_second,
            per_gb_second: args.price_gb_second,
            per_gb_month_storage: args.price_gb_month,
        },
        registry,
        exec_max_output_bytes: Some(args.exec_max_output_bytes),
        default_limits,
        egress_nat: args.egress_nat,
        allow_host_ports: args.allow_host_ports.clone(),
        placement: args.placement.into(),
        disk_quota: args.disk_quota,
        database: args.database.clone(),
    })
    .await?;
    let token_path = platform.data_dir.join("admin-token");
    let admin_token = platform.admin_token.clone();
    let agent = platform.agent.clone();
    let control = platform.control.clone();

    let listener = tokio::net::TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("listen on {}", args.api_listen))?;
    let api_url = format!("http://{}", listener.local_addr()?);
    println!("Berth API listening on {api_url}");
    println!(
        "admin token (also in {}): {admin_token}",
        token_path.display()
    );
    println!("  export BERTH_API_URL={api_url} BERTH_TOKEN={admin_token}");

    let proxy_config = args.proxy.config()?;
    let proxy = if args.no_proxy {
        None
    } else {
        let domain = proxy_config.domain.clone();
        let listen = args.proxy_listen.unwrap_or(DEFAULT_PROXY_LISTEN);
        let spawned = crate::proxy_cmd::spawn(
            listen,
            &api_url,
            &admin_token,
            proxy_config,
            shutdown_signal(),
        )
        .await;
        match spawned {
            Ok((bound, task)) => {
                println!("Berth proxy listening on http://{bound} for <app>.{domain}");
                Some(task)
            }
            // Only the default address may be busy (another service, another `berth up`):
            // the platform is still useful without its proxy.
            Err(error) if args.proxy_listen.is_none() => {
                eprintln!(
                    "warning: running without the proxy: {error:#} (choose another address \
                     with --proxy-listen, or pass --no-proxy)"
                );
                None
            }
            Err(error) => return Err(error),
        }
    };

    let router = control.router();
    let server = tokio::spawn(berth_control::serve::serve(
        listener,
        router,
        serve_limits,
        shutdown_signal(),
    ));
    if args.demo {
        let api_url = api_url.clone();
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(error) = crate::demo::run(&api_url, &admin_token, &agent).await {
                eprintln!("demo failed: {error:#}");
            }
        });
    }
    server.await.context("API server task")??;
    if let Some(proxy) = proxy {
        proxy.abort();
    }
    info!("shutting down; running machines keep running");
    platform.close().await;
    Ok(())
}

pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
