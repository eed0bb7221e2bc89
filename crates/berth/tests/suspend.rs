//! End-to-end: `berth up` offers gvisor where runsc is installed, and a gVisor Machine is
//! suspended and resumed over HTTP (and the CLI): its state, events, list filter and
//! `wait?state=suspended`, the resume's `Server-Timing` steps, its memory and listening
//! socket after it; a native Machine's suspend is 422 naming its driver.

mod common;

use std::time::Duration;

use berth_api::MachineState;
use berth_image::build::{Compression, LayerBuilder};
use common::{busybox_image, Platform};
use reqwest::Method;
use serde_json::{json, Value};

const APP: &str = "sleepy";
const IMAGE: &str = "demo/counter:1";
const INDEX_HTML: &str = "<h1>kept</h1>\n";
/// Counts in a shell variable (memory, not a file) beside an httpd on 127.0.0.1:8080.
const COUNTER: &str = "httpd -p 127.0.0.1:8080 -h /www; i=0; \
                       while true; do i=$((i+1)); echo \"count $i\"; sleep 0.1; done";

fn create(platform: &Platform, runtime: &str) -> String {
    let (status, answer) = platform.call(
        Method::POST,
        &format!("/v1/apps/{APP}/machines"),
        Some(json!({"config": {"image": IMAGE, "runtime": runtime,
            "init": {"cmd": ["/bin/sh", "-c", COUNTER]}}})),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["config"]["runtime"], runtime, "{answer}");
    answer["id"].as_str().expect("id").to_owned()
}

fn counts(logs: &str) -> Vec<u64> {
    logs.lines()
        .filter_map(|line| line.strip_prefix("count ")?.trim().parse().ok())
        .collect()
}

fn wait_count(platform: &Platform, id: &str, at_least: u64) -> Vec<u64> {
    platform.wait_for(
        &format!("count {at_least} from {id}"),
        Duration::from_secs(30),
        || counts(&platform.logs(APP, id)).last().copied().unwrap_or(0) >= at_least,
    );
    counts(&platform.logs(APP, id))
}

fn event_types(platform: &Platform, id: &str) -> Vec<String> {
    let (status, events) = platform.call(
        Method::GET,
        &format!("/v1/apps/{APP}/machines/{id}/events"),
        None,
    );
    assert_eq!(status, 200, "{events}");
    let mut events = events.as_array().cloned().unwrap_or_default();
    events.sort_by_key(|event| {
        event["id"]
            .as_str()
            .unwrap_or("0")
            .parse::<i64>()
            .unwrap_or(0)
    });
    events
        .iter()
        .map(|event| {
            format!(
                "{}:{}",
                event["type"].as_str().unwrap_or("?"),
                event["source"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

fn wget_inside(platform: &Platform, id: &str) -> Value {
    let (status, answer) = platform.call(
        Method::POST,
        &format!("/v1/apps/{APP}/machines/{id}/exec"),
        Some(json!({"cmd": ["wget", "-q", "-O", "-", "http://127.0.0.1:8080/index.html"]})),
    );
    assert_eq!(status, 200, "{answer}");
    answer
}

// Before the route reached the agent it answered 422 `suspend_unsupported` for every
// Machine (the control plane's fixed answer), which the first status assert refuses; the
// list filter and the wait then had no suspended Machine to find.
#[test]
fn a_gvisor_machine_suspends_and_resumes_over_the_api() {
    if !std::path::Path::new("/usr/bin/runsc").exists() {
        assert!(
            std::env::var_os("BERTH_REQUIRE_RUNSC").is_none(),
            "BERTH_REQUIRE_RUNSC is set but runsc is missing"
        );
        eprintln!(
            "SKIPPED: runsc is not installed (Debian's runsc package); not a gVisor test run"
        );
        return;
    }
    let platform = Platform::start();
    platform.import(
        busybox_image().layer(
            LayerBuilder::new().file("www/index.html", INDEX_HTML.as_bytes(), 0o644),
            Compression::None,
        ),
        IMAGE,
    );
    platform.cli_ok(&["app", "create", APP]);
    let (_, workers) = platform.call(Method::GET, "/v1/workers", None);
    assert_eq!(
        workers[0]["runtimes"],
        json!(["gvisor", "native", "runc"]),
        "{workers}"
    );

    let id = create(&platform, "gvisor");
    wait_count(&platform, &id, 3);

    // A waiter for `suspended`, asked before the suspend.
    let waiter = {
        let request = platform.request(
            Method::GET,
            &format!("/v1/apps/{APP}/machines/{id}/wait?state=suspended&timeout=60"),
        );
        std::thread::spawn(move || {
            let response = request.send().expect("wait");
            (
                response.status().as_u16(),
                response.json::<Value>().unwrap_or(Value::Null),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let (status, answer) = platform.call(
        Method::POST,
        &format!("/v1/apps/{APP}/machines/{id}/suspend"),
        Some(json!({})),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["previous_state"], "started", "{answer}");
    assert_eq!(answer["machine"]["state"], "suspended", "{answer}");
    let (status, waited) = waiter.join().expect("waiter");
    assert_eq!(status, 200, "{waited}");
    assert_eq!(platform.machine(APP, &id).state, MachineState::Suspended);
    let (status, listed) = platform.call(
        Method::GET,
        &format!("/v1/apps/{APP}/machines?state=suspended"),
        None,
    );
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(
        event_types(&platform, &id).last().map(String::as_str),
        Some("suspend:user")
    );
    // The CLI says it is already suspended.
    let again = platform.cli_ok(&["machine", "suspend", "--app", APP, &id]);
    assert!(again.contains("already suspended"), "{again}");
    let counted = *counts(&platform.logs(APP, &id)).last().expect("a count");

    // Start resumes it: the answer says so, Server-Timing covers the restore.
    let response = platform
        .request(Method::POST, &format!("/v1/apps/{APP}/machines/{id}/start"))
        .json(&json!({}))
        .send()
        .expect("start");
    assert_eq!(response.status().as_u16(), 200);
    let timing = response
        .headers()
        .get("server-timing")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let answer: Value = response.json().expect("json");
    assert_eq!(answer["resumed"], true, "{answer}");
    assert_eq!(answer["previous_state"], "suspended", "{answer}");
    assert!(timing.contains("image_verify"), "{timing}");
    assert!(
        event_types(&platform, &id).contains(&"resume:user".to_owned()),
        "{:?}",
        event_types(&platform, &id)
    );
    let after = wait_count(&platform, &id, counted + 5);
    assert_eq!(after.first(), Some(&1));
    assert!(
        after.windows(2).all(|pair| pair[1] == pair[0] + 1),
        "the count started over or ran twice: {after:?}"
    );
    let served = wget_inside(&platform, &id);
    assert_eq!(served["stdout"], INDEX_HTML, "{served}");

    // A native Machine cannot: 422 naming its driver, and it runs on.
    let native = create(&platform, "native");
    wait_count(&platform, &native, 1);
    let (status, refused) = platform.call(
        Method::POST,
        &format!("/v1/apps/{APP}/machines/{native}/suspend"),
        None,
    );
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["error"], "suspend_unsupported", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap_or_default()
            .contains("native driver"),
        "{refused}"
    );
    assert_eq!(platform.machine(APP, &native).state, MachineState::Started);

    // Suspended again, a destroy needs no force.
    platform.cli_ok(&["machine", "suspend", "--app", APP, &id]);
    for (machine, force) in [(&id, false), (&native, true)] {
        let (status, answer) = platform.call(
            Method::DELETE,
            &format!("/v1/apps/{APP}/machines/{machine}?force={force}"),
            None,
        );
        assert_eq!(status, 200, "{answer}");
    }
    platform.teardown();
}
