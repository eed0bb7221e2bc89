//! The other bodies Fly's clients send: app create (`{app_name, org_slug, network,
//! enable_subdomains}`, as Fly's documentation shows it), lease and metadata. Each is
//! accepted with fields Berth does not know, which are told in `warnings`, and refused
//! under `berth-strict: true` with the field's path.

mod common;

use common::Harness;
use reqwest::Method;
use serde::Deserialize;
use serde_json::json;

/// Fly's `App`, as the create answers it.
#[derive(Debug, Deserialize)]
struct FlyApp {
    id: String,
    name: String,
    organization: FlyOrganization,
}

#[derive(Debug, Deserialize)]
struct FlyOrganization {
    slug: String,
}

fn warned(reply: &common::Reply) -> Vec<String> {
    let mut fields: Vec<String> = reply.body["warnings"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|warning| {
                    assert_eq!(warning["code"], "ignored_field", "{warning}");
                    warning["field"].as_str().expect("field").to_owned()
                })
                .collect()
        })
        .unwrap_or_default();
    fields.sort();
    fields
}

const STRICT: [(&str, &str); 1] = [("berth-strict", "true")];

#[tokio::test]
async fn fly_s_app_create_body_is_accepted_and_its_extras_told() {
    let harness = Harness::start().await;
    let body = json!({
        "app_name": "segmented",
        "org_slug": "personal",
        "network": "my-optional-network",
        "enable_subdomains": true,
    });

    let refused = harness
        .send(
            &harness.admin,
            Method::POST,
            "/v1/apps",
            &STRICT,
            Some(body.clone()),
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(refused.body["error"], "invalid_config");
    assert!(
        ["network", "enable_subdomains"].contains(&refused.body["field"].as_str().unwrap_or("")),
        "{}",
        refused.body
    );
    let (status, _) = harness
        .call(&harness.admin, Method::GET, "/v1/apps/segmented", None)
        .await;
    assert_eq!(status, 404, "a refused create made nothing");

    let reply = harness
        .send(&harness.admin, Method::POST, "/v1/apps", &[], Some(body))
        .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert_eq!(warned(&reply), ["enable_subdomains", "network"]);
    let header = reply
        .headers
        .get("berth-warnings")
        .and_then(|value| value.to_str().ok())
        .expect("berth-warnings header");
    assert!(header.contains("ignored_field=network"), "{header}");
    let app: FlyApp = serde_json::from_value(reply.body).expect("Fly's App");
    assert_eq!(app.name, "segmented");
    assert_eq!(app.organization.slug, "personal");
    assert!(!app.id.is_empty());

    // A type error in a known field stays a 400 in both modes.
    let reply = harness
        .send(
            &harness.admin,
            Method::POST,
            "/v1/apps",
            &[],
            Some(json!({"app_name": 7})),
        )
        .await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_eq!(reply.body["field"], "app_name");
}

#[tokio::test]
async fn lease_and_metadata_bodies_take_unknown_fields_as_fly_does() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "bodies").await;
    let id = harness.machine(&harness.admin, "bodies", false).await;
    let base = format!("/v1/apps/bodies/machines/{id}");
    let lease_body = json!({"ttl": 60, "description": "ci", "region": "ord"});

    let refused = harness
        .send(
            &harness.admin,
            Method::POST,
            &format!("{base}/lease"),
            &STRICT,
            Some(lease_body.clone()),
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(refused.body["field"], "region");
    let (status, _) = harness
        .call(&harness.admin, Method::GET, &format!("{base}/lease"), None)
        .await;
    assert_eq!(status, 404, "a refused lease holds nothing");

    let reply = harness
        .send(
            &harness.admin,
            Method::POST,
            &format!("{base}/lease"),
            &[],
            Some(lease_body),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(warned(&reply), ["region"]);
    assert_eq!(reply.body["data"]["description"], "ci");
    let nonce = reply.body["data"]["nonce"]
        .as_str()
        .expect("nonce")
        .to_owned();

    let lease = [("fly-machine-lease-nonce", nonce.as_str())];
    let metadata = format!("{base}/metadata/team");
    let body = json!({"value": "infra", "previous": "none"});
    let mut strict = lease.to_vec();
    strict.extend(STRICT);
    let refused = harness
        .send(
            &harness.admin,
            Method::POST,
            &metadata,
            &strict,
            Some(body.clone()),
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(refused.body["field"], "previous");
    let reply = harness
        .send(&harness.admin, Method::POST, &metadata, &lease, Some(body))
        .await;
    // Fly answers 204 with no body, so the warning is told in the header alone.
    assert_eq!(reply.status, 204, "{}", reply.body);
    let header = reply
        .headers
        .get("berth-warnings")
        .and_then(|value| value.to_str().ok())
        .expect("berth-warnings header");
    assert_eq!(header, "ignored_field=previous");
    let (status, values) = harness
        .call(
            &harness.admin,
            Method::GET,
            &format!("{base}/metadata"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{values}");
    assert_eq!(values["team"], "infra");
}
