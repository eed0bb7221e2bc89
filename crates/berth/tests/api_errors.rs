//! Bad input gets a JSON error with a stable code, and changes nothing.

mod common;

use common::{busybox_image, Platform};
use reqwest::Method;
use serde_json::{json, Value};

fn assert_error(status: u16, body: &Value, expected_status: u16, code: &str) {
    assert_eq!(status, expected_status, "{body}");
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|message| !message.is_empty()),
        "{body}"
    );
}

#[test]
fn bad_requests_get_json_errors_and_leave_nothing_behind() {
    let platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");

    // Health needs no token; everything else does.
    let health = reqwest::blocking::get(format!("{}/v1/health", platform.api_url)).expect("health");
    assert_eq!(health.status().as_u16(), 200);
    let anonymous = reqwest::blocking::Client::new()
        .get(format!("{}/v1/apps", platform.api_url))
        .send()
        .expect("send");
    assert_eq!(anonymous.status().as_u16(), 401);
    let body: Value = anonymous.json().expect("json");
    assert_eq!(body["error"], "unauthorized");
    let wrong = reqwest::blocking::Client::new()
        .get(format!("{}/v1/apps", platform.api_url))
        .bearer_auth("berth_not-the-token")
        .send()
        .expect("send");
    assert_eq!(wrong.status().as_u16(), 401);

    let (status, body) = platform.call(Method::POST, "/v1/apps", Some(json!({"app_name": "errs"})));
    assert_eq!(status, 201, "{body}");
    let (status, body) = platform.call(Method::POST, "/v1/apps", Some(json!({"app_name": "errs"})));
    assert_error(status, &body, 409, "already_exists");
    let (status, body) = platform.call(
        Method::POST,
        "/v1/apps",
        Some(json!({"app_name": "x".repeat(100)})),
    );
    assert_error(status, &body, 400, "invalid_config");
    assert_eq!(body["field"], "app_name");

    let machines = "/v1/apps/errs/machines";
    let raw = |bytes: Vec<u8>| {
        let response = platform
            .request(Method::POST, machines)
            .header("content-type", "application/json")
            .body(bytes)
            .send()
            .expect("send");
        let status = response.status().as_u16();
        (status, response.json::<Value>().expect("json error body"))
    };
    let (status, body) = raw(b"{not json".to_vec());
    assert_error(status, &body, 400, "invalid_config");
    let (status, body) = raw(vec![0xff, 0xfe, 0x00]);
    assert_error(status, &body, 400, "invalid_config");
    let (status, body) = raw(vec![b' '; 2 * 1024 * 1024]);
    assert_error(status, &body, 413, "payload_too_large");

    // Unknown fields: refused, naming the field, under strict mode (without it they are
    // ignored and listed in the answer's warnings, as Fly's server ignores them).
    let response = platform
        .request(Method::POST, machines)
        .header("content-type", "application/json")
        .header("berth-strict", "true")
        .body(r#"{"config": {"image": "demo/busybox:1"}, "surprise": true}"#)
        .send()
        .expect("send");
    let status = response.status().as_u16();
    let body = response.json::<Value>().expect("json error body");
    assert_error(status, &body, 400, "invalid_config");
    assert_eq!(body["field"], "surprise");

    let cases = [
        (
            json!({"config": {"image": "demo/busybox:1", "guest": {"cpus": -2}}}),
            "config.guest.cpus",
        ),
        (
            json!({"config": {"image": "demo/busybox:1", "guest": {"cpus": 1, "memory_mb": 99999999999u64}}}),
            "config.guest.memory_mb",
        ),
        (
            json!({"config": {"image": "demo/busybox:1", "guest": {"cpus": 100000, "memory_mb": 256}}}),
            "config.guest.cpus",
        ),
        (
            json!({"name": "n".repeat(200), "config": {"image": "demo/busybox:1"}}),
            "name",
        ),
        (json!({"config": {"image": ""}}), "config.image"),
        (
            json!({"config": {"image": "demo/busybox:1", "stop_config": {"signal": "SIGBOGUS"}}}),
            "config.stop_config.signal",
        ),
        (
            json!({"config": {"image": "demo/busybox:1", "stop_config": {"timeout": "-5s"}}}),
            "config.stop_config.timeout",
        ),
    ];
    for (request, field) in cases {
        let (status, body) = platform.call(Method::POST, machines, Some(request.clone()));
        assert_error(status, &body, 400, "invalid_config");
        assert!(
            body["field"]
                .as_str()
                .is_some_and(|reported| reported.contains(field)),
            "{request} -> {body}"
        );
    }

    let (status, body) = platform.call(
        Method::POST,
        machines,
        Some(json!({"config": {"image": "nowhere/nothing:9"}})),
    );
    assert_error(status, &body, 422, "image_not_found");

    // Malformed references, whether refused by the config's checks or the parser.
    for image in [
        "demo/busy box:1",
        "demo/busybox:1\n",
        "UPPER/case:1",
        "a:b:c:d",
        &"x".repeat(600),
    ] {
        let (status, body) = platform.call(
            Method::POST,
            machines,
            Some(json!({"config": {"image": image}})),
        );
        assert_error(status, &body, 400, "invalid_image_ref");
    }

    // Nothing above left a Machine, a record or a directory behind.
    let (status, body) = platform.call(Method::GET, machines, None);
    assert_eq!(status, 200);
    assert_eq!(body.as_array().map(Vec::len), Some(0), "{body}");
    let dirs = std::fs::read_dir(platform.data_dir.path().join("worker/machines"))
        .expect("machines dir")
        .count();
    assert_eq!(
        dirs, 0,
        "no machine directory may be left by a refused create"
    );

    // Unknown things, and garbage in paths, are plain 404s.
    for path in [
        "/v1/apps/ghost",
        "/v1/apps/ghost/machines",
        "/v1/apps/errs/machines/0123456789abcd",
        "/v1/apps/errs/machines/..%2F..%2Fetc",
        "/v1/apps/errs/machines/%00",
        "/v1/apps/ERRS/machines",
        "/v1/nothing-here",
    ] {
        let (status, body) = platform.call(Method::GET, path, None);
        assert_error(status, &body, 404, "not_found");
    }

    // State rules: idempotent start and stop, refused destroy without force.
    let (status, body) = platform.call(
        Method::POST,
        machines,
        Some(json!({"skip_launch": true, "config": {"image": "demo/busybox:1", "init": {"cmd": ["sleep", "3600"]}}})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "created");
    let id = body["id"].as_str().expect("id").to_owned();
    let base = format!("{machines}/{id}");
    let (status, body) = platform.call(Method::POST, &format!("{base}/stop"), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["previous_state"], "created");
    assert!(body["note"].is_string());
    let (status, body) = platform.call(Method::POST, &format!("{base}/start"), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["machine"]["state"], "started");
    let (status, body) = platform.call(Method::POST, &format!("{base}/start"), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["previous_state"], "started");
    assert!(
        body["note"]
            .as_str()
            .is_some_and(|note| note.contains("already")),
        "{body}"
    );
    let (status, body) = platform.call(Method::DELETE, &base, None);
    assert_error(status, &body, 409, "invalid_state");
    assert_eq!(body["state"], "started");
    let (status, body) = platform.call(
        Method::POST,
        &format!("{base}/stop"),
        Some(json!({"signal": "SIGNOPE"})),
    );
    assert_error(status, &body, 400, "invalid_config");
    let (status, body) = platform.call(Method::DELETE, &format!("{base}?kill=maybe"), None);
    assert_error(status, &body, 400, "invalid_config");
    let (status, body) = platform.call(
        Method::POST,
        &format!("{base}/stop"),
        Some(json!({"signal": "SIGKILL", "timeout": "1s"})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["machine"]["state"], "stopped");
    assert_eq!(body["machine"]["last_exit"]["signal"], 9);
    let (status, body) = platform.call(Method::DELETE, &base, None);
    assert_eq!(status, 200, "{body}");
    platform.teardown();
}
