//! Crash injection for tests: with the `failpoints` feature, a named point listed in
//! `BERTH_FAILPOINTS` (comma-separated) aborts the process on the spot, like a kill -9
//! at exactly that step. Without the feature it compiles to nothing.
//!
//! Points are named `<operation>.<step>`; [`POINTS`] lists every one, so a test can
//! crash the agent at each in turn.

/// Every failpoint, in the order its operation reaches it.
pub const POINTS: &[&str] = &[
    // create: record written with `pending: create`, host prepared, record committed.
    "create.after_record",
    "create.after_prepare",
    "create.after_record_created",
    // start (also the boot of create and update): recorded `starting`, runc running,
    // recorded `started`.
    "start.after_starting",
    "start.after_runtime_start",
    "start.after_record_started",
    // stop: recorded `stopping`, process ended, recorded `stopped`.
    "stop.after_stopping",
    "stop.after_halt",
    "stop.after_record_stopped",
    // update: recorded `replacing` with the old config kept, old run ended, new bundle
    // written, recorded `stopped` with the new config.
    "update.after_record_pending",
    "update.after_halt",
    "update.after_prepare",
    "update.after_record_updated",
    // destroy: recorded `destroying`, host removed, record deleted.
    "destroy.after_record_destroying",
    "destroy.after_remove",
    "destroy.after_record_deleted",
];

/// Suspend and resume (a start of a suspended Machine), apart from [`POINTS`]: only a
/// driver that can checkpoint (gvisor) reaches them.
pub const SUSPEND_POINTS: &[&str] = &[
    // suspend: recorded `suspending`, checkpointed (image sealed, run ended), recorded
    // `suspended`.
    "suspend.after_suspending",
    "suspend.after_checkpoint",
    "suspend.after_record_suspended",
    // resume: recorded `starting`, restored from the image, recorded `started`.
    "resume.after_starting",
    "resume.after_runtime_resume",
    "resume.after_record_started",
];

/// The volume operations' failpoints, apart from [`POINTS`] (whose every point acts on a
/// Machine): each is after a recorded step, as there.
pub const VOLUME_POINTS: &[&str] = &[
    "volume_create.after_record",
    "volume_create.after_host",
    "volume_extend.after_record",
    "volume_extend.after_host",
    "volume_delete.after_record",
    "volume_delete.after_host",
];

/// A move between workers, on either side: recorded steps, and a stream cut off midway
/// on each end (the source after its first chunk, the destination after its first read).
pub const MIGRATION_POINTS: &[&str] = &[
    "migrate.after_begin",
    "migrate.source_mid_stream",
    "migrate.after_receive_prepare",
    "migrate.dest_mid_stream",
    "migrate.after_receive",
    "migrate.after_halt",
    "migrate.after_sync",
    "migrate.after_commit",
    "migrate.after_source_remove",
];

/// A move's volume steps (a Machine that mounts none never reaches them): an image stream
/// cut off on each end, the destination's volumes mounted and recorded before the
/// Machine's commit, the source's volumes removed before its record.
pub const VOLUME_MIGRATION_POINTS: &[&str] = &[
    "migrate.source_volume_mid_stream",
    "migrate.dest_volume_mid_stream",
    "migrate.after_commit_volumes",
    "migrate.after_source_volume_remove",
];

/// Checkpoints, restores and forks (only a Machine whose disk is a btrfs subvolume
/// reaches them): the snapshot made and its record written; a restore's undo checkpoint
/// taken and the disks exchanged; a fork's disk exchanged and its ids moved.
pub const CHECKPOINT_POINTS: &[&str] = &[
    "checkpoint.after_snapshot",
    "checkpoint.after_record",
    "restore.after_stage",
    "restore.after_undo_record",
    "restore.after_undo_checkpoint",
    "restore.after_exchange",
    "fork.after_exchange",
    "create.after_fork",
];

pub fn hit(name: &str) {
    debug_assert!(
        POINTS.contains(&name)
            || SUSPEND_POINTS.contains(&name)
            || VOLUME_POINTS.contains(&name)
            || MIGRATION_POINTS.contains(&name)
            || VOLUME_MIGRATION_POINTS.contains(&name)
            || CHECKPOINT_POINTS.contains(&name),
        "unlisted failpoint {name}"
    );
    berth_core::failpoint::hit(name);
}
