//! What programs driving Machines use beyond the lifecycle: the event history, exec,
//! metadata, cordons, config versions, the process list and log streaming.

use std::time::Duration;

use berth_api::{
    EventKind, ExecResponse, ListenSocket, Machine, MachineEvent, MachineEventAnswer, MachineState,
    MachineVersion, ProcessStat,
};
use berth_core::state::StateError;
use berth_core::validate;
use berth_runtime::exec::ExecSpec;
use tokio::sync::mpsc;

use crate::error::{AgentError, Result};
use crate::record::{self, now_ms};
use crate::service::{EventSource, ExecOnWorker, LogChunk};
use crate::transition::Change;
use crate::Agent;

/// How many of its newest events a Machine's JSON carries (GET and list).
pub(crate) const RECENT_EVENTS: u32 = 10;

/// How often a follower looks for new output. The shim writes the files; the agent is
/// not told, so followers look.
const LOG_POLL: Duration = Duration::from_millis(100);
/// The most one log chunk carries.
const LOG_CHUNK: u64 = 64 * 1024;

impl Agent {
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
                state: event.state,
                timestamp: record::format_ms(event.at_ms),
                exit_code: event.exit_code,
                reason: event.reason,
            })
            .collect())
    }

    /// Under the Machine's lock, so that the run signalled is the one found started.
    pub(crate) async fn signal_in(&self, id: &str, signal: &str) -> Result<()> {
        let number = validate::validate_signal("signal", signal)?;
        let _guard = self.lock(id).await?;
        let record = self.load(id).await?;
        if record.state != MachineState::Started {
            return Err(StateError::Invalid {
                verb: "signal",
                state: record.state,
            }
            .into());
        }
        self.driver(&record.config)?
            .signal(&self.layout(id), number)
            .await?;
        Ok(())
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
        let output = self
            .driver(&record.config)?
            .exec(&self.layout(id), &spec)
            .await?;
        Ok(ExecResponse {
            exit_code: output.exit_code,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            truncated: output.truncated,
            timed_out: output.timed_out,
        })
    }

    /// Cordons or uncordons the Machine, with a `cordon`/`uncordon` event when that
    /// changes it. Only the record changes: the run, if any, goes on.
    pub(crate) async fn set_cordon(&self, id: &str, cordoned: bool) -> Result<Machine> {
        let _guard = self.lock(id).await?;
        let mut record = self.load(id).await?;
        if record.cordoned != cordoned {
            record.cordoned = cordoned;
            record.updated_at_ms = now_ms();
            let kind = if cordoned {
                EventKind::Cordon
            } else {
                EventKind::Uncordon
            };
            self.save_in_state(&record, Change::event(kind, EventSource::User))
                .await?;
        }
        Ok(self.api_view(&record))
    }

    /// The Machine's config history, newest first.
    pub(crate) async fn config_versions(&self, id: &str) -> Result<Vec<MachineVersion>> {
        self.load(id).await?;
        self.inner
            .store
            .versions(id)
            .await?
            .into_iter()
            .map(|(version, config, at_ms)| {
                Ok(MachineVersion {
                    version,
                    user_config: serde_json::from_str(&config).map_err(|error| {
                        AgentError::Internal(format!("decode a config version of {id}: {error}"))
                    })?,
                    created_at: record::format_ms(at_ms),
                })
            })
            .collect()
    }

    /// The started Machine's processes, from its pid namespace.
    pub(crate) async fn list_processes(&self, id: &str) -> Result<Vec<ProcessStat>> {
        let record = self.load(id).await?;
        let not_started = || -> AgentError {
            StateError::Invalid {
                verb: "list the processes of",
                state: record.state,
            }
            .into()
        };
        if record.state != MachineState::Started {
            return Err(not_started());
        }
        let driver = self.driver(&record.config)?;
        let Some(processes) = driver.processes(&self.layout(id)).await? else {
            // It ended between the record and the look.
            return Err(not_started());
        };
        let now = u64::try_from(now_ms()).unwrap_or_default();
        Ok(processes
            .into_iter()
            .map(|process| ProcessStat {
                pid: process.pid,
                command: process.command,
                cpu: process.cpu_ms,
                rss: process.rss_bytes,
                stime: process.started_at_ms,
                rtime: now.saturating_sub(process.started_at_ms),
                directory: String::new(),
                listen_sockets: process
                    .listening
                    .into_iter()
                    .map(|(proto, address)| ListenSocket { proto, address })
                    .collect(),
            })
            .collect())
    }

    /// Machines as GET and list answer them: each with its newest events, newest first.
    /// One query: by the Machine's id for one Machine, by `app` for a list.
    pub(crate) async fn with_recent_events(
        &self,
        app: &str,
        mut machines: Vec<Machine>,
    ) -> Result<Vec<Machine>> {
        let rows = match machines.as_slice() {
            [] => Vec::new(),
            [only] => {
                self.inner
                    .store
                    .recent_events(None, Some(&only.id), RECENT_EVENTS)
                    .await?
            }
            _ => {
                self.inner
                    .store
                    .recent_events(Some(app), None, RECENT_EVENTS)
                    .await?
            }
        };
        let mut by_machine: std::collections::HashMap<String, Vec<MachineEventAnswer>> =
            std::collections::HashMap::new();
        for (machine_id, event_id, event) in rows {
            let at_ms = event.at_ms;
            let answer = MachineEventAnswer::new(
                MachineEvent {
                    id: event_id,
                    kind: event.kind,
                    source: event.source,
                    state: event.state,
                    timestamp: record::format_ms(at_ms),
                    exit_code: event.exit_code,
                    reason: event.reason,
                },
                at_ms,
            );
            by_machine.entry(machine_id).or_default().push(answer);
        }
        for machine in &mut machines {
            machine.events = by_machine.remove(&machine.id).unwrap_or_default();
        }
        Ok(machines)
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
        Ok(self.api_view(&record))
    }

    /// The tail of the Machine's captured output.
    pub(crate) async fn tail_logs(&self, id: &str, max_bytes: u64) -> Result<Vec<u8>> {
        self.load(id).await?;
        let layout = self.layout(id);
        tokio::task::spawn_blocking(move || berth_runtime::logs::read_logs(&layout, max_bytes))
            .await
            .map_err(|error| AgentError::Internal(format!("log reader task: {error}")))?
            .map_err(|error| AgentError::Internal(format!("read logs of {id}: {error}")))
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
