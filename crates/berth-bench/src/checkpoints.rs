//! `--checkpoints-only`: checkpoints, restores and forks of a Machine's disk, through the
//! API, on a worker whose data dir is a loop-mounted btrfs with quotas ([`Btrfs`]), in
//! one run:
//! - checkpoints of a stopped Machine with 1 MB written and of one with 1 GiB written
//!   (taken alternately), of a running one, and the peer: `btrfs subvolume snapshot -r`
//!   of the 1 GiB Machine's disk;
//! - restores of a stopped Machine;
//! - forks (create with `from_checkpoint`) against warm creates of the same image,
//!   alternately;
//! - the disk 100 forks of the 1 GiB Machine take (statfs of the filesystem, after the
//!   cleaner and a commit);
//! - stop→start cycles of a Machine with 100 checkpoints against a fresh one, alternately.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth::client::Client;
use berth::platform::LocalPlatform;
use berth_api::{
    Checkpoint, CreateCheckpointRequest, CreateMachineRequest, FromCheckpoint, Machine,
    MachineConfig, MachineState, RestoreCheckpointResponse,
};
use serde_json::{json, Value};

use crate::harness;
use crate::stats::{ratio, round, step_breakdown};
use crate::summary;

const APP: &str = "bench-checkpoints";
/// The loop image's size (sparse): the 1 GiB Machine and its forks share one copy.
const IMAGE_SIZE: &str = "8G";
/// Each Machine's disk quota: room for the 1 GiB file and the image's own writes.
const DISK_MB: u32 = 2048;
const FORKS: usize = 100;
/// Checkpoints of the Machine whose start is held against a fresh one's.
const CHECKPOINTS: usize = 100;
const MIB: f64 = 1_048_576.0;

/// The keys this mode writes at the top level of the results file (beside `checkpoints`).
pub const KEYS: &[&str] = &[
    "checkpoint_p50_ms",
    "checkpoint_1gb_p50_ms",
    "checkpoint_1gb_over_1mb",
    "checkpoint_running_p50_ms",
    "restore_p50_ms",
    "fork_p50_ms",
    "warm_create_p50_ms",
    "fork_over_warm_create",
    "forks_100_disk_mb",
    "start_fresh_p50_ms",
    "start_100_checkpoints_p50_ms",
    "start_100_checkpoints_ratio",
];

/// A btrfs filesystem with quotas on a loop device (`mount -o loop` attaches it with
/// autoclear, so it goes with the unmount). Unmounted on drop if [`Btrfs::unmount`] was
/// not called, so an error leaves no mount behind.
pub struct Btrfs {
    dir: PathBuf,
    mounted: bool,
    /// Holds the image and the mount point; removed after the unmount.
    _scratch: tempfile::TempDir,
}

fn run(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

impl Btrfs {
    /// Makes and mounts the filesystem in a temp dir of its own, with quotas enabled.
    pub fn mount() -> Result<Btrfs> {
        let scratch = tempfile::Builder::new()
            .prefix("berth-bench-btrfs-")
            .tempdir()?;
        let image = scratch.path().join("btrfs.img");
        let dir = scratch.path().join("mnt");
        std::fs::create_dir_all(&dir)?;
        run(Command::new("truncate")
            .args(["-s", IMAGE_SIZE])
            .arg(&image))?;
        run(Command::new("mkfs.btrfs").arg("-q").arg(&image))
            .context("mkfs.btrfs (Debian's btrfs-progs)")?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&dir))?;
        let fs = Btrfs {
            dir,
            mounted: true,
            _scratch: scratch,
        };
        run(Command::new("btrfs").args(["quota", "enable"]).arg(&fs.dir))?;
        Ok(fs)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unmounts (see [`unmount_all`]) and removes the image.
    pub fn unmount(mut self) -> Result<()> {
        self.mounted = false;
        unmount_all(&self.dir)
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(error) = unmount_all(&self.dir) {
                eprintln!("{error:#}");
            }
        }
    }
}

/// Unmounts `dir`, retrying for a while (a process may still be closing its files there);
/// mounts left below it (a Machine an error left behind) are detached first. A
/// filesystem still busy is detached lazily, and that is an error naming what held it.
fn unmount_all(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let prefix = format!("{}/", dir.display());
    let mut seen_below = Vec::new();
    loop {
        let error = match run(Command::new("umount").arg(dir)) {
            Ok(_) => return Ok(()),
            Err(error) => error,
        };
        // Deepest first, from this process's mount table.
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut below: Vec<String> = table
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|point| point.starts_with(&prefix))
            .map(str::to_owned)
            .collect();
        below.sort_by_key(|point| std::cmp::Reverse(point.len()));
        for point in &below {
            let _ = run(Command::new("umount").arg("-l").arg(point));
        }
        seen_below.extend(below);
        if Instant::now() > deadline {
            let open = own_open_files(&prefix);
            run(Command::new("umount").arg("-l").arg(dir))?;
            bail!(
                "{error:#}; detached lazily (its loop device goes when its last user does); \
                 mounts below it: {seen_below:?}; this process's files open on it: {open:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The files under `prefix` this process holds open.
fn own_open_files(prefix: &str) -> Vec<PathBuf> {
    std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.starts_with(prefix))
        .collect()
}

/// Bytes in use on the filesystem of `dir` once deleted subvolumes are cleaned and the
/// transaction committed (statfs: blocks less free blocks; btrfs counts bytes used, not
/// chunks allocated).
fn used_bytes(dir: &Path) -> Result<u64> {
    run(Command::new("btrfs").args(["subvolume", "sync"]).arg(dir))?;
    run(Command::new("btrfs").args(["filesystem", "sync"]).arg(dir))?;
    let out = run(Command::new("stat").args(["-f", "-c", "%S %b %f"]).arg(dir))?;
    let numbers: Vec<u64> = out
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("stat -f answered {out:?}"))?;
    match numbers[..] {
        [block, blocks, free] => Ok(blocks.saturating_sub(free) * block),
        _ => bail!("stat -f answered {out:?}"),
    }
}

fn machines_path() -> String {
    format!("/v1/apps/{APP}/machines")
}

fn machine_path(id: &str) -> String {
    format!("{}/{id}", machines_path())
}

/// Every Machine of this mode: a sleeper with room for 1 GiB on its disk.
fn config() -> MachineConfig {
    let mut config = crate::cluster::sleeper();
    config.guest.disk_mb = Some(DISK_MB);
    config
}

/// A create with `skip_launch`, from `checkpoint` (Machine, checkpoint) if given.
async fn create(client: &Client, checkpoint: Option<(&str, &str)>) -> Result<(Duration, Machine)> {
    let request = CreateMachineRequest {
        from_checkpoint: checkpoint.map(|(machine, checkpoint)| FromCheckpoint {
            machine: machine.to_owned(),
            checkpoint: checkpoint.to_owned(),
            app: None,
        }),
        ..crate::create_request(&config())
    };
    let clock = Instant::now();
    let machine: Machine = client.post(&machines_path(), &request).await?;
    Ok((clock.elapsed(), machine))
}

async fn exec(client: &Client, id: &str, script: &str) -> Result<String> {
    let answer: Value = client
        .post(
            &format!("{}/exec", machine_path(id)),
            &json!({"command": ["/bin/sh", "-c", script], "timeout": 600}),
        )
        .await?;
    if answer["exit_code"] != 0 {
        bail!("{script:?} in machine {id}: {answer}");
    }
    Ok(answer["stdout"].as_str().unwrap_or_default().to_owned())
}

async fn checkpoint(client: &Client, id: &str) -> Result<(Duration, Checkpoint)> {
    let request = CreateCheckpointRequest {
        comment: "bench".into(),
    };
    let clock = Instant::now();
    let taken: Checkpoint = client
        .post(&format!("{}/checkpoints", machine_path(id)), &request)
        .await?;
    Ok((clock.elapsed(), taken))
}

/// A restore of a stopped Machine, which must stay stopped.
async fn restore(client: &Client, id: &str, cp: &str) -> Result<Duration> {
    let clock = Instant::now();
    let answer: RestoreCheckpointResponse = client
        .post(
            &format!("{}/checkpoints/{cp}/restore", machine_path(id)),
            &json!({}),
        )
        .await?;
    let elapsed = clock.elapsed();
    if answer.restarted || answer.machine.state != MachineState::Stopped {
        bail!(
            "the restore of stopped machine {id} answered restarted {} and {:?}",
            answer.restarted,
            answer.machine.state
        );
    }
    Ok(elapsed)
}

/// A Machine that was started once, wrote `script` and was stopped.
async fn written(client: &Client, script: &str) -> Result<Machine> {
    let (_, machine) = create(client, None).await?;
    harness::timed_start(client, APP, &machine.id).await?;
    exec(client, &machine.id, script).await?;
    harness::stop(client, APP, &machine.id).await?;
    Ok(machine)
}

/// Everything, in an app of its own that goes at the end. `fs` is the btrfs mount the
/// platform's data dir is on.
pub async fn measure(
    cycles: usize,
    client: &Client,
    platform: &LocalPlatform,
    fs: &Path,
    scratch: &Path,
) -> Result<Value> {
    crate::import_bench_image(client, scratch).await?;
    let mut section = json!({"cycles": cycles, "disk_mb": DISK_MB});
    harness::in_app(client, APP, async {
        println!("checkpoints: a Machine with 1 MB written and one with 1 GiB");
        let small = written(
            client,
            "dd if=/dev/urandom of=/small bs=1M count=1 2>/dev/null && sync",
        )
        .await?;
        let clock = Instant::now();
        let big = written(
            client,
            "dd if=/dev/urandom of=/big bs=1M count=1024 2>/dev/null && sync",
        )
        .await?;
        section["fill_1gb_s"] = json!(round(clock.elapsed().as_secs_f64()));
        let (_, small_base) = checkpoint(client, &small.id).await?;
        let (_, big_base) = checkpoint(client, &big.id).await?;

        println!("checkpoints: {cycles} of each stopped Machine, alternately");
        let (mut small_cps, mut big_cps) = (Vec::new(), Vec::new());
        for _ in 0..cycles {
            small_cps.push(checkpoint(client, &small.id).await?.0);
            big_cps.push(checkpoint(client, &big.id).await?.0);
        }
        section["checkpoint_stopped_1mb"] = summary(&small_cps);
        section["checkpoint_stopped_1gb"] = summary(&big_cps);

        println!("peer: {cycles} `btrfs subvolume snapshot -r` of the 1 GiB Machine's disk");
        let disk = platform.agent.layout(&big.id).disk();
        let peer_dir = fs.join("peer");
        std::fs::create_dir_all(&peer_dir)?;
        let peer = tokio::task::block_in_place(|| -> Result<Vec<Duration>> {
            let mut peer = Vec::with_capacity(cycles);
            for index in 0..cycles {
                let target = peer_dir.join(format!("snapshot-{index}"));
                let clock = Instant::now();
                run(Command::new("btrfs")
                    .args(["subvolume", "snapshot", "-r"])
                    .arg(&disk)
                    .arg(&target))?;
                peer.push(clock.elapsed());
            }
            Ok(peer)
        })?;
        section["peer_snapshot"] = summary(&peer);
        // The filesystem's accounting of the 1 GiB checkpoint, committed by now.
        let listed: Vec<Checkpoint> = client
            .get(&format!("{}/checkpoints", machine_path(&big.id)))
            .await?;
        section["checkpoint_1gb_size_bytes"] = json!(listed
            .iter()
            .find(|cp| cp.id == big_base.id)
            .map(|cp| cp.size_bytes));

        println!("restores: {cycles} of the stopped 1 MB Machine");
        let mut restores = Vec::new();
        for _ in 0..cycles {
            restores.push(restore(client, &small.id, &small_base.id).await?);
        }
        section["restore_stopped"] = summary(&restores);

        println!("checkpoints: {cycles} of the running 1 MB Machine");
        harness::timed_start(client, APP, &small.id).await?;
        let mut running = Vec::new();
        for _ in 0..cycles {
            running.push(checkpoint(client, &small.id).await?.0);
        }
        harness::stop(client, APP, &small.id).await?;
        section["checkpoint_running"] = summary(&running);

        println!("forks: {cycles} of the 1 MB Machine against warm creates, alternately");
        let (mut forks, mut creates) = (Vec::new(), Vec::new());
        for _ in 0..cycles {
            creates.push(create(client, None).await?.0);
            forks.push(create(client, Some((&small.id, &small_base.id))).await?.0);
        }
        section["warm_create"] = summary(&creates);
        section["fork"] = summary(&forks);

        println!("forks: {FORKS} of the 1 GiB Machine, and the disk they take");
        let before = used_bytes(fs)?;
        let mut big_forks = Vec::with_capacity(FORKS);
        let mut last = None;
        for index in 0..FORKS {
            let (elapsed, fork) = create(client, Some((&big.id, &big_base.id))).await?;
            big_forks.push(elapsed);
            last = Some(fork.id);
            if index == 0 {
                section["forks_disk"]["used_after_first_bytes"] = json!(used_bytes(fs)?);
            }
        }
        let after = used_bytes(fs)?;
        section["fork_1gb"] = summary(&big_forks);
        let first = section["forks_disk"]["used_after_first_bytes"]
            .as_u64()
            .unwrap_or(before);
        section["forks_disk"]["forks"] = json!(FORKS);
        section["forks_disk"]["used_before_bytes"] = json!(before);
        section["forks_disk"]["used_after_bytes"] = json!(after);
        section["forks_disk"]["all_mb"] = json!(round(after.saturating_sub(before) as f64 / MIB));
        section["forks_disk"]["first_mb"] = json!(round(first.saturating_sub(before) as f64 / MIB));
        section["forks_disk"]["beyond_first_mb"] =
            json!(round(after.saturating_sub(first) as f64 / MIB));
        // The last fork has the 1 GiB file: the forks share it, they did not lose it.
        let last = last.context("no fork made")?;
        harness::timed_start(client, APP, &last).await?;
        let size = exec(client, &last, "stat -c %s /big").await?;
        harness::stop(client, APP, &last).await?;
        section["fork_big_file_bytes"] = json!(size.trim().parse::<u64>().ok());

        println!("starts: a Machine with {CHECKPOINTS} checkpoints against a fresh one");
        let script = "dd if=/dev/urandom of=/small bs=1M count=1 2>/dev/null && sync";
        let many = written(client, script).await?;
        for _ in 0..CHECKPOINTS {
            checkpoint(client, &many.id).await?;
        }
        let fresh = written(client, script).await?;
        let (mut fresh_starts, mut many_starts) = (Vec::new(), Vec::new());
        let (mut fresh_steps, mut many_steps) = (Vec::new(), Vec::new());
        for _ in 0..cycles {
            for (id, starts, steps) in [
                (&fresh.id, &mut fresh_starts, &mut fresh_steps),
                (&many.id, &mut many_starts, &mut many_steps),
            ] {
                let (elapsed, timing) = harness::timed_start(client, APP, id).await?;
                starts.push(elapsed);
                steps.push(timing);
                harness::stop(client, APP, id).await?;
            }
        }
        section["start_fresh"] = summary(&fresh_starts);
        section["start_100_checkpoints"] = summary(&many_starts);
        section["start_fresh_steps"] = step_breakdown(&fresh_steps);
        section["start_100_checkpoints_steps"] = step_breakdown(&many_steps);
        println!("removing the Machines (their snapshots with them)");
        Ok(())
    })
    .await?;
    section["goals"] = Value::Array(goals(&section));
    Ok(section)
}

fn p50(summary: &Value) -> Option<f64> {
    summary["p50_ms"].as_f64()
}

/// `numerator`'s p50 over `denominator`'s.
fn p50_ratio(section: &Value, numerator: &str, denominator: &str) -> Option<f64> {
    ratio(p50(&section[numerator]), p50(&section[denominator]))
}

/// The issue's goals, each with the figure it was held to, from a `checkpoints` section.
pub fn goals(section: &Value) -> Vec<Value> {
    let mut verdicts = Vec::new();
    let mut hold = |goal: &str, value: Option<f64>, op: &str, target: f64| {
        let met = value.is_some_and(|value| match op {
            "<" => value < target,
            _ => value <= target,
        });
        verdicts.push(
            json!({"goal": goal, "value": value, "op": op, "target": target,
                             "met": met}),
        );
    };
    hold(
        "checkpoint p50 ms, stopped, 1 MB",
        p50(&section["checkpoint_stopped_1mb"]),
        "≤",
        10.0,
    );
    hold(
        "checkpoint p50 ms, stopped, 1 GiB",
        p50(&section["checkpoint_stopped_1gb"]),
        "≤",
        10.0,
    );
    hold(
        "checkpoint p50, 1 GiB / 1 MB",
        p50_ratio(section, "checkpoint_stopped_1gb", "checkpoint_stopped_1mb"),
        "≤",
        1.5,
    );
    hold(
        "restore p50 ms, stopped",
        p50(&section["restore_stopped"]),
        "≤",
        10.0,
    );
    hold(
        "fork p50 / warm create p50",
        p50_ratio(section, "fork", "warm_create"),
        "≤",
        1.0,
    );
    hold(
        "disk of 100 forks of a 1 GiB Machine, MiB",
        section["forks_disk"]["all_mb"].as_f64(),
        "<",
        100.0,
    );
    hold(
        "start p50, 100 checkpoints / fresh",
        p50_ratio(section, "start_100_checkpoints", "start_fresh"),
        "≤",
        1.2,
    );
    verdicts
}

/// The top-level keys from a `checkpoints` section.
pub fn headline(section: &Value) -> Vec<(&'static str, Value)> {
    let p = |key: &str| section[key]["p50_ms"].clone();
    let r = |numerator: &str, denominator: &str| {
        crate::stats::number_or_null(p50_ratio(section, numerator, denominator))
    };
    vec![
        ("checkpoint_p50_ms", p("checkpoint_stopped_1mb")),
        ("checkpoint_1gb_p50_ms", p("checkpoint_stopped_1gb")),
        (
            "checkpoint_1gb_over_1mb",
            r("checkpoint_stopped_1gb", "checkpoint_stopped_1mb"),
        ),
        ("checkpoint_running_p50_ms", p("checkpoint_running")),
        ("restore_p50_ms", p("restore_stopped")),
        ("fork_p50_ms", p("fork")),
        ("warm_create_p50_ms", p("warm_create")),
        ("fork_over_warm_create", r("fork", "warm_create")),
        ("forks_100_disk_mb", section["forks_disk"]["all_mb"].clone()),
        ("start_fresh_p50_ms", p("start_fresh")),
        ("start_100_checkpoints_p50_ms", p("start_100_checkpoints")),
        (
            "start_100_checkpoints_ratio",
            r("start_100_checkpoints", "start_fresh"),
        ),
    ]
}

/// The table printed after a run, with each figure's ratio to what it is held against.
pub fn markdown(section: &Value) -> String {
    let mut out = String::from(
        "| operation | n | p50 ms | p90 ms | p99 ms | p50 ratio |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let cell = |value: &Value| value.as_f64().map_or("–".to_owned(), |v| format!("{v}"));
    let mut row = |label: &str, key: &str, against: Option<(&str, &str)>| {
        let figures = &section[key];
        let ratio = match against {
            None => String::new(),
            Some((denominator, name)) => match p50_ratio(section, key, denominator) {
                Some(ratio) => format!("{ratio}× {name}"),
                None => "–".into(),
            },
        };
        out.push_str(&format!(
            "| {label} | {} | {} | {} | {} | {ratio} |\n",
            figures["n"].as_u64().unwrap_or(0),
            cell(&figures["p50_ms"]),
            cell(&figures["p90_ms"]),
            cell(&figures["p99_ms"]),
        ));
    };
    row(
        "**checkpoint**, stopped, 1 MB written",
        "checkpoint_stopped_1mb",
        None,
    );
    row(
        "**checkpoint**, stopped, 1 GiB written",
        "checkpoint_stopped_1gb",
        Some(("checkpoint_stopped_1mb", "1 MB")),
    );
    row(
        "peer: `btrfs subvolume snapshot -r` of that disk (CLI)",
        "peer_snapshot",
        None,
    );
    row("checkpoint, running", "checkpoint_running", None);
    row("**restore**, stopped", "restore_stopped", None);
    row("warm create (`skip_launch`)", "warm_create", None);
    row(
        "**fork** (create `from_checkpoint`, 1 MB)",
        "fork",
        Some(("warm_create", "warm create")),
    );
    row(
        "fork of the 1 GiB Machine",
        "fork_1gb",
        Some(("warm_create", "warm create")),
    );
    row("start, fresh Machine", "start_fresh", None);
    row(
        "**start**, Machine with 100 checkpoints",
        "start_100_checkpoints",
        Some(("start_fresh", "fresh")),
    );
    let disk = &section["forks_disk"];
    out.push_str(&format!(
        "\ndisk of {} forks of the 1 GiB Machine: {} MiB (the first {} MiB, the rest {} MiB)\n",
        disk["forks"], disk["all_mb"], disk["first_mb"], disk["beyond_first_mb"]
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(p50: f64) -> Value {
        json!({"n": 10, "p50_ms": p50, "p90_ms": p50 * 1.5, "p99_ms": p50 * 2.0})
    }

    fn section() -> Value {
        json!({
            "checkpoint_stopped_1mb": figures(4.0),
            "checkpoint_stopped_1gb": figures(8.0),
            "checkpoint_running": figures(6.0),
            "restore_stopped": figures(9.0),
            "warm_create": figures(20.0),
            "fork": figures(18.0),
            "fork_1gb": figures(19.0),
            "forks_disk": {"forks": 100, "all_mb": 12.5, "first_mb": 0.5, "beyond_first_mb": 12.0},
            "start_fresh": figures(5.0),
            "start_100_checkpoints": figures(5.5),
        })
    }

    fn verdict(verdicts: &[Value], name: &str) -> Value {
        verdicts
            .iter()
            .find(|goal| goal["goal"] == name)
            .unwrap_or_else(|| panic!("no goal {name}: {verdicts:?}"))
            .clone()
    }

    #[test]
    fn goals_hold_each_figure_and_a_missing_one_misses() {
        let verdicts = goals(&section());
        assert_eq!(verdicts.len(), 7);
        assert!(
            verdicts
                .iter()
                .filter(|g| g["goal"] != "checkpoint p50, 1 GiB / 1 MB")
                .all(|g| g["met"] == true),
            "{verdicts:?}"
        );
        let ratio = verdict(&verdicts, "checkpoint p50, 1 GiB / 1 MB");
        assert_eq!(
            (ratio["value"].as_f64(), ratio["met"].as_bool()),
            (Some(2.0), Some(false))
        );
        assert_eq!(
            verdict(&verdicts, "start p50, 100 checkpoints / fresh")["value"],
            1.1
        );

        let mut missing = section();
        missing["forks_disk"] = json!({});
        missing["fork"] = json!({"n": 0});
        let verdicts = goals(&missing);
        let disk = verdict(&verdicts, "disk of 100 forks of a 1 GiB Machine, MiB");
        assert!(disk["value"].is_null() && disk["met"] == false, "{disk}");
        let fork = verdict(&verdicts, "fork p50 / warm create p50");
        assert!(fork["value"].is_null() && fork["met"] == false, "{fork}");
    }

    #[test]
    fn the_disk_goal_is_strictly_below() {
        let mut at = section();
        at["forks_disk"]["all_mb"] = json!(100.0);
        let disk = verdict(&goals(&at), "disk of 100 forks of a 1 GiB Machine, MiB");
        assert_eq!(disk["met"], false);
    }

    #[test]
    fn headline_writes_exactly_the_keys_a_full_run_keeps() {
        let headline = headline(&section());
        let keys: Vec<&str> = headline.iter().map(|(key, _)| *key).collect();
        assert_eq!(keys, KEYS);
        let value = |key: &str| {
            headline
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or(Value::Null)
        };
        assert_eq!(value("checkpoint_p50_ms"), json!(4.0));
        assert_eq!(value("checkpoint_1gb_over_1mb"), json!(2.0));
        assert_eq!(value("fork_over_warm_create"), json!(0.9));
        assert_eq!(value("forks_100_disk_mb"), json!(12.5));
        assert_eq!(value("start_100_checkpoints_ratio"), json!(1.1));
    }

    #[test]
    fn the_table_puts_each_ratio_beside_its_figure() {
        let table = markdown(&section());
        let line = |prefix: &str| {
            table
                .lines()
                .find(|line| line.starts_with(prefix))
                .unwrap_or_else(|| panic!("no row {prefix} in\n{table}"))
                .to_owned()
        };
        assert_eq!(
            line("| **checkpoint**, stopped, 1 GiB"),
            "| **checkpoint**, stopped, 1 GiB written | 10 | 8 | 12 | 16 | 2× 1 MB |"
        );
        assert!(line("| **fork**").ends_with("| 0.9× warm create |"));
        assert!(line("| **start**").ends_with("| 1.1× fresh |"));
        assert!(
            table.contains("100 forks of the 1 GiB Machine: 12.5 MiB"),
            "{table}"
        );
    }

    #[test]
    fn goal_lines_say_met_or_missed_with_the_operator() {
        let lines = crate::report::goal_lines(&goals(&section()));
        assert!(
            lines.contains("MISSED checkpoint p50, 1 GiB / 1 MB: 2.0 (goal ≤ 1.5)"),
            "{lines}"
        );
        assert!(
            lines.contains("met    disk of 100 forks of a 1 GiB Machine, MiB: 12.5 (goal < 100.0)"),
            "{lines}"
        );
    }
}
