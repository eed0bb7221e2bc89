//! Answers in Fly's shapes: the apps list, Machine events and wait's parameters, decoded
//! into structs written from the fields Fly's OpenAPI description and Go client document.

mod common;

use common::{assert_error, Harness};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

/// Fly's `ListAppsResponse`.
#[derive(Debug, Deserialize)]
struct FlyListApps {
    total_apps: u64,
    apps: Vec<FlyApp>,
}

/// Fly's `App`.
#[derive(Debug, Deserialize)]
struct FlyApp {
    id: String,
    name: String,
    machine_count: u64,
    volume_count: u64,
    network: String,
    organization: FlyOrganization,
}

#[derive(Debug, Deserialize)]
struct FlyOrganization {
    name: String,
    slug: String,
}

/// Fly's `MachineEvent`.
#[derive(Debug, Deserialize)]
struct FlyMachineEvent {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    status: String,
    source: String,
    timestamp: i64,
}

#[tokio::test]
async fn events_carry_fly_s_fields_and_page_by_their_string_ids() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "ev").await;
    let id = harness.machine(&harness.admin, "ev", true).await;
    let base = format!("/v1/apps/ev/machines/{id}");
    let (status, reply) = harness
        .call(&harness.admin, Method::POST, &format!("{base}/stop"), None)
        .await;
    assert_eq!(status, 200, "{reply}");

    let (status, reply) = harness
        .call(&harness.admin, Method::GET, &format!("{base}/events"), None)
        .await;
    assert_eq!(status, 200, "{reply}");
    let events: Vec<FlyMachineEvent> = serde_json::from_value(reply.clone()).expect("Fly's shape");
    let seen: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|e| (e.kind.as_str(), e.status.as_str(), e.source.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("launch", "created", "user"),
            ("start", "started", "user"),
            ("stop", "stopped", "user")
        ],
        "{reply}"
    );
    // Milliseconds since 1970, not seconds: after 2020 and in order.
    assert!(
        events.iter().all(|e| e.timestamp > 1_577_836_800_000),
        "{reply}"
    );
    assert!(events
        .windows(2)
        .all(|pair| pair[0].timestamp <= pair[1].timestamp));

    // The string ids page as the numbers they spell.
    let first: i64 = events[0].id.parse().expect("a decimal id");
    let (_, page) = harness
        .call(
            &harness.admin,
            Method::GET,
            &format!("{base}/events?since={first}"),
            None,
        )
        .await;
    let page: Vec<FlyMachineEvent> = serde_json::from_value(page).expect("Fly's shape");
    let ids: Vec<&str> = page.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, [events[1].id.as_str(), events[2].id.as_str()]);
}

/// `source` carries Fly's values (`user`, `flyd`, `proxy`), never Berth's finer names,
/// which stay in `berth_source` for one release: an exit is the platform's (`flyd`), a
/// start the proxy asked for is `proxy`.
#[tokio::test]
async fn event_sources_are_fly_s_with_berth_s_kept_beside() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "ev").await;
    let id = harness.machine(&harness.admin, "ev", true).await;
    let base = format!("/v1/apps/ev/machines/{id}");
    let (status, reply) = harness
        .call(
            &harness.admin,
            Method::POST,
            &format!("{base}/stop"),
            Some(json!({"source": "autostop"})),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let (status, reply) = harness
        .call(
            &harness.admin,
            Method::POST,
            &format!("{base}/start"),
            Some(json!({"source": "autostart"})),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let (_, reply) = harness
        .call(&harness.admin, Method::GET, &format!("{base}/events"), None)
        .await;
    let events: Vec<FlyMachineEvent> = serde_json::from_value(reply.clone()).expect("Fly's shape");
    let sources: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.kind.as_str(), e.source.as_str()))
        .collect();
    assert_eq!(
        sources,
        [
            ("launch", "user"),
            ("start", "user"),
            ("stop", "proxy"),
            ("start", "proxy")
        ],
        "{reply}"
    );
    let berth: Vec<&str> = reply
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["berth_source"].as_str())
        .collect();
    assert_eq!(berth, ["user", "user", "autostop", "autostart"], "{reply}");
}

#[tokio::test]
async fn the_apps_list_is_fly_s_envelope_with_each_app_s_organization() {
    let harness = Harness::start().await;
    let (status, reply) = harness
        .call(
            &harness.admin,
            Method::POST,
            "/v1/orgs",
            Some(json!({"slug": "acme", "name": "Acme Inc"})),
        )
        .await;
    assert_eq!(status, 201, "{reply}");
    let acme = harness.token("acme", "acme-bot").await;
    let other = harness.org("other", json!({})).await;
    harness.app(&acme, "shop").await;
    harness.app(&other, "elsewhere").await;
    harness.machine(&acme, "shop", false).await;

    let (status, reply) = harness.call(&acme, Method::GET, "/v1/apps", None).await;
    assert_eq!(status, 200, "{reply}");
    let listed: FlyListApps = serde_json::from_value(reply.clone()).expect("Fly's shape");
    assert_eq!(listed.total_apps, 1, "{reply}");
    let app = &listed.apps[0];
    assert!(!app.id.is_empty());
    assert_eq!(
        (app.name.as_str(), app.machine_count, app.volume_count),
        ("shop", 1, 0)
    );
    assert_eq!(app.network, "default");
    assert_eq!(
        (
            app.organization.name.as_str(),
            app.organization.slug.as_str()
        ),
        ("Acme Inc", "acme")
    );
    // Berth's earlier name stays for one release.
    assert_eq!(reply["apps"][0]["org_slug"], "acme");

    // The admin sees both orgs' apps, and `?org_slug=` narrows them as Fly's does.
    let (_, reply) = harness
        .call(&harness.admin, Method::GET, "/v1/apps", None)
        .await;
    let all: FlyListApps = serde_json::from_value(reply.clone()).expect("Fly's shape");
    assert_eq!(all.total_apps, 2, "{reply}");
    let (_, reply) = harness
        .call(&harness.admin, Method::GET, "/v1/apps?org_slug=other", None)
        .await;
    let narrowed: FlyListApps = serde_json::from_value(reply.clone()).expect("Fly's shape");
    let names: Vec<&str> = narrowed.apps.iter().map(|app| app.name.as_str()).collect();
    assert_eq!((narrowed.total_apps, names), (1, vec!["elsewhere"]));

    // One app reads the same way.
    let (status, reply) = harness
        .call(&acme, Method::GET, "/v1/apps/shop", None)
        .await;
    assert_eq!(status, 200, "{reply}");
    let one: FlyApp = serde_json::from_value(reply).expect("Fly's shape");
    assert_eq!(one.organization.slug, "acme");
}

/// Fly's `WaitMachineResponse`.
#[derive(Debug, Deserialize)]
struct FlyWait {
    ok: bool,
    state: String,
    version: String,
}

#[tokio::test]
async fn wait_takes_fly_s_version_repeated_states_and_settled() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "waits").await;
    let id = harness.machine(&harness.admin, "waits", true).await;
    let base = format!("/v1/apps/waits/machines/{id}");
    let (_, machine) = harness.call(&harness.admin, Method::GET, &base, None).await;
    let version = machine["instance_id"]
        .as_str()
        .expect("instance")
        .to_owned();
    let wait = |query: String| {
        let harness = &harness;
        let url = format!("{base}/wait?{query}");
        async move { harness.call(&harness.admin, Method::GET, &url, None).await }
    };

    // Any of the states named: the started Machine answers a wait for stopped or started.
    let (status, reply) = wait(format!(
        "state=stopped&state=started&version={version}&timeout=0"
    ))
    .await;
    assert_eq!(status, 200, "{reply}");
    let answer: FlyWait = serde_json::from_value(reply.clone()).expect("Fly's shape");
    assert!(answer.ok);
    assert_eq!(
        (answer.state.as_str(), answer.version.as_str()),
        ("started", version.as_str())
    );
    assert_eq!(
        reply["instance_id"],
        version.as_str(),
        "kept for one release"
    );

    // Settled: no operation in flight, whatever the state.
    let (status, reply) = wait("state=settled&timeout=0".into()).await;
    assert_eq!(
        (status, reply["state"].clone()),
        (200, json!("started")),
        "{reply}"
    );
    // Neither named state is reached: the existing timeout answer.
    let (status, reply) = wait("state=stopped&state=failed&timeout=0".into()).await;
    assert_eq!(status, 408, "{reply}");
    assert_eq!(reply["error"], "timeout");
    assert!(
        reply["message"]
            .as_str()
            .unwrap_or_default()
            .contains("stopped or failed"),
        "{reply}"
    );
    // The Machine is started, not suspended, so a wait for suspended runs out.
    assert_error(
        &wait("state=suspended&timeout=0".into()).await,
        408,
        "timeout",
    );

    // instance_id is still read; naming two different versions is refused.
    let (status, reply) = wait(format!("instance_id={version}&timeout=0")).await;
    assert_eq!(status, 200, "{reply}");
    assert_error(
        &wait(format!("version={version}&instance_id=01OTHER&timeout=0")).await,
        400,
        "invalid_config",
    );
    let (status, reply) = wait("version=01OTHER&timeout=0".into()).await;
    assert_eq!(status, 408, "another version does not count: {reply}");
    for bad in [
        "state=sleeping",
        "timeout=soon",
        "timeout=1&timeout=2",
        "colour=red",
    ] {
        assert_error(&wait(bad.into()).await, 400, "invalid_config");
    }

    // After a stop, settled answers stopped.
    let (status, reply) = harness
        .call(&harness.admin, Method::POST, &format!("{base}/stop"), None)
        .await;
    assert_eq!(status, 200, "{reply}");
    let (status, reply) = wait("state=settled&timeout=0".into()).await;
    assert_eq!(
        (status, reply["state"].clone()),
        (200, json!("stopped")),
        "{reply}"
    );
}

#[tokio::test]
async fn the_openapi_description_shows_fly_s_shapes_for_apps_events_and_wait() {
    let harness = Harness::start().await;
    let doc: Value = reqwest::get(format!("{}/v1/openapi.json", harness.url))
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    let schemas = &doc["components"]["schemas"];
    let fields = |schema: &str| -> Vec<String> {
        schemas[schema]["properties"]
            .as_object()
            .map(|properties| properties.keys().cloned().collect())
            .unwrap_or_default()
    };
    for (schema, wanted) in [
        ("ListAppsResponse", &["total_apps", "apps"][..]),
        ("App", &["organization", "volume_count", "network"][..]),
        (
            "MachineEventAnswer",
            &["id", "type", "status", "source", "timestamp", "request"][..],
        ),
        ("WaitResponse", &["ok", "state", "version"][..]),
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
        schemas["MachineEventAnswer"]["properties"]["id"]["type"],
        "string"
    );
    // `source` is described with Fly's values; Berth's stay in `berth_source`.
    assert_eq!(
        schemas["MachineEventAnswer"]["properties"]["source"]["$ref"],
        "#/components/schemas/FlyEventSource"
    );
    assert_eq!(
        schemas["FlyEventSource"]["enum"],
        json!(["user", "flyd", "proxy"])
    );
    assert!(
        schemas["MachineEventAnswer"]["properties"]["berth_source"].is_object(),
        "{}",
        schemas["MachineEventAnswer"]
    );
    let wait = &doc["paths"]["/v1/apps/{app}/machines/{id}/wait"]["get"]["parameters"];
    let param = |name: &str| {
        wait.as_array()
            .and_then(|params| params.iter().find(|param| param["name"] == name))
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(param("state")["schema"]["type"], "array", "{wait}");
    assert_eq!(param("state")["explode"], true, "{wait}");
    assert!(param("version").is_object(), "{wait}");
    let list = &doc["paths"]["/v1/apps"]["get"];
    assert!(
        list["parameters"].to_string().contains("org_slug"),
        "{list}"
    );
}
