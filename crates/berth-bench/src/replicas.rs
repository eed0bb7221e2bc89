//! Several `berth server` replicas on one private PostgreSQL, with one `berth agent`:
//! start through a replica on PostgreSQL against a `berth server` on SQLite in the same
//! run (with each one's `Server-Timing` steps), `GET machine` at 32 connections split
//! over two replicas, and failover as a client with both URLs sees it: from `kill -9` of
//! the replica it was using to its first answer through the other.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth::client::Client;
use berth_api::Machine;
use berth_image::build::{busybox_layer, Compression, ImageBuilder};
use berth_testkit::{Postgres, Registry};
use serde_json::{json, Value};

use crate::cluster::{Control, Fleet};
use crate::stats::{round, step_breakdown};
use crate::{api_load, harness, summary};

/// The figures a run puts at the top level of the report.
pub const KEYS: &[&str] = &[
    "start_p50_ms_postgres",
    "start_p99_ms_postgres",
    "start_p50_ms_sqlite_server",
    "start_p99_ms_sqlite_server",
    "ratio_start_postgres_over_sqlite_p50",
    "get_one_32conn_rps",
    "get_one_32conn_p99_ms",
    "failover_ms",
    "failover_max_ms",
];

#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Stop→start cycles on each control plane.
    pub cycles: usize,
    /// The `GET machine` load window.
    pub get_seconds: u64,
    /// Kills of the replica the client uses.
    pub failovers: usize,
}

impl Sizes {
    pub fn full(cycles: usize) -> Sizes {
        Sizes {
            cycles,
            get_seconds: 10,
            failovers: 10,
        }
    }

    pub fn quick(cycles: usize) -> Sizes {
        Sizes {
            cycles,
            get_seconds: 3,
            failovers: 3,
        }
    }
}

const CONNECTIONS: usize = 32;
const APP: &str = "bench-replicas";

/// Both control planes, one after the other; each leaves nothing behind.
pub async fn measure(sizes: Sizes, scratch: &Path) -> Result<Value> {
    let archive = scratch.join("replicas-busybox.tar");
    ImageBuilder::new()
        .layer(busybox_layer(Path::new("/bin/busybox"))?, Compression::Gzip)
        .write_archive(&archive)?;

    println!(
        "replicas: {} stop→start cycles through berth server on SQLite",
        sizes.cycles
    );
    let fleet = Fleet::start(scratch, "replicas-sqlite", &["w1"], "error").await?;
    let sqlite = async {
        fleet
            .client
            .import_archive::<Value>(&archive, "bench/busybox:1")
            .await?;
        harness::start_stop_cycles(&fleet.client, sizes.cycles).await
    }
    .await;
    fleet.shutdown();
    let sqlite = sqlite.context("start through berth server on SQLite")?;

    let postgres = tokio::task::block_in_place(Postgres::start)?;
    let database = postgres.database().await?;
    // Replicas on PostgreSQL keep imported images in a registry they share.
    let registry = tokio::task::block_in_place(Registry::start)?;
    let fleet = Fleet::start_with(
        scratch,
        "replicas-pg",
        &["w1"],
        "error",
        Control {
            database: Some(database),
            replicas: 2,
            image_registry: Some(registry.host()),
        },
    )
    .await?;
    let mut fleet = fleet;
    let result = on_postgres(sizes, &mut fleet, &archive).await;
    // Through whichever replica answers: the last failover may have left A down.
    let urls: Vec<&str> = fleet.servers.iter().map(|s| s.url.as_str()).collect();
    if let Ok(client) = Client::new(&urls.join(","), fleet.client.token()) {
        let _ = client.delete::<Value>(&format!("/v1/apps/{APP}")).await;
    }
    fleet.shutdown();
    drop(postgres);
    let (cycles, get, failovers) = result?;

    let start_sqlite = summary(&sqlite.starts);
    let start_postgres = summary(&cycles.starts);
    let p50 = |figures: &Value| figures["p50_ms"].as_f64().unwrap_or(0.0);
    let ratio = match p50(&start_sqlite) {
        zero if zero <= 0.0 => Value::Null,
        sqlite_p50 => json!(round(p50(&start_postgres) / sqlite_p50)),
    };
    let failover = summary(&failovers);
    let mut figures = json!({
        "start_sqlite_server": start_sqlite,
        "start_steps_sqlite_server": step_breakdown(&sqlite.start_steps),
        "start_postgres": start_postgres,
        "start_steps_postgres": step_breakdown(&cycles.start_steps),
        "get_one_32conn": get,
        "failover": failover,
        "failover_samples_ms": failovers.iter().map(|d| round(d.as_secs_f64() * 1000.0)).collect::<Vec<_>>(),
        "replicas": 2,
        "workers": 1,
    });
    figures["start_p50_ms_postgres"] = figures["start_postgres"]["p50_ms"].clone();
    figures["start_p99_ms_postgres"] = figures["start_postgres"]["p99_ms"].clone();
    figures["start_p50_ms_sqlite_server"] = figures["start_sqlite_server"]["p50_ms"].clone();
    figures["start_p99_ms_sqlite_server"] = figures["start_sqlite_server"]["p99_ms"].clone();
    figures["ratio_start_postgres_over_sqlite_p50"] = ratio;
    figures["get_one_32conn_rps"] = figures["get_one_32conn"]["requests_per_s"].clone();
    figures["get_one_32conn_p99_ms"] = figures["get_one_32conn"]["p99_ms"].clone();
    figures["failover_ms"] = figures["failover"]["p50_ms"].clone();
    figures["failover_max_ms"] = figures["failover"]["max_ms"].clone();
    Ok(figures)
}

/// Start cycles through replica A, the GET load over both, then the failovers.
async fn on_postgres(
    sizes: Sizes,
    fleet: &mut Fleet,
    archive: &Path,
) -> Result<(harness::CycleFigures, Value, Vec<Duration>)> {
    let client = fleet.client.clone();
    client
        .import_archive::<Value>(archive, "bench/busybox:1")
        .await?;
    println!(
        "replicas: {} stop→start cycles through a replica on PostgreSQL",
        sizes.cycles
    );
    let cycles = harness::start_stop_cycles(&client, sizes.cycles).await?;

    client
        .post::<_, Value>("/v1/apps", &json!({"app_name": APP}))
        .await?;
    let machine: Machine = client
        .post(
            &format!("/v1/apps/{APP}/machines"),
            &crate::create_request(&crate::cluster::sleeper()),
        )
        .await?;
    let path = format!("/v1/apps/{APP}/machines/{}", machine.id);
    let urls: Vec<String> = fleet
        .servers
        .iter()
        .map(|server| format!("{}{path}", server.url))
        .collect();
    println!(
        "replicas: GET machine on {CONNECTIONS} connections over {} replicas, {} s",
        urls.len(),
        sizes.get_seconds
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CONNECTIONS)
        .build()?;
    let load = api_load::load_spread(
        &http,
        reqwest::Method::GET,
        &urls,
        client.token(),
        CONNECTIONS,
        Duration::from_secs(sizes.get_seconds),
    )
    .await?;
    let mut get = api_load::report(&load);
    get["window_s"] = json!(sizes.get_seconds);
    get["connections_per_replica"] = json!(CONNECTIONS / urls.len());

    println!(
        "replicas: {} failovers (kill -9 of the replica in use)",
        sizes.failovers
    );
    let mut failovers = Vec::with_capacity(sizes.failovers);
    for _ in 0..sizes.failovers {
        failovers.push(failover(fleet, &path).await?);
        fleet.servers[0].restart().await?;
    }
    Ok((cycles, get, failovers))
}

/// A client with both URLs loops on `GET path` through A; A is killed; answers the time
/// from the kill to the client's first answer from B.
async fn failover(fleet: &mut Fleet, path: &str) -> Result<Duration> {
    let (a, b) = (fleet.servers[0].url.clone(), fleet.servers[1].url.clone());
    // A restarted replica answers once it has read the workers back (within a second).
    // A fresh client each try: one that went on to B stays there.
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        let client = Client::new(&format!("{a},{b}"), fleet.client.token())?;
        if client.get::<Machine>(path).await.is_ok() && client.current_url() == a {
            break client;
        }
        if Instant::now() > deadline {
            bail!("replica A never answered GET {path}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let killed_at: Arc<OnceLock<Instant>> = Arc::default();
    let looping = tokio::spawn({
        let (killed_at, path) = (killed_at.clone(), path.to_owned());
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let answer = client.get::<Machine>(&path).await;
                let done = Instant::now();
                match (answer, killed_at.get()) {
                    (Ok(_), Some(kill)) if client.current_url() == b && done > *kill => {
                        return Ok(done - *kill)
                    }
                    (Err(error), None) => return Err(error.context("a call before the kill")),
                    _ => {}
                }
                if done > deadline {
                    bail!("no answer through replica B within 60 s of the kill");
                }
            }
        }
    });
    // Let the loop run on A for a moment, so that the kill lands on calls in flight.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if looping.is_finished() {
        // Only a failure ends the loop before the kill.
        return looping.await?;
    }
    let _ = killed_at.set(Instant::now());
    fleet.servers[0].kill();
    looping.await?
}

/// The table printed after a run and pasted into PERFORMANCE.md.
pub fn markdown(figures: &Value) -> String {
    let cell = |value: &Value| value.as_f64().map_or("–".to_owned(), |v| v.to_string());
    let row = |label: &str, figures: &Value| {
        format!(
            "| {label} | {} | {} | {} | {} |\n",
            cell(&figures["n"]),
            cell(&figures["p50_ms"]),
            cell(&figures["p99_ms"]),
            cell(&figures["max_ms"])
        )
    };
    let mut out = String::from(
        "| replicated control plane (1 agent) | n | p50 ms | p99 ms | max ms |\n\
         | --- | ---: | ---: | ---: | ---: |\n",
    );
    out.push_str(&row(
        "start, berth server on SQLite",
        &figures["start_sqlite_server"],
    ));
    out.push_str(&row(
        "start, a replica on PostgreSQL",
        &figures["start_postgres"],
    ));
    out.push_str(&row(
        "GET machine, 32 connections over 2 replicas",
        &figures["get_one_32conn"],
    ));
    out.push_str(&row(
        "failover: kill -9 to the first answer through the other replica",
        &figures["failover"],
    ));
    out.push_str(&format!(
        "\nstart p50 PostgreSQL / SQLite: {}; GET machine over 2 replicas: {} requests/s\n",
        cell(&figures["ratio_start_postgres_over_sqlite_p50"]),
        cell(&figures["get_one_32conn_rps"])
    ));
    for (label, steps) in [
        ("SQLite", &figures["start_steps_sqlite_server"]),
        ("PostgreSQL", &figures["start_steps_postgres"]),
    ] {
        out.push_str(&format!("\nstart steps, {label}:\n"));
        out.push_str(&crate::report::step_table(steps));
    }
    out
}
