//! The control plane served over real HTTP on loopback, with one agent on the fake runtime
//! and a real image store: API behaviour without runc.

#![allow(dead_code)]

pub mod postgres;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use berth_agent::{Agent, AgentConfig, WorkerService};
use berth_api::{
    DoctorReport, ExecResponse, Machine, MachineEvent, StartStopResponse, StopRequest,
    UpdateMachineRequest, UsageRecord,
};
use berth_control::{ApiClock, ControlConfig, ControlPlane};
use berth_image::build::{busybox_layer, Compression, ImageBuilder};
use berth_image::PullScope;
use berth_image::{ImageStore, UnpackLimits};
use berth_runtime::fake::FakeRuntime;
use berth_worker::{
    CreateOnWorker, EventSource, ExecOnWorker, ImageUsage, LogChunk, NoticeSnapshot, WorkerListener,
};
use reqwest::Method;
use serde_json::{json, Value};

pub const IMAGE: &str = "demo/busybox:1";

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub runtime: Arc<FakeRuntime>,
    pub agent: Agent,
    /// How many times the control plane asked the worker for one Machine (`get`).
    pub worker_gets: Arc<AtomicUsize>,
    pub control: Arc<ControlPlane>,
    pub clock: ApiClock,
    pub url: String,
    pub admin: String,
    pub http: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A reply: status, headers and the body as JSON (or a string when it is not JSON).
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut ControlConfig)) -> Harness {
        let dir = tempfile::Builder::new()
            .prefix("berth-control-test-")
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
        let runtime = Arc::new(FakeRuntime::new());
        let agent = Agent::open(
            AgentConfig {
                data_dir: dir.path().join("worker"),
                name: "local".into(),
                region: "test".into(),
                pids_limit: 64,
                capacity: berth_api::Resources {
                    cpus: 1024,
                    memory_mb: 1 << 20,
                    disk_mb: 1 << 30,
                },
                machine_prefix: None,
                join_token: None,
            },
            runtime.clone(),
            images.clone(),
        )
        .await
        .expect("agent");
        let admin = "berth_test-admin-token".to_owned();
        let mut config = ControlConfig::new(dir.path().to_owned(), admin.clone(), "join".into());
        config.database = Some(postgres::test_database(dir.path()).await);
        adjust(&mut config);
        let clock = config.clock.clone();
        let control = ControlPlane::open(config, images)
            .await
            .expect("control plane");
        let registration = berth_api::RegisterWorker {
            name: "local".into(),
            region: "test".into(),
            url: String::new(),
            capacity: berth_api::Resources {
                cpus: 1024,
                memory_mb: 1 << 20,
                disk_mb: 1 << 30,
            },
            runtimes: agent.runtimes(),
        };
        let worker_gets = Arc::new(AtomicUsize::new(0));
        let service: Arc<dyn WorkerService> = Arc::new(CountingWorker {
            agent: agent.clone(),
            gets: worker_gets.clone(),
        });
        control
            .add_local_worker(registration, service)
            .await
            .expect("worker");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let router = control.router();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Harness {
            dir,
            runtime,
            agent,
            worker_gets,
            control,
            clock,
            url,
            admin,
            http: reqwest::Client::new(),
            server,
        }
    }

    pub async fn send(
        &self,
        token: &str,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("send");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn call(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let reply = self.send(token, method, path, &[], body).await;
        (reply.status, reply.body)
    }

    /// Makes an org (with `limits`, if any) and a token for it; answers the token.
    pub async fn org(&self, slug: &str, limits: Value) -> String {
        let mut body = json!({"slug": slug});
        if let Value::Object(extra) = limits {
            for (key, value) in extra {
                body[key] = value;
            }
        }
        let (status, reply) = self
            .call(&self.admin, Method::POST, "/v1/orgs", Some(body))
            .await;
        assert_eq!(status, 201, "{reply}");
        self.token(slug, &format!("{slug}-bot")).await
    }

    pub async fn token(&self, org: &str, name: &str) -> String {
        let (status, reply) = self
            .call(
                &self.admin,
                Method::POST,
                "/v1/tokens",
                Some(json!({"org_slug": org, "name": name})),
            )
            .await;
        assert_eq!(status, 201, "{reply}");
        reply["token"].as_str().expect("token").to_owned()
    }

    pub async fn app(&self, token: &str, name: &str) {
        let (status, reply) = self
            .call(
                token,
                Method::POST,
                "/v1/apps",
                Some(json!({"app_name": name})),
            )
            .await;
        assert_eq!(status, 201, "{reply}");
    }

    /// Creates a Machine (stopped unless `launch`) and answers its id.
    pub async fn machine(&self, token: &str, app: &str, launch: bool) -> String {
        let (status, reply) = self
            .call(
                token,
                Method::POST,
                &format!("/v1/apps/{app}/machines"),
                Some(json!({"skip_launch": !launch, "config": {"image": IMAGE}})),
            )
            .await;
        assert_eq!(status, 200, "{reply}");
        reply["id"].as_str().expect("id").to_owned()
    }
}

pub fn assert_error(reply: &(u16, Value), status: u16, code: &str) {
    assert_eq!(reply.0, status, "{}", reply.1);
    assert_eq!(reply.1["error"], code, "{}", reply.1);
    assert!(
        reply.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        reply.1
    );
}

/// The agent, counting the `get` calls the control plane makes of it.
struct CountingWorker {
    agent: Agent,
    gets: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl WorkerService for CountingWorker {
    async fn create(&self, request: CreateOnWorker) -> berth_worker::Result<Machine> {
        self.agent.create(request).await
    }
    async fn start(
        &self,
        id: &str,
        source: EventSource,
    ) -> berth_worker::Result<StartStopResponse> {
        self.agent.start(id, source).await
    }
    async fn stop(
        &self,
        id: &str,
        request: StopRequest,
    ) -> berth_worker::Result<StartStopResponse> {
        self.agent.stop(id, request).await
    }
    async fn suspend(
        &self,
        id: &str,
        source: EventSource,
    ) -> berth_worker::Result<StartStopResponse> {
        self.agent.suspend(id, source).await
    }
    async fn update(
        &self,
        id: &str,
        request: UpdateMachineRequest,
        pull: PullScope,
    ) -> berth_worker::Result<Machine> {
        self.agent.update(id, request, pull).await
    }
    async fn signal(&self, id: &str, signal: &str) -> berth_worker::Result<()> {
        self.agent.signal(id, signal).await
    }
    async fn destroy(&self, id: &str, force: bool) -> berth_worker::Result<()> {
        self.agent.destroy(id, force).await
    }
    async fn get(&self, id: &str) -> berth_worker::Result<Machine> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.agent.get(id).await
    }
    async fn list(&self, app: &str) -> berth_worker::Result<Vec<Machine>> {
        self.agent.list(app).await
    }
    async fn volume_create(
        &self,
        request: berth_worker::CreateVolumeOnWorker,
    ) -> berth_worker::Result<berth_api::Volume> {
        self.agent.volume_create(request).await
    }
    async fn volume_get(&self, id: &str) -> berth_worker::Result<berth_api::Volume> {
        self.agent.volume_get(id).await
    }
    async fn volume_list(&self, app: &str) -> berth_worker::Result<Vec<berth_api::Volume>> {
        self.agent.volume_list(app).await
    }
    async fn volume_update(
        &self,
        id: &str,
        request: berth_api::UpdateVolumeRequest,
    ) -> berth_worker::Result<berth_api::Volume> {
        self.agent.volume_update(id, request).await
    }
    async fn volume_extend(
        &self,
        id: &str,
        size_gb: u32,
    ) -> berth_worker::Result<berth_api::Volume> {
        self.agent.volume_extend(id, size_gb).await
    }
    async fn volume_delete(&self, id: &str) -> berth_worker::Result<berth_api::Volume> {
        self.agent.volume_delete(id).await
    }
    async fn volume_snapshots(
        &self,
        id: &str,
    ) -> berth_worker::Result<Vec<berth_api::VolumeSnapshot>> {
        self.agent.volume_snapshots(id).await
    }
    async fn volume_snapshot(&self, id: &str) -> berth_worker::Result<berth_api::VolumeSnapshot> {
        self.agent.volume_snapshot(id).await
    }
    async fn checkpoint_create(
        &self,
        id: &str,
        comment: String,
    ) -> berth_worker::Result<berth_api::Checkpoint> {
        self.agent.checkpoint_create(id, comment).await
    }
    async fn checkpoint_list(&self, id: &str) -> berth_worker::Result<Vec<berth_api::Checkpoint>> {
        self.agent.checkpoint_list(id).await
    }
    async fn checkpoint_delete(&self, id: &str, checkpoint: &str) -> berth_worker::Result<()> {
        self.agent.checkpoint_delete(id, checkpoint).await
    }
    async fn checkpoint_restore(
        &self,
        id: &str,
        checkpoint: &str,
    ) -> berth_worker::Result<berth_api::RestoreCheckpointResponse> {
        self.agent.checkpoint_restore(id, checkpoint).await
    }
    async fn migration(
        &self,
        step: berth_worker::MigrationStep,
    ) -> berth_worker::Result<berth_worker::MigrationAnswer> {
        self.agent.migration(step).await
    }
    async fn migration_stream(
        &self,
        id: &str,
        request: berth_worker::StreamRequest,
    ) -> berth_worker::Result<berth_worker::MigrationStream> {
        self.agent.migration_stream(id, request).await
    }
    async fn usage_since(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> berth_worker::Result<Vec<UsageRecord>> {
        self.agent.usage_since(after_seq, limit).await
    }
    async fn logs(&self, id: &str, max_bytes: u64) -> berth_worker::Result<Vec<u8>> {
        self.agent.logs(id, max_bytes).await
    }
    async fn image_usage(&self) -> berth_worker::Result<Vec<ImageUsage>> {
        self.agent.image_usage().await
    }
    fn set_listener(&self, listener: Arc<dyn WorkerListener>) {
        self.agent.set_listener(listener)
    }
    async fn notice_snapshot(&self) -> berth_worker::Result<NoticeSnapshot> {
        self.agent.notice_snapshot().await
    }
    async fn machine_events(
        &self,
        id: &str,
        since: i64,
        limit: u32,
    ) -> berth_worker::Result<Vec<MachineEvent>> {
        self.agent.machine_events(id, since, limit).await
    }
    async fn cordon(&self, id: &str, cordoned: bool) -> berth_worker::Result<Machine> {
        self.agent.cordon(id, cordoned).await
    }
    async fn processes(&self, id: &str) -> berth_worker::Result<Vec<berth_api::ProcessStat>> {
        self.agent.processes(id).await
    }
    async fn versions(&self, id: &str) -> berth_worker::Result<Vec<berth_api::MachineVersion>> {
        self.agent.versions(id).await
    }
    async fn exec(&self, id: &str, request: ExecOnWorker) -> berth_worker::Result<ExecResponse> {
        self.agent.exec(id, request).await
    }
    async fn set_metadata(
        &self,
        id: &str,
        key: &str,
        value: Option<String>,
    ) -> berth_worker::Result<Machine> {
        self.agent.set_metadata(id, key, value).await
    }
    async fn read_logs(
        &self,
        id: &str,
        since: Option<u64>,
        follow: bool,
        max_bytes: u64,
    ) -> berth_worker::Result<tokio::sync::mpsc::Receiver<LogChunk>> {
        self.agent.read_logs(id, since, follow, max_bytes).await
    }
    async fn doctor(&self, repair: bool) -> berth_worker::Result<DoctorReport> {
        self.agent.doctor(repair).await
    }
}
