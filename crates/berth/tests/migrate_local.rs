//! Moves between the in-process workers of one `berth up --workers 2`, through the
//! proxy: the workers reach each other directly, and a client of the proxy sees no
//! error while the Machine moves.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_api::{MachineState, MigrateMachineResponse};
use common::{busybox_image, Platform};
use reqwest::Method;
use serde_json::json;

const HTTPD: &str =
    "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 8080 -h /www";

#[test]
fn a_machine_behind_the_proxy_moves_without_a_failed_request() {
    // The window between the cutover and the destination's commit, held open so that
    // requests and lists fall into it.
    let platform = Platform::start_with_env(
        &["--workers", "2"],
        &[("BERTH_FAILPOINTS", "migrate.after_cutover=pause:400")],
    );
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "web"]);
    let (status, body) = platform.call(
        Method::POST,
        "/v1/apps/web/machines",
        Some(
            json!({"config": {"image": "demo/busybox:1", "guest": {"cpus": 1, "memory_mb": 64},
            "init": {"cmd": ["/bin/sh", "-c", HTTPD]},
            "services": [{"internal_port": 8080, "protocol": "tcp", "autostart": true,
                          "autostop": "off"}]}}),
        ),
    );
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    let from = body["worker"].as_str().expect("worker").to_owned();
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let get = {
        let (client, proxy) = (client.clone(), platform.proxy_url.clone());
        move || {
            client
                .get(format!("{proxy}/index.html"))
                .header("host", "web.localhost")
                .send()
                .map(|response| {
                    (
                        response.status().as_u16(),
                        response.text().unwrap_or_default(),
                    )
                })
        }
    };
    platform.wait_for("the proxy to serve", Duration::from_secs(30), || {
        get().is_ok_and(|(status, _)| status == 200)
    });

    // A client keeps asking through the proxy while the Machine moves.
    let done = Arc::new(AtomicBool::new(false));
    let (answered, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let asking = {
        let (done, answered, failed, get) =
            (done.clone(), answered.clone(), failed.clone(), get.clone());
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            while !done.load(Ordering::SeqCst) {
                match get() {
                    Ok((200, text)) if text == "hello\n" => {
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    other => {
                        failed.fetch_add(1, Ordering::SeqCst);
                        failures.push(format!("{other:?}"));
                    }
                }
            }
            failures
        })
    };
    // Another lists the app's Machines meanwhile: the Machine is in every list. Checked
    // against the list from before, which left it out between the cutover and the
    // destination's commit (the proxy then answered 503 no_machine_available).
    let listing = {
        let (done, client, url, token, id) = (
            done.clone(),
            client.clone(),
            format!("{}/v1/apps/web/machines", platform.api_url),
            platform.token.clone(),
            id.clone(),
        );
        std::thread::spawn(move || {
            let (mut lists, mut missing) = (0, Vec::new());
            while !done.load(Ordering::SeqCst) {
                let listed: Vec<serde_json::Value> = client
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .and_then(|response| response.json())
                    .expect("a Machine list");
                lists += 1;
                if !listed.iter().any(|machine| machine["id"] == id.as_str()) {
                    missing.push(listed);
                }
            }
            (lists, missing)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/web/machines/{id}/migrate"),
        Some(json!({})),
    );
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, Ordering::SeqCst);
    let failures = asking.join().expect("client thread");
    let (lists, missing) = listing.join().expect("listing thread");
    assert!(lists > 10, "the lister kept asking: {lists} lists");
    assert!(
        missing.is_empty(),
        "every list during the move held the Machine: {missing:?}"
    );
    assert_eq!(status, 200, "{body}\n{}", platform.server_log());
    let answer: MigrateMachineResponse = serde_json::from_value(body).expect("answer");
    assert_ne!(answer.to_worker, from);
    assert_eq!(answer.machine.state, MachineState::Started);
    assert!(answer.downtime_ms.is_some(), "{answer:?}");
    assert!(
        answered.load(Ordering::SeqCst) > 10,
        "the client kept asking: {} answers",
        answered.load(Ordering::SeqCst)
    );
    assert!(
        failures.is_empty(),
        "every request through the proxy was answered during the move: {failures:?}"
    );
    assert!(get().is_ok_and(|(status, _)| status == 200));

    // With the other worker cordoned there is nowhere to go: the drain says so.
    let (status, body) = platform.call(Method::POST, &format!("/v1/workers/{from}/cordon"), None);
    assert_eq!(status, 200, "{body}");
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/web/machines/{id}/migrate"),
        Some(json!({})),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("insufficient_capacity")),
        "{body}"
    );
    platform.teardown();
}

#[test]
fn a_lone_worker_has_nowhere_to_move_a_machine_and_its_drain_says_so() {
    let platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "solo"]);
    let (status, body) = platform.call(
        Method::POST,
        "/v1/apps/solo/machines",
        Some(json!({"config": {"image": "demo/busybox:1", "init": {"cmd": ["sleep", "3600"]}}})),
    );
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/solo/machines/{id}/migrate"),
        Some(json!({})),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("insufficient_capacity")),
        "{body}"
    );
    let (status, body) = platform.call(Method::POST, "/v1/workers/local/drain", None);
    assert_eq!(status, 202, "{body}");
    platform.wait_for("the drain to end", Duration::from_secs(30), || {
        let (_, worker) = platform.call(Method::GET, "/v1/workers/local", None);
        worker["drain"]["state"] != "draining"
    });
    let (_, worker) = platform.call(Method::GET, "/v1/workers/local", None);
    assert_eq!(worker["drain"]["state"], "incomplete", "{worker}");
    assert_eq!(
        worker["drain"]["failed"][0]["machine"],
        id.as_str(),
        "{worker}"
    );
    assert_eq!(
        worker["drain"]["failed"][0]["error"], "insufficient_capacity",
        "{worker}"
    );
    assert_eq!(platform.machine("solo", &id).state, MachineState::Started);
    platform.teardown();
}
