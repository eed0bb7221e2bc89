//! End-to-end: checkpoints of a Machine's files on a worker whose data dir is btrfs (a
//! loop-mounted image with quotas): take, list, delete and restore, byte for byte; forks
//! that share the files and then diverge; a running writer checkpointed without a stop;
//! the errors; and an agent killed at every checkpoint step.

mod common;

use std::time::Duration;

use berth_api::MachineState;
use common::{busybox_image, Platform};
use reqwest::Method;
use serde_json::{json, Value};

const APP: &str = "cp";
const IMAGE: &str = "demo/busybox:1";
/// A digest of every file under /data and /etc as the Machine sees it: names, types,
/// sizes, modes, owners, mtimes, symlink targets and contents. A file deleted from the
/// image (a whiteout in the writable layer) is missing from it.
const TREE_DIGEST: &str = "find /data /etc -xdev 2>/dev/null | sort | while read -r f; do \
    stat -c '%n %F %s %a %u %g %Y' \"$f\"; \
    if [ -L \"$f\" ]; then readlink \"$f\"; elif [ -f \"$f\" ]; then sha256sum < \"$f\"; fi; \
    done | sha256sum";

fn platform() -> Platform {
    // Placement counts 1 GiB of disk and a CPU per Machine; the forks need more than a
    // small image and two cores give.
    let platform = Platform::start_on_btrfs(
        "3G",
        &[
            "--worker-disk-mb",
            "100000",
            "--worker-cpus",
            "32",
            "--worker-memory-mb",
            "16384",
        ],
    );
    platform.import(busybox_image(), IMAGE);
    platform.cli_ok(&["app", "create", APP]);
    platform
}

fn create(platform: &Platform, app: &str, body: Value) -> String {
    let (status, answer) = platform.call(
        Method::POST,
        &format!("/v1/apps/{app}/machines"),
        Some(body),
    );
    assert_eq!(status, 200, "{answer}");
    answer["id"].as_str().expect("id").to_owned()
}

fn sleeper() -> Value {
    json!({"config": {"image": IMAGE, "init": {"cmd": ["sleep", "3600"]},
        "stop_config": {"signal": "SIGKILL"}}})
}

fn exec(platform: &Platform, app: &str, id: &str, script: &str) -> String {
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/{app}/machines/{id}/exec"),
        Some(json!({"command": ["/bin/sh", "-c", script], "timeout": 60})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["exit_code"], 0, "{script}: {body}");
    body["stdout"].as_str().unwrap_or_default().to_owned()
}

fn checkpoint(platform: &Platform, app: &str, id: &str, comment: &str) -> Value {
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/{app}/machines/{id}/checkpoints"),
        Some(json!({"comment": comment})),
    );
    assert_eq!(status, 200, "{body}");
    body
}

fn checkpoints(platform: &Platform, app: &str, id: &str) -> Vec<Value> {
    let (status, body) = platform.call(
        Method::GET,
        &format!("/v1/apps/{app}/machines/{id}/checkpoints"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    body.as_array().cloned().unwrap_or_default()
}

fn restore(platform: &Platform, id: &str, cp: &str) -> (u16, Value) {
    platform.call(
        Method::POST,
        &format!("/v1/apps/{APP}/machines/{id}/checkpoints/{cp}/restore"),
        None,
    )
}

fn event_types(platform: &Platform, id: &str) -> Vec<String> {
    let (_, events) = platform.call(
        Method::GET,
        &format!("/v1/apps/{APP}/machines/{id}/events"),
        None,
    );
    events
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|event| event["type"].as_str().map(str::to_owned))
        .collect()
}

/// Write, checkpoint, change and delete (an image file too), restore: the tree is the
/// checkpoint's to the byte, the running Machine was restarted onto it, and the undo
/// checkpoint brings the changes back. Then delete, and every error code.
#[test]
fn a_restore_gives_back_the_exact_tree_and_is_undone_by_its_automatic_checkpoint() {
    let platform = platform();
    let id = create(&platform, APP, sleeper());
    exec(
        &platform,
        APP,
        &id,
        "mkdir -p /data/sub && echo one > /data/a && ln -s a /data/link && \
         dd if=/dev/urandom of=/data/sub/big bs=1M count=8 2>/dev/null && \
         chown 1000:1000 /data/a && chmod 640 /data/a && mkfifo /data/fifo",
    );
    let kept = exec(&platform, APP, &id, TREE_DIGEST);
    let first = checkpoint(&platform, APP, &id, "before upgrade");
    let cp = first["id"].as_str().expect("id").to_owned();
    assert!(cp.starts_with("cp_"), "{first}");
    assert_eq!(first["comment"], "before upgrade");
    assert_eq!(first["auto"], false);
    // The running Machine ran on through the checkpoint.
    assert_eq!(platform.machine(APP, &id).state, MachineState::Started);

    exec(
        &platform,
        APP,
        &id,
        "rm -rf /data/sub /data/link && echo two >> /data/a && rm /etc/passwd && \
         echo new > /etc/added",
    );
    let changed = exec(&platform, APP, &id, TREE_DIGEST);
    assert_ne!(changed, kept, "the changes show in the digest");

    let instance = platform.machine(APP, &id).instance_id;
    let (status, answer) = restore(&platform, &id, &cp);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["restored"], cp.as_str());
    assert_eq!(answer["restarted"], true, "{answer}");
    assert_eq!(answer["undo"]["auto"], true, "{answer}");
    assert_eq!(answer["machine"]["state"], "started", "{answer}");
    let undo = answer["undo"]["id"].as_str().expect("undo").to_owned();
    assert_eq!(
        exec(&platform, APP, &id, TREE_DIGEST),
        kept,
        "the restored tree is the checkpoint's"
    );
    assert_eq!(
        exec(
            &platform,
            APP,
            &id,
            "stat -c '%u:%g %a' /data/a; cat /data/a"
        ),
        "1000:1000 640\none\n"
    );
    assert_eq!(platform.machine(APP, &id).instance_id, instance);
    let types = event_types(&platform, &id);
    assert!(
        types.iter().any(|t| t == "checkpoint") && types.iter().any(|t| t == "restore"),
        "{types:?}"
    );

    // The restore is undone by its automatic checkpoint; a stopped Machine stays stopped.
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/{APP}/machines/{id}/stop"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let (status, answer) = restore(&platform, &id, &undo);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["restarted"], false, "{answer}");
    assert_eq!(answer["machine"]["state"], "stopped", "{answer}");
    platform.cli_ok(&["machine", "start", "--app", APP, &id]);
    assert_eq!(exec(&platform, APP, &id, TREE_DIGEST), changed);

    // The list: oldest first, with the automatic ones marked, through the CLI too.
    let listed = checkpoints(&platform, APP, &id);
    let ids: Vec<&str> = listed.iter().filter_map(|cp| cp["id"].as_str()).collect();
    assert_eq!(ids.len(), 3, "{listed:?}");
    assert_eq!(ids[0], cp);
    assert_eq!(ids[1], undo);
    let text = platform.cli_ok(&["machine", "checkpoint", "list", "--app", APP, &id]);
    assert!(text.contains(&cp) && text.contains("(auto)"), "{text}");

    // Billing: a checkpoint that alone holds data the Machine deleted is billed for it,
    // in a column of its own, at the storage price.
    exec(
        &platform,
        APP,
        &id,
        "dd if=/dev/urandom of=/big bs=1M count=16 2>/dev/null && sync",
    );
    checkpoint(&platform, APP, &id, "holds big");
    exec(&platform, APP, &id, "rm /big && sync");
    // Journaled with the next checkpoint operation (and by the periodic sample).
    let holds = checkpoint(&platform, APP, &id, "after rm");
    let (_, listed_now) = platform.call(
        Method::GET,
        &format!("/v1/apps/{APP}/machines/{id}/checkpoints"),
        None,
    );
    let exclusive: u64 = listed_now
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|cp| cp["exclusive_bytes"].as_u64())
        .sum();
    assert!(
        exclusive >= 16 << 20,
        "the checkpoints alone hold /big: {listed_now}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let (status, usage) = platform.call(
        Method::GET,
        "/v1/orgs/personal/usage?group_by=machine",
        None,
    );
    assert_eq!(status, 200, "{usage}");
    let row = usage["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|row| row["machine"] == id.as_str())
        .cloned()
        .unwrap_or_default();
    assert!(
        row["checkpoint_storage_gb_hours"]
            .as_f64()
            .unwrap_or_default()
            > 0.0,
        "{usage}"
    );
    let holds = holds["id"].as_str().expect("id");
    platform.cli_ok(&["machine", "checkpoint", "rm", "--app", APP, &id, holds]);

    // Delete, and the errors: each a JSON code.
    platform.cli_ok(&["machine", "checkpoint", "rm", "--app", APP, &id, &cp]);
    let (status, body) = platform.call(
        Method::DELETE,
        &format!("/v1/apps/{APP}/machines/{id}/checkpoints/{cp}"),
        None,
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("checkpoint_not_found")),
        "{body}"
    );
    let (status, body) = restore(&platform, &id, &cp);
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("checkpoint_not_found")),
        "{body}"
    );
    let (status, body) = restore(&platform, &id, "../../etc");
    assert_eq!(status, 404, "a hostile name is just unknown: {body}");
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/{APP}/machines/00000000000000/checkpoints"),
        None,
    );
    assert_eq!(status, 404, "{body}");
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/{APP}/machines/{id}/checkpoints"),
        Some(json!({"comment": "x".repeat(2000)})),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_config")),
        "{body}"
    );

    // The doctor finds a snapshot without its record (as a crash between the two would
    // leave it), and its repair deletes it; the whole checkpoints stay.
    let machine_dir = platform.data_dir.path().join("worker/machines").join(&id);
    assert!(machine_dir.join("checkpoints").is_dir());
    let orphan = machine_dir.join("checkpoints/cp_0000000000000000");
    let made = std::process::Command::new("btrfs")
        .args(["subvolume", "snapshot", "-r"])
        .arg(machine_dir.join("disk"))
        .arg(&orphan)
        .output()
        .expect("btrfs");
    assert!(made.status.success(), "{made:?}");
    let doctor = platform.cli(&["doctor", "--json"]);
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert!(!doctor.status.success(), "{report}");
    assert!(report.contains("half_made_checkpoint"), "{report}");
    let repaired = platform.cli(&["doctor", "--repair"]);
    assert!(
        repaired.status.success(),
        "{}",
        String::from_utf8_lossy(&repaired.stdout)
    );
    assert!(!orphan.exists());
    assert_eq!(
        checkpoints(&platform, APP, &id).len(),
        3,
        "the undo, its undo and \"holds big\""
    );
    assert!(platform.cli(&["doctor"]).status.success());

    // Destroy takes the read-only snapshots with the Machine.
    let (status, body) = platform.call(
        Method::DELETE,
        &format!("/v1/apps/{APP}/machines/{id}?kill=true"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert!(!machine_dir.exists(), "{} is left", machine_dir.display());
    platform.teardown();
}

/// Five forks of one Machine see its files (owned as it owned them) and then diverge:
/// what one writes, neither the source nor the other forks see. One goes to another app
/// of the same org through `from_checkpoint`.
#[test]
fn forks_see_the_same_files_then_diverge_independently() {
    let platform = platform();
    platform.cli_ok(&["app", "create", "other"]);
    let source = create(&platform, APP, sleeper());
    exec(
        &platform,
        APP,
        &source,
        "mkdir -p /data && dd if=/dev/urandom of=/data/blob bs=1M count=4 2>/dev/null && \
         echo mine > /data/owned && chown 1234:1234 /data/owned && rm /etc/group",
    );
    let digest = exec(&platform, APP, &source, TREE_DIGEST);
    let mut forks = Vec::new();
    for n in 0..4 {
        let (status, body) = platform.call(
            Method::POST,
            &format!("/v1/apps/{APP}/machines/{source}/fork"),
            Some(json!({"name": format!("fork-{n}")})),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["worker"],
            platform
                .machine(APP, &source)
                .worker
                .unwrap_or_default()
                .as_str()
        );
        forks.push((APP, body["id"].as_str().expect("id").to_owned()));
    }
    let cp = checkpoint(&platform, APP, &source, "for another app");
    let mut body = sleeper();
    body["from_checkpoint"] = json!({"machine": source, "checkpoint": cp["id"], "app": APP});
    forks.push(("other", create(&platform, "other", body)));

    for (app, fork) in &forks {
        assert_eq!(&exec(&platform, app, fork, TREE_DIGEST), &digest, "{fork}");
        assert_eq!(
            exec(&platform, app, fork, "stat -c '%u:%g' /data/owned"),
            "1234:1234\n",
            "ids inside are the source's ids inside"
        );
        exec(
            &platform,
            app,
            fork,
            &format!("echo {fork} > /data/only-{fork}"),
        );
    }
    for (app, fork) in &forks {
        let seen = exec(&platform, app, fork, "ls /data");
        for (_, other) in &forks {
            assert_eq!(
                seen.contains(&format!("only-{other}")),
                other == fork,
                "{fork}: {seen}"
            );
        }
    }
    assert_eq!(
        exec(&platform, APP, &source, TREE_DIGEST),
        digest,
        "the source is untouched"
    );

    // Independent: the source and its checkpoints can go, the forks keep their files.
    let (status, body) = platform.call(
        Method::DELETE,
        &format!("/v1/apps/{APP}/machines/{source}?kill=true"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    for (app, fork) in &forks {
        assert_eq!(
            exec(&platform, app, fork, "wc -c < /data/blob"),
            "4194304\n"
        );
    }

    // A fork from an unknown checkpoint or Machine, or across orgs, makes nothing.
    let mut body = sleeper();
    body["from_checkpoint"] = json!({"machine": forks[0].1, "checkpoint": "cp_nope"});
    let (status, answer) = platform.call(
        Method::POST,
        &format!("/v1/apps/{APP}/machines"),
        Some(body),
    );
    assert_eq!(
        (status, answer["error"].as_str()),
        (404, Some("checkpoint_not_found")),
        "{answer}"
    );
    let mut body = sleeper();
    body["from_checkpoint"] = json!({"machine": "00000000000000", "checkpoint": "cp_nope"});
    let (status, answer) = platform.call(
        Method::POST,
        &format!("/v1/apps/{APP}/machines"),
        Some(body),
    );
    assert_eq!(status, 404, "{answer}");
    let (_, list) = platform.call(Method::GET, &format!("/v1/apps/{APP}/machines"), None);
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(4),
        "only the forks: {list}"
    );
    platform.teardown();
}

/// Data a checkpoint shares with a fork is billed once, to the checkpoint's Machine: after
/// the source deletes a file that its checkpoint and a fork still hold, the source's
/// checkpoints are billed for it (the fork is not: `extents.rs` tests that half). Measured
/// by the checkpoints' qgroup exclusive bytes, as before, the file was nobody's, since
/// the checkpoint shares it with the fork; the assertion on `exclusive_bytes` below shows
/// that measure stays under 16 MiB, so with it the last assertion fails.
#[test]
fn data_shared_with_a_fork_is_billed_to_the_checkpoint_once() {
    let platform = platform();
    let source = create(&platform, APP, sleeper());
    exec(
        &platform,
        APP,
        &source,
        "dd if=/dev/urandom of=/big bs=1M count=16 2>/dev/null && sync",
    );
    let cp = checkpoint(&platform, APP, &source, "shared");
    let mut body = sleeper();
    body["from_checkpoint"] = json!({"machine": source, "checkpoint": cp["id"]});
    let fork = create(&platform, APP, body);
    assert_eq!(exec(&platform, APP, &fork, "wc -c < /big"), "16777216\n");
    exec(&platform, APP, &source, "rm /big && sync");
    // Journaled shortly after each checkpoint operation.
    checkpoint(&platform, APP, &source, "after rm");
    let listed = checkpoints(&platform, APP, &source);
    let exclusive: u64 = listed
        .iter()
        .filter_map(|cp| cp["exclusive_bytes"].as_u64())
        .sum();
    assert!(
        exclusive < 16 << 20,
        "the fork shares /big, so no checkpoint holds it alone: {listed:?}"
    );
    let mut billed = 0;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        billed = last_checkpoint_storage(&platform, &source);
        if billed >= 16 << 20 {
            break;
        }
    }
    assert!(
        billed >= 16 << 20,
        "the source's checkpoints are billed for /big: {billed} bytes"
    );
    platform.teardown();
}

/// A Machine appending to a file while it is checkpointed ten times: each checkpoint holds
/// a whole prefix of what it wrote (no hole, no torn line), and the writer never stopped.
#[test]
fn a_running_writer_is_checkpointed_as_a_whole_prefix_without_stopping() {
    let platform = platform();
    let mut body = sleeper();
    body["config"]["init"]["cmd"] = json!(["/bin/sh", "-c",
        "i=0; while true; do i=$((i+1)); printf 'line %08d ................................\\n' $i >> /log; done"]);
    let id = create(&platform, APP, body);
    let instance = platform.machine(APP, &id).instance_id;
    let upper = |cp: &str| {
        platform
            .data_dir
            .path()
            .join("worker/machines")
            .join(&id)
            .join("checkpoints")
            .join(cp)
            .join("upper/log")
    };
    let mut lengths = Vec::new();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        let cp = checkpoint(&platform, APP, &id, "");
        let text = std::fs::read_to_string(upper(cp["id"].as_str().expect("id")))
            .expect("read the checkpoint's log");
        assert!(text.ends_with('\n'), "a torn last line");
        for (n, line) in text.lines().enumerate() {
            assert_eq!(
                line,
                format!("line {:08} ................................", n + 1)
            );
        }
        lengths.push(text.lines().count());
    }
    assert!(
        lengths.windows(2).all(|w| w[0] < w[1]),
        "the writer ran on between checkpoints: {lengths:?}"
    );
    let machine = platform.machine(APP, &id);
    assert_eq!(
        (machine.state, machine.instance_id),
        (MachineState::Started, instance)
    );
    assert!(
        !event_types(&platform, &id)
            .iter()
            .any(|t| t == "stop" || t == "exit"),
        "never stopped"
    );
    platform.teardown();
}

/// On a worker whose data dir is not btrfs, checkpoints are refused with their code and
/// listed as none.
#[test]
fn a_disk_that_cannot_snapshot_answers_checkpoints_unsupported() {
    let platform = Platform::start();
    platform.import(busybox_image(), IMAGE);
    platform.cli_ok(&["app", "create", APP]);
    let id = create(&platform, APP, sleeper());
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/{APP}/machines/{id}/checkpoints"),
        None,
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (422, Some("checkpoints_unsupported")),
        "{body}"
    );
    assert!(checkpoints(&platform, APP, &id).is_empty());
    platform.teardown();
}

/// The agent killed at every checkpoint, restore and fork step: afterwards no checkpoint
/// is half-made, the Machine's files are its old or its new ones as a whole, no snapshot
/// is left without its record (or the other way round), and the doctor is clean.
#[cfg(feature = "failpoints")]
#[test]
fn an_agent_killed_at_any_checkpoint_step_leaves_whole_checkpoints_and_files() {
    use berth_agent::failpoint::CHECKPOINT_POINTS;

    let mut platform = platform();
    for point in CHECKPOINT_POINTS {
        let source = create(&platform, APP, sleeper());
        exec(&platform, APP, &source, "echo before > /kept");
        let before = exec(&platform, APP, &source, TREE_DIGEST);
        let base = checkpoint(&platform, APP, &source, "base")["id"]
            .as_str()
            .expect("id")
            .to_owned();
        exec(&platform, APP, &source, "echo after > /kept");
        let after = exec(&platform, APP, &source, TREE_DIGEST);
        platform.shutdown();
        platform.boot_with_env(&[("BERTH_FAILPOINTS", point)]);
        let request = match point.split('.').next() {
            Some("checkpoint") => platform
                .request(
                    Method::POST,
                    &format!("/v1/apps/{APP}/machines/{source}/checkpoints"),
                )
                .json(&json!({})),
            Some("restore") => platform.request(
                Method::POST,
                &format!("/v1/apps/{APP}/machines/{source}/checkpoints/{base}/restore"),
            ),
            _ => platform
                .request(Method::POST, &format!("/v1/apps/{APP}/machines"))
                .json(&json!({"config": sleeper()["config"],
                    "from_checkpoint": {"machine": source, "checkpoint": base}})),
        };
        let answer = request.send();
        assert!(
            answer.is_err(),
            "{point}: answered instead of dying: {answer:?}"
        );
        platform.wait_exit();
        platform.boot();

        // Every listed checkpoint is whole: its snapshot and record both there.
        let machine_dir = platform
            .data_dir
            .path()
            .join("worker/machines")
            .join(&source);
        let listed = checkpoints(&platform, APP, &source);
        assert_whole(&machine_dir, &listed, point);
        assert!(
            !machine_dir.join("disk.swap").exists(),
            "{point}: disk.swap is left"
        );
        // A checkpoint or fork never stopped the Machine; a restore had stopped it (and
        // recorded so) before its first step, and a crash leaves it stopped. Either way it
        // has its old or its new files as a whole.
        if point.starts_with("restore") {
            assert_eq!(
                platform.machine(APP, &source).state,
                MachineState::Stopped,
                "{point}"
            );
            platform.cli_ok(&["machine", "start", "--app", APP, &source]);
        }
        platform.wait_for(point, Duration::from_secs(30), || {
            platform.machine(APP, &source).state == MachineState::Started
        });
        let now = exec(&platform, APP, &source, TREE_DIGEST);
        assert!(
            now == before || now == after,
            "{point}: the files are neither: {now}"
        );
        if point.starts_with("checkpoint") {
            assert_eq!(now, after, "{point}: a checkpoint changes no file");
        }
        // Fork steps: the create rolled back, or made a whole fork.
        let (_, list) = platform.call(Method::GET, &format!("/v1/apps/{APP}/machines"), None);
        for machine in list.as_array().cloned().unwrap_or_default() {
            let id = machine["id"].as_str().unwrap_or_default();
            if id != source && machine["state"] == "started" {
                assert_eq!(
                    exec(&platform, APP, id, TREE_DIGEST),
                    before,
                    "{point}: fork {id}"
                );
            }
        }
        let doctor = platform.cli(&["doctor"]);
        assert!(
            doctor.status.success(),
            "{point}: doctor: {}",
            String::from_utf8_lossy(&doctor.stdout)
        );
    }
    platform.teardown();
}

#[cfg(feature = "failpoints")]
/// The bytes of the Machine's last `checkpoint_storage` entry in the worker's usage
/// journal; 0 without one.
fn last_checkpoint_storage(platform: &Platform, id: &str) -> u64 {
    let db = platform.data_dir.path().join("worker/agent.db");
    common::control_store_rows(
        &format!("sqlite://{}?mode=ro", db.display()),
        "SELECT storage_bytes FROM usage_journal \
         WHERE machine_id = $1 AND kind = 'checkpoint_storage' ORDER BY seq DESC LIMIT 1",
        &[id],
        |row| {
            use sqlx::Row;
            u64::try_from(row.get::<i64, _>(0)).unwrap_or_default()
        },
    )
    .first()
    .copied()
    .unwrap_or_default()
}

fn assert_whole(machine_dir: &std::path::Path, listed: &[Value], point: &str) {
    let dir = machine_dir.join("checkpoints");
    let mut snapshots = Vec::new();
    let mut records = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("checkpoints dir") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if let Some(id) = name.strip_suffix(".json") {
            records.push(id.to_owned());
        } else if name.starts_with("cp_") {
            snapshots.push(name);
        }
    }
    snapshots.sort();
    records.sort();
    assert_eq!(snapshots, records, "{point}: every snapshot has its record");
    let mut ids: Vec<String> = listed
        .iter()
        .filter_map(|cp| cp["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    assert_eq!(ids, snapshots, "{point}: the list is what is on disk");
    for name in &snapshots {
        assert!(
            berth_runtime::checkpoint::is_read_only(&dir.join(name)).expect("flags"),
            "{point}: checkpoint {name} is writable"
        );
    }
}

/// A hundred checkpoints of one running Machine: the overlay stack does not grow (a
/// checkpoint is a snapshot, not a layer), each holds exactly what was written before it,
/// and the first, a middle and the last still restore to their exact content.
#[test]
fn a_hundred_checkpoints_keep_the_stack_flat_and_each_restores_exactly() {
    let platform = platform();
    let id = create(&platform, APP, sleeper());
    let mounts_before = exec(&platform, APP, &id, "grep ' / ' /proc/mounts");
    let mut ids = Vec::new();
    for n in 1..=100 {
        exec(
            &platform,
            APP,
            &id,
            &format!("mkdir -p /data && echo {n} > /data/last && echo {n} >> /data/all"),
        );
        let cp = checkpoint(&platform, APP, &id, &format!("step {n}"));
        ids.push(cp["id"].as_str().expect("id").to_owned());
    }
    // Every checkpoint holds what was written before it, read straight from its snapshot.
    let dir = platform
        .data_dir
        .path()
        .join("worker/machines")
        .join(&id)
        .join("checkpoints");
    for (n, cp) in ids.iter().enumerate() {
        let n = n + 1;
        let last = std::fs::read_to_string(dir.join(cp).join("upper/data/last")).expect("last");
        assert_eq!(last, format!("{n}\n"), "{cp}");
        let all = std::fs::read_to_string(dir.join(cp).join("upper/data/all")).expect("all");
        assert_eq!(all.lines().count(), n, "{cp}");
    }
    let listed = checkpoints(&platform, APP, &id);
    assert_eq!(listed.len(), 100);
    assert_eq!(
        listed[99]["parent"],
        ids[98].as_str(),
        "each names the one before"
    );
    // The root mount is the same stack as before the checkpoints.
    assert_eq!(
        exec(&platform, APP, &id, "grep ' / ' /proc/mounts"),
        mounts_before
    );
    for n in [1, 50, 100] {
        let (status, body) = restore(&platform, &id, &ids[n - 1]);
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            exec(&platform, APP, &id, "cat /data/last"),
            format!("{n}\n")
        );
        assert_eq!(
            exec(&platform, APP, &id, "wc -l < /data/all").trim(),
            n.to_string()
        );
    }
    platform.teardown();
}
