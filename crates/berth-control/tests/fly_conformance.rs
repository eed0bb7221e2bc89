//! Fly Machines clients against Berth: request bodies shaped as Fly's Go client marshals
//! them (zero values it always sends included), in the default and the strict mode, and
//! answers decoded into Fly's documented response fields.
//!
//! The fixtures are written from the documented field lists of Fly's `LaunchMachineInput`,
//! `MachineConfig`, `StopMachineInput`, `MachineExecRequest` and destroy's query.

mod common;

use std::collections::BTreeMap;

use common::{assert_error, Harness, IMAGE};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

/// Fly's Machine, as its clients decode it: only what they read.
#[derive(Debug, Deserialize)]
struct FlyMachine {
    id: String,
    name: String,
    state: String,
    region: String,
    instance_id: String,
    #[serde(default)]
    private_ip: String,
    config: FlyMachineConfig,
    image_ref: FlyImageRef,
    created_at: String,
    updated_at: String,
}

#[derive(Debug, Deserialize)]
struct FlyMachineConfig {
    image: String,
    #[serde(default)]
    env: BTreeMap<String, String>,
    guest: FlyGuest,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    services: Vec<FlyService>,
    restart: FlyRestart,
    stop_config: FlyStopConfig,
}

#[derive(Debug, Deserialize)]
struct FlyGuest {
    cpu_kind: String,
    cpus: u32,
    memory_mb: u32,
}

#[derive(Debug, Deserialize)]
struct FlyService {
    protocol: String,
    internal_port: u16,
}

#[derive(Debug, Deserialize)]
struct FlyRestart {
    policy: String,
    max_retries: u32,
}

#[derive(Debug, Deserialize)]
struct FlyStopConfig {
    signal: String,
    /// A Go duration string, as Fly's `Duration` reads it.
    timeout: String,
}

#[derive(Debug, Deserialize)]
struct FlyImageRef {
    repository: String,
    digest: String,
}

#[derive(Debug, Deserialize)]
struct FlyExecResponse {
    exit_code: i32,
    stdout: String,
    stderr: String,
}

#[derive(Debug, Deserialize)]
struct FlyOk {
    ok: bool,
}

const STRICT: (&str, &str) = ("berth-strict", "true");

/// A create as Fly's Go client marshals it: `init` always (not omitted when empty),
/// `skip_secrets` always, `force_instance_key` always (null), durations as Go strings.
fn launch_input(name: &str, skip_launch: bool) -> Value {
    json!({
        "config": {
            "env": {"PORT": "8080"},
            "init": {},
            "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
            "metadata": {"fly_platform_version": "v2", "fly_process_group": "app"},
            "services": [{
                "protocol": "tcp",
                "internal_port": 8080,
                "autostop": "stop",
                "autostart": true,
                "min_machines_running": 0,
                "ports": [{"port": 443, "handlers": ["tls", "http"]}, {"port": 80, "handlers": ["http"], "force_https": true}],
                "concurrency": {"type": "requests", "hard_limit": 25, "soft_limit": 20},
                "force_instance_key": null
            }],
            "image": IMAGE,
            "restart": {"policy": "on-failure", "max_retries": 10},
            "stop_config": {"timeout": "1m0s", "signal": "SIGINT"}
        },
        "region": "test",
        "name": name,
        "skip_launch": skip_launch,
        "skip_secrets": false
    })
}

/// Fields of Fly's schema that Berth does not act on, each at its path.
fn with_fly_extras(mut body: Value) -> Value {
    body["skip_service_registration"] = json!(true);
    body["config"]["auto_destroy"] = json!(true);
    body["config"]["dns"] = json!({"skip_registration": true});
    body["config"]["checks"] =
        json!({"alive": {"type": "tcp", "port": 8080, "interval": "15s", "timeout": "2s"}});
    body["config"]["init"]["tty"] = json!(true);
    body["config"]["init"]["swap_size_mb"] = json!(512);
    body["config"]["guest"]["kernel_args"] = json!(["quiet"]);
    body
}

/// The ones of them Berth ignores (`auto_destroy`, `checks` and `init.tty` are honoured:
/// see `fly_config.rs` and berth-runtime's `init.rs`).
const EXTRA_PATHS: [&str; 4] = [
    "config.init.swap_size_mb",
    "config.guest.kernel_args",
    "config.dns.skip_registration",
    "skip_service_registration",
];

fn warned_fields(reply: &common::Reply) -> Vec<String> {
    reply.body["warnings"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|warning| {
                    assert_eq!(warning["code"], "ignored_field", "{warning}");
                    assert!(warning["message"].as_str().is_some_and(|m| !m.is_empty()));
                    warning["field"].as_str().expect("field").to_owned()
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_fly_create_is_accepted_as_sent_and_decodes_as_fly_reads_it() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "fly").await;
    let reply = harness
        .send(
            &harness.admin,
            Method::POST,
            "/v1/apps/fly/machines",
            &[],
            Some(launch_input("web", true)),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // Nothing fly-go always sends is reported as ignored.
    assert!(reply.body.get("warnings").is_none(), "{}", reply.body);
    assert!(reply.headers.get("berth-warnings").is_none());
    let machine: FlyMachine = serde_json::from_value(reply.body.clone()).expect("Fly's shape");
    assert_eq!(
        (machine.name.as_str(), machine.region.as_str()),
        ("web", "test")
    );
    assert_eq!(machine.state, "created");
    assert!(!machine.id.is_empty() && !machine.instance_id.is_empty());
    // This harness's worker has no Machine network: the field may be absent, and decodes.
    let _ = machine.private_ip;
    assert!(!machine.created_at.is_empty() && !machine.updated_at.is_empty());
    assert_eq!(machine.config.image, IMAGE);
    assert_eq!(machine.config.env["PORT"], "8080");
    assert_eq!(machine.config.metadata["fly_process_group"], "app");
    assert_eq!(
        (
            machine.config.guest.cpu_kind.as_str(),
            machine.config.guest.cpus,
            machine.config.guest.memory_mb
        ),
        ("shared", 1, 256)
    );
    assert_eq!(machine.config.services[0].protocol, "tcp");
    assert_eq!(machine.config.services[0].internal_port, 8080);
    assert_eq!(machine.config.restart.policy, "on-failure");
    assert_eq!(machine.config.restart.max_retries, 10);
    assert_eq!(machine.config.stop_config.signal, "SIGINT");
    assert_eq!(machine.config.stop_config.timeout, "60s");
    assert!(machine.image_ref.digest.starts_with("sha256:"));
    assert!(!machine.image_ref.repository.is_empty());

    // The same body under strict mode is accepted too: every field of it is known.
    let strict = harness
        .send(
            &harness.admin,
            Method::POST,
            "/v1/apps/fly/machines",
            &[STRICT],
            Some(launch_input("web-strict", true)),
        )
        .await;
    assert_eq!(strict.status, 200, "{}", strict.body);
}

#[tokio::test]
async fn unknown_fly_fields_are_ignored_and_told_or_refused_when_strict() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "fly").await;
    let body = with_fly_extras(launch_input("extras", true));
    let reply = harness
        .send(
            &harness.admin,
            Method::POST,
            "/v1/apps/fly/machines",
            &[],
            Some(body.clone()),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let mut warned = warned_fields(&reply);
    warned.sort();
    let mut expected: Vec<String> = EXTRA_PATHS.iter().map(|path| (*path).to_owned()).collect();
    expected.sort();
    assert_eq!(warned, expected);
    let header = reply
        .headers
        .get("berth-warnings")
        .and_then(|value| value.to_str().ok())
        .expect("berth-warnings header");
    for path in EXTRA_PATHS {
        assert!(
            header.contains(&format!("ignored_field={path}")),
            "{header}"
        );
    }
    // The answer is still Fly's Machine.
    let machine: FlyMachine = serde_json::from_value(reply.body).expect("Fly's shape");
    assert_eq!(machine.name, "extras");

    // Strict: today's 400, naming one of the unknown fields, and nothing made.
    let mut strict_body = body;
    strict_body["name"] = json!("extras-strict");
    let refused = harness
        .send(
            &harness.admin,
            Method::POST,
            "/v1/apps/fly/machines",
            &[STRICT],
            Some(strict_body),
        )
        .await;
    assert_error(
        &(refused.status, refused.body.clone()),
        400,
        "invalid_config",
    );
    let field = refused.body["field"].as_str().expect("field");
    assert!(EXTRA_PATHS.contains(&field), "{}", refused.body);
    let (_, listed) = harness
        .call(&harness.admin, Method::GET, "/v1/apps/fly/machines", None)
        .await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");

    // Type errors in known fields stay 400 in both modes, naming the field.
    let mut mistyped = launch_input("typo", true);
    mistyped["config"]["guest"]["cpus"] = json!("one");
    mistyped["nonsense"] = json!(1);
    for headers in [&[][..], &[STRICT][..]] {
        let reply = harness
            .send(
                &harness.admin,
                Method::POST,
                "/v1/apps/fly/machines",
                headers,
                Some(mistyped.clone()),
            )
            .await;
        assert_error(&(reply.status, reply.body.clone()), 400, "invalid_config");
        assert_eq!(reply.body["field"], "config.guest.cpus", "{}", reply.body);
    }
    let bad_header = harness
        .send(
            &harness.admin,
            Method::POST,
            "/v1/apps/fly/machines",
            &[("berth-strict", "maybe")],
            Some(launch_input("x", true)),
        )
        .await;
    assert_error(
        &(bad_header.status, bad_header.body.clone()),
        400,
        "invalid_config",
    );
    assert_eq!(bad_header.body["field"], "berth-strict");
}

#[tokio::test]
async fn a_fly_update_is_accepted_in_both_modes() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "fly").await;
    let (status, created) = harness
        .call(
            &harness.admin,
            Method::POST,
            "/v1/apps/fly/machines",
            Some(launch_input("web", true)),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_str().expect("id");
    let path = format!("/v1/apps/fly/machines/{id}");
    // fly-go sends the same input for update as for create (without region and name when
    // they are not changed).
    let mut update = launch_input("web", true);
    let object = update.as_object_mut().expect("object");
    object.remove("region");
    object.remove("name");
    update["config"]["guest"]["memory_mb"] = json!(512);
    let reply = harness
        .send(
            &harness.admin,
            Method::POST,
            &path,
            &[STRICT],
            Some(update.clone()),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let machine: FlyMachine = serde_json::from_value(reply.body).expect("Fly's shape");
    assert_eq!(machine.config.guest.memory_mb, 512);
    assert_eq!(machine.config.guest.cpu_kind, "shared");

    // A field Berth ignores (`files` and `processes`, the examples here before, are
    // honoured now; a process's secrets are not).
    update["config"]["processes"] =
        json!([{"cmd": ["/bin/sh"], "env": null, "secrets": [{"env_var": "K", "name": "k"}]}]);
    let reply = harness
        .send(
            &harness.admin,
            Method::POST,
            &path,
            &[],
            Some(update.clone()),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(warned_fields(&reply), ["config.processes[0].secrets"]);
    let refused = harness
        .send(&harness.admin, Method::POST, &path, &[STRICT], Some(update))
        .await;
    assert_error(
        &(refused.status, refused.body.clone()),
        400,
        "invalid_config",
    );
    assert_eq!(refused.body["field"], "config.processes[0].secrets");
}

#[tokio::test]
async fn fly_stop_exec_and_destroy_shapes_work() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "fly").await;
    let (status, created) = harness
        .call(
            &harness.admin,
            Method::POST,
            "/v1/apps/fly/machines",
            Some(launch_input("web", false)),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_str().expect("id").to_owned();
    let base = format!("/v1/apps/fly/machines/{id}");

    // Exec as fly-go sends it: `cmd` as one string, `timeout` in seconds.
    let reply = harness
        .send(
            &harness.admin,
            Method::POST,
            &format!("{base}/exec"),
            &[STRICT],
            Some(json!({"cmd": "echo hello world", "timeout": 5})),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let exec: FlyExecResponse = serde_json::from_value(reply.body).expect("Fly's shape");
    assert_eq!(exec.exit_code, 0);
    let _ = (exec.stdout, exec.stderr);
    // And as Fly's OpenAPI documents it: `command`, a list; `container` is not Berth's.
    let reply = harness
        .send(
            &harness.admin,
            Method::POST,
            &format!("{base}/exec"),
            &[],
            Some(json!({"command": ["echo", "a b"], "container": "app"})),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(warned_fields(&reply), ["container"]);
    let refused = harness
        .send(
            &harness.admin,
            Method::POST,
            &format!("{base}/exec"),
            &[STRICT],
            Some(json!({"command": ["true"], "container": "app"})),
        )
        .await;
    assert_error(
        &(refused.status, refused.body.clone()),
        400,
        "invalid_config",
    );
    assert_eq!(refused.body["field"], "container");
    let calls = harness.runtime.calls().await;
    assert!(
        calls.contains(&format!("exec {id} echo hello world")),
        "{calls:?}"
    );
    assert!(calls.contains(&format!("exec {id} echo a b")), "{calls:?}");

    // Stop as fly-go sends it: the id again, Fly's signal name, and a Go duration that is
    // "0s" when none was set (read as unset, as Fly does).
    let reply = harness
        .send(
            &harness.admin,
            Method::POST,
            &format!("{base}/stop"),
            &[STRICT],
            Some(json!({"id": id, "signal": "SIGINT", "timeout": "0s"})),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.body.is_object(), "{}", reply.body);
    let calls = harness.runtime.calls().await;
    assert!(calls.contains(&format!("signal {id} 2")), "{calls:?}");
    let (_, machine) = harness.call(&harness.admin, Method::GET, &base, None).await;
    assert_eq!(machine["state"], "stopped", "{machine}");

    // A stop timeout as a bare number is nanoseconds, as Go's Duration reads it; an
    // unknown field is told, or refused when strict.
    let (status, started) = harness
        .call(&harness.admin, Method::POST, &format!("{base}/start"), None)
        .await;
    assert_eq!(status, 200, "{started}");
    let reply = harness
        .send(
            &harness.admin,
            Method::POST,
            &format!("{base}/stop"),
            &[STRICT],
            Some(
                json!({"id": id, "signal": "SIGTERM", "timeout": 5_000_000_000u64, "force": true}),
            ),
        )
        .await;
    assert_error(&(reply.status, reply.body.clone()), 400, "invalid_config");
    assert_eq!(reply.body["field"], "force");
    let reply = harness
        .send(
            &harness.admin,
            Method::POST,
            &format!("{base}/stop"),
            &[],
            Some(
                json!({"id": id, "signal": "SIGTERM", "timeout": 5_000_000_000u64, "force": true}),
            ),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(warned_fields(&reply), ["force"]);
    let reply = harness
        .send(
            &harness.admin,
            Method::POST,
            &format!("{base}/stop"),
            &[],
            Some(json!({"timeout": "1m0"})),
        )
        .await;
    assert_error(&(reply.status, reply.body.clone()), 400, "invalid_config");
    assert_eq!(reply.body["field"], "timeout");

    // Destroy a started Machine with Fly's `?kill=true`.
    let (status, started) = harness
        .call(&harness.admin, Method::POST, &format!("{base}/start"), None)
        .await;
    assert_eq!(status, 200, "{started}");
    let refused = harness
        .call(&harness.admin, Method::DELETE, &base, None)
        .await;
    assert_error(&refused, 409, "invalid_state");
    let (status, reply) = harness
        .call(
            &harness.admin,
            Method::DELETE,
            &format!("{base}?kill=true"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let ok: FlyOk = serde_json::from_value(reply).expect("Fly's shape");
    assert!(ok.ok);
}
