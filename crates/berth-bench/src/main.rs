//! `cargo run --release -p berth-bench -- [--quick] [--out FILE] [--check]`, as root.
//! Other modes (`--api-only`, `--cluster-only`, `--replicas-only`, `--checkpoints-only` and
//! more) measure one part alone.
//!
//! The start harness: Berth's create, start, stop, concurrent starts and density through
//! its HTTP API (the same in-process platform `berth up` runs), and in the same run the
//! peers on the same rootfs and command: `runc run -d`, `runc create` + `runc start`,
//! `podman create` / `start` / `run -d` and the `unshare` floor. Writes percentiles and
//! ratios as JSON, prints a markdown table and draws a PNG chart of the start latencies.
//! Absolute figures on shared machines are noisy; the ratios within one run are what to
//! compare. `--check` holds the run to docs/SPECIFICATION.md.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth::client::Client;
use berth::platform::{find_program, LocalPlatform, PlatformOptions};
use berth_api::{CreateMachineRequest, InitConfig, Machine, MachineConfig, MachineState};
use berth_image::build::{busybox_layer, Compression, ImageBuilder};
use clap::Parser;
use serde_json::{json, Value};

mod api_load;
mod chart;
mod checkpoints;
mod cluster;
mod gvisor;
mod harness;
mod migrate;
mod peers;
mod replicas;
mod report;
mod runsc;
mod spec;
mod stats;
mod wake;

pub(crate) use stats::{round, summary};

#[derive(Debug, Parser)]
#[command(name = "berth-bench")]
struct Args {
    /// Stop→start cycles of one Machine (30 with --quick). The cycles of --cluster-only.
    #[arg(long)]
    cycles: Option<usize>,
    /// A smaller N of every scenario and peer: finishes in under 3 minutes.
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON figures.
    #[arg(long, default_value = "bench/results/latest.json")]
    out: PathBuf,
    /// Where to draw the start-latency chart (PNG); beside --out by default.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Exit non-zero when the run misses a target of docs/SPECIFICATION.md.
    #[arg(long)]
    check: bool,
    #[arg(long, default_value = "runc")]
    runc: PathBuf,
    /// gVisor's runsc, for --gvisor-only.
    #[arg(long, default_value = "runsc")]
    runsc: PathBuf,
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
    /// Only the proxy figures: wake on request, warm and direct requests, requests/s.
    #[arg(long)]
    wake_only: bool,
    /// Only scenario 2 (--cycles stop→start cycles), printed with the per-step breakdown
    /// of start and written nowhere: for working on the start path.
    #[arg(long)]
    start_only: bool,
    /// Only the moves between workers: a stopped and a running Machine with 1 GB of files
    /// against a tar pipe of the same files, and a drain of 100 stopped Machines, through
    /// `berth server` and two `berth agent` processes.
    #[arg(long)]
    migrate_only: bool,
    /// Only the replicated control plane: start through a `berth server` replica on a
    /// private PostgreSQL against one on SQLite, GET machine at 32 connections over two
    /// replicas, and failover after `kill -9` of one (needs Debian's postgresql).
    #[arg(long)]
    replicas_only: bool,
    /// Only the gvisor driver: stop→start (--cycles, 50 by default) and suspend→resume
    /// cycles of gVisor Machines (a small one and one holding 100 MB) against runsc itself
    /// on the same bundle, wake from suspend through the proxy, and the native driver's
    /// start in the same run.
    #[arg(long)]
    gvisor_only: bool,
    /// Only checkpoints, restores and forks of a Machine's disk (--cycles of each, 30 by
    /// default), on a data dir that is a loop-mounted btrfs with quotas: checkpoints of a
    /// stopped Machine with 1 MB and with 1 GiB written and of a running one, restores,
    /// forks against warm creates, the disk of 100 forks, and start with 100 checkpoints
    /// against a fresh Machine.
    #[arg(long)]
    checkpoints_only: bool,
    /// With --migrate-only: where to copy the server's and agents' logs.
    #[arg(long)]
    keep_logs: Option<PathBuf>,
}

/// Sections that other modes write into the same file; a start-harness run keeps them.
const OTHER_MODES_SECTIONS: &[&str] = &[
    "api",
    "metering",
    "usage_query",
    "cluster",
    "migrate",
    "replicas",
    "gvisor",
    "checkpoints",
];

fn main() -> Result<()> {
    // The platform re-executes this binary as each Machine's shim.
    let mut raw = std::env::args_os();
    let _program = raw.next();
    if raw.next().as_deref() == Some(std::ffi::OsStr::new("shim")) {
        std::process::exit(berth_runtime::shim::main_with_args(raw.collect()));
    }
    let args = Args::parse();
    if args.cycles.is_some_and(|cycles| cycles < 2) {
        bail!("--cycles must be at least 2");
    }
    if args.check
        && (args.api_only
            || args.metering_only
            || args.cluster_only
            || args.replicas_only
            || args.gvisor_only
            || args.checkpoints_only)
    {
        bail!("--check holds the start harness (or --migrate-only) to its targets; run it without the other --*-only modes");
    }
    // Checkpoints need a data dir on btrfs with quotas: a loop-mounted image of its own,
    // unmounted once the runtime is gone (its tasks hold the platform's files open).
    let btrfs = match args.checkpoints_only {
        true => Some(checkpoints::Btrfs::mount()?),
        false => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(args, btrfs.as_ref().map(checkpoints::Btrfs::dir)));
    drop(runtime);
    let unmounted = btrfs.map_or(Ok(()), checkpoints::Btrfs::unmount);
    let missed = result?;
    unmounted?;
    if missed > 0 {
        eprintln!("{missed} target(s) of docs/SPECIFICATION.md missed");
        std::process::exit(1);
    }
    Ok(())
}

fn read_report(path: &Path) -> Value {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_else(|| json!({}))
}

fn write_report(path: &Path, report: &Value) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// Runs the chosen mode; returns how many targets `--check` found missed. `btrfs` is
/// where the data dir goes for `--checkpoints-only`.
async fn run(args: Args, btrfs: Option<&Path>) -> Result<usize> {
    if std::fs::metadata("/proc/self").is_ok() && !is_root() {
        bail!("the bench runs Machines with runc and needs root");
    }
    let scratch = tempfile::Builder::new().prefix("berth-bench-").tempdir()?;
    let cycles = args.cycles.unwrap_or(if args.quick { 30 } else { 200 });
    if args.metering_only {
        let metering = metering_figures(scratch.path(), cycles.max(200)).await?;
        let records = if args.quick { 100_000 } else { 1_000_000 };
        let usage_query = usage_query_figures(scratch.path(), records).await?;
        // Keep the figures of the last full run beside these.
        let mut merged = read_report(&args.out);
        merged["metering"] = metering;
        merged["usage_query"] = usage_query;
        write_report(&args.out, &merged)?;
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"metering": merged["metering"], "usage_query": merged["usage_query"]})
            )?
        );
        return Ok(0);
    }
    if args.migrate_only {
        let sizes = if args.quick {
            migrate::Sizes::quick()
        } else {
            migrate::Sizes::full()
        };
        let figures = migrate::measure(sizes, scratch.path(), args.keep_logs.as_deref()).await?;
        // Keep the figures of the last full run beside these.
        let mut merged = read_report(&args.out);
        for key in migrate::KEYS {
            merged[*key] = figures[*key].clone();
        }
        merged["migrate"] = figures;
        write_report(&args.out, &merged)?;
        println!("{}", migrate::markdown(&merged["migrate"]));
        println!("written to {}", args.out.display());
        return Ok(if args.check {
            check(&merged, spec::MIGRATE_TARGETS)
        } else {
            0
        });
    }
    if args.replicas_only {
        let sizes = match args.quick {
            true => replicas::Sizes::quick(cycles),
            false => replicas::Sizes::full(cycles),
        };
        let figures = replicas::measure(sizes, scratch.path()).await?;
        // Keep the figures of the last full run beside these.
        let mut merged = read_report(&args.out);
        merge_replicas(&mut merged, figures);
        write_report(&args.out, &merged)?;
        println!("{}", replicas::markdown(&merged["replicas"]));
        println!("written to {}", args.out.display());
        return Ok(0);
    }
    let runc = find_program(&args.runc).context("runc not found; install it")?;
    let shim_command: Vec<OsString> =
        vec![std::env::current_exe()?.into_os_string(), "shim".into()];
    let data_dir = match btrfs {
        Some(fs) => fs.join("data"),
        None => scratch.path().join("data"),
    };
    // Density puts 1,000 stopped Machines in one org, the default quota's whole allowance.
    let default_limits: berth_api::SetOrgLimitsRequest =
        serde_json::from_value(json!({"quotas": {"max_machines": 100_000}}))?;
    let platform = LocalPlatform::open(PlatformOptions {
        runtime: args.runtime,
        data_dir: data_dir.clone(),
        programs: berth::platform::Programs {
            runc: runc.clone(),
            runsc: args.runsc.clone(),
        },
        shim_command,
        region: "bench".into(),
        log_max_bytes: 1024 * 1024,
        pids_limit: 1024,
        prices: Default::default(),
        workers: 1,
        worker_capacity: berth_api::Resources {
            cpus: 1 << 16,
            memory_mb: 1 << 30,
            disk_mb: 1 << 40,
        },
        registry: Default::default(),
        exec_max_output_bytes: None,
        default_limits: Some(default_limits),
        egress_nat: false,
        allow_host_ports: Vec::new(),
        placement: berth_core::placement::Strategy::default(),
        disk_quota: match args.checkpoints_only {
            true => berth_runtime::quota::QuotaMode::Require,
            false => Default::default(),
        },
        database: None,
    })
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api_url = format!("http://{}", listener.local_addr()?);
    let router = platform.control.router();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let client = Client::new(&api_url, &platform.admin_token)?;

    if args.cluster_only {
        let result = cluster::measure(cycles, &client, scratch.path()).await;
        server.abort();
        remove_bridges(&platform).await;
        platform.close().await;
        let figures = result?;
        let mut merged = read_report(&args.out);
        merged["cluster"] = figures;
        write_report(&args.out, &merged)?;
        println!("{}", serde_json::to_string_pretty(&merged["cluster"])?);
        return Ok(0);
    }
    if args.wake_only {
        let token = platform.admin_token.clone();
        let result = wake::measure(
            args.cycles.unwrap_or(30),
            &api_url,
            &client,
            &token,
            scratch.path(),
            5,
        )
        .await;
        server.abort();
        remove_bridges(&platform).await;
        platform.close().await;
        return wake::merge_into(&args.out, result?).map(|()| 0);
    }
    if args.gvisor_only {
        let result = measure_gvisor(&args, &api_url, &client, &platform, scratch.path()).await;
        server.abort();
        remove_bridges(&platform).await;
        platform.close().await;
        let section = result?;
        let mut merged = read_report(&args.out);
        for (key, value) in gvisor::headline(&section) {
            merged[key] = value;
        }
        merged["gvisor"] = section;
        write_report(&args.out, &merged)?;
        println!("{}", gvisor::markdown(&merged["gvisor"]));
        print!("{}", report::goal_lines(&gvisor::goals(&merged["gvisor"])));
        println!("written to {}", args.out.display());
        return Ok(0);
    }
    if let Some(fs) = btrfs {
        let cycles = args.cycles.unwrap_or(if args.quick { 10 } else { 30 });
        let result = checkpoints::measure(cycles, &client, &platform, fs, scratch.path()).await;
        server.abort();
        remove_bridges(&platform).await;
        platform.close().await;
        let mut section = result?;
        section["host"] = host_facts(&args.runc);
        section["host"]["btrfs"] =
            json!(find_program(Path::new("btrfs")).and_then(|btrfs| first_line(&btrfs)));
        let mut merged = read_report(&args.out);
        for (key, value) in checkpoints::headline(&section) {
            merged[key] = value;
        }
        merged["checkpoints"] = section;
        write_report(&args.out, &merged)?;
        println!("{}", checkpoints::markdown(&merged["checkpoints"]));
        print!(
            "{}",
            report::goal_lines(&checkpoints::goals(&merged["checkpoints"]))
        );
        println!("written to {}", args.out.display());
        return Ok(0);
    }
    if args.start_only {
        let result = async {
            import_bench_image(&client, scratch.path()).await?;
            harness::start_stop_cycles(&client, cycles).await
        }
        .await;
        server.abort();
        remove_bridges(&platform).await;
        platform.close().await;
        let figures = result?;
        println!("start {}", summary(&figures.starts));
        println!("stop  {}", summary(&figures.stops));
        print!(
            "{}",
            report::step_table(&stats::step_breakdown(&figures.start_steps))
        );
        return Ok(0);
    }
    if args.api_only {
        let result = match import_bench_image(&client, scratch.path()).await {
            Ok(_) => api_load::measure(&api_url, &client, args.api_seconds).await,
            Err(error) => Err(error),
        };
        // Always leave the host clean, even when a measurement failed.
        for app in ["bench", "bench-api", "calm-app", "flood-app"] {
            let _ = client.delete::<Value>(&format!("/v1/apps/{app}")).await;
        }
        server.abort();
        remove_bridges(&platform).await;
        platform.close().await;
        // An API-only run keeps the lifecycle figures of the last full run beside its own.
        let mut merged = read_report(&args.out);
        merged["api"] = result?;
        write_report(&args.out, &merged)?;
        print_api_table(&merged["api"]);
        println!("\nwritten to {}", args.out.display());
        return Ok(0);
    }

    let sizes = if args.quick {
        harness::Sizes {
            start_cycles: cycles,
            ..harness::Sizes::quick()
        }
    } else {
        harness::Sizes::full(cycles)
    };
    let result = measure(&sizes, &client, &platform, &runc, scratch.path()).await;
    // Always leave the host clean, even when a measurement failed.
    let _ = client.delete::<Value>("/v1/apps/bench").await;
    // Scenario 5: wake on request through the proxy.
    let (wake_cycles, wake_seconds) = if args.quick { (10, 2) } else { (30, 5) };
    let token = platform.admin_token.clone();
    let wake = wake::measure(
        wake_cycles,
        &api_url,
        &client,
        &token,
        scratch.path(),
        wake_seconds,
    )
    .await;
    server.abort();
    remove_bridges(&platform).await;
    platform.close().await;
    let raw = result?;

    let mut report = report::assemble(&raw, &sizes, args.quick)?;
    match wake {
        Ok(figures) => {
            report["wake_p50_ms"] = figures["wake"]["p50_ms"].clone();
            report["wake"] = figures;
            if let Some(unavailable) = report["unavailable"].as_object_mut() {
                unavailable.remove("wake_p50_ms");
            }
        }
        Err(error) => {
            eprintln!("wake on request not measured: {error:#}");
            report["unavailable"]["wake_p50_ms"] = json!(format!("{error:#}"));
        }
    }
    let previous = read_report(&args.out);
    for section in OTHER_MODES_SECTIONS
        .iter()
        .chain(migrate::KEYS)
        .chain(replicas::KEYS)
        .chain(gvisor::KEYS)
        .chain(checkpoints::KEYS)
    {
        if !previous[*section].is_null() {
            report[*section] = previous[*section].clone();
        }
    }
    // Last, on processes of its own: the replicated control plane.
    let replica_sizes = match args.quick {
        true => replicas::Sizes::quick(cycles),
        false => replicas::Sizes::full(cycles),
    };
    match replicas::measure(replica_sizes, scratch.path()).await {
        Ok(figures) => merge_replicas(&mut report, figures),
        Err(error) => {
            eprintln!("the replicated control plane not measured: {error:#}");
            report["unavailable"]["replicas"] = json!(format!("{error:#}"));
        }
    }
    let chart_path = args
        .chart
        .clone()
        .unwrap_or_else(|| args.out.with_extension("png"));
    match chart::draw(
        &chart_path,
        &report::chart_title(&report),
        &report::chart_series(&raw),
    ) {
        Ok(()) => report["chart"] = json!(chart_path),
        Err(error) => {
            eprintln!("no chart: {error:#}");
            report["chart"] = Value::Null;
            report["unavailable"]["chart"] = json!(format!("{error:#}"));
        }
    }
    write_report(&args.out, &report)?;
    println!("{}", report::markdown(&report));
    if report["replicas"].is_object() {
        println!("{}", replicas::markdown(&report["replicas"]));
    }
    println!("written to {}", args.out.display());
    if !args.check {
        return Ok(0);
    }
    Ok(check(&report, spec::TARGETS))
}

/// The gvisor section: the driver's figures and their peers, the wake from suspend, the
/// goals each is held to, and the steps of every start, suspend and resume.
async fn measure_gvisor(
    args: &Args,
    api_url: &str,
    client: &Client,
    platform: &LocalPlatform,
    scratch: &Path,
) -> Result<Value> {
    let runsc = find_program(&args.runsc).context("runsc not found; install Debian's runsc")?;
    let cycles = args.cycles.unwrap_or(if args.quick { 10 } else { 50 });
    let sizes = match args.quick {
        true => gvisor::Sizes::quick(cycles),
        false => gvisor::Sizes::full(cycles),
    };
    let mut section = gvisor::measure(sizes, client, platform, &runsc, scratch).await?;
    println!(
        "gvisor: {} wakes from suspend through the proxy",
        sizes.wake_cycles
    );
    match gvisor::wake_from_suspend(sizes.wake_cycles, api_url, client, &platform.admin_token).await
    {
        Ok(figures) => section["wake_from_suspend"] = figures,
        Err(error) => {
            eprintln!("wake from suspend not measured: {error:#}");
            section["wake_from_suspend"] = json!({"n": 0, "unavailable": format!("{error:#}")});
        }
    }
    section["host"] = host_facts(&args.runc);
    section["host"]["runsc"] = json!(first_line(&runsc));
    section["goals"] = Value::Array(gvisor::goals(&section));
    Ok(section)
}

/// The replicas section, and its headline figures at the top level.
fn merge_replicas(report: &mut Value, figures: Value) {
    for key in replicas::KEYS {
        report[*key] = figures[*key].clone();
    }
    report["replicas"] = figures;
}

/// Prints each target's verdict; answers how many were missed.
fn check(report: &Value, targets: &[spec::Target]) -> usize {
    println!("\ntargets of docs/SPECIFICATION.md:");
    let verdicts = spec::evaluate(report, targets);
    for verdict in &verdicts {
        println!("{}", verdict.line);
    }
    verdicts.iter().filter(|verdict| !verdict.met).count()
}

async fn remove_bridges(platform: &LocalPlatform) {
    for (name, _) in &platform.agents {
        if let Ok(prefix) = platform.control.worker_prefix(name).await {
            cluster::remove_network(&berth::platform::bridge_name(&prefix));
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

/// The first line `program --version` prints.
fn first_line(program: &Path) -> Option<String> {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| {
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
}

/// Host facts for the report: cores, CPU, kernel, and the peers' versions.
fn host_facts(runc: &Path) -> Value {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, name)| name.trim().to_owned())
        });
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu_model,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        // 1 makes the kernel's RCU grace periods expedited: cgroup v1 moves at start wait
        // for one, and that wait is start's tail on a busy host.
        "rcu_expedited": std::fs::read_to_string("/sys/kernel/rcu_expedited")
            .ok()
            .and_then(|text| text.trim().parse::<u8>().ok()),
        "runc": first_line(runc),
        "podman": find_program(Path::new("podman")).and_then(|podman| first_line(&podman)),
    })
}

/// Scenarios 2 to 4 through the API, the peers on the rootfs of a Machine of the same
/// image, then scenario 1.
async fn measure(
    sizes: &harness::Sizes,
    client: &Client,
    platform: &LocalPlatform,
    runc: &Path,
    scratch: &Path,
) -> Result<report::RawRun> {
    import_bench_image(client, scratch).await?;
    client
        .post::<_, Value>("/v1/apps", &json!({"app_name": "bench"}))
        .await?;
    println!(
        "scenario 2: {} stop→start cycles of one Machine",
        sizes.start_cycles
    );
    let cycles = harness::start_stop_cycles(client, sizes.start_cycles).await?;
    println!("scenario 3: {} Machines started at once", sizes.concurrent);
    let concurrent = harness::concurrent_starts(client, sizes.concurrent).await?;
    println!(
        "scenario 4: {} stopped Machines on one worker",
        sizes.density
    );
    let density = harness::density(
        client,
        &scratch.join("data"),
        sizes.density,
        sizes.density_reads,
        sizes.density_start_cycles,
    )
    .await?;

    println!(
        "peers: {} runs each, same rootfs and command",
        sizes.peer_runs
    );
    let machine: Machine = client
        .post(
            "/v1/apps/bench/machines",
            &create_request(&cluster::sleeper()),
        )
        .await?;
    let record = platform
        .agent
        .store()
        .get(&machine.id)
        .await?
        .context("the peer machine's record")?;
    let layout = platform.agent.layout(&machine.id);
    let lowerdirs = record.rootfs.lowerdirs();
    let peers = tokio::task::block_in_place(|| {
        peers::measure(&peers::PeerInputs {
            runs: sizes.peer_runs,
            runc,
            machine_config_json: &layout.config_json(),
            lowerdirs: &lowerdirs,
            scratch,
        })
    });
    client
        .delete::<Value>(&format!(
            "/v1/apps/bench/machines/{}?force=true",
            machine.id
        ))
        .await?;
    let peers = peers?;
    // Last: its cold creates prune every image no Machine uses, the bench image too.
    println!("scenario 1: creates from a local registry, cold and warm");
    let registry = measure_registry(sizes, client, platform)
        .await
        .map_err(|error| format!("{error:#}"));
    if let Err(reason) = &registry {
        eprintln!("creates from a registry not measured: {reason}");
    }
    Ok(report::RawRun {
        host: host_facts(runc),
        registry,
        cycles,
        concurrent,
        density,
        peers,
    })
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
            registry: None,
            repository: "x".into(),
            tag: None,
            digest: "sha256:0".into(),
            labels: Default::default(),
        },
        rootfs: RootfsStack {
            image_layers: Vec::new(),
            frozen_layers: Vec::new(),
            upper: scratch.join("upper"),
        },
        created_at_ms: 0,
        updated_at_ms: 0,
        last_exit: None,
        org: None,
        restart_count: 0,
        run_generation: 0,
        pending: None,
        run_open: false,
        storage_bytes: 0,
        memory_bytes: 0,
        checkpoint_bytes: 0,
        private_ip: None,
        restart_due_ms: None,
        cordoned: false,
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
            exec: None,
            tty: false,
        },
        stop_config: berth_api::StopConfig {
            signal: Some("SIGKILL".into()),
            timeout: None,
        },
        ..MachineConfig::default()
    }
}

pub(crate) fn create_request(config: &MachineConfig) -> CreateMachineRequest {
    CreateMachineRequest {
        from_checkpoint: None,
        name: None,
        region: None,
        skip_launch: true,
        skip_secrets: false,
        min_secrets_version: None,
        lease_ttl: None,
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
/// layer plus a tiny one) and, in a full run, 64 MB and 256 MB images (busybox plus four incompressible gzip
/// layers), and 10 cold creates of the 64 MB image at once.
async fn measure_registry(
    sizes: &harness::Sizes,
    client: &Client,
    platform: &LocalPlatform,
) -> Result<Value> {
    let registry = berth_testkit::Registry::start()?;
    let target = berth_testkit::PushTarget::anonymous(&registry.host());
    let small = ImageBuilder::new()
        .layer(busybox_layer(Path::new("/bin/busybox"))?, Compression::Gzip)
        .layer(
            berth_image::LayerBuilder::new().file("etc/bench", b"registry", 0o644),
            Compression::Gzip,
        );
    berth_testkit::push_image(&target, "bench/web", "1", small).await?;
    let small_ref = format!("{}/bench/web:1", registry.host());
    let (cold, warm) = cold_and_warm(client, &small_ref, sizes.registry_samples).await?;
    let mut figures = json!({"cold": summary(&cold), "warm": summary(&warm)});
    if !sizes.large_images {
        return Ok(figures);
    }

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
    let large_ref = format!("{}/bench/large:1", registry.host());
    let xl_ref = format!("{}/bench/xl:1", registry.host());
    let samples = sizes.registry_samples;
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
    figures["cold_large"] = summary(&cold_large);
    figures["warm_large"] = summary(&warm_large);
    figures["large_image_bytes"] = json!(4 * LARGE_LAYER as u64);
    figures["cold_xl"] = summary(&cold_xl);
    figures["warm_xl"] = summary(&warm_xl);
    figures["xl_image_bytes"] = json!(4 * XL_LAYER as u64);
    figures["concurrent_cold_creates"] = json!({
        "image": "64 MB, 5 layers",
        "creates": 10,
        "wall_ms": round(wall.as_secs_f64() * 1000.0),
        "creates_per_s": round(10.0 / wall.as_secs_f64().max(0.000_001)),
        "layer_downloads": downloads,
    });
    Ok(figures)
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
