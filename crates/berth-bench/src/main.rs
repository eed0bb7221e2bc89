//! `cargo run --release -p berth-bench -- [--cycles N] [--quick] [--out FILE]`, as root.
//!
//! Runs create → start → stop cycles of the busybox image through Berth's HTTP API (the
//! same in-process platform `berth up` runs), then a plain `runc run -d` of an equivalent
//! bundle in the same run, and writes percentiles and ratios as JSON plus a markdown table.
//! Absolute figures on shared machines are noisy; the ratios against the peer measured in
//! the same run are what to compare.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth::client::Client;
use berth::platform::{find_program, LocalPlatform, PlatformOptions};
use berth_api::{
    CreateMachineRequest, InitConfig, Machine, MachineConfig, MachineState, StartStopResponse,
};
use berth_image::build::{busybox_layer, Compression, ImageBuilder};
use clap::Parser;
use serde_json::{json, Value};

mod api_load;
mod cluster;

#[derive(Debug, Parser)]
#[command(name = "berth-bench")]
struct Args {
    /// create → start → stop cycles (each on a new Machine) and stop → start cycles.
    #[arg(long, default_value_t = 50)]
    cycles: usize,
    /// A short run (10 cycles).
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON figures.
    #[arg(long, default_value = "bench/results/latest.json")]
    out: PathBuf,
    #[arg(long, default_value = "runc")]
    runc: PathBuf,
    /// What runs Berth's Machines (`--runtime` of `berth up`).
    #[arg(long, value_enum, default_value_t = berth::platform::RuntimeKind::Native)]
    runtime: berth::platform::RuntimeKind,
    /// Seconds of each API load window (GET machine throughput, flood isolation).
    #[arg(long, default_value_t = 10)]
    api_seconds: u64,
    /// Only the API-tier figures, none of the lifecycle ones.
    #[arg(long)]
    api_only: bool,
    /// Only the metering figures: the journal's cost on the start path and the usage query
    /// over 1M journal records (100k with --quick).
    #[arg(long)]
    metering_only: bool,
    /// Only the many-workers figures: start through `berth server` and a `berth agent`
    /// process against in-process, and create/start with 200 Machines on one worker.
    #[arg(long)]
    cluster_only: bool,
}

fn main() -> Result<()> {
    // The platform re-executes this binary as each Machine's shim.
    let mut raw = std::env::args_os();
    let _program = raw.next();
    if raw.next().as_deref() == Some(std::ffi::OsStr::new("shim")) {
        std::process::exit(berth_runtime::shim::main_with_args(raw.collect()));
    }
    let mut args = Args::parse();
    if args.quick {
        args.cycles = 10;
    }
    if args.cycles < 2 {
        bail!("--cycles must be at least 2");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

/// Percentiles in milliseconds, by nearest rank.
pub(crate) fn summary(samples: &[Duration]) -> Value {
    if samples.is_empty() {
        return json!({"n": 0});
    }
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let index = ((p / 100.0) * ms.len() as f64).ceil() as usize;
        round(ms[index.saturating_sub(1).min(ms.len() - 1)])
    };
    json!({"n": ms.len(), "p50_ms": rank(50.0), "p90_ms": rank(90.0), "p99_ms": rank(99.0),
           "min_ms": round(ms[0]), "max_ms": round(ms[ms.len() - 1])})
}

fn round(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

async fn run(args: Args) -> Result<()> {
    if std::fs::metadata("/proc/self").is_ok() && !is_root() {
        bail!("the bench runs Machines with runc and needs root");
    }
    let scratch = tempfile::Builder::new().prefix("berth-bench-").tempdir()?;
    if args.metering_only {
        let metering = metering_figures(scratch.path(), args.cycles.max(200)).await?;
        let records = if args.quick { 100_000 } else { 1_000_000 };
        let usage_query = usage_query_figures(scratch.path(), records).await?;
        // Keep the figures of the last full run beside these.
        let mut merged: Value = std::fs::read(&args.out)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_else(|| json!({}));
        merged["metering"] = metering;
        merged["usage_query"] = usage_query;
        if let Some(parent) = args.out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&args.out, serde_json::to_string_pretty(&merged)? + "\n")?;
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"metering": merged["metering"], "usage_query": merged["usage_query"]})
            )?
        );
        return Ok(());
    }
    let runc = find_program(&args.runc).context("runc not found; install it")?;
    let shim_command: Vec<OsString> =
        vec![std::env::current_exe()?.into_os_string(), "shim".into()];
    let platform = LocalPlatform::open(PlatformOptions {
        runtime: args.runtime,
        data_dir: scratch.path().join("data"),
        runc_binary: runc.clone(),
        shim_command,
        region: "bench".into(),
        log_max_bytes: 1024 * 1024,
        pids_limit: 1024,
        prices: Default::default(),
        workers: 1,
        worker_capacity: berth_api::Resources {
            cpus: 1024,
            memory_mb: 1 << 20,
            disk_mb: 1 << 30,
        },
        registry: Default::default(),
        exec_max_output_bytes: None,
        default_limits: None,
    })
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api_url = format!("http://{}", listener.local_addr()?);
    let router = platform.control.router();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let client = Client::new(&api_url, &platform.admin_token)?;

    if args.cluster_only {
        let result = cluster::measure(args.cycles, &client, scratch.path()).await;
        server.abort();
        remove_bridges(&platform).await;
        platform.close().await;
        let figures = result?;
        let mut merged: Value = std::fs::read(&args.out)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_else(|| json!({}));
        merged["cluster"] = figures;
        std::fs::write(&args.out, serde_json::to_string_pretty(&merged)? + "\n")?;
        println!("{}", serde_json::to_string_pretty(&merged["cluster"])?);
        return Ok(());
    }
    let result = if args.api_only {
        import_bench_image(&client, scratch.path()).await
    } else {
        measure(&args, &client, &platform, &runc, scratch.path()).await
    };
    // The registry scenario prunes the store; the API load wants the image back.
    let result = match result {
        Ok(report) if !args.api_only => import_bench_image(&client, scratch.path())
            .await
            .map(|_| report),
        other => other,
    };
    let result = match result {
        Ok(mut report) => match api_load::measure(&api_url, &client, args.api_seconds).await {
            Ok(api) => {
                report["api"] = api;
                Ok(report)
            }
            Err(error) => Err(error),
        },
        Err(error) => Err(error),
    };
    // Always leave the host clean, even when a measurement failed.
    for app in ["bench-api", "calm-app", "flood-app"] {
        let _ = client.delete::<Value>(&format!("/v1/apps/{app}")).await;
    }
    // Always leave the host clean, even when a measurement failed.
    let _ = client.delete::<Value>("/v1/apps/bench").await;
    server.abort();
    remove_bridges(&platform).await;
    platform.close().await;
    let report = result?;

    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // An API-only run keeps the lifecycle figures of the last full run beside its own.
    let report = if args.api_only {
        let mut merged: Value = std::fs::read(&args.out)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_else(|| json!({}));
        merged["api"] = report["api"].clone();
        merged
    } else {
        report
    };
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")?;
    print_table(&report);
    println!("\nwritten to {}", args.out.display());
    Ok(())
}

/// The in-process workers' bridges outlive the platform; the bench leaves nothing behind.
async fn remove_bridges(platform: &LocalPlatform) {
    for (name, _) in &platform.agents {
        if let Ok(prefix) = platform.control.worker_prefix(name).await {
            let bridge = berth::platform::bridge_name(&prefix);
            let _ = std::process::Command::new("ip")
                .args(["link", "delete", &bridge])
                .status();
        }
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("Uid:"))
                .map(str::to_owned)
        })
        .is_some_and(|line| line.split_whitespace().nth(1) == Some("0"))
}

/// The image every measurement uses, in a report of its own.
async fn import_bench_image(client: &Client, scratch: &Path) -> Result<Value> {
    let archive = scratch.join("busybox.tar");
    let layer = busybox_layer(Path::new("/bin/busybox"))?;
    ImageBuilder::new()
        .layer(layer, Compression::Gzip)
        .write_archive(&archive)?;
    client
        .import_archive::<Value>(&archive, "bench/busybox:1")
        .await?;
    Ok(json!({
        "date": time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339)?,
        "host": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
    }))
}

async fn measure(
    args: &Args,
    client: &Client,
    platform: &LocalPlatform,
    runc: &Path,
    scratch: &Path,
) -> Result<Value> {
    let archive = scratch.join("busybox.tar");
    let layer = busybox_layer(Path::new("/bin/busybox"))?;
    ImageBuilder::new()
        .layer(layer, Compression::Gzip)
        .write_archive(&archive)?;
    client
        .import_archive::<Value>(&archive, "bench/busybox:1")
        .await?;
    client
        .post::<_, Value>("/v1/apps", &json!({"app_name": "bench"}))
        .await?;

    let config = cluster::sleeper();
    let machines = "/v1/apps/bench/machines";
    let (mut creates, mut first_starts, mut stops) = (Vec::new(), Vec::new(), Vec::new());
    let mut ids = Vec::new();
    for _ in 0..args.cycles {
        let request = CreateMachineRequest {
            name: None,
            region: None,
            skip_launch: true,
            config: config.clone(),
        };
        let clock = Instant::now();
        let machine: Machine = client.post(machines, &request).await?;
        creates.push(clock.elapsed());
        let clock = Instant::now();
        let started: StartStopResponse = client
            .post(&format!("{machines}/{}/start", machine.id), &json!({}))
            .await?;
        first_starts.push(clock.elapsed());
        if started.machine.state != MachineState::Started {
            bail!("machine {} did not start", machine.id);
        }
        let clock = Instant::now();
        client
            .post::<_, StartStopResponse>(&format!("{machines}/{}/stop", machine.id), &json!({}))
            .await?;
        stops.push(clock.elapsed());
        ids.push(machine.id);
    }

    // The product's loop: one Machine, stopped and started again and again.
    let id = &ids[0];
    let mut restarts = Vec::new();
    for _ in 0..args.cycles {
        let clock = Instant::now();
        client
            .post::<_, StartStopResponse>(&format!("{machines}/{id}/start"), &json!({}))
            .await?;
        restarts.push(clock.elapsed());
        client
            .post::<_, StartStopResponse>(&format!("{machines}/{id}/stop"), &json!({}))
            .await?;
    }
    for id in &ids {
        client
            .delete::<Value>(&format!("{machines}/{id}?force=true"))
            .await?;
    }

    let machine_for_peer: Machine = client
        .post(
            machines,
            &CreateMachineRequest {
                name: None,
                region: None,
                skip_launch: true,
                config,
            },
        )
        .await?;
    let record = platform
        .agent
        .store()
        .get(&machine_for_peer.id)
        .await?
        .context("the peer machine's record")?;
    let peer = peer_runc(
        args.cycles,
        runc,
        &platform.agent.layout(&machine_for_peer.id),
        &record.rootfs.lowerdirs(),
        scratch,
    )?;
    client
        .delete::<Value>(&format!("{machines}/{}?force=true", machine_for_peer.id))
        .await?;

    let metering = metering_figures(scratch, args.cycles.max(200)).await?;
    let usage_records = if args.quick { 100_000 } else { 1_000_000 };
    let usage_query = usage_query_figures(scratch, usage_records).await?;
    let registry = measure_registry(args, client, platform).await?;

    let start = summary(&restarts);
    let runc_run = summary(&peer.run);
    let ratio = |ours: &Value, theirs: &Value| {
        round(
            theirs["p50_ms"].as_f64().unwrap_or(0.0)
                / ours["p50_ms"].as_f64().unwrap_or(1.0).max(0.001),
        )
    };
    Ok(json!({
        "date": time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339)?,
        "host": {"cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                 "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()},
        "cycles": args.cycles,
        "create": summary(&creates),
        "first_start": summary(&first_starts),
        "start": start,
        "stop": summary(&stops),
        "peer_runc_run_d": runc_run,
        "peer_runc_create": summary(&peer.create),
        "peer_runc_start": summary(&peer.start),
        "start_p50_ms": start["p50_ms"], "start_p90_ms": start["p90_ms"], "start_p99_ms": start["p99_ms"],
        "stop_p50_ms": summary(&stops)["p50_ms"],
        "create_warm_p50_ms": summary(&creates)["p50_ms"],
        "peer_runc_run_p50_ms": runc_run["p50_ms"],
        "peer_runc_start_p50_ms": summary(&peer.start)["p50_ms"],
        "ratio_runc_run_over_berth_start": ratio(&start, &runc_run),
        "create_cold": registry.cold,
        "create_warm_registry": registry.warm,
        "create_cold_large": registry.cold_large,
        "create_warm_registry_large": registry.warm_large,
        "large_image_bytes": registry.large_bytes,
        "create_cold_xl": registry.cold_xl,
        "create_warm_registry_xl": registry.warm_xl,
        "xl_image_bytes": registry.xl_bytes,
        "create_cold_xl_p50_ms": registry.cold_xl["p50_ms"],
        "ratio_create_cold_xl_over_start": round(
            registry.cold_xl["p50_ms"].as_f64().unwrap_or(0.0)
                / start["p50_ms"].as_f64().unwrap_or(1.0).max(0.001)
        ),
        "create_cold_p50_ms": registry.cold["p50_ms"],
        "create_warm_registry_p50_ms": registry.warm["p50_ms"],
        "create_cold_large_p50_ms": registry.cold_large["p50_ms"],
        "create_warm_registry_large_p50_ms": registry.warm_large["p50_ms"],
        "ratio_create_cold_over_start": round(
            registry.cold["p50_ms"].as_f64().unwrap_or(0.0)
                / start["p50_ms"].as_f64().unwrap_or(1.0).max(0.001)
        ),
        "ratio_create_cold_large_over_start": round(
            registry.cold_large["p50_ms"].as_f64().unwrap_or(0.0)
                / start["p50_ms"].as_f64().unwrap_or(1.0).max(0.001)
        ),
        "concurrent_cold_creates": registry.concurrent,
        "metering": metering,
        "usage_query": usage_query,
    }))
}

/// What the usage journal adds to a start: the start's state write with and without the
/// journal entry in the same transaction, on the agent's real store.
async fn metering_figures(scratch: &Path, iterations: usize) -> Result<Value> {
    use berth_agent::record::{MachineRecord, RootfsStack};
    let store = berth_agent::store::AgentStore::open(&scratch.join("metering.db")).await?;
    let mut record = MachineRecord {
        id: "00000000000001".into(),
        app: "bench".into(),
        name: "bench".into(),
        region: "bench".into(),
        state: MachineState::Started,
        instance_id: "01".into(),
        config: MachineConfig {
            image: "bench/busybox:1".into(),
            ..MachineConfig::default()
        },
        image_ref: berth_api::ImageRef {
            name: "x".into(),
            repository: "x".into(),
            tag: None,
            digest: "sha256:0".into(),
        },
        rootfs: RootfsStack {
            image_layers: Vec::new(),
            frozen_layers: Vec::new(),
            upper: scratch.join("upper"),
        },
        created_at_ms: 0,
        updated_at_ms: 0,
        last_exit: None,
        restart_count: 0,
        run_generation: 0,
        pending: None,
        run_open: false,
        storage_bytes: 0,
        private_ip: None,
    };
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for index in 0..iterations {
        record.run_generation = index as u64;
        let clock = Instant::now();
        store.save(&record, None).await?;
        without.push(clock.elapsed());
        let usage = berth_agent::metering::open_run(&mut record, index as i64);
        let clock = Instant::now();
        store.save_with_usage(&record, None, &[usage]).await?;
        with.push(clock.elapsed());
    }
    store.close().await;
    let (without, with) = (summary(&without), summary(&with));
    let overhead_us = round(
        (with["p50_ms"].as_f64().unwrap_or(0.0) - without["p50_ms"].as_f64().unwrap_or(0.0))
            * 1000.0,
    );
    Ok(
        json!({"state_write_without_journal": without, "state_write_with_journal": with,
              "start_path_overhead_p50_us": overhead_us}),
    )
}

/// Ingests `records` journal entries for 1,000 Machines and times a month's usage query
/// over all of them.
async fn usage_query_figures(scratch: &Path, records: usize) -> Result<Value> {
    use berth_api::{UsageKind, UsageRecord};
    use berth_control::usage;
    let store = berth_control::store::ControlStore::open(&scratch.join("usage.db")).await?;
    usage::migrate(store.pool()).await?;
    let machines = 1_000usize;
    for machine in 0..machines {
        usage::record_owner(
            store.pool(),
            &format!("{machine:014x}"),
            &format!("app{}", machine % 10),
            "bench",
        )
        .await?;
    }
    let per_machine = records / machines;
    let mut batch = Vec::with_capacity(5_000);
    let mut seq = 0u64;
    let clock = Instant::now();
    for step in 0..per_machine {
        for machine in 0..machines {
            seq += 1;
            let kind = match step {
                0 => UsageKind::Created,
                _ if step % 2 == 1 => UsageKind::RunStart,
                _ => UsageKind::RunStop,
            };
            batch.push(UsageRecord {
                seq,
                machine_id: format!("{machine:014x}"),
                app: format!("app{}", machine % 10),
                kind,
                at_ms: 1_700_000_000_000 + (step as i64) * 60_000 + machine as i64,
                cpus: 1,
                memory_mb: 256,
                storage_bytes: 0,
                basis: None,
            });
            if batch.len() == 5_000 {
                usage::ingest(store.pool(), "bench", &batch).await?;
                batch.clear();
            }
        }
    }
    usage::ingest(store.pool(), "bench", &batch).await?;
    let ingest_seconds = clock.elapsed().as_secs_f64();
    let window = berth_core::billing::Window {
        from_ms: 1_700_000_000_000,
        to_ms: 1_700_000_000_000 + 31 * 86_400_000,
    };
    let mut times = Vec::new();
    for _ in 0..3 {
        let clock = Instant::now();
        // What GET /v1/orgs/{org}/usage?group_by=machine runs.
        let rows = usage::aggregate(
            store.pool(),
            "bench",
            window,
            window.to_ms,
            usage::GroupBy::Machine,
        )
        .await?;
        times.push(clock.elapsed());
        if rows.len() != machines {
            bail!(
                "usage query returned {} rows for {machines} machines",
                rows.len()
            );
        }
    }
    store.close().await;
    Ok(
        json!({"journal_records": seq, "ingest_records_per_s": round(seq as f64 / ingest_seconds),
              "query": summary(&times)}),
    )
}

struct RegistryFigures {
    cold: Value,
    warm: Value,
    cold_large: Value,
    warm_large: Value,
    large_bytes: u64,
    cold_xl: Value,
    warm_xl: Value,
    xl_bytes: u64,
    concurrent: Value,
}

/// Incompressible bytes (a multiplicative hash of the index), so gzip cannot shrink them.
fn noise(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32 / 4)
        .flat_map(|i| (i ^ seed).wrapping_mul(2_654_435_761).to_le_bytes())
        .collect()
}

fn sleeper(image: &str) -> MachineConfig {
    MachineConfig {
        image: image.to_owned(),
        init: InitConfig {
            cmd: Some(vec!["/bin/sleep".into(), "3600".into()]),
            entrypoint: None,
        },
        stop_config: berth_api::StopConfig {
            signal: Some("SIGKILL".into()),
            timeout: None,
        },
        ..MachineConfig::default()
    }
}

fn create_request(config: &MachineConfig) -> CreateMachineRequest {
    CreateMachineRequest {
        name: None,
        region: None,
        skip_launch: true,
        config: config.clone(),
    }
}

/// Cold creates (the store holds nothing of the image: pull, verify, unpack) and warm
/// creates (the tag is resolved against the registry; every layer is already stored).
async fn cold_and_warm(
    client: &Client,
    reference: &str,
    samples: usize,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let machines = "/v1/apps/bench/machines";
    let config = sleeper(reference);
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        // Nothing of the image stays once no Machine uses it: the next create is cold.
        client
            .post::<_, Value>("/v1/images/prune", &json!({}))
            .await?;
        let clock = Instant::now();
        let machine: Machine = client.post(machines, &create_request(&config)).await?;
        cold.push(clock.elapsed());
        let clock = Instant::now();
        let second: Machine = client.post(machines, &create_request(&config)).await?;
        warm.push(clock.elapsed());
        for id in [&machine.id, &second.id] {
            client
                .delete::<Value>(&format!("{machines}/{id}?force=true"))
                .await?;
        }
    }
    Ok((cold, warm))
}

/// Creates whose image comes from a local docker-registry: the busybox image (one 1 MB
/// layer plus a tiny one), 64 MB and 256 MB images (busybox plus four incompressible gzip
/// layers), and 10 cold creates of the 64 MB image at once.
async fn measure_registry(
    args: &Args,
    client: &Client,
    platform: &LocalPlatform,
) -> Result<RegistryFigures> {
    let registry = berth_testkit::Registry::start()?;
    let target = berth_testkit::PushTarget::anonymous(&registry.host());
    let small = ImageBuilder::new()
        .layer(busybox_layer(Path::new("/bin/busybox"))?, Compression::Gzip)
        .layer(
            berth_image::LayerBuilder::new().file("etc/bench", b"registry", 0o644),
            Compression::Gzip,
        );
    berth_testkit::push_image(&target, "bench/web", "1", small).await?;
    const LARGE_LAYER: usize = 16 << 20;
    const XL_LAYER: usize = 64 << 20;
    let sized = |layer_bytes: usize, salt: u32| -> Result<ImageBuilder> {
        let mut image =
            ImageBuilder::new().layer(busybox_layer(Path::new("/bin/busybox"))?, Compression::Gzip);
        for index in 0..4u32 {
            image = image.layer(
                berth_image::LayerBuilder::new().file(
                    &format!("data/{index}.bin"),
                    &noise(layer_bytes, (index + salt).wrapping_mul(0x9e37_79b9)),
                    0o644,
                ),
                Compression::Gzip,
            );
        }
        Ok(image)
    };
    berth_testkit::push_image(&target, "bench/large", "1", sized(LARGE_LAYER, 0)?).await?;
    berth_testkit::push_image(&target, "bench/xl", "1", sized(XL_LAYER, 100)?).await?;
    let small_ref = format!("{}/bench/web:1", registry.host());
    let large_ref = format!("{}/bench/large:1", registry.host());
    let xl_ref = format!("{}/bench/xl:1", registry.host());

    let samples = (args.cycles / 2).max(5);
    let (cold, warm) = cold_and_warm(client, &small_ref, samples).await?;
    let (cold_large, warm_large) = cold_and_warm(client, &large_ref, samples.min(10)).await?;
    let (cold_xl, warm_xl) = cold_and_warm(client, &xl_ref, samples.min(5)).await?;

    let machines = "/v1/apps/bench/machines";
    client
        .post::<_, Value>("/v1/images/prune", &json!({}))
        .await?;
    let downloads_before = platform.puller.blobs_downloaded();
    let config = sleeper(&large_ref);
    let clock = Instant::now();
    let creates: Vec<_> = (0..10)
        .map(|_| {
            let client = client.clone();
            let request = create_request(&config);
            tokio::spawn(async move { client.post::<_, Machine>(machines, &request).await })
        })
        .collect();
    let mut ids = Vec::new();
    for create in creates {
        ids.push(create.await??.id);
    }
    let wall = clock.elapsed();
    let downloads = platform.puller.blobs_downloaded() - downloads_before;
    for id in ids {
        client
            .delete::<Value>(&format!("{machines}/{id}?force=true"))
            .await?;
    }
    Ok(RegistryFigures {
        cold: summary(&cold),
        warm: summary(&warm),
        cold_large: summary(&cold_large),
        warm_large: summary(&warm_large),
        large_bytes: 4 * LARGE_LAYER as u64,
        cold_xl: summary(&cold_xl),
        warm_xl: summary(&warm_xl),
        xl_bytes: 4 * XL_LAYER as u64,
        concurrent: json!({
            "image": "64 MB, 5 layers",
            "creates": 10,
            "wall_ms": round(wall.as_secs_f64() * 1000.0),
            "creates_per_s": round(10.0 / wall.as_secs_f64().max(0.000_001)),
            "layer_downloads": downloads,
        }),
    })
}

struct PeerTimes {
    run: Vec<Duration>,
    create: Vec<Duration>,
    start: Vec<Duration>,
}

/// `runc run -d` (and `runc create` + `runc start`) of the Machine's own bundle config,
/// over an overlay of the same layers, with runc making a fresh network namespace.
fn peer_runc(
    cycles: usize,
    runc: &Path,
    layout: &berth_runtime::MachineLayout,
    lowerdirs: &[PathBuf],
    scratch: &Path,
) -> Result<PeerTimes> {
    let mut config: Value = serde_json::from_slice(&std::fs::read(layout.config_json())?)?;
    let root = scratch.join("peer");
    let (upper, work, rootfs, bundle) = (
        root.join("upper"),
        root.join("work"),
        root.join("rootfs"),
        root.join("bundle"),
    );
    for dir in [&upper, &work, &rootfs, &bundle] {
        std::fs::create_dir_all(dir)?;
    }
    berth_runtime::overlay::mount(lowerdirs, &upper, &work, &rootfs)?;
    config["root"]["path"] = json!(rootfs);
    if let Some(namespaces) = config["linux"]["namespaces"].as_array_mut() {
        for namespace in namespaces.iter_mut() {
            if let Some(object) = namespace.as_object_mut() {
                object.remove("path");
            }
        }
    }
    config["linux"]["cgroupsPath"] = json!("berth-bench/peer");
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&config)?,
    )?;
    let state_root = scratch.join("peer-runc");
    let runc_cmd = |args: &[&str]| -> Result<Duration> {
        let clock = Instant::now();
        let status = Command::new(runc)
            .arg("--root")
            .arg(&state_root)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        let elapsed = clock.elapsed();
        if !status.success() {
            bail!("runc {args:?} failed: {status}");
        }
        Ok(elapsed)
    };
    let bundle_arg = bundle.to_string_lossy().into_owned();
    let mut times = PeerTimes {
        run: Vec::new(),
        create: Vec::new(),
        start: Vec::new(),
    };
    let result = (|| -> Result<()> {
        for index in 0..cycles {
            let id = format!("berth-bench-peer-{index}");
            times
                .run
                .push(runc_cmd(&["run", "-d", "--bundle", &bundle_arg, &id])?);
            runc_cmd(&["delete", "--force", &id])?;
            let id = format!("berth-bench-peer-cs-{index}");
            times
                .create
                .push(runc_cmd(&["create", "--bundle", &bundle_arg, &id])?);
            times.start.push(runc_cmd(&["start", &id])?);
            runc_cmd(&["delete", "--force", &id])?;
        }
        Ok(())
    })();
    let _ = berth_runtime::overlay::unmount(&rootfs);
    result?;
    Ok(times)
}

fn print_api_table(api: &Value) {
    println!("\n| API load (loopback) | n | req/s | p50 ms | p90 ms | p99 ms |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let rows = [
        ("GET machine, 1 connection", &api["get_machine"]["c1"]),
        ("GET machine, 8 connections", &api["get_machine"]["c8"]),
        ("GET machine, 32 connections", &api["get_machine"]["c32"]),
        (
            "org A reads, alone (4 conns)",
            &api["isolation"]["calm_reads_alone"],
        ),
        (
            "org A reads, while org B floods starts on 32 conns",
            &api["isolation"]["calm_reads_during_flood_c32"],
        ),
        (
            "org B's flood of starts, 32 conns",
            &api["isolation"]["flood_starts_c32"],
        ),
        (
            "org A reads, while org B floods starts on 256 conns",
            &api["isolation"]["calm_reads_during_flood_c256"],
        ),
        (
            "org B's flood of starts, 256 conns",
            &api["isolation"]["flood_starts_c256"],
        ),
    ];
    for (label, row) in rows {
        println!(
            "| {label} | {} | {} | {} | {} | {} |",
            row["n"], row["requests_per_s"], row["p50_ms"], row["p90_ms"], row["p99_ms"]
        );
    }
    for connections in [32, 256] {
        println!(
            "flood on {connections} connections, answers by status: {}",
            api["isolation"][format!("flood_starts_c{connections}")]["statuses"]
        );
    }
}

fn print_table(report: &Value) {
    if !report["api"].is_null() {
        print_api_table(&report["api"]);
    }
    if report["create"].is_null() {
        return;
    }
    println!("| operation | n | p50 ms | p90 ms | p99 ms |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (label, key) in [
        ("berth create (API, warm image cache)", "create"),
        ("berth first start (API)", "first_start"),
        ("berth start (API, stop→start loop)", "start"),
        ("berth stop (API, SIGKILL)", "stop"),
        (
            "berth create, cold cache, busybox (pull from local registry)",
            "create_cold",
        ),
        (
            "berth create, warm cache, busybox (tag resolved, layers stored)",
            "create_warm_registry",
        ),
        ("berth create, cold cache, 64 MB image", "create_cold_large"),
        (
            "berth create, warm cache, 64 MB image",
            "create_warm_registry_large",
        ),
        ("berth create, cold cache, 256 MB image", "create_cold_xl"),
        (
            "berth create, warm cache, 256 MB image",
            "create_warm_registry_xl",
        ),
        ("peer: runc run -d", "peer_runc_run_d"),
        ("peer: runc create", "peer_runc_create"),
        ("peer: runc start", "peer_runc_start"),
    ] {
        let row = &report[key];
        println!(
            "| {label} | {} | {} | {} | {} |",
            row["n"], row["p50_ms"], row["p90_ms"], row["p99_ms"]
        );
    }
    println!(
        "\nrunc run -d p50 / berth start p50 = {}x (above 1 means berth's start is faster)",
        report["ratio_runc_run_over_berth_start"]
    );
    println!(
        "metering on the start path: +{} us at p50 (state write {} ms without the journal entry, {} ms with)",
        report["metering"]["start_path_overhead_p50_us"],
        report["metering"]["state_write_without_journal"]["p50_ms"],
        report["metering"]["state_write_with_journal"]["p50_ms"]
    );
    println!(
        "usage query over {} journal records (1,000 machines, a month): p50 {} ms; ingestion {} records/s",
        report["usage_query"]["journal_records"],
        report["usage_query"]["query"]["p50_ms"],
        report["usage_query"]["ingest_records_per_s"]
    );
    println!(
        "cold create p50 / start p50 = {}x (busybox), {}x (64 MB), {}x (256 MB); 10 concurrent cold creates: {}",
        report["ratio_create_cold_over_start"],
        report["ratio_create_cold_large_over_start"],
        report["ratio_create_cold_xl_over_start"],
        report["concurrent_cold_creates"]
    );
}
