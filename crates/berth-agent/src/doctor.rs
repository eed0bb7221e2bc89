//! The doctor: compares the agent's records with the host and reports every difference.
//! Asked to repair, it removes what belongs to no record and records Machines found dead
//! as stopped. It never removes the files of a Machine that has a record (only destroy
//! does that), but for a stale memory image, which no start may resume.
//!
//! Each Machine is checked under its lock, so an operation in flight is never mistaken for
//! damage; a Machine busy for longer than [`LOCK_WAIT`] is reported as busy, not checked.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_api::{CloseBasis, DoctorFinding, DoctorReport, FindingKind, MachineState, UsageKind};
use berth_runtime::{netns, HostInventory, MachineLayout, Status};
use tokio::sync::OwnedMutexGuard;
use tracing::{info, warn};

use crate::ops::suspend::{memory_image_present, memory_image_sealed};
use crate::record::{now_ms, MachineRecord, PendingOp};
use crate::{unknown_exit, Agent, AgentError, EventSource, Result};

/// How long the doctor waits for an operation on a Machine before calling it busy.
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// A started Machine whose exit is younger than this is being recorded by its watcher
/// (which waits for the lock the doctor holds): busy, not found dead.
const FRESH_EXIT_MS: i64 = 10_000;

fn finding(kind: FindingKind, id: &str, object: Option<&Path>, message: String) -> DoctorFinding {
    DoctorFinding {
        kind,
        machine_id: Some(id.to_owned()),
        object: object.map(|path| path.display().to_string()),
        message,
        repaired: false,
    }
}

/// Removes a Machine's leftover cgroup directories (empty ones; rmdir refuses the rest).
fn has_processes(cgroup: &Path) -> bool {
    std::fs::read_to_string(cgroup.join("cgroup.procs")).is_ok_and(|procs| !procs.trim().is_empty())
}

fn remove_cgroups(dirs: &[PathBuf]) -> std::io::Result<()> {
    for dir in dirs {
        match std::fs::remove_dir(dir) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
    }
    Ok(())
}

impl Agent {
    /// Checks every Machine record against the host and the usage journal; with `repair`,
    /// fixes what can be fixed without losing a Machine's files.
    pub async fn run_doctor(&self, repair: bool) -> Result<DoctorReport> {
        let machines_root = self.inner.machines_root.clone();
        // Host first, records second: a create records its Machine before it touches the
        // host, so whatever the host shows of a create in flight has a record by then.
        // Ids whose journal ends in `migrated_out` moved away: what the host shows by
        // their id (cgroups, a veth) is their new worker's, if it is on this host.
        let mut last_kind: BTreeMap<String, UsageKind> = BTreeMap::new();
        for (_, id, kind) in self.inner.store.journal_outline().await? {
            last_kind.insert(id, kind);
        }
        let first_known: BTreeSet<String> = last_kind
            .into_iter()
            .filter(|(_, kind)| *kind != UsageKind::MigratedOut)
            .map(|(id, _)| id)
            .collect();
        let host = self.scan_host(&machines_root, &first_known).await?;
        let records = self.inner.store.list_all().await?;

        let mut report = DoctorReport {
            worker: self.inner.config.name.clone(),
            machines: records.len() as u64,
            busy: Vec::new(),
            findings: Vec::new(),
            repair,
        };
        // Hold every idle Machine's lock for the whole check: nothing changes under it.
        let mut held: Vec<(MachineRecord, OwnedMutexGuard<()>)> = Vec::new();
        for record in &records {
            match self.lock_within(&record.id, LOCK_WAIT).await {
                Ok(guard) => match self.inner.store.get(&record.id).await? {
                    Some(fresh) => held.push((fresh, guard)),
                    None => continue,
                },
                Err(AgentError::Busy { id }) => report.busy.push(id),
                Err(error) => return Err(error),
            }
        }
        let last_alive = self.inner.store.last_liveness().await?;
        for (record, _) in &mut held {
            let Some(mut findings) = self.check_record(record, &host).await else {
                report.busy.push(record.id.clone());
                continue;
            };
            if repair {
                self.repair_record(record, &host, &mut findings, last_alive)
                    .await;
            }
            report.findings.extend(findings);
        }

        // The journal, read while every checked Machine is held.
        let outline = self.inner.store.journal_outline().await?;
        let held_records: HashMap<&str, &MachineRecord> = held
            .iter()
            .map(|(record, _)| (record.id.as_str(), record))
            .collect();
        let mut journal_findings = check_journal(&outline, &held_records);
        // An id missing from the records read earlier may have been created since.
        let mut kept = Vec::new();
        for found in journal_findings.drain(..) {
            let id = found.machine_id.clone().unwrap_or_default();
            let recorded_now = records.iter().any(|record| record.id == id)
                || self.inner.store.get(&id).await?.is_some();
            if held_records.contains_key(id.as_str()) || !recorded_now {
                kept.push(found);
            }
        }
        report.findings.extend(kept);
        drop(held);

        // Orphans: on the host, in no record. Checked again under the id's lock.
        let record_ids: BTreeSet<&str> = records.iter().map(|record| record.id.as_str()).collect();
        for id in host.ids() {
            if record_ids.contains(id.as_str()) {
                continue;
            }
            let guard = match self.lock_within(&id, LOCK_WAIT).await {
                Ok(guard) => guard,
                Err(AgentError::Busy { id }) => {
                    report.busy.push(id);
                    continue;
                }
                Err(error) => return Err(error),
            };
            if self.inner.store.get(&id).await?.is_some() {
                continue;
            }
            let mut known = first_known.clone();
            known.insert(id.clone());
            let now = self.scan_host(&machines_root, &known).await?;
            let mut findings = orphan_findings(&id, &now, &machines_root);
            if repair && !findings.is_empty() {
                let outcome = self.remove_orphan(&id, &now).await;
                match outcome {
                    Ok(()) => {
                        info!(machine = %id, "doctor removed an orphan");
                        for found in &mut findings {
                            found.repaired = true;
                        }
                    }
                    Err(error) => warn!(machine = %id, %error, "doctor could not remove an orphan"),
                }
            }
            drop(guard);
            if let Ok(mut locks) = self.inner.locks.lock() {
                locks.remove(&id);
            }
            report.findings.extend(findings);
        }
        self.check_volumes(repair, &mut report).await?;
        report.busy.sort();
        report.busy.dedup();
        Ok(report)
    }

    /// Volumes: each recorded one mounted, no volume directory without a record. Each
    /// volume is checked under its lock, like a Machine.
    async fn check_volumes(&self, repair: bool, report: &mut DoctorReport) -> Result<()> {
        let root = self.volumes_root();
        let mut on_disk: BTreeSet<String> = BTreeSet::new();
        if let Ok(entries) = std::fs::read_dir(&root) {
            for entry in entries.flatten() {
                if let Some(name) = entry.file_name().to_str() {
                    on_disk.insert(name.to_owned());
                }
            }
        }
        let records = self.inner.store.volumes_of(None).await?;
        let mut ids: BTreeSet<String> = records.into_iter().map(|record| record.id).collect();
        ids.extend(on_disk);
        for id in ids {
            let guard = match self.lock_within(&id, LOCK_WAIT).await {
                Ok(guard) => guard,
                Err(AgentError::Busy { id }) => {
                    report.busy.push(id);
                    continue;
                }
                Err(error) => return Err(error),
            };
            let layout = self.volume_layout(&id);
            let object = Some(layout.dir.display().to_string());
            match self.inner.store.volume(&id).await? {
                Some(record) if record.pending.is_none() => {
                    if self.host_driver().volume_mounted(&layout).await? {
                        continue;
                    }
                    let mut finding = DoctorFinding {
                        kind: FindingKind::VolumeNotMounted,
                        machine_id: record.attached_machine.clone(),
                        object,
                        message: format!("volume {id} is not mounted"),
                        repaired: false,
                    };
                    if repair {
                        let layout = layout.clone().with_key(record.key.clone());
                        match self.host_driver().volume_mount(&layout).await {
                            Ok(()) => finding.repaired = true,
                            Err(error) => {
                                warn!(volume = %id, %error, "doctor could not mount a volume")
                            }
                        }
                    }
                    report.findings.push(finding);
                }
                // Recovery settles unfinished operations.
                Some(_) => {}
                None => {
                    if !layout.dir.exists() {
                        continue;
                    }
                    let mut finding = DoctorFinding {
                        kind: FindingKind::OrphanVolume,
                        machine_id: None,
                        object,
                        message: format!("volume directory {id} has no record"),
                        repaired: false,
                    };
                    if repair {
                        match self.host_driver().volume_remove(&layout).await {
                            Ok(()) => finding.repaired = true,
                            Err(error) => {
                                warn!(volume = %id, %error, "doctor could not remove an orphan volume")
                            }
                        }
                    }
                    report.findings.push(finding);
                }
            }
            drop(guard);
        }
        Ok(())
    }

    /// What the drivers find on the host (directories, mounts, their containers, veths
    /// and cgroups), by Machine id. `known` are ids this worker has held. Every driver
    /// lists what they all share; each adds its own state (runc's containers).
    async fn scan_host(
        &self,
        machines_root: &Path,
        known: &BTreeSet<String>,
    ) -> Result<HostInventory> {
        let mut host = self
            .host_driver()
            .host_inventory(machines_root, known)
            .await?;
        for (name, driver) in self.inner.drivers.all() {
            if name == self.inner.drivers.default_name() {
                continue;
            }
            let more = driver.host_inventory(machines_root, known).await?;
            host.dirs.extend(more.dirs);
            host.containers.extend(more.containers);
            for (id, mounts) in more.mounts {
                host.mounts.entry(id).or_insert(mounts);
            }
            for (id, veth) in more.veths {
                host.veths.entry(id).or_insert(veth);
            }
            for (id, cgroups) in more.cgroups {
                host.cgroups.entry(id).or_insert(cgroups);
            }
        }
        Ok(host)
    }

    /// One Machine whose lock the caller holds, against the host. `None` when it has just
    /// exited and its watcher is recording that.
    async fn check_record(
        &self,
        record: &MachineRecord,
        host: &HostInventory,
    ) -> Option<Vec<DoctorFinding>> {
        let id = record.id.as_str();
        let layout = self.layout(id);
        let mut findings = Vec::new();
        let transitional = matches!(
            record.state,
            MachineState::Starting
                | MachineState::Stopping
                | MachineState::Replacing
                | MachineState::Destroying
                | MachineState::Suspending
        );
        if record.pending.as_ref().is_some_and(PendingOp::is_migration) && !transitional {
            // Half of a move: the control plane settles it, and the doctor lists it as busy.
            return None;
        }
        if record.pending.is_some() || transitional {
            let what = match &record.pending {
                Some(PendingOp::Create) => "create".to_owned(),
                Some(PendingOp::Update { .. }) => "update".to_owned(),
                Some(PendingOp::MigrateOut { .. }) => "migration away".to_owned(),
                Some(PendingOp::MigrateIn { .. }) => "migration here".to_owned(),
                None => record.state.to_string(),
            };
            findings.push(finding(
                FindingKind::UnfinishedOperation,
                id,
                None,
                format!("the record is left in an unfinished {what} that nothing is running"),
            ));
            return Some(findings);
        }
        if !layout.upper().is_dir() {
            findings.push(finding(
                FindingKind::MissingUpperdir,
                id,
                Some(&layout.upper()),
                "the Machine's upperdir is missing".into(),
            ));
        }
        if !layout.config_json().is_file() {
            findings.push(finding(
                FindingKind::MissingBundle,
                id,
                Some(&layout.config_json()),
                "the Machine's bundle has no config.json".into(),
            ));
        }
        let pins = [layout.netns(), layout.userns()];
        let unpinned = tokio::task::spawn_blocking(move || {
            pins.into_iter().find(|pin| !netns::is_pinned(pin))
        })
        .await
        .unwrap_or(None);
        if let Some(pin) = unpinned {
            findings.push(finding(
                FindingKind::MissingNetns,
                id,
                Some(&pin),
                "the Machine's network or user namespace is not pinned".into(),
            ));
        }
        let mut layers: Vec<&crate::record::LayerRef> = record
            .rootfs
            .image_layers
            .iter()
            .chain(&record.rootfs.frozen_layers)
            .collect();
        if let Some(PendingOp::Update { previous }) = &record.pending {
            layers.extend(previous.rootfs.image_layers.iter());
        }
        for layer in layers {
            if !layer.dir.is_dir() {
                findings.push(finding(
                    FindingKind::MissingLayer,
                    id,
                    Some(&layer.dir),
                    format!("layer {} is not in the layer store", layer.digest),
                ));
            }
        }
        let image = layout.memory_image();
        if record.state == MachineState::Suspended {
            if !memory_image_sealed(&image) {
                findings.push(finding(
                    FindingKind::MissingMemoryImage,
                    id,
                    Some(&image),
                    "recorded as suspended, but its memory image is missing or half-written: \
                     its next start boots it fresh from disk"
                        .into(),
                ));
            }
        } else if memory_image_present(&image) {
            findings.push(finding(
                FindingKind::OrphanMemoryImage,
                id,
                Some(&image),
                format!(
                    "recorded as {}, but a memory image is left: stale, never to be resumed",
                    record.state
                ),
            ));
        }
        for (object, message) in crate::ops::checkpoint::half_made(&layout) {
            findings.push(finding(
                FindingKind::HalfMadeCheckpoint,
                id,
                Some(&object),
                message,
            ));
        }
        let status = match self.driver_or_default(&record.config).status(&layout).await {
            Ok(status) => status,
            Err(error) => {
                warn!(machine = %id, %error, "doctor could not read the Machine's status");
                return Some(findings);
            }
        };
        let running = matches!(status, Status::Running { .. });
        if record.state == MachineState::Started {
            if let Status::Exited(exit) = status {
                if now_ms() - exit.exited_at_ms < FRESH_EXIT_MS {
                    return None;
                }
            }
            if !running {
                findings.push(finding(
                    FindingKind::StartedNotRunning,
                    id,
                    Some(&layout.run_dir()),
                    "recorded as started, but its init process is not alive".into(),
                ));
            }
            return Some(findings);
        }
        if running {
            findings.push(finding(
                FindingKind::StoppedButRunning,
                id,
                Some(&layout.run_dir()),
                format!(
                    "recorded as {}, but its init process is alive",
                    record.state
                ),
            ));
        }
        for mount in host.mounts.get(id).into_iter().flatten() {
            // The namespace pins stay mounted for the Machine's whole life.
            if *mount != layout.netns() && *mount != layout.userns() {
                findings.push(finding(
                    FindingKind::StrayMount,
                    id,
                    Some(mount),
                    format!("recorded as {}, but this is still mounted", record.state),
                ));
            }
        }
        if host.containers.contains(id) {
            findings.push(finding(
                FindingKind::StrayContainer,
                id,
                None,
                format!(
                    "recorded as {}, but runc still has its container",
                    record.state
                ),
            ));
        }
        // An empty cgroup is no run: the native driver makes them at create and keeps
        // them while the Machine is stopped.
        for cgroup in host
            .cgroups
            .get(id)
            .into_iter()
            .flatten()
            .filter(|dir| has_processes(dir))
        {
            findings.push(finding(
                FindingKind::StrayCgroup,
                id,
                Some(cgroup),
                format!(
                    "recorded as {}, but its cgroup is still there",
                    record.state
                ),
            ));
        }
        Some(findings)
    }

    /// Fixes what can be fixed of one Machine whose lock the caller holds. Missing files
    /// and layers are reported, never made up.
    async fn repair_record(
        &self,
        record: &mut MachineRecord,
        host: &HostInventory,
        findings: &mut [DoctorFinding],
        last_alive: Option<i64>,
    ) {
        let kinds: std::collections::HashSet<FindingKind> =
            findings.iter().map(|found| found.kind).collect();
        if kinds.contains(&FindingKind::HalfMadeCheckpoint) {
            self.recover_checkpoints(record).await;
            let layout = self.layout(&record.id);
            let left = crate::ops::checkpoint::half_made(&layout);
            for found in findings.iter_mut() {
                found.repaired |= found.kind == FindingKind::HalfMadeCheckpoint
                    && !left.iter().any(|(object, _)| {
                        found.object.as_deref() == Some(&*object.to_string_lossy())
                    });
            }
        }
        if kinds.contains(&FindingKind::OrphanMemoryImage)
            && !kinds.contains(&FindingKind::UnfinishedOperation)
        {
            match self.discard_stale_memory(record).await {
                Ok(()) => {
                    for found in findings.iter_mut() {
                        found.repaired |= found.kind == FindingKind::OrphanMemoryImage;
                    }
                }
                Err(error) => warn!(machine = %record.id, %error, "doctor could not discard"),
            }
        }
        let outcome = if kinds.contains(&FindingKind::UnfinishedOperation) {
            self.recover_one(record, last_alive, "doctor_repair").await
        } else if kinds.contains(&FindingKind::StartedNotRunning) {
            self.record_found_dead(record).await
        } else if kinds.iter().any(|kind| {
            matches!(
                kind,
                FindingKind::StoppedButRunning
                    | FindingKind::StrayMount
                    | FindingKind::StrayContainer
                    | FindingKind::StrayCgroup
            )
        }) {
            self.clear_stray_run(record, host).await
        } else {
            return;
        };
        match outcome {
            Ok(()) => {
                for found in findings.iter_mut() {
                    found.repaired = matches!(
                        found.kind,
                        FindingKind::UnfinishedOperation
                            | FindingKind::StartedNotRunning
                            | FindingKind::StoppedButRunning
                            | FindingKind::StrayMount
                            | FindingKind::StrayContainer
                            | FindingKind::StrayCgroup
                    );
                }
                info!(machine = %record.id, "doctor repaired the Machine");
            }
            Err(error) => warn!(machine = %record.id, %error, "doctor could not repair"),
        }
    }

    /// A memory image beside a Machine that is not suspended: removed, and its bytes taken
    /// off the Machine's storage if they were counted.
    async fn discard_stale_memory(&self, record: &mut MachineRecord) -> Result<()> {
        let usage: Vec<berth_api::UsageRecord> = crate::ops::start::memory_gone(record, now_ms())
            .into_iter()
            .collect();
        self.discard_memory(&record.id).await?;
        if !usage.is_empty() {
            self.inner
                .store
                .save_with_usage(record, None, &usage)
                .await?;
        }
        Ok(())
    }

    /// A Machine recorded as started whose init is gone: record the exit the watcher
    /// missed. The restart policy is not applied; the user decides what runs.
    async fn record_found_dead(&self, record: &mut MachineRecord) -> Result<()> {
        let layout = self.layout(&record.id);
        let runtime = self.driver_or_default(&record.config);
        let exit = match runtime.status(&layout).await? {
            Status::Running { .. } => return Ok(()),
            Status::Exited(exit) => exit,
            Status::NotRunning => unknown_exit(),
        };
        runtime.cleanup(&layout).await?;
        let exited = (berth_api::EventKind::Exit, EventSource::System);
        self.record_stopped(
            record,
            &exit,
            CloseBasis::Observed,
            exited,
            Some("found_dead"),
        )
        .await
    }

    /// A Machine recorded as not running that still has a process, a mount, a container
    /// or a cgroup: end the process and clear the run's state. Its files stay.
    async fn clear_stray_run(&self, record: &MachineRecord, host: &HostInventory) -> Result<()> {
        let layout = self.layout(&record.id);
        let runtime = self.driver_or_default(&record.config);
        if let Status::Running { .. } = runtime.status(&layout).await? {
            runtime.signal(&layout, berth_core::signal::SIGKILL).await?;
            runtime.wait_exit(&layout, Some(crate::KILL_WAIT)).await?;
        }
        runtime.cleanup(&layout).await?;
        let cgroups = host.cgroups.get(&record.id).cloned().unwrap_or_default();
        remove_cgroups(&cgroups)
            .map_err(|error| AgentError::Internal(format!("remove cgroup: {error}")))
    }

    /// Everything of an id with no record: processes, mounts, container, veth, netns,
    /// files and cgroups.
    async fn remove_orphan(&self, id: &str, host: &HostInventory) -> Result<()> {
        let layout: MachineLayout = self.layout(id);
        // Which driver ran it is not recorded: each other driver ends what it may hold
        // of a run (cleanup is idempotent), then the default removes everything shared.
        for (name, driver) in self.inner.drivers.all() {
            if name != self.inner.drivers.default_name() {
                driver.cleanup(&layout).await?;
            }
        }
        self.host_driver().remove(&layout).await?;
        let cgroups = host.cgroups.get(id).cloned().unwrap_or_default();
        remove_cgroups(&cgroups)
            .map_err(|error| AgentError::Internal(format!("remove cgroup: {error}")))
    }
}

fn orphan_findings(id: &str, host: &HostInventory, machines_root: &Path) -> Vec<DoctorFinding> {
    let mut findings = Vec::new();
    if host.dirs.contains(id) {
        findings.push(finding(
            FindingKind::OrphanMachineDir,
            id,
            Some(&machines_root.join(id)),
            "a Machine directory with no record".into(),
        ));
    }
    for mount in host.mounts.get(id).into_iter().flatten() {
        findings.push(finding(
            FindingKind::OrphanMount,
            id,
            Some(mount),
            "a mount of a Machine with no record".into(),
        ));
    }
    if host.containers.contains(id) {
        findings.push(finding(
            FindingKind::OrphanContainer,
            id,
            None,
            "a runc container with no record".into(),
        ));
    }
    if let Some(link) = host.veths.get(id) {
        findings.push(finding(
            FindingKind::OrphanVeth,
            id,
            Some(Path::new(link)),
            "a Machine veth with no record".into(),
        ));
    }
    for cgroup in host.cgroups.get(id).into_iter().flatten() {
        findings.push(finding(
            FindingKind::OrphanCgroup,
            id,
            Some(cgroup),
            "a Machine cgroup with no record".into(),
        ));
    }
    findings
}

/// The usage journal against itself and the held records: consecutive sequence numbers,
/// each Machine created and destroyed once, runs opened and closed alternately, a run
/// open exactly when the record says so, and no Machine left without its closing entry.
fn check_journal(
    outline: &[(i64, String, UsageKind)],
    held: &HashMap<&str, &MachineRecord>,
) -> Vec<DoctorFinding> {
    #[derive(Default)]
    struct Seen {
        created: bool,
        destroyed: bool,
        open: bool,
    }
    let mut findings = Vec::new();
    let mut machines: BTreeMap<&str, Seen> = BTreeMap::new();
    let mut previous: Option<i64> = None;
    for (seq, id, kind) in outline {
        if let Some(previous) = previous {
            if *seq != previous + 1 {
                findings.push(DoctorFinding {
                    kind: FindingKind::JournalGap,
                    machine_id: None,
                    object: None,
                    message: format!("the usage journal skips from {previous} to {seq}"),
                    repaired: false,
                });
            }
        }
        previous = Some(*seq);
        let seen = machines.entry(id.as_str()).or_default();
        let repeat = |what: &str| {
            finding(
                FindingKind::JournalDuplicate,
                id,
                None,
                format!("journal entry {seq} {what}"),
            )
        };
        if seen.destroyed {
            findings.push(repeat("comes after the Machine was destroyed"));
        }
        match kind {
            UsageKind::Created if seen.created => {
                findings.push(repeat("creates the Machine a second time"))
            }
            UsageKind::Created => seen.created = true,
            UsageKind::RunStart if seen.open => {
                findings.push(repeat("opens a run that is already open"))
            }
            UsageKind::RunStart => seen.open = true,
            UsageKind::RunStop if !seen.open => {
                findings.push(repeat("closes a run that is not open"))
            }
            UsageKind::RunStop => seen.open = false,
            UsageKind::Storage | UsageKind::CheckpointStorage => {}
            UsageKind::Destroyed => {
                if seen.open {
                    findings.push(finding(
                        FindingKind::JournalUnclosedRun,
                        id,
                        None,
                        format!("journal entry {seq} destroys the Machine with its run open"),
                    ));
                }
                seen.destroyed = true;
            }
            // The Machine left for another worker: it may come back, as a new create.
            UsageKind::MigratedOut => {
                if seen.open {
                    findings.push(finding(
                        FindingKind::JournalUnclosedRun,
                        id,
                        None,
                        format!("journal entry {seq} moves the Machine away with its run open"),
                    ));
                }
                *seen = Default::default();
            }
        }
    }
    for (id, seen) in &machines {
        match held.get(id) {
            Some(record) => {
                let running = record.state == MachineState::Started;
                if seen.open != record.run_open
                    || (running != seen.open && record.pending.is_none())
                {
                    findings.push(finding(
                        FindingKind::JournalUnclosedRun,
                        id,
                        None,
                        format!(
                            "recorded {} with run_open={}, but the journal has the run {}",
                            record.state,
                            record.run_open,
                            if seen.open { "open" } else { "closed" }
                        ),
                    ));
                }
            }
            // A volume's entries share the journal; a volume has no Machine record.
            None if berth_core::ids::has_id_shape(id, "vol_") => {}
            None if seen.created && !seen.destroyed => findings.push(finding(
                FindingKind::JournalUnclosedRun,
                id,
                None,
                "the Machine has no record, but the journal never closed its existence".into(),
            )),
            None => {}
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outline(entries: &[(i64, &str, UsageKind)]) -> Vec<(i64, String, UsageKind)> {
        entries
            .iter()
            .map(|(seq, id, kind)| (*seq, id.to_string(), *kind))
            .collect()
    }

    fn kinds(findings: &[DoctorFinding]) -> Vec<FindingKind> {
        findings.iter().map(|found| found.kind).collect()
    }

    #[test]
    fn a_whole_life_in_the_journal_is_clean() {
        let journal = outline(&[
            (1, "m1", UsageKind::Created),
            (2, "m1", UsageKind::RunStart),
            (3, "m1", UsageKind::RunStop),
            (4, "m1", UsageKind::Storage),
            (5, "m1", UsageKind::RunStart),
            (6, "m1", UsageKind::RunStop),
            (7, "m1", UsageKind::Destroyed),
        ]);
        assert!(check_journal(&journal, &HashMap::new()).is_empty());
    }

    #[test]
    fn gaps_repeats_and_open_ends_are_found() {
        let journal = outline(&[
            (1, "m1", UsageKind::Created),
            (3, "m1", UsageKind::RunStart),
            (4, "m1", UsageKind::RunStart),
            (5, "m2", UsageKind::Created),
            (6, "m2", UsageKind::RunStop),
            (7, "m3", UsageKind::Created),
        ]);
        let found = kinds(&check_journal(&journal, &HashMap::new()));
        assert_eq!(
            found,
            vec![
                FindingKind::JournalGap,
                FindingKind::JournalDuplicate,
                FindingKind::JournalDuplicate,
                FindingKind::JournalUnclosedRun,
                FindingKind::JournalUnclosedRun,
                FindingKind::JournalUnclosedRun,
            ]
        );
    }

    #[test]
    fn a_live_volume_in_the_journal_is_not_an_unclosed_machine() {
        let journal = outline(&[
            (1, "vol_0123456789abcdef", UsageKind::Created),
            (2, "vol_0123456789abcdef", UsageKind::Storage),
            (3, "m1", UsageKind::Created),
        ]);
        // Only the Machine without a record is an open end.
        let found = check_journal(&journal, &HashMap::new());
        assert_eq!(kinds(&found), vec![FindingKind::JournalUnclosedRun]);
        assert_eq!(found[0].machine_id.as_deref(), Some("m1"));
        // A second create of the volume is still a repeat.
        let journal = outline(&[
            (1, "vol_0123456789abcdef", UsageKind::Created),
            (2, "vol_0123456789abcdef", UsageKind::Created),
        ]);
        assert_eq!(
            kinds(&check_journal(&journal, &HashMap::new())),
            vec![FindingKind::JournalDuplicate]
        );
    }
}
