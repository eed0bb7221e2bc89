//! Orgs and tokens, tenancy at every route, and the OpenAPI description against the router.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use berth_control::ApiClock;
use common::{assert_error, Harness, IMAGE};
use reqwest::Method;
use serde_json::{json, Value};

#[tokio::test]
async fn tokens_are_shown_once_hashed_revocable_and_expire() {
    let harness = Harness::start_with(|config| config.clock = ApiClock::manual()).await;
    let token = harness.org("acme", json!({})).await;
    assert!(token.starts_with("bt_"));
    let (status, org) = harness
        .call(&token, Method::GET, "/v1/orgs/acme", None)
        .await;
    assert_eq!(status, 200, "{org}");
    assert_eq!(org["slug"], "acme");
    assert_eq!(org["limits"]["rate_limits"]["read"]["burst"], 10);

    // Only the hash is stored: the secret appears nowhere in the database (on PostgreSQL,
    // in no column of any stored token).
    let db = if common::postgres::postgres_selected() {
        use sqlx::Row;
        let rows = sqlx::query("SELECT id, org_slug, name, hash FROM tokens")
            .fetch_all(harness.control.store().pool())
            .await
            .expect("tokens");
        assert!(!rows.is_empty());
        let mut bytes = Vec::new();
        for row in rows {
            for column in 0..3 {
                bytes.extend(row.get::<String, _>(column).into_bytes());
            }
            bytes.extend(row.get::<Vec<u8>, _>(3));
        }
        bytes
    } else {
        std::fs::read(harness.dir.path().join("control.db")).expect("db")
    };
    let secret = token.rsplit('_').next().expect("secret");
    assert!(!db
        .windows(secret.len())
        .any(|window| window == secret.as_bytes()));
    let (_, listed) = harness.call(&token, Method::GET, "/v1/tokens", None).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert!(listed[0].get("token").is_none(), "{listed}");

    // 401s look the same whether the token never existed, was revoked or expired.
    let garbage = harness
        .call("bt_0000_1111", Method::GET, "/v1/apps", None)
        .await;
    assert_error(&garbage, 401, "unauthorized");
    let forged = format!("{}x", &token[..token.len() - 1]);
    assert_eq!(
        harness.call(&forged, Method::GET, "/v1/apps", None).await,
        garbage
    );
    let id = listed[0]["id"].as_str().expect("id");
    let (status, revoked) = harness
        .call(
            &harness.admin,
            Method::DELETE,
            &format!("/v1/tokens/{id}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{revoked}");
    assert!(revoked["revoked_at"].is_string());
    assert_eq!(
        harness.call(&token, Method::GET, "/v1/apps", None).await,
        garbage
    );

    let (status, created) = harness
        .call(
            &harness.admin,
            Method::POST,
            "/v1/tokens",
            Some(json!({"org_slug": "acme", "name": "short", "expires_in": "1h"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let short = created["token"].as_str().expect("token").to_owned();
    assert_eq!(
        harness.call(&short, Method::GET, "/v1/apps", None).await.0,
        200
    );
    harness.clock.advance(Duration::from_secs(3601));
    assert_eq!(
        harness.call(&short, Method::GET, "/v1/apps", None).await,
        garbage
    );

    // Tokens of orgs that do not exist, bad names and bad lifetimes are refused.
    for (body, status, code) in [
        (json!({"org_slug": "nope", "name": "x"}), 404, "not_found"),
        (
            json!({"org_slug": "acme", "name": "Bad Name"}),
            400,
            "invalid_config",
        ),
        (
            json!({"org_slug": "acme", "name": "x", "expires_in": -5}),
            400,
            "invalid_config",
        ),
        (
            json!({"org_slug": "acme", "name": "x", "expires_in": 1e300}),
            400,
            "invalid_config",
        ),
    ] {
        let reply = harness
            .call(&harness.admin, Method::POST, "/v1/tokens", Some(body))
            .await;
        assert_error(&reply, status, code);
    }
}

/// What each route gets in these tests: a query string and a body.
fn sample(method: &str, path: &str) -> Option<(&'static str, Option<Value>)> {
    let machine_config = json!({"skip_launch": true, "config": {"image": IMAGE}});
    Some(match (method, path) {
        ("get", "/v1/health" | "/v1/openapi.json") => ("", None),
        ("post", "/v1/orgs") => ("", Some(json!({"slug": "intruder"}))),
        ("get", "/v1/orgs" | "/v1/orgs/{slug}") => ("", None),
        ("put", "/v1/orgs/{slug}/limits") => ("", Some(json!({}))),
        ("post", "/v1/tokens") => ("", Some(json!({"org_slug": "victim", "name": "stolen"}))),
        ("get", "/v1/tokens") => ("", None),
        ("delete", "/v1/tokens/{token_id}") => ("", None),
        ("post", "/v1/apps") => (
            "",
            Some(json!({"app_name": "sneaky", "org_slug": "victim"})),
        ),
        ("get", "/v1/apps" | "/v1/apps/{app}") => ("", None),
        ("delete", "/v1/apps/{app}") => ("", None),
        ("post", "/v1/apps/{app}/machines") => ("", Some(machine_config)),
        ("get", "/v1/apps/{app}/machines") => ("", None),
        ("get", "/v1/apps/{app}/machines/{id}") => ("", None),
        ("post", "/v1/apps/{app}/machines/{id}") => ("", Some(machine_config)),
        ("delete", "/v1/apps/{app}/machines/{id}") => ("?kill=true", None),
        ("post", "/v1/apps/{app}/machines/{id}/start" | "/v1/apps/{app}/machines/{id}/stop") => {
            ("", None)
        }
        ("post", "/v1/apps/{app}/machines/{id}/signal") => ("", Some(json!({"signal": "SIGUSR1"}))),
        (
            "post",
            "/v1/apps/{app}/machines/{id}/restart" | "/v1/apps/{app}/machines/{id}/suspend",
        ) => ("", None),
        (
            "post",
            "/v1/apps/{app}/machines/{id}/cordon" | "/v1/apps/{app}/machines/{id}/uncordon",
        ) => ("", None),
        ("get", "/v1/apps/{app}/machines/{id}/ps" | "/v1/apps/{app}/machines/{id}/versions") => {
            ("", None)
        }
        ("post", "/v1/apps/{app}/machines/{id}/migrate") => ("", Some(json!({}))),
        ("post", "/v1/apps/{app}/machines/{id}/recreate") => {
            ("", Some(json!({"lose_state": true})))
        }
        ("get", "/v1/apps/{app}/machines/{id}/wait") => ("?state=started&timeout=0", None),
        ("get", "/v1/apps/{app}/machines/{id}/events") => ("?since=0", None),
        ("get", "/v1/apps/{app}/machines/{id}/logs") => ("", None),
        ("post", "/v1/apps/{app}/machines/{id}/exec") => ("", Some(json!({"cmd": ["echo", "hi"]}))),
        ("get", "/v1/apps/{app}/machines/{id}/metadata") => ("", None),
        ("post", "/v1/apps/{app}/machines/{id}/metadata/{key}") => {
            ("", Some(json!({"value": "v"})))
        }
        ("delete", "/v1/apps/{app}/machines/{id}/metadata/{key}") => ("", None),
        ("post" | "get" | "delete", "/v1/apps/{app}/machines/{id}/lease") => ("", None),
        ("get", "/v1/images") => ("", None),
        ("post", "/v1/images/import") => ("?name=demo/evil:1", None),
        ("delete", "/v1/images") => ("?name=demo/busybox:1", None),
        ("delete", "/v1/images/{*reference}") => ("", None),
        ("post", "/v1/images/pull") => ("", Some(json!({"image": "demo/nothing:1"}))),
        ("post", "/v1/images/prune") => ("", None),
        ("get", "/v1/orgs/{org}/usage") => ("?group_by=app", None),
        ("get", "/v1/workers" | "/v1/workers/{name}") => ("", None),
        ("post", "/v1/workers/{name}/drain") => ("", None),
        ("post", "/v1/workers/{name}/cordon" | "/v1/workers/{name}/uncordon") => ("", None),
        ("get", "/v1/workers/{name}/doctor") => ("", None),
        ("post", "/v1/workers/{name}/doctor/repair") => ("", None),
        ("post", "/v1/apps/{app}/volumes") => ("", Some(json!({"name": "vol", "size_gb": 1}))),
        ("get", "/v1/apps/{app}/volumes" | "/v1/apps/{app}/volumes/{volume_id}") => ("", None),
        ("put", "/v1/apps/{app}/volumes/{volume_id}") => ("", Some(json!({}))),
        ("delete", "/v1/apps/{app}/volumes/{volume_id}") => ("", None),
        ("put", "/v1/apps/{app}/volumes/{volume_id}/extend") => ("", Some(json!({"size_gb": 2}))),
        ("get" | "post", "/v1/apps/{app}/volumes/{volume_id}/snapshots") => ("", None),
        ("get", "/v1/apps/{app}/machines/{id}/checkpoints") => ("", None),
        ("post", "/v1/apps/{app}/machines/{id}/checkpoints") => ("", Some(json!({"comment": "c"}))),
        ("delete", "/v1/apps/{app}/machines/{id}/checkpoints/{checkpoint}") => ("", None),
        ("post", "/v1/apps/{app}/machines/{id}/checkpoints/{checkpoint}/restore") => ("", None),
        ("post", "/v1/apps/{app}/machines/{id}/fork") => ("", Some(json!({}))),
        _ => return None,
    })
}

/// Every (method, path) of the published description.
async fn operations(harness: &Harness) -> Vec<(String, String)> {
    let response = reqwest::get(format!("{}/v1/openapi.json", harness.url))
        .await
        .expect("openapi");
    assert_eq!(response.status().as_u16(), 200);
    let doc: Value = response.json().await.expect("json");
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in ["get", "post", "put", "patch", "delete"] {
            if item.get(method).is_some() {
                out.push((method.to_owned(), path.clone()));
            }
        }
    }
    assert!(out.len() >= 30, "{out:?}");
    out
}

fn fill(path: &str, values: &BTreeMap<&str, String>) -> String {
    let mut filled = path.to_owned();
    for (name, value) in values {
        filled = filled.replace(&format!("{{{name}}}"), value);
    }
    assert!(!filled.contains('{'), "unfilled parameter in {path}");
    filled
}

fn method(name: &str) -> Method {
    Method::from_bytes(name.to_uppercase().as_bytes()).expect("method")
}

#[tokio::test]
async fn another_orgs_things_answer_404_at_every_route() {
    let harness = Harness::start().await;
    let high = json!({"rate_limits": {
        "read": {"per_second": 1000.0, "burst": 1000},
        "update": {"per_second": 1000.0, "burst": 1000}}});
    let victim = harness.org("victim", high.clone()).await;
    let intruder = harness.org("intruder-org", high).await;
    harness.app(&victim, "victim-app").await;
    let machine = harness.machine(&victim, "victim-app", true).await;
    let (status, volume) = harness
        .call(
            &victim,
            Method::POST,
            "/v1/apps/victim-app/volumes",
            Some(json!({"name": "vol", "size_gb": 1})),
        )
        .await;
    assert_eq!(status, 200, "{volume}");
    let volume = volume["id"].as_str().expect("volume id").to_owned();
    let (_, tokens) = harness
        .call(
            &harness.admin,
            Method::GET,
            "/v1/tokens?org_slug=victim",
            None,
        )
        .await;
    let values: BTreeMap<&str, String> = [
        ("slug", "victim".to_owned()),
        ("org", "victim".to_owned()),
        ("name", "local".to_owned()),
        ("app", "victim-app".to_owned()),
        ("id", machine.clone()),
        ("key", "owner".to_owned()),
        ("token_id", tokens[0]["id"].as_str().expect("id").to_owned()),
        ("*reference", "demo/busybox:1".to_owned()),
        ("volume_id", volume.clone()),
        ("checkpoint", "cp_0000000000000000".to_owned()),
    ]
    .into();
    let base = format!("/v1/apps/victim-app/machines/{machine}");
    let (status, _) = harness
        .call(
            &victim,
            Method::POST,
            &format!("{base}/metadata/owner"),
            Some(json!({"value": "v"})),
        )
        .await;
    assert_eq!(status, 204);

    for (verb, path) in operations(&harness).await {
        let (query, body) = sample(&verb, &path)
            .unwrap_or_else(|| panic!("{verb} {path} is new: give it a sample request here"));
        let url = format!("{}{query}", fill(&path, &values));
        let reply = harness
            .call(&intruder, method(&verb), &url, body.clone())
            .await;
        match (verb.as_str(), path.as_str()) {
            // Open to everyone.
            ("get", "/v1/health" | "/v1/openapi.json") => assert_eq!(reply.0, 200),
            // The operator's alone.
            (
                "post",
                "/v1/orgs"
                | "/v1/tokens"
                | "/v1/images/import"
                | "/v1/images/pull"
                | "/v1/images/prune"
                | "/v1/workers/{name}/cordon"
                | "/v1/workers/{name}/uncordon"
                | "/v1/workers/{name}/drain"
                | "/v1/workers/{name}/doctor/repair",
            )
            | ("delete", "/v1/images" | "/v1/images/{*reference}")
            | ("get", "/v1/workers" | "/v1/workers/{name}" | "/v1/workers/{name}/doctor") => {
                assert_error(&reply, 403, "forbidden")
            }
            // Lists show only the caller's own org.
            ("get", "/v1/apps" | "/v1/orgs" | "/v1/tokens") => {
                assert_eq!(reply.0, 200, "{}", reply.1);
                let text = reply.1.to_string();
                assert!(!text.contains("victim"), "{verb} {path} leaked: {text}");
            }
            ("get", "/v1/images") => assert_eq!(reply.0, 200, "{}", reply.1),
            _ => {
                assert!(path.contains('{') || path == "/v1/apps", "{verb} {path}");
                assert_error(&reply, 404, "not_found");
                // Exactly like a thing that does not exist.
                let ghost = url
                    .replace("victim-app", "ghost-app")
                    .replace(&machine, "00000000000000")
                    .replace("/orgs/victim", "/orgs/ghost");
                let missing = harness.call(&intruder, method(&verb), &ghost, body).await;
                if !path.contains("{token_id}") {
                    assert_eq!(missing.0, 404, "{verb} {ghost}: {}", missing.1);
                }
            }
        }
    }
    // Nothing the intruder did touched the victim's things.
    let (status, machine_json) = harness.call(&victim, Method::GET, &base, None).await;
    assert_eq!(status, 200, "{machine_json}");
    assert_eq!(machine_json["state"], "started");
    assert_eq!(machine_json["config"]["metadata"]["owner"], "v");
    let (status, volume_json) = harness
        .call(
            &victim,
            Method::GET,
            &format!("/v1/apps/victim-app/volumes/{volume}"),
            None,
        )
        .await;
    assert_eq!(
        (status, volume_json["size_gb"].as_u64()),
        (200, Some(1)),
        "{volume_json}"
    );
    let (status, _) = harness.call(&victim, Method::GET, "/v1/apps", None).await;
    assert_eq!(status, 200, "the victim's token still works");
}

#[tokio::test]
async fn orgs_take_a_display_name_as_fly_orgs_have_one() {
    let harness = Harness::start().await;
    let (status, created) = harness
        .call(
            &harness.admin,
            Method::POST,
            "/v1/orgs",
            Some(json!({"slug": "acme-corp", "name": "Acme Corp"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        (&created["slug"], &created["name"]),
        (&json!("acme-corp"), &json!("Acme Corp"))
    );
    let (status, read) = harness
        .call(&harness.admin, Method::GET, "/v1/orgs/acme-corp", None)
        .await;
    assert_eq!((status, &read["name"]), (200, &json!("Acme Corp")));
    let (_, listed) = harness
        .call(&harness.admin, Method::GET, "/v1/orgs", None)
        .await;
    let listed = listed.as_array().expect("orgs");
    assert!(listed
        .iter()
        .any(|org| org["slug"] == "acme-corp" && org["name"] == "Acme Corp"));
    // Without a name, an org is named by its slug (as the orgs made before names were).
    let (status, plain) = harness
        .call(
            &harness.admin,
            Method::POST,
            "/v1/orgs",
            Some(json!({"slug": "plain"})),
        )
        .await;
    assert_eq!((status, &plain["name"]), (201, &json!("plain")));
    assert!(listed
        .iter()
        .any(|org| org["slug"] == "personal" && org["name"] == "personal"));
    for name in [json!(""), json!("a\nb"), json!("x".repeat(129)), json!(5)] {
        let reply = harness
            .call(
                &harness.admin,
                Method::POST,
                "/v1/orgs",
                Some(json!({"slug": "badname", "name": name})),
            )
            .await;
        assert_error(&reply, 400, "invalid_config");
        assert_eq!(reply.1["field"], "name", "{}", reply.1);
    }
    let (status, _) = harness
        .call(&harness.admin, Method::GET, "/v1/orgs/badname", None)
        .await;
    assert_eq!(status, 404, "a refused org is not made");
}

#[tokio::test]
async fn the_openapi_description_and_the_router_agree() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "doc-app").await;
    let machine = harness.machine(&harness.admin, "doc-app", false).await;
    let values: BTreeMap<&str, String> = [
        ("slug", "personal".to_owned()),
        ("org", "personal".to_owned()),
        ("name", "local".to_owned()),
        ("app", "doc-app".to_owned()),
        ("id", machine),
        ("key", "k".to_owned()),
        ("token_id", "0000000000000000".to_owned()),
        ("*reference", "demo/busybox:1".to_owned()),
        ("volume_id", "vol_0000000000000000".to_owned()),
        ("checkpoint", "cp_0000000000000000".to_owned()),
    ]
    .into();
    let operations = operations(&harness).await;
    let mut by_path: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (verb, path) in &operations {
        by_path.entry(path.clone()).or_default().push(verb.clone());
    }
    // Documented → served: every operation reaches a handler, none falls through.
    for (verb, path) in &operations {
        let (query, body) =
            sample(verb, path).unwrap_or_else(|| panic!("no sample for {verb} {path}"));
        let url = format!("{}{query}", fill(path, &values));
        let (status, reply) = harness.call(&harness.admin, method(verb), &url, body).await;
        assert_ne!(status, 405, "{verb} {path}: {reply}");
        assert!(
            !(status == 404 && reply["message"] == "route not found"),
            "{verb} {path} is documented but not routed"
        );
        assert!(status < 500, "{verb} {path}: {status} {reply}");
    }
    // Served → documented: every other method on a documented path is refused in JSON.
    for (path, verbs) in &by_path {
        let url = fill(path, &values);
        for verb in ["get", "post", "put", "patch", "delete"] {
            if verbs.iter().any(|documented| documented == verb) {
                continue;
            }
            let reply = harness.call(&harness.admin, method(verb), &url, None).await;
            assert_error(&reply, 405, "method_not_allowed");
        }
    }
    // And no route is added around the description: the server's modules register
    // routes only through `routes!`, which documents them.
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for entry in std::fs::read_dir(&src).expect("src") {
        let path = entry.expect("entry").path();
        // Two protocols that are not the public API: the OCI distribution endpoints agents
        // pull images from, and the agents' join and heartbeat calls.
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or_default();
        if name == "registry.rs" || name == "workers.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        for forbidden in [
            ".route(",
            ".route_service(",
            ".nest_service(",
            "axum::routing",
        ] {
            assert!(
                !text.contains(forbidden),
                "{} registers a route with {forbidden}, which the OpenAPI description would miss",
                path.display()
            );
        }
    }
    // Unknown paths are JSON 404s.
    let reply = harness
        .call(&harness.admin, Method::GET, "/v1/nothing/here", None)
        .await;
    assert_error(&reply, 404, "not_found");
}

#[tokio::test]
async fn the_agents_routes_check_the_join_token_before_the_body() {
    let harness = Harness::start().await;
    for path in [
        "/v1/internal/workers/register",
        "/v1/internal/workers/w9/heartbeat",
    ] {
        // A stranger with a malformed body learns only that it may not call.
        let reply = harness
            .call(
                "not-the-join-token",
                Method::POST,
                path,
                Some(json!({"x": 1})),
            )
            .await;
        assert_error(&reply, 401, "unauthorized");
        // Even the admin token is not the join token.
        let reply = harness
            .call(&harness.admin, Method::POST, path, Some(json!({"x": 1})))
            .await;
        assert_error(&reply, 401, "unauthorized");
    }
}

#[tokio::test]
async fn the_image_list_shows_each_org_only_its_own_machines() {
    let harness = Harness::start().await;
    let acme = harness.org("acme", json!({})).await;
    let globex = harness.org("globex", json!({})).await;
    harness.app(&acme, "acme-web").await;
    harness.app(&globex, "globex-web").await;
    let acme_machine = harness.machine(&acme, "acme-web", false).await;
    let globex_machine = harness.machine(&globex, "globex-web", false).await;
    let machines_of = |listed: &Value| -> Vec<String> {
        let mut ids: Vec<String> = listed
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|image| image["machines"].as_array().cloned().unwrap_or_default())
            .filter_map(|id| id.as_str().map(str::to_owned))
            .collect();
        ids.sort();
        ids
    };
    let (status, listed) = harness.call(&acme, Method::GET, "/v1/images", None).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(machines_of(&listed), std::slice::from_ref(&acme_machine));
    let (_, listed) = harness.call(&globex, Method::GET, "/v1/images", None).await;
    assert_eq!(machines_of(&listed), std::slice::from_ref(&globex_machine));
    let (_, listed) = harness
        .call(&harness.admin, Method::GET, "/v1/images", None)
        .await;
    let mut both = vec![acme_machine, globex_machine];
    both.sort();
    assert_eq!(machines_of(&listed), both);
}
