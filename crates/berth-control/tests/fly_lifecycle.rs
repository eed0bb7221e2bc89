//! Fly's lifecycle routes beyond start and stop: `signal` (body `{signal}`), `restart`
//! (`?timeout=` and `?signal=`) and `suspend`, shaped as Fly's OpenAPI description and
//! fly-go send them, answered with Fly's `{ok}` or a JSON error with a stable code.

mod common;

use common::{assert_error, Harness};
use reqwest::Method;
use serde::Deserialize;
use serde_json::json;

/// What Fly answers signal and restart with.
#[derive(Debug, Deserialize)]
struct FlyOk {
    ok: bool,
}

const FLY_NONCE: &str = "fly-machine-lease-nonce";

/// An org whose rate limits do not get in the way, its token and a started Machine.
async fn started_machine(harness: &Harness) -> (String, String) {
    let token = harness
        .org(
            "flylife",
            json!({"rate_limits": {"start": {"per_second": 100.0, "burst": 100},
                                   "stop": {"per_second": 100.0, "burst": 100}}}),
        )
        .await;
    harness.app(&token, "flylife-app").await;
    let id = harness.machine(&token, "flylife-app", true).await;
    (token, id)
}

fn count(calls: &[String], call: &str) -> usize {
    calls.iter().filter(|made| *made == call).count()
}

#[tokio::test]
async fn signal_reaches_a_started_machine_and_honours_the_lease() {
    let harness = Harness::start().await;
    let (token, id) = started_machine(&harness).await;
    let base = format!("/v1/apps/flylife-app/machines/{id}");
    let url = format!("{base}/signal");

    let (status, reply) = harness
        .call(
            &token,
            Method::POST,
            &url,
            Some(json!({"signal": "SIGUSR1"})),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let ok: FlyOk = serde_json::from_value(reply).expect("Fly's shape");
    assert!(ok.ok);
    let calls = harness.runtime.calls().await;
    assert_eq!(count(&calls, &format!("signal {id} 10")), 1, "{calls:?}");
    let (_, machine) = harness.call(&token, Method::GET, &base, None).await;
    assert_eq!(machine["state"], "started", "{machine}");

    // A name Berth does not send, or no name at all: the field is named.
    let refused = harness
        .call(
            &token,
            Method::POST,
            &url,
            Some(json!({"signal": "SIGSEGV"})),
        )
        .await;
    assert_error(&refused, 400, "invalid_config");
    assert_eq!(refused.1["field"], "signal");
    let refused = harness
        .call(&token, Method::POST, &url, Some(json!({})))
        .await;
    assert_error(&refused, 400, "invalid_config");

    // While a lease is held, only its nonce (in Fly's header) may signal.
    let taken = harness
        .send(
            &token,
            Method::POST,
            &format!("{base}/lease?ttl=60"),
            &[],
            None,
        )
        .await;
    assert_eq!(taken.status, 200, "{}", taken.body);
    let nonce = taken.body["data"]["nonce"]
        .as_str()
        .expect("nonce")
        .to_owned();
    let refused = harness
        .call(
            &token,
            Method::POST,
            &url,
            Some(json!({"signal": "SIGHUP"})),
        )
        .await;
    assert_error(&refused, 409, "lease_held");
    let reply = harness
        .send(
            &token,
            Method::POST,
            &url,
            &[(FLY_NONCE, &nonce)],
            Some(json!({"signal": "SIGHUP"})),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let calls = harness.runtime.calls().await;
    assert_eq!(count(&calls, &format!("signal {id} 1")), 1, "{calls:?}");

    // A stopped Machine has no command to signal.
    let reply = harness
        .send(
            &token,
            Method::POST,
            &format!("{base}/stop"),
            &[(FLY_NONCE, &nonce)],
            None,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = harness
        .send(
            &token,
            Method::POST,
            &url,
            &[(FLY_NONCE, &nonce)],
            Some(json!({"signal": "SIGUSR1"})),
        )
        .await;
    assert_error(&(reply.status, reply.body), 409, "invalid_state");
    let calls = harness.runtime.calls().await;
    assert_eq!(count(&calls, &format!("signal {id} 10")), 1, "{calls:?}");

    let missing = harness
        .call(
            &token,
            Method::POST,
            "/v1/apps/flylife-app/machines/nosuchmachine/signal",
            Some(json!({"signal": "SIGUSR1"})),
        )
        .await;
    assert_error(&missing, 404, "not_found");
}

#[tokio::test]
async fn restart_stops_with_the_asked_signal_then_starts() {
    let harness = Harness::start().await;
    let (token, id) = started_machine(&harness).await;
    let base = format!("/v1/apps/flylife-app/machines/{id}");
    let before = harness.runtime.calls().await;
    assert_eq!(count(&before, &format!("start {id}")), 1, "{before:?}");

    // As fly-go sends it: the query carries a Go duration and Fly's signal name.
    let (status, reply) = harness
        .call(
            &token,
            Method::POST,
            &format!("{base}/restart?timeout=10s&signal=SIGINT"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let ok: FlyOk = serde_json::from_value(reply).expect("Fly's shape");
    assert!(ok.ok);
    let calls = harness.runtime.calls().await;
    assert_eq!(count(&calls, &format!("signal {id} 2")), 1, "{calls:?}");
    assert_eq!(count(&calls, &format!("start {id}")), 2, "{calls:?}");
    let (_, machine) = harness.call(&token, Method::GET, &base, None).await;
    assert_eq!(machine["state"], "started", "{machine}");

    // Without parameters: the Machine's stop signal, SIGTERM by default.
    let (status, reply) = harness
        .call(&token, Method::POST, &format!("{base}/restart"), None)
        .await;
    assert_eq!(status, 200, "{reply}");
    let calls = harness.runtime.calls().await;
    assert_eq!(count(&calls, &format!("signal {id} 15")), 1, "{calls:?}");
    assert_eq!(count(&calls, &format!("start {id}")), 3, "{calls:?}");

    // Malformed parameters are refused before anything happens.
    for (query, field) in [("timeout=1m0", "timeout"), ("signal=SIGSEGV", "signal")] {
        let refused = harness
            .call(
                &token,
                Method::POST,
                &format!("{base}/restart?{query}"),
                None,
            )
            .await;
        assert_error(&refused, 400, "invalid_config");
        assert_eq!(refused.1["field"], field, "{query}");
    }
    let calls = harness.runtime.calls().await;
    assert_eq!(count(&calls, &format!("start {id}")), 3, "{calls:?}");
}

#[tokio::test]
async fn suspend_is_refused_with_a_stable_code() {
    let harness = Harness::start().await;
    let (token, id) = started_machine(&harness).await;
    let refused = harness
        .call(
            &token,
            Method::POST,
            &format!("/v1/apps/flylife-app/machines/{id}/suspend"),
            None,
        )
        .await;
    assert_error(&refused, 422, "suspend_unsupported");
    // The message names the Machine's driver (the fake's name here).
    let message = refused.1["message"].as_str().unwrap_or_default();
    assert!(message.contains("fake driver"), "{message}");
    let (_, machine) = harness
        .call(
            &token,
            Method::GET,
            &format!("/v1/apps/flylife-app/machines/{id}"),
            None,
        )
        .await;
    assert_eq!(machine["state"], "started", "{machine}");
    let missing = harness
        .call(
            &token,
            Method::POST,
            "/v1/apps/flylife-app/machines/nosuchmachine/suspend",
            None,
        )
        .await;
    assert_error(&missing, 404, "not_found");
}
