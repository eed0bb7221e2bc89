//! API-tier figures: throughput and latency of `GET machine` under a loopback load
//! generator, and one org's read latency while another org's token floods starts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use berth::client::Client;
use berth_api::{CreateMachineRequest, InitConfig, Machine, MachineConfig};
use serde_json::{json, Value};

use crate::summary;

/// What one closed-loop load run saw.
pub(crate) struct Load {
    latencies: Vec<Duration>,
    by_status: std::collections::BTreeMap<u16, usize>,
    elapsed: Duration,
}

/// `concurrency` connections, each sending the next request as soon as the last is
/// answered, for `duration`.
async fn load(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: &str,
    concurrency: usize,
    duration: Duration,
) -> Result<Load> {
    load_spread(
        http,
        method,
        &[url.to_owned()],
        token,
        concurrency,
        duration,
    )
    .await
}

/// [`load`] with connection `n` sending to `urls[n % urls.len()]`: the same path on
/// several replicas.
pub(crate) async fn load_spread(
    http: &reqwest::Client,
    method: reqwest::Method,
    urls: &[String],
    token: &str,
    concurrency: usize,
    duration: Duration,
) -> Result<Load> {
    if urls.is_empty() {
        anyhow::bail!("no URL to load");
    }
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for connection in 0..concurrency {
        let http = http.clone();
        let method = method.clone();
        let url = urls[connection % urls.len()].clone();
        let token = token.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut statuses = Vec::new();
            while Instant::now() < deadline {
                let clock = Instant::now();
                let response = http
                    .request(method.clone(), &url)
                    .bearer_auth(&token)
                    .send()
                    .await?;
                let status = response.status().as_u16();
                response.bytes().await?;
                latencies.push(clock.elapsed());
                statuses.push(status);
            }
            Ok::<_, reqwest::Error>((latencies, statuses))
        }));
    }
    let mut out = Load {
        latencies: Vec::new(),
        by_status: Default::default(),
        elapsed: Duration::ZERO,
    };
    for task in tasks {
        let (latencies, statuses) = task.await??;
        out.latencies.extend(latencies);
        for status in statuses {
            *out.by_status.entry(status).or_default() += 1;
        }
    }
    out.elapsed = started.elapsed();
    Ok(out)
}

pub(crate) fn report(load: &Load) -> Value {
    let mut value = summary(&load.latencies);
    value["requests_per_s"] =
        json!((load.latencies.len() as f64 / load.elapsed.as_secs_f64()).round());
    value["statuses"] = json!(load.by_status);
    value
}

async fn machine(client: &Client, app: &str) -> Result<Machine> {
    client
        .post(
            &format!("/v1/apps/{app}/machines"),
            &CreateMachineRequest {
                from_checkpoint: None,
                name: None,
                region: None,
                skip_launch: true,
                skip_secrets: false,
                min_secrets_version: None,
                lease_ttl: None,
                config: MachineConfig {
                    image: "bench/busybox:1".into(),
                    init: InitConfig {
                        cmd: Some(vec!["/bin/sleep".into(), "3600".into()]),
                        entrypoint: None,
                        exec: None,
                        tty: false,
                    },
                    stop_config: berth_api::StopConfig {
                        signal: Some("SIGKILL".into()),
                        timeout: None,
                    },
                    ..MachineConfig::default()
                },
            },
        )
        .await
}

async fn org_token(admin: &Client, slug: &str, limits: Value) -> Result<String> {
    let mut body = limits;
    body["slug"] = json!(slug);
    admin.post::<_, Value>("/v1/orgs", &body).await?;
    let created: Value = admin
        .post(
            "/v1/tokens",
            &json!({"org_slug": slug, "name": format!("{slug}-bench")}),
        )
        .await?;
    Ok(created["token"]
        .as_str()
        .context("token in the answer")?
        .to_owned())
}

/// Expects the image `bench/busybox:1` to be imported already.
pub async fn measure(api_url: &str, admin: &Client, seconds: u64) -> Result<Value> {
    let window = Duration::from_secs(seconds);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let http = Arc::new(http);

    // Throughput of GET machine with the admin token (no rate limit).
    admin
        .post::<_, Value>("/v1/apps", &json!({"app_name": "bench-api"}))
        .await?;
    let target = machine(admin, "bench-api").await?;
    let url = format!("{api_url}/v1/apps/bench-api/machines/{}", target.id);
    let admin_token = admin_token(admin);
    let mut throughput = serde_json::Map::new();
    for concurrency in [1, 8, 32] {
        let result = load(
            &http,
            reqwest::Method::GET,
            &url,
            &admin_token,
            concurrency,
            window,
        )
        .await?;
        throughput.insert(format!("c{concurrency}"), report(&result));
    }

    // Isolation: org "calm" reads its Machine while org "flood" hammers start.
    let calm = org_token(
        admin,
        "calm",
        json!({"rate_limits": {"read": {"per_second": 1_000_000.0, "burst": 1_000_000}}}),
    )
    .await?;
    let flood = org_token(admin, "flood", json!({})).await?;
    let calm_client = Client::new(api_url, &calm)?;
    let flood_client = Client::new(api_url, &flood)?;
    calm_client
        .post::<_, Value>("/v1/apps", &json!({"app_name": "calm-app"}))
        .await?;
    flood_client
        .post::<_, Value>("/v1/apps", &json!({"app_name": "flood-app"}))
        .await?;
    let calm_machine = machine(admin, "calm-app").await?;
    let flood_machine = machine(admin, "flood-app").await?;
    let calm_url = format!("{api_url}/v1/apps/calm-app/machines/{}", calm_machine.id);
    let flood_url = format!(
        "{api_url}/v1/apps/flood-app/machines/{}/start",
        flood_machine.id
    );
    let baseline = load(&http, reqwest::Method::GET, &calm_url, &calm, 4, window).await?;
    let mut isolation = serde_json::Map::new();
    isolation.insert("calm_reads_alone".into(), report(&baseline));
    // A flood that waits for each answer (32 connections), and a wider one (256).
    for flood_connections in [32usize, 256] {
        let flood_task = {
            let http = http.clone();
            let flood = flood.clone();
            let flood_url = flood_url.clone();
            tokio::spawn(async move {
                load(
                    &http,
                    reqwest::Method::POST,
                    &flood_url,
                    &flood,
                    flood_connections,
                    window,
                )
                .await
            })
        };
        let during = load(&http, reqwest::Method::GET, &calm_url, &calm, 4, window).await?;
        let flooded = flood_task.await??;
        isolation.insert(
            format!("calm_reads_during_flood_c{flood_connections}"),
            report(&during),
        );
        isolation.insert(
            format!("flood_starts_c{flood_connections}"),
            report(&flooded),
        );
    }
    let _ = admin
        .delete::<Value>(&format!(
            "/v1/apps/flood-app/machines/{}?force=true",
            flood_machine.id
        ))
        .await;
    Ok(json!({
        "get_machine": Value::Object(throughput),
        "isolation": Value::Object(isolation),
        "window_s": seconds,
    }))
}

fn admin_token(client: &Client) -> String {
    client.token().to_owned()
}
