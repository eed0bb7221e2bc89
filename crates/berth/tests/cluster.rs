//! Many workers, end to end: one `berth server` and three `berth agent` processes from the
//! built binary, each with its own data dir and capacity.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use berth_api::{DoctorReport, Machine, MachineState, MachineWorkerStatus, WorkerStatus};
use common::cluster::{sleeper, Cluster};
use common::BERTH;
use reqwest::Method;
use serde_json::{json, Value};

#[test]
fn placement_pinning_capacity_and_failures_across_processes() {
    let mut cluster = Cluster::with_fleet(&[("w1", 4, 4096), ("w2", 4, 4096), ("w3", 4, 4096)]);

    // Twenty creates spread across the workers (each agent pulls the image from the
    // control plane's registry).
    let mut machines = Vec::new();
    for _ in 0..20 {
        let (status, body) = cluster.create(sleeper(json!({"skip_launch": true})));
        assert_eq!(status, 200, "{body}\n{}", cluster.logs());
        machines.push(serde_json::from_value::<Machine>(body).expect("machine"));
    }
    for name in ["w1", "w2", "w3"] {
        let count = machines
            .iter()
            .filter(|machine| machine.worker.as_deref() == Some(name))
            .count();
        assert!(
            count >= 3,
            "spread placement gave {name} only {count} of 20"
        );
    }

    // Stop/start cycles keep every pin.
    for machine in machines
        .iter()
        .filter(|machine| machine.worker.as_deref() != Some("w3"))
        .take(6)
    {
        for _ in 0..2 {
            let (status, body) = cluster.call(
                Method::POST,
                &format!("/v1/apps/fleet/machines/{}/start", machine.id),
                None,
            );
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["machine"]["worker"], json!(machine.worker));
            let (status, body) = cluster.call(
                Method::POST,
                &format!("/v1/apps/fleet/machines/{}/stop", machine.id),
                None,
            );
            assert_eq!(status, 200, "{body}");
        }
    }

    // A cordoned worker takes no new Machines: with w1 and w2 cordoned, creates land on w3.
    for name in ["w1", "w2"] {
        let (status, body) =
            cluster.call(Method::POST, &format!("/v1/workers/{name}/cordon"), None);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["cordoned"], true);
    }
    let mut on_w3 = Vec::new();
    for _ in 0..3 {
        let (status, body) = cluster.create(sleeper(json!({"skip_launch": true,
            "config": {"image": "demo/busybox:1", "init": {"cmd": ["sleep", "3600"]},
                       "guest": {"cpus": 2, "memory_mb": 64}, "stop_config": {"signal": "SIGKILL"}}})));
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["worker"], "w3",
            "cordoned workers take no new machines: {body}"
        );
        on_w3.push(serde_json::from_value::<Machine>(body).expect("machine"));
    }
    // w3 has 4 CPUs: two 2-CPU Machines fill it, and a third pinned there cannot start.
    for machine in &on_w3[..2] {
        let (status, body) = cluster.call(
            Method::POST,
            &format!("/v1/apps/fleet/machines/{}/start", machine.id),
            None,
        );
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = cluster.call(
        Method::POST,
        &format!("/v1/apps/fleet/machines/{}/start", on_w3[2].id),
        None,
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "insufficient_capacity");
    assert_eq!(body["worker"], "w3", "{body}");
    assert_eq!(body["missing"], json!(["cpus"]), "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|message| message.contains("w3")),
        "{body}"
    );
    assert!(body["retry_after_ms"].is_u64(), "{body}");

    // Start never places again: w1 is cordoned, yet a Machine pinned there starts there.
    let pinned_to_w1 = machines
        .iter()
        .find(|machine| machine.worker.as_deref() == Some("w1"))
        .cloned()
        .expect("one on w1");
    let (status, body) = cluster.call(
        Method::POST,
        &format!("/v1/apps/fleet/machines/{}/start", pinned_to_w1.id),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["machine"]["worker"], "w1");
    for name in ["w1", "w2"] {
        cluster.call(Method::POST, &format!("/v1/workers/{name}/uncordon"), None);
    }

    // A killed agent: its Machines answer worker_unavailable and show as unreachable;
    // others are unaffected; after a restart they come back, still pinned and running.
    let running_on_w3 = on_w3[0].id.clone();
    cluster.agent("w3").process.kill();
    let (status, body) = cluster.call(
        Method::POST,
        &format!("/v1/apps/fleet/machines/{running_on_w3}/stop"),
        None,
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "worker_unavailable");
    assert_eq!(body["worker"], "w3", "{body}");
    let seen = cluster.machine(&running_on_w3);
    assert_eq!(seen.worker_status, Some(MachineWorkerStatus::Unreachable));
    assert_eq!(seen.state, MachineState::Started, "the last known state");
    let (status, body) = cluster.call(
        Method::GET,
        &format!("/v1/apps/fleet/machines/{}", pinned_to_w1.id),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["worker_status"], "ok");
    cluster.wait_for("w3 to be marked unreachable", || {
        cluster
            .workers()
            .iter()
            .any(|worker| worker.name == "w3" && worker.status == WorkerStatus::Unreachable)
    });
    // The doctor still checks the other workers, and fails for the one it could not.
    let doctor = Command::new(BERTH)
        .args(["doctor", "--json"])
        .env("BERTH_API_URL", &cluster.api_url)
        .env("BERTH_TOKEN", &cluster.token)
        .output()
        .expect("doctor");
    let stderr = String::from_utf8_lossy(&doctor.stderr);
    assert!(!doctor.status.success(), "doctor passed with w3 down");
    assert!(stderr.contains("worker w3: not checked"), "{stderr}");
    let reports: Vec<DoctorReport> = serde_json::from_slice(&doctor.stdout).expect("reports");
    let mut checked: Vec<&str> = reports
        .iter()
        .map(|report| report.worker.as_str())
        .collect();
    checked.sort_unstable();
    assert_eq!(checked, ["w1", "w2"], "{stderr}");
    assert!(
        reports.iter().all(|report| report.findings.is_empty()),
        "{reports:#?}"
    );
    cluster.restart_agent("w3");
    cluster.wait_for("w3 to be ready again", || {
        cluster
            .workers()
            .iter()
            .any(|worker| worker.name == "w3" && worker.status == WorkerStatus::Ready)
    });
    cluster.wait_for("the control plane to reach w3's machines again", || {
        cluster.machine(&running_on_w3).worker_status == Some(MachineWorkerStatus::Ok)
    });
    let back = cluster.machine(&running_on_w3);
    assert_eq!(
        (back.state, back.worker.as_deref()),
        (MachineState::Started, Some("w3")),
        "still pinned and still running after the agent restarted"
    );
    let (status, body) = cluster.call(
        Method::POST,
        &format!("/v1/apps/fleet/machines/{running_on_w3}/stop"),
        None,
    );
    assert_eq!(status, 200, "{body}");

    // A remote Machine that exits by itself: the agent's notice reaches the control plane
    // (over the restarted agent's new notice stream), so wait returns without polling.
    let (status, body) = cluster.create(json!({"config": {"image": "demo/busybox:1",
        "init": {"cmd": ["sh", "-c", "sleep 1; exit 3"]}, "restart": {"policy": "no"},
        "guest": {"cpus": 1, "memory_mb": 64}}}));
    assert_eq!(status, 200, "{body}");
    let exits = body["id"].as_str().expect("id").to_owned();
    let (status, body) = cluster.call(
        Method::GET,
        &format!("/v1/apps/fleet/machines/{exits}/wait?state=stopped&timeout=30"),
        None,
    );
    assert_eq!(status, 200, "{body}\n{}", cluster.logs());
    assert_eq!(body["ok"], true, "{body}");
    let (status, body) = cluster.call(
        Method::GET,
        &format!("/v1/apps/fleet/machines/{exits}/events"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        body.to_string().contains("\"exit_code\":3"),
        "the exit is recorded: {body}"
    );
    cluster.teardown();
}

/// One client's keyed creates, retried with the same key across connection failures and
/// 5xx answers (the control plane may be dead or just restarted). Answers the ids.
fn keyed_creates(api_url: &str, token: &str, client: usize, count: usize) -> Vec<String> {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let mut ids = Vec::new();
    for n in 0..count {
        let key = format!("client-{client}-create-{n}");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            assert!(Instant::now() < deadline, "create {key} never succeeded");
            let response = http
                .post(format!("{api_url}/v1/apps/fleet/machines"))
                .bearer_auth(token)
                .header("Idempotency-Key", &key)
                .json(&sleeper(json!({})))
                .send();
            match response {
                Ok(response) if response.status().is_success() => {
                    let machine: Machine = response.json().expect("machine");
                    assert_eq!(machine.state, MachineState::Started, "{key}: {machine:?}");
                    ids.push(machine.id);
                    break;
                }
                // Every refusal is a clean JSON error; only these are worth retrying.
                Ok(response) => {
                    let status = response.status().as_u16();
                    let body: Value = response.json().expect("a JSON error body");
                    assert!(body["error"].is_string(), "{status} {body}");
                    assert!(
                        status >= 500 || status == 409 || status == 429,
                        "{key}: {status} {body}"
                    );
                }
                Err(_) => {}
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    ids
}

#[test]
fn a_control_plane_killed_alone_mid_creates_recovers_one_view_with_its_agents() {
    let mut cluster = Cluster::with_fleet(&[("w1", 64, 65536), ("w2", 64, 65536)]);

    // Three clients create (and so start) Machines while the control plane is SIGKILLed
    // twice and restarted on the same data dir; the agents keep running throughout.
    let clients: Vec<_> = (0..3)
        .map(|client| {
            let (api_url, token) = (cluster.api_url.clone(), cluster.token.clone());
            std::thread::spawn(move || keyed_creates(&api_url, &token, client, 5))
        })
        .collect();
    for pause in [600, 900] {
        std::thread::sleep(Duration::from_millis(pause));
        cluster.restart_server();
    }
    let mut created: Vec<String> = clients
        .into_iter()
        .flat_map(|client| client.join().expect("client thread"))
        .collect();
    created.sort();
    let before = created.len();
    created.dedup();
    assert_eq!(created.len(), before, "two keys answered one Machine");
    assert_eq!(created.len(), 15);

    // Nothing was created twice, and the control plane's view is every agent's view.
    let (status, body) = cluster.call(Method::GET, "/v1/apps/fleet/machines", None);
    assert_eq!(status, 200, "{body}");
    let listed: Vec<Machine> = serde_json::from_value(body).expect("machines");
    let mut listed_ids: Vec<String> = listed.iter().map(|machine| machine.id.clone()).collect();
    listed_ids.sort();
    assert_eq!(
        listed_ids, created,
        "the API lists exactly what the clients created"
    );
    let mut on_agents = Vec::new();
    for agent in &cluster.agents {
        let listen = agent
            .args
            .iter()
            .skip_while(|arg| *arg != "--listen")
            .nth(1)
            .expect("the agent's --listen");
        let machines: Vec<Machine> = cluster
            .http
            .get(format!("http://{listen}/agent/v1/machines?app=fleet"))
            .bearer_auth(&cluster.join_token)
            .send()
            .expect("ask the agent")
            .json()
            .expect("the agent's machines");
        for machine in machines {
            let seen = listed
                .iter()
                .find(|listed| listed.id == machine.id)
                .unwrap_or_else(|| {
                    panic!("{} is on {} but not in the API", machine.id, agent.name)
                });
            assert_eq!(seen.worker.as_deref(), Some(agent.name.as_str()));
            assert_eq!(seen.state, machine.state, "{}", machine.id);
            on_agents.push(machine.id);
        }
    }
    on_agents.sort();
    assert_eq!(on_agents, created, "every agent's Machines, and only those");
    let doctor = Command::new(BERTH)
        .arg("doctor")
        .env("BERTH_API_URL", &cluster.api_url)
        .env("BERTH_TOKEN", &cluster.token)
        .output()
        .expect("doctor");
    assert!(
        doctor.status.success(),
        "doctor: {}{}",
        String::from_utf8_lossy(&doctor.stdout),
        String::from_utf8_lossy(&doctor.stderr)
    );
    cluster.teardown();
}

/// Fly's standbys across processes: a standby is placed on another worker than the Machine
/// it stands by for (spread alone would put it on the same one); it is left alone while
/// that worker answers, however long; and once the worker's agent is killed, the control
/// plane starts it on the other worker within `--standby-after-secs` and a few seconds,
/// with an event that says it was started as a standby.
#[test]
fn a_standby_starts_on_another_worker_when_its_machines_worker_stays_unreachable() {
    const AFTER_SECS: u64 = 10;
    let mut cluster = Cluster::with_fleet(&[("w1", 4, 4096), ("w2", 4, 4096)]);
    cluster
        .server_args
        .extend(["--standby-after-secs".to_owned(), AFTER_SECS.to_string()]);
    cluster.restart_server();
    cluster.wait_for("every worker to be ready again", || {
        cluster
            .workers()
            .iter()
            .all(|worker| worker.status == WorkerStatus::Ready)
    });

    let (status, body) = cluster.create(sleeper(json!({})));
    assert_eq!(status, 200, "{body}");
    let primary: Machine = serde_json::from_value(body).expect("machine");
    let primary_worker = primary.worker.clone().expect("worker");
    // Fill the other worker more, so that spread alone would put the standby (and the
    // Machine below) beside the primary. Placement counts a create that just ended twice
    // until a heartbeat a second later confirms it (conservative), so the sizes hold
    // whichever Machines are counted twice: the other worker is always the fuller one,
    // and it has room for the standby even with the filler counted twice (with 2 CPUs it
    // had none, and the standby went beside its primary).
    let mut filler = sleeper(json!({}));
    filler["config"]["guest"] = json!({"cpus": 1, "memory_mb": 1536});
    let (status, body) = cluster.create(filler);
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["worker"], primary_worker.as_str(), "{body}");

    let mut standby = sleeper(json!({"skip_launch": true}));
    standby["config"]["standbys"] = json!([primary.id]);
    let (status, body) = cluster.create(standby);
    assert_eq!(status, 200, "{body}");
    let standby: Machine = serde_json::from_value(body).expect("machine");
    let standby_worker = standby.worker.clone().expect("worker");
    assert_ne!(standby_worker, primary_worker, "placed beside its primary");
    assert_ne!(standby.state, MachineState::Started);

    // A Machine on the same worker that exited by itself before the worker went away:
    // its standby is left alone.
    let mut exits = sleeper(json!({}));
    exits["config"]["init"] = json!({"cmd": ["sh", "-c", "sleep 1"]});
    exits["config"]["restart"] = json!({"policy": "no"});
    let (status, body) = cluster.create(exits);
    assert_eq!(status, 200, "{body}");
    let exited: Machine = serde_json::from_value(body).expect("machine");
    assert_eq!(exited.worker.as_deref(), Some(primary_worker.as_str()));
    let mut idle = sleeper(json!({"skip_launch": true}));
    idle["config"]["standbys"] = json!([exited.id]);
    let (status, body) = cluster.create(idle);
    assert_eq!(status, 200, "{body}");
    let idle: Machine = serde_json::from_value(body).expect("machine");
    cluster.wait_for("the Machine to exit by itself", || {
        cluster.machine(&exited.id).state == MachineState::Stopped
    });

    // Control: the primary's worker answers for longer than the delay: nothing starts.
    std::thread::sleep(Duration::from_secs(AFTER_SECS + 3));
    assert_ne!(
        cluster.machine(&standby.id).state,
        MachineState::Started,
        "a standby started while its primary's worker answered\n{}",
        cluster.logs()
    );

    cluster.agent(&primary_worker).process.kill();
    let killed = Instant::now();
    let bound = Duration::from_secs(AFTER_SECS + 8);
    while cluster.machine(&standby.id).state != MachineState::Started {
        assert!(
            killed.elapsed() < bound,
            "the standby did not start within {bound:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "standby started {:?} after the primary's agent was killed",
        killed.elapsed()
    );
    assert_eq!(
        cluster.machine(&standby.id).worker.as_deref(),
        Some(standby_worker.as_str())
    );
    let (status, events) = cluster.call(
        Method::GET,
        &format!("/v1/apps/fleet/machines/{}/events", standby.id),
        None,
    );
    assert_eq!(status, 200, "{events}");
    let started: Vec<&Value> = events
        .as_array()
        .expect("events")
        .iter()
        .filter(|event| event["type"] == "start")
        .collect();
    assert_eq!(started.len(), 1, "started once: {events}");
    assert_eq!(started[0]["berth_source"], "standby", "{events}");
    assert_eq!(started[0]["source"], "flyd", "{events}");
    // A look or two later, the other standby is still not started.
    std::thread::sleep(Duration::from_secs(3));
    assert_ne!(
        cluster.machine(&idle.id).state,
        MachineState::Started,
        "the standby of a Machine that had exited started"
    );

    cluster.restart_agent(&primary_worker);
    cluster.wait_for("the primary's worker to be ready again", || {
        cluster
            .workers()
            .iter()
            .all(|worker| worker.status == WorkerStatus::Ready)
    });
    cluster.teardown();
}
