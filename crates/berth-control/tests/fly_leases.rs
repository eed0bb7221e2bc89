//! Conformance with Fly's lease API: the requests are shaped as fly-go's flaps client and
//! the clients generated from Fly's OpenAPI description send them, and the answers must
//! decode into the fields Fly documents for them.

mod common;

use std::time::Duration;

use berth_control::ApiClock;
use common::{assert_error, Harness, Reply};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

const FLY_NONCE: &str = "fly-machine-lease-nonce";
const BERTH_NONCE: &str = "berth-lease-nonce";

/// Fly's lease envelope: `status`, and the lease under `data`. Errors carry `error` (or
/// `code`) and `message` instead.
#[derive(Debug, Deserialize)]
struct FlyLeaseEnvelope {
    status: String,
    data: FlyLease,
}

/// Fly's lease: `expires_at` is Unix seconds, `version` changes with every take or
/// refresh.
#[derive(Debug, Deserialize)]
struct FlyLease {
    nonce: String,
    expires_at: i64,
    owner: String,
    description: String,
    version: String,
}

/// What Fly documents for a release: `{status, data: {ok}}`.
#[derive(Debug, Deserialize)]
struct FlyReleaseEnvelope {
    status: String,
    data: FlyReleased,
}

#[derive(Debug, Deserialize)]
struct FlyReleased {
    ok: bool,
}

fn lease(reply: &Reply) -> FlyLease {
    assert_eq!(reply.status, 200, "{}", reply.body);
    let envelope: FlyLeaseEnvelope =
        serde_json::from_value(reply.body.clone()).expect("Fly's lease shape");
    assert_eq!(envelope.status, "success");
    envelope.data
}

fn now_s(harness: &Harness) -> i64 {
    harness.clock.now_ms().div_euclid(1000)
}

/// A Machine under an org whose rate limits do not get in the way.
async fn leased_machine(harness: &Harness) -> (String, String, String) {
    let token = harness
        .org(
            "flyish",
            json!({"rate_limits": {"update": {"per_second": 100.0, "burst": 100},
                                   "start": {"per_second": 100.0, "burst": 100},
                                   "stop": {"per_second": 100.0, "burst": 100}}}),
        )
        .await;
    let rival = harness.token("flyish", "rival").await;
    harness.app(&token, "flyish-app").await;
    let id = harness.machine(&token, "flyish-app", false).await;
    (token, rival, format!("/v1/apps/flyish-app/machines/{id}"))
}

#[tokio::test]
async fn fly_go_acquires_refreshes_reads_and_releases_a_lease() {
    let harness = Harness::start_with(|config| config.clock = ApiClock::manual()).await;
    let (token, rival, base) = leased_machine(&harness).await;
    let url = format!("{base}/lease");

    // AcquireLease: POST .../lease?ttl=N, no body and no content type.
    let taken = harness
        .send(&token, Method::POST, &format!("{url}?ttl=120"), &[], None)
        .await;
    let taken = lease(&taken);
    assert_eq!(taken.nonce.len(), 32);
    assert_eq!(taken.expires_at, now_s(&harness) + 120);
    assert_eq!(taken.owner, "flyish-bot");
    assert_eq!(taken.description, "");
    assert!(!taken.version.is_empty());

    // FindLease: GET .../lease, the same lease.
    let found = lease(&harness.send(&rival, Method::GET, &url, &[], None).await);
    assert_eq!(
        (&found.nonce, found.expires_at, &found.version),
        (&taken.nonce, taken.expires_at, &taken.version)
    );

    // Somebody else's AcquireLease is a conflict that fly-go reads as an error.
    let refused = harness
        .send(&rival, Method::POST, &format!("{url}?ttl=5"), &[], None)
        .await;
    assert_error(&(refused.status, refused.body), 409, "lease_held");

    // RefreshLease: POST .../lease?ttl=N with the nonce in Fly's header.
    harness.clock.advance(Duration::from_secs(30));
    let refreshed = harness
        .send(
            &token,
            Method::POST,
            &format!("{url}?ttl=60"),
            &[(FLY_NONCE, &taken.nonce)],
            None,
        )
        .await;
    let refreshed = lease(&refreshed);
    assert_eq!(refreshed.nonce, taken.nonce);
    assert_eq!(refreshed.expires_at, now_s(&harness) + 60);
    assert_ne!(refreshed.version, taken.version);

    // Start and Stop carry the nonce in Fly's header; without it they are refused.
    let start = format!("{base}/start");
    let stop = format!("{base}/stop");
    let bare = harness.send(&token, Method::POST, &start, &[], None).await;
    assert_error(&(bare.status, bare.body), 409, "lease_held");
    let started = harness
        .send(
            &token,
            Method::POST,
            &start,
            &[(FLY_NONCE, &taken.nonce)],
            None,
        )
        .await;
    assert_eq!(started.status, 200, "{}", started.body);
    let stopped = harness
        .send(
            &token,
            Method::POST,
            &stop,
            &[(FLY_NONCE, &taken.nonce)],
            Some(json!({"signal": "SIGTERM"})),
        )
        .await;
    assert_eq!(stopped.status, 200, "{}", stopped.body);

    // ReleaseLease: DELETE .../lease with the nonce; a wrong one is a conflict.
    let wrong = "0123456789abcdef0123456789abcdef";
    let refused = harness
        .send(&token, Method::DELETE, &url, &[(FLY_NONCE, wrong)], None)
        .await;
    assert_error(&(refused.status, refused.body), 409, "lease_held");
    let released = harness
        .send(
            &token,
            Method::DELETE,
            &url,
            &[(FLY_NONCE, &taken.nonce)],
            None,
        )
        .await;
    assert_eq!(released.status, 200, "{}", released.body);
    let released: FlyReleaseEnvelope =
        serde_json::from_value(released.body).expect("Fly's release shape");
    assert_eq!(
        (released.status.as_str(), released.data.ok),
        ("success", true)
    );

    // No lease now: Fly's "lease not found", on read and on a second release.
    let gone = harness.send(&rival, Method::GET, &url, &[], None).await;
    assert_error(&(gone.status, gone.body), 404, "not_found");
    let again = harness
        .send(
            &token,
            Method::DELETE,
            &url,
            &[(FLY_NONCE, &taken.nonce)],
            None,
        )
        .await;
    assert_error(&(again.status, again.body), 404, "not_found");
}

#[tokio::test]
async fn generated_clients_send_the_ttl_in_the_body_and_berths_names_still_work() {
    let harness = Harness::start_with(|config| config.clock = ApiClock::manual()).await;
    let (token, rival, base) = leased_machine(&harness).await;
    let url = format!("{base}/lease");

    // The OpenAPI clients' CreateLeaseRequest: a JSON body with ttl and description.
    let reply = harness
        .send(
            &token,
            Method::POST,
            &url,
            &[],
            Some(json!({"ttl": 45, "description": "deploy"})),
        )
        .await;
    let taken = lease(&reply);
    assert_eq!(taken.expires_at, now_s(&harness) + 45);
    assert_eq!(taken.description, "deploy");
    // Berth's earlier fields stay beside Fly's for one release.
    assert_eq!(reply.body["nonce"], json!(taken.nonce));
    assert_eq!(reply.body["owner"], "flyish-bot");
    assert_eq!(reply.body["description"], "deploy");
    assert!(reply.body["expires_at"]
        .as_str()
        .is_some_and(|at| at.ends_with('Z')));

    // Berth's earlier header still carries the nonce; both headers may come if they agree.
    let start = format!("{base}/start");
    let other = "0123456789abcdef0123456789abcdef";
    for headers in [
        vec![(BERTH_NONCE, taken.nonce.as_str())],
        vec![
            (FLY_NONCE, taken.nonce.as_str()),
            (BERTH_NONCE, &taken.nonce),
        ],
    ] {
        let reply = harness
            .send(&token, Method::POST, &start, &headers, None)
            .await;
        assert_eq!(reply.status, 200, "{headers:?}: {}", reply.body);
    }
    // Two different nonces, or a malformed one in either header, are bad input.
    for headers in [
        vec![(FLY_NONCE, taken.nonce.as_str()), (BERTH_NONCE, other)],
        vec![(FLY_NONCE, "abc")],
        vec![(BERTH_NONCE, "ZZZ")],
    ] {
        let reply = harness
            .send(&token, Method::POST, &start, &headers, None)
            .await;
        assert_error(&(reply.status, reply.body), 400, "invalid_lease_nonce");
    }

    // The query's ttl and the body's must agree; a ttl that is not a number is refused.
    let nonce = [(FLY_NONCE, taken.nonce.as_str())];
    let agreeing = harness
        .send(
            &token,
            Method::POST,
            &format!("{url}?ttl=50"),
            &nonce,
            Some(json!({"ttl": 50})),
        )
        .await;
    assert_eq!(lease(&agreeing).expires_at, now_s(&harness) + 50);
    for query in ["?ttl=50", "?ttl=abc", "?ttl=0", "?ttl=86401", "?tll=5"] {
        let body = (query == "?ttl=50").then(|| json!({"ttl": 40}));
        let reply = harness
            .send(&token, Method::POST, &format!("{url}{query}"), &nonce, body)
            .await;
        assert_error(&(reply.status, reply.body), 400, "invalid_config");
    }

    // Releasing with Berth's earlier header, which also answers Berth's earlier `ok`.
    let refused = harness.send(&rival, Method::DELETE, &url, &[], None).await;
    assert_error(&(refused.status, refused.body), 409, "lease_held");
    let released = harness
        .send(
            &token,
            Method::DELETE,
            &url,
            &[(BERTH_NONCE, &taken.nonce)],
            None,
        )
        .await;
    assert_eq!(released.status, 200, "{}", released.body);
    assert_eq!(released.body["ok"], true);
    assert_eq!(released.body["data"]["ok"], true);
}

#[tokio::test]
async fn the_openapi_description_shows_both_headers_and_flys_lease_shape() {
    let harness = Harness::start().await;
    let doc: Value = reqwest::get(format!("{}/v1/openapi.json", harness.url))
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    let headers_of = |path: &str, method: &str| -> Vec<(String, bool)> {
        doc["paths"][path][method]["parameters"]
            .as_array()
            .expect("parameters")
            .iter()
            .filter(|param| param["in"] == "header")
            .filter(|param| {
                param["name"]
                    .as_str()
                    .is_some_and(|name| name.ends_with("lease-nonce"))
            })
            .map(|param| {
                (
                    param["name"].as_str().unwrap_or_default().to_owned(),
                    param["deprecated"] == true,
                )
            })
            .collect()
    };
    let both = vec![
        (FLY_NONCE.to_owned(), false),
        (BERTH_NONCE.to_owned(), true),
    ];
    for (path, method) in [
        ("/v1/apps/{app}/machines/{id}/lease", "post"),
        ("/v1/apps/{app}/machines/{id}/lease", "delete"),
        ("/v1/apps/{app}/machines/{id}/start", "post"),
        ("/v1/apps/{app}/machines/{id}/stop", "post"),
    ] {
        assert_eq!(headers_of(path, method), both, "{method} {path}");
    }
    let acquire = &doc["paths"]["/v1/apps/{app}/machines/{id}/lease"]["post"];
    assert!(acquire["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .any(|param| param["name"] == "ttl" && param["in"] == "query"));
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["LeaseResponse"]["properties"]["data"]["$ref"],
        "#/components/schemas/Lease"
    );
    let lease = &schemas["Lease"]["properties"];
    assert_eq!(lease["expires_at"]["type"], "integer");
    for field in ["nonce", "owner", "description", "version"] {
        assert_eq!(lease[field]["type"], "string", "{field}");
    }
}
