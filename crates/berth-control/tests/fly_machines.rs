//! Fly's remaining Machine routes and Machine JSON against Berth: cordon and uncordon,
//! `ps`, `versions`, the list's filters, `rootfs` as an object, `host_status`, `events`,
//! create's `lease_ttl` nonce, Fly's event names, wait's `from_event_id` and the default
//! restart policy. Answers are decoded into Fly's documented shapes (`Machine`,
//! `MachineVersion`, `ProcessStat`, `MachineEvent`), in the default and the strict mode.

mod common;

use std::collections::BTreeMap;

use common::{assert_error, Harness, IMAGE};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

const STRICT: (&str, &str) = ("berth-strict", "true");
const NONCE: &str = "fly-machine-lease-nonce";

/// Fly's Machine as its clients decode it, with the fields this file is about.
#[derive(Debug, Deserialize)]
struct FlyMachine {
    id: String,
    state: String,
    region: String,
    instance_id: String,
    #[serde(default)]
    config: Option<FlyConfig>,
    image_ref: FlyImageRef,
    #[serde(default)]
    events: Vec<FlyEvent>,
    #[serde(default)]
    nonce: String,
    #[serde(default)]
    host_status: String,
    cordoned: bool,
}

#[derive(Debug, Deserialize)]
struct FlyConfig {
    image: String,
    #[serde(default)]
    env: BTreeMap<String, String>,
    restart: FlyRestart,
    rootfs: FlyRootfs,
    guest: FlyGuest,
}

#[derive(Debug, Deserialize)]
struct FlyRestart {
    policy: String,
    max_retries: u32,
}

#[derive(Debug, Deserialize)]
struct FlyRootfs {
    persist: String,
    #[serde(default)]
    size_gb: u64,
}

#[derive(Debug, Deserialize)]
struct FlyGuest {
    #[serde(default)]
    disk_mb: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct FlyImageRef {
    repository: String,
    digest: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct FlyEvent {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    status: String,
    source: String,
    timestamp: i64,
}

#[derive(Debug, Deserialize)]
struct FlyVersion {
    version: String,
    user_config: FlyConfig,
}

#[derive(Debug, Deserialize)]
struct FlyProcess {
    pid: i32,
    command: String,
    cpu: u64,
    rss: u64,
    stime: u64,
    rtime: u64,
    directory: String,
    listen_sockets: Vec<Value>,
}

async fn get(harness: &Harness, path: &str) -> Value {
    let (status, reply) = harness.call(&harness.admin, Method::GET, path, None).await;
    assert_eq!(status, 200, "{path}: {reply}");
    reply
}

async fn post(harness: &Harness, path: &str, body: Option<Value>) -> Value {
    let (status, reply) = harness.call(&harness.admin, Method::POST, path, body).await;
    assert_eq!(status, 200, "{path}: {reply}");
    reply
}

async fn machine(harness: &Harness, base: &str) -> FlyMachine {
    serde_json::from_value(get(harness, base).await).expect("Fly's Machine")
}

async fn create(harness: &Harness, app: &str, body: Value) -> FlyMachine {
    let reply = post(harness, &format!("/v1/apps/{app}/machines"), Some(body)).await;
    serde_json::from_value(reply).expect("Fly's Machine")
}

#[tokio::test]
async fn cordon_is_kept_in_the_machine_json_until_uncordon() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "cord").await;
    let id = harness.machine(&harness.admin, "cord", true).await;
    let base = format!("/v1/apps/cord/machines/{id}");
    assert!(!machine(&harness, &base).await.cordoned);

    // Fly's client sends no body; the answer is a plain 200.
    let reply = post(&harness, &format!("{base}/cordon"), None).await;
    assert_eq!(reply, json!({"ok": true}));
    let cordoned = machine(&harness, &base).await;
    assert!(cordoned.cordoned);
    assert_eq!(cordoned.events[0].kind, "cordon", "newest first");
    assert_eq!(cordoned.events[0].status, "started", "the run goes on");
    // Cordoning twice changes nothing and records nothing.
    post(&harness, &format!("{base}/cordon"), None).await;
    let again = machine(&harness, &base).await;
    assert_eq!(again.events[0].id, cordoned.events[0].id);

    // It survives stop and start.
    post(&harness, &format!("{base}/stop"), None).await;
    post(&harness, &format!("{base}/start"), None).await;
    let restarted = machine(&harness, &base).await;
    assert!(restarted.cordoned);
    assert_eq!(restarted.state, "started");

    post(&harness, &format!("{base}/uncordon"), None).await;
    let uncordoned = machine(&harness, &base).await;
    assert!(!uncordoned.cordoned);
    assert_eq!(uncordoned.events[0].kind, "uncordon");
    // The list says so too.
    let listed: Vec<FlyMachine> =
        serde_json::from_value(get(&harness, "/v1/apps/cord/machines").await).expect("list");
    assert!(!listed[0].cordoned);
}

#[tokio::test]
async fn cordon_respects_a_held_lease() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "cord").await;
    let id = harness.machine(&harness.admin, "cord", false).await;
    let base = format!("/v1/apps/cord/machines/{id}");
    let lease = post(&harness, &format!("{base}/lease"), None).await;
    let nonce = lease["data"]["nonce"].as_str().expect("nonce").to_owned();
    let refused = harness
        .call(
            &harness.admin,
            Method::POST,
            &format!("{base}/cordon"),
            None,
        )
        .await;
    assert_error(&refused, 409, "lease_held");
    assert!(!machine(&harness, &base).await.cordoned);
    let reply = harness
        .send(
            &harness.admin,
            Method::POST,
            &format!("{base}/cordon"),
            &[(NONCE, &nonce)],
            None,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(machine(&harness, &base).await.cordoned);
}

#[tokio::test]
async fn versions_list_one_config_per_create_and_update_newest_first() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "ver").await;
    let created = create(
        &harness,
        "ver",
        json!({"skip_launch": true, "config": {"image": IMAGE, "env": {"V": "1"}}}),
    )
    .await;
    let base = format!("/v1/apps/ver/machines/{}", created.id);
    let versions: Vec<FlyVersion> =
        serde_json::from_value(get(&harness, &format!("{base}/versions")).await).expect("Fly's");
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].version, created.instance_id);
    assert_eq!(versions[0].user_config.env["V"], "1");

    let updated: FlyMachine = serde_json::from_value(
        post(
            &harness,
            &base,
            Some(json!({"skip_launch": true, "config": {"image": IMAGE, "env": {"V": "2"}}})),
        )
        .await,
    )
    .expect("Fly's Machine");
    assert_ne!(updated.instance_id, created.instance_id, "a new version");
    let raw = get(&harness, &format!("{base}/versions")).await;
    assert!(raw[0]["created_at"].is_string(), "{raw}");
    let versions: Vec<FlyVersion> = serde_json::from_value(raw).expect("Fly's");
    let seen: Vec<(&str, &str)> = versions
        .iter()
        .map(|v| (v.version.as_str(), v.user_config.env["V"].as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (updated.instance_id.as_str(), "2"),
            (created.instance_id.as_str(), "1")
        ]
    );
    assert_eq!(versions[0].user_config.image, IMAGE);

    // Stop and start are not versions.
    post(&harness, &format!("{base}/start"), None).await;
    post(&harness, &format!("{base}/stop"), None).await;
    let (_, raw) = harness
        .call(
            &harness.admin,
            Method::GET,
            &format!("{base}/versions"),
            None,
        )
        .await;
    assert_eq!(raw.as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn ps_lists_a_started_machine_and_refuses_a_stopped_one() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "ps").await;
    let id = harness.machine(&harness.admin, "ps", false).await;
    let base = format!("/v1/apps/ps/machines/{id}");
    let refused = harness
        .call(&harness.admin, Method::GET, &format!("{base}/ps"), None)
        .await;
    assert_error(&refused, 409, "invalid_state");
    assert_eq!(refused.1["state"], "created");
    post(&harness, &format!("{base}/start"), None).await;
    let processes: Vec<FlyProcess> =
        serde_json::from_value(get(&harness, &format!("{base}/ps")).await).expect("Fly's");
    assert_eq!(processes[0].pid, 1);
    assert!(!processes[0].command.is_empty());
    let _ = (
        processes[0].cpu,
        processes[0].rss,
        processes[0].stime,
        processes[0].rtime,
        &processes[0].directory,
        &processes[0].listen_sockets,
    );
}

#[tokio::test]
async fn the_list_filters_by_region_state_and_keeps_destroyed_ones_when_asked() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "many").await;
    let started = harness.machine(&harness.admin, "many", true).await;
    let stopped = harness.machine(&harness.admin, "many", false).await;
    let doomed = harness.machine(&harness.admin, "many", false).await;
    let ids = |reply: Value| -> Vec<String> {
        let mut ids: Vec<String> = reply
            .as_array()
            .expect("list")
            .iter()
            .map(|m| m["id"].as_str().expect("id").to_owned())
            .collect();
        ids.sort();
        ids
    };
    let sorted = |mut list: Vec<String>| {
        list.sort();
        list
    };
    let list = |query: &str| format!("/v1/apps/many/machines{query}");

    assert_eq!(
        ids(get(&harness, &list("?state=started")).await),
        std::slice::from_ref(&started)
    );
    // Fly's comma-separated form and the repeated one.
    let both = sorted(vec![started.clone(), stopped.clone(), doomed.clone()]);
    assert_eq!(
        ids(get(&harness, &list("?state=started,created")).await),
        both
    );
    assert_eq!(
        ids(get(&harness, &list("?state=started&state=created")).await),
        both
    );
    assert!(ids(get(&harness, &list("?state=suspended")).await).is_empty());
    assert_error(
        &harness
            .call(&harness.admin, Method::GET, &list("?state=asleep"), None)
            .await,
        400,
        "invalid_config",
    );
    assert_eq!(ids(get(&harness, &list("?region=test")).await), both);
    assert!(ids(get(&harness, &list("?region=elsewhere")).await).is_empty());

    // Destroyed: gone from the list, back with include_deleted, as `destroyed`.
    let (status, reply) = harness
        .call(
            &harness.admin,
            Method::DELETE,
            &format!("/v1/apps/many/machines/{doomed}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let live = sorted(vec![started.clone(), stopped.clone()]);
    assert_eq!(ids(get(&harness, &list("")).await), live);
    assert_eq!(
        ids(get(&harness, &list("?include_deleted=false")).await),
        live
    );
    let all = get(&harness, &list("?include_deleted=true")).await;
    assert_eq!(ids(all.clone()), both);
    let buried: Vec<FlyMachine> = serde_json::from_value(all).expect("Fly's Machines");
    let buried = buried
        .iter()
        .find(|m| m.id == doomed)
        .expect("the destroyed one");
    assert_eq!(buried.state, "destroyed");
    assert_eq!(
        ids(get(&harness, &list("?include_deleted=true&state=destroyed")).await),
        std::slice::from_ref(&doomed)
    );
    // Still not a Machine one can act on.
    let (status, _) = harness
        .call(
            &harness.admin,
            Method::GET,
            &format!("/v1/apps/many/machines/{doomed}"),
            None,
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_summary_leaves_out_the_heavy_parts() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "sum").await;
    let id = harness.machine(&harness.admin, "sum", true).await;
    let full = get(&harness, "/v1/apps/sum/machines").await;
    for key in ["config", "events", "host_status"] {
        assert!(full[0].get(key).is_some(), "{key} in the full list: {full}");
    }
    let summary = get(&harness, "/v1/apps/sum/machines?summary=true").await;
    let entry = summary[0].as_object().expect("object");
    assert_eq!(entry["id"], id.as_str());
    assert_eq!(entry["state"], "started");
    for key in [
        "config",
        "checks",
        "events",
        "host_status",
        "worker_status",
        "nonce",
    ] {
        assert!(!entry.contains_key(key), "{key} in a summary: {summary}");
    }
    let _: FlyMachine = serde_json::from_value(summary[0].clone()).expect("Fly's Machine");
}

#[tokio::test]
async fn get_carries_recent_events_newest_first_in_fly_s_names() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "ev").await;
    let id = harness.machine(&harness.admin, "ev", true).await;
    let base = format!("/v1/apps/ev/machines/{id}");
    post(&harness, &format!("{base}/stop"), None).await;
    let got = machine(&harness, &base).await;
    assert_eq!(got.host_status, "ok");
    let seen: Vec<(&str, &str, &str)> = got
        .events
        .iter()
        .map(|e| (e.kind.as_str(), e.status.as_str(), e.source.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("stop", "stopped", "user"),
            ("start", "started", "user"),
            ("launch", "created", "user")
        ]
    );
    assert!(got.events.iter().all(|e| e.timestamp > 1_577_836_800_000));
    // The ids are the event ids GET …/events pages with.
    let listed = get(&harness, &format!("{base}/events")).await;
    assert_eq!(listed[0]["id"].as_str(), Some(got.events[2].id.as_str()));
    assert_eq!(
        listed[0]["kind"], "create",
        "Berth's earlier name stays in kind"
    );
    // Only the newest ten.
    for _ in 0..6 {
        post(&harness, &format!("{base}/start"), None).await;
        post(&harness, &format!("{base}/stop"), None).await;
    }
    assert_eq!(machine(&harness, &base).await.events.len(), 10);
    let _ = (&got.region, &got.image_ref.labels);
    assert!(got.image_ref.digest.starts_with("sha256:"));
    assert!(!got.image_ref.repository.is_empty());
}

#[tokio::test]
async fn create_with_lease_ttl_answers_the_lease_nonce() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "leased").await;
    // Strict mode knows the field.
    let reply = harness
        .send(
            &harness.admin,
            Method::POST,
            "/v1/apps/leased/machines",
            &[STRICT],
            Some(json!({"skip_launch": true, "lease_ttl": 60, "config": {"image": IMAGE}})),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.body.get("warnings").is_none(), "{}", reply.body);
    let created: FlyMachine = serde_json::from_value(reply.body).expect("Fly's Machine");
    assert_eq!(created.nonce.len(), 32, "the lease's nonce");
    let base = format!("/v1/apps/leased/machines/{}", created.id);
    let lease = get(&harness, &format!("{base}/lease")).await;
    assert_eq!(lease["data"]["nonce"], created.nonce.as_str());
    // The lease holds: a start without the nonce is refused, with it goes.
    assert_error(
        &harness
            .call(&harness.admin, Method::POST, &format!("{base}/start"), None)
            .await,
        409,
        "lease_held",
    );
    let started = harness
        .send(
            &harness.admin,
            Method::POST,
            &format!("{base}/start"),
            &[(NONCE, &created.nonce)],
            None,
        )
        .await;
    assert_eq!(started.status, 200, "{}", started.body);
    // GET never carries a nonce.
    assert!(machine(&harness, &base).await.nonce.is_empty());
    // A create without it has none.
    let plain = create(
        &harness,
        "leased",
        json!({"skip_launch": true, "config": {"image": IMAGE}}),
    )
    .await;
    assert!(plain.nonce.is_empty());
    for ttl in [json!(0), json!(86_401)] {
        let refused = harness
            .call(
                &harness.admin,
                Method::POST,
                "/v1/apps/leased/machines",
                Some(json!({"skip_launch": true, "lease_ttl": ttl, "config": {"image": IMAGE}})),
            )
            .await;
        assert_error(&refused, 400, "invalid_config");
        assert_eq!(refused.1["field"], "lease_ttl");
    }
}

#[tokio::test]
async fn rootfs_is_fly_s_object_and_reads_berth_s_strings() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "fs").await;
    let config =
        |rootfs: Value| json!({"skip_launch": true, "config": {"image": IMAGE, "rootfs": rootfs}});
    let persist = |machine: &FlyMachine| {
        machine
            .config
            .as_ref()
            .map(|config| config.rootfs.persist.clone())
            .expect("config")
    };
    let default = create(
        &harness,
        "fs",
        json!({"skip_launch": true, "config": {"image": IMAGE}}),
    )
    .await;
    assert_eq!(persist(&default), "always");
    for (given, expected) in [
        (json!({"persist": "restart"}), "restart"),
        (json!({"persist": "always"}), "always"),
        (json!("ephemeral"), "restart"),
        (json!("persistent"), "always"),
    ] {
        let made = create(&harness, "fs", config(given.clone())).await;
        assert_eq!(persist(&made), expected, "{given}");
    }
    let sized = create(&harness, "fs", config(json!({"size_gb": 2}))).await;
    let sized_config = sized.config.as_ref().expect("config");
    assert_eq!(sized_config.rootfs.size_gb, 2);
    assert_eq!(sized_config.guest.disk_mb, Some(2048), "the disk it sizes");
    for (rootfs, field) in [
        (json!({"persist": "never"}), "config.rootfs.persist"),
        (json!({"persist": "sometimes"}), "config.rootfs"),
    ] {
        let refused = harness
            .call(
                &harness.admin,
                Method::POST,
                "/v1/apps/fs/machines",
                Some(config(rootfs)),
            )
            .await;
        assert_error(&refused, 400, "invalid_config");
        assert!(
            refused.1["field"]
                .as_str()
                .is_some_and(|path| path.starts_with(field)),
            "{}",
            refused.1
        );
    }
    // Strict mode reads both forms too.
    for rootfs in [
        json!({"persist": "restart", "size_gb": 1}),
        json!("ephemeral"),
    ] {
        let reply = harness
            .send(
                &harness.admin,
                Method::POST,
                "/v1/apps/fs/machines",
                &[STRICT],
                Some(config(rootfs.clone())),
            )
            .await;
        assert_eq!(reply.status, 200, "{rootfs}: {}", reply.body);
    }
}

#[tokio::test]
async fn a_config_without_a_restart_policy_gets_fly_s_default() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "rs").await;
    let made = create(
        &harness,
        "rs",
        json!({"skip_launch": true, "config": {"image": IMAGE}}),
    )
    .await;
    let restart = &made.config.as_ref().expect("config").restart;
    assert_eq!(
        (restart.policy.as_str(), restart.max_retries),
        ("on-failure", 10)
    );
    // A named policy is kept as named; on-failure alone gets the default retries.
    let named = create(
        &harness,
        "rs",
        json!({"skip_launch": true, "config": {"image": IMAGE, "restart": {"policy": "on-failure"}}}),
    )
    .await;
    assert_eq!(
        named.config.as_ref().expect("config").restart.max_retries,
        10
    );
    let no = post(
        &harness,
        "/v1/apps/rs/machines",
        Some(json!({"skip_launch": true, "config": {"image": IMAGE, "restart": {"policy": "no"}}})),
    )
    .await;
    assert_eq!(no["config"]["restart"], json!({"policy": "no"}));
    // An update without one gets it too.
    let base = format!("/v1/apps/rs/machines/{}", no["id"].as_str().expect("id"));
    let updated = post(
        &harness,
        &base,
        Some(json!({"skip_launch": true, "config": {"image": IMAGE}})),
    )
    .await;
    assert_eq!(
        updated["config"]["restart"],
        json!({"policy": "on-failure", "max_retries": 10})
    );
}

#[tokio::test]
async fn wait_from_an_event_counts_only_later_changes() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "w").await;
    let id = harness.machine(&harness.admin, "w", true).await;
    let base = format!("/v1/apps/w/machines/{id}");
    let events = get(&harness, &format!("{base}/events")).await;
    let launch = events[0]["id"].as_str().expect("id").to_owned();
    let start = events[1]["id"].as_str().expect("id").to_owned();
    assert_eq!(events[1]["type"], "start");

    // Reached by an event after the launch: answered at once.
    let wait = |state: &str, from: &str, timeout: u32| {
        format!("{base}/wait?state={state}&from_event_id={from}&timeout={timeout}")
    };
    let reply = get(&harness, &wait("started", &launch, 5)).await;
    assert_eq!(reply["state"], "started");
    // Started already, but by the start event itself, not after it: only a later change
    // answers.
    let (status, reply) = harness
        .call(
            &harness.admin,
            Method::GET,
            &wait("started", &start, 1),
            None,
        )
        .await;
    assert_eq!(status, 408, "{reply}");
    assert_eq!(reply["error"], "timeout");

    let waiter = {
        let harness_url = harness.url.clone();
        let admin = harness.admin.clone();
        let url = wait("stopped", &start, 10);
        tokio::spawn(async move {
            reqwest::Client::new()
                .get(format!("{harness_url}{url}"))
                .bearer_auth(admin)
                .send()
                .await
                .expect("wait")
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    post(&harness, &format!("{base}/stop"), None).await;
    let answered = waiter.await.expect("waiter");
    assert_eq!(answered.status().as_u16(), 200);

    let refused = harness
        .call(
            &harness.admin,
            Method::GET,
            &wait("started", "01ABC", 1),
            None,
        )
        .await;
    assert_error(&refused, 400, "invalid_config");
    assert_eq!(refused.1["field"], "from_event_id");
}

#[tokio::test]
async fn the_openapi_description_has_these_routes_fields_and_parameters() {
    let harness = Harness::start().await;
    let doc = get(&harness, "/v1/openapi.json").await;
    let paths = &doc["paths"];
    for (path, verb) in [
        ("/v1/apps/{app}/machines/{id}/cordon", "post"),
        ("/v1/apps/{app}/machines/{id}/uncordon", "post"),
        ("/v1/apps/{app}/machines/{id}/ps", "get"),
        ("/v1/apps/{app}/machines/{id}/versions", "get"),
    ] {
        assert!(paths[path][verb].is_object(), "{verb} {path}");
    }
    let params = |path: &str| -> Vec<String> {
        paths[path]["get"]["parameters"]
            .as_array()
            .map(|list| {
                list.iter()
                    .filter_map(|param| param["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let list = params("/v1/apps/{app}/machines");
    for name in ["region", "state", "include_deleted", "summary"] {
        assert!(list.iter().any(|param| param == name), "{name}: {list:?}");
    }
    let wait = params("/v1/apps/{app}/machines/{id}/wait");
    assert!(
        wait.iter().any(|param| param == "from_event_id"),
        "{wait:?}"
    );
    let schemas = &doc["components"]["schemas"];
    // A summary list leaves `config` out, so a client generated from the description
    // must not require it.
    let required = schemas["Machine"]["required"]
        .as_array()
        .expect("Machine's required fields");
    assert!(required.iter().any(|field| field == "id"), "{required:?}");
    assert!(
        !required.iter().any(|field| field == "config"),
        "{required:?}"
    );
    let fields = |schema: &str| -> Vec<String> {
        schemas[schema]["properties"]
            .as_object()
            .map(|properties| properties.keys().cloned().collect())
            .unwrap_or_default()
    };
    for (schema, wanted) in [
        (
            "Machine",
            &[
                "events",
                "host_status",
                "cordoned",
                "nonce",
                "worker_status",
            ][..],
        ),
        ("ImageRef", &["registry", "labels"][..]),
        ("RootfsConfig", &["persist", "size_gb"][..]),
        ("MachineVersion", &["version", "user_config"][..]),
        (
            "ProcessStat",
            &[
                "pid",
                "command",
                "cpu",
                "rss",
                "stime",
                "rtime",
                "directory",
                "listen_sockets",
            ][..],
        ),
        ("ListenSocket", &["proto", "address"][..]),
        ("CreateMachineRequest", &["lease_ttl"][..]),
    ] {
        let have = fields(schema);
        for field in wanted {
            assert!(
                have.iter().any(|f| f == field),
                "{schema} lacks {field}: {have:?}"
            );
        }
    }
    assert_eq!(
        schemas["MachineEventAnswer"]["properties"]["type"]["type"],
        "string"
    );
}
