//! Wake on request (`--wake-only`): a busybox httpd Machine behind the proxy, stopped by
//! the proxy's own autostop, then woken by one request (arrival to first response byte);
//! beside it a warm request through the proxy, a direct request to the Machine, and
//! requests/s through the proxy and direct.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth::client::Client;
use berth_api::{Machine, MachineState};
use berth_image::build::{busybox_layer, Compression, ImageBuilder};
use berth_proxy::{HttpPlatform, Proxy, ProxyConfig};
use serde_json::{json, Value};

use crate::summary;

const APP: &str = "wake-bench";
const HTTPD: &str = "mkdir -p /www; echo ok > /www/index.html; exec httpd -f -p 8080 -h /www";
const CONCURRENCY: usize = 32;

/// Sequential GETs; the time to the response head (the first byte), body read after.
async fn latencies(
    http: &reqwest::Client,
    url: &str,
    host: Option<&str>,
    count: usize,
) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let mut request = http.get(url);
        if let Some(host) = host {
            request = request.header("host", host);
        }
        let clock = Instant::now();
        let response = request.send().await?;
        times.push(clock.elapsed());
        if !response.status().is_success() {
            let status = response.status();
            bail!("{url} answered {status}: {}", response.text().await?);
        }
        response.bytes().await?;
    }
    Ok(times)
}

/// The innermost error, which names the OS error of a failed connect.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Why a request failed: the status and the proxy's error code, or the kind of transport
/// error.
async fn failure_reason(outcome: reqwest::Result<reqwest::Response>) -> String {
    match outcome {
        Ok(response) => {
            let status = response.status().as_u16();
            let code = response
                .json::<Value>()
                .await
                .ok()
                .and_then(|body| body["error"].as_str().map(str::to_owned))
                .unwrap_or_default();
            format!("{status} {code}").trim_end().to_owned()
        }
        Err(error) if error.is_connect() => format!("connect: {}", root_cause(&error)),
        Err(error) if error.is_timeout() => "timeout".into(),
        Err(error) if error.is_request() => "request".into(),
        Err(_) => "other".into(),
    }
}

/// Requests per second with `CONCURRENCY` clients for `window`, and the failures by
/// reason.
async fn throughput(
    http: &reqwest::Client,
    url: &str,
    host: Option<&str>,
    window: Duration,
) -> Result<Value> {
    let began = Instant::now();
    let deadline = began + window;
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let http = http.clone();
        let url = url.to_owned();
        let host = host.map(str::to_owned);
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            let mut failures: BTreeMap<String, u64> = BTreeMap::new();
            while Instant::now() < deadline {
                let mut request = http.get(&url);
                if let Some(host) = &host {
                    request = request.header("host", host);
                }
                match request.send().await {
                    Ok(response) if response.status().is_success() => {
                        ok += 1;
                        let _ = response.bytes().await;
                    }
                    outcome => *failures.entry(failure_reason(outcome).await).or_default() += 1,
                }
            }
            (ok, failures)
        }));
    }
    let mut ok = 0;
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    for task in tasks {
        let (done, failed) = task.await?;
        ok += done;
        for (reason, count) in failed {
            *failures.entry(reason).or_default() += count;
        }
    }
    let seconds = began.elapsed().as_secs_f64();
    let failed: u64 = failures.values().sum();
    Ok(
        json!({"concurrency": CONCURRENCY, "ok": ok, "failed": failed, "failures": failures,
              "rps": (ok as f64 / seconds).round()}),
    )
}

async fn state(client: &Client, id: &str) -> Result<MachineState> {
    Ok(client
        .get::<Machine>(&format!("/v1/apps/{APP}/machines/{id}"))
        .await?
        .state)
}

pub async fn measure(
    cycles: usize,
    api_url: &str,
    client: &Client,
    token: &str,
    scratch: &Path,
    seconds: u64,
) -> Result<Value> {
    let archive = scratch.join("wake-busybox.tar");
    ImageBuilder::new()
        .layer(busybox_layer(Path::new("/bin/busybox"))?, Compression::Gzip)
        .write_archive(&archive)?;
    client
        .import_archive::<Value>(&archive, "bench/httpd:1")
        .await?;
    client
        .post::<_, Value>("/v1/apps", &json!({"app_name": APP}))
        .await?;
    let machine: Machine = client
        .post(
            &format!("/v1/apps/{APP}/machines"),
            &json!({"config": {"image": "bench/httpd:1",
                "init": {"cmd": ["/bin/sh", "-c", HTTPD]},
                "stop_config": {"signal": "SIGKILL"},
                "services": [{"internal_port": 8080, "autostop": "stop",
                              "autostop_idle_seconds": 1,
                              "concurrency": {"soft_limit": 1000, "hard_limit": 1000}}]}}),
        )
        .await?;
    // The direct requests go to a twin without a service: the proxy would stop the first
    // Machine one idle second after its own traffic ends, and refuse the rest of them.
    let twin: Machine = client
        .post(
            &format!("/v1/apps/{APP}/machines"),
            &json!({"config": {"image": "bench/httpd:1",
                "init": {"cmd": ["/bin/sh", "-c", HTTPD]},
                "stop_config": {"signal": "SIGKILL"}}}),
        )
        .await?;
    let address = twin
        .private_ip
        .clone()
        .context("the Machine has no private address")?;

    let proxy = Proxy::new(
        Arc::new(HttpPlatform::new(api_url, token)?),
        ProxyConfig::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxy_url = format!("http://{}/", listener.local_addr()?);
    let server = tokio::spawn(proxy.serve(listener, std::future::pending()));
    let result = async {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs(30))
            .build()?;
        // busybox httpd closes every connection after its answer; a pooled client would
        // keep trying dead connections, so direct requests get a fresh one each time.
        let unpooled = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(30))
            .build()?;
        let host = format!("{APP}.localhost");
        let direct_url = format!("http://[{address}]:8080/");

        // A first request, so the first autostop below does not wait for discovery.
        latencies(&http, &proxy_url, Some(&host), 1)
            .await
            .context("the first request through the proxy")?;
        // Wake: wait for the proxy's autostop, then one request.
        let mut wakes = Vec::with_capacity(cycles);
        for _ in 0..cycles {
            let deadline = Instant::now() + Duration::from_secs(30);
            while state(client, &machine.id).await? != MachineState::Stopped {
                if Instant::now() > deadline {
                    bail!("the proxy did not stop the idle Machine");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            wakes.extend(
                latencies(&http, &proxy_url, Some(&host), 1)
                    .await
                    .context("a wake")?,
            );
        }
        let warm = latencies(&http, &proxy_url, Some(&host), 500)
            .await
            .context("warm requests through the proxy")?;
        let direct = latencies(&unpooled, &direct_url, None, 500)
            .await
            .context("requests straight to the Machine")?;
        let window = Duration::from_secs(seconds.max(1));
        let proxied_rps = throughput(&http, &proxy_url, Some(&host), window).await?;
        let direct_rps = throughput(&unpooled, &direct_url, None, window).await?;
        let wake = summary(&wakes);
        let warm_summary = summary(&warm);
        let direct_summary = summary(&direct);
        let overhead = warm_summary["p50_ms"].as_f64().unwrap_or(0.0)
            - direct_summary["p50_ms"].as_f64().unwrap_or(0.0);
        Ok(json!({
            "wake": wake,
            "warm_proxied": warm_summary,
            "direct": direct_summary,
            "proxy_overhead_p50_ms": (overhead * 100.0).round() / 100.0,
            "proxied_throughput": proxied_rps,
            "direct_throughput": direct_rps,
        }))
    }
    .await;
    server.abort();
    let _ = client.delete::<Value>(&format!("/v1/apps/{APP}")).await;
    result
}

/// Writes the figures into the results file beside the last full run's, with the
/// `wake_p50_ms` key at the top.
pub fn merge_into(out: &Path, figures: Value) -> Result<()> {
    let mut merged: Value = std::fs::read(out)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_else(|| json!({}));
    merged["wake_p50_ms"] = figures["wake"]["p50_ms"].clone();
    merged["wake"] = figures;
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&merged)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&merged["wake"])?);
    Ok(())
}
