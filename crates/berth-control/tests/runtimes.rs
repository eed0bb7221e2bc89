//! `config.runtime` through the API: workers list the drivers they offer, placement picks
//! only workers that offer a Machine's, and the refusals have their stable shapes. Two
//! in-process workers beside the harness's own (which it cordons): `both` offers native
//! and runc, `plain` native only, each driver a fake.

mod common;

use std::path::Path;
use std::sync::Arc;

use berth_agent::{Agent, AgentConfig, Drivers, WorkerService};
use berth_image::build::{busybox_layer, Compression, ImageBuilder};
use berth_image::{ImagePuller, ImageStore, UnpackLimits};
use berth_runtime::fake::FakeRuntime;
use common::{assert_error, Harness, IMAGE};
use reqwest::Method;
use serde_json::{json, Value};

struct Worker {
    native: Arc<FakeRuntime>,
    runc: Option<Arc<FakeRuntime>>,
}

/// Joins an in-process worker `name` offering native, and runc when `with_runc`.
async fn join(harness: &Harness, name: &str, with_runc: bool) -> Worker {
    let dir = harness.dir.path().join(format!("worker-{name}"));
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
    let native = Arc::new(FakeRuntime::new());
    let runc = with_runc.then(|| Arc::new(FakeRuntime::new()));
    let mut drivers = Drivers::new("native", native.clone());
    if let Some(runc) = &runc {
        drivers = drivers.with("runc", runc.clone());
    }
    let capacity = berth_api::Resources {
        cpus: 64,
        memory_mb: 1 << 16,
        disk_mb: 1 << 20,
    };
    let agent = Agent::open_with_drivers(
        AgentConfig {
            data_dir: dir.join("worker"),
            name: name.into(),
            region: "test".into(),
            pids_limit: 64,
            capacity,
            machine_prefix: None,
            join_token: None,
        },
        drivers,
        Arc::new(ImagePuller::new(images, Default::default())),
    )
    .await
    .expect("agent");
    let registration = berth_api::RegisterWorker {
        name: name.into(),
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
    Worker { native, runc }
}

/// The harness with `both` and `plain` joined and its own worker cordoned, and an org
/// with an app; answers the org's token.
async fn cluster() -> (Harness, Worker, Worker, String) {
    let harness = Harness::start().await;
    let (status, body) = harness
        .call(
            &harness.admin,
            Method::POST,
            "/v1/workers/local/cordon",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let both = join(&harness, "both", true).await;
    let plain = join(&harness, "plain", false).await;
    let rate = json!({"per_second": 1000.0, "burst": 1000});
    let fast = json!({"create": rate, "update": rate, "destroy": rate, "read": rate});
    let token = harness.org("acme", json!({"rate_limits": fast})).await;
    harness.app(&token, "app").await;
    (harness, both, plain, token)
}

async fn create(harness: &Harness, token: &str, runtime: Option<&str>) -> (u16, Value) {
    let mut config = json!({"image": IMAGE});
    if let Some(runtime) = runtime {
        config["runtime"] = json!(runtime);
    }
    harness
        .call(
            token,
            Method::POST,
            "/v1/apps/app/machines",
            Some(json!({"config": config})),
        )
        .await
}

async fn machine_count(harness: &Harness, token: &str) -> usize {
    let (status, body) = harness
        .call(token, Method::GET, "/v1/apps/app/machines", None)
        .await;
    assert_eq!(status, 200, "{body}");
    body.as_array().map_or(0, Vec::len)
}

async fn prepared(runtime: &FakeRuntime, id: &str) -> bool {
    runtime.calls().await.contains(&format!("prepare {id}"))
}

// Without the change `runtimes` was not part of a worker at all (null here).
#[tokio::test]
async fn workers_list_the_runtimes_they_offer() {
    let (harness, _both, _plain, _token) = cluster().await;
    let (status, body) = harness
        .call(&harness.admin, Method::GET, "/v1/workers", None)
        .await;
    assert_eq!(status, 200, "{body}");
    let runtimes = |name: &str| {
        body.as_array()
            .and_then(|workers| workers.iter().find(|worker| worker["name"] == name))
            .map(|worker| worker["runtimes"].clone())
    };
    assert_eq!(runtimes("both"), Some(json!(["native", "runc"])));
    assert_eq!(runtimes("plain"), Some(json!(["native"])));
    // The harness's own worker runs one fake, under the fake's name.
    assert_eq!(runtimes("local"), Some(json!(["fake"])));
}

// Without the change placement ignored the driver: spread put half of these on `plain`,
// which runs every Machine with its one driver.
#[tokio::test]
async fn placement_picks_only_workers_that_offer_the_runtime() {
    let (harness, both, plain, token) = cluster().await;
    let runc = both.runc.as_ref().expect("both has runc");
    for _ in 0..4 {
        let (status, machine) = create(&harness, &token, Some("runc")).await;
        assert_eq!(status, 200, "{machine}");
        assert_eq!(machine["worker"], "both", "{machine}");
        assert_eq!(machine["config"]["runtime"], "runc", "{machine}");
        let id = machine["id"].as_str().expect("id");
        assert!(prepared(runc, id).await, "runc laid out {id}");
        assert!(!prepared(&both.native, id).await);
        // And GET shows it too.
        let (status, got) = harness
            .call(
                &token,
                Method::GET,
                &format!("/v1/apps/app/machines/{id}"),
                None,
            )
            .await;
        assert_eq!((status, &got["config"]["runtime"]), (200, &json!("runc")));
    }
    // No driver asked: any worker, and the Machine shows the default it got.
    let mut workers = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let (status, machine) = create(&harness, &token, None).await;
        assert_eq!(status, 200, "{machine}");
        assert_eq!(machine["config"]["runtime"], "native", "{machine}");
        workers.insert(machine["worker"].as_str().unwrap_or_default().to_owned());
    }
    assert!(
        workers.contains("plain"),
        "spread uses plain too: {workers:?}"
    );
    assert!(plain.runc.is_none());
}

// Without the change an unknown name was accepted (and ignored), and a driver no worker
// has was placed anywhere.
#[tokio::test]
async fn an_unknown_runtime_is_400_and_one_no_worker_offers_is_503() {
    let (harness, _both, _plain, token) = cluster().await;
    let refused = create(&harness, &token, Some("kata")).await;
    assert_error(&refused, 400, "invalid_config");
    assert_eq!(refused.1["field"], "config.runtime", "{}", refused.1);

    let refused = create(&harness, &token, Some("gvisor")).await;
    assert_error(&refused, 503, "insufficient_capacity");
    assert_eq!(refused.1["missing"], json!(["runtime"]), "{}", refused.1);
    assert_eq!(machine_count(&harness, &token).await, 0, "nothing was made");

    // A worker that offers it is the only one that will do, even when it is full:
    // cordoned, `both` leaves runc nowhere.
    let (status, body) = harness
        .call(
            &harness.admin,
            Method::POST,
            "/v1/workers/both/cordon",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let refused = create(&harness, &token, Some("runc")).await;
    assert_error(&refused, 503, "insufficient_capacity");
    assert_eq!(machine_count(&harness, &token).await, 0);
    // The default still has a worker.
    let (status, machine) = create(&harness, &token, None).await;
    assert_eq!((status, &machine["worker"]), (200, &json!("plain")));
}

// Without the change an update could not change the driver (and a Fly client's update,
// which names none, was the only kind).
#[tokio::test]
async fn an_update_changes_the_driver_on_a_worker_that_offers_it() {
    let (harness, both, _plain, token) = cluster().await;
    let runc = both.runc.as_ref().expect("both has runc");
    let (status, machine) = create(&harness, &token, Some("runc")).await;
    assert_eq!(status, 200, "{machine}");
    let id = machine["id"].as_str().expect("id").to_owned();
    let path = format!("/v1/apps/app/machines/{id}");
    let update = |runtime: Option<&str>| {
        let mut config = json!({"image": IMAGE});
        if let Some(runtime) = runtime {
            config["runtime"] = json!(runtime);
        }
        Some(json!({"config": config}))
    };
    let (status, updated) = harness
        .call(&token, Method::POST, &path, update(Some("native")))
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["config"]["runtime"], "native");
    assert_eq!(updated["state"], "started");
    assert!(
        prepared(&both.native, &id).await,
        "native laid it out again"
    );
    assert!(
        both.native.calls().await.contains(&format!("start {id}")),
        "native started it"
    );
    // An update that names none (as Fly's clients send) keeps it.
    let (status, kept) = harness
        .call(&token, Method::POST, &path, update(None))
        .await;
    assert_eq!(
        (status, &kept["config"]["runtime"]),
        (200, &json!("native"))
    );
    // Unknown: refused at the edge, the Machine unchanged.
    let refused = harness
        .call(&token, Method::POST, &path, update(Some("kata")))
        .await;
    assert_error(&refused, 400, "invalid_config");
    assert_eq!(refused.1["field"], "config.runtime");
    runc.clear_calls().await;
    let (status, back) = harness
        .call(&token, Method::POST, &path, update(Some("runc")))
        .await;
    assert_eq!((status, &back["config"]["runtime"]), (200, &json!("runc")));
    assert!(runc.calls().await.contains(&format!("start {id}")));
}

// Without the change the Machine's worker took any driver and ran it with its own.
#[tokio::test]
async fn an_update_to_a_driver_its_worker_lacks_is_503_and_changes_nothing() {
    let (harness, _both, plain, token) = cluster().await;
    let (status, body) = harness
        .call(
            &harness.admin,
            Method::POST,
            "/v1/workers/both/cordon",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, machine) = create(&harness, &token, None).await;
    assert_eq!((status, &machine["worker"]), (200, &json!("plain")));
    let id = machine["id"].as_str().expect("id").to_owned();
    let path = format!("/v1/apps/app/machines/{id}");
    plain.native.clear_calls().await;
    let refused = harness
        .call(
            &token,
            Method::POST,
            &path,
            Some(json!({"config": {"image": IMAGE, "runtime": "runc"}})),
        )
        .await;
    assert_error(&refused, 503, "insufficient_capacity");
    assert_eq!(refused.1["missing"], json!(["runtime"]), "{}", refused.1);
    assert_eq!(refused.1["worker"], "plain", "{}", refused.1);
    let (status, got) = harness.call(&token, Method::GET, &path, None).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(
        (&got["state"], &got["config"]["runtime"]),
        (&json!("started"), &json!("native"))
    );
    let calls = plain.native.calls().await;
    assert!(
        !calls
            .iter()
            .any(|call| call.starts_with("signal") || call.starts_with("prepare")),
        "{calls:?}"
    );
}
