//! Moving Machines between workers, end to end: one `berth server` and three `berth
//! agent` processes from the built binary.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use berth_api::{DrainState, Machine, MachineState, MigrateMachineResponse, Worker};
use berth_runtime::MachineLayout;
use common::cluster::{sleeper, Cluster};
use reqwest::Method;
use serde_json::{json, Value};

/// Three workers with room for many small Machines.
fn three() -> Cluster {
    Cluster::with_fleet(&[("w1", 64, 65536), ("w2", 64, 65536), ("w3", 64, 65536)])
}

/// Creates a Machine on `worker` (the others cordoned meanwhile); answers its id.
fn create_on(cluster: &Cluster, worker: &str, body: Value) -> String {
    let others: Vec<String> = cluster
        .workers()
        .into_iter()
        .map(|each| each.name)
        .filter(|name| name != worker)
        .collect();
    for other in &others {
        cluster.cordon(other, true);
    }
    let (status, answer) = cluster.create(body);
    for other in &others {
        cluster.cordon(other, false);
    }
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["worker"], worker, "{answer}");
    answer["id"].as_str().expect("id").to_owned()
}

fn migrate(cluster: &Cluster, id: &str, to: Option<&str>) -> (u16, Value) {
    let body = match to {
        Some(worker) => json!({"to_worker": worker}),
        None => json!({}),
    };
    cluster.call(
        Method::POST,
        &format!("/v1/apps/fleet/machines/{id}/migrate"),
        Some(body),
    )
}

fn stop(cluster: &Cluster, id: &str) {
    let (status, body) = cluster.call(
        Method::POST,
        &format!("/v1/apps/fleet/machines/{id}/stop"),
        Some(json!({})),
    );
    assert_eq!(status, 200, "{body}");
}

fn start(cluster: &Cluster, id: &str) {
    let (status, body) = cluster.call(
        Method::POST,
        &format!("/v1/apps/fleet/machines/{id}/start"),
        None,
    );
    assert_eq!(status, 200, "{body}");
}

/// The digest of a Machine's writable layer on `worker`, ids taken relative to its range.
fn upper_digest(cluster: &Cluster, worker: &str, id: &str) -> String {
    let dir = cluster.machine_dir(worker, id);
    let layout = MachineLayout::new(dir.parent().expect("machines dir"), id);
    let base = berth_runtime::spec::machine_id_range(&layout)
        .map(|range| range.base)
        .expect("the machine has an id range");
    berth_agent::transfer::tree_digest(&layout.upper(), base).expect("digest")
}

fn events(cluster: &Cluster, id: &str) -> Vec<Value> {
    let (status, body) = cluster.call(
        Method::GET,
        &format!("/v1/apps/fleet/machines/{id}/events"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    body.as_array().cloned().unwrap_or_default()
}

#[test]
fn a_stopped_machine_moves_with_every_file_exactly() {
    let cluster = three();
    let id = create_on(&cluster, "w1", sleeper(json!({})));
    let before = cluster.machine(&id);
    cluster.sh(
        &id,
        "mkdir -p /data/dir && cd /data \
         && dd if=/dev/urandom of=big bs=1M count=50 2>/dev/null \
         && truncate -s 1G sparse && echo middle | dd of=sparse bs=1 seek=500000000 conv=notrunc 2>/dev/null \
         && echo shared > a && ln a b && chmod 4755 a \
         && ln -s /etc/passwd link && ln -s nowhere dangling \
         && mkfifo pipe && chown 1000:1000 dir \
         && rm /bin/ls",
    );
    stop(&cluster, &id);
    // An xattr, set on the host side of the upperdir (busybox has no setfattr).
    let upper = cluster.machine_dir("w1", &id).join("upper");
    rustix::fs::setxattr(
        upper.join("data/a"),
        "user.berth-test",
        b"kept",
        rustix::fs::XattrFlags::empty(),
    )
    .expect("setxattr");
    let digest = upper_digest(&cluster, "w1", &id);

    let (status, answer) = migrate(&cluster, &id, Some("w2"));
    assert_eq!(status, 200, "{answer}\n{}", cluster.logs());
    let answer: MigrateMachineResponse = serde_json::from_value(answer).expect("answer");
    assert_eq!(
        (answer.from_worker.as_str(), answer.to_worker.as_str()),
        ("w1", "w2")
    );
    assert_eq!(answer.machine.worker.as_deref(), Some("w2"));
    assert_eq!(answer.machine.state, MachineState::Stopped);
    assert_eq!(
        answer.downtime_ms, None,
        "a stopped Machine has no downtime"
    );
    assert_ne!(
        answer.machine.private_ip, before.private_ip,
        "a new address"
    );
    assert!(answer.bytes_moved >= 50 << 20, "{answer:?}");
    assert!(
        answer.bytes_sent < answer.bytes_moved + (16 << 20),
        "the sparse GiB is not sent as data: {answer:?}"
    );

    // Exactly the same tree, ids shifted into the new worker's range.
    assert_eq!(upper_digest(&cluster, "w2", &id), digest);
    let sparse = std::fs::metadata(cluster.machine_dir("w2", &id).join("upper/data/sparse"))
        .expect("sparse");
    assert_eq!(sparse.len(), 1 << 30);
    assert!(
        sparse.blocks() * 512 < 16 << 20,
        "holes kept: {} blocks",
        sparse.blocks()
    );
    // The old worker's copy goes right after the answer.
    cluster.wait_for("the old worker to keep nothing", || {
        !cluster.machine_dir("w1", &id).exists()
    });

    // From inside: the files, the link pair, the deleted image file.
    start(&cluster, &id);
    let seen = cluster.sh(
        &id,
        "cat /data/a; stat -c '%h %a' /data/a; readlink /data/link; \
         stat -c '%u' /data/dir; ls /bin/ls 2>/dev/null || echo gone",
    );
    assert_eq!(seen, "shared\n2 4755\n/etc/passwd\n1000\ngone\n");
    let history = events(&cluster, &id);
    let moved = history
        .iter()
        .find(|event| event["type"] == "migrate")
        .unwrap_or_else(|| panic!("a migrate event: {history:?}"));
    let reason = moved["reason"].as_str().unwrap_or_default().to_owned();
    assert!(
        reason.contains(before.private_ip.as_deref().unwrap_or("?")),
        "the event names the old address: {moved}"
    );
    assert!(
        history.iter().any(|event| event["type"] == "launch"),
        "the history came along: {history:?}"
    );
    cluster.assert_doctor_clean("after a move");
    cluster.teardown();
}

fn get_text(url: &str) -> Option<String> {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?
        .get(url)
        .send()
        .ok()?
        .text()
        .ok()
}

fn url_of(machine: &Machine) -> String {
    format!(
        "http://[{}]:8080/index.html",
        machine.private_ip.as_deref().expect("address")
    )
}

#[test]
fn a_running_machine_moves_and_serves_from_its_new_address() {
    let cluster = three();
    let body = json!({"config": {"image": "demo/busybox:1",
        "init": {"cmd": ["sh", "-c", "mkdir -p /www && echo hello > /www/index.html && exec busybox httpd -f -p 8080 -h /www"]},
        "guest": {"cpus": 1, "memory_mb": 64}}});
    let id = create_on(&cluster, "w1", body);
    let before = cluster.machine(&id);
    cluster.sh(
        &id,
        "dd if=/dev/urandom of=/data.bin bs=1M count=20 2>/dev/null",
    );
    let old_url = url_of(&before);
    cluster.wait_for("the Machine to serve", || {
        get_text(&old_url).as_deref() == Some("hello\n")
    });

    let (status, answer) = migrate(&cluster, &id, None);
    assert_eq!(status, 200, "{answer}\n{}", cluster.logs());
    let answer: MigrateMachineResponse = serde_json::from_value(answer).expect("answer");
    assert_ne!(answer.to_worker, "w1");
    assert_eq!(answer.machine.state, MachineState::Started);
    assert!(
        answer.passes >= 2,
        "copied while running, then the rest: {answer:?}"
    );
    let downtime = answer
        .downtime_ms
        .expect("a running Machine reports its downtime");
    assert!(downtime < answer.duration_ms, "{answer:?}");
    let new_url = url_of(&answer.machine);
    cluster.wait_for("the Machine to serve at its new address", || {
        get_text(&new_url).as_deref() == Some("hello\n")
    });
    assert_eq!(
        get_text(&old_url),
        None,
        "nothing answers at the old address"
    );
    assert_eq!(
        cluster.sh(&id, "stat -c %s /data.bin"),
        format!("{}\n", 20 << 20)
    );
    cluster.assert_doctor_clean("after a live move");
    cluster.teardown();
}

#[test]
fn refused_moves_say_why_and_change_nothing() {
    let cluster = three();
    let id = create_on(&cluster, "w1", sleeper(json!({})));
    for (to, status, code) in [
        (Some("w1"), 422, "same_worker"),
        (Some("w9"), 422, "unknown_worker"),
    ] {
        let (got, body) = migrate(&cluster, &id, to);
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }
    cluster.cordon("w2", true);
    cluster.cordon("w3", true);
    let (got, body) = migrate(&cluster, &id, None);
    assert_eq!(
        (got, body["error"].as_str()),
        (503, Some("insufficient_capacity")),
        "{body}"
    );
    let machine = cluster.machine(&id);
    assert_eq!(machine.worker.as_deref(), Some("w1"));
    assert_eq!(machine.state, MachineState::Started);
    cluster.cordon("w2", false);
    cluster.cordon("w3", false);
    cluster.assert_doctor_clean("after refused moves");
    cluster.teardown();
}

fn worker(cluster: &Cluster, name: &str) -> Worker {
    let (status, body) = cluster.call(Method::GET, &format!("/v1/workers/{name}"), None);
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).expect("worker")
}

#[test]
fn a_drain_empties_a_worker_of_running_and_stopped_machines() {
    let cluster = three();
    let mut ids = Vec::new();
    for n in 0..20 {
        let body = sleeper(json!({"skip_launch": n % 2 == 0}));
        ids.push(create_on(&cluster, "w1", body));
    }
    let states: Vec<(String, MachineState)> = ids
        .iter()
        .map(|id| (id.clone(), cluster.machine(id).state))
        .collect();
    let began = Instant::now();
    let (status, body) = cluster.call(Method::POST, "/v1/workers/w1/drain", None);
    assert_eq!(status, 202, "{body}");
    assert!(worker(&cluster, "w1").cordoned);
    let deadline = Instant::now() + Duration::from_secs(600);
    let progress = loop {
        let progress = worker(&cluster, "w1").drain.expect("drain progress");
        assert_eq!(
            progress.left + progress.moving + progress.moved + progress.failed.len() as u64,
            20,
            "every Machine is counted once: {progress:?}"
        );
        if progress.state != DrainState::Draining {
            break progress;
        }
        assert!(
            Instant::now() < deadline,
            "{progress:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(progress.state, DrainState::Drained, "{progress:?}");
    assert_eq!(progress.moved, 20);
    eprintln!("drained 20 Machines in {:?}", began.elapsed());
    for (id, state) in states {
        let machine = cluster.machine(&id);
        assert_ne!(machine.worker.as_deref(), Some("w1"));
        assert_eq!(machine.state, state, "{id} kept its state");
    }
    let machines_dir = cluster.machine_dir("w1", "x");
    cluster.wait_for("the drained worker to hold no Machine", || {
        std::fs::read_dir(machines_dir.parent().expect("dir"))
            .map(|dir| dir.count())
            .unwrap_or(0)
            == 0
    });
    cluster.assert_doctor_clean("after a drain");
    cluster.teardown();
}

/// Restarts an agent with `env` and waits until the control plane has its heartbeat
/// again (a restarted agent registers anew and takes no Machines until then).
fn restart_agent_and_wait(cluster: &mut Cluster, name: &str, env: &[(&str, &str)]) {
    let before = worker(cluster, name).last_heartbeat;
    cluster.restart_agent_with_env(name, env);
    cluster.wait_for(&format!("worker {name} to heartbeat again"), || {
        let now = worker(cluster, name);
        now.status == berth_api::WorkerStatus::Ready
            && now.last_heartbeat.is_some()
            && now.last_heartbeat != before
    });
}

/// Where the Machine's files are: the workers holding a directory for it.
fn holders(cluster: &Cluster, id: &str) -> Vec<String> {
    ["w1", "w2"]
        .iter()
        .filter(|worker| cluster.machine_dir(worker, id).exists())
        .map(|worker| worker.to_string())
        .collect()
}

/// A process of the move killed (SIGABRT, as kill -9) at each of its failpoints, then
/// started again: the move finishes or rolls back, and the Machine exists exactly once,
/// on exactly one worker, with its files, and starts. Before the cutover it rolls back,
/// after it it rolls forward (docs/RELIABILITY.md has the table).
#[cfg(feature = "failpoints")]
#[test]
fn a_move_killed_at_any_step_finishes_or_rolls_back_and_leaks_nothing() {
    let mut cluster = Cluster::with_fleet(&[("w1", 64, 65536), ("w2", 64, 65536)]);
    let id = create_on(&cluster, "w1", sleeper(json!({})));
    cluster.sh(
        &id,
        "echo precious > /kept && dd if=/dev/zero of=/filler bs=1M count=8 2>/dev/null",
    );
    let source_points = [
        "migrate.after_begin",
        "migrate.source_mid_stream",
        "migrate.after_halt",
        "migrate.after_source_remove",
    ];
    let dest_points = [
        "migrate.after_receive_prepare",
        "migrate.dest_mid_stream",
        "migrate.after_receive",
        "migrate.after_sync",
        "migrate.after_commit",
    ];
    let mut points: Vec<(&str, &str)> = Vec::new();
    points.extend(source_points.iter().map(|point| ("source", *point)));
    points.extend(dest_points.iter().map(|point| ("dest", *point)));
    points.extend(
        berth_control::migrate::CONTROL_POINTS
            .iter()
            .map(|point| ("control", *point)),
    );
    let all: Vec<&str> = points.iter().map(|(_, point)| *point).collect();
    for listed in berth_agent::failpoint::MIGRATION_POINTS {
        assert!(all.contains(listed), "{listed} is crash-tested");
    }
    for (who, point) in points {
        let source = cluster.machine(&id).worker.expect("worker");
        let dest = if source == "w1" { "w2" } else { "w1" };
        let env = [("BERTH_FAILPOINTS", point)];
        match who {
            "source" => restart_agent_and_wait(&mut cluster, &source, &env),
            "dest" => restart_agent_and_wait(&mut cluster, dest, &env),
            _ => cluster.restart_server_with_env(&env),
        }
        cluster.wait_for("every worker to be ready", || {
            cluster
                .workers()
                .iter()
                .all(|worker| worker.status == berth_api::WorkerStatus::Ready)
        });
        // Running, so that the halt and the final pass happen.
        if cluster.machine(&id).state != MachineState::Started {
            start(&cluster, &id);
        }
        // The process dies in the middle: the answer is an error, or no answer at all
        // when the control plane dies.
        let answer = cluster
            .http
            .post(format!(
                "{}/v1/apps/fleet/machines/{id}/migrate",
                cluster.api_url
            ))
            .bearer_auth(&cluster.token)
            .json(&json!({"to_worker": dest}))
            .send()
            .map(|response| {
                let status = response.status().as_u16();
                (status, response.json::<Value>().unwrap_or_default())
            });
        eprintln!("{point}: {answer:?}");
        if point == "migrate.after_sync" {
            // A pass died with the destination: the Machine runs on the source (again, if
            // the move had stopped it for the final pass), and the answer says so.
            let (status, body) = answer.as_ref().expect("an answer");
            assert!(*status >= 500, "{body}");
            assert_eq!(body["worker"], source.as_str(), "{body}");
            assert_eq!(body["state"], "started", "{body}");
            let message = body["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(&format!("stays on worker {source}")),
                "{body}"
            );
            assert_eq!(cluster.machine(&id).state, MachineState::Started);
        }
        match who {
            "source" => restart_agent_and_wait(&mut cluster, &source, &[]),
            "dest" => restart_agent_and_wait(&mut cluster, dest, &[]),
            _ => cluster.restart_server(),
        }
        cluster.wait_for(&format!("the move killed at {point} to settle"), || {
            let held = holders(&cluster, &id);
            let (status, machine) =
                cluster.call(Method::GET, &format!("/v1/apps/fleet/machines/{id}"), None);
            status == 200
                && held.len() == 1
                && machine["worker"] == held[0].as_str()
                && cluster
                    .call(
                        Method::POST,
                        &format!("/v1/apps/fleet/machines/{id}/migrate"),
                        Some(json!({"to_worker": "nowhere"})),
                    )
                    .1["error"]
                    == "unknown_worker"
        });
        // Past the cutover the move finished; before it, it rolled back.
        let forward = [
            "migrate.after_source_remove",
            "migrate.after_commit",
            "migrate.after_cutover",
        ]
        .contains(&point);
        let expected = if forward { dest } else { source.as_str() };
        assert_eq!(holders(&cluster, &id), vec![expected.to_owned()], "{point}");
        if cluster.machine(&id).state != MachineState::Started {
            start(&cluster, &id);
        }
        assert_eq!(cluster.sh(&id, "cat /kept"), "precious\n", "{point}");
        cluster.assert_doctor_clean(&format!("after a move killed at {point}"));
    }
    cluster.teardown();
}

#[test]
fn a_full_destination_disk_fails_the_move_cleanly_and_the_machine_stays_whole() {
    let mut cluster = Cluster::with_fleet(&[("w1", 64, 65536), ("w2", 64, 65536)]);
    let id = create_on(&cluster, "w1", sleeper(json!({})));
    cluster.sh(
        &id,
        "dd if=/dev/urandom of=/big bs=1M count=64 2>/dev/null && echo kept > /small",
    );
    stop(&cluster, &id);
    let digest = upper_digest(&cluster, "w1", &id);
    // w2 starts again on a 48 MB disk: room for its records and the image, not the files.
    let data_dir = cluster.agent("w2").data_dir.clone();
    cluster.agent("w2").process.kill();
    std::fs::remove_dir_all(&data_dir).expect("clear w2's data dir");
    std::fs::create_dir_all(&data_dir).expect("w2's data dir");
    nix::mount::mount(
        Some("tmpfs"),
        &data_dir,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=48m,mode=0700"),
    )
    .expect("mount a small tmpfs");
    restart_agent_and_wait(&mut cluster, "w2", &[]);

    let (status, body) = migrate(&cluster, &id, Some("w2"));
    assert_eq!(
        (status, body["error"].as_str()),
        (507, Some("insufficient_storage")),
        "{body}\n{}",
        cluster.logs()
    );
    let machine = cluster.machine(&id);
    assert_eq!(machine.worker.as_deref(), Some("w1"));
    assert_eq!(machine.state, MachineState::Stopped);
    assert_eq!(
        upper_digest(&cluster, "w1", &id),
        digest,
        "the files are whole"
    );
    assert!(!cluster.machine_dir("w2", &id).exists(), "w2 keeps nothing");
    start(&cluster, &id);
    assert_eq!(cluster.sh(&id, "cat /small"), "kept\n");
    cluster.assert_doctor_clean("after a move refused for space");
    let (status, body) = cluster.call(
        Method::DELETE,
        &format!("/v1/apps/fleet/machines/{id}?kill=true"),
        None,
    );
    assert!(status < 300, "{body}");
    cluster.agent("w2").process.kill();
    nix::mount::umount2(&data_dir, nix::mount::MntFlags::MNT_DETACH).expect("unmount");
    cluster.teardown();
}

#[test]
fn a_machine_of_a_lost_worker_is_recreated_only_when_asked_and_its_stale_copy_goes() {
    let mut cluster = Cluster::with_fleet(&[("w1", 64, 65536), ("w2", 64, 65536)]);
    let id = create_on(
        &cluster,
        "w1",
        sleeper(json!({"config": {"image": "demo/busybox:1",
        "init": {"cmd": ["sleep", "3600"]}, "metadata": {"role": "db"},
        "guest": {"cpus": 1, "memory_mb": 64}}})),
    );
    cluster.sh(&id, "echo lost > /file");
    let recreate = |cluster: &Cluster, body: Value| {
        cluster.call(
            Method::POST,
            &format!("/v1/apps/fleet/machines/{id}/recreate"),
            Some(body),
        )
    };
    let (status, body) = recreate(&cluster, json!({"lose_state": true}));
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("worker_available")),
        "{body}"
    );
    stop(&cluster, &id);
    cluster.agent("w1").process.kill();
    cluster.wait_for("w1 to be unreachable", || {
        worker(&cluster, "w1").status == berth_api::WorkerStatus::Unreachable
    });
    let (status, body) = recreate(&cluster, json!({}));
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("state_would_be_lost")),
        "{body}"
    );
    let (status, body) = recreate(&cluster, json!({"lose_state": true}));
    assert_eq!(status, 200, "{body}\n{}", cluster.logs());
    assert_eq!(body["worker"], "w2", "{body}");
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["config"]["metadata"]["role"], "db", "{body}");
    let history = events(&cluster, &id);
    assert!(
        history.iter().any(|event| event["type"] == "recreate"
            && event["reason"].as_str().unwrap_or_default().contains("w1")),
        "{history:?}"
    );
    start(&cluster, &id);
    assert_eq!(
        cluster.sh(&id, "cat /file 2>/dev/null || echo gone"),
        "gone\n"
    );

    // w1 comes back holding its old copy: the control plane removes it.
    restart_agent_and_wait(&mut cluster, "w1", &[]);
    cluster.wait_for("w1's stale copy to go", || {
        !cluster.machine_dir("w1", &id).exists()
    });
    assert_eq!(cluster.machine(&id).worker.as_deref(), Some("w2"));
    cluster.assert_doctor_clean("after a recreate and a stale copy removed");
    cluster.teardown();
}

#[test]
fn a_start_during_a_stopped_machines_copy_waits_and_runs_it_on_the_new_worker() {
    let cluster = Cluster::with_fleet(&[("w1", 64, 65536), ("w2", 64, 65536)]);
    let id = create_on(&cluster, "w1", sleeper(json!({})));
    cluster.sh(
        &id,
        "dd if=/dev/urandom of=/big bs=1M count=200 2>/dev/null",
    );
    stop(&cluster, &id);
    let moving = {
        let (api_url, token, id) = (cluster.api_url.clone(), cluster.token.clone(), id.clone());
        std::thread::spawn(move || {
            reqwest::blocking::Client::new()
                .post(format!("{api_url}/v1/apps/fleet/machines/{id}/migrate"))
                .bearer_auth(token)
                .json(&json!({"to_worker": "w2"}))
                .send()
                .map(|response| response.status().as_u16())
        })
    };
    // The copy takes a while; the start arrives in the middle of it.
    std::thread::sleep(Duration::from_millis(150));
    let (status, body) = cluster.call(
        Method::POST,
        &format!("/v1/apps/fleet/machines/{id}/start"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(moving.join().expect("thread").expect("answer"), 200);
    assert_eq!(
        body["machine"]["worker"], "w2",
        "the start waited for the move: {body}"
    );
    let machine = cluster.machine(&id);
    assert_eq!(machine.state, MachineState::Started);
    cluster.wait_for("the old copy to go", || holders(&cluster, &id) == ["w2"]);
    cluster.assert_doctor_clean("after a start that waited for a move");
    cluster.teardown();
}

#[test]
fn a_lease_guards_a_move_and_is_still_held_after_it() {
    let cluster = Cluster::with_fleet(&[("w1", 64, 65536), ("w2", 64, 65536)]);
    let id = create_on(&cluster, "w1", sleeper(json!({})));
    let (status, lease) = cluster.call(
        Method::POST,
        &format!("/v1/apps/fleet/machines/{id}/lease"),
        Some(json!({"ttl": 300})),
    );
    assert_eq!(status, 200, "{lease}");
    let nonce = lease["data"]["nonce"].as_str().expect("nonce").to_owned();
    let (status, body) = migrate(&cluster, &id, Some("w2"));
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("lease_held")),
        "{body}"
    );
    let moved = cluster
        .http
        .post(format!(
            "{}/v1/apps/fleet/machines/{id}/migrate",
            cluster.api_url
        ))
        .bearer_auth(&cluster.token)
        .header("fly-machine-lease-nonce", &nonce)
        .json(&json!({"to_worker": "w2"}))
        .send()
        .expect("migrate");
    assert_eq!(moved.status().as_u16(), 200, "{:?}", moved.text());
    let (status, held) = cluster.call(
        Method::GET,
        &format!("/v1/apps/fleet/machines/{id}/lease"),
        None,
    );
    assert_eq!(status, 200, "{held}");
    assert_eq!(
        held["data"]["nonce"],
        nonce.as_str(),
        "the robot keeps its lease"
    );
    let (status, body) = cluster.call(
        Method::POST,
        &format!("/v1/apps/fleet/machines/{id}/stop"),
        Some(json!({})),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("lease_held")),
        "the lease still guards the Machine on its new worker: {body}"
    );
    let released = cluster
        .http
        .delete(format!(
            "{}/v1/apps/fleet/machines/{id}/lease",
            cluster.api_url
        ))
        .bearer_auth(&cluster.token)
        .header("fly-machine-lease-nonce", &nonce)
        .send()
        .expect("release");
    assert!(released.status().is_success(), "{:?}", released.text());
    cluster.teardown();
}

// ---------------------------------------------------------------------------------------
// Machines with volumes
// ---------------------------------------------------------------------------------------

/// Makes a volume of `size_gb` on `worker` (the others cordoned meanwhile); answers its id.
fn volume_on(cluster: &Cluster, worker: &str, name: &str, size_gb: u32) -> String {
    let others: Vec<String> = cluster
        .workers()
        .into_iter()
        .map(|each| each.name)
        .filter(|each| each != worker)
        .collect();
    for other in &others {
        cluster.cordon(other, true);
    }
    let (status, body) = cluster.call(
        Method::POST,
        "/v1/apps/fleet/volumes",
        Some(json!({"name": name, "size_gb": size_gb})),
    );
    for other in &others {
        cluster.cordon(other, false);
    }
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["zone"], worker, "{body}");
    body["id"].as_str().expect("id").to_owned()
}

fn volume(cluster: &Cluster, id: &str) -> Value {
    let (status, body) = cluster.call(Method::GET, &format!("/v1/apps/fleet/volumes/{id}"), None);
    assert_eq!(status, 200, "{body}");
    body
}

/// A digest of the tree under `/data` as the Machine sees it: names, types, sizes, modes,
/// owners, link targets and every file's content.
fn data_digest(cluster: &Cluster, id: &str) -> String {
    cluster.sh(
        id,
        "cd /data && { find . | sort | while read -r f; do stat -c '%n %F %s %a %u %g' \"$f\"; \
         [ -L \"$f\" ] && readlink \"$f\"; [ -f \"$f\" ] && [ ! -L \"$f\" ] && md5sum \"$f\"; \
         done; } | md5sum",
    )
}

/// The workers holding a directory for volume `id`.
fn volume_holders(cluster: &Cluster, id: &str) -> Vec<String> {
    cluster
        .workers()
        .into_iter()
        .map(|worker| worker.name)
        .filter(|worker| cluster.volume_dir(worker, id).exists())
        .collect()
}

/// (worker, kind, at_ms) of each journal entry of `id` the control plane has taken in.
fn ledger_of(cluster: &Cluster, id: &str) -> Vec<(String, String, i64)> {
    common::control_store_rows(
        &cluster.control_store,
        "SELECT worker, kind, at_ms FROM usage_ledger WHERE machine_id = $1 ORDER BY worker, seq",
        &[id],
        |row| {
            use sqlx::Row;
            (row.get(0), row.get(1), row.get(2))
        },
    )
}

/// Files of many kinds on the volume at `/data`.
const VOLUME_FILES: &str = "mkdir -p /data/dir && cd /data \
     && dd if=/dev/urandom of=big bs=1M count=20 2>/dev/null \
     && echo precious > kept && ln kept kept2 && ln -s kept link && chmod 640 kept \
     && chown 1000:1000 dir && truncate -s 100M holes && echo end >> holes";

#[test]
fn stopped_and_running_machines_move_with_their_volumes() {
    let cluster = three();
    let stopped_volume = volume_on(&cluster, "w1", "data", 1);
    let running_volume = volume_on(&cluster, "w1", "web", 1);
    let mounts = |volume: &str| json!([{"volume": volume, "path": "/data"}]);
    let stopped = create_on(
        &cluster,
        "w1",
        json!({"config": {"image": "demo/busybox:1", "init": {"cmd": ["sleep", "3600"]},
            "guest": {"cpus": 1, "memory_mb": 64}, "stop_config": {"signal": "SIGKILL"},
            "mounts": mounts(&stopped_volume)}}),
    );
    let running = create_on(
        &cluster,
        "w1",
        json!({"config": {"image": "demo/busybox:1",
            "init": {"cmd": ["sh", "-c", "mkdir -p /data/www && echo hello > /data/www/index.html && exec busybox httpd -f -p 8080 -h /data/www"]},
            "guest": {"cpus": 1, "memory_mb": 64}, "mounts": mounts(&running_volume)}}),
    );

    // The stopped one: files of every kind, and a snapshot that moves with the volume.
    cluster.sh(&stopped, VOLUME_FILES);
    let digest = data_digest(&cluster, &stopped);
    let (status, snapshot) = cluster.call(
        Method::POST,
        &format!("/v1/apps/fleet/volumes/{stopped_volume}/snapshots"),
        None,
    );
    assert_eq!(status, 200, "{snapshot}");
    stop(&cluster, &stopped);
    let before = volume(&cluster, &stopped_volume);

    let (status, answer) = migrate(&cluster, &stopped, Some("w2"));
    assert_eq!(status, 200, "{answer}\n{}", cluster.logs());
    let answer: MigrateMachineResponse = serde_json::from_value(answer).expect("answer");
    assert_eq!(answer.machine.worker.as_deref(), Some("w2"));
    assert!(
        answer.bytes_moved >= 20 << 20,
        "the volume's data: {answer:?}"
    );
    // Right after the answer, the index names the new worker, and the volume is the same.
    let after = volume(&cluster, &stopped_volume);
    assert_eq!(after["zone"], "w2", "{after}");
    for field in [
        "id",
        "name",
        "size_gb",
        "region",
        "created_at",
        "attached_machine_id",
    ] {
        assert_eq!(after[field], before[field], "{field}: {before} -> {after}");
    }
    assert_eq!(after["attached_machine_id"], stopped.as_str());
    let (status, listed) = cluster.call(Method::GET, "/v1/apps/fleet/volumes", None);
    assert_eq!(status, 200, "{listed}");
    let zones: Vec<&Value> = listed
        .as_array()
        .expect("list")
        .iter()
        .filter(|each| each["id"] == stopped_volume.as_str())
        .map(|each| &each["zone"])
        .collect();
    assert_eq!(
        zones,
        vec!["w2"],
        "listed once, on its new worker: {listed}"
    );
    // Sparse on the new worker: the 1 GB image holds little more than what was written.
    let image = std::fs::metadata(cluster.volume_dir("w2", &stopped_volume).join("disk.img"))
        .expect("image");
    assert_eq!(image.len(), 1 << 30);
    assert!(
        image.blocks() * 512 < 200 << 20,
        "holes kept: {} bytes allocated",
        image.blocks() * 512
    );
    cluster.wait_for("the old worker to keep no copy of the volume", || {
        volume_holders(&cluster, &stopped_volume) == vec!["w2".to_owned()]
    });
    // Billed on one worker at a time: its storage ends on w1 where it starts on w2.
    cluster.wait_for("the volume's billing to move with it", || {
        let entries = ledger_of(&cluster, &stopped_volume);
        let at = |worker: &str, kind: &str| {
            entries
                .iter()
                .filter(|entry| entry.0 == worker && entry.1 == kind)
                .map(|entry| entry.2)
                .collect::<Vec<i64>>()
        };
        let (out, into) = (at("w1", "migrated_out"), at("w2", "created"));
        out.len() == 1 && into == out && at("w1", "created").len() == 1
    });
    // The snapshot came along: listed, and a volume made from it on the new worker.
    let (status, snapshots) = cluster.call(
        Method::GET,
        &format!("/v1/apps/fleet/volumes/{stopped_volume}/snapshots"),
        None,
    );
    assert_eq!(status, 200, "{snapshots}");
    assert_eq!(snapshots[0]["id"], snapshot["id"], "{snapshots}");
    let (status, restored) = cluster.call(
        Method::POST,
        "/v1/apps/fleet/volumes",
        Some(json!({"name": "restored", "snapshot_id": snapshot["id"]})),
    );
    assert_eq!(status, 200, "{restored}");
    assert_eq!(restored["zone"], "w2", "{restored}");
    // A volume call goes to the new worker.
    let (status, extended) = cluster.call(
        Method::PUT,
        &format!("/v1/apps/fleet/volumes/{stopped_volume}/extend"),
        Some(json!({"size_gb": 2})),
    );
    assert_eq!(status, 200, "{extended}");
    assert_eq!(extended["volume"]["size_gb"], 2, "{extended}");
    start(&cluster, &stopped);
    assert_eq!(
        data_digest(&cluster, &stopped),
        digest,
        "every file came along"
    );
    assert_eq!(cluster.sh(&stopped, "cat /data/kept"), "precious\n");

    // The running one: keeps serving from its volume, at its new address.
    cluster.sh(&running, VOLUME_FILES);
    let digest = data_digest(&cluster, &running);
    let machine = cluster.machine(&running);
    let old_url = url_of(&machine);
    cluster.wait_for("the Machine to serve", || {
        get_text(&old_url).as_deref() == Some("hello\n")
    });
    let (status, answer) = migrate(&cluster, &running, Some("w3"));
    assert_eq!(status, 200, "{answer}\n{}", cluster.logs());
    let answer: MigrateMachineResponse = serde_json::from_value(answer).expect("answer");
    assert_eq!(answer.machine.state, MachineState::Started);
    assert!(
        answer.passes >= 2,
        "copied while running, then the rest: {answer:?}"
    );
    let downtime = answer.downtime_ms.expect("downtime");
    eprintln!("a running Machine with a 1 GB volume moved: {downtime} ms down, {answer:?}");
    let new_url = url_of(&answer.machine);
    cluster.wait_for("the Machine to serve at its new address", || {
        get_text(&new_url).as_deref() == Some("hello\n")
    });
    assert_eq!(volume(&cluster, &running_volume)["zone"], "w3");
    assert_eq!(
        data_digest(&cluster, &running),
        digest,
        "every file came along"
    );
    cluster.wait_for("the old worker to keep no copy of the volume", || {
        volume_holders(&cluster, &running_volume) == vec!["w3".to_owned()]
    });
    cluster.assert_doctor_clean("after moves with volumes");
    cluster.teardown();
}

#[test]
fn a_drain_moves_machines_with_volumes_too() {
    let cluster = three();
    let mut ids = Vec::new();
    let mut volumes = Vec::new();
    for n in 0..4 {
        let mounted = n < 2;
        let mut config = json!({"image": "demo/busybox:1", "init": {"cmd": ["sleep", "3600"]},
            "guest": {"cpus": 1, "memory_mb": 64}, "stop_config": {"signal": "SIGKILL"}});
        if mounted {
            let volume = volume_on(&cluster, "w1", &format!("data{n}"), 1);
            config["mounts"] = json!([{"volume": volume, "path": "/data"}]);
            volumes.push(volume);
        }
        let id = create_on(&cluster, "w1", json!({"config": config}));
        if mounted {
            cluster.sh(&id, &format!("echo machine{n} > /data/kept"));
        }
        // One of each stopped.
        if n % 2 == 0 {
            stop(&cluster, &id);
        }
        ids.push(id);
    }
    let (status, body) = cluster.call(Method::POST, "/v1/workers/w1/drain", None);
    assert_eq!(status, 202, "{body}");
    let deadline = Instant::now() + Duration::from_secs(300);
    let progress = loop {
        let progress = worker(&cluster, "w1").drain.expect("drain progress");
        if progress.state != DrainState::Draining {
            break progress;
        }
        assert!(
            Instant::now() < deadline,
            "{progress:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(progress.state, DrainState::Drained, "{progress:?}");
    assert_eq!(progress.moved, 4, "{progress:?}");
    for (n, volume_id) in volumes.iter().enumerate() {
        let machine = cluster.machine(&ids[n]);
        let moved = volume(&cluster, volume_id);
        assert_eq!(moved["zone"].as_str(), machine.worker.as_deref(), "{moved}");
        assert_eq!(moved["attached_machine_id"], ids[n].as_str(), "{moved}");
        if machine.state != MachineState::Started {
            start(&cluster, &ids[n]);
        }
        assert_eq!(
            cluster.sh(&ids[n], "cat /data/kept"),
            format!("machine{n}\n")
        );
        cluster.wait_for("the volume to be on one worker", || {
            volume_holders(&cluster, volume_id) == vec![machine.worker.clone().expect("worker")]
        });
    }
    cluster.assert_doctor_clean("after a drain with volumes");
    cluster.teardown();
}

/// The crash matrix for a Machine with a volume: each process killed at the volume steps
/// of a move (and mid-stream and right after the cutover record), then started again.
/// Afterwards the volume exists exactly once, attached to its Machine, on the Machine's
/// worker, with its files.
#[cfg(feature = "failpoints")]
#[test]
fn a_move_with_a_volume_killed_at_any_step_leaves_the_volume_exactly_once() {
    let mut cluster = Cluster::with_fleet(&[("w1", 64, 65536), ("w2", 64, 65536)]);
    let volume_id = volume_on(&cluster, "w1", "data", 1);
    let id = create_on(
        &cluster,
        "w1",
        json!({"config": {"image": "demo/busybox:1", "init": {"cmd": ["sleep", "3600"]},
            "guest": {"cpus": 1, "memory_mb": 64}, "stop_config": {"signal": "SIGKILL"},
            "mounts": [{"volume": volume_id, "path": "/data"}]}}),
    );
    cluster.sh(
        &id,
        "echo precious > /data/kept && dd if=/dev/urandom of=/data/filler bs=1M count=8 2>/dev/null",
    );
    let digest = data_digest(&cluster, &id);
    let points = [
        ("source", "migrate.source_volume_mid_stream"),
        ("source", "migrate.after_halt"),
        ("source", "migrate.after_source_volume_remove"),
        ("dest", "migrate.dest_volume_mid_stream"),
        ("dest", "migrate.after_sync"),
        ("dest", "migrate.after_commit_volumes"),
        ("control", "migrate.after_cutover"),
    ];
    for listed in berth_agent::failpoint::VOLUME_MIGRATION_POINTS {
        assert!(
            points.iter().any(|(_, point)| point == listed),
            "{listed} is crash-tested"
        );
    }
    for (who, point) in points {
        let source = cluster.machine(&id).worker.expect("worker");
        let dest = if source == "w1" { "w2" } else { "w1" };
        let env = [("BERTH_FAILPOINTS", point)];
        match who {
            "source" => restart_agent_and_wait(&mut cluster, &source, &env),
            "dest" => restart_agent_and_wait(&mut cluster, dest, &env),
            _ => cluster.restart_server_with_env(&env),
        }
        cluster.wait_for("every worker to be ready", || {
            cluster
                .workers()
                .iter()
                .all(|worker| worker.status == berth_api::WorkerStatus::Ready)
        });
        // Running, so that the halt and the last pass happen.
        if cluster.machine(&id).state != MachineState::Started {
            start(&cluster, &id);
        }
        let answer = cluster
            .http
            .post(format!(
                "{}/v1/apps/fleet/machines/{id}/migrate",
                cluster.api_url
            ))
            .bearer_auth(&cluster.token)
            .json(&json!({"to_worker": dest}))
            .send()
            .map(|response| response.status().as_u16());
        eprintln!("{point}: {answer:?}");
        match who {
            "source" => restart_agent_and_wait(&mut cluster, &source, &[]),
            "dest" => restart_agent_and_wait(&mut cluster, dest, &[]),
            _ => cluster.restart_server(),
        }
        cluster.wait_for(&format!("the move killed at {point} to settle"), || {
            let held = holders(&cluster, &id);
            let (status, machine) =
                cluster.call(Method::GET, &format!("/v1/apps/fleet/machines/{id}"), None);
            status == 200
                && held.len() == 1
                && machine["worker"] == held[0].as_str()
                && volume_holders(&cluster, &volume_id) == held
                && cluster
                    .call(
                        Method::POST,
                        &format!("/v1/apps/fleet/machines/{id}/migrate"),
                        Some(json!({"to_worker": "nowhere"})),
                    )
                    .1["error"]
                    == "unknown_worker"
        });
        let forward = [
            "migrate.after_source_volume_remove",
            "migrate.after_commit_volumes",
            "migrate.after_cutover",
        ]
        .contains(&point);
        let expected = if forward { dest } else { source.as_str() };
        assert_eq!(holders(&cluster, &id), vec![expected.to_owned()], "{point}");
        assert_eq!(
            volume_holders(&cluster, &volume_id),
            vec![expected.to_owned()],
            "{point}"
        );
        let listed = volume(&cluster, &volume_id);
        assert_eq!(listed["zone"], expected, "{point}: {listed}");
        assert_eq!(
            listed["attached_machine_id"],
            id.as_str(),
            "{point}: {listed}"
        );
        if cluster.machine(&id).state != MachineState::Started {
            start(&cluster, &id);
        }
        assert_eq!(data_digest(&cluster, &id), digest, "{point}");
        cluster.assert_doctor_clean(&format!("after a move with a volume killed at {point}"));
    }
    cluster.teardown();
}

/// A lost worker's Machine with a volume: recreate (admin, `lose_state`) makes it on
/// another worker with the volume made again empty there (same id, name, size and flags),
/// an event saying the volume's data was lost, and its snapshots gone from the index.
/// When the lost worker comes back, its stale copies of both are removed. Before this,
/// the recreate answered 409 `volume_on_lost_worker`.
#[test]
fn a_machine_with_a_volume_on_a_lost_worker_is_recreated_with_the_volume_made_again_empty() {
    let mut cluster = three();
    let volume_id = volume_on(&cluster, "w1", "data", 2);
    let (status, updated) = cluster.call(
        Method::PUT,
        &format!("/v1/apps/fleet/volumes/{volume_id}"),
        Some(json!({"snapshot_retention": 9, "auto_backup_enabled": true})),
    );
    assert_eq!(status, 200, "{updated}");
    let id = create_on(
        &cluster,
        "w1",
        json!({"config": {"image": "demo/busybox:1", "init": {"cmd": ["sleep", "3600"]},
            "guest": {"cpus": 1, "memory_mb": 64}, "stop_config": {"signal": "SIGKILL"},
            "mounts": [{"volume": volume_id, "path": "/data"}]}}),
    );
    cluster.sh(&id, "echo precious > /data/kept");
    let (status, snapshot) = cluster.call(
        Method::POST,
        &format!("/v1/apps/fleet/volumes/{volume_id}/snapshots"),
        None,
    );
    assert_eq!(status, 200, "{snapshot}");
    let before = volume(&cluster, &volume_id);
    cluster.agent("w1").process.kill();
    cluster.wait_for("w1 to be unreachable", || {
        worker(&cluster, "w1").status == berth_api::WorkerStatus::Unreachable
    });
    let (status, body) = cluster.call(
        Method::POST,
        &format!("/v1/apps/fleet/machines/{id}/recreate"),
        Some(json!({})),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("state_would_be_lost")),
        "{body}"
    );
    let (status, body) = cluster.call(
        Method::POST,
        &format!("/v1/apps/fleet/machines/{id}/recreate"),
        Some(json!({"lose_state": true})),
    );
    assert_eq!(status, 200, "{body}\n{}", cluster.logs());
    let new_worker = body["worker"].as_str().expect("worker").to_owned();
    assert_ne!(new_worker, "w1");
    let after = volume(&cluster, &volume_id);
    assert_eq!(after["zone"], new_worker.as_str(), "{after}");
    for field in [
        "id",
        "name",
        "size_gb",
        "snapshot_retention",
        "auto_backup_enabled",
        "attached_machine_id",
    ] {
        assert_eq!(after[field], before[field], "{field}: {before} -> {after}");
    }
    let (status, snapshots) = cluster.call(
        Method::GET,
        &format!("/v1/apps/fleet/volumes/{volume_id}/snapshots"),
        None,
    );
    assert_eq!((status, snapshots.clone()), (200, json!([])), "{snapshots}");
    let (status, restored) = cluster.call(
        Method::POST,
        "/v1/apps/fleet/volumes",
        Some(json!({"name": "restored", "snapshot_id": snapshot["id"]})),
    );
    assert_eq!(
        (status, restored["error"].as_str()),
        (404, Some("snapshot_not_found")),
        "the snapshot was lost with w1: {restored}"
    );
    let lost: Vec<Value> = events(&cluster, &id)
        .into_iter()
        .filter(|event| {
            event["type"] == "recreate"
                && event["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .contains(&volume_id)
        })
        .collect();
    assert_eq!(lost.len(), 1, "an event says the volume's data was lost");
    start(&cluster, &id);
    assert_eq!(
        cluster.sh(&id, "ls -A /data | grep -v lost+found || true"),
        "",
        "made again empty"
    );
    cluster.sh(&id, "echo new > /data/kept");
    // w1 comes back with its copies of both: they go, and the new ones stay.
    restart_agent_and_wait(&mut cluster, "w1", &[]);
    cluster.wait_for("w1's stale copies to go", || {
        volume_holders(&cluster, &volume_id) == vec![new_worker.clone()]
            && !cluster.machine_dir("w1", &id).exists()
    });
    assert_eq!(cluster.sh(&id, "cat /data/kept"), "new\n");
    assert_eq!(volume(&cluster, &volume_id)["zone"], new_worker.as_str());
    cluster.assert_doctor_clean("after a recreate with a volume");
    cluster.teardown();
}

/// A lost worker's Machine and volumes can be forgotten by an admin (`lose_state`):
/// refused while the worker answers and without the flag (it cannot be reached), gone
/// from the index with it, and their copies removed when the worker comes back.
/// Before, a destroy or delete of them answered 503 for as long as the worker was gone.
#[test]
fn a_machine_and_volumes_on_a_lost_worker_are_forgotten_by_an_admin() {
    let mut cluster = three();
    let mounted = volume_on(&cluster, "w1", "mounted", 1);
    let loose = volume_on(&cluster, "w1", "loose", 1);
    let id = create_on(
        &cluster,
        "w1",
        json!({"config": {"image": "demo/busybox:1", "init": {"cmd": ["sleep", "3600"]},
            "guest": {"cpus": 1, "memory_mb": 64}, "stop_config": {"signal": "SIGKILL"},
            "mounts": [{"volume": mounted, "path": "/data"}]}}),
    );
    let destroy = |cluster: &Cluster, query: &str| {
        cluster.call(
            Method::DELETE,
            &format!("/v1/apps/fleet/machines/{id}{query}"),
            None,
        )
    };
    let delete = |cluster: &Cluster, volume: &str, query: &str| {
        cluster.call(
            Method::DELETE,
            &format!("/v1/apps/fleet/volumes/{volume}{query}"),
            None,
        )
    };
    // While w1 answers, lose_state is refused: a normal destroy does it.
    let (status, body) = destroy(&cluster, "?kill=true&lose_state=true");
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("worker_available")),
        "{body}"
    );
    cluster.agent("w1").process.kill();
    cluster.wait_for("w1 to be unreachable", || {
        worker(&cluster, "w1").status == berth_api::WorkerStatus::Unreachable
    });
    let (status, body) = destroy(&cluster, "?kill=true");
    assert_eq!(status, 503, "{body}");
    // Its volume is still held by it.
    let (status, body) = delete(&cluster, &mounted, "?lose_state=true");
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("volume_attached")),
        "{body}"
    );
    // The CLI's flag for the Machine, the API's for the volumes.
    let output = std::process::Command::new(common::BERTH)
        .args([
            "machine",
            "destroy",
            "--app",
            "fleet",
            &id,
            "--force",
            "--lose-state",
        ])
        .env("BERTH_API_URL", &cluster.api_url)
        .env("BERTH_TOKEN", &cluster.token)
        .output()
        .expect("berth");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (status, _) = cluster.call(Method::GET, &format!("/v1/apps/fleet/machines/{id}"), None);
    assert_eq!(status, 404);
    for volume in [&mounted, &loose] {
        let (status, body) = delete(&cluster, volume, "");
        assert_eq!(status, 503, "{body}");
        let (status, body) = delete(&cluster, volume, "?lose_state=true");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["state"], "destroyed", "{body}");
        let (status, _) = cluster.call(
            Method::GET,
            &format!("/v1/apps/fleet/volumes/{volume}"),
            None,
        );
        assert_eq!(status, 404);
    }
    // Back again: nothing of them stays on w1.
    restart_agent_and_wait(&mut cluster, "w1", &[]);
    cluster.wait_for("w1's forgotten copies to go", || {
        !cluster.machine_dir("w1", &id).exists()
            && volume_holders(&cluster, &mounted).is_empty()
            && volume_holders(&cluster, &loose).is_empty()
    });
    cluster.assert_doctor_clean("after forgetting a lost worker's Machine and volumes");
    cluster.teardown();
}

/// A volume no Machine holds leaves a drained worker on its own, with its data and its
/// snapshot, billed on one worker at a time; a volume that cannot move (no worker takes
/// it) is listed under `failed` with its code and the drain ends `incomplete`. Before,
/// a drain ended `drained` with both still on the worker.
#[test]
fn a_drain_moves_volumes_no_machine_holds_and_lists_one_that_cannot_move() {
    let cluster = three();
    let loose = volume_on(&cluster, "w1", "loose", 1);
    // Data on it, written by a Machine that is then destroyed.
    let writer = create_on(
        &cluster,
        "w1",
        json!({"config": {"image": "demo/busybox:1", "init": {"cmd": ["sleep", "3600"]},
            "guest": {"cpus": 1, "memory_mb": 64}, "stop_config": {"signal": "SIGKILL"},
            "mounts": [{"volume": loose, "path": "/data"}]}}),
    );
    cluster.sh(
        &writer,
        "echo precious > /data/kept && dd if=/dev/urandom of=/data/filler bs=1M count=8 2>/dev/null",
    );
    let digest = cluster.sh(&writer, "md5sum /data/kept /data/filler");
    let (status, body) = cluster.call(
        Method::DELETE,
        &format!("/v1/apps/fleet/machines/{writer}?kill=true"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let (status, snapshot) = cluster.call(
        Method::POST,
        &format!("/v1/apps/fleet/volumes/{loose}/snapshots"),
        None,
    );
    assert_eq!(status, 200, "{snapshot}");
    let before = volume(&cluster, &loose);

    let (status, body) = cluster.call(Method::POST, "/v1/workers/w1/drain", None);
    assert_eq!(status, 202, "{body}");
    let progress = wait_for_drain(&cluster, "w1");
    assert_eq!(progress.state, DrainState::Drained, "{progress:?}");
    assert_eq!(
        progress.volumes,
        berth_api::DrainVolumes {
            total: 1,
            left: 0,
            moving: 0,
            moved: 1
        },
        "{progress:?}"
    );
    assert!(progress.failed.is_empty(), "{progress:?}");
    let after = volume(&cluster, &loose);
    let dest = after["zone"].as_str().expect("zone").to_owned();
    assert_ne!(dest, "w1", "{after}");
    for field in ["id", "name", "size_gb", "created_at", "snapshot_retention"] {
        assert_eq!(after[field], before[field], "{field}: {before} -> {after}");
    }
    cluster.wait_for("w1 to keep no copy of the volume", || {
        volume_holders(&cluster, &loose) == vec![dest.clone()]
    });
    let (status, snapshots) = cluster.call(
        Method::GET,
        &format!("/v1/apps/fleet/volumes/{loose}/snapshots"),
        None,
    );
    assert_eq!(status, 200, "{snapshots}");
    assert_eq!(snapshots[0]["id"], snapshot["id"], "{snapshots}");
    cluster.wait_for("the volume's billing to move with it", || {
        let entries = ledger_of(&cluster, &loose);
        let at = |worker: &str, kind: &str| {
            entries
                .iter()
                .filter(|entry| entry.0 == worker && entry.1 == kind)
                .map(|entry| entry.2)
                .collect::<Vec<i64>>()
        };
        let (out, into) = (at("w1", "migrated_out"), at(&dest, "created"));
        out.len() == 1 && into == out
    });
    // Its files came along: a Machine on its new worker reads them.
    let reader = create_on(
        &cluster,
        &dest,
        json!({"config": {"image": "demo/busybox:1", "init": {"cmd": ["sleep", "3600"]},
            "guest": {"cpus": 1, "memory_mb": 64}, "stop_config": {"signal": "SIGKILL"},
            "mounts": [{"volume": loose, "path": "/data"}]}}),
    );
    assert_eq!(
        cluster.sh(&reader, "md5sum /data/kept /data/filler"),
        digest
    );

    // No worker takes it: listed under `failed` with its code, and it stays.
    cluster.cordon("w1", false);
    let stuck = volume_on(&cluster, "w1", "stuck", 1);
    for other in ["w2", "w3"] {
        cluster.cordon(other, true);
    }
    let (status, body) = cluster.call(Method::POST, "/v1/workers/w1/drain", None);
    assert_eq!(status, 202, "{body}");
    let progress = wait_for_drain(&cluster, "w1");
    assert_eq!(progress.state, DrainState::Incomplete, "{progress:?}");
    assert_eq!(progress.volumes.total, 1, "{progress:?}");
    assert_eq!(progress.failed.len(), 1, "{progress:?}");
    assert_eq!(progress.failed[0].volume.as_deref(), Some(stuck.as_str()));
    assert_eq!(progress.failed[0].error, "insufficient_capacity");
    let (_, shown) = cluster.call(Method::GET, "/v1/workers/w1", None);
    assert_eq!(
        shown["drain"]["failed"][0]["volume"],
        stuck.as_str(),
        "{shown}"
    );
    assert!(
        shown["drain"]["failed"][0].get("machine").is_none(),
        "{shown}"
    );
    assert_eq!(volume(&cluster, &stuck)["zone"], "w1");
    assert_eq!(volume_holders(&cluster, &stuck), vec!["w1".to_owned()]);
    cluster.assert_doctor_clean("after drains of volumes");
    cluster.teardown();
}

/// A lone volume's two files, read on `worker`'s host mount of it.
fn volume_files(cluster: &Cluster, worker: &str, id: &str) -> (Option<Vec<u8>>, Option<usize>) {
    let mut fs = cluster.volume_dir(worker, id).join("berth-volume-fs");
    // An encrypted volume's files are in its `data/`, readable while its key is added.
    if fs.join("data").is_dir() {
        fs.push("data");
    }
    (
        std::fs::read(fs.join("kept")).ok(),
        std::fs::read(fs.join("filler"))
            .ok()
            .map(|bytes| bytes.len()),
    )
}

fn wait_for_drain(cluster: &Cluster, name: &str) -> berth_api::DrainProgress {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let progress = worker(cluster, name).drain.expect("drain progress");
        if progress.state != DrainState::Draining {
            return progress;
        }
        assert!(
            Instant::now() < deadline,
            "{progress:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The crash matrix of a volume moving on its own (a drain's): each process killed at
/// each step, then started again. Afterwards the volume exists exactly once, where the
/// index says, with its files. After the cutover it is on the destination; before it,
/// the move rolls back, unless a step sent again to the restarted worker (or the drain
/// taken over by the restarted control plane) finished it.
#[cfg(feature = "failpoints")]
#[test]
fn a_lone_volume_move_killed_at_any_step_leaves_the_volume_exactly_once() {
    let mut cluster = Cluster::with_fleet(&[("w1", 64, 65536), ("w2", 64, 65536)]);
    let volume_id = volume_on(&cluster, "w1", "loose", 1);
    let writer = create_on(
        &cluster,
        "w1",
        json!({"config": {"image": "demo/busybox:1", "init": {"cmd": ["sleep", "3600"]},
            "guest": {"cpus": 1, "memory_mb": 64}, "stop_config": {"signal": "SIGKILL"},
            "mounts": [{"volume": volume_id, "path": "/data"}]}}),
    );
    cluster.sh(
        &writer,
        "echo precious > /data/kept && dd if=/dev/urandom of=/data/filler bs=1M count=8 2>/dev/null",
    );
    let (status, body) = cluster.call(
        Method::DELETE,
        &format!("/v1/apps/fleet/machines/{writer}?kill=true"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let expected_files = volume_files(&cluster, "w1", &volume_id);
    assert_eq!(expected_files.0.as_deref(), Some(&b"precious\n"[..]));
    let points = [
        ("source", "migrate.after_begin", false),
        ("source", "migrate.source_volume_mid_stream", false),
        ("dest", "migrate.dest_volume_mid_stream", false),
        ("dest", "migrate.after_receive", false),
        ("control", "migrate.before_cutover", false),
        ("control", "migrate.after_cutover", true),
        ("dest", "migrate.after_commit_volumes", true),
        ("source", "migrate.after_source_volume_remove", true),
    ];
    for (who, point, forward) in points {
        let source = volume(&cluster, &volume_id)["zone"]
            .as_str()
            .expect("zone")
            .to_owned();
        let dest = if source == "w1" { "w2" } else { "w1" };
        let env = [("BERTH_FAILPOINTS", point)];
        match who {
            "source" => restart_agent_and_wait(&mut cluster, &source, &env),
            "dest" => restart_agent_and_wait(&mut cluster, dest, &env),
            _ => cluster.restart_server_with_env(&env),
        }
        cluster.wait_for("every worker to be ready", || {
            cluster
                .workers()
                .iter()
                .all(|worker| worker.status == berth_api::WorkerStatus::Ready)
        });
        let _ = cluster.call(Method::POST, &format!("/v1/workers/{source}/drain"), None);
        // The process dies at its failpoint once the drain reaches it.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let process = match who {
                "source" => &mut cluster.agent(&source).process,
                "dest" => &mut cluster.agent(dest).process,
                _ => &mut cluster.server,
            };
            let exited = process
                .child
                .as_mut()
                .is_some_and(|child| child.try_wait().ok().flatten().is_some());
            if exited {
                break;
            }
            assert!(Instant::now() < deadline, "{point} was never reached");
            std::thread::sleep(Duration::from_millis(100));
        }
        match who {
            "source" => restart_agent_and_wait(&mut cluster, &source, &[]),
            "dest" => restart_agent_and_wait(&mut cluster, dest, &[]),
            _ => cluster.restart_server(),
        }
        cluster.wait_for(&format!("the move killed at {point} to settle"), || {
            let (status, listed) = cluster.call(
                Method::GET,
                &format!("/v1/apps/fleet/volumes/{volume_id}"),
                None,
            );
            let Some(zone) = listed["zone"].as_str() else {
                return false;
            };
            status == 200
                && (zone == dest || !forward)
                && volume_holders(&cluster, &volume_id) == vec![zone.to_owned()]
                && volume_files(&cluster, zone, &volume_id) == expected_files
                && worker(&cluster, &source)
                    .drain
                    .is_some_and(|drain| drain.state != DrainState::Draining)
        });
        eprintln!(
            "{point}: from {source}, settled on {}",
            volume(&cluster, &volume_id)["zone"]
        );
        for name in ["w1", "w2"] {
            cluster.cordon(name, false);
        }
        cluster.assert_doctor_clean(&format!("after a volume's move killed at {point}"));
    }
    cluster.teardown();
}

/// A volume Machine made before mount points were made the Machine's own: its writable
/// layer holds the mount point as host root's (laid out here as the old runtime did).
/// It moves, its volume's files with it, and the mount point arrives as the Machine's
/// root's. Before, the move failed 502 `unsupported_entry`.
#[test]
fn a_volume_machine_with_an_old_host_root_mount_point_moves() {
    let cluster = three();
    let volume_id = volume_on(&cluster, "w1", "data", 1);
    let id = create_on(
        &cluster,
        "w1",
        json!({"config": {"image": "demo/busybox:1", "init": {"cmd": ["sleep", "3600"]},
            "guest": {"cpus": 1, "memory_mb": 64}, "stop_config": {"signal": "SIGKILL"},
            "mounts": [{"volume": volume_id, "path": "/srv/data"}]}}),
    );
    cluster.sh(&id, "echo precious > /srv/data/kept");
    stop(&cluster, &id);
    let upper = |worker: &str| {
        let dir = cluster.machine_dir(worker, &id);
        MachineLayout::new(dir.parent().expect("machines dir"), &id).upper()
    };
    for made in ["srv", "srv/data"] {
        std::os::unix::fs::lchown(upper("w1").join(made), Some(0), Some(0)).expect("chown");
    }
    let (status, answer) = migrate(&cluster, &id, Some("w2"));
    assert_eq!(status, 200, "{answer}\n{}", cluster.logs());
    let dir = cluster.machine_dir("w2", &id);
    let base = berth_runtime::spec::machine_id_range(&MachineLayout::new(
        dir.parent().expect("machines dir"),
        &id,
    ))
    .expect("id range")
    .base;
    for made in ["srv", "srv/data"] {
        let meta = std::fs::symlink_metadata(upper("w2").join(made)).expect("moved");
        assert_eq!((meta.uid(), meta.gid()), (base, base), "{made}");
    }
    start(&cluster, &id);
    assert_eq!(cluster.sh(&id, "cat /srv/data/kept"), "precious\n");
    cluster.assert_doctor_clean("after moving an older volume Machine");
    cluster.teardown();
}

/// The downtime of a running Machine whose 1 GB volume is nearly full, rewriting 1 MB of
/// it every 200 ms throughout the move. A measurement:
/// `cargo test -p berth --test migrate -- --ignored downtime_with_a_full_volume --nocapture`.
#[test]
#[ignore = "a measurement: writes 900 MB"]
fn downtime_with_a_full_volume() {
    let cluster = three();
    let volume_id = volume_on(&cluster, "w1", "full", 1);
    let id = create_on(
        &cluster,
        "w1",
        json!({"config": {"image": "demo/busybox:1",
            "init": {"cmd": ["sh", "-c", "while true; do dd if=/dev/urandom of=/data/churn bs=64k count=16 conv=notrunc 2>/dev/null; sleep 0.2; done"]},
            "guest": {"cpus": 1, "memory_mb": 64}, "stop_config": {"signal": "SIGKILL"},
            "mounts": [{"volume": volume_id, "path": "/data"}]}}),
    );
    cluster.sh(
        &id,
        "dd if=/dev/urandom of=/data/fill bs=1M count=900 2>/dev/null && sync",
    );
    let mut downtimes = Vec::new();
    for to in ["w2", "w3", "w1"] {
        let (status, answer) = migrate(&cluster, &id, Some(to));
        assert_eq!(status, 200, "{answer}\n{}", cluster.logs());
        let answer: MigrateMachineResponse = serde_json::from_value(answer).expect("answer");
        eprintln!(
            "to {to}: down {:?} ms, {} passes, {} MB moved, {} ms in all",
            answer.downtime_ms,
            answer.passes,
            answer.bytes_moved >> 20,
            answer.duration_ms
        );
        downtimes.push(answer.downtime_ms.expect("downtime"));
    }
    downtimes.sort_unstable();
    eprintln!(
        "downtime with a full 1 GB volume, 1 MB rewritten every 200 ms: p50 {} ms",
        downtimes[1]
    );
    cluster.sh(&id, "rm /data/fill");
    cluster.teardown();
}

/// Pushes busybox to `registry` as `repository:1`; answers the reference.
fn push_busybox(registry: &berth_testkit::Registry, repository: &str) -> String {
    let target = berth_testkit::PushTarget::anonymous(&registry.host());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(berth_testkit::push_image(
            &target,
            repository,
            "1",
            common::busybox_image(),
        ))
        .expect("push");
    format!("{}/{repository}:1", registry.host())
}

/// The destination already holds the image's layers (another Machine of it runs there):
/// the move needs no registry. Moved to a worker without them, the same Machine is
/// refused with `registry_unreachable` and stays whole, which shows the registry was
/// really gone.
#[test]
fn a_move_needs_no_registry_when_the_destination_has_the_layers() {
    let mut registry = berth_testkit::Registry::start().expect("registry");
    let reference = push_busybox(&registry, "team/app");
    let cluster = three();
    let image = json!({"config": {"image": reference, "init": {"cmd": ["sleep", "3600"]},
        "guest": {"cpus": 1, "memory_mb": 64}, "stop_config": {"signal": "SIGKILL"}}});
    let id = create_on(&cluster, "w1", image.clone());
    let _neighbour = create_on(&cluster, "w2", image);
    cluster.sh(&id, "echo kept > /kept");
    stop(&cluster, &id);
    let digest = upper_digest(&cluster, "w1", &id);
    registry.kill();

    let (status, body) = migrate(&cluster, &id, Some("w3"));
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("registry_unreachable")),
        "{body}"
    );
    assert_eq!(cluster.machine(&id).worker.as_deref(), Some("w1"));
    assert!(!cluster.machine_dir("w3", &id).exists(), "w3 keeps nothing");

    let (status, body) = migrate(&cluster, &id, Some("w2"));
    assert_eq!(status, 200, "{body}\n{}", cluster.logs());
    assert_eq!(body["machine"]["worker"], "w2");
    assert_eq!(upper_digest(&cluster, "w2", &id), digest);
    start(&cluster, &id);
    assert_eq!(cluster.sh(&id, "cat /kept"), "kept\n");
    cluster.assert_doctor_clean("after a move with the registry down");
    cluster.teardown();
}
