//! Moving Machines between workers (`--migrate-only`): one `berth server` and two `berth
//! agent` processes, so the files cross loopback TCP between agents as they would between
//! hosts. A stopped Machine with 1 GB of files moved back and forth, against `tar -c |
//! zstd -1 | tar -x` of the same upperdir over loopback TCP in the same run; the same
//! Machine moved while it runs and rewrites 1 MB of files; a drain of 100 stopped Machines.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth::client::Client;
use berth_api::{DrainState, Machine, MachineState, MigrateMachineResponse, Worker};
use berth_image::build::{busybox_layer, Compression, ImageBuilder};
use serde_json::{json, Value};

use crate::cluster::Fleet;
use crate::stats::{round, summary};

const APP: &str = "bench-migrate";

/// How many of each: moves of the 1 GB Machine (stopped, then running), and the
/// Machines of the drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub moves: usize,
    pub drain_machines: usize,
}

impl Sizes {
    pub fn full() -> Sizes {
        Sizes {
            moves: 5,
            drain_machines: 100,
        }
    }

    pub fn quick() -> Sizes {
        Sizes {
            moves: 3,
            drain_machines: 100,
        }
    }
}

/// The Machine's init: rewrites one of 16 files of 64 KiB every 100 ms, so that whatever
/// copy pass runs finds up to 1 MB changed since the one before.
const WRITER: &str = "mkdir -p /hot; i=0; while :; do \
    dd if=/dev/urandom of=/hot/$((i % 16)) bs=64k count=1 2>/dev/null; \
    i=$((i + 1)); sleep 0.1; done";

/// The 1 GB of files, written from inside the Machine in steps that each finish well
/// within exec's limit: 512 MB in 8 incompressible files, 256 MB of log-like text in 4,
/// and 256 MB in 8,192 files of 32 KiB (half random, half text) under 16 directories.
fn fill_steps() -> Vec<String> {
    let mut steps = vec![
        "mkdir -p /data/large /data/text /data/small && for i in 0 1 2 3 4 5 6 7; do \
         dd if=/dev/urandom of=/data/large/$i bs=1M count=64 2>/dev/null || exit 1; done"
            .to_owned(),
    ];
    for file in 0..4 {
        // About 67 MB of access-log lines; zstd -1 shrinks such text about 3×.
        steps.push(format!(
            "awk 'BEGIN {{ srand({file}); for (n = 0; n < 1250000; n++) \
             printf \"%d GET /api/v1/items?id=%d 200 %.3f ua=berth-bench\\n\", n, int(rand() * 1000000), rand() }}' \
             | head -c 67108864 > /data/text/{file}"
        ));
    }
    for group in 0..4 {
        let dirs: Vec<String> = (group * 4..group * 4 + 4).map(|d| d.to_string()).collect();
        steps.push(format!(
            "for d in {}; do mkdir -p /data/small/$d; f=0; while [ $f -lt 256 ]; do \
             dd if=/dev/urandom of=/data/small/$d/n$f bs=32k count=1 2>/dev/null || exit 1; \
             dd if=/data/text/$((d % 4)) of=/data/small/$d/t$f bs=32k count=1 skip=$((d * 256 + f)) 2>/dev/null || exit 1; \
             f=$((f + 1)); done; done",
            dirs.join(" ")
        ));
    }
    steps
}

async fn exec(client: &Client, id: &str, script: &str) -> Result<String> {
    let answer: Value = client
        .post(
            &format!("/v1/apps/{APP}/machines/{id}/exec"),
            &json!({"cmd": ["sh", "-c", script], "timeout": 600}),
        )
        .await?;
    if answer["exit_code"] != 0 {
        bail!("{script}: {answer}");
    }
    Ok(answer["stdout"].as_str().unwrap_or_default().to_owned())
}

async fn set_cordon(client: &Client, worker: &str, cordoned: bool) -> Result<()> {
    let verb = if cordoned { "cordon" } else { "uncordon" };
    client
        .post::<_, Value>(&format!("/v1/workers/{worker}/{verb}"), &json!({}))
        .await?;
    Ok(())
}

/// Creates Machines from `body` on `worker`: the other workers are cordoned meanwhile.
async fn create_on(
    client: &Client,
    workers: &[&str],
    worker: &str,
    body: &Value,
    count: usize,
) -> Result<Vec<String>> {
    for other in workers.iter().filter(|name| **name != worker) {
        set_cordon(client, other, true).await?;
    }
    let mut ids = Vec::with_capacity(count);
    let mut failure = None;
    for _ in 0..count {
        match client
            .post::<_, Machine>(&format!("/v1/apps/{APP}/machines"), body)
            .await
        {
            Ok(machine) if machine.worker.as_deref() == Some(worker) => ids.push(machine.id),
            Ok(machine) => {
                failure = Some(anyhow::anyhow!("placed on {:?}", machine.worker));
                break;
            }
            Err(error) => {
                failure = Some(error);
                break;
            }
        }
    }
    for other in workers.iter().filter(|name| **name != worker) {
        set_cordon(client, other, false).await?;
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(ids),
    }
}

async fn migrate(
    client: &Client,
    id: &str,
    to: &str,
) -> Result<(Duration, MigrateMachineResponse)> {
    let clock = Instant::now();
    let answer: MigrateMachineResponse = client
        .post(
            &format!("/v1/apps/{APP}/machines/{id}/migrate"),
            &json!({"to_worker": to}),
        )
        .await?;
    let elapsed = clock.elapsed();
    if answer.to_worker != to {
        bail!("machine {id} moved to {} instead of {to}", answer.to_worker);
    }
    Ok((elapsed, answer))
}

/// One move's answer, as the report keeps it.
fn move_row(wall: Duration, answer: &MigrateMachineResponse) -> Value {
    json!({
        "from": answer.from_worker,
        "to": answer.to_worker,
        "wall_s": round(wall.as_secs_f64()),
        "duration_ms": answer.duration_ms,
        "downtime_ms": answer.downtime_ms,
        "passes": answer.passes,
        "bytes_moved": answer.bytes_moved,
        "bytes_sent": answer.bytes_sent,
    })
}

/// `tar -c | zstd -1` on one side of a loopback TCP connection and `zstd -d | tar -x` on
/// the other, relayed by this process; the receiver ends with `sync -f`, as the agent's
/// import ends with syncfs. Answers the wall time and the bytes on the wire.
pub fn tar_pipe(source: &Path, dest: &Path) -> Result<(Duration, u64)> {
    std::fs::create_dir_all(dest)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let clock = Instant::now();
    let mut receiver = Command::new("bash")
        .arg("-c")
        .arg(r#"set -o pipefail; zstd -q -d -c | tar -C "$1" -xpf - && sync -f "$1""#)
        .arg("receiver")
        .arg(dest)
        .stdin(Stdio::piped())
        .spawn()
        .context("zstd and tar")?;
    let mut sender = Command::new("bash")
        .arg("-c")
        .arg(r#"set -o pipefail; tar -C "$1" -cf - . | zstd -q -1 -c"#)
        .arg("sender")
        .arg(source)
        .stdout(Stdio::piped())
        .spawn()
        .context("tar and zstd")?;
    let mut receiver_in = receiver.stdin.take().context("the receiver's stdin")?;
    let receiving = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut connection, _) = listener.accept()?;
        let bytes = std::io::copy(&mut connection, &mut receiver_in)?;
        receiver_in.flush()?;
        Ok(bytes)
    });
    let mut sender_out = sender.stdout.take().context("the sender's stdout")?;
    let sent = (|| -> std::io::Result<u64> {
        let mut connection = TcpStream::connect(address)?;
        let bytes = std::io::copy(&mut sender_out, &mut connection)?;
        connection.shutdown(Shutdown::Write)?;
        Ok(bytes)
    })();
    let sender_status = sender.wait()?;
    let received = receiving
        .join()
        .map_err(|_| anyhow::anyhow!("the relay's receiving thread panicked"))?;
    let receiver_status = receiver.wait()?;
    let elapsed = clock.elapsed();
    let (sent, received) = (sent?, received?);
    if !sender_status.success() || !receiver_status.success() || sent != received {
        bail!(
            "tar pipe failed: sender {sender_status}, receiver {receiver_status}, {sent} bytes sent, {received} received"
        );
    }
    Ok((elapsed, sent))
}

fn median(samples: &[Duration]) -> Option<f64> {
    let mut seconds: Vec<f64> = samples.iter().map(Duration::as_secs_f64).collect();
    seconds.sort_by(f64::total_cmp);
    let n = seconds.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(seconds[n / 2]),
        _ => Some((seconds[n / 2 - 1] + seconds[n / 2]) / 2.0),
    }
}

/// What one run measured, before it is summarised.
pub struct Samples {
    pub stopped: Vec<Duration>,
    pub tar_pipe: Vec<Duration>,
    pub running_total: Vec<Duration>,
    pub running_downtime: Vec<Duration>,
    pub drain: Duration,
    pub drain_machines: usize,
}

/// The report's migration section and its top-level keys.
pub fn figures(samples: &Samples, detail: Value) -> Value {
    let stopped = median(&samples.stopped);
    let tar = median(&samples.tar_pipe);
    let ratio = match (stopped, tar) {
        (Some(ours), Some(theirs)) if ours > 0.0 => Some(round(theirs / ours)),
        _ => None,
    };
    let downtime = summary(&samples.running_downtime);
    json!({
        "migrate_stopped_1gb_s": stopped.map(round),
        "tar_pipe_1gb_s": tar.map(round),
        "ratio_migrate_over_tar_pipe": ratio,
        "migrate_running_downtime_ms": downtime["p50_ms"],
        "migrate_running_total_s": median(&samples.running_total).map(round),
        "drain_100_s": (samples.drain_machines == 100).then(|| round(samples.drain.as_secs_f64())),
        "stopped": summary(&samples.stopped),
        "tar_pipe": summary(&samples.tar_pipe),
        "running_total": summary(&samples.running_total),
        "running_downtime": downtime,
        "drain": {"machines": samples.drain_machines, "wall_s": round(samples.drain.as_secs_f64())},
        "detail": detail,
    })
}

/// The top-level keys of bench/results/latest.json this mode writes.
pub const KEYS: &[&str] = &[
    "migrate_stopped_1gb_s",
    "ratio_migrate_over_tar_pipe",
    "migrate_running_downtime_ms",
    "migrate_running_total_s",
    "drain_100_s",
];

/// The table printed after a run and pasted into PERFORMANCE.md.
pub fn markdown(figures: &Value) -> String {
    let cell = |value: &Value| value.as_f64().map_or("–".to_owned(), |v| v.to_string());
    let seconds = |section: &str, key: &str| {
        cell(&figures[section][key])
            .parse::<f64>()
            .map_or("–".to_owned(), |ms| round(ms / 1000.0).to_string())
    };
    let mut out =
        String::from("| move | n | p50 | p99 | max |\n| --- | ---: | ---: | ---: | ---: |\n");
    for (label, section) in [
        ("stopped Machine, 1 GB, API call (s)", "stopped"),
        (
            "`tar -c \\| zstd -1 \\| tar -x` over loopback TCP, same files (s)",
            "tar_pipe",
        ),
        (
            "running Machine, 1 GB + 1 MB rewritten, API call (s)",
            "running_total",
        ),
    ] {
        out.push_str(&format!(
            "| {label} | {} | {} | {} | {} |\n",
            figures[section]["n"],
            seconds(section, "p50_ms"),
            seconds(section, "p99_ms"),
            seconds(section, "max_ms"),
        ));
    }
    let downtime = &figures["running_downtime"];
    out.push_str(&format!(
        "| running Machine, downtime (ms) | {} | {} | {} | {} |\n",
        downtime["n"],
        cell(&downtime["p50_ms"]),
        cell(&downtime["p99_ms"]),
        cell(&downtime["max_ms"]),
    ));
    out.push_str(&format!(
        "\n| figure | value |\n| --- | ---: |\n\
         | `ratio_migrate_over_tar_pipe` (tar pipe p50 / move p50) | {} |\n\
         | drain of {} stopped Machines (s) | {} |\n",
        cell(&figures["ratio_migrate_over_tar_pipe"]),
        figures["drain"]["machines"],
        cell(&figures["drain"]["wall_s"]),
    ));
    out
}

/// Runs the moves; `keep_logs` is where to copy the server's and agents' logs (their
/// timestamps place each step of a move) before the scratch dir goes.
pub async fn measure(sizes: Sizes, scratch: &Path, keep_logs: Option<&Path>) -> Result<Value> {
    let fleet = Fleet::start(scratch, "migrate", &["w1", "w2"], "info").await?;
    let result = run(&fleet, sizes, scratch).await;
    let _ = fleet
        .client
        .delete::<Value>(&format!("/v1/apps/{APP}"))
        .await;
    if let Some(dir) = keep_logs {
        std::fs::create_dir_all(dir)?;
        for log in fleet.logs() {
            if let Some(name) = log.file_name() {
                std::fs::copy(log, dir.join(name))?;
            }
        }
    }
    if result.is_err() {
        for log in fleet.logs() {
            if let Ok(text) = std::fs::read_to_string(log) {
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                eprintln!("--- {} (last lines)", log.display());
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
    fleet.shutdown();
    result
}

async fn run(fleet: &Fleet, sizes: Sizes, scratch: &Path) -> Result<Value> {
    let client = &fleet.client;
    let names: Vec<&str> = fleet
        .workers
        .iter()
        .map(|w: &Worker| w.name.as_str())
        .collect();
    let (Some(&first), Some(&second)) = (names.first(), names.get(1)) else {
        bail!("the migration bench needs two workers");
    };
    let archive = scratch.join("migrate-busybox.tar");
    ImageBuilder::new()
        .layer(busybox_layer(Path::new("/bin/busybox"))?, Compression::Gzip)
        .write_archive(&archive)?;
    client
        .import_archive::<Value>(&archive, "bench/busybox:1")
        .await?;
    client
        .post::<_, Value>("/v1/apps", &json!({"app_name": APP}))
        .await?;

    println!("migrate: filling a Machine with 1 GB of files");
    let body = json!({"config": {"image": "bench/busybox:1",
        "init": {"cmd": ["sh", "-c", WRITER]},
        "guest": {"cpus": 1, "memory_mb": 256, "disk_mb": 4096},
        "stop_config": {"signal": "SIGKILL"}}});
    let id = create_on(client, &names, first, &body, 1)
        .await?
        .pop()
        .context("no Machine created")?;
    let clock = Instant::now();
    for step in fill_steps() {
        exec(client, &id, &step).await?;
    }
    let listing = exec(
        client,
        &id,
        "sync; du -sk /data | cut -f1; find /data -type f | wc -l",
    )
    .await?;
    let mut counts = listing.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(data_kib)), Some(Ok(files))) = (counts.next(), counts.next()) else {
        bail!("unexpected listing of /data: {listing:?}");
    };
    println!(
        "  {} MiB in {files} files, written in {:.1} s",
        data_kib / 1024,
        clock.elapsed().as_secs_f64()
    );
    client
        .post::<_, Value>(&format!("/v1/apps/{APP}/machines/{id}/stop"), &json!({}))
        .await?;

    let mut samples = Samples {
        stopped: Vec::new(),
        tar_pipe: Vec::new(),
        running_total: Vec::new(),
        running_downtime: Vec::new(),
        drain: Duration::ZERO,
        drain_machines: sizes.drain_machines,
    };
    let mut stopped_rows = Vec::new();
    let mut tar_rows = Vec::new();
    let mut here = first;
    for run in 0..sizes.moves {
        let there = if here == first { second } else { first };
        let (wall, answer) = migrate(client, &id, there).await?;
        if answer.machine.state != MachineState::Stopped || answer.downtime_ms.is_some() {
            bail!("a stopped move answered {answer:?}");
        }
        println!(
            "  stopped move {run} {here}→{there}: {:.2} s, {} bytes moved, {} sent",
            wall.as_secs_f64(),
            answer.bytes_moved,
            answer.bytes_sent
        );
        samples.stopped.push(wall);
        stopped_rows.push(move_row(wall, &answer));
        // The source deletes its copy behind the answer; the peer runs on a quiet disk.
        fleet.removals_done(here).await?;
        here = there;
        // The peer in the same run, on the same files, right after: the upperdir the
        // move just made.
        let upper = fleet
            .machine_dir(here, &id)
            .context("the Machine's directory")?
            .join("upper");
        let dest = scratch.join("tar-pipe-copy");
        let copied = tokio::task::block_in_place(|| tar_pipe(&upper, &dest));
        // Timed: the same work as the source's cleanup of a moved Machine's files.
        let clock = Instant::now();
        let removed = std::fs::remove_dir_all(&dest);
        let remove = clock.elapsed();
        let (tar_wall, wire) = copied?;
        removed?;
        println!(
            "  tar pipe {run}: {:.2} s, {wire} bytes on the wire; removing the copy {:.2} s",
            tar_wall.as_secs_f64(),
            remove.as_secs_f64()
        );
        samples.tar_pipe.push(tar_wall);
        tar_rows.push(
            json!({"wall_s": round(tar_wall.as_secs_f64()), "bytes_sent": wire,
                             "remove_copy_s": round(remove.as_secs_f64())}),
        );
    }

    client
        .post::<_, Value>(&format!("/v1/apps/{APP}/machines/{id}/start"), &json!({}))
        .await?;
    let mut running_rows = Vec::new();
    for run in 0..sizes.moves {
        // Let the writer dirty its files again before each move.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let there = if here == first { second } else { first };
        let (wall, answer) = migrate(client, &id, there).await?;
        let downtime = answer
            .downtime_ms
            .with_context(|| format!("a running move answered no downtime: {answer:?}"))?;
        if answer.machine.state != MachineState::Started {
            bail!("a running move answered {answer:?}");
        }
        println!(
            "  running move {run} {here}→{there}: {:.2} s, downtime {downtime} ms, {} passes",
            wall.as_secs_f64(),
            answer.passes
        );
        samples.running_total.push(wall);
        samples
            .running_downtime
            .push(Duration::from_millis(downtime));
        running_rows.push(move_row(wall, &answer));
        here = there;
    }
    let writes = exec(client, &id, "ls /hot | wc -l").await?;
    if writes.trim() != "16" {
        bail!("the writer did not run: /hot holds {writes:?} files");
    }
    client
        .delete::<Value>(&format!("/v1/apps/{APP}/machines/{id}?force=true"))
        .await?;

    println!(
        "migrate: drain of {} stopped Machines",
        sizes.drain_machines
    );
    let small = json!({"skip_launch": true, "config": {"image": "bench/busybox:1",
        "init": {"cmd": ["sleep", "3600"]}, "guest": {"cpus": 1, "memory_mb": 64},
        "stop_config": {"signal": "SIGKILL"}}});
    let ids = create_on(client, &names, first, &small, sizes.drain_machines).await?;
    let clock = Instant::now();
    client
        .post::<_, Value>(&format!("/v1/workers/{first}/drain"), &json!({}))
        .await?;
    let deadline = clock + Duration::from_secs(1800);
    let progress = loop {
        let worker: Worker = client.get(&format!("/v1/workers/{first}")).await?;
        let progress = worker.drain.context("no drain progress")?;
        if progress.state != DrainState::Draining {
            break progress;
        }
        if Instant::now() > deadline {
            bail!("the drain did not end: {progress:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    samples.drain = clock.elapsed();
    if progress.state != DrainState::Drained || progress.moved != ids.len() as u64 {
        bail!("the drain ended {progress:?}");
    }
    println!("  drained in {:.2} s", samples.drain.as_secs_f64());
    set_cordon(client, first, false).await?;

    Ok(figures(
        &samples,
        json!({
            "transport": "berth server and two berth agent processes on one host; agent to agent over loopback HTTP",
            "data_kib": data_kib,
            "data_files": files,
            "stopped_moves": stopped_rows,
            "tar_pipe_runs": tar_rows,
            "running_moves": running_rows,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seconds(values: &[f64]) -> Vec<Duration> {
        values.iter().map(|&s| Duration::from_secs_f64(s)).collect()
    }

    #[test]
    fn the_ratio_is_the_tar_pipes_median_over_the_moves() {
        let samples = Samples {
            stopped: seconds(&[10.0, 4.0, 5.0]),
            tar_pipe: seconds(&[6.0, 6.5, 20.0]),
            running_total: seconds(&[7.0, 8.0, 9.0, 30.0]),
            running_downtime: seconds(&[0.12, 0.15, 0.5]),
            drain: Duration::from_millis(12_345),
            drain_machines: 100,
        };
        let report = figures(&samples, json!({}));
        assert_eq!(report["migrate_stopped_1gb_s"], 5.0);
        assert_eq!(report["tar_pipe_1gb_s"], 6.5);
        assert_eq!(report["ratio_migrate_over_tar_pipe"], 1.3);
        assert_eq!(report["migrate_running_downtime_ms"], 150.0);
        assert_eq!(report["migrate_running_total_s"], 8.5);
        assert_eq!(report["drain_100_s"], 12.35);
        for key in KEYS {
            assert!(report[*key].is_number(), "{key}: {}", report[*key]);
        }
        let table = markdown(&report);
        assert!(
            table.contains("| running Machine, downtime (ms) | 3 | 150 | 500 | 500 |"),
            "{table}"
        );
        assert!(table.contains("| stopped Machine, 1 GB, API call (s) | 3 | 5 | 10 | 10 |"));
        assert!(table.contains("| drain of 100 stopped Machines (s) | 12.35 |"));
        // Pasted into PERFORMANCE.md: the pipes inside a cell are escaped.
        assert!(table.contains("| `tar -c \\| zstd -1 \\| tar -x` over loopback TCP, same files (s) | 3 | 6.5 | 20 | 20 |"), "{table}");
    }

    #[test]
    fn nothing_measured_is_null_not_zero() {
        let samples = Samples {
            stopped: Vec::new(),
            tar_pipe: seconds(&[6.0]),
            running_total: Vec::new(),
            running_downtime: Vec::new(),
            drain: Duration::from_secs(3),
            drain_machines: 20,
        };
        let report = figures(&samples, json!({}));
        for key in KEYS {
            assert!(report[*key].is_null(), "{key}: {}", report[*key]);
        }
    }

    /// The peer copies a tree whole: contents, modes and a symlink arrive.
    #[test]
    fn the_tar_pipe_copies_a_tree_over_tcp() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        std::fs::create_dir_all(source.join("a/b")).unwrap();
        std::fs::write(source.join("a/b/text"), "hello\n".repeat(10_000)).unwrap();
        std::fs::write(source.join("tool"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(source.join("tool"), std::fs::Permissions::from_mode(0o751))
            .unwrap();
        std::os::unix::fs::symlink("a/b/text", source.join("link")).unwrap();
        let dest = dir.path().join("dest");
        let (_, wire) = tar_pipe(&source, &dest).unwrap();
        assert!(wire > 0 && wire < 60_000, "compressed: {wire} bytes");
        assert_eq!(
            std::fs::read_to_string(dest.join("a/b/text")).unwrap(),
            "hello\n".repeat(10_000)
        );
        let mode = std::fs::metadata(dest.join("tool"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o751);
        assert_eq!(
            std::fs::read_link(dest.join("link")).unwrap(),
            Path::new("a/b/text")
        );
    }

    #[test]
    fn a_failing_side_fails_the_pipe() {
        let dir = tempfile::tempdir().unwrap();
        let error = tar_pipe(&dir.path().join("missing"), &dir.path().join("dest")).unwrap_err();
        assert!(error.to_string().contains("tar pipe failed"), "{error}");
    }
}
