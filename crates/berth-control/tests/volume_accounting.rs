//! Volumes in an org's accounts: billed as storage by their provisioned size for as long
//! as they exist, and counted in the org's `max_volumes` and `max_volume_gb` quotas, which
//! hold under concurrent creates. The runtime is the fake.

mod common;

use berth_api::UsageKind;
use berth_worker::WorkerService;
use common::{assert_error, Harness};
use reqwest::Method;
use serde_json::{json, Value};

/// Generous rates, so that only the quotas refuse.
fn fast() -> Value {
    let rate = json!({"per_second": 1000.0, "burst": 1000});
    json!({"create": rate, "update": rate, "destroy": rate, "read": rate})
}

async fn create(harness: &Harness, token: &str, app: &str, size_gb: u32) -> (u16, Value) {
    harness
        .call(
            token,
            Method::POST,
            &format!("/v1/apps/{app}/volumes"),
            Some(json!({"name": "data", "size_gb": size_gb})),
        )
        .await
}

async fn org_usage(harness: &Harness, token: &str, org: &str) -> (u64, u64) {
    let (status, org) = harness
        .call(token, Method::GET, &format!("/v1/orgs/{org}"), None)
        .await;
    assert_eq!(status, 200, "{org}");
    let usage = &org["usage"];
    (
        usage["volumes"].as_u64().expect("volumes"),
        usage["volume_gb"].as_u64().expect("volume_gb"),
    )
}

async fn listed(harness: &Harness, token: &str, app: &str) -> usize {
    let (status, list) = harness
        .call(token, Method::GET, &format!("/v1/apps/{app}/volumes"), None)
        .await;
    assert_eq!(status, 200, "{list}");
    list.as_array().map_or(0, Vec::len)
}

fn exceeded(reply: &(u16, Value), quota: &str, limit: u64, current: u64) {
    assert_error(reply, 403, "quota_exceeded");
    assert_eq!(reply.1["quota"], quota, "{}", reply.1);
    assert_eq!(reply.1["limit"], limit, "{}", reply.1);
    assert_eq!(reply.1["current"], current, "{}", reply.1);
}

#[tokio::test]
async fn volume_quotas_count_volumes_and_their_size_at_create_and_extend() {
    let harness = Harness::start().await;
    let token = harness
        .org(
            "vq",
            json!({"quotas": {"max_volumes": 2, "max_volume_gb": 5}, "rate_limits": fast()}),
        )
        .await;
    harness.app(&token, "vq-app").await;
    let (_, org) = harness.call(&token, Method::GET, "/v1/orgs/vq", None).await;
    assert_eq!(org["limits"]["quotas"]["max_volumes"], 2, "{org}");
    assert_eq!(org["limits"]["quotas"]["max_volume_gb"], 5, "{org}");
    assert_eq!(org_usage(&harness, &token, "vq").await, (0, 0));

    let first = create(&harness, &token, "vq-app", 2).await;
    assert_eq!(first.0, 200, "{}", first.1);
    let first_id = first.1["id"].as_str().expect("id").to_owned();
    // 2 + 4 is past 5 GB: refused whole, nothing made.
    exceeded(
        &create(&harness, &token, "vq-app", 4).await,
        "max_volume_gb",
        5,
        2,
    );
    assert_eq!(listed(&harness, &token, "vq-app").await, 1);
    let second = create(&harness, &token, "vq-app", 3).await;
    assert_eq!(second.0, 200, "{}", second.1);
    let second_id = second.1["id"].as_str().expect("id").to_owned();
    assert_eq!(org_usage(&harness, &token, "vq").await, (2, 5));
    exceeded(
        &create(&harness, &token, "vq-app", 1).await,
        "max_volumes",
        2,
        2,
    );

    // An extend past the size quota is refused before the worker grows anything.
    let extend = |id: &str| format!("/v1/apps/vq-app/volumes/{id}/extend");
    let reply = harness
        .call(
            &token,
            Method::PUT,
            &extend(&first_id),
            Some(json!({"size_gb": 3})),
        )
        .await;
    exceeded(&reply, "max_volume_gb", 5, 5);
    assert_eq!(harness.runtime.volume_size(&first_id).await, Some(2 << 30));
    assert_eq!(org_usage(&harness, &token, "vq").await, (2, 5));
    // A refused extend (a shrink) gives back nothing it did not take.
    let reply = harness
        .call(
            &token,
            Method::PUT,
            &extend(&first_id),
            Some(json!({"size_gb": 1})),
        )
        .await;
    assert_error(&reply, 400, "invalid_config");
    assert_eq!(org_usage(&harness, &token, "vq").await, (2, 5));

    // A delete gives its share back; the freed room can be grown into.
    let (status, body) = harness
        .call(
            &token,
            Method::DELETE,
            &format!("/v1/apps/vq-app/volumes/{second_id}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(org_usage(&harness, &token, "vq").await, (1, 2));
    let reply = harness
        .call(
            &token,
            Method::PUT,
            &extend(&first_id),
            Some(json!({"size_gb": 5})),
        )
        .await;
    assert_eq!(reply.0, 200, "{}", reply.1);
    assert_eq!(org_usage(&harness, &token, "vq").await, (1, 5));
    exceeded(
        &create(&harness, &token, "vq-app", 1).await,
        "max_volume_gb",
        5,
        5,
    );

    // The admin raises the quota through the API; out-of-range values name the field.
    let limits = |quotas: Value| json!({"quotas": quotas, "rate_limits": fast()});
    let (status, body) = harness
        .call(
            &harness.admin,
            Method::PUT,
            "/v1/orgs/vq/limits",
            Some(limits(json!({"max_volume_gb": 1u64 << 31}))),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "quotas.max_volume_gb");
    let (status, body) = harness
        .call(
            &harness.admin,
            Method::PUT,
            "/v1/orgs/vq/limits",
            Some(limits(json!({"max_volumes": 2, "max_volume_gb": 6}))),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(create(&harness, &token, "vq-app", 1).await.0, 200);
    assert_eq!(org_usage(&harness, &token, "vq").await, (2, 6));
}

#[tokio::test]
async fn twenty_concurrent_creates_against_a_quota_of_three_make_exactly_three() {
    let harness = Harness::start().await;
    let token = harness
        .org(
            "crowded",
            json!({"quotas": {"max_volumes": 3}, "rate_limits": fast()}),
        )
        .await;
    harness.app(&token, "crowded-app").await;
    let creates = (0..20).map(|_| create(&harness, &token, "crowded-app", 1));
    let replies = futures::future::join_all(creates).await;
    let made = replies.iter().filter(|(status, _)| *status == 200).count();
    assert_eq!(made, 3, "{replies:?}");
    for reply in replies.iter().filter(|(status, _)| *status != 200) {
        exceeded(reply, "max_volumes", 3, 3);
    }
    assert_eq!(listed(&harness, &token, "crowded-app").await, 3);
    assert_eq!(org_usage(&harness, &token, "crowded").await, (3, 3));
}

#[tokio::test]
async fn a_volume_is_billed_by_its_size_from_create_to_delete_once() {
    let harness = Harness::start().await;
    let token = harness.org("billed", json!({"rate_limits": fast()})).await;
    harness.app(&token, "billed-app").await;
    let (status, created) = create(&harness, &token, "billed-app", 1).await;
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_str().expect("id").to_owned();
    // Long enough that the GB-hours are well above the report's rounding.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let reply = harness
        .call(
            &token,
            Method::PUT,
            &format!("/v1/apps/billed-app/volumes/{id}/extend"),
            Some(json!({"size_gb": 3})),
        )
        .await;
    assert_eq!(reply.0, 200, "{}", reply.1);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (status, body) = harness
        .call(
            &token,
            Method::DELETE,
            &format!("/v1/apps/billed-app/volumes/{id}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // The worker journaled the life: created at 1 GiB, grown to 3, deleted.
    let journal: Vec<_> = harness
        .agent
        .usage_since(0, 1000)
        .await
        .expect("journal")
        .into_iter()
        .filter(|entry| entry.machine_id == id)
        .collect();
    let seen: Vec<(UsageKind, u64)> = journal
        .iter()
        .map(|entry| (entry.kind, entry.storage_bytes))
        .collect();
    assert_eq!(
        seen,
        [
            (UsageKind::Created, 1 << 30),
            (UsageKind::Storage, 3 << 30),
            (UsageKind::Destroyed, 3 << 30),
        ]
    );
    let (created_at, extended_at, deleted_at) =
        (journal[0].at_ms, journal[1].at_ms, journal[2].at_ms);
    let expected_gb_hours =
        ((extended_at - created_at) + 3 * (deleted_at - extended_at)) as f64 / 3_600_000.0;
    assert!(expected_gb_hours > 1e-4, "{expected_gb_hours}");

    // Reported as the volume's own row, and again the same after ingesting again.
    let report = |group_by: &'static str| {
        let harness = &harness;
        let token = token.clone();
        async move {
            let (status, report) = harness
                .call(
                    &token,
                    Method::GET,
                    &format!("/v1/orgs/billed/usage?from=0&group_by={group_by}"),
                    None,
                )
                .await;
            assert_eq!(status, 200, "{report}");
            report
        }
    };
    for _ in 0..2 {
        let by_machine = report("machine").await;
        let rows = by_machine["rows"].as_array().expect("rows");
        assert_eq!(rows.len(), 1, "{by_machine}");
        assert_eq!(rows[0]["volume"], id.as_str(), "{by_machine}");
        assert!(rows[0].get("machine").is_none(), "{by_machine}");
        assert_eq!(rows[0]["running_seconds"], 0.0);
        let billed = rows[0]["storage_gb_hours"].as_f64().expect("gb hours");
        assert!(
            (billed - expected_gb_hours).abs() <= 2e-6,
            "{billed} vs {expected_gb_hours}"
        );
        assert_eq!(
            by_machine["total"]["storage_gb_hours"],
            rows[0]["storage_gb_hours"]
        );
        // By app, the volume's storage is its app's.
        let by_app = report("app").await;
        assert_eq!(by_app["rows"][0]["app"], "billed-app", "{by_app}");
        assert_eq!(
            by_app["rows"][0]["storage_gb_hours"], rows[0]["storage_gb_hours"],
            "{by_app}"
        );
    }
}

#[tokio::test]
async fn the_description_has_the_volume_quotas_usage_and_report_rows() {
    let harness = Harness::start().await;
    let (status, doc) = harness
        .call(&harness.admin, Method::GET, "/v1/openapi.json", None)
        .await;
    assert_eq!(status, 200);
    let schemas = &doc["components"]["schemas"];
    for (schema, field) in [
        ("Quotas", "max_volumes"),
        ("Quotas", "max_volume_gb"),
        ("QuotaOverrides", "max_volumes"),
        ("QuotaOverrides", "max_volume_gb"),
        ("OrgUsage", "volumes"),
        ("OrgUsage", "volume_gb"),
        ("UsageRow", "volume"),
    ] {
        assert!(
            schemas[schema]["properties"].get(field).is_some(),
            "{schema}.{field}: {}",
            schemas[schema]
        );
    }
}
