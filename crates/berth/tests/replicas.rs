//! Two `berth server` replicas on one PostgreSQL and two agents, end to end: either
//! replica serves what the other began, a replica killed mid-loop loses and doubles
//! nothing, a wait held on one sees a change made through the other, and a PostgreSQL
//! restart answers `store_unavailable` in the gap and heals by itself.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::sleeper;
use common::replicas::{Replicas, Reply};

/// How long into the fourth create replica A is killed: a create (placement, the
/// worker's copy of the image) takes longer than this.
const KILL_AFTER_MS: u64 = 15;
use reqwest::Method;
use serde_json::json;

/// The wait crosses replicas because every replica follows every worker's notices and
/// wakes its waiters from them; checked by not waking waiters from notices (the wait on A
/// answered 408 at its timeout).
#[test]
fn what_one_replica_made_the_other_gets_starts_and_stops_and_waits_cross() {
    let replicas = Replicas::start(&["w1", "w2"]);
    let (a, b) = (replicas.a.url.clone(), replicas.b.url.clone());
    let (status, made) = replicas.call(
        &a,
        Method::POST,
        "/v1/apps/fleet/machines",
        Some(sleeper(json!({"skip_launch": true}))),
    );
    assert_eq!(status, 200, "{made}\n{}", replicas.logs());
    let id = made["id"].as_str().expect("id").to_owned();
    let path = format!("/v1/apps/fleet/machines/{id}");
    let (status, got) = replicas.call(&b, Method::GET, &path, None);
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["id"], made["id"]);
    let (status, body) = replicas.call(&b, Method::POST, &format!("{path}/start"), None);
    assert_eq!(status, 200, "{body}\n{}", replicas.logs());
    let (status, body) = replicas.call(&a, Method::GET, &path, None);
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("started")),
        "{body}"
    );

    // A wait held on A, for the stop that goes through B.
    let waiting = std::thread::spawn({
        let http = replicas.http.clone();
        let token = replicas.token.clone();
        let url = format!("{a}{path}/wait?state=stopped&timeout=30");
        move || {
            let began = Instant::now();
            let response = http.get(url).bearer_auth(token).send().expect("wait");
            (response.status().as_u16(), began.elapsed())
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let (status, body) = replicas.call(&b, Method::POST, &format!("{path}/stop"), None);
    assert_eq!(status, 200, "{body}");
    let (status, waited) = waiting.join().expect("waiter");
    assert_eq!(status, 200, "the wait on A saw the stop through B");
    assert!(waited < Duration::from_secs(20), "{waited:?}");
    let (status, body) = replicas.call(&a, Method::GET, &path, None);
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("stopped")),
        "{body}"
    );
    replicas.teardown();
}

/// Sends a keyed call through `first`, then `second`, until a final answer: no answer
/// (the replica is dead), 409 `idempotency_key_in_use` (its claim waits for the dead
/// replica to age out) and 503 are retried.
/// Counts what the retries met.
#[derive(Default)]
struct Met {
    /// Calls A died in the middle of (no answer).
    cut_off: usize,
    /// `idempotency_key_in_use` answers: a claim of the dead replica not yet taken over.
    in_use: usize,
}

#[allow(clippy::too_many_arguments)]
fn keyed(
    replicas: &Replicas,
    urls: &[&str; 2],
    dead: &AtomicBool,
    met: &mut Met,
    method: Method,
    path: &str,
    key: &str,
    body: Option<serde_json::Value>,
) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let base = if dead.load(Ordering::SeqCst) {
            urls[1]
        } else {
            urls[0]
        };
        let reply = replicas.send(
            base,
            method.clone(),
            path,
            &[("Idempotency-Key", key)],
            body.clone(),
        );
        let last = format!("{reply:?}");
        match reply {
            Ok(reply) if reply.status == 409 && reply.body["error"] == "idempotency_key_in_use" => {
                met.in_use += 1;
            }
            Ok(reply) if reply.status == 503 => {}
            Ok(reply) => return reply,
            Err(_) => met.cut_off += 1,
        }
        assert!(
            Instant::now() < deadline,
            "{key}: no final answer; the last: {last}\n{}",
            replicas.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A is killed a few milliseconds into a keyed create, so that the create's claim is in
/// flight on A when it dies. Checked against the code before the change: that claim
/// stayed `idempotency_key_in_use` on B (no restart marks it abandoned), and the loop
/// timed out.
#[test]
fn a_replica_killed_mid_loop_loses_and_doubles_nothing() {
    let mut replicas = Replicas::start(&["w1", "w2"]);
    let urls = [replicas.a.url.clone(), replicas.b.url.clone()];
    let urls = [urls[0].as_str(), urls[1].as_str()];
    let dead = Arc::new(AtomicBool::new(false));
    let sending = Arc::new(AtomicBool::new(false));
    // Kill -9 of A a moment into the fourth create.
    let mut a = std::mem::replace(
        &mut replicas.a.process,
        common::cluster::Process {
            child: None,
            log: replicas.dir.path().join("server-a.log"),
        },
    );
    let killer = std::thread::spawn({
        let dead = dead.clone();
        let sending = sending.clone();
        move || {
            while !sending.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(KILL_AFTER_MS));
            a.kill();
            dead.store(true, Ordering::SeqCst);
        }
    });
    let mut firsts: BTreeMap<String, Reply> = BTreeMap::new();
    let mut ids = BTreeSet::new();
    let mut met = Met::default();
    // Each worker pulls the image once, from A's registry (the agents' image source is
    // their first control URL), so that creates after A's death, naming it by digest,
    // find it locally.
    let mut warm = BTreeSet::new();
    let mut digest = String::new();
    for _ in 0..2 {
        let (status, body) = replicas.call(
            urls[0],
            Method::POST,
            "/v1/apps/fleet/machines",
            Some(sleeper(json!({"skip_launch": true}))),
        );
        assert_eq!(status, 200, "{body}");
        ids.insert(body["id"].as_str().expect("id").to_owned());
        warm.insert(body["worker"].as_str().expect("worker").to_owned());
        digest = body["image_ref"]["digest"]
            .as_str()
            .expect("digest")
            .to_owned();
    }
    let mut create = sleeper(json!({"skip_launch": true}));
    create["config"]["image"] = json!(format!("demo/busybox@{digest}"));
    assert_eq!(warm.len(), 2, "placement spread the two over both workers");
    for round in 0..8 {
        let create_key = format!("create-{round}");
        if round == 3 {
            sending.store(true, Ordering::SeqCst);
        }
        let made = keyed(
            &replicas,
            &urls,
            &dead,
            &mut met,
            Method::POST,
            "/v1/apps/fleet/machines",
            &create_key,
            Some(create.clone()),
        );
        assert_eq!(made.status, 200, "{}\n{}", made.body, replicas.logs());
        let id = made.body["id"].as_str().expect("id").to_owned();
        ids.insert(id.clone());
        firsts.insert(create_key, made);
        let start_key = format!("start-{round}");
        let path = format!("/v1/apps/fleet/machines/{id}/start");
        let started = keyed(
            &replicas,
            &urls,
            &dead,
            &mut met,
            Method::POST,
            &path,
            &start_key,
            None,
        );
        assert_eq!(started.status, 200, "{}\n{}", started.body, replicas.logs());
        firsts.insert(start_key, started);
    }
    killer.join().expect("killer");
    assert!(dead.load(Ordering::SeqCst));
    // The kill cut a call off, and its claim was taken over once A aged out.
    assert_eq!(met.cut_off, 1, "A died with one call in flight");
    assert!(met.in_use > 0, "B waited for A's claim");
    // Every retry through B gets the first answer.
    for (key, first) in &firsts {
        let path = if key.starts_with("create-") {
            "/v1/apps/fleet/machines".to_owned()
        } else {
            let round: usize = key["start-".len()..].parse().expect("round");
            let id = firsts[&format!("create-{round}")].body["id"]
                .as_str()
                .expect("id")
                .to_owned();
            format!("/v1/apps/fleet/machines/{id}/start")
        };
        let body = key.starts_with("create-").then(|| create.clone());
        let again = replicas
            .send(
                urls[1],
                Method::POST,
                &path,
                &[("Idempotency-Key", key)],
                body,
            )
            .expect("retry through B");
        assert!(again.replayed, "{key}: not a replay: {}", again.body);
        assert_eq!(
            (again.status, &again.body),
            (first.status, &first.body),
            "{key}"
        );
    }
    // Exactly the Machines the loop made, each once, all started.
    let (status, listed) = replicas.call(urls[1], Method::GET, "/v1/apps/fleet/machines", None);
    assert_eq!(status, 200, "{listed}");
    let listed = listed.as_array().cloned().unwrap_or_default();
    let listed_ids: BTreeSet<String> = listed
        .iter()
        .filter_map(|machine| machine["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(listed.len(), ids.len(), "a Machine was doubled: {listed:?}");
    assert_eq!(listed_ids, ids);
    for machine in &listed {
        let id = machine["id"].as_str().unwrap_or_default();
        let started = firsts
            .values()
            .any(|reply| reply.body["id"] == id || reply.body["machine"]["id"] == id);
        if started {
            assert_eq!(machine["state"], "started", "{machine}");
        }
    }
    replicas.assert_doctor_clean(urls[1], "after a replica was killed mid-loop");
    replicas.teardown();
}

/// Requests while PostgreSQL is down answer 503 `store_unavailable` within a bounded
/// time, never 500 and never a hang, and both replicas serve again by themselves once it
/// is back. Checked by answering an unreachable store as any other store error: the
/// requests in the gap answered 500 `internal`.
#[test]
fn a_postgres_restart_under_load_answers_store_unavailable_and_heals() {
    let replicas = Replicas::start(&["w1"]);
    let (status, made) = replicas.call(
        &replicas.a.url,
        Method::POST,
        "/v1/apps/fleet/machines",
        Some(sleeper(json!({"skip_launch": true}))),
    );
    assert_eq!(status, 200, "{made}");
    let path = format!(
        "/v1/apps/fleet/machines/{}",
        made["id"].as_str().expect("id")
    );
    let stop = Arc::new(AtomicBool::new(false));
    let replicas = Arc::new(replicas);
    let load: Vec<_> = [replicas.a.url.clone(), replicas.b.url.clone()]
        .into_iter()
        .map(|base| {
            let replicas = replicas.clone();
            let stop = stop.clone();
            let path = path.clone();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let began = Instant::now();
                    let reply = replicas
                        .send(&base, Method::GET, &path, &[], None)
                        .expect("an answer, always");
                    seen.push((Instant::now(), began.elapsed(), reply.status, reply.body));
                    std::thread::sleep(Duration::from_millis(20));
                }
                seen
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    replicas.database.stop();
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    replicas.database.start_server();
    let restarted = Instant::now();
    std::thread::sleep(Duration::from_secs(8));
    stop.store(true, Ordering::SeqCst);
    for (index, thread) in load.into_iter().enumerate() {
        let seen = thread.join().expect("load");
        let mut unavailable = 0;
        for (at, took, status, body) in &seen {
            assert!(
                *took < Duration::from_secs(6),
                "replica {index}: a request took {took:?}"
            );
            match status {
                200 => {}
                503 => {
                    assert_eq!(body["error"], "store_unavailable", "{body}");
                    assert!(body["retry_after_ms"].as_u64().is_some(), "{body}");
                    unavailable += 1;
                }
                other => panic!("replica {index}: {other} {body}"),
            }
            let _ = at;
        }
        assert!(unavailable > 0, "replica {index} never saw the outage");
        // Healed: the last seconds of load all succeeded.
        let healed_since = restarted + Duration::from_secs(5);
        let after: Vec<u16> = seen
            .iter()
            .filter(|(at, ..)| *at > healed_since)
            .map(|(_, _, status, _)| *status)
            .collect();
        assert!(!after.is_empty());
        assert!(
            after.iter().all(|status| *status == 200),
            "replica {index} after the restart: {after:?}"
        );
        assert!(stopped < restarted);
    }
    let replicas = Arc::try_unwrap(replicas).unwrap_or_else(|_| panic!("still shared"));
    replicas.teardown();
}

/// An image imported through A is pushed to the shared registry (`--image-registry`,
/// basic auth): with A killed (-9), a Machine of it is created and started through B on
/// an agent that never had it, which pulls it from that registry with the credentials B
/// sends, and runs it. Checked to fail without the change by sending agents no pull
/// source (the control plane's resolution turned off): the create through B answered 503
/// `registry_unreachable` (the agent's default registry is A's `/v2`, dead).
#[test]
fn an_image_imported_through_a_runs_through_b_after_a_is_killed() {
    let mut replicas = Replicas::start(&["w1"]);
    let layout = tempfile::tempdir().expect("tempdir");
    common::busybox_image_with(&[("/etc/marker", "from the shared registry")])
        .write_layout(&layout.path().join("img"))
        .expect("layout");
    let a = replicas.a.url.clone();
    replicas.import(&a, &layout.path().join("img"), "demo/late:1");
    let (status, tags) = {
        let (user, password) = replicas.registry.credentials().expect("credentials");
        let response = replicas
            .http
            .get(format!(
                "http://{}/v2/demo/late/tags/list",
                replicas.registry.host()
            ))
            .basic_auth(user, Some(password))
            .send()
            .expect("registry");
        (
            response.status().as_u16(),
            response.json::<serde_json::Value>().unwrap_or_default(),
        )
    };
    assert_eq!((status, &tags["tags"]), (200, &json!(["1"])), "{tags}");

    replicas.a.process.kill();
    let b = replicas.b.url.clone();
    let (status, made) = replicas.call(
        &b,
        Method::POST,
        "/v1/apps/fleet/machines",
        Some(
            json!({"config": {"image": "demo/late:1", "init": {"cmd": ["sleep", "3600"]},
            "guest": {"cpus": 1, "memory_mb": 64}, "stop_config": {"signal": "SIGKILL"}}}),
        ),
    );
    assert_eq!(status, 200, "{made}\n{}", replicas.logs());
    assert_eq!(made["state"], json!("started"), "{made}");
    let id = made["id"].as_str().expect("id").to_owned();
    let (status, exec) = replicas.call(
        &b,
        Method::POST,
        &format!("/v1/apps/fleet/machines/{id}/exec"),
        Some(json!({"cmd": ["cat", "/etc/marker"]})),
    );
    assert_eq!(status, 200, "{exec}");
    assert_eq!(exec["stdout"], json!("from the shared registry"), "{exec}");
    replicas.teardown();
}
