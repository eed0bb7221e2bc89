//! Imported images with two replicas on one PostgreSQL and a shared registry (Debian's
//! `docker-registry`): an import through A is pushed there and recorded in the database,
//! so B lists it, resolves it at create (its agent pulls the pinned digest from the
//! registry, with A gone) and removes it. A re-import pushes no blob twice, a bad archive
//! records nothing, a later import under the same name changes no existing Machine, and
//! a replica on PostgreSQL without a shared registry refuses imports with a clear code.
//!
//! Checked to fail without the change by turning each part off in turn: with imports
//! kept in the replica's own store (as before), the registry answered 404 to the tags
//! list, and on PostgreSQL without a shared registry the import answered 200; with no HEAD
//! before each blob, the re-import pushed 6 blobs instead of 3; with no pull source sent
//! to the agent, the create through B answered 422 `image_not_found`.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth_agent::{Agent, AgentConfig, WorkerService};
use berth_api::{RegisterWorker, Resources};
use berth_control::shared_images::SharedRegistry;
use berth_control::{ControlConfig, ControlPlane};
use berth_image::build::{busybox_layer, Compression, ImageBuilder, LayerBuilder};
use berth_image::{ImageStore, UnpackLimits};
use berth_runtime::fake::FakeRuntime;
use berth_testkit::registry::Registry;
use common::postgres;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

const ADMIN: &str = "berth_test-admin-token";
const JOIN: &str = "join";
const NAME: &str = "demo/shared:1";

struct Served {
    url: String,
    task: JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(router: axum::Router) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Served { url, task }
}

/// A replica with a data dir (and image store) of its own.
async fn replica(
    dir: &Path,
    index: usize,
    database: &berth_control::store::Database,
    registry: Option<&Registry>,
) -> (Arc<ControlPlane>, Served) {
    let data_dir = dir.join(format!("control-{index}"));
    std::fs::create_dir_all(&data_dir).expect("data dir");
    let images = Arc::new(
        ImageStore::open(&data_dir.join("images"), UnpackLimits::default()).expect("store"),
    );
    let mut config = ControlConfig::new(data_dir, ADMIN.into(), JOIN.into());
    config.database = Some(database.clone());
    config.image_registry = registry.map(|registry| {
        SharedRegistry::parse(&registry.host(), &[], &Default::default()).expect("registry")
    });
    let control = ControlPlane::open(config, images)
        .await
        .expect("control plane");
    let served = serve(control.router()).await;
    (control, served)
}

/// An OCI archive of busybox plus a file saying `marker`: a different image per marker.
fn archive(dir: &Path, marker: &str) -> Vec<u8> {
    let path = dir.join(format!("{marker}.tar"));
    ImageBuilder::new()
        .layer(
            busybox_layer(Path::new("/bin/busybox")).expect("busybox"),
            Compression::Gzip,
        )
        .layer(
            LayerBuilder::new().file("/marker", marker.as_bytes(), 0o644),
            Compression::Gzip,
        )
        .cmd(&["/bin/sh"])
        .write_archive(&path)
        .expect("archive");
    std::fs::read(&path).expect("read archive")
}

async fn send(
    http: &reqwest::Client,
    base: &str,
    method: Method,
    path: &str,
    body: Option<reqwest::Body>,
) -> (u16, Value) {
    let mut request = http
        .request(method, format!("{base}{path}"))
        .bearer_auth(ADMIN);
    if let Some(body) = body {
        request = request.body(body);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn import(http: &reqwest::Client, base: &str, name: &str, bytes: Vec<u8>) -> (u16, Value) {
    send(
        http,
        base,
        Method::POST,
        &format!("/v1/images/import?name={name}"),
        Some(bytes.into()),
    )
    .await
}

async fn list(http: &reqwest::Client, base: &str) -> Vec<(String, String)> {
    let (status, reply) = send(http, base, Method::GET, "/v1/images", None).await;
    assert_eq!(status, 200, "{reply}");
    reply
        .as_array()
        .expect("array")
        .iter()
        .map(|image| {
            (
                image["name"].as_str().expect("name").to_owned(),
                image["digest"].as_str().expect("digest").to_owned(),
            )
        })
        .collect()
}

/// The registry's own answer to `GET /v2/{path}`.
async fn registry_get(http: &reqwest::Client, registry: &Registry, path: &str) -> (u16, Value) {
    let response = http
        .get(format!("http://{}/v2/{path}", registry.host()))
        .header(
            "accept",
            "application/vnd.oci.image.manifest.v1+json, application/json",
        )
        .send()
        .await
        .expect("registry");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Access-log lines of the registry containing `needle`, once the log has settled.
fn logged(registry: &Registry, needle: &str) -> usize {
    std::thread::sleep(Duration::from_millis(300));
    registry
        .log()
        .lines()
        .filter(|line| line.contains(needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_import_through_one_replica_is_listed_created_and_removed_through_another() {
    let registry = Registry::start().expect("docker-registry");
    let dir = tempfile::Builder::new()
        .prefix("berth-shared-images-")
        .tempdir()
        .expect("tempdir");
    let database = berth_control::store::Database::Postgres(postgres::fresh_database().await);
    let http = reqwest::Client::new();
    let (a, served_a) = replica(dir.path(), 0, &database, Some(&registry)).await;
    let (b, served_b) = replica(dir.path(), 1, &database, Some(&registry)).await;
    let (url_a, url_b) = (served_a.url.clone(), served_b.url.clone());

    // Import through A: the registry holds the tag and the manifest by digest.
    let first = archive(dir.path(), "one");
    let (status, reply) = import(&http, &url_a, NAME, first.clone()).await;
    assert_eq!(status, 200, "{reply}");
    let digest = reply["digest"].as_str().expect("digest").to_owned();
    let (status, tags) = registry_get(&http, &registry, "demo/shared/tags/list").await;
    assert_eq!(status, 200, "{tags}");
    assert_eq!(tags["tags"], json!(["1"]));
    let (status, _) =
        registry_get(&http, &registry, &format!("demo/shared/manifests/{digest}")).await;
    assert_eq!(status, 200);
    let uploads = "\"POST /v2/demo/shared/blobs/uploads/";
    let pushed = logged(&registry, uploads);
    assert_eq!(pushed, 3, "config and two layers");

    // B lists it, and its re-import pushes no blob again (each is found with a HEAD).
    assert!(list(&http, &url_b)
        .await
        .contains(&(NAME.to_owned(), digest.clone())));
    let heads = logged(&registry, "\"HEAD /v2/demo/shared/blobs/");
    let (status, reply) = import(&http, &url_b, NAME, first).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["digest"], json!(digest));
    assert_eq!(logged(&registry, uploads), pushed, "no blob pushed twice");
    assert_eq!(
        logged(&registry, "\"HEAD /v2/demo/shared/blobs/"),
        heads + 3
    );

    // A bad archive: a clear error, nothing recorded, nothing in the registry.
    let (status, reply) = import(&http, &url_a, "demo/bad:1", b"not a tar".to_vec()).await;
    assert_eq!(status, 422, "{reply}");
    assert_eq!(reply["error"], json!("invalid_image"));
    assert!(!list(&http, &url_b)
        .await
        .iter()
        .any(|(name, _)| name == "demo/bad:1"));
    let (status, _) = registry_get(&http, &registry, "demo/bad/tags/list").await;
    assert_eq!(status, 404);
    // A name that carries a registry of its own is refused under a shared registry.
    let (status, reply) = import(&http, &url_a, "ghcr.io/x/y:1", b"x".to_vec()).await;
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["error"], json!("invalid_image_ref"));

    // A goes away; an agent that never saw the image joins B and creates it through B.
    a.close().await;
    drop(served_a);
    let runtime = Arc::new(FakeRuntime::new());
    let capacity = Resources {
        cpus: 8,
        memory_mb: 1 << 20,
        disk_mb: 1 << 30,
    };
    let agent_images = Arc::new(
        ImageStore::open(&dir.path().join("agent-images"), UnpackLimits::default())
            .expect("agent store"),
    );
    let agent = Agent::open(
        AgentConfig {
            data_dir: dir.path().join("worker-w1"),
            name: "w1".into(),
            region: "test".into(),
            pids_limit: 64,
            capacity,
            machine_prefix: None,
            join_token: None,
        },
        runtime,
        agent_images,
    )
    .await
    .expect("agent");
    let service: Arc<dyn WorkerService> = Arc::new(agent.clone());
    let served_agent = serve(berth_agent::http::router(service, JOIN)).await;
    let registration = RegisterWorker {
        name: "w1".into(),
        region: "test".into(),
        url: served_agent.url.clone(),
        capacity,
        runtimes: agent.runtimes(),
    };
    let response = http
        .post(format!("{url_b}/v1/internal/workers/register"))
        .bearer_auth(JOIN)
        .json(&registration)
        .send()
        .await
        .expect("register");
    assert_eq!(response.status().as_u16(), 200);
    let stats = agent.stats().await.expect("stats");
    let response = http
        .post(format!("{url_b}/v1/internal/workers/w1/heartbeat"))
        .bearer_auth(JOIN)
        .json(&stats)
        .send()
        .await
        .expect("heartbeat");
    assert_eq!(response.status().as_u16(), 204);
    let (status, reply) = send(
        &http,
        &url_b,
        Method::POST,
        "/v1/apps",
        Some(json!({"app_name": "web"}).to_string().into()),
    )
    .await;
    assert_eq!(status, 201, "{reply}");
    let create = |body: Value| {
        let http = http.clone();
        let url = url_b.clone();
        async move {
            http.post(format!("{url}/v1/apps/web/machines"))
                .bearer_auth(ADMIN)
                .json(&body)
                .send()
                .await
                .expect("create")
        }
    };
    let response = create(json!({"skip_launch": true, "config": {"image": NAME}})).await;
    let status = response.status().as_u16();
    let machine: Value = response.json().await.expect("machine");
    assert_eq!(status, 200, "{machine}");
    assert_eq!(machine["image_ref"]["digest"], json!(digest));
    assert_eq!(machine["image_ref"]["name"], json!(NAME));
    assert!(
        agent.puller().blobs_downloaded() >= 2,
        "pulled from the registry"
    );
    let pinned_id = machine["id"].as_str().expect("id").to_owned();

    // A new image under the same name: new creates get it, the Machine keeps its digest.
    let (status, reply) = import(&http, &url_b, NAME, archive(dir.path(), "two")).await;
    assert_eq!(status, 200, "{reply}");
    let second = reply["digest"].as_str().expect("digest").to_owned();
    assert_ne!(second, digest);
    let response = create(json!({"skip_launch": true, "config": {"image": NAME}})).await;
    let newer: Value = response.json().await.expect("machine");
    assert_eq!(newer["image_ref"]["digest"], json!(second), "{newer}");
    let (status, pinned) = send(
        &http,
        &url_b,
        Method::GET,
        &format!("/v1/apps/web/machines/{pinned_id}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{pinned}");
    assert_eq!(pinned["image_ref"]["digest"], json!(digest));

    // Removal through B: gone from every list; a digest no Machine uses leaves the
    // registry (deletes are enabled there), one in use stays.
    let (status, reply) = import(&http, &url_b, "demo/gone:1", archive(dir.path(), "gone")).await;
    assert_eq!(status, 200, "{reply}");
    let gone = reply["digest"].as_str().expect("digest").to_owned();
    let (status, reply) = send(
        &http,
        &url_b,
        Method::DELETE,
        "/v1/images?name=demo/gone:1",
        None,
    )
    .await;
    assert_eq!(status, 204, "{reply}");
    let (status, _) = registry_get(&http, &registry, &format!("demo/gone/manifests/{gone}")).await;
    assert_eq!(status, 404, "an unused manifest is deleted");
    let (status, reply) = send(
        &http,
        &url_b,
        Method::DELETE,
        &format!("/v1/images?name={NAME}"),
        None,
    )
    .await;
    assert_eq!(status, 204, "{reply}");
    assert!(list(&http, &url_b).await.is_empty());
    let (status, _) =
        registry_get(&http, &registry, &format!("demo/shared/manifests/{second}")).await;
    assert_eq!(status, 200, "a manifest a Machine uses stays");
    let (status, reply) = send(
        &http,
        &url_b,
        Method::DELETE,
        &format!("/v1/images?name={NAME}"),
        None,
    )
    .await;
    assert_eq!(status, 404, "{reply}");
    assert_eq!(reply["error"], json!("image_not_found"));
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_on_postgres_without_a_shared_registry_refuses_imports() {
    let dir = tempfile::Builder::new()
        .prefix("berth-shared-images-")
        .tempdir()
        .expect("tempdir");
    let database = berth_control::store::Database::Postgres(postgres::fresh_database().await);
    let (control, served) = replica(dir.path(), 0, &database, None).await;
    let http = reqwest::Client::new();
    let (status, reply) = import(&http, &served.url, NAME, archive(dir.path(), "one")).await;
    assert_eq!(status, 409, "{reply}");
    assert_eq!(reply["error"], json!("image_store_not_shared"));
    assert!(reply["message"]
        .as_str()
        .is_some_and(|message| message.contains("--image-registry")));
    assert!(list(&http, &served.url).await.is_empty());
    control.close().await;
}
