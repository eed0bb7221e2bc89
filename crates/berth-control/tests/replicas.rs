//! Two replicas of the control plane on one PostgreSQL database, with agents served over
//! HTTP as `berth agent` serves them: workers joined through one replica are placed on by
//! the other, cordons and heartbeats through either count everywhere, and quotas and a
//! worker's room hold across both.
//!
//! Each test fails on the control plane from before placement and quotas were shared
//! (checked by running this file against it): B answered 404 to the heartbeat of a worker
//! joined through A; 64 first registrations at once hit `workers_ordinal_key` (500); 50
//! starts split over the replicas started 19 against a quota of 10; 30 creates against
//! `max_machines` 10 made 11; and a worker with room for 4 Machines was given 12 (each
//! replica counted only its own placements). With each replica's own lock alone, 24 volume
//! creates split over both made 5 against `max_volumes` 4, and 6 of 10 extends grew
//! where there was room for 5.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_agent::{Agent, AgentConfig, WorkerService};
use berth_api::{RegisterWorker, Resources};
use berth_control::{ControlConfig, ControlPlane};
use berth_image::build::{busybox_layer, Compression, ImageBuilder};
use berth_image::{ImageStore, UnpackLimits};
use berth_runtime::fake::FakeRuntime;
use common::postgres;
use common::IMAGE;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

const ADMIN: &str = "berth_test-admin-token";
const JOIN: &str = "join";

/// Something served on a loopback port until dropped.
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

struct Replica {
    control: Arc<ControlPlane>,
    served: Served,
}

struct WorkerAgent {
    name: String,
    agent: Agent,
    url: String,
    capacity: Resources,
    /// Serves the agent's API while the test runs.
    _served: Served,
    _runtime: Arc<FakeRuntime>,
}

/// Replicas on one fresh database (A first, B once the test has made its org), sharing
/// one image store with the agents (all in this process), and an HTTP client.
struct Fleet {
    dir: tempfile::TempDir,
    images: Arc<ImageStore>,
    database: berth_control::store::Database,
    replicas: Vec<Replica>,
    agents: Vec<WorkerAgent>,
    http: reqwest::Client,
}

impl Fleet {
    async fn start() -> Fleet {
        let dir = tempfile::Builder::new()
            .prefix("berth-replicas-")
            .tempdir()
            .expect("tempdir");
        let images = Arc::new(
            ImageStore::open(&dir.path().join("images"), UnpackLimits::default()).expect("store"),
        );
        let layout = dir.path().join("layout");
        ImageBuilder::new()
            .layer(
                busybox_layer(Path::new("/bin/busybox")).expect("busybox"),
                Compression::Gzip,
            )
            .cmd(&["/bin/sh"])
            .write_layout(&layout)
            .expect("layout");
        images.import(&layout, IMAGE).expect("import");
        let database = berth_control::store::Database::Postgres(postgres::fresh_database().await);
        let mut fleet = Fleet {
            dir,
            images,
            database,
            replicas: Vec::new(),
            agents: Vec::new(),
            http: reqwest::Client::new(),
        };
        fleet.add_replica().await;
        fleet
    }

    /// Opens one more replica on the fleet's database. Tokens, apps and org limits are
    /// still cached per replica from the store when it opens, so tests make their org
    /// before they open replica B.
    async fn add_replica(&mut self) {
        let data_dir = self
            .dir
            .path()
            .join(format!("control-{}", self.replicas.len()));
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let mut config = ControlConfig::new(data_dir, ADMIN.into(), JOIN.into());
        config.database = Some(self.database.clone());
        let control = ControlPlane::open(config, self.images.clone())
            .await
            .expect("control plane");
        let served = serve(control.router()).await;
        self.replicas.push(Replica { control, served });
    }

    fn url(&self, replica: usize) -> &str {
        &self.replicas[replica].served.url
    }

    /// Starts an agent with `cpus` and joins it through `replica`; answers its index.
    async fn join(&mut self, name: &str, cpus: u32, replica: usize) -> usize {
        let runtime = Arc::new(FakeRuntime::new());
        let capacity = Resources {
            cpus,
            memory_mb: 1 << 20,
            disk_mb: 1 << 30,
        };
        let agent = Agent::open(
            AgentConfig {
                data_dir: self.dir.path().join(format!("worker-{name}")),
                name: name.into(),
                region: "test".into(),
                pids_limit: 64,
                capacity,
                machine_prefix: None,
                join_token: None,
            },
            runtime.clone(),
            self.images.clone(),
        )
        .await
        .expect("agent");
        let service: Arc<dyn WorkerService> = Arc::new(agent.clone());
        let served = serve(berth_agent::http::router(service, JOIN)).await;
        let registration = RegisterWorker {
            name: name.into(),
            region: "test".into(),
            url: served.url.clone(),
            capacity,
            runtimes: agent.runtimes(),
        };
        let (status, body) = self
            .internal(
                replica,
                "/v1/internal/workers/register",
                json!(registration),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        self.agents.push(WorkerAgent {
            name: name.into(),
            agent,
            url: served.url.clone(),
            capacity,
            _served: served,
            _runtime: runtime,
        });
        self.agents.len() - 1
    }

    /// Registers a joined agent again through `replica`, as an agent whose first replica
    /// went away does. The quota and placement tests join every agent through both, so
    /// that they test only what they name (and so that they also ran against the code
    /// from before workers were shared).
    async fn register_again(&self, agent: usize, replica: usize) {
        let worker = &self.agents[agent];
        let registration = RegisterWorker {
            name: worker.name.clone(),
            region: "test".into(),
            url: worker.url.clone(),
            capacity: worker.capacity,
            runtimes: worker.agent.runtimes(),
        };
        let (status, body) = self
            .internal(
                replica,
                "/v1/internal/workers/register",
                json!(registration),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    /// The agent's heartbeat, sent to `replica`.
    async fn heartbeat(&self, agent: usize, replica: usize) -> u16 {
        let worker = &self.agents[agent];
        let stats = worker.agent.stats().await.expect("stats");
        self.internal(
            replica,
            &format!("/v1/internal/workers/{}/heartbeat", worker.name),
            json!(stats),
        )
        .await
        .0
    }

    async fn internal(&self, replica: usize, path: &str, body: Value) -> (u16, Value) {
        self.send(replica, JOIN, Method::POST, path, Some(body))
            .await
    }

    async fn send(
        &self,
        replica: usize,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url(replica)))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("send");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    /// An org with `limits` (and rate limits that stay out of the way), its token and one
    /// app, made through replica A.
    async fn org(&self, slug: &str, quotas: Value) -> String {
        let fast = json!({"per_second": 1000.0, "burst": 1000});
        let body = json!({"slug": slug, "quotas": quotas, "rate_limits":
            {"create": fast, "start": fast, "stop": fast, "update": fast, "read": fast}});
        let (status, reply) = self
            .send(0, ADMIN, Method::POST, "/v1/orgs", Some(body))
            .await;
        assert_eq!(status, 201, "{reply}");
        let (status, reply) = self
            .send(
                0,
                ADMIN,
                Method::POST,
                "/v1/tokens",
                Some(json!({"org_slug": slug, "name": "bot"})),
            )
            .await;
        assert_eq!(status, 201, "{reply}");
        let token = reply["token"].as_str().expect("token").to_owned();
        let (status, reply) = self
            .send(
                0,
                &token,
                Method::POST,
                "/v1/apps",
                Some(json!({"app_name": slug})),
            )
            .await;
        assert_eq!(status, 201, "{reply}");
        token
    }

    /// A create through `replica`: its status and answer.
    async fn create(&self, replica: usize, token: &str, app: &str, launch: bool) -> (u16, Value) {
        self.send(
            replica,
            token,
            Method::POST,
            &format!("/v1/apps/{app}/machines"),
            Some(json!({"skip_launch": !launch, "config": {"image": IMAGE, "guest": {"cpus": 1, "memory_mb": 256}}})),
        )
        .await
    }

    /// What replica `replica` lists as its workers, by name.
    async fn workers(&self, replica: usize) -> Vec<Value> {
        let (status, body) = self
            .send(replica, ADMIN, Method::GET, "/v1/workers", None)
            .await;
        assert_eq!(status, 200, "{body}");
        body.as_array().cloned().unwrap_or_default()
    }

    /// Waits until `check` holds of replica `replica`'s worker list (a refresh away).
    async fn until_workers(&self, replica: usize, check: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let workers = self.workers(replica).await;
            if check(&workers) {
                return;
            }
            assert!(Instant::now() < deadline, "never: {workers:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn worker_named<'a>(workers: &'a [Value], name: &str) -> Option<&'a Value> {
    workers.iter().find(|worker| worker["name"] == name)
}

#[tokio::test]
async fn a_worker_joined_through_one_replica_is_placed_on_and_cordoned_through_the_other() {
    let mut fleet = Fleet::start().await;
    let token = fleet.org("acme", json!({})).await;
    fleet.add_replica().await;
    let w1 = fleet.join("w1", 64, 0).await;
    let w2 = fleet.join("w2", 64, 0).await;
    // Heartbeats reach B only: B takes them for a worker joined through A, and A judges
    // the workers healthy by them.
    assert_eq!(fleet.heartbeat(w1, 1).await, 204);
    assert_eq!(fleet.heartbeat(w2, 1).await, 204);
    for replica in [0, 1] {
        let (status, body) = fleet.create(replica, &token, "acme", true).await;
        assert_eq!(status, 200, "through {replica}: {body}");
    }
    fleet
        .until_workers(1, |workers| {
            ["w1", "w2"].iter().all(|name| {
                worker_named(workers, name).is_some_and(|worker| worker["status"] == "ready")
            })
        })
        .await;

    // Cordoned through A: B places nothing more there, at once.
    let (status, body) = fleet
        .send(0, ADMIN, Method::POST, "/v1/workers/w1/cordon", None)
        .await;
    assert_eq!(status, 200, "{body}");
    for _ in 0..6 {
        let (status, body) = fleet.create(1, &token, "acme", true).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["worker"], "w2", "{body}");
    }
    // And B's view shows it within a refresh.
    fleet
        .until_workers(1, |workers| {
            worker_named(workers, "w1").is_some_and(|worker| worker["cordoned"] == true)
        })
        .await;
    // B follows the notices of a worker joined through A: a stop through A is seen by a
    // get through B.
    let (_, list) = fleet
        .send(1, &token, Method::GET, "/v1/apps/acme/machines", None)
        .await;
    let on_w1 = list
        .as_array()
        .expect("list")
        .iter()
        .find(|machine| machine["worker"] == "w1")
        .expect("one Machine placed on w1 before the cordon")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (status, body) = fleet
        .send(
            0,
            &token,
            Method::POST,
            &format!("/v1/apps/acme/machines/{on_w1}/stop"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = fleet
        .send(
            1,
            &token,
            Method::GET,
            &format!("/v1/apps/acme/machines/{on_w1}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "stopped", "{body}");
}

#[tokio::test]
async fn first_registrations_at_once_through_both_replicas_get_distinct_prefixes() {
    let mut fleet = Fleet::start().await;
    fleet.add_replica().await;
    let joins = (0..64).map(|n| {
        let fleet = &fleet;
        async move {
            let registration = json!({
                "name": format!("w{n}"), "region": "test",
                "url": format!("http://127.0.0.1:{}", 10_000 + n),
                "capacity": {"cpus": 1, "memory_mb": 1024, "disk_mb": 1024}});
            fleet
                .internal(n % 2, "/v1/internal/workers/register", registration)
                .await
        }
    });
    let answers = futures::future::join_all(joins).await;
    let mut prefixes = std::collections::BTreeSet::new();
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        prefixes.insert(body["machine_prefix"].as_str().expect("prefix").to_owned());
    }
    assert_eq!(prefixes.len(), 64, "{prefixes:?}");
}

#[tokio::test]
async fn fifty_starts_split_over_two_replicas_against_a_quota_of_ten_start_exactly_ten() {
    let mut fleet = Fleet::start().await;
    let token = fleet
        .org("crowd", json!({"max_started_machines": 10}))
        .await;
    fleet.add_replica().await;
    let w = fleet.join("w1", 1024, 0).await;
    fleet.register_again(w, 1).await;
    assert_eq!(fleet.heartbeat(w, 0).await, 204);
    assert_eq!(fleet.heartbeat(w, 1).await, 204);
    let mut ids = Vec::new();
    for n in 0..50 {
        let (status, body) = fleet.create(n % 2, &token, "crowd", false).await;
        assert_eq!(status, 200, "{body}");
        ids.push(body["id"].as_str().expect("id").to_owned());
    }
    let starts = ids.iter().enumerate().map(|(n, id)| {
        let (fleet, token) = (&fleet, &token);
        async move {
            fleet
                .send(
                    n % 2,
                    token,
                    Method::POST,
                    &format!("/v1/apps/crowd/machines/{id}/start"),
                    None,
                )
                .await
        }
    });
    let answers = futures::future::join_all(starts).await;
    let started = answers.iter().filter(|(status, _)| *status == 200).count();
    for (status, body) in answers.iter().filter(|(status, _)| *status != 200) {
        assert_eq!(*status, 403, "{body}");
        assert_eq!(body["error"], "quota_exceeded", "{body}");
        assert_eq!(body["quota"], "max_started_machines", "{body}");
    }
    assert_eq!(started, 10);
    let running = fleet.agents[w]
        .agent
        .list("crowd")
        .await
        .expect("list")
        .iter()
        .filter(|machine| machine.state == berth_api::MachineState::Started)
        .count();
    assert_eq!(running, 10);

    // Stopping one through A frees its slot for a start through B.
    let first = answers
        .iter()
        .position(|(status, _)| *status == 200)
        .expect("one started");
    let (status, body) = fleet
        .send(
            0,
            &token,
            Method::POST,
            &format!("/v1/apps/crowd/machines/{}/stop", ids[first]),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let refused = answers
        .iter()
        .position(|(status, _)| *status != 200)
        .expect("one refused");
    let path = format!("/v1/apps/crowd/machines/{}/start", ids[refused]);
    // The stop's notice reaches the store a moment after its answer.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = fleet.send(1, &token, Method::POST, &path, None).await;
        if status == 200 {
            break;
        }
        assert_eq!(body["error"], "quota_exceeded", "{body}");
        assert!(Instant::now() < deadline, "the slot never freed: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn creates_split_over_two_replicas_against_max_machines_make_exactly_the_quota() {
    let mut fleet = Fleet::start().await;
    let token = fleet
        .org(
            "capped",
            json!({"max_machines": 10, "max_started_machines": 4}),
        )
        .await;
    fleet.add_replica().await;
    let w = fleet.join("w1", 1024, 0).await;
    fleet.register_again(w, 1).await;
    assert_eq!(fleet.heartbeat(w, 0).await, 204);
    assert_eq!(fleet.heartbeat(w, 1).await, 204);
    // Half launch: those count against the started quota too.
    let creates = (0..30).map(|n| {
        let (fleet, token) = (&fleet, &token);
        async move { fleet.create(n % 2, token, "capped", n % 3 == 0).await }
    });
    let answers = futures::future::join_all(creates).await;
    let made = answers.iter().filter(|(status, _)| *status == 200).count();
    for (status, body) in answers.iter().filter(|(status, _)| *status != 200) {
        assert_eq!(*status, 403, "{body}");
        assert_eq!(body["error"], "quota_exceeded", "{body}");
    }
    assert_eq!(made, 10);
    let (_, list) = fleet
        .send(1, &token, Method::GET, "/v1/apps/capped/machines", None)
        .await;
    assert_eq!(list.as_array().map(Vec::len), Some(10), "{list}");
    let started = fleet.agents[w]
        .agent
        .list("capped")
        .await
        .expect("list")
        .iter()
        .filter(|machine| machine.state == berth_api::MachineState::Started)
        .count();
    assert!(started <= 4, "{started} started against a quota of 4");
}

#[tokio::test]
async fn two_replicas_placing_at_once_fill_a_worker_with_room_for_four_exactly() {
    let mut fleet = Fleet::start().await;
    let token = fleet.org("packed", json!({})).await;
    fleet.add_replica().await;
    let w = fleet.join("small", 4, 0).await;
    fleet.register_again(w, 1).await;
    assert_eq!(fleet.heartbeat(w, 1).await, 204);
    assert_eq!(fleet.heartbeat(w, 0).await, 204);
    let creates = (0..12).map(|n| {
        let (fleet, token) = (&fleet, &token);
        async move { fleet.create(n % 2, token, "packed", true).await }
    });
    let answers = futures::future::join_all(creates).await;
    let placed = answers.iter().filter(|(status, _)| *status == 200).count();
    for (status, body) in answers.iter().filter(|(status, _)| *status != 200) {
        assert_eq!(*status, 503, "{body}");
        assert_eq!(body["error"], "insufficient_capacity", "{body}");
        assert!(body["retry_after_ms"].as_u64().is_some(), "{body}");
    }
    assert_eq!(placed, 4);
    let on_worker = fleet.agents[w].agent.list("packed").await.expect("list");
    assert_eq!(on_worker.len(), 4);
    let indexed = fleet.replicas[0]
        .control
        .store()
        .machines_on("small")
        .await
        .expect("index");
    assert_eq!(indexed.len(), 4);
}

/// An org with volume quotas, both replicas, and a worker joined through both.
async fn volume_fleet(slug: &str, quotas: Value) -> (Fleet, String) {
    let mut fleet = Fleet::start().await;
    let token = fleet.org(slug, quotas).await;
    fleet.add_replica().await;
    let w = fleet.join("w1", 64, 0).await;
    fleet.register_again(w, 1).await;
    assert_eq!(fleet.heartbeat(w, 0).await, 204);
    assert_eq!(fleet.heartbeat(w, 1).await, 204);
    (fleet, token)
}

async fn create_volume(fleet: &Fleet, replica: usize, token: &str, app: &str) -> (u16, Value) {
    fleet
        .send(
            replica,
            token,
            Method::POST,
            &format!("/v1/apps/{app}/volumes"),
            Some(json!({"name": "data", "size_gb": 1})),
        )
        .await
}

/// Every answer but the 200s is the quota `quota` refusing; answers how many were 200.
fn admitted(answers: &[(u16, Value)], quota: &str) -> usize {
    for (status, body) in answers.iter().filter(|(status, _)| *status != 200) {
        assert_eq!(*status, 403, "{body}");
        assert_eq!(body["error"], "quota_exceeded", "{body}");
        assert_eq!(body["quota"], quota, "{body}");
    }
    answers.iter().filter(|(status, _)| *status == 200).count()
}

async fn volume_usage(fleet: &Fleet, token: &str, org: &str) -> (u64, u64) {
    let (status, body) = fleet
        .send(1, token, Method::GET, &format!("/v1/orgs/{org}"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let usage = &body["usage"];
    (
        usage["volumes"].as_u64().expect("volumes"),
        usage["volume_gb"].as_u64().expect("volume_gb"),
    )
}

#[tokio::test]
async fn volume_creates_split_over_two_replicas_against_max_volumes_make_exactly_the_quota() {
    let (fleet, token) = volume_fleet("stored", json!({"max_volumes": 4})).await;
    let creates = (0..24).map(|n| create_volume(&fleet, n % 2, &token, "stored"));
    let answers = futures::future::join_all(creates).await;
    assert_eq!(admitted(&answers, "max_volumes"), 4, "{answers:?}");
    let (status, list) = fleet
        .send(1, &token, Method::GET, "/v1/apps/stored/volumes", None)
        .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list.as_array().map(Vec::len), Some(4), "{list}");
    assert_eq!(volume_usage(&fleet, &token, "stored").await, (4, 4));
}

#[tokio::test]
async fn volume_extends_split_over_two_replicas_grow_exactly_into_max_volume_gb() {
    let (fleet, token) = volume_fleet("grown", json!({"max_volume_gb": 20})).await;
    let mut ids = Vec::new();
    for n in 0..10 {
        let (status, body) = create_volume(&fleet, n % 2, &token, "grown").await;
        assert_eq!(status, 200, "{body}");
        ids.push(body["id"].as_str().expect("id").to_owned());
    }
    // 10 GB of 20 used: growing each volume from 1 to 3 GB takes 2, so 5 of 10 fit.
    let extends = ids.iter().enumerate().map(|(n, id)| {
        let (fleet, token) = (&fleet, &token);
        async move {
            fleet
                .send(
                    n % 2,
                    token,
                    Method::PUT,
                    &format!("/v1/apps/grown/volumes/{id}/extend"),
                    Some(json!({"size_gb": 3})),
                )
                .await
        }
    });
    let answers = futures::future::join_all(extends).await;
    assert_eq!(admitted(&answers, "max_volume_gb"), 5, "{answers:?}");
    assert_eq!(volume_usage(&fleet, &token, "grown").await, (10, 20));
}
