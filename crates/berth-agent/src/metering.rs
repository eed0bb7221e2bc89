//! The usage journal's entries. Each is written in the same transaction as the state
//! change it bills, so the journal and the records can never disagree: a run is open in
//! the journal exactly when `run_open` is set on the record.

use std::path::Path;

use berth_api::{CloseBasis, UsageKind, UsageRecord};

use crate::record::MachineRecord;
use crate::volumes::{VolumeRecord, GIB};

fn entry(record: &MachineRecord, kind: UsageKind, at_ms: i64) -> UsageRecord {
    UsageRecord {
        seq: 0,
        machine_id: record.id.clone(),
        app: record.app.clone(),
        kind,
        at_ms,
        cpus: record.config.guest.cpus,
        memory_mb: record.config.guest.memory_mb,
        storage_bytes: record.storage_bytes,
        basis: None,
    }
}

pub fn created(record: &MachineRecord) -> UsageRecord {
    entry(record, UsageKind::Created, record.created_at_ms)
}

/// Compute billing starts.
pub fn open_run(record: &mut MachineRecord, at_ms: i64) -> UsageRecord {
    record.run_open = true;
    entry(record, UsageKind::RunStart, at_ms)
}

/// Compute billing stops, if it was running.
pub fn close_run(record: &mut MachineRecord, at_ms: i64, basis: CloseBasis) -> Option<UsageRecord> {
    if !record.run_open {
        return None;
    }
    record.run_open = false;
    let mut stop = entry(record, UsageKind::RunStop, at_ms);
    stop.basis = Some(basis);
    Some(stop)
}

/// A storage measurement of the upperdir.
pub fn storage(record: &mut MachineRecord, at_ms: i64, bytes: u64) -> UsageRecord {
    record.storage_bytes = bytes;
    entry(record, UsageKind::Storage, at_ms)
}

/// A measurement of the bytes only the Machine's checkpoints hold.
pub fn checkpoint_storage(record: &mut MachineRecord, at_ms: i64, bytes: u64) -> UsageRecord {
    record.checkpoint_bytes = bytes;
    UsageRecord {
        storage_bytes: bytes,
        ..entry(record, UsageKind::CheckpointStorage, at_ms)
    }
}

/// Everything ends: a still-open run, then the Machine's existence.
pub fn destroyed(record: &mut MachineRecord, at_ms: i64) -> Vec<UsageRecord> {
    let mut entries: Vec<UsageRecord> = close_run(record, at_ms, CloseBasis::Observed)
        .into_iter()
        .collect();
    entries.push(entry(record, UsageKind::Destroyed, at_ms));
    entries
}

fn volume_entry(record: &VolumeRecord, kind: UsageKind, at_ms: i64) -> UsageRecord {
    UsageRecord {
        seq: 0,
        // A volume's entries carry its `vol_` id where a Machine's carry the Machine's.
        machine_id: record.id.clone(),
        app: record.app.clone(),
        kind,
        at_ms,
        cpus: 0,
        memory_mb: 0,
        // Billed by its provisioned size, as Fly bills volumes, not by what is written.
        storage_bytes: u64::from(record.size_gb) * GIB,
        basis: None,
    }
}

/// The volume exists at its size: its storage billing starts.
pub fn volume_created(record: &VolumeRecord, at_ms: i64) -> UsageRecord {
    volume_entry(record, UsageKind::Created, at_ms)
}

/// The volume grew: billed at its new size from now on.
pub fn volume_extended(record: &VolumeRecord, at_ms: i64) -> UsageRecord {
    volume_entry(record, UsageKind::Storage, at_ms)
}

/// The volume left this worker with its Machine: its billing here ends, and the
/// destination's `created` at the same instant takes over.
pub fn volume_migrated_out(record: &VolumeRecord, at_ms: i64) -> UsageRecord {
    volume_entry(record, UsageKind::MigratedOut, at_ms)
}

/// The volume is gone: its billing ends.
pub fn volume_deleted(record: &VolumeRecord, at_ms: i64) -> UsageRecord {
    volume_entry(record, UsageKind::Destroyed, at_ms)
}

/// Bytes of disk a directory tree occupies (allocated blocks, hardlinks counted once).
/// Never follows symlinks.
pub fn disk_usage(dir: &Path) -> std::io::Result<u64> {
    berth_runtime::extents::usage_outside(dir, &berth_runtime::extents::ExtentSet::default())
}

/// When a process started, in ms since the epoch, from /proc (10 ms resolution).
pub fn process_start_ms(pid: u32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may itself hold spaces and parentheses.
    let after_comm = stat.rsplit_once(')')?.1;
    let start_ticks: i64 = after_comm.split_whitespace().nth(19)?.parse().ok()?;
    let boot_seconds: i64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let ticks_per_second = clock_ticks_per_second();
    Some(boot_seconds * 1000 + start_ticks * 1000 / ticks_per_second)
}

fn clock_ticks_per_second() -> i64 {
    // SAFETY: sysconf(_SC_CLK_TCK) only reads a constant of the running kernel.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks
    } else {
        100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_usage_counts_files_and_hardlinks_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a"), vec![1u8; 64 * 1024]).expect("write");
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).expect("link");
        let total = disk_usage(dir.path()).expect("du");
        assert!((64 * 1024..3 * 64 * 1024).contains(&total), "{total}");
    }

    #[test]
    fn this_process_started_in_the_past() {
        let started = process_start_ms(std::process::id()).expect("start time");
        let now = crate::record::now_ms();
        assert!(
            started <= now && now - started < 3_600_000,
            "{started} vs {now}"
        );
    }
}
