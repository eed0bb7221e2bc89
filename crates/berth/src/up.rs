//! `berth up`: the whole platform in one process, on an embedded store.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use berth::platform::{find_program, LocalPlatform, PlatformOptions};
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
    /// The OCI runtime binary.
    #[arg(long, default_value = "runc")]
    runc: PathBuf,
    /// Region label of this worker.
    #[arg(long, default_value = "local")]
    region: String,
    /// Cap on each Machine's captured output before it rotates.
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    log_max_bytes: u64,
    /// Most processes inside one Machine.
    #[arg(long, default_value_t = 4096)]
    pids_limit: i64,
    /// Cap on each of exec's stdout and stderr, in bytes.
    #[arg(long, default_value_t = berth_control::DEFAULT_EXEC_OUTPUT_BYTES)]
    exec_max_output_bytes: usize,
    /// A JSON file changing the default quotas and rate limits of orgs, in the shape of
    /// `PUT /v1/orgs/{slug}/limits`: `{"quotas": {...}, "rate_limits": {"read": {...}}}`.
    #[arg(long)]
    default_limits: Option<PathBuf>,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub async fn run(args: UpArgs) -> Result<()> {
    init_tracing();
    if !nix::unistd::geteuid().is_root() {
        bail!("berth up runs Machines with runc, overlayfs and namespaces, so it needs root");
    }
    let runc_binary = find_program(&args.runc)
        .with_context(|| format!("cannot find the OCI runtime {:?}; install runc", args.runc))?;
    let shim_command: Vec<OsString> =
        vec![std::env::current_exe()?.into_os_string(), "shim".into()];
    let default_limits = match &args.default_limits {
        Some(path) => {
            let text = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
            let limits: berth_api::SetOrgLimitsRequest = serde_json::from_slice(&text)
                .with_context(|| format!("{} is not a limits document", path.display()))?;
            berth_control::limits::validate_rates(&limits.rate_limits)
                .map_err(|error| anyhow::anyhow!("{}: {}", path.display(), error.body.message))?;
            Some(limits)
        }
        None => None,
    };
    let platform = LocalPlatform::open(PlatformOptions {
        data_dir: args.data_dir.clone(),
        runc_binary,
        shim_command,
        region: args.region.clone(),
        log_max_bytes: args.log_max_bytes,
        pids_limit: args.pids_limit,
        exec_max_output_bytes: Some(args.exec_max_output_bytes),
        default_limits,
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

    let router = control.router();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown_signal())
            .await
    });
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
    info!("shutting down; running machines keep running");
    platform.close().await;
    Ok(())
}

async fn shutdown_signal() {
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
