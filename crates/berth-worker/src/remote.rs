//! A worker in another process, reached over the agent's HTTP API. Every call
//! has a deadline; calls that are safe to repeat are retried on connection failures with
//! a short backoff. A worker that cannot be reached answers `worker_unavailable`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use berth_api::{
    ErrorBody, ExecResponse, Machine, MachineEvent, StartStopResponse, StopRequest,
    UpdateMachineRequest, UsageRecord,
};
use futures::StreamExt;
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::task::AbortHandle;

use crate::error::{Result, WorkerError};
use crate::service::{
    CreateOnWorker, CreateVolumeOnWorker, EventSource, ExecOnWorker, ImageUsage, LogChunk,
    MigrationAnswer, MigrationStep, MigrationStream, NoticeSnapshot, StreamRequest, UpdateOnWorker,
    WorkerListener, WorkerService,
};
use crate::wire::{MetadataChange, NoticeLine, StartBody, NOTICE_KEEPALIVE};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const READ_DEADLINE: Duration = Duration::from_secs(10);
/// Create may pull an image.
const CREATE_DEADLINE: Duration = Duration::from_secs(600);
/// Start, stop and update wait for processes; stop for up to its own timeout.
const LIFECYCLE_DEADLINE: Duration = Duration::from_secs(330);
const RETRIES: u32 = 3;
/// How often a followed log of a remote Machine is asked for more.
const LOG_POLL: Duration = Duration::from_millis(250);

/// Without a keepalive for this long, the notice stream is taken for dead.
const NOTICE_SILENCE: Duration = Duration::from_secs(3 * NOTICE_KEEPALIVE.as_secs());
const NOTICE_RETRY_MIN: Duration = Duration::from_millis(200);
const NOTICE_RETRY_MAX: Duration = Duration::from_secs(5);
/// A notice line longer than this is garbage, not a snapshot.
const MAX_NOTICE_LINE: usize = 64 * 1024 * 1024;

#[derive(Clone)]
pub struct RemoteWorker {
    name: String,
    base: String,
    join_token: String,
    http: reqwest::Client,
    follower: Arc<NoticeFollower>,
}

/// The task that follows the worker's notices; it ends with the last clone of the
/// `RemoteWorker` (a worker that registers again gets a new one).
#[derive(Default)]
struct NoticeFollower {
    task: Mutex<Option<AbortHandle>>,
}

impl NoticeFollower {
    fn replace(&self, task: Option<AbortHandle>) {
        let mut slot = match self.task.lock() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(previous) = std::mem::replace(&mut *slot, task) {
            previous.abort();
        }
    }
}

impl Drop for NoticeFollower {
    fn drop(&mut self) {
        self.replace(None);
    }
}

impl RemoteWorker {
    pub fn new(name: &str, base_url: &str, join_token: &str) -> Result<RemoteWorker> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            // Below the agent's header timeout (10 s), which closes idle connections: a
            // pooled one is dropped here first, not raced against the server's close.
            .pool_idle_timeout(Duration::from_secs(5))
            .build()
            .map_err(|error| WorkerError::internal(format!("http client: {error}")))?;
        Ok(RemoteWorker {
            name: name.to_owned(),
            base: base_url.trim_end_matches('/').to_owned(),
            join_token: join_token.to_owned(),
            http,
            follower: Arc::default(),
        })
    }

    /// Follows `/agent/v1/notices` for as long as this worker is known, reconnecting with
    /// backoff; every (re)connection starts with a snapshot, so nothing missed while
    /// disconnected stays missed.
    async fn follow_notices(self, listener: Arc<dyn WorkerListener>) {
        let mut retry = NOTICE_RETRY_MIN;
        loop {
            match self
                .follow_notices_once(listener.as_ref(), &mut retry)
                .await
            {
                Ok(()) => tracing::debug!(worker = %self.name, "notice stream ended; reconnecting"),
                Err(reason) => {
                    tracing::debug!(worker = %self.name, %reason, "notice stream broke; reconnecting")
                }
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(NOTICE_RETRY_MAX);
        }
    }

    async fn follow_notices_once(
        &self,
        listener: &dyn WorkerListener,
        retry: &mut Duration,
    ) -> std::result::Result<(), String> {
        let response = self
            .http
            .get(format!("{}/agent/v1/notices", self.base))
            .bearer_auth(&self.join_token)
            .send()
            .await
            .map_err(|error| error.to_string())?;
        if !response.status().is_success() {
            return Err(format!("answered {}", response.status()));
        }
        *retry = NOTICE_RETRY_MIN;
        let mut body = response.bytes_stream();
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let chunk = match tokio::time::timeout(NOTICE_SILENCE, body.next()).await {
                Err(_) => return Err("no keepalive".into()),
                Ok(None) => return Ok(()),
                Ok(Some(Err(error))) => return Err(error.to_string()),
                Ok(Some(Ok(chunk))) => chunk,
            };
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.iter().position(|byte| *byte == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                match serde_json::from_slice::<NoticeLine>(line) {
                    Ok(NoticeLine::Snapshot(snapshot)) => {
                        for notice in &snapshot.machines {
                            listener.on_event(notice);
                        }
                    }
                    Ok(NoticeLine::Notice(notice)) => listener.on_event(&notice),
                    Err(error) => return Err(format!("unreadable notice: {error}")),
                }
            }
            if pending.len() > MAX_NOTICE_LINE {
                return Err("notice line too long".into());
            }
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    async fn call<B: Serialize + Sync>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        deadline: Duration,
        idempotent: bool,
    ) -> Result<reqwest::Response> {
        let mut attempt = 0;
        loop {
            let mut request = self
                .http
                .request(method.clone(), format!("{}{path}", self.base))
                .bearer_auth(&self.join_token)
                .timeout(deadline);
            if let Some(body) = body {
                request = request.json(body);
            }
            match request.send().await {
                Ok(response) if response.status().is_success() => return Ok(response),
                Ok(response) => return Err(self.refusal(response).await),
                // Only a request that never reached the worker is safe to send again,
                // unless the operation itself is idempotent.
                Err(error) if attempt < RETRIES && (idempotent || error.is_connect()) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                Err(error) => {
                    return Err(WorkerError::Unavailable {
                        worker: self.name.clone(),
                        reason: error.to_string(),
                    })
                }
            }
        }
    }

    /// A worker's error answer, passed on as it came (its JSON body, or a generic one).
    async fn refusal(&self, response: reqwest::Response) -> WorkerError {
        let status = response.status().as_u16();
        let text = response.bytes().await.unwrap_or_default();
        let body = serde_json::from_slice::<ErrorBody>(&text).unwrap_or_else(|_| ErrorBody {
            error: "internal".into(),
            message: format!("worker {} answered {status}", self.name),
            ..ErrorBody::default()
        });
        WorkerError::Remote {
            status,
            body: Box::new(body),
        }
    }

    async fn json<T: DeserializeOwned>(&self, response: reqwest::Response) -> Result<T> {
        response
            .json()
            .await
            .map_err(|error| WorkerError::Unavailable {
                worker: self.name.clone(),
                reason: format!("reading its answer: {error}"),
            })
    }

    async fn log_chunks(
        &self,
        id: &str,
        since: Option<u64>,
        max_bytes: u64,
    ) -> Result<Vec<LogChunk>> {
        let since = since
            .map(|position| format!("&since={position}"))
            .unwrap_or_default();
        let path = format!("/agent/v1/machines/{id}/log-chunks?max_bytes={max_bytes}{since}");
        let response = self
            .call::<()>(Method::GET, &path, None, READ_DEADLINE, true)
            .await?;
        self.json(response).await
    }

    /// One volume call: `body` as JSON, the answer decoded.
    async fn volume_call<B: Serialize + Sync, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        idempotent: bool,
    ) -> Result<T> {
        let response = self
            .call(method, path, body, LIFECYCLE_DEADLINE, idempotent)
            .await?;
        self.json(response).await
    }

    /// Whether the worker answers its health check.
    pub async fn healthy(&self) -> bool {
        let response = self
            .http
            .get(format!("{}/agent/v1/health", self.base))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        response.is_ok_and(|response| response.status().is_success())
    }
}

#[async_trait]
impl WorkerService for RemoteWorker {
    async fn create(&self, request: CreateOnWorker) -> Result<Machine> {
        // The agent answers a repeated create of the same id with the same Machine.
        let response = self
            .call(
                Method::POST,
                "/agent/v1/machines",
                Some(&request),
                CREATE_DEADLINE,
                true,
            )
            .await?;
        self.json(response).await
    }

    async fn start(&self, id: &str, source: EventSource) -> Result<StartStopResponse> {
        let body = StartBody { source };
        let path = format!("/agent/v1/machines/{id}/start");
        let response = self
            .call(Method::POST, &path, Some(&body), LIFECYCLE_DEADLINE, true)
            .await?;
        self.json(response).await
    }

    async fn suspend(&self, id: &str, source: EventSource) -> Result<StartStopResponse> {
        let body = StartBody { source };
        let path = format!("/agent/v1/machines/{id}/suspend");
        let response = self
            .call(Method::POST, &path, Some(&body), LIFECYCLE_DEADLINE, true)
            .await?;
        self.json(response).await
    }

    async fn stop(&self, id: &str, request: StopRequest) -> Result<StartStopResponse> {
        let path = format!("/agent/v1/machines/{id}/stop");
        let response = self
            .call(
                Method::POST,
                &path,
                Some(&request),
                LIFECYCLE_DEADLINE,
                true,
            )
            .await?;
        self.json(response).await
    }

    async fn update(
        &self,
        id: &str,
        request: UpdateMachineRequest,
        pull: berth_image::PullScope,
    ) -> Result<Machine> {
        let path = format!("/agent/v1/machines/{id}/update");
        let body = UpdateOnWorker { request, pull };
        let response = self
            .call(Method::POST, &path, Some(&body), CREATE_DEADLINE, false)
            .await?;
        self.json(response).await
    }

    async fn signal(&self, id: &str, signal: &str) -> Result<()> {
        let path = format!("/agent/v1/machines/{id}/signal");
        let body = berth_api::SignalRequest {
            signal: signal.to_owned(),
        };
        // Not retried: a signal that reached the Machine must not be sent twice.
        self.call(Method::POST, &path, Some(&body), LIFECYCLE_DEADLINE, false)
            .await?;
        Ok(())
    }

    async fn destroy(&self, id: &str, force: bool) -> Result<()> {
        let path = format!("/agent/v1/machines/{id}?force={force}");
        self.call::<()>(Method::DELETE, &path, None, LIFECYCLE_DEADLINE, true)
            .await?;
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Machine> {
        let response = self
            .call::<()>(
                Method::GET,
                &format!("/agent/v1/machines/{id}"),
                None,
                READ_DEADLINE,
                true,
            )
            .await?;
        self.json(response).await
    }

    async fn list(&self, app: &str) -> Result<Vec<Machine>> {
        let path = format!("/agent/v1/machines?app={app}");
        let response = self
            .call::<()>(Method::GET, &path, None, READ_DEADLINE, true)
            .await?;
        self.json(response).await
    }

    async fn usage_since(&self, after_seq: u64, limit: u32) -> Result<Vec<UsageRecord>> {
        let path = format!("/agent/v1/usage?after={after_seq}&limit={limit}");
        let response = self
            .call::<()>(Method::GET, &path, None, READ_DEADLINE, true)
            .await?;
        self.json(response).await
    }

    async fn doctor(&self, repair: bool) -> Result<berth_api::DoctorReport> {
        // A repair removes things; it is not sent twice on a lost answer.
        let response = self
            .call::<()>(
                if repair { Method::POST } else { Method::GET },
                "/agent/v1/doctor",
                None,
                LIFECYCLE_DEADLINE,
                !repair,
            )
            .await?;
        self.json(response).await
    }

    async fn image_usage(&self) -> Result<Vec<ImageUsage>> {
        let response = self
            .call::<()>(
                Method::GET,
                "/agent/v1/images/usage",
                None,
                READ_DEADLINE,
                true,
            )
            .await?;
        self.json(response).await
    }

    /// Follows the worker's notices in a background task (on the current tokio runtime),
    /// replacing any earlier listener's.
    fn set_listener(&self, listener: Arc<dyn WorkerListener>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(worker = %self.name, "no async runtime to follow the worker's notices");
            return;
        };
        let follower = RemoteWorker {
            follower: Arc::default(),
            ..self.clone()
        };
        let task = runtime.spawn(follower.follow_notices(listener));
        self.follower.replace(Some(task.abort_handle()));
    }

    async fn notice_snapshot(&self) -> Result<NoticeSnapshot> {
        let response = self
            .call::<()>(
                Method::GET,
                "/agent/v1/notices/snapshot",
                None,
                READ_DEADLINE,
                true,
            )
            .await?;
        self.json(response).await
    }

    async fn machine_events(&self, id: &str, since: i64, limit: u32) -> Result<Vec<MachineEvent>> {
        let path = format!("/agent/v1/machines/{id}/events?since={since}&limit={limit}");
        let response = self
            .call::<()>(Method::GET, &path, None, READ_DEADLINE, true)
            .await?;
        self.json(response).await
    }

    async fn exec(&self, id: &str, request: ExecOnWorker) -> Result<ExecResponse> {
        let path = format!("/agent/v1/machines/{id}/exec");
        let deadline = request.timeout + READ_DEADLINE;
        let response = self
            .call(Method::POST, &path, Some(&request), deadline, false)
            .await?;
        self.json(response).await
    }

    async fn cordon(&self, id: &str, cordoned: bool) -> Result<Machine> {
        let action = if cordoned { "cordon" } else { "uncordon" };
        let path = format!("/agent/v1/machines/{id}/{action}");
        // Setting a flag to a value: a retry changes nothing more.
        let response = self
            .call::<()>(Method::POST, &path, None, READ_DEADLINE, true)
            .await?;
        self.json(response).await
    }

    async fn processes(&self, id: &str) -> Result<Vec<berth_api::ProcessStat>> {
        let path = format!("/agent/v1/machines/{id}/ps");
        let response = self
            .call::<()>(Method::GET, &path, None, READ_DEADLINE, true)
            .await?;
        self.json(response).await
    }

    async fn versions(&self, id: &str) -> Result<Vec<berth_api::MachineVersion>> {
        let path = format!("/agent/v1/machines/{id}/versions");
        let response = self
            .call::<()>(Method::GET, &path, None, READ_DEADLINE, true)
            .await?;
        self.json(response).await
    }

    async fn set_metadata(&self, id: &str, key: &str, value: Option<String>) -> Result<Machine> {
        let path = format!("/agent/v1/machines/{id}/metadata");
        let change = MetadataChange {
            key: key.to_owned(),
            value,
        };
        let response = self
            .call(Method::POST, &path, Some(&change), READ_DEADLINE, true)
            .await?;
        self.json(response).await
    }

    async fn read_logs(
        &self,
        id: &str,
        since: Option<u64>,
        follow: bool,
        max_bytes: u64,
    ) -> Result<tokio::sync::mpsc::Receiver<LogChunk>> {
        let first = self.log_chunks(id, since, max_bytes).await?;
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        let worker = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let mut next = since;
            let mut chunks = first;
            loop {
                for chunk in chunks {
                    next = Some(chunk.start + chunk.data.len() as u64);
                    if sender.send(chunk).await.is_err() {
                        return;
                    }
                }
                if !follow {
                    return;
                }
                // Following across processes: ask again from where the output ended.
                tokio::time::sleep(LOG_POLL).await;
                if sender.is_closed() {
                    return;
                }
                chunks = match worker.log_chunks(&id, next, max_bytes).await {
                    Ok(chunks) => chunks,
                    Err(_) => return,
                };
            }
        });
        Ok(receiver)
    }

    async fn volume_create(&self, request: CreateVolumeOnWorker) -> Result<berth_api::Volume> {
        // The agent answers a repeated create of the same id with the same volume.
        self.volume_call(Method::POST, "/agent/v1/volumes", Some(&request), true)
            .await
    }

    async fn volume_get(&self, id: &str) -> Result<berth_api::Volume> {
        let path = format!("/agent/v1/volumes/{id}");
        self.volume_call::<(), _>(Method::GET, &path, None, true)
            .await
    }

    async fn volume_list(&self, app: &str) -> Result<Vec<berth_api::Volume>> {
        let path = format!("/agent/v1/volumes?app={app}");
        self.volume_call::<(), _>(Method::GET, &path, None, true)
            .await
    }

    async fn volume_update(
        &self,
        id: &str,
        request: berth_api::UpdateVolumeRequest,
    ) -> Result<berth_api::Volume> {
        let path = format!("/agent/v1/volumes/{id}");
        self.volume_call(Method::PUT, &path, Some(&request), true)
            .await
    }

    async fn volume_extend(&self, id: &str, size_gb: u32) -> Result<berth_api::Volume> {
        let path = format!("/agent/v1/volumes/{id}/extend");
        let body = berth_api::ExtendVolumeRequest { size_gb };
        // Growing to a size twice is growing to it once.
        self.volume_call(Method::PUT, &path, Some(&body), true)
            .await
    }

    async fn volume_delete(&self, id: &str) -> Result<berth_api::Volume> {
        let path = format!("/agent/v1/volumes/{id}");
        self.volume_call::<(), _>(Method::DELETE, &path, None, false)
            .await
    }

    async fn volume_snapshots(&self, id: &str) -> Result<Vec<berth_api::VolumeSnapshot>> {
        let path = format!("/agent/v1/volumes/{id}/snapshots");
        self.volume_call::<(), _>(Method::GET, &path, None, true)
            .await
    }

    async fn volume_snapshot(&self, id: &str) -> Result<berth_api::VolumeSnapshot> {
        let path = format!("/agent/v1/volumes/{id}/snapshots");
        self.volume_call::<(), _>(Method::POST, &path, None, false)
            .await
    }

    async fn checkpoint_create(&self, id: &str, comment: String) -> Result<berth_api::Checkpoint> {
        let path = format!("/agent/v1/machines/{id}/checkpoints");
        let body = berth_api::CreateCheckpointRequest { comment };
        self.volume_call(Method::POST, &path, Some(&body), false)
            .await
    }

    async fn checkpoint_list(&self, id: &str) -> Result<Vec<berth_api::Checkpoint>> {
        let path = format!("/agent/v1/machines/{id}/checkpoints");
        self.volume_call::<(), _>(Method::GET, &path, None, true)
            .await
    }

    async fn checkpoint_delete(&self, id: &str, checkpoint: &str) -> Result<()> {
        let path = format!("/agent/v1/machines/{id}/checkpoints/{checkpoint}");
        // Deleting what is gone is 404, which the caller sees: not retried.
        self.call::<()>(Method::DELETE, &path, None, LIFECYCLE_DEADLINE, false)
            .await?;
        Ok(())
    }

    async fn checkpoint_restore(
        &self,
        id: &str,
        checkpoint: &str,
    ) -> Result<berth_api::RestoreCheckpointResponse> {
        let path = format!("/agent/v1/machines/{id}/checkpoints/{checkpoint}/restore");
        self.volume_call::<(), _>(Method::POST, &path, None, false)
            .await
    }

    async fn logs(&self, id: &str, max_bytes: u64) -> Result<Vec<u8>> {
        let path = format!("/agent/v1/machines/{id}/logs?max_bytes={max_bytes}");
        let response = self
            .call::<()>(Method::GET, &path, None, READ_DEADLINE, true)
            .await?;
        response
            .bytes()
            .await
            .map(|bytes| bytes.to_vec())
            .map_err(|error| WorkerError::Unavailable {
                worker: self.name.clone(),
                reason: format!("reading logs: {error}"),
            })
    }

    async fn migration(&self, step: MigrationStep) -> Result<MigrationAnswer> {
        // Each step is idempotent on the agent, so a lost answer is asked for again.
        let response = self
            .call(
                Method::POST,
                "/agent/v1/migrations",
                Some(&step),
                CREATE_DEADLINE,
                true,
            )
            .await?;
        self.json(response).await
    }

    async fn migration_stream(&self, id: &str, request: StreamRequest) -> Result<MigrationStream> {
        // No deadline on the whole body: a pass of a large disk takes as long as it takes,
        // and the caller's step has its own.
        let response = self
            .http
            .post(format!("{}/agent/v1/migrations/{id}/stream", self.base))
            .bearer_auth(&self.join_token)
            .json(&request)
            .send()
            .await
            .map_err(|error| WorkerError::Unavailable {
                worker: self.name.clone(),
                reason: error.to_string(),
            })?;
        if !response.status().is_success() {
            return Err(self.refusal(response).await);
        }
        Ok(Box::pin(response.bytes_stream().map(|chunk| {
            chunk.map_err(|error| std::io::Error::other(error.to_string()))
        })))
    }
}
