//! Machine shapes that follow Fly's: `config.rootfs`, `host_status`, config versions and
//! the process list of `GET …/ps`.

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::MachineConfig;

/// Whether the Machine's writable layer outlives a run and an update (Fly's
/// `rootfs.persist`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RootfsPersist {
    /// Fresh from the image at every start. Berth keeps a Machine's files across stop and
    /// start (that is what stop is for), so it refuses this value.
    Never,
    /// Kept across stop and start; an update starts from a fresh layer.
    Restart,
    /// Kept across stop, start and update (Berth's default).
    #[default]
    Always,
}

wire_names!(RootfsPersist {
    Never => "never",
    Restart => "restart",
    Always => "always",
});

/// `config.rootfs`, Fly's object. Berth's earlier string form is still read for one
/// release: `"persistent"` is `{"persist": "always"}` and `"ephemeral"` is
/// `{"persist": "restart"}`; the object form is what answers carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, ToSchema)]
pub struct RootfsConfig {
    /// Unset or `""` (Fly's "none"): `always`.
    #[serde(default)]
    pub persist: RootfsPersist,
    /// The writable layer's size in GB; applied as `guest.disk_mb` when that is unset (the
    /// two must agree when both are given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_gb: Option<u64>,
}

impl<'de> Deserialize<'de> for RootfsConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Object {
            #[serde(default)]
            persist: Option<String>,
            #[serde(default)]
            size_gb: Option<u64>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Legacy(String),
            Object(Object),
        }
        let wire = Wire::deserialize(deserializer).map_err(|_| {
            de::Error::custom(
                "expected an object {\"persist\": \"always\"|\"restart\"|\"never\", \"size_gb\": n} \
                 (or the deprecated \"persistent\"/\"ephemeral\")",
            )
        })?;
        match wire {
            Wire::Legacy(text) => match text.as_str() {
                "persistent" => Ok(RootfsConfig::default()),
                "ephemeral" => Ok(RootfsConfig {
                    persist: RootfsPersist::Restart,
                    size_gb: None,
                }),
                other => Err(de::Error::custom(format!(
                    "unknown rootfs {other:?}: send an object such as {{\"persist\": \"always\"}}"
                ))),
            },
            Wire::Object(object) => {
                let persist = match object.persist.as_deref() {
                    None | Some("") | Some("none") => RootfsPersist::default(),
                    Some(text) => RootfsPersist::parse(text).ok_or_else(|| {
                        de::Error::custom(format!(
                            "unknown persist {text:?}: one of always, restart, never"
                        ))
                    })?,
                };
                Ok(RootfsConfig {
                    persist,
                    size_gb: object.size_gb,
                })
            }
        }
    }
}

/// Fly's `host_status` of a Machine: whether its host answered for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostStatus {
    /// The worker answered; the Machine JSON is current.
    Ok,
    /// Not used by Berth yet (Fly's value for a host in an unknown condition).
    Unknown,
    /// The worker is down: the Machine JSON is its last known state.
    Unreachable,
}

wire_names!(HostStatus {
    Ok => "ok",
    Unknown => "unknown",
    Unreachable => "unreachable",
});

impl From<crate::MachineWorkerStatus> for HostStatus {
    fn from(status: crate::MachineWorkerStatus) -> HostStatus {
        match status {
            crate::MachineWorkerStatus::Ok => HostStatus::Ok,
            crate::MachineWorkerStatus::Unreachable => HostStatus::Unreachable,
        }
    }
}

/// One entry of `GET …/{id}/versions` (Fly's `MachineVersion`): the config a create or an
/// update gave the Machine, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MachineVersion {
    /// The Machine's `instance_id` while this config was its own.
    pub version: String,
    pub user_config: MachineConfig,
    /// Berth's: when the create or update recorded it (RFC 3339).
    pub created_at: String,
}

/// One process of a running Machine (Fly's `ProcessStat`), as its pid namespace sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProcessStat {
    /// The pid inside the Machine (its init is 1).
    pub pid: i32,
    /// The command line, arguments joined by spaces (the name in brackets when it has
    /// none, as `ps` shows a kernel thread).
    pub command: String,
    /// CPU time used, user and system, in milliseconds.
    pub cpu: u64,
    /// Resident memory in bytes.
    pub rss: u64,
    /// When the process started, in milliseconds since the Unix epoch.
    pub stime: u64,
    /// How long it has run, in milliseconds.
    pub rtime: u64,
    /// Berth leaves this empty: the working directory is not read.
    #[serde(default)]
    pub directory: String,
    /// TCP sockets the process listens on.
    #[serde(default)]
    pub listen_sockets: Vec<ListenSocket>,
}

/// A listening socket of a process (Fly's `ListenSocket`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ListenSocket {
    /// `tcp` or `tcp6`.
    pub proto: String,
    /// `address:port`, IPv6 addresses in brackets.
    pub address: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<RootfsConfig, serde_json::Error> {
        serde_json::from_str(text)
    }

    #[test]
    fn rootfs_reads_fly_objects_and_berth_strings() {
        let always = RootfsConfig::default();
        let restart = RootfsConfig {
            persist: RootfsPersist::Restart,
            size_gb: None,
        };
        assert_eq!(read(r#""persistent""#).expect("legacy"), always);
        assert_eq!(read(r#""ephemeral""#).expect("legacy"), restart);
        assert_eq!(read(r#"{"persist":"restart"}"#).expect("object"), restart);
        assert_eq!(read(r#"{"persist":""}"#).expect("none"), always);
        assert_eq!(read(r#"{}"#).expect("empty"), always);
        assert_eq!(
            read(r#"{"persist":"never","size_gb":2}"#).expect("never"),
            RootfsConfig {
                persist: RootfsPersist::Never,
                size_gb: Some(2),
            }
        );
        assert!(read(r#""sometimes""#).is_err());
        assert!(read(r#"{"persist":"sometimes"}"#).is_err());
        assert!(read("7").is_err());
        assert_eq!(
            serde_json::to_string(&always).expect("encode"),
            r#"{"persist":"always"}"#
        );
    }

    #[test]
    fn host_statuses_keep_fly_names() {
        for status in HostStatus::ALL {
            let json = serde_json::to_string(status).expect("encode");
            assert_eq!(json, format!("\"{}\"", status.as_str()));
        }
        assert_eq!(
            HostStatus::from(crate::MachineWorkerStatus::Unreachable),
            HostStatus::Unreachable
        );
    }
}
