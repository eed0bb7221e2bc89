//! What programs driving Machines use beyond the lifecycle: notices of every state change,
//! the event history, exec, metadata and log streaming.

use std::time::Duration;

use berth_api::{ExecResponse, Machine, MachineEvent, MachineState};
use berth_core::state::StateError;
use berth_core::validate;
use berth_runtime::exec::ExecSpec;
use tokio::sync::mpsc;

use crate::error::{AgentError, Result};
use crate::record::{self, now_ms, MachineRecord};
use crate::service::{ExecOnWorker, LogChunk, MachineNotice, NoticeSnapshot};
use crate::store;
use crate::Agent;

/// How often a follower looks for new output. The shim writes the files; the agent is
/// not told, so followers look.
const LOG_POLL: Duration = Duration::from_millis(100);
/// The most one log chunk carries.
const LOG_CHUNK: u64 = 64 * 1024;

impl Agent {
    fn listener(&self) -> Option<std::sync::Arc<dyn crate::WorkerListener>> {
        self.inner
            .listener
            .read()
            .ok()
            .and_then(|slot| slot.clone())
    }

    pub(crate) fn notify(
        &self,
        record: &MachineRecord,
        event: &store::MachineEvent,
        event_id: Option<i64>,
    ) {
        let Some(listener) = self.listener() else {
            return;
        };
        listener.on_event(&notice_of(record, event, event_id));
    }

    /// The id of the newest event is read before the records, so a change racing the
    /// snapshot is either in it or among the live notices after it.
    pub(crate) async fn snapshot_notices(&self) -> Result<NoticeSnapshot> {
        let last_event_id = self.inner.store.last_event_id().await?;
        let records = self.inner.store.list_all().await?;
        let machines = records
            .iter()
            .map(|record| {
                let event = store::MachineEvent {
                    kind: "snapshot".into(),
                    source: crate::EventSource::System.as_str().into(),
                    state: record.state.as_str().into(),
                    exit_code: None,
                    reason: None,
                    at_ms: record.updated_at_ms,
                };
                notice_of(record, &event, None)
            })
            .collect();
        Ok(NoticeSnapshot {
            last_event_id,
            machines,
        })
    }

    pub(crate) fn notify_destroyed(&self, record: &MachineRecord) {
        let event = store::MachineEvent {
            kind: "destroy".into(),
            source: crate::EventSource::User.as_str().into(),
            state: MachineState::Destroyed.as_str().into(),
            exit_code: None,
            reason: None,
            at_ms: record.updated_at_ms,
        };
        self.notify(record, &event, None);
    }

    pub(crate) async fn event_page(
        &self,
        id: &str,
        since: i64,
        limit: u32,
    ) -> Result<Vec<MachineEvent>> {
        self.load(id).await?;
        let rows = self.inner.store.events_since(id, since, limit).await?;
        Ok(rows
            .into_iter()
            .map(|(event_id, event)| MachineEvent {
                id: event_id,
                kind: event.kind,
                source: event.source,
                state: MachineState::parse(&event.state).unwrap_or(MachineState::Failed),
                timestamp: record::format_ms(event.at_ms),
                exit_code: event.exit_code,
                reason: event.reason,
            })
            .collect())
    }

    /// No Machine lock: a long exec must not hold up a stop, which ends it anyway.
    pub(crate) async fn exec_in(&self, id: &str, request: ExecOnWorker) -> Result<ExecResponse> {
        let record = self.load(id).await?;
        if record.state != MachineState::Started {
            return Err(StateError::Invalid {
                verb: "exec in",
                state: record.state,
            }
            .into());
        }
        let spec = ExecSpec {
            cmd: request.cmd,
            stdin: request.stdin.map(String::into_bytes),
            timeout: request.timeout,
            max_output_bytes: request.max_output_bytes,
        };
        let output = self.inner.runtime.exec(&self.layout(id), &spec).await?;
        Ok(ExecResponse {
            exit_code: output.exit_code,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            truncated: output.truncated,
            timed_out: output.timed_out,
        })
    }

    pub(crate) async fn change_metadata(
        &self,
        id: &str,
        key: &str,
        value: Option<String>,
    ) -> Result<Machine> {
        let _guard = self.lock(id).await?;
        let mut record = self.load(id).await?;
        let changed = match value {
            Some(value) => {
                record.config.metadata.insert(key.to_owned(), value.clone()) != Some(value)
            }
            None => record.config.metadata.remove(key).is_some(),
        };
        if changed {
            validate::validate_config(&record.config)?;
            record.updated_at_ms = now_ms();
            self.inner.store.save(&record, None).await?;
        }
        Ok(record.to_api())
    }

    pub(crate) async fn stream_logs(
        &self,
        id: &str,
        since: Option<u64>,
        follow: bool,
        max_bytes: u64,
    ) -> Result<mpsc::Receiver<LogChunk>> {
        self.load(id).await?;
        let layout = self.layout(id);
        let start = match since {
            Some(position) => position,
            None => {
                let bounds_layout = layout.clone();
                let (oldest, end) = tokio::task::spawn_blocking(move || {
                    berth_runtime::logs::log_bounds(&bounds_layout)
                })
                .await
                .map_err(|error| AgentError::Internal(format!("log reader task: {error}")))?
                .map_err(|error| AgentError::Internal(format!("read logs of {id}: {error}")))?;
                end.saturating_sub(max_bytes).max(oldest)
            }
        };
        let (sender, receiver) = mpsc::channel(8);
        tokio::spawn(async move {
            let mut position = start;
            let mut sent: u64 = 0;
            loop {
                let reader_layout = layout.clone();
                let want = if follow {
                    LOG_CHUNK
                } else {
                    LOG_CHUNK.min(max_bytes.saturating_sub(sent))
                };
                let read = tokio::task::spawn_blocking(move || {
                    berth_runtime::logs::read_from(&reader_layout, position, want)
                })
                .await;
                let Ok(Ok(slice)) = read else {
                    return;
                };
                position = slice.next();
                if !slice.data.is_empty() {
                    sent += slice.data.len() as u64;
                    let chunk = LogChunk {
                        start: slice.start,
                        data: slice.data,
                    };
                    if sender.send(chunk).await.is_err() {
                        return;
                    }
                    if follow || sent < max_bytes {
                        continue;
                    }
                }
                // Destroy removes the Machine's directory; nothing more will come.
                if !follow || !layout.dir.exists() {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(LOG_POLL) => {}
                    () = sender.closed() => return,
                }
            }
        });
        Ok(receiver)
    }
}

fn notice_of(
    record: &MachineRecord,
    event: &store::MachineEvent,
    event_id: Option<i64>,
) -> MachineNotice {
    MachineNotice {
        id: record.id.clone(),
        app: record.app.clone(),
        event_id,
        kind: event.kind.clone(),
        source: event.source.clone(),
        state: record.state,
        instance_id: record.instance_id.clone(),
        cpus: record.config.guest.cpus,
        memory_mb: record.config.guest.memory_mb,
        exit_code: event.exit_code,
        reason: event.reason.clone(),
        at_ms: event.at_ms,
    }
}
