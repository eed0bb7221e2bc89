//! The agent's durable record of one Machine.

use std::path::PathBuf;

use berth_api::{ExitInfo, ImageRef, Machine, MachineConfig, MachineState};
use serde::{Deserialize, Serialize};

use crate::error::AgentError;

/// One read-only layer of a Machine's rootfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    pub digest: String,
    pub dir: PathBuf,
}

/// The Machine's rootfs as an explicit stack, bottom to top: the image's shared layers,
/// then the Machine's own frozen layers (none until checkpoints exist), then its writable
/// upperdir. Start mounts exactly this; nothing is looked up again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsStack {
    pub image_layers: Vec<LayerRef>,
    #[serde(default)]
    pub frozen_layers: Vec<LayerRef>,
    pub upper: PathBuf,
}

impl RootfsStack {
    /// overlayfs lowerdirs, bottom first.
    pub fn lowerdirs(&self) -> Vec<PathBuf> {
        self.image_layers
            .iter()
            .chain(&self.frozen_layers)
            .map(|layer| layer.dir.clone())
            .collect()
    }
}

/// A multi-step operation in flight. It is written before the first step and cleared by
/// the last, so an agent that died halfway knows what to finish or undo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum PendingOp {
    /// Undo on recovery: the client never got an answer.
    Create,
    /// Undo on recovery: restore the old config's bundle and leave the Machine stopped.
    Update { previous: Box<UpdateSnapshot> },
    /// Leaving for `to_worker` under `grant`. The control plane decides the outcome
    /// (abort or finish); until then no start, stop or update runs here. `halted`: this
    /// worker stopped the running Machine for the final pass, and abort starts it again.
    MigrateOut {
        grant: String,
        to_worker: String,
        #[serde(default)]
        halted: bool,
    },
    /// Arriving from another worker under `grant`: not this worker's Machine, nor listed,
    /// until the control plane commits it. `copied_pass`: the digest of the last pass
    /// applied whole, from which the next copies what changed.
    MigrateIn {
        grant: String,
        source: berth_worker::MigrationPeer,
        #[serde(default)]
        copied_pass: Option<String>,
    },
}

impl PendingOp {
    /// Whether the record is half of a move between workers, which only the control plane
    /// settles.
    pub fn is_migration(&self) -> bool {
        matches!(
            self,
            PendingOp::MigrateOut { .. } | PendingOp::MigrateIn { .. }
        )
    }
}

/// What update replaces, kept so that a crash can put it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateSnapshot {
    pub config: MachineConfig,
    pub image_ref: ImageRef,
    pub rootfs: RootfsStack,
    pub instance_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineRecord {
    pub id: String,
    pub app: String,
    pub name: String,
    pub region: String,
    pub state: MachineState,
    pub instance_id: String,
    pub config: MachineConfig,
    pub image_ref: ImageRef,
    pub rootfs: RootfsStack,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub last_exit: Option<ExitInfo>,
    /// Restarts by the restart policy since the user last started the Machine.
    pub restart_count: u32,
    /// Bumped by every boot, so a late exit notice from an older run is ignored.
    pub run_generation: u64,
    pub pending: Option<PendingOp>,
    /// Whether the usage journal has an open run for this Machine.
    #[serde(default)]
    pub run_open: bool,
    /// The upperdir's size at the last storage measurement.
    #[serde(default)]
    pub storage_bytes: u64,
    /// The Machine's address on the worker network, if the worker has one.
    #[serde(default)]
    pub private_ip: Option<std::net::Ipv6Addr>,
    /// When the restart policy's next start is due (ms since the epoch), while it waits
    /// out its back-off: kept so an agent restarted meanwhile still makes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_due_ms: Option<i64>,
    /// The org whose Machines this one reaches on the worker network; `None` (Machines
    /// recorded before orgs reached the worker) is the default group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    /// Cordoned: the proxy sends it no traffic and never autostarts it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cordoned: bool,
    /// The size of the memory image while the Machine is suspended, counted in
    /// `storage_bytes` (billed as storage); 0 otherwise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub memory_bytes: u64,
    /// The bytes only the Machine's checkpoints hold, as last journaled
    /// (`checkpoint_storage`, billed as storage).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub checkpoint_bytes: u64,
}

fn is_zero(bytes: &u64) -> bool {
    *bytes == 0
}

impl MachineRecord {
    /// The one place a Machine's state changes: moves to `to` at `at_ms` if berth-core's
    /// [`TRANSITIONS`](berth_core::state::TRANSITIONS) table has the edge, and otherwise
    /// refuses and leaves the record as it was.
    pub fn enter(&mut self, to: MachineState, at_ms: i64) -> Result<(), AgentError> {
        if !berth_core::state::can_transition(self.state, to) {
            return Err(AgentError::IllegalTransition {
                id: self.id.clone(),
                from: self.state,
                to,
            });
        }
        self.state = to;
        self.updated_at_ms = at_ms;
        Ok(())
    }

    pub fn to_api(&self) -> Machine {
        Machine {
            id: self.id.clone(),
            name: self.name.clone(),
            state: self.state,
            region: self.region.clone(),
            instance_id: self.instance_id.clone(),
            config: self.config.clone(),
            image_ref: self.image_ref.clone(),
            created_at: format_ms(self.created_at_ms),
            updated_at: format_ms(self.updated_at_ms),
            last_exit: self.last_exit.clone(),
            restart_count: self.restart_count,
            private_ip: self.private_ip.map(|address| address.to_string()),
            worker: None,
            worker_status: None,
            checks: Vec::new(),
            host_status: None,
            cordoned: self.cordoned,
            events: Vec::new(),
            nonce: None,
        }
    }
}

pub fn now_ms() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// RFC 3339 with milliseconds, in UTC.
pub fn format_ms(ms: i64) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|moment| moment.format(&format).ok())
        .unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record_in(state: MachineState) -> MachineRecord {
        MachineRecord {
            id: "0000000000000a".into(),
            app: "app".into(),
            name: "name".into(),
            region: "local".into(),
            state,
            instance_id: "01".into(),
            config: MachineConfig::default(),
            image_ref: ImageRef {
                name: "x".into(),
                registry: None,
                repository: "x".into(),
                tag: None,
                digest: "sha256:0".into(),
                labels: Default::default(),
            },
            rootfs: RootfsStack {
                image_layers: Vec::new(),
                frozen_layers: Vec::new(),
                upper: "/m/upper".into(),
            },
            created_at_ms: 1,
            updated_at_ms: 1,
            last_exit: None,
            restart_count: 0,
            run_generation: 0,
            pending: None,
            run_open: false,
            storage_bytes: 0,
            private_ip: None,
            restart_due_ms: None,
            org: None,
            cordoned: false,
            memory_bytes: 0,
            checkpoint_bytes: 0,
        }
    }

    #[test]
    fn enter_takes_exactly_the_edges_of_the_table() {
        for from in MachineState::ALL {
            for to in MachineState::ALL {
                let mut record = record_in(from);
                let allowed = berth_core::state::can_transition(from, to);
                match record.enter(to, 7) {
                    Ok(()) => {
                        assert!(allowed, "{from} -> {to} was taken");
                        assert_eq!((record.state, record.updated_at_ms), (to, 7));
                    }
                    Err(error) => {
                        assert!(!allowed, "{from} -> {to} was refused");
                        assert!(
                            matches!(
                                error,
                                AgentError::IllegalTransition { from: f, to: t, .. }
                                    if f == from && t == to
                            ),
                            "{error}"
                        );
                        assert_eq!(record, record_in(from), "a refusal changed the record");
                    }
                }
            }
        }
    }

    #[test]
    fn a_refused_edge_is_an_internal_error_not_a_conflict() {
        let error = record_in(MachineState::Destroyed)
            .enter(MachineState::Started, 7)
            .expect_err("destroyed is terminal");
        let (status, body) = error.to_response();
        assert_eq!((status, body.error.as_str()), (500, "internal"));
        assert_eq!(
            body.message,
            "machine 0000000000000a cannot go from destroyed to started"
        );
    }

    #[test]
    fn timestamps_format_as_rfc3339() {
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn lowerdirs_put_image_layers_below_frozen_ones() {
        let stack = RootfsStack {
            image_layers: vec![
                LayerRef {
                    digest: "a".into(),
                    dir: "/l/a".into(),
                },
                LayerRef {
                    digest: "b".into(),
                    dir: "/l/b".into(),
                },
            ],
            frozen_layers: vec![LayerRef {
                digest: "f".into(),
                dir: "/m/f".into(),
            }],
            upper: "/m/upper".into(),
        };
        let dirs: Vec<PathBuf> = stack.lowerdirs();
        assert_eq!(
            dirs,
            vec![PathBuf::from("/l/a"), "/l/b".into(), "/m/f".into()]
        );
    }
}
