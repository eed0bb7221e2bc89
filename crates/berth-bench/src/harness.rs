//! Scenarios 2 to 4 of the start harness, all through the HTTP API: stop→start cycles of
//! one Machine, concurrent starts, and density (many stopped Machines on one worker).
//! Scenario 1 (creates from a local registry) is `measure_registry` in main.rs.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth::client::Client;
use berth_api::{Machine, MachineState, StartStopResponse};
use serde_json::{json, Value};

use crate::cluster::sleeper;
use crate::stats::{parse_server_timing, round, summary};

/// How many of each: the full run is what the issue names; `--quick` is a smaller N of
/// each, to finish in under 3 minutes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub start_cycles: usize,
    pub concurrent: usize,
    pub density: usize,
    pub density_reads: usize,
    pub density_start_cycles: usize,
    pub registry_samples: usize,
    pub peer_runs: usize,
    /// Cold and warm creates of the 64 MB and 256 MB images too.
    pub large_images: bool,
}

impl Sizes {
    pub fn full(start_cycles: usize) -> Sizes {
        Sizes {
            start_cycles,
            concurrent: 50,
            density: 1_000,
            density_reads: 200,
            density_start_cycles: 50,
            registry_samples: 20,
            peer_runs: 200,
            large_images: true,
        }
    }

    pub fn quick() -> Sizes {
        Sizes {
            start_cycles: 30,
            concurrent: 20,
            density: 100,
            density_reads: 30,
            density_start_cycles: 10,
            registry_samples: 5,
            peer_runs: 20,
            large_images: false,
        }
    }
}

fn machines_path(app: &str) -> String {
    format!("/v1/apps/{app}/machines")
}

async fn create_stopped(client: &Client, app: &str) -> Result<Machine> {
    client
        .post(&machines_path(app), &crate::create_request(&sleeper()))
        .await
}

async fn start(client: &Client, app: &str, id: &str) -> Result<Duration> {
    timed_start(client, app, id)
        .await
        .map(|(elapsed, _)| elapsed)
}

/// A start and the steps of its `Server-Timing` header.
pub(crate) async fn timed_start(
    client: &Client,
    app: &str,
    id: &str,
) -> Result<(Duration, Vec<(String, f64)>)> {
    let clock = Instant::now();
    let (answer, headers): (StartStopResponse, _) = client
        .post_with_headers(&format!("{}/{id}/start", machines_path(app)), &json!({}))
        .await?;
    let elapsed = clock.elapsed();
    if answer.machine.state != MachineState::Started {
        bail!("machine {id} answered {:?} to start", answer.machine.state);
    }
    let steps = headers
        .get("server-timing")
        .and_then(|value| value.to_str().ok())
        .map(parse_server_timing)
        .unwrap_or_default();
    Ok((elapsed, steps))
}

pub(crate) async fn stop(client: &Client, app: &str, id: &str) -> Result<Duration> {
    let clock = Instant::now();
    client
        .post::<_, StartStopResponse>(&format!("{}/{id}/stop", machines_path(app)), &json!({}))
        .await?;
    Ok(clock.elapsed())
}

/// Stop→start cycles of one Machine: the start and stop samples, and each start's steps.
pub(crate) async fn cycles(
    client: &Client,
    app: &str,
    id: &str,
    count: usize,
) -> Result<(Vec<Duration>, Vec<Duration>, Vec<Vec<(String, f64)>>)> {
    let (mut starts, mut stops) = (Vec::with_capacity(count), Vec::with_capacity(count));
    let mut steps = Vec::with_capacity(count);
    for _ in 0..count {
        let (elapsed, timing) = timed_start(client, app, id).await?;
        starts.push(elapsed);
        steps.push(timing);
        stops.push(stop(client, app, id).await?);
    }
    Ok((starts, stops, steps))
}

/// Runs `body` in a fresh app and deletes the app (and its Machines) afterwards, whatever
/// happened.
pub(crate) async fn in_app<T>(
    client: &Client,
    app: &str,
    body: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    client
        .post::<_, Value>("/v1/apps", &json!({"app_name": app}))
        .await?;
    let result = body.await;
    let _ = client.delete::<Value>(&format!("/v1/apps/{app}")).await;
    result
}

pub struct CycleFigures {
    pub first_start: Duration,
    pub starts: Vec<Duration>,
    pub stops: Vec<Duration>,
    /// Each start's `Server-Timing` steps, in microseconds.
    pub start_steps: Vec<Vec<(String, f64)>>,
}

/// Scenario 2: the product's loop, one Machine stopped and started again and again.
pub async fn start_stop_cycles(client: &Client, count: usize) -> Result<CycleFigures> {
    let app = "bench-cycles";
    in_app(client, app, async {
        let machine = create_stopped(client, app).await?;
        let first_start = start(client, app, &machine.id).await?;
        stop(client, app, &machine.id).await?;
        let (starts, stops, start_steps) = cycles(client, app, &machine.id, count).await?;
        Ok(CycleFigures {
            first_start,
            starts,
            stops,
            start_steps,
        })
    })
    .await
}

/// Scenario 3: `count` stopped Machines started at once.
pub async fn concurrent_starts(client: &Client, count: usize) -> Result<Value> {
    let app = "bench-concurrent";
    in_app(client, app, async {
        let mut ids = Vec::with_capacity(count);
        let mut creates = Vec::with_capacity(count);
        for _ in 0..count {
            let clock = Instant::now();
            ids.push(create_stopped(client, app).await?.id);
            creates.push(clock.elapsed());
        }
        let clock = Instant::now();
        let tasks: Vec<_> = ids
            .iter()
            .map(|id| {
                let (client, id) = (client.clone(), id.clone());
                tokio::spawn(async move { start(&client, app, &id).await })
            })
            .collect();
        let mut latencies = Vec::with_capacity(count);
        for task in tasks {
            latencies.push(task.await.context("a start task")??);
        }
        let wall = clock.elapsed();
        let stops: Vec<_> = ids
            .iter()
            .map(|id| {
                let (client, id) = (client.clone(), id.clone());
                tokio::spawn(async move { stop(&client, app, &id).await })
            })
            .collect();
        for task in stops {
            task.await.context("a stop task")??;
        }
        Ok(json!({
            "machines": count,
            "wall_ms": round(wall.as_secs_f64() * 1000.0),
            "starts_per_s": round(count as f64 / wall.as_secs_f64().max(1e-6)),
            "start": summary(&latencies),
            "create_local_image": summary(&creates),
        }))
    })
    .await
}

/// The resident set of this process, in bytes, after handing freed heap back to the
/// kernel so that only live memory counts.
fn live_rss_bytes() -> Result<u64> {
    // SAFETY: malloc_trim only walks glibc's own heap under its lock; it has no
    // preconditions and touches no memory of ours.
    unsafe {
        libc::malloc_trim(0);
    }
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .context("VmRSS missing from /proc/self/status")?
        .parse()?;
    Ok(kib * 1024)
}

/// Bytes allocated on disk under `dir` (blocks, like `du`), on `dir`'s file system only:
/// network namespace pins and rootfs mounts are not disk.
pub fn disk_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let device = std::fs::symlink_metadata(dir)?.dev();
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue; // removed while walking
        };
        if meta.dev() != device {
            continue;
        }
        total += meta.blocks() * 512;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(total)
}

/// The cost of `count` more of something, per one: `(after - before) / count`, floored
/// at zero (memory handed back meanwhile is not a negative cost).
pub fn per_item(before: u64, after: u64, count: usize) -> u64 {
    after.saturating_sub(before) / count.max(1) as u64
}

/// Scenario 4: `count` stopped Machines on one worker: the memory and disk each costs, the
/// latency of list and get, and start at that density.
pub async fn density(
    client: &Client,
    data_dir: &Path,
    count: usize,
    reads: usize,
    start_cycles: usize,
) -> Result<Value> {
    let app = "bench-density";
    in_app(client, app, async {
        // Warm every path a create takes before the baseline.
        let mut ids = Vec::with_capacity(count + 10);
        for _ in 0..10 {
            ids.push(create_stopped(client, app).await?.id);
        }
        let rss_before = live_rss_bytes()?;
        let disk_before = disk_bytes(data_dir)?;
        let clock = Instant::now();
        for _ in 0..count {
            ids.push(create_stopped(client, app).await?.id);
        }
        let create_seconds = clock.elapsed().as_secs_f64();
        let rss_after = live_rss_bytes()?;
        let disk_after = disk_bytes(data_dir)?;

        let mut lists = Vec::with_capacity(reads);
        for _ in 0..reads.min(50) {
            let clock = Instant::now();
            let listed: Vec<Value> = client.get(&machines_path(app)).await?;
            lists.push(clock.elapsed());
            if listed.len() != ids.len() {
                bail!("list returned {} of {} Machines", listed.len(), ids.len());
            }
        }
        let mut gets = Vec::with_capacity(reads);
        for index in 0..reads {
            // Spread over the whole set, not one hot record.
            let id = &ids[(index * 7919) % ids.len()];
            let clock = Instant::now();
            client
                .get::<Machine>(&format!("{}/{id}", machines_path(app)))
                .await?;
            gets.push(clock.elapsed());
        }
        let last = ids.last().context("no Machines created")?.clone();
        let (starts, _, _) = cycles(client, app, &last, start_cycles).await?;
        Ok(json!({
            "stopped_machines": count + 10,
            "measured_machines": count,
            "creates_per_s": round(count as f64 / create_seconds.max(1e-6)),
            "rss_before_bytes": rss_before,
            "rss_after_bytes": rss_after,
            "rss_per_stopped_machine_bytes": per_item(rss_before, rss_after, count),
            "disk_before_bytes": disk_before,
            "disk_after_bytes": disk_after,
            "disk_per_stopped_machine_bytes": per_item(disk_before, disk_after, count),
            "list": summary(&lists),
            "get": summary(&gets),
            "start": summary(&starts),
        }))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_is_smaller_in_every_scenario() {
        let (full, quick) = (Sizes::full(200), Sizes::quick());
        assert_eq!(full.start_cycles, 200);
        assert_eq!(full.concurrent, 50);
        assert_eq!(full.density, 1_000);
        assert!(quick.start_cycles < full.start_cycles);
        assert!(quick.concurrent < full.concurrent);
        assert!(quick.density < full.density);
        assert!(quick.peer_runs < full.peer_runs);
        assert!(quick.registry_samples < full.registry_samples);
        assert!(!quick.large_images);
    }

    #[test]
    fn per_item_divides_the_growth_and_ignores_shrinking() {
        assert_eq!(per_item(1_000, 17_000, 1_000), 16);
        assert_eq!(per_item(5_000, 4_000, 10), 0);
        assert_eq!(per_item(0, 10, 0), 10);
    }

    #[test]
    fn disk_bytes_counts_allocated_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let empty = disk_bytes(dir.path()).unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/data"), vec![1u8; 64 * 1024]).unwrap();
        let filled = disk_bytes(dir.path()).unwrap();
        assert!(filled - empty >= 64 * 1024, "{empty} → {filled}");
        // A sparse file costs only what it wrote.
        let sparse = std::fs::File::create(dir.path().join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        assert!(disk_bytes(dir.path()).unwrap() < filled + 64 * 1024);
    }
}
