//! Fly's volumes API as fly-go's `flaps` client calls it: the bodies it marshals
//! (`CreateVolumeRequest` with every field, nulls included; `ExtendVolumeRequest`;
//! `UpdateVolumeRequest`; a snapshot create without a body) and `config.mounts` on a
//! Machine, with the answers decoded into Fly's `Volume`, `VolumeSnapshot` and
//! `ExtendVolumeResponse` shapes, in the default and the strict mode. The runtime is the
//! fake: these are the API's rules; the kernel's part is in the CLI's end-to-end test.

mod common;

use std::path::Path;
use std::sync::Arc;

use berth_agent::{Agent, AgentConfig, Drivers, WorkerService};
use berth_image::build::{busybox_layer, Compression, ImageBuilder};
use berth_image::{ImagePuller, ImageStore, UnpackLimits};
use berth_runtime::fake::FakeRuntime;
use common::{assert_error, Harness, IMAGE};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

const STRICT: (&str, &str) = ("berth-strict", "true");

/// Fly's `Volume` (fly-go's fields and the OpenAPI description's block counts). Unknown
/// fields would be ignored by a Go client too; every one Fly's clients read is required.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct FlyVolume {
    id: String,
    name: String,
    state: String,
    size_gb: u32,
    region: String,
    zone: String,
    encrypted: bool,
    attached_machine_id: Option<String>,
    attached_alloc_id: Option<String>,
    created_at: String,
    host_dedication_id: String,
    snapshot_retention: u32,
    auto_backup_enabled: bool,
    fstype: String,
    block_size: u64,
    blocks: u64,
    blocks_free: u64,
    blocks_avail: u64,
}

#[derive(Debug, Deserialize)]
struct FlyExtendVolumeResponse {
    volume: FlyVolume,
    needs_restart: bool,
}

#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct FlyVolumeSnapshot {
    id: String,
    size: u64,
    digest: String,
    created_at: String,
    status: String,
    retention_days: Option<u32>,
}

/// What fly-go marshals for `CreateVolume`: no `omitempty`, so unset pointers are null.
fn create_body(name: &str, size_gb: u32) -> Value {
    json!({
        "name": name,
        "region": "",
        "size_gb": size_gb,
        "encrypted": false,
        "require_unique_zone": false,
        "snapshot_retention": null,
        "auto_backup_enabled": null,
        "fstype": null,
        "snapshot_id": null,
        "source_volume_id": null,
        "compute": null,
        "compute_image": ""
    })
}

fn volume(reply: (u16, Value)) -> FlyVolume {
    assert_eq!(reply.0, 200, "{}", reply.1);
    serde_json::from_value(reply.1).expect("Fly's Volume")
}

async fn create_volume(harness: &Harness, app: &str, name: &str) -> FlyVolume {
    volume(
        harness
            .call(
                &harness.admin,
                Method::POST,
                &format!("/v1/apps/{app}/volumes"),
                Some(create_body(name, 1)),
            )
            .await,
    )
}

/// fly-go's `MachineMount` as it marshals it: `volume` and `path`, the rest zero.
fn machine_with(name: &str, volume: &str) -> Value {
    json!({
        "name": name,
        "skip_launch": true,
        "config": {
            "image": IMAGE,
            "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
            "mounts": [{"encrypted": false, "path": "/data", "size_gb": 0, "volume": volume, "name": ""}]
        }
    })
}

#[tokio::test]
async fn a_volumes_life_in_flys_shapes() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "vols").await;
    let created = create_volume(&harness, "vols", "data").await;
    assert!(created.id.starts_with("vol_"), "{created:?}");
    assert_eq!(
        (
            created.name.as_str(),
            created.state.as_str(),
            created.size_gb
        ),
        ("data", "created", 1)
    );
    assert_eq!(created.region, "test");
    assert_eq!(created.fstype, "ext4");
    assert!(!created.encrypted);
    assert_eq!(created.attached_machine_id, None);
    assert_eq!(created.attached_alloc_id, None);
    assert_eq!(created.blocks * created.block_size, 1 << 30);
    assert!(created.created_at.ends_with('Z'), "{}", created.created_at);
    let size = harness.runtime.volume_size(&created.id).await;
    assert_eq!(size, Some(1 << 30));
    let base = format!("/v1/apps/vols/volumes/{}", created.id);

    // List and get answer the same volume.
    let (status, listed) = harness
        .call(&harness.admin, Method::GET, "/v1/apps/vols/volumes", None)
        .await;
    assert_eq!(status, 200, "{listed}");
    let listed: Vec<FlyVolume> = serde_json::from_value(listed).expect("Fly's Volume list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, created.id);
    let got = volume(harness.call(&harness.admin, Method::GET, &base, None).await);
    assert_eq!(got.id, created.id);

    // Update: Fly's two settings.
    let updated = volume(
        harness
            .call(
                &harness.admin,
                Method::PUT,
                &base,
                Some(json!({"snapshot_retention": 10, "auto_backup_enabled": true})),
            )
            .await,
    );
    assert_eq!(
        (updated.snapshot_retention, updated.auto_backup_enabled),
        (10, true)
    );

    // Extend grows the filesystem; shrinking is refused, naming the field.
    let (status, extended) = harness
        .call(
            &harness.admin,
            Method::PUT,
            &format!("{base}/extend"),
            Some(json!({"size_gb": 2})),
        )
        .await;
    assert_eq!(status, 200, "{extended}");
    let extended: FlyExtendVolumeResponse =
        serde_json::from_value(extended).expect("Fly's ExtendVolumeResponse");
    assert_eq!(extended.volume.size_gb, 2);
    assert!(!extended.needs_restart);
    assert_eq!(
        harness.runtime.volume_size(&created.id).await,
        Some(2 << 30)
    );
    let shrink = harness
        .call(
            &harness.admin,
            Method::PUT,
            &format!("{base}/extend"),
            Some(json!({"size_gb": 1})),
        )
        .await;
    assert_error(&shrink, 400, "invalid_config");
    assert_eq!(shrink.1["field"], "size_gb");

    // Snapshots: fly-go posts no body and reads nothing back, then lists them.
    let (status, _) = harness
        .call(
            &harness.admin,
            Method::POST,
            &format!("{base}/snapshots"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, snapshots) = harness
        .call(
            &harness.admin,
            Method::GET,
            &format!("{base}/snapshots"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{snapshots}");
    let snapshots: Vec<FlyVolumeSnapshot> =
        serde_json::from_value(snapshots).expect("Fly's VolumeSnapshot list");
    assert_eq!(snapshots.len(), 1);
    let snapshot = &snapshots[0];
    assert!(snapshot.id.starts_with("vs_"), "{snapshot:?}");
    assert!(snapshot.digest.starts_with("sha256:"), "{snapshot:?}");
    assert_eq!(
        (snapshot.status.as_str(), snapshot.retention_days),
        ("created", Some(10))
    );

    // Restore: a create with `snapshot_id` starts from the snapshot.
    let mut restore = create_body("restored", 2);
    restore["snapshot_id"] = json!(snapshot.id);
    let restored = volume(
        harness
            .call(
                &harness.admin,
                Method::POST,
                "/v1/apps/vols/volumes",
                Some(restore),
            )
            .await,
    );
    assert_ne!(restored.id, created.id);
    let mut unknown = create_body("nope", 1);
    unknown["snapshot_id"] = json!("vs_0000000000000000");
    let refused = harness
        .call(
            &harness.admin,
            Method::POST,
            "/v1/apps/vols/volumes",
            Some(unknown),
        )
        .await;
    assert_error(&refused, 404, "snapshot_not_found");

    // Delete answers the volume, destroyed; then it is gone.
    let deleted = volume(
        harness
            .call(&harness.admin, Method::DELETE, &base, None)
            .await,
    );
    assert_eq!(
        (deleted.id, deleted.state.as_str()),
        (created.id.clone(), "destroyed")
    );
    assert_eq!(harness.runtime.volume_size(&created.id).await, None);
    let gone = harness.call(&harness.admin, Method::GET, &base, None).await;
    assert_error(&gone, 404, "volume_not_found");
    let calls = harness.runtime.calls().await;
    assert!(
        calls.contains(&format!("volume_remove {}", created.id)),
        "{calls:?}"
    );
}

#[tokio::test]
async fn a_volume_is_held_by_one_machine_and_outlives_it() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "held").await;
    let vol = create_volume(&harness, "held", "data").await;
    let base = format!("/v1/apps/held/volumes/{}", vol.id);

    let (status, first) = harness
        .call(
            &harness.admin,
            Method::POST,
            "/v1/apps/held/machines",
            Some(machine_with("first", &vol.id)),
        )
        .await;
    assert_eq!(status, 200, "{first}");
    let first_id = first["id"].as_str().expect("id").to_owned();
    // The Machine JSON carries Fly's mounts back.
    assert_eq!(first["config"]["mounts"][0]["volume"], vol.id.as_str());
    assert_eq!(first["config"]["mounts"][0]["path"], "/data");
    // The bundle mounts the volume's filesystem at the path.
    let spec = harness.runtime.spec(&first_id).await.expect("prepared");
    assert_eq!(spec.volumes.len(), 1);
    assert_eq!(spec.volumes[0].destination, "/data");
    assert!(
        spec.volumes[0].source.ends_with(format!(
            "volumes/{}/{}",
            vol.id,
            berth_runtime::volume::VOLUME_MOUNT_DIR
        )),
        "{:?}",
        spec.volumes[0].source
    );
    let held = volume(harness.call(&harness.admin, Method::GET, &base, None).await);
    assert_eq!(held.attached_machine_id.as_deref(), Some(first_id.as_str()));

    // A second Machine cannot take it, and the volume cannot be deleted under the first.
    let second = harness
        .call(
            &harness.admin,
            Method::POST,
            "/v1/apps/held/machines",
            Some(machine_with("second", &vol.id)),
        )
        .await;
    assert_error(&second, 409, "volume_attached");
    assert!(
        second.1["message"]
            .as_str()
            .is_some_and(|m| m.contains(&first_id)),
        "{}",
        second.1
    );
    let (_, listed) = harness
        .call(&harness.admin, Method::GET, "/v1/apps/held/machines", None)
        .await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    let delete = harness
        .call(&harness.admin, Method::DELETE, &base, None)
        .await;
    assert_error(&delete, 409, "volume_attached");

    // An update may move the mount (changing mounts is `an_update_attaches_and_detaches_
    // volumes`); the volume stays the Machine's.
    let mut changed = machine_with("first", &vol.id);
    changed["config"]["mounts"][0]["path"] = json!("/elsewhere");
    let (status, update) = harness
        .call(
            &harness.admin,
            Method::POST,
            &format!("/v1/apps/held/machines/{first_id}"),
            Some(changed),
        )
        .await;
    assert_eq!(status, 200, "{update}");
    assert_eq!(update["config"]["mounts"][0]["path"], "/elsewhere");
    let still = volume(harness.call(&harness.admin, Method::GET, &base, None).await);
    assert_eq!(
        still.attached_machine_id.as_deref(),
        Some(first_id.as_str())
    );

    // Destroying the Machine keeps the volume and frees it for the next one.
    let (status, reply) = harness
        .call(
            &harness.admin,
            Method::DELETE,
            &format!("/v1/apps/held/machines/{first_id}?kill=true"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let free = volume(harness.call(&harness.admin, Method::GET, &base, None).await);
    assert_eq!(free.attached_machine_id, None);
    assert_eq!(harness.runtime.volume_size(&vol.id).await, Some(1 << 30));
    let (status, second) = harness
        .call(
            &harness.admin,
            Method::POST,
            "/v1/apps/held/machines",
            Some(machine_with("second", &vol.id)),
        )
        .await;
    assert_eq!(status, 200, "{second}");
    let taken = volume(harness.call(&harness.admin, Method::GET, &base, None).await);
    assert_eq!(
        taken.attached_machine_id,
        second["id"].as_str().map(String::from)
    );
}

#[tokio::test]
async fn refusals_carry_flys_fields_and_stable_codes() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "mine").await;
    harness.app(&harness.admin, "theirs").await;
    let theirs = create_volume(&harness, "theirs", "data").await;

    // A volume of another app, or none at all, is not found, naming the mount.
    for volume in [theirs.id.as_str(), "vol_0000000000000000", "../../etc"] {
        let reply = harness
            .call(
                &harness.admin,
                Method::POST,
                "/v1/apps/mine/machines",
                Some(machine_with("m", volume)),
            )
            .await;
        assert_error(&reply, 404, "volume_not_found");
        assert_eq!(reply.1["field"], "config.mounts[0].volume", "{}", reply.1);
    }
    let other = harness
        .call(
            &harness.admin,
            Method::GET,
            &format!("/v1/apps/mine/volumes/{}", theirs.id),
            None,
        )
        .await;
    assert_error(&other, 404, "volume_not_found");

    // What Berth cannot do is refused with 422 naming the field; nothing is made.
    for (field, value) in [("fstype", json!("raw"))] {
        let mut body = create_body("x", 1);
        body[field] = value;
        let reply = harness
            .call(
                &harness.admin,
                Method::POST,
                "/v1/apps/mine/volumes",
                Some(body),
            )
            .await;
        assert_error(&reply, 422, "unsupported");
        assert_eq!(reply.1["field"], field);
    }
    let mut zero = create_body("x", 0);
    zero["size_gb"] = json!(0);
    let reply = harness
        .call(
            &harness.admin,
            Method::POST,
            "/v1/apps/mine/volumes",
            Some(zero),
        )
        .await;
    assert_error(&reply, 400, "invalid_config");
    let (_, listed) = harness
        .call(&harness.admin, Method::GET, "/v1/apps/mine/volumes", None)
        .await;
    assert_eq!(listed, json!([]));
    // A mount path must be absolute.
    let mut relative = machine_with("m", &theirs.id);
    relative["config"]["mounts"][0]["path"] = json!("data");
    let reply = harness
        .call(
            &harness.admin,
            Method::POST,
            "/v1/apps/theirs/machines",
            Some(relative),
        )
        .await;
    assert_error(&reply, 400, "invalid_config");
    assert_eq!(reply.1["field"], "config.mounts[0].path");
}

#[tokio::test]
async fn unknown_fields_are_ignored_and_told_or_refused_when_strict() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "strict").await;
    let mut body = create_body("data", 1);
    body["unique_zone_app_wide"] = json!(true);
    let reply = harness
        .send(
            &harness.admin,
            Method::POST,
            "/v1/apps/strict/volumes",
            &[],
            Some(body.clone()),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let warnings = reply.body["warnings"].as_array().expect("warnings");
    assert!(
        warnings
            .iter()
            .any(|w| w["field"] == "unique_zone_app_wide"),
        "{warnings:?}"
    );
    let header = reply
        .headers
        .get("berth-warnings")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    assert!(
        header.contains("ignored_field=unique_zone_app_wide"),
        "{header}"
    );
    let created: FlyVolume = serde_json::from_value(reply.body).expect("Fly's Volume");

    // Strict: 400 naming the field, nothing made.
    let refused = harness
        .send(
            &harness.admin,
            Method::POST,
            "/v1/apps/strict/volumes",
            &[STRICT],
            Some(body),
        )
        .await;
    assert_error(
        &(refused.status, refused.body.clone()),
        400,
        "invalid_config",
    );
    assert_eq!(refused.body["field"], "unique_zone_app_wide");
    // fly-go's exact bodies pass strict mode.
    let plain = harness
        .send(
            &harness.admin,
            Method::POST,
            "/v1/apps/strict/volumes",
            &[STRICT],
            Some(create_body("plain", 1)),
        )
        .await;
    assert_eq!(plain.status, 200, "{}", plain.body);
    let extend = harness
        .send(
            &harness.admin,
            Method::PUT,
            &format!("/v1/apps/strict/volumes/{}/extend", created.id),
            &[STRICT],
            Some(json!({"size_gb": 3})),
        )
        .await;
    assert_eq!(extend.status, 200, "{}", extend.body);
    let update = harness
        .send(
            &harness.admin,
            Method::PUT,
            &format!("/v1/apps/strict/volumes/{}", created.id),
            &[STRICT],
            Some(json!({"snapshot_retention": null, "auto_backup_enabled": null})),
        )
        .await;
    assert_eq!(update.status, 200, "{}", update.body);
    let (_, listed) = harness
        .call(&harness.admin, Method::GET, "/v1/apps/strict/volumes", None)
        .await;
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    // Type errors stay 400 in both modes.
    for headers in [&[][..], &[STRICT][..]] {
        let mut mistyped = create_body("typo", 1);
        mistyped["size_gb"] = json!("big");
        let reply = harness
            .send(
                &harness.admin,
                Method::POST,
                "/v1/apps/strict/volumes",
                headers,
                Some(mistyped),
            )
            .await;
        assert_error(&(reply.status, reply.body.clone()), 400, "invalid_config");
        assert_eq!(reply.body["field"], "size_gb");
    }
}

#[tokio::test]
async fn the_description_lists_the_volume_routes_and_shapes() {
    let harness = Harness::start().await;
    let (status, doc) = harness
        .call(&harness.admin, Method::GET, "/v1/openapi.json", None)
        .await;
    assert_eq!(status, 200);
    let paths = &doc["paths"];
    for (path, methods) in [
        ("/v1/apps/{app}/volumes", &["get", "post"][..]),
        (
            "/v1/apps/{app}/volumes/{volume_id}",
            &["get", "put", "delete"][..],
        ),
        ("/v1/apps/{app}/volumes/{volume_id}/extend", &["put"][..]),
        (
            "/v1/apps/{app}/volumes/{volume_id}/snapshots",
            &["get", "post"][..],
        ),
    ] {
        for method in methods {
            assert!(paths[path][method].is_object(), "{path} {method}");
        }
    }
    let schemas = &doc["components"]["schemas"];
    for name in [
        "Volume",
        "CreateVolumeRequest",
        "ExtendVolumeResponse",
        "VolumeSnapshot",
        "MachineMount",
    ] {
        assert!(schemas[name].is_object(), "{name}");
    }
    assert!(schemas["MachineConfig"]["properties"]["mounts"].is_object());
}

/// Fly encrypts a volume unless the create says `encrypted: false` (flyctl's
/// `--no-encryption`); the answer says which, a Machine's mount says so too, a restore
/// keeps its snapshot's encryption, and no answer carries the key.
#[tokio::test]
async fn volumes_are_encrypted_unless_asked_not_to_and_say_so() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "enc").await;
    let mut answers = Vec::new();
    for (strict, encrypted) in [(false, None), (true, Some(true)), (false, Some(false))] {
        let mut body = create_body(&format!("v{}", answers.len()), 1);
        match encrypted {
            Some(value) => body["encrypted"] = json!(value),
            None => {
                body.as_object_mut().unwrap().remove("encrypted");
            }
        }
        let headers: &[(&str, &str)] = if strict { &[STRICT] } else { &[] };
        let reply = harness
            .send(
                &harness.admin,
                Method::POST,
                "/v1/apps/enc/volumes",
                headers,
                Some(body),
            )
            .await;
        assert!(
            !reply.body.to_string().contains("\"key\""),
            "no answer names a key: {}",
            reply.body
        );
        answers.push(volume((reply.status, reply.body)));
    }
    let flags: Vec<bool> = answers.iter().map(|volume| volume.encrypted).collect();
    assert_eq!(flags, [true, true, false]);
    let (status, listed) = harness
        .call(&harness.admin, Method::GET, "/v1/apps/enc/volumes", None)
        .await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed[0]["encrypted"], true, "{listed}");
    assert_eq!(listed[2]["encrypted"], false, "{listed}");

    // A Machine's mount tells the volume's truth whatever the client sent.
    for (source, expected) in [(&answers[0], true), (&answers[2], false)] {
        let (status, machine) = harness
            .call(
                &harness.admin,
                Method::POST,
                "/v1/apps/enc/machines",
                Some(machine_with(&format!("m-{}", source.name), &source.id)),
            )
            .await;
        assert_eq!(status, 200, "{machine}");
        // Omitted when false, which a Go client reads as false.
        let said = machine["config"]["mounts"][0]["encrypted"].as_bool();
        assert_eq!(said.unwrap_or(false), expected, "{machine}");
    }

    // A restore is a copy of the snapshot's image, encrypted as its volume was.
    let snapshot_of = |volume: &FlyVolume| format!("/v1/apps/enc/volumes/{}/snapshots", volume.id);
    for (source, expected) in [(&answers[0], true), (&answers[2], false)] {
        let (status, snapshot) = harness
            .call(&harness.admin, Method::POST, &snapshot_of(source), None)
            .await;
        assert_eq!(status, 200, "{snapshot}");
        let mut restore = create_body(&format!("r-{}", source.name), 1);
        restore["encrypted"] = json!(!expected);
        restore["snapshot_id"] = snapshot["id"].clone();
        let restored = volume(
            harness
                .call(
                    &harness.admin,
                    Method::POST,
                    "/v1/apps/enc/volumes",
                    Some(restore),
                )
                .await,
        );
        assert_eq!(restored.encrypted, expected, "{restored:?}");
    }
}

/// Fly's fork (`source_volume_id`): a new volume with the source's data, on its worker, at
/// least its size, encrypted as it is (with its key), counted in the org's quotas like any
/// create; a source that is not the app's is not found, naming the field.
#[tokio::test]
async fn a_fork_copies_its_source_on_its_worker_and_counts_like_a_create() {
    let harness = Harness::start().await;
    let rate = json!({"per_second": 1000.0, "burst": 1000});
    let token = harness
        .org(
            "forks",
            json!({"quotas": {"max_volume_gb": 5},
                   "rate_limits": {"create": rate, "update": rate, "destroy": rate, "read": rate}}),
        )
        .await;
    harness.app(&token, "fk").await;
    harness.app(&harness.admin, "other").await;
    let post = |body: Value, strict: bool| {
        let headers: Vec<(&str, &str)> = if strict { vec![STRICT] } else { vec![] };
        let token = token.clone();
        let harness = &harness;
        async move {
            let reply = harness
                .send(
                    &token,
                    Method::POST,
                    "/v1/apps/fk/volumes",
                    &headers,
                    Some(body),
                )
                .await;
            (reply.status, reply.body)
        }
    };
    let mut body = create_body("src", 2);
    body.as_object_mut().unwrap().remove("encrypted");
    let source = volume(post(body, false).await);
    assert!(source.encrypted);

    for strict in [false, true] {
        let mut fork = create_body("fork", 1);
        fork["source_volume_id"] = json!(source.id);
        fork["encrypted"] = json!(false);
        let reply = post(fork, strict).await;
        if strict {
            // The quota counts the fork at the source's size: 2 + 2 of 5 GB taken.
            assert_error(&reply, 403, "quota_exceeded");
            assert_eq!(reply.1["quota"], "max_volume_gb", "{}", reply.1);
            assert_eq!(reply.1["current"], 4, "{}", reply.1);
            continue;
        }
        let forked = volume(reply);
        assert_ne!(forked.id, source.id);
        assert_eq!(
            (forked.size_gb, forked.zone.as_str(), forked.encrypted),
            (2, source.zone.as_str(), true),
            "{forked:?}"
        );
        let calls = harness.runtime.calls().await;
        assert!(
            calls.contains(&format!(
                "volume_fork {} {} {}",
                source.id,
                forked.id,
                2u64 << 30
            )),
            "{calls:?}"
        );
    }
    let (status, org) = harness
        .call(&token, Method::GET, "/v1/orgs/forks", None)
        .await;
    assert_eq!(status, 200, "{org}");
    assert_eq!(
        (
            org["usage"]["volumes"].as_u64(),
            org["usage"]["volume_gb"].as_u64()
        ),
        (Some(2), Some(4))
    );

    let theirs = create_volume(&harness, "other", "data").await;
    for missing in [theirs.id.as_str(), "vol_0000000000000000", "../x"] {
        let mut fork = create_body("fork", 1);
        fork["source_volume_id"] = json!(missing);
        let reply = post(fork, false).await;
        assert_error(&reply, 404, "volume_not_found");
        assert_eq!(reply.1["field"], "source_volume_id", "{}", reply.1);
    }
}

/// Joins a second in-process worker, `other`, with a fake driver.
async fn join_other(harness: &Harness) {
    let dir = harness.dir.path().join("worker-other");
    let images =
        Arc::new(ImageStore::open(&dir.join("images"), UnpackLimits::default()).expect("store"));
    let layout = dir.join("layout");
    ImageBuilder::new()
        .layer(
            busybox_layer(Path::new("/bin/busybox")).expect("busybox"),
            Compression::Gzip,
        )
        .cmd(&["/bin/sh"])
        .write_layout(&layout)
        .expect("layout");
    images.import(&layout, IMAGE).expect("import");
    let capacity = berth_api::Resources {
        cpus: 64,
        memory_mb: 1 << 16,
        disk_mb: 1 << 20,
    };
    let agent = Agent::open_with_drivers(
        AgentConfig {
            data_dir: dir.join("worker"),
            name: "other".into(),
            region: "test".into(),
            pids_limit: 64,
            capacity,
            machine_prefix: None,
            join_token: None,
        },
        Drivers::new("native", Arc::new(FakeRuntime::new())),
        Arc::new(ImagePuller::new(images, Default::default())),
    )
    .await
    .expect("agent");
    let registration = berth_api::RegisterWorker {
        name: "other".into(),
        region: "test".into(),
        url: String::new(),
        capacity,
        runtimes: agent.runtimes(),
    };
    let service: Arc<dyn WorkerService> = Arc::new(agent);
    harness
        .control
        .add_local_worker(registration, service)
        .await
        .expect("join");
}

/// `config.mounts` changed by an update, as fly-go sends it (the whole config again): a
/// new volume is attached (it must be free and on the Machine's worker, else 409 with
/// its code, and nothing changes), a removed one is detached and free for another
/// Machine, and an update that fails halfway gives the old attachment back.
#[tokio::test]
async fn an_update_attaches_and_detaches_volumes() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "mu").await;
    let a = create_volume(&harness, "mu", "a").await;
    // b is encrypted (Fly's default), which its mount will say whatever the client sends.
    let mut body = create_body("b", 1);
    body.as_object_mut().expect("body").remove("encrypted");
    let b = volume(
        harness
            .call(
                &harness.admin,
                Method::POST,
                "/v1/apps/mu/volumes",
                Some(body),
            )
            .await,
    );
    assert!(b.encrypted);
    let held = create_volume(&harness, "mu", "held").await;
    let call = |method: Method, path: String, body: Option<Value>| {
        let harness = &harness;
        async move { harness.call(&harness.admin, method, &path, body).await }
    };
    let create = |name: &str, volume: &str| {
        let mut body = machine_with(name, volume);
        body["skip_launch"] = json!(false);
        call(Method::POST, "/v1/apps/mu/machines".into(), Some(body))
    };
    let (status, machine) = create("m", &a.id).await;
    assert_eq!(status, 200, "{machine}");
    let id = machine["id"].as_str().expect("id").to_owned();
    let (status, other) = create("o", &held.id).await;
    assert_eq!(status, 200, "{other}");
    let other_id = other["id"].as_str().expect("id").to_owned();
    let update = |mounts: Value, strict: bool| {
        let mut config = machine["config"].clone();
        config["mounts"] = mounts;
        // Fly's clients send no driver (the harness's is a fake's name).
        config.as_object_mut().expect("config").remove("runtime");
        let harness = &harness;
        let path = format!("/v1/apps/mu/machines/{id}");
        async move {
            let headers: Vec<(&str, &str)> = if strict { vec![STRICT] } else { vec![] };
            let reply = harness
                .send(
                    &harness.admin,
                    Method::POST,
                    &path,
                    &headers,
                    Some(json!({"config": config})),
                )
                .await;
            (reply.status, reply.body)
        }
    };
    let holder = |of: &FlyVolume| {
        let path = format!("/v1/apps/mu/volumes/{}", of.id);
        let call = &call;
        async move { volume(call(Method::GET, path, None).await).attached_machine_id }
    };
    let mount =
        |volume: &str, path: &str| json!({"volume": volume, "path": path, "encrypted": false});

    // Attach b beside a (strict mode: Fly's fields only).
    let (status, updated) =
        update(json!([mount(&a.id, "/data"), mount(&b.id, "/more")]), true).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["state"], "started", "{updated}");
    assert_eq!(
        updated["config"]["mounts"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(
        updated["config"]["mounts"][1]["encrypted"], true,
        "{updated}"
    );
    assert_eq!(holder(&b).await.as_deref(), Some(id.as_str()));

    // A volume another Machine holds is refused with its code; nothing changes.
    let refused = update(json!([mount(&a.id, "/data"), mount(&held.id, "/x")]), false).await;
    assert_error(&refused, 409, "volume_attached");
    assert_eq!(holder(&held).await.as_deref(), Some(other_id.as_str()));
    assert_eq!(holder(&b).await.as_deref(), Some(id.as_str()));
    // So is a volume on another worker.
    join_other(&harness).await;
    call(Method::POST, "/v1/workers/local/cordon".into(), None).await;
    let far = create_volume(&harness, "mu", "far").await;
    assert_eq!(far.zone, "other");
    call(Method::POST, "/v1/workers/local/uncordon".into(), None).await;
    let refused = update(json!([mount(&a.id, "/data"), mount(&far.id, "/x")]), false).await;
    assert_error(&refused, 409, "volume_on_other_worker");
    assert_eq!(
        refused.1["field"], "config.mounts[1].volume",
        "{}",
        refused.1
    );
    assert_eq!(holder(&far).await, None);

    // An update that fails halfway (the old run will not be cleaned up) is rolled back:
    // the old mounts, a stays the Machine's, and b, newly claimed, is free again. (Seen
    // to fail with the rollback's release taken out: b stayed the Machine's.)
    let (status, _) = update(json!([mount(&a.id, "/data")]), false).await;
    assert_eq!(status, 200);
    assert_eq!(holder(&b).await, None, "a removed mount is detached");
    harness.runtime.fail_next_cleanup("cleanup failed").await;
    let failed = update(json!([mount(&b.id, "/more")]), false).await;
    assert!(failed.0 >= 500, "{failed:?}");
    let (_, after) = call(Method::GET, format!("/v1/apps/mu/machines/{id}"), None).await;
    assert_eq!(
        after["config"]["mounts"][0]["volume"],
        json!(a.id),
        "{after}"
    );
    assert_eq!(holder(&a).await.as_deref(), Some(id.as_str()));
    assert_eq!(
        holder(&b).await,
        None,
        "the failed update's new volume is free again"
    );

    // A detached volume is free for another Machine.
    let (status, next) = create("n", &b.id).await;
    assert_eq!(status, 200, "{next}");
    assert_eq!(holder(&b).await, next["id"].as_str().map(String::from));
}

/// `snapshot_retention` (days, Fly's default 5) is enforced: the agent's sweep, given a
/// clock, removes the snapshots past their volume's retention, image and record, and a
/// restore from one is then not found.
#[tokio::test]
async fn snapshots_past_their_retention_are_swept() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "ret").await;
    let mut short = create_body("short", 1);
    short["snapshot_retention"] = json!(1);
    let short = volume(
        harness
            .call(
                &harness.admin,
                Method::POST,
                "/v1/apps/ret/volumes",
                Some(short),
            )
            .await,
    );
    let default = create_volume(&harness, "ret", "default").await;
    assert_eq!(
        (short.snapshot_retention, default.snapshot_retention),
        (1, 5)
    );
    let mut taken = Vec::new();
    for of in [&short, &default] {
        let path = format!("/v1/apps/ret/volumes/{}/snapshots", of.id);
        let (status, snapshot) = harness
            .call(&harness.admin, Method::POST, &path, None)
            .await;
        assert_eq!(status, 200, "{snapshot}");
        let id = snapshot["id"].as_str().expect("id").to_owned();
        let image = harness
            .dir
            .path()
            .join("worker/volumes")
            .join(&of.id)
            .join("snapshots")
            .join(format!("{id}.img"));
        assert!(image.exists(), "{}", image.display());
        taken.push((id, image));
    }
    let listed = |of: &FlyVolume| {
        let path = format!("/v1/apps/ret/volumes/{}/snapshots", of.id);
        let harness = &harness;
        async move {
            let (status, list) = harness.call(&harness.admin, Method::GET, &path, None).await;
            assert_eq!(status, 200, "{list}");
            list.as_array().map_or(0, Vec::len)
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    const DAY: i64 = 24 * 3600 * 1000;

    // Within a day nothing goes.
    let swept = harness
        .agent
        .sweep_snapshots(now + DAY - 60_000)
        .await
        .expect("sweep");
    assert!(swept.is_empty(), "{swept:?}");
    // After one day the one-day volume's snapshot goes, from disk and from the lists.
    let swept = harness
        .agent
        .sweep_snapshots(now + DAY + 60_000)
        .await
        .expect("sweep");
    assert_eq!(swept, [taken[0].0.clone()]);
    assert!(!taken[0].1.exists());
    assert!(taken[1].1.exists());
    assert_eq!((listed(&short).await, listed(&default).await), (0, 1));
    let mut restore = create_body("restored", 1);
    restore["snapshot_id"] = json!(taken[0].0);
    let reply = harness
        .call(
            &harness.admin,
            Method::POST,
            "/v1/apps/ret/volumes",
            Some(restore),
        )
        .await;
    assert_error(&reply, 404, "snapshot_not_found");
    // The default's five days, then.
    let swept = harness
        .agent
        .sweep_snapshots(now + 5 * DAY + 60_000)
        .await
        .expect("sweep");
    assert_eq!(swept, [taken[1].0.clone()]);
    assert!(!taken[1].1.exists());
    assert_eq!(listed(&default).await, 0);
}
