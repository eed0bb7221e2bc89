//! `berth proxy`, and the proxy that `berth up` runs next to its API.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use berth_api::ApiDuration;
use berth_proxy::{HttpPlatform, Proxy, ProxyConfig};
use clap::Args;

use crate::ApiArgs;

/// The proxy's own settings, shared by `berth proxy` and `berth up`.
#[derive(Debug, Clone, Args)]
pub struct ProxyOptions {
    /// Apps are served at `<app>.<domain>`.
    #[arg(long, default_value = "localhost")]
    pub domain: String,
    /// How long a request waits for a stopped Machine to start and accept connections.
    #[arg(long, default_value = "10s")]
    pub wake_timeout: String,
    /// How often every app's Machines are read, so idle ones that got no traffic through
    /// the proxy are stopped too.
    #[arg(long, default_value = "5s")]
    pub discovery_interval: String,
}

impl ProxyOptions {
    pub fn config(&self) -> Result<ProxyConfig> {
        let wake_timeout = ApiDuration::parse(&self.wake_timeout)
            .map_err(anyhow::Error::msg)
            .context("--wake-timeout")?;
        let discovery_interval = ApiDuration::parse(&self.discovery_interval)
            .map_err(anyhow::Error::msg)
            .context("--discovery-interval")?
            .as_duration();
        anyhow::ensure!(
            !discovery_interval.is_zero(),
            "--discovery-interval must be more than zero"
        );
        Ok(ProxyConfig {
            domain: self.domain.trim_matches('.').to_ascii_lowercase(),
            wake_timeout: wake_timeout.as_duration(),
            discovery_interval,
            ..ProxyConfig::default()
        })
    }
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Where the proxy listens for HTTP.
    #[arg(long)]
    listen: SocketAddr,
    #[command(flatten)]
    options: ProxyOptions,
    #[command(flatten)]
    api: ApiArgs,
}

fn token(api: &ApiArgs) -> Result<String> {
    match &api.token {
        Some(token) => Ok(token.clone()),
        None => {
            let path = Path::new(&api.data_dir).join("admin-token");
            Ok(std::fs::read_to_string(&path)
                .with_context(|| {
                    format!("no BERTH_TOKEN given and cannot read {}", path.display())
                })?
                .trim()
                .to_owned())
        }
    }
}

/// Binds and serves in the background; the answer is the bound address.
pub async fn spawn(
    listen: SocketAddr,
    api_url: &str,
    token: &str,
    config: ProxyConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let platform = HttpPlatform::new(api_url, token).map_err(anyhow::Error::msg)?;
    let proxy = Proxy::new(Arc::new(platform), config);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("proxy: listen on {listen}"))?;
    let bound = listener.local_addr()?;
    Ok((bound, tokio::spawn(proxy.serve(listener, shutdown))))
}

pub async fn run(args: ProxyArgs) -> Result<()> {
    crate::up::init_tracing();
    let config = args.options.config()?;
    let domain = config.domain.clone();
    let (bound, server) = spawn(
        args.listen,
        &args.api.api_url,
        &token(&args.api)?,
        config,
        crate::up::shutdown_signal(),
    )
    .await?;
    println!("Berth proxy listening on http://{bound} for <app>.{domain}");
    server.await.context("proxy task")??;
    Ok(())
}
