//! The Machine config fields of Fly's schema that Berth honours beyond the basics
//! (`checks`, `auto_destroy`): sent as Fly's clients marshal them, in the default and the
//! strict mode, stored as given, refused with a field path when malformed, and no longer
//! listed in `warnings`.
//!
//! The fixtures follow the documented fields of Fly's `MachineConfig`, `MachineCheck`,
//! `MachineHTTPHeader` and `MachineCheckStatus`.

mod common;

use std::time::Duration;

use berth_agent::WorkerService;
use berth_api::UsageKind;
use common::{assert_error, Harness, IMAGE};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

const STRICT: (&str, &str) = ("berth-strict", "true");

/// A Machine's check status as Fly's clients decode it (`MachineCheckStatus`).
#[derive(Debug, Deserialize)]
struct FlyCheckStatus {
    name: String,
    status: String,
    #[serde(default)]
    output: String,
    #[serde(default)]
    updated_at: Option<String>,
}

#[derive(Debug, Deserialize)]
struct FlyMachine {
    id: String,
    state: String,
    #[serde(default)]
    checks: Vec<FlyCheckStatus>,
}

fn fly_checks() -> Value {
    json!({
        "alive": {"type": "tcp", "port": 8080, "interval": "15s", "timeout": "2s",
                  "grace_period": "0s"},
        "web": {"type": "http", "port": 8080, "kind": "readiness", "interval": "10s",
                "timeout": "1s", "grace_period": "0s", "method": "GET", "path": "/health",
                "protocol": "http", "tls_skip_verify": false,
                "headers": [{"name": "X-Probe", "values": ["berth"]}]}
    })
}

fn launch(name: &str, config: Value, skip_launch: bool) -> Value {
    let mut body = json!({
        "config": {"image": IMAGE, "init": {"cmd": ["sleep", "3600"]},
                   "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256}},
        "name": name,
        "region": "test",
        "skip_launch": skip_launch,
        "skip_secrets": false,
    });
    if let (Some(target), Value::Object(extra)) = (body["config"].as_object_mut(), config) {
        target.extend(extra);
    }
    body
}

fn warned(reply: &common::Reply) -> Vec<String> {
    reply.body["warnings"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|warning| warning["field"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

async fn create(harness: &Harness, headers: &[(&str, &str)], body: Value) -> common::Reply {
    harness
        .send(
            &harness.admin,
            Method::POST,
            "/v1/apps/fly/machines",
            headers,
            Some(body),
        )
        .await
}

async fn get(harness: &Harness, id: &str) -> (u16, Value) {
    harness
        .call(
            &harness.admin,
            Method::GET,
            &format!("/v1/apps/fly/machines/{id}"),
            None,
        )
        .await
}

#[tokio::test]
async fn checks_are_stored_as_sent_not_warned_and_reported_in_fly_shape() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "fly").await;
    for (name, headers) in [("checked", &[][..]), ("checked-strict", &[STRICT][..])] {
        let reply = create(
            &harness,
            headers,
            launch(name, json!({"checks": fly_checks()}), false),
        )
        .await;
        assert_eq!(reply.status, 200, "{name}: {}", reply.body);
        assert!(warned(&reply).is_empty(), "{name}: {}", reply.body);
        assert!(reply.headers.get("berth-warnings").is_none());
        // Stored as given, in Fly's field names.
        let stored = &reply.body["config"]["checks"];
        assert_eq!(stored["web"]["type"], "http", "{stored}");
        assert_eq!(stored["web"]["kind"], "readiness");
        assert_eq!(stored["web"]["interval"], "10s");
        assert_eq!(stored["web"]["path"], "/health");
        assert_eq!(stored["web"]["headers"][0]["values"][0], "berth");
        assert_eq!(stored["alive"]["type"], "tcp");
        assert_eq!(stored["alive"]["timeout"], "2s");
    }

    // The worker runs them while the Machine runs. This harness's worker has no Machine
    // network, so each run fails saying so; the status is Fly's either way.
    let id = {
        let (_, listed) = harness
            .call(&harness.admin, Method::GET, "/v1/apps/fly/machines", None)
            .await;
        listed[0]["id"].as_str().expect("id").to_owned()
    };
    let mut seen = None;
    for _ in 0..100 {
        let (status, body) = get(&harness, &id).await;
        assert_eq!(status, 200, "{body}");
        let machine: FlyMachine = serde_json::from_value(body).expect("Fly's Machine");
        assert_eq!(machine.state, "started");
        if machine
            .checks
            .iter()
            .all(|check| check.updated_at.is_some())
        {
            seen = Some(machine);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let machine = seen.expect("both checks ran");
    let names: Vec<&str> = machine.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["alive", "web"]);
    for check in &machine.checks {
        assert_eq!(check.status, "critical", "{check:?}");
        assert!(check.output.contains("no address"), "{check:?}");
    }

    // Stopped: the checks are listed, not run.
    let (status, body) = harness
        .call(
            &harness.admin,
            Method::POST,
            &format!("/v1/apps/fly/machines/{}/stop", machine.id),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = get(&harness, &id).await;
    let machine: FlyMachine = serde_json::from_value(body).expect("Fly's Machine");
    assert_eq!(machine.checks.len(), 2);
    assert!(machine
        .checks
        .iter()
        .all(|check| check.status == "critical" && check.output.contains("not running")));
}

#[tokio::test]
async fn malformed_checks_are_400_with_the_field_path_in_both_modes() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "fly").await;
    for (check, field) in [
        (json!({"type": "udp", "port": 1}), "config.checks.web.type"),
        (json!({"type": "tcp"}), "config.checks.web.port"),
        (
            json!({"type": "tcp", "port": 70000}),
            "config.checks.web.port",
        ),
        (
            json!({"type": "tcp", "port": 1, "interval": "5ms"}),
            "config.checks.web.interval",
        ),
        (
            json!({"type": "tcp", "port": 1, "timeout": "soon"}),
            "config.checks.web.timeout",
        ),
        (
            json!({"type": "http", "port": 1, "path": "health"}),
            "config.checks.web.path",
        ),
        (
            json!({"type": "http", "port": 1, "kind": "liveness"}),
            "config.checks.web.kind",
        ),
        (
            json!({"type": "http", "port": 1, "headers": [{"name": "X", "values": "one"}]}),
            "config.checks.web.headers[0].values",
        ),
    ] {
        for headers in [&[][..], &[STRICT][..]] {
            let reply = create(
                &harness,
                headers,
                launch("bad", json!({"checks": {"web": check.clone()}}), true),
            )
            .await;
            assert_error(&(reply.status, reply.body.clone()), 400, "invalid_config");
            assert_eq!(reply.body["field"], field, "{check}: {}", reply.body);
        }
    }
    let reply = create(
        &harness,
        &[],
        launch("bad", json!({"auto_destroy": "yes"}), true),
    )
    .await;
    assert_error(&(reply.status, reply.body.clone()), 400, "invalid_config");
    assert_eq!(reply.body["field"], "config.auto_destroy", "{}", reply.body);
    let (_, listed) = harness
        .call(&harness.admin, Method::GET, "/v1/apps/fly/machines", None)
        .await;
    assert_eq!(listed, json!([]), "nothing was made");
}

/// Polls until the Machine is gone from the API.
async fn wait_gone(harness: &Harness, id: &str) {
    for _ in 0..250 {
        let (status, _) = get(harness, id).await;
        if status == 404 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("machine {id} was not destroyed");
}

#[tokio::test]
async fn auto_destroy_destroys_a_machine_that_exits_by_itself() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "fly").await;
    for headers in [&[][..], &[STRICT][..]] {
        // The second round takes the name of the first, which its destroy freed in the
        // index (no list in between, which would reconcile the index anyway).
        let mut reply = create(
            &harness,
            headers,
            launch("once", json!({"auto_destroy": true}), false),
        )
        .await;
        for _ in 0..50 {
            if reply.status != 409 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            reply = create(
                &harness,
                headers,
                launch("once", json!({"auto_destroy": true}), false),
            )
            .await;
        }
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(warned(&reply).is_empty(), "{}", reply.body);
        assert_eq!(reply.body["config"]["auto_destroy"], true);
        let id = reply.body["id"].as_str().expect("id").to_owned();
        assert!(harness.runtime.exit(&id, 0).await, "it was running");
        wait_gone(&harness, &id).await;
        // Gone from the host and billed to its end.
        assert!(!harness.runtime.exists(&id).await, "its files are removed");
        let journal = harness.agent.usage_since(0, 1000).await.expect("journal");
        assert!(journal
            .iter()
            .any(|record| record.machine_id == id && record.kind == UsageKind::Destroyed));
    }
    let (_, listed) = harness
        .call(&harness.admin, Method::GET, "/v1/apps/fly/machines", None)
        .await;
    assert_eq!(listed, json!([]), "{listed}");
}

#[tokio::test]
async fn auto_destroy_waits_for_the_restart_policy_and_spares_a_user_stop() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "fly").await;
    let reply = create(
        &harness,
        &[],
        launch(
            "retry",
            json!({"auto_destroy": true, "restart": {"policy": "on-failure", "max_retries": 1}}),
            false,
        ),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let id = reply.body["id"].as_str().expect("id").to_owned();
    // A failure the policy restarts: the Machine stays, and runs again.
    assert!(harness.runtime.exit(&id, 1).await);
    let mut restarted = false;
    for _ in 0..150 {
        let (status, body) = get(&harness, &id).await;
        assert_eq!(
            status, 200,
            "destroyed while the policy restarts it: {body}"
        );
        if body["state"] == "started" && body["restart_count"] == 1 {
            restarted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(restarted, "the restart policy restarted it");
    // A clean exit the policy does not restart: now it goes.
    assert!(harness.runtime.exit(&id, 0).await);
    wait_gone(&harness, &id).await;

    // A stop asked for by the user is not an exit by itself: the Machine stays.
    let reply = create(
        &harness,
        &[],
        launch("kept", json!({"auto_destroy": true}), false),
    )
    .await;
    let id = reply.body["id"].as_str().expect("id").to_owned();
    let (status, body) = harness
        .call(
            &harness.admin,
            Method::POST,
            &format!("/v1/apps/fly/machines/{id}/stop"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = get(&harness, &id).await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("stopped")),
        "{body}"
    );
}

#[tokio::test]
async fn the_openapi_description_carries_the_honoured_fields() {
    let harness = Harness::start().await;
    let (status, doc) = harness
        .call(&harness.admin, Method::GET, "/v1/openapi.json", None)
        .await;
    assert_eq!(status, 200);
    let schemas = &doc["components"]["schemas"];
    let config = &schemas["MachineConfig"]["properties"];
    assert!(config.get("checks").is_some(), "{config}");
    for field in ["auto_destroy", "files", "dns", "schedule", "processes"] {
        assert!(config.get(field).is_some(), "{field}: {config}");
    }
    assert!(schemas["InitConfig"]["properties"].get("exec").is_some());
    assert!(schemas["InitConfig"]["properties"].get("tty").is_some());
    assert!(schemas.get("Schedule").is_some(), "{schemas}");
    assert!(schemas["Machine"]["properties"].get("checks").is_some());
    for (schema, field) in [
        ("MachineCheck", "type"),
        ("MachineCheck", "grace_period"),
        ("MachineCheck", "headers"),
        ("CheckStatus", "updated_at"),
        ("CheckHeader", "values"),
        ("MachineFile", "guest_path"),
        ("MachineFile", "raw_value"),
        ("DnsConfig", "nameservers"),
        ("DnsOption", "value"),
        ("MachineProcess", "exec"),
        ("MachineProcess", "entrypoint"),
        ("MachineProcess", "cmd"),
        ("MachineProcess", "env"),
        ("MachineProcess", "user"),
    ] {
        assert!(
            schemas[schema]["properties"].get(field).is_some(),
            "{schema}.{field}: {}",
            schemas[schema]
        );
    }
}

fn upper_file(harness: &Harness, id: &str, path: &str) -> Option<String> {
    let file = harness
        .dir
        .path()
        .join("worker/machines")
        .join(id)
        .join("upper")
        .join(path.trim_start_matches('/'));
    std::fs::read_to_string(file).ok()
}

#[tokio::test]
async fn files_dns_and_exec_are_written_as_fly_sends_them() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "fly").await;
    let config = json!({
        "init": {"exec": ["/bin/sh", "-c", "cat /etc/app.conf; sleep 3600"]},
        "files": [
            {"guest_path": "/etc/app.conf", "raw_value": "aGVsbG8K", "mode": 384},
            {"guest_path": "/run/secrets/token", "secret_name": "TOKEN"}
        ],
        "dns": {"nameservers": ["fd00::53"], "searches": ["corp.internal"],
                "options": [{"name": "ndots", "value": "1"}], "skip_registration": true}
    });
    let reply = create(&harness, &[], launch("files", config.clone(), true)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // What Berth cannot do is told: a secret, and DNS registration.
    let mut told = warned(&reply);
    told.sort();
    assert_eq!(
        told,
        [
            "config.dns.skip_registration",
            "config.files[1].secret_name"
        ]
    );
    let id = reply.body["id"].as_str().expect("id").to_owned();
    let stored = &reply.body["config"];
    assert_eq!(
        stored["files"][0]["guest_path"], "/etc/app.conf",
        "{stored}"
    );
    assert_eq!(stored["files"][0]["mode"], 384);
    assert_eq!(stored["dns"]["searches"][0], "corp.internal");
    assert_eq!(stored["init"]["exec"][2], "cat /etc/app.conf; sleep 3600");
    assert_eq!(
        upper_file(&harness, &id, "/etc/app.conf").as_deref(),
        Some("hello\n")
    );
    assert_eq!(
        upper_file(&harness, &id, "/etc/resolv.conf").as_deref(),
        Some("nameserver fd00::53\nsearch corp.internal\noptions ndots:1\n")
    );
    assert_eq!(upper_file(&harness, &id, "/run/secrets/token"), None);
    let spec = harness.runtime.spec(&id).await.expect("bundle spec");
    assert_eq!(
        spec.args,
        ["/bin/sh", "-c", "cat /etc/app.conf; sleep 3600"]
    );

    // An update writes them again, as the new config says.
    let mut updated = launch("files", config, true);
    updated["config"]["files"] = json!([{"guest_path": "/etc/app.conf", "raw_value": "Ynll"}]);
    updated["config"]["dns"] = json!({"nameservers": ["10.1.2.3"]});
    let (status, body) = harness
        .call(
            &harness.admin,
            Method::POST,
            &format!("/v1/apps/fly/machines/{id}"),
            Some(json!({"config": updated["config"], "skip_launch": true})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        upper_file(&harness, &id, "/etc/app.conf").as_deref(),
        Some("bye")
    );
    assert_eq!(
        upper_file(&harness, &id, "/etc/resolv.conf").as_deref(),
        Some("nameserver 10.1.2.3\n")
    );

    // Strict mode refuses what Berth would only tell.
    let strict = create(
        &harness,
        &[STRICT],
        launch(
            "files-strict",
            json!({"files": [{"guest_path": "/a", "raw_value": "", "secret_name": "X"}]}),
            true,
        ),
    )
    .await;
    assert_error(&(strict.status, strict.body.clone()), 400, "invalid_config");
    assert_eq!(strict.body["field"], "config.files[0].secret_name");
    let strict = create(
        &harness,
        &[STRICT],
        launch(
            "files-strict",
            json!({"files": [{"guest_path": "/a", "raw_value": "eA=="}],
                   "dns": {"nameservers": ["10.0.0.1"]}, "init": {"exec": ["/bin/true"]}}),
            true,
        ),
    )
    .await;
    assert_eq!(strict.status, 200, "{}", strict.body);
}

#[tokio::test]
async fn malformed_files_dns_and_exec_are_400_with_the_field_path() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "fly").await;
    for (config, field) in [
        (
            json!({"files": [{"guest_path": "etc/x", "raw_value": ""}]}),
            "config.files[0].guest_path",
        ),
        (
            json!({"files": [{"guest_path": "/etc/../x", "raw_value": ""}]}),
            "config.files[0].guest_path",
        ),
        (
            json!({"files": [{"guest_path": "/", "raw_value": ""}]}),
            "config.files[0].guest_path",
        ),
        (
            json!({"files": [{"guest_path": "/x", "raw_value": "not base64!"}]}),
            "config.files[0].raw_value",
        ),
        (
            json!({"files": [{"guest_path": "/x", "mode": 65535}]}),
            "config.files[0].mode",
        ),
        (
            json!({"files": [{"guest_path": "/x", "mode": "0644"}]}),
            "config.files[0].mode",
        ),
        (
            json!({"files": [{"guest_path": "/x"}, {"guest_path": "/x"}]}),
            "config.files[1].guest_path",
        ),
        (
            json!({"dns": {"nameservers": ["ns1"]}}),
            "config.dns.nameservers[0]",
        ),
        (
            json!({"dns": {"searches": ["a b"]}}),
            "config.dns.searches[0]",
        ),
        (
            json!({"dns": {"options": [{"name": "nd ots"}]}}),
            "config.dns.options[0].name",
        ),
        (json!({"init": {"exec": []}}), "config.init.exec"),
        (json!({"init": {"exec": "ls"}}), "config.init.exec"),
    ] {
        for headers in [&[][..], &[STRICT][..]] {
            let reply = create(&harness, headers, launch("bad", config.clone(), true)).await;
            assert_error(&(reply.status, reply.body.clone()), 400, "invalid_config");
            assert_eq!(reply.body["field"], field, "{config}: {}", reply.body);
        }
    }
    // A file too big once decoded.
    let big = "A".repeat(700 * 1024);
    let reply = create(
        &harness,
        &[],
        launch(
            "bad",
            json!({"files": [{"guest_path": "/x", "raw_value": big}]}),
            true,
        ),
    )
    .await;
    assert_error(&(reply.status, reply.body.clone()), 400, "invalid_config");
    assert_eq!(reply.body["field"], "config.files[0].raw_value");
    let (_, listed) = harness
        .call(&harness.admin, Method::GET, "/v1/apps/fly/machines", None)
        .await;
    assert_eq!(listed, json!([]), "nothing was made");
}

fn wall_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis(),
    )
    .expect("fits")
}

#[tokio::test]
async fn a_scheduled_machine_starts_once_a_period() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "fly").await;
    const HOUR: i64 = 3_600_000;
    for headers in [&[][..], &[STRICT][..]] {
        let reply = create(
            &harness,
            headers,
            launch("cron", json!({"schedule": "hourly"}), true),
        )
        .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert!(warned(&reply).is_empty(), "{}", reply.body);
        assert_eq!(reply.body["config"]["schedule"], "hourly");
        let (status, _) = harness
            .call(
                &harness.admin,
                Method::DELETE,
                &format!(
                    "/v1/apps/fly/machines/{}",
                    reply.body["id"].as_str().expect("id")
                ),
                None,
            )
            .await;
        assert_eq!(status, 200);
    }
    let reply = create(
        &harness,
        &[],
        launch("cron", json!({"schedule": "hourly"}), true),
    )
    .await;
    let id = reply.body["id"].as_str().expect("id").to_owned();
    let created = wall_ms();
    let state = |body: &Value| body["state"].as_str().map(str::to_owned);

    // Not due yet: nothing starts, and the answer says when the first start is.
    let next = harness
        .agent
        .run_schedules_at(created + HOUR / 2)
        .await
        .expect("schedules");
    assert!(
        next.is_some_and(|due| due <= created + HOUR && due > created),
        "{next:?}"
    );
    assert_eq!(
        state(&get(&harness, &id).await.1).as_deref(),
        Some("created")
    );

    // An hour after its creation it starts, once.
    harness
        .agent
        .run_schedules_at(created + HOUR)
        .await
        .expect("schedules");
    let (_, body) = get(&harness, &id).await;
    assert_eq!(state(&body).as_deref(), Some("started"), "{body}");
    let (_, body) = harness
        .call(
            &harness.admin,
            Method::POST,
            &format!("/v1/apps/fly/machines/{id}/stop"),
            None,
        )
        .await;
    assert_eq!(body["machine"]["state"], "stopped", "{body}");
    harness
        .agent
        .run_schedules_at(created + HOUR + 60_000)
        .await
        .expect("schedules");
    assert_eq!(
        state(&get(&harness, &id).await.1).as_deref(),
        Some("stopped"),
        "started twice in one hour"
    );

    // The next hour: again.
    harness
        .agent
        .run_schedules_at(created + 2 * HOUR)
        .await
        .expect("schedules");
    assert_eq!(
        state(&get(&harness, &id).await.1).as_deref(),
        Some("started")
    );
    // Still running when the third hour comes: left to run, nothing recorded.
    let (_, before) = harness
        .call(
            &harness.admin,
            Method::GET,
            &format!("/v1/apps/fly/machines/{id}/events"),
            None,
        )
        .await;
    harness
        .agent
        .run_schedules_at(created + 3 * HOUR)
        .await
        .expect("schedules");
    let (_, after) = harness
        .call(
            &harness.admin,
            Method::GET,
            &format!("/v1/apps/fly/machines/{id}/events"),
            None,
        )
        .await;
    assert_eq!(before, after);
    let starts = after
        .as_array()
        .expect("events")
        .iter()
        .filter(|event| {
            event["type"] == "start"
                && event["source"] == "flyd"
                && event["berth_source"] == "system"
        })
        .count();
    assert_eq!(starts, 2, "{after}");

    let reply = create(
        &harness,
        &[],
        launch("bad", json!({"schedule": "yearly"}), true),
    )
    .await;
    assert_error(&(reply.status, reply.body.clone()), 400, "invalid_config");
    assert_eq!(reply.body["field"], "config.schedule", "{}", reply.body);
}

/// `config.standbys` (Fly's `MachineConfig.Standbys`): ids of Machines of the same app,
/// kept in the config and not warned; anything else is 422 `invalid_standbys` at create
/// and update, in both modes, and makes nothing.
#[tokio::test]
async fn standbys_name_other_machines_of_the_app_or_are_refused() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "fly").await;
    harness.app(&harness.admin, "other").await;
    let primary = create(&harness, &[], launch("primary", json!({}), true)).await;
    assert_eq!(primary.status, 200, "{}", primary.body);
    let primary_id = primary.body["id"].as_str().expect("id").to_owned();
    let foreign = harness
        .send(
            &harness.admin,
            Method::POST,
            "/v1/apps/other/machines",
            &[],
            Some(launch("foreign", json!({}), true)),
        )
        .await;
    assert_eq!(foreign.status, 200, "{}", foreign.body);
    let foreign_id = foreign.body["id"].as_str().expect("id").to_owned();

    for headers in [&[][..], &[STRICT][..]] {
        for standbys in [
            json!(["00000000000000"]),
            json!([foreign_id]),
            json!([primary_id, primary_id]),
        ] {
            let reply = create(
                &harness,
                headers,
                launch("standby", json!({"standbys": standbys}), true),
            )
            .await;
            assert_error(&(reply.status, reply.body.clone()), 422, "invalid_standbys");
        }
        let reply = create(
            &harness,
            headers,
            launch("standby", json!({"standbys": primary_id}), true),
        )
        .await;
        assert_error(&(reply.status, reply.body.clone()), 400, "invalid_config");
        assert_eq!(reply.body["field"], "config.standbys", "{}", reply.body);
    }
    let (_, listed) = harness
        .call(&harness.admin, Method::GET, "/v1/apps/fly/machines", None)
        .await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");

    let standby = create(
        &harness,
        &[STRICT],
        launch("standby", json!({"standbys": [primary_id]}), true),
    )
    .await;
    assert_eq!(standby.status, 200, "{}", standby.body);
    assert!(warned(&standby).is_empty(), "{}", standby.body);
    assert_eq!(standby.body["config"]["standbys"], json!([primary_id]));
    let standby_id = standby.body["id"].as_str().expect("id").to_owned();
    let (_, got) = get(&harness, &standby_id).await;
    assert_eq!(got["config"]["standbys"], json!([primary_id]), "{got}");

    // An update is checked the same way, and a Machine cannot stand by for itself.
    let mut config = got["config"].clone();
    config["standbys"] = json!([standby_id]);
    let reply = harness
        .call(
            &harness.admin,
            Method::POST,
            &format!("/v1/apps/fly/machines/{standby_id}"),
            Some(json!({"config": config, "skip_launch": true})),
        )
        .await;
    assert_error(&reply, 422, "invalid_standbys");
    let (_, unchanged) = get(&harness, &standby_id).await;
    assert_eq!(unchanged["config"]["standbys"], json!([primary_id]));
}
