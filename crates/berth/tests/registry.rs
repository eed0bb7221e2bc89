//! End-to-end with a real registry: the `berth` binary pulls at create, and start and
//! stop never need the registry again.

mod common;

use std::time::Duration;

use base64::Engine as _;
use berth_api::{ImagePruneResponse, ImageSummary, MachineState};
use berth_testkit::{push_image, PushTarget, Registry};
use common::{busybox_image, busybox_image_with, Platform};
use reqwest::Method;
use serde_json::json;

fn push(
    target: &PushTarget,
    repository: &str,
    tag: &str,
    image: berth_image::ImageBuilder,
) -> String {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(push_image(target, repository, tag, image))
        .expect("push")
}

fn boots(platform: &Platform, app: &str, id: &str) -> usize {
    platform.logs(app, id).matches("booted").count()
}

#[test]
fn create_pulls_and_start_works_with_the_registry_stopped() {
    let mut registry = Registry::start().expect("registry");
    let target = PushTarget::anonymous(&registry.host());
    let digest = push(&target, "team/web", "1.4", busybox_image());
    let reference = format!("{}/team/web:1.4", registry.host());
    let platform = Platform::start();

    // `berth image pull`, then a list that shows it unused.
    let pulled = platform.cli_ok(&["image", "pull", &reference]);
    assert!(pulled.contains(&digest), "{pulled}");
    let listed: Vec<ImageSummary> =
        serde_json::from_str(&platform.cli_ok(&["image", "list", "--json"])).expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, reference);
    assert!(listed[0].machines.is_empty());

    // The API streams NDJSON: resolved first, then per layer, done last.
    let response = platform
        .request(Method::POST, "/v1/images/pull")
        .json(&json!({"image": reference}))
        .send()
        .expect("pull");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().expect("type"),
        "application/x-ndjson"
    );
    let lines: Vec<serde_json::Value> = response
        .text()
        .expect("body")
        .lines()
        .map(|line| serde_json::from_str(line).expect("json line"))
        .collect();
    assert_eq!(lines[0]["status"], "resolved");
    assert_eq!(lines[0]["digest"], digest.as_str());
    let last = lines.last().expect("lines");
    assert_eq!(
        (last["status"].as_str(), last["digest"].as_str()),
        (Some("done"), Some(digest.as_str()))
    );
    assert!(
        lines
            .iter()
            .any(|line| line["status"] == "exists" && line["layer"].is_string()),
        "the layers are already stored: {lines:?}"
    );

    platform.cli_ok(&["app", "create", "web"]);
    let id = platform
        .cli_ok(&[
            "machine",
            "create",
            "--app",
            "web",
            "--image",
            &reference,
            "--",
            "/bin/sh",
            "-c",
            "echo booted; exec sleep 3600",
        ])
        .trim()
        .to_owned();
    let machine = platform.machine("web", &id);
    assert_eq!(machine.state, MachineState::Started);
    assert_eq!(machine.image_ref.digest, digest);

    // The tag moves and the registry goes away: stop and start still work, on the
    // digest resolved at create.
    push(
        &target,
        "team/web",
        "1.4",
        busybox_image_with(&[("moved", "yes")]),
    );
    registry.kill();
    platform.wait_for("the first boot", Duration::from_secs(10), || {
        boots(&platform, "web", &id) == 1
    });
    platform.cli_ok(&["machine", "stop", "--app", "web", &id]);
    platform.cli_ok(&["machine", "start", "--app", "web", &id]);
    let machine = platform.machine("web", &id);
    assert_eq!(machine.state, MachineState::Started);
    assert_eq!(machine.image_ref.digest, digest);
    platform.wait_for("a second boot", Duration::from_secs(10), || {
        boots(&platform, "web", &id) == 2
    });

    // A create that needs the registry now answers 503 with a retry hint.
    let response = platform
        .request(Method::POST, "/v1/apps/web/machines")
        .json(&json!({"config": {"image": format!("{}/team/other:1", registry.host())}}))
        .send()
        .expect("create");
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().get("retry-after").is_some());
    let body: serde_json::Value = response.json().expect("json");
    assert_eq!(body["error"], "registry_unreachable");
    assert!(body["retry_after_ms"].as_u64().is_some());
    let (status, body) = platform.call(
        Method::POST,
        "/v1/images/pull",
        Some(json!({"image": format!("{}/team/other:1", registry.host())})),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("registry_unreachable"))
    );

    // Malformed and unknown references.
    let (status, body) = platform.call(
        Method::POST,
        "/v1/apps/web/machines",
        Some(json!({"config": {"image": "127.0.0.1:5000/Bad//ref"}})),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_image_ref")),
        "{body}"
    );
    registry.start_again().expect("registry back");
    let (status, body) = platform.call(
        Method::POST,
        "/v1/apps/web/machines",
        Some(json!({"config": {"image": format!("{}/no/such:1", registry.host())}})),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (422, Some("image_not_found")),
        "{body}"
    );

    // The list names the Machine; prune keeps its image.
    let table = platform.cli_ok(&["image", "list"]);
    assert!(table.contains(&id), "{table}");
    let digest = platform.machine("web", &id).image_ref.digest;
    assert!(table.contains(&digest), "the whole digest: {table}");
    let report: ImagePruneResponse =
        serde_json::from_str(&platform.cli_ok(&["image", "prune", "--json"])).expect("prune");
    assert!(report.images.is_empty(), "{report:?}");
    platform.cli_ok(&["machine", "destroy", "--app", "web", &id, "--force"]);
    let report: ImagePruneResponse =
        serde_json::from_str(&platform.cli_ok(&["image", "prune", "--json"])).expect("prune");
    assert_eq!(report.images, vec![reference]);
    assert!(report.layers >= 1);
    platform.teardown();
}

#[test]
fn registry_auth_file_unlocks_a_private_registry() {
    let registry = Registry::start_with_htpasswd("deploy", "hunter2").expect("registry");
    let target = PushTarget::with_credentials(&registry.host(), "deploy", "hunter2");
    push(&target, "private/app", "1", busybox_image());
    let reference = format!("{}/private/app:1", registry.host());

    let anonymous = Platform::start();
    let (status, body) = anonymous.call(
        Method::POST,
        "/v1/images/pull",
        Some(json!({"image": reference})),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (422, Some("registry_unauthorized")),
        "{body}"
    );
    anonymous.teardown();

    let dir = tempfile::tempdir().expect("tempdir");
    let auth_file = dir.path().join("config.json");
    let encoded = base64::engine::general_purpose::STANDARD.encode("deploy:hunter2");
    std::fs::write(
        &auth_file,
        json!({"auths": {registry.host(): {"auth": encoded}}}).to_string(),
    )
    .expect("auth file");
    let host = registry.host();
    let platform = Platform::start_with(&[
        "--registry-auth",
        auth_file.to_str().expect("utf-8"),
        "--default-registry",
        &host,
    ]);
    platform.cli_ok(&["app", "create", "private"]);
    let id = platform
        .cli_ok(&[
            "machine",
            "create",
            "--app",
            "private",
            "--image",
            &reference,
            "--",
            "/bin/sh",
            "-c",
            "echo booted; exec sleep 3600",
        ])
        .trim()
        .to_owned();
    assert_eq!(
        platform.machine("private", &id).state,
        MachineState::Started
    );

    // Without a registry in the name: a local tag wins, anything else comes from the
    // default registry.
    platform.import(busybox_image_with(&[("local", "yes")]), "private/app:1");
    platform.import(busybox_image_with(&[("local", "only")]), "demo/busybox:1");
    let local: Vec<ImageSummary> =
        serde_json::from_str(&platform.cli_ok(&["image", "list", "--json"])).expect("list");
    let local_digest = |name: &str| {
        local
            .iter()
            .find(|image| image.name == name)
            .map(|image| image.digest.clone())
            .expect("listed")
    };
    for name in ["demo/busybox:1", "private/app:1"] {
        let (status, body) = platform.call(
            Method::POST,
            "/v1/apps/private/machines",
            Some(json!({"skip_launch": true, "config": {"image": name, "init": {"cmd": ["/bin/true"]}}})),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["image_ref"]["digest"],
            local_digest(name).as_str(),
            "{name}"
        );
    }
    let remote_digest = platform.machine("private", &id).image_ref.digest;
    let (status, body) = platform.call(Method::DELETE, "/v1/images?name=private/app:1", None);
    assert_eq!(status, 204, "{body}");
    let (status, body) = platform.call(
        Method::POST,
        "/v1/apps/private/machines",
        Some(json!({"skip_launch": true, "config": {"image": "private/app:1", "init": {"cmd": ["/bin/true"]}}})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["image_ref"]["digest"], remote_digest.as_str());
    assert_eq!(body["image_ref"]["name"], reference.as_str());
    platform.teardown();
}
