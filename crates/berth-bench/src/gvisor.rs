//! `--gvisor-only`: Machines with `config.runtime: "gvisor"` through the API against runsc
//! itself on the same bundle (runsc.rs), in the same run:
//! - stop→start cycles of a small Machine against `runsc run -d` and `runsc create` +
//!   `runsc start`;
//! - suspend→start (resume) cycles of a small Machine and of one holding 100 MB of touched
//!   memory, against `runsc checkpoint` and `runsc restore` of a peer sandbox;
//! - wake from suspend: one request through the proxy to a Machine the proxy suspended;
//! - and beside them the native driver's stop→start cycles, which must not regress.
//!
//! Each start and resume keeps its `Server-Timing` steps, each suspend the agent's steps
//! from its answer (`timings`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth::client::Client;
use berth::platform::LocalPlatform;
use berth_api::{Machine, MachineConfig, MachineState};
use berth_proxy::{HttpPlatform, Proxy, ProxyConfig};
use serde_json::{json, Value};

use crate::harness::{self, disk_bytes};
use crate::peers::Outcome;
use crate::runsc::{self, Peer};
use crate::stats::{parse_server_timing, round, step_breakdown};
use crate::summary;

const APP: &str = "bench-gvisor";
/// Succeeds in the 100 MB Machine once its memory is filled and while dd holds it.
const FILLED: &[&str] = &[
    "/bin/sh",
    "-c",
    "test -e /tmp/filled && ps | grep -q '[d]d if'",
];
/// A process holding 100 MB of touched memory: dd reads 100 MB of random bytes (a
/// checkpoint cannot compress them) into one buffer, then blocks writing it into a pipe
/// whose reader takes one byte, marks the fill done and sleeps. (The Machine's
/// `/dev/shm` is capped at 64 MiB, and a file in its rootfs is host disk, not memory.)
const FILL: &str = "dd if=/dev/urandom bs=104857600 count=1 iflag=fullblock 2>/dev/null \
                    | (head -c 1 >/dev/null; touch /tmp/filled; exec sleep 3600)";
const HTTPD: &str = "mkdir -p /www; echo ok > /www/index.html; exec httpd -f -p 8080 -h /www";

/// The keys this mode writes at the top level of the results file (beside `gvisor`).
pub const KEYS: &[&str] = &[
    "gvisor_start_p50_ms",
    "gvisor_start_p99_ms",
    "suspend_p50_ms",
    "resume_p50_ms",
    "suspend_100mb_p50_ms",
    "resume_100mb_p50_ms",
    "wake_from_suspend_p50_ms",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// Stop→start cycles of the small gVisor Machine, and runs of each start peer.
    pub start_cycles: usize,
    /// Suspend→resume cycles of the small Machine, and checkpoint→restore runs of its peer.
    pub suspend_cycles: usize,
    /// The same for the Machine holding 100 MB.
    pub suspend_100mb_cycles: usize,
    /// Stop→start cycles of a native Machine in the same run.
    pub native_start_cycles: usize,
    pub wake_cycles: usize,
}

impl Sizes {
    pub fn full(start_cycles: usize) -> Sizes {
        Sizes {
            start_cycles,
            suspend_cycles: 30,
            suspend_100mb_cycles: 10,
            native_start_cycles: 200,
            wake_cycles: 20,
        }
    }

    pub fn quick(start_cycles: usize) -> Sizes {
        Sizes {
            start_cycles,
            suspend_cycles: 10,
            suspend_100mb_cycles: 5,
            native_start_cycles: 30,
            wake_cycles: 5,
        }
    }
}

fn machine_path(id: &str) -> String {
    format!("/v1/apps/{APP}/machines/{id}")
}

fn gvisor(mut config: MachineConfig) -> MachineConfig {
    config.runtime = Some("gvisor".into());
    config
}

fn filler() -> MachineConfig {
    let mut config = gvisor(crate::cluster::sleeper());
    config.init.cmd = Some(vec!["/bin/sh".into(), "-c".into(), FILL.into()]);
    config.guest.memory_mb = 512;
    config
}

async fn create(client: &Client, config: &MachineConfig) -> Result<Machine> {
    client
        .post(
            &format!("/v1/apps/{APP}/machines"),
            &crate::create_request(config),
        )
        .await
}

/// The steps of an answer's `timings` (`[{step, us}]`), for the suspend, whose answer
/// carries the agent's steps and no `Server-Timing` header.
fn answer_steps(answer: &Value) -> Vec<(String, f64)> {
    answer["timings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|step| Some((step["step"].as_str()?.to_owned(), step["us"].as_f64()?)))
        .collect()
}

async fn suspend(client: &Client, id: &str) -> Result<(Duration, Vec<(String, f64)>)> {
    let clock = Instant::now();
    let answer: Value = client
        .post(&format!("{}/suspend", machine_path(id)), &json!({}))
        .await?;
    let elapsed = clock.elapsed();
    if answer["machine"]["state"] != "suspended" {
        bail!(
            "machine {id} answered {} to suspend",
            answer["machine"]["state"]
        );
    }
    Ok((elapsed, answer_steps(&answer)))
}

/// A start of a suspended Machine, which must answer `resumed`.
async fn resume(client: &Client, id: &str) -> Result<(Duration, Vec<(String, f64)>)> {
    let clock = Instant::now();
    let (answer, headers): (Value, _) = client
        .post_with_headers(&format!("{}/start", machine_path(id)), &json!({}))
        .await?;
    let elapsed = clock.elapsed();
    if answer["resumed"] != true || answer["machine"]["state"] != "started" {
        bail!("machine {id} was not resumed: {answer}");
    }
    let steps = headers
        .get("server-timing")
        .and_then(|value| value.to_str().ok())
        .map(parse_server_timing)
        .unwrap_or_default();
    Ok((elapsed, steps))
}

/// Polls `check` in the Machine until it succeeds.
async fn wait_until(client: &Client, id: &str, check: &[&str]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let answer: Value = match client
            .post(
                &format!("{}/exec", machine_path(id)),
                &json!({"cmd": check}),
            )
            .await
        {
            Ok(answer) => answer,
            Err(error) => {
                // Most likely the command ended; its output says why.
                let logs = client
                    .get_text(&format!("{}/logs", machine_path(id)))
                    .await
                    .unwrap_or_default();
                bail!(
                    "{error:#}; the Machine's output: {}",
                    String::from_utf8_lossy(&logs).trim()
                );
            }
        };
        if answer["exit_code"] == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{check:?} did not succeed in machine {id}: {answer}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct SuspendFigures {
    suspends: Vec<Duration>,
    resumes: Vec<Duration>,
    suspend_steps: Vec<Vec<(String, f64)>>,
    resume_steps: Vec<Vec<(String, f64)>>,
    /// The memory image on disk, as the first timed suspend left it.
    image_bytes: u64,
}

/// `count` suspend→resume cycles of a started Machine, after one untimed cycle.
async fn suspend_cycles(
    client: &Client,
    platform: &LocalPlatform,
    id: &str,
    count: usize,
) -> Result<SuspendFigures> {
    suspend(client, id).await?;
    resume(client, id).await?;
    let image = platform.agent.layout(id).memory_image();
    let mut figures = SuspendFigures {
        suspends: Vec::with_capacity(count),
        resumes: Vec::with_capacity(count),
        suspend_steps: Vec::with_capacity(count),
        resume_steps: Vec::with_capacity(count),
        image_bytes: 0,
    };
    for index in 0..count {
        let (elapsed, steps) = suspend(client, id).await?;
        figures.suspends.push(elapsed);
        figures.suspend_steps.push(steps);
        if index == 0 {
            figures.image_bytes = disk_bytes(&image)?;
        }
        let (elapsed, steps) = resume(client, id).await?;
        figures.resumes.push(elapsed);
        figures.resume_steps.push(steps);
    }
    Ok(figures)
}

/// A peer's samples as a summary, or `n: 0` with the reason it could not run.
fn outcome(samples: &Outcome) -> Value {
    match samples {
        Ok(samples) => summary(samples),
        Err(reason) => json!({"n": 0, "unavailable": reason}),
    }
}

fn p50(summary: &Value) -> Option<f64> {
    summary["p50_ms"].as_f64()
}

/// Berth's p50 over the peer's: 1.1 is 10 % more than runsc's own time.
pub fn overhead(berth: Option<f64>, peer: Option<f64>) -> Option<f64> {
    match (berth, peer) {
        (Some(berth), Some(peer)) if peer > 0.0 => Some(round(berth / peer)),
        _ => None,
    }
}

/// The goals, each with the figure it was held to, from a `gvisor` section.
pub fn goals(section: &Value) -> Vec<Value> {
    let ratio =
        |berth: &str, peer: &str| overhead(p50(&section[berth]), p50(&section["peers"][peer]));
    let mut verdicts = Vec::new();
    let mut hold = |goal: &str, value: Option<f64>, target: f64| {
        verdicts.push(json!({"goal": goal, "value": value, "target": target,
                             "met": value.is_some_and(|value| value <= target)}));
    };
    hold(
        "gvisor start p50 / runsc run -d p50",
        ratio("start", "runsc_run"),
        1.1,
    );
    hold(
        "suspend p50 / runsc checkpoint p50",
        ratio("suspend", "runsc_checkpoint"),
        1.1,
    );
    hold(
        "resume p50 / runsc restore p50",
        ratio("resume", "runsc_restore"),
        1.1,
    );
    hold("resume p50 ms", p50(&section["resume"]), 300.0);
    hold(
        "suspend p50 / runsc checkpoint p50, 100 MB",
        ratio("suspend_100mb", "runsc_checkpoint_100mb"),
        1.1,
    );
    hold(
        "resume p50 / runsc restore p50, 100 MB",
        ratio("resume_100mb", "runsc_restore_100mb"),
        1.1,
    );
    hold(
        "resume p50 ms, 100 MB",
        p50(&section["resume_100mb"]),
        300.0,
    );
    let resume = p50(&section["resume"]);
    hold(
        "wake from suspend p50 - resume p50, ms",
        p50(&section["wake_from_suspend"])
            .zip(resume)
            .map(|(wake, resume)| round(wake - resume)),
        20.0,
    );
    verdicts
}

/// Everything but the wake, through the API and then the peers.
pub async fn measure(
    sizes: Sizes,
    client: &Client,
    platform: &LocalPlatform,
    runsc: &Path,
    scratch: &Path,
) -> Result<Value> {
    crate::import_bench_image(client, scratch).await?;
    println!(
        "native: {} stop→start cycles of one Machine",
        sizes.native_start_cycles
    );
    let native = harness::start_stop_cycles(client, sizes.native_start_cycles).await?;
    let mut section = json!({
        "native_start": summary(&native.starts),
        "native_start_steps": step_breakdown(&native.start_steps),
    });
    harness::in_app(client, APP, async {
        let small = create(client, &gvisor(crate::cluster::sleeper())).await?;
        println!("gvisor: {} stop→start cycles", sizes.start_cycles);
        harness::timed_start(client, APP, &small.id).await?;
        harness::stop(client, APP, &small.id).await?;
        let (starts, stops, start_steps) =
            harness::cycles(client, APP, &small.id, sizes.start_cycles).await?;
        section["start"] = summary(&starts);
        section["stop"] = summary(&stops);
        section["start_steps"] = step_breakdown(&start_steps);

        println!("gvisor: {} suspend→resume cycles", sizes.suspend_cycles);
        harness::timed_start(client, APP, &small.id).await?;
        let cycles = suspend_cycles(client, platform, &small.id, sizes.suspend_cycles).await?;
        harness::stop(client, APP, &small.id).await?;
        put_suspend(&mut section, "", &cycles);

        println!(
            "gvisor: {} suspend→resume cycles holding 100 MB",
            sizes.suspend_100mb_cycles
        );
        let large = create(client, &filler()).await?;
        harness::timed_start(client, APP, &large.id).await?;
        wait_until(client, &large.id, FILLED).await?;
        let cycles =
            suspend_cycles(client, platform, &large.id, sizes.suspend_100mb_cycles).await?;
        // The filled memory came back with every resume.
        wait_until(client, &large.id, FILLED).await?;
        harness::stop(client, APP, &large.id).await?;
        put_suspend(&mut section, "_100mb", &cycles);

        println!("runsc peers on the same bundles");
        let (small_record, large_record) = (
            platform.agent.store().get(&small.id).await?,
            platform.agent.store().get(&large.id).await?,
        );
        let small_lowerdirs = small_record
            .context("the small Machine's record")?
            .rootfs
            .lowerdirs();
        let large_lowerdirs = large_record
            .context("the 100 MB Machine's record")?
            .rootfs
            .lowerdirs();
        let (small_layout, large_layout) = (
            platform.agent.layout(&small.id),
            platform.agent.layout(&large.id),
        );
        let (small_config, large_config) = (small_layout.config_json(), large_layout.config_json());
        let (small_userns, large_userns) = (small_layout.userns(), large_layout.userns());
        let peers = tokio::task::block_in_place(|| -> Result<Value> {
            let start_dir = scratch.join("gvisor-peer-start");
            let start = runsc::measure_start(&Peer {
                runsc,
                runs: sizes.start_cycles,
                machine_config_json: &small_config,
                lowerdirs: &small_lowerdirs,
                userns: &small_userns,
                dir: &start_dir,
                ready: None,
            })?;
            let small_dir = scratch.join("gvisor-peer-checkpoint");
            let small = runsc::measure_checkpoint(&Peer {
                runsc,
                runs: sizes.suspend_cycles,
                machine_config_json: &small_config,
                lowerdirs: &small_lowerdirs,
                userns: &small_userns,
                dir: &small_dir,
                ready: None,
            })?;
            let large_dir = scratch.join("gvisor-peer-checkpoint-100mb");
            let large = runsc::measure_checkpoint(&Peer {
                runsc,
                runs: sizes.suspend_100mb_cycles,
                machine_config_json: &large_config,
                lowerdirs: &large_lowerdirs,
                userns: &large_userns,
                dir: &large_dir,
                ready: Some(FILLED),
            })?;
            Ok(json!({
                "runsc_run": outcome(&start.run),
                "runsc_create": outcome(&start.create),
                "runsc_start": outcome(&start.start),
                "runsc_create_start": outcome(&start.create_start),
                "runsc_checkpoint": outcome(&small.checkpoint),
                "runsc_delete_after_checkpoint": outcome(&small.delete),
                "runsc_restore": outcome(&small.restore),
                "image_bytes": small.image_bytes,
                "runsc_checkpoint_100mb": outcome(&large.checkpoint),
                "runsc_delete_after_checkpoint_100mb": outcome(&large.delete),
                "runsc_restore_100mb": outcome(&large.restore),
                "image_100mb_bytes": large.image_bytes,
            }))
        })?;
        section["peers"] = peers;
        Ok(())
    })
    .await?;
    Ok(section)
}

fn put_suspend(section: &mut Value, suffix: &str, cycles: &SuspendFigures) {
    section[format!("suspend{suffix}")] = summary(&cycles.suspends);
    section[format!("suspend{suffix}_steps")] = step_breakdown(&cycles.suspend_steps);
    section[format!("resume{suffix}")] = summary(&cycles.resumes);
    section[format!("resume{suffix}_steps")] = step_breakdown(&cycles.resume_steps);
    section[format!("image{suffix}_bytes")] = json!(cycles.image_bytes);
}

/// Wake from suspend: an httpd gVisor Machine with `autostop: "suspend"` behind the
/// proxy, left idle until the proxy suspends it, then one request (to the answer's head).
pub async fn wake_from_suspend(
    cycles: usize,
    api_url: &str,
    client: &Client,
    token: &str,
) -> Result<Value> {
    harness::in_app(client, "bench-gvisor-wake", async {
        let app = "bench-gvisor-wake";
        let machine: Machine = client
            .post(
                &format!("/v1/apps/{app}/machines"),
                &json!({"config": {"image": "bench/busybox:1", "runtime": "gvisor",
                    "init": {"cmd": ["/bin/sh", "-c", HTTPD]},
                    "stop_config": {"signal": "SIGKILL"},
                    "services": [{"internal_port": 8080, "autostop": "suspend",
                                  "autostop_idle_seconds": 1,
                                  "concurrency": {"soft_limit": 1000, "hard_limit": 1000}}]}}),
            )
            .await?;
        let proxy = Proxy::new(
            Arc::new(HttpPlatform::new(api_url, token)?),
            ProxyConfig::default(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/", listener.local_addr()?);
        let server = tokio::spawn(proxy.serve(listener, std::future::pending()));
        let result = async {
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(30))
                .build()?;
            let host = format!("{app}.localhost");
            let request = || async {
                let clock = Instant::now();
                let response = http.get(&url).header("host", &host).send().await?;
                let elapsed = clock.elapsed();
                if !response.status().is_success() {
                    let status = response.status();
                    bail!("the proxy answered {status}: {}", response.text().await?);
                }
                response.bytes().await?;
                Ok::<_, anyhow::Error>(elapsed)
            };
            request().await.context("the first request")?;
            let mut wakes = Vec::with_capacity(cycles);
            for _ in 0..cycles {
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let state = client
                        .get::<Machine>(&format!("/v1/apps/{app}/machines/{}", machine.id))
                        .await?
                        .state;
                    match state {
                        MachineState::Suspended => break,
                        MachineState::Stopped => bail!(
                            "the proxy stopped the idle gVisor Machine instead of suspending it \
                             (autostop \"suspend\" falls back to stop in this build)"
                        ),
                        _ if Instant::now() > deadline => {
                            bail!("the proxy did not suspend the idle Machine ({state:?})")
                        }
                        _ => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                wakes.push(request().await.context("a wake")?);
            }
            Ok(summary(&wakes))
        }
        .await;
        server.abort();
        result
    })
    .await
}

/// The top-level keys from a `gvisor` section.
pub fn headline(section: &Value) -> Vec<(&'static str, Value)> {
    let p = |key: &str, rank: &str| section[key][format!("{rank}_ms")].clone();
    vec![
        ("gvisor_start_p50_ms", p("start", "p50")),
        ("gvisor_start_p99_ms", p("start", "p99")),
        ("suspend_p50_ms", p("suspend", "p50")),
        ("resume_p50_ms", p("resume", "p50")),
        ("suspend_100mb_p50_ms", p("suspend_100mb", "p50")),
        ("resume_100mb_p50_ms", p("resume_100mb", "p50")),
        ("wake_from_suspend_p50_ms", p("wake_from_suspend", "p50")),
    ]
}

/// The table printed after a run: Berth's figures, each beside its runsc peer and Berth's
/// p50 over the peer's.
pub fn markdown(section: &Value) -> String {
    let mut out = String::from(
        "| operation | n | p50 ms | p90 ms | p99 ms | berth p50 / peer p50 |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let cell = |value: &Value| value.as_f64().map_or("–".to_owned(), |v| format!("{v}"));
    let mut row = |label: &str, figures: &Value, ratio: Option<Option<f64>>| {
        let ratio = match ratio {
            None => String::new(),
            Some(Some(ratio)) => format!("{ratio}×"),
            Some(None) => "–".into(),
        };
        match figures["unavailable"].as_str() {
            Some(reason) => out.push_str(&format!(
                "| {label} | 0 | not measured: {reason} | | | {ratio} |\n"
            )),
            None => out.push_str(&format!(
                "| {label} | {} | {} | {} | {} | {ratio} |\n",
                figures["n"].as_u64().unwrap_or(0),
                cell(&figures["p50_ms"]),
                cell(&figures["p90_ms"]),
                cell(&figures["p99_ms"]),
            )),
        }
    };
    let peers = &section["peers"];
    let against = |berth: &str, peer: &str| Some(overhead(p50(&section[berth]), p50(&peers[peer])));
    row("native start (API)", &section["native_start"], None);
    row(
        "**gvisor start** (API, stop→start)",
        &section["start"],
        against("start", "runsc_run"),
    );
    row("peer: `runsc run -d`", &peers["runsc_run"], None);
    row("peer: `runsc create`", &peers["runsc_create"], None);
    row("peer: `runsc start`", &peers["runsc_start"], None);
    row(
        "peer: `runsc create` + `runsc start`",
        &peers["runsc_create_start"],
        against("start", "runsc_create_start"),
    );
    row("gvisor stop (API)", &section["stop"], None);
    for (suffix, label) in [("", ""), ("_100mb", ", 100 MB")] {
        row(
            &format!("**suspend**{label} (API)"),
            &section[format!("suspend{suffix}")],
            against(
                &format!("suspend{suffix}"),
                &format!("runsc_checkpoint{suffix}"),
            ),
        );
        row(
            &format!("peer: `runsc checkpoint`{label}"),
            &peers[format!("runsc_checkpoint{suffix}")],
            None,
        );
        row(
            &format!("peer: `runsc delete` after it{label}"),
            &peers[format!("runsc_delete_after_checkpoint{suffix}")],
            None,
        );
        row(
            &format!("**resume**{label} (API start of a suspended Machine)"),
            &section[format!("resume{suffix}")],
            against(
                &format!("resume{suffix}"),
                &format!("runsc_restore{suffix}"),
            ),
        );
        row(
            &format!("peer: `runsc restore`{label}"),
            &peers[format!("runsc_restore{suffix}")],
            None,
        );
    }
    row(
        "**wake from suspend** (through the proxy)",
        &section["wake_from_suspend"],
        None,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(p50: f64) -> Value {
        json!({"n": 10, "p50_ms": p50, "p90_ms": p50 * 1.5, "p99_ms": p50 * 2.0})
    }

    /// A section as a run writes it: Berth's figures, the peers', one peer missing.
    fn section() -> Value {
        json!({
            "native_start": figures(4.0),
            "start": figures(330.0),
            "stop": figures(40.0),
            "suspend": figures(260.0),
            "resume": figures(290.0),
            "suspend_100mb": figures(900.0),
            "resume_100mb": figures(700.0),
            "wake_from_suspend": {"n": 0, "unavailable": "no autostop suspend"},
            "peers": {
                "runsc_run": figures(300.0),
                "runsc_create_start": figures(310.0),
                "runsc_checkpoint": figures(200.0),
                "runsc_restore": figures(280.0),
                "runsc_checkpoint_100mb": figures(600.0),
                "runsc_restore_100mb": {"n": 0, "unavailable": "restore failed"},
            },
        })
    }

    #[test]
    fn overhead_is_berth_over_the_peer_and_missing_when_a_side_is() {
        assert_eq!(overhead(Some(330.0), Some(300.0)), Some(1.1));
        assert_eq!(overhead(Some(150.0), Some(300.0)), Some(0.5));
        assert_eq!(overhead(None, Some(300.0)), None);
        assert_eq!(overhead(Some(300.0), None), None);
        assert_eq!(overhead(Some(300.0), Some(0.0)), None);
    }

    #[test]
    fn goals_hold_each_figure_to_its_target_and_a_missing_one_misses() {
        let verdicts = goals(&section());
        let verdict = |name: &str| {
            verdicts
                .iter()
                .find(|goal| goal["goal"] == name)
                .unwrap_or_else(|| panic!("no goal {name}: {verdicts:?}"))
                .clone()
        };
        let start = verdict("gvisor start p50 / runsc run -d p50");
        assert_eq!(
            (start["value"].as_f64(), start["met"].as_bool()),
            (Some(1.1), Some(true))
        );
        let suspend = verdict("suspend p50 / runsc checkpoint p50");
        assert_eq!(
            (suspend["value"].as_f64(), suspend["met"].as_bool()),
            (Some(1.3), Some(false))
        );
        assert_eq!(verdict("resume p50 ms")["met"], true);
        assert_eq!(verdict("resume p50 ms, 100 MB")["met"], false);
        let restore = verdict("resume p50 / runsc restore p50, 100 MB");
        assert!(
            restore["value"].is_null() && restore["met"] == false,
            "{restore}"
        );
        let wake = verdict("wake from suspend p50 - resume p50, ms");
        assert!(wake["value"].is_null() && wake["met"] == false, "{wake}");

        let mut woken = section();
        woken["wake_from_suspend"] = figures(305.0);
        let wake = goals(&woken)
            .into_iter()
            .find(|goal| goal["goal"] == "wake from suspend p50 - resume p50, ms")
            .expect("the wake goal");
        assert_eq!(
            (wake["value"].as_f64(), wake["met"].as_bool()),
            (Some(15.0), Some(true))
        );
        assert_eq!(verdicts.len(), 8);
    }

    #[test]
    fn headline_writes_exactly_the_keys_a_full_run_keeps() {
        let keys: Vec<&str> = headline(&section())
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        assert_eq!(keys, KEYS);
        let values: Vec<Value> = headline(&section())
            .into_iter()
            .map(|(_, value)| value)
            .collect();
        assert_eq!(values[0], json!(330.0));
        assert_eq!(values[1], json!(660.0));
        assert!(values[6].is_null(), "no wake measured: {values:?}");
    }

    #[test]
    fn the_table_puts_each_peer_beside_berth_with_the_overhead_or_the_reason() {
        let table = markdown(&section());
        let line = |prefix: &str| {
            table
                .lines()
                .find(|line| line.starts_with(prefix))
                .unwrap_or_else(|| panic!("no row {prefix} in\n{table}"))
                .to_owned()
        };
        assert_eq!(
            line("| **gvisor start**"),
            "| **gvisor start** (API, stop→start) | 10 | 330 | 495 | 660 | 1.1× |"
        );
        assert!(line("| **suspend** (API)").ends_with("| 1.3× |"));
        assert!(line("| peer: `runsc restore`, 100 MB").contains("not measured: restore failed"));
        assert!(line("| **resume**, 100 MB").ends_with("| – |"));
        assert!(line("| **wake from suspend**").contains("not measured: no autostop suspend"));
    }

    #[test]
    fn a_suspends_steps_come_from_its_answer() {
        let answer = json!({"timings": [{"step": "agent_lock_load", "us": 50},
                                        {"step": "runtime_checkpoint", "us": 250000},
                                        {"step": "broken"}]});
        assert_eq!(
            answer_steps(&answer),
            [
                ("agent_lock_load".to_owned(), 50.0),
                ("runtime_checkpoint".to_owned(), 250000.0)
            ]
        );
        assert!(answer_steps(&json!({})).is_empty());
    }

    #[test]
    fn quick_is_smaller_in_every_scenario() {
        let (full, quick) = (Sizes::full(50), Sizes::quick(10));
        assert_eq!(full.start_cycles, 50);
        assert!(quick.start_cycles < full.start_cycles);
        assert!(quick.suspend_cycles < full.suspend_cycles);
        assert!(quick.suspend_100mb_cycles < full.suspend_100mb_cycles);
        assert!(quick.native_start_cycles < full.native_start_cycles);
        assert!(quick.wake_cycles < full.wake_cycles);
    }
}
