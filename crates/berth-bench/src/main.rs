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
    /// Seconds of each API load window (GET machine throughput, flood isolation).
    #[arg(long, default_value_t = 10)]
    api_seconds: u64,
    /// Only the API-tier figures, none of the lifecycle ones.
    #[arg(long)]
    api_only: bool,
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
    let runc = find_program(&args.runc).context("runc not found; install it")?;
    let scratch = tempfile::Builder::new().prefix("berth-bench-").tempdir()?;
    let shim_command: Vec<OsString> =
        vec![std::env::current_exe()?.into_os_string(), "shim".into()];
    let platform = LocalPlatform::open(PlatformOptions {
        data_dir: scratch.path().join("data"),
        runc_binary: runc.clone(),
        shim_command,
        region: "bench".into(),
        log_max_bytes: 1024 * 1024,
        pids_limit: 1024,
        exec_max_output_bytes: None,
        default_limits: None,
    })
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api_url = format!("http://{}", listener.local_addr()?);
    let router = platform.control.router();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let client = Client::new(&api_url, &platform.admin_token)?;

    let result = if args.api_only {
        import_bench_image(&client, scratch.path()).await
    } else {
        measure(&args, &client, &platform, &runc, scratch.path()).await
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

    let config = MachineConfig {
        image: "bench/busybox:1".into(),
        init: InitConfig {
            cmd: Some(vec!["/bin/sleep".into(), "3600".into()]),
            entrypoint: None,
        },
        // sleep as PID 1 ignores SIGTERM; the bench measures stop, not a grace period.
        stop_config: berth_api::StopConfig {
            signal: Some("SIGKILL".into()),
            timeout: None,
        },
        ..MachineConfig::default()
    };
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
    }))
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
}
