//! Moving a Machine between workers. The control plane runs the agents' steps
//! ([`MigrationStep`]) and owns the outcome: its `migrations` row is written before the
//! first step, and the cutover (the index's worker changing) is one transaction with the
//! row's phase. Before the cutover a failure or a crash rolls back (abort on both
//! workers); after it the move rolls forward (commit, then finish). The bytes go from
//! agent to agent; they never pass through here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use berth_api::{Machine, MigrateMachineRequest, MigrateMachineResponse, RecreateMachineRequest};
use berth_core::placement::PlacementRequest;
use berth_worker::{
    CreateOnWorker, MigrateIn, MigrationAnswer, MigrationPeer, MigrationStep, WorkerService,
};
use sqlx::Row;
use tokio::sync::watch;

use crate::error::ApiError;
use crate::store::{AppRow, MachineIndexRow};
use crate::ControlPlane;

pub(crate) const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS migrations (
        machine_id TEXT PRIMARY KEY NOT NULL,
        app TEXT NOT NULL,
        source TEXT NOT NULL,
        dest TEXT NOT NULL,
        grant_token TEXT NOT NULL,
        running INTEGER NOT NULL DEFAULT 0,
        from_address TEXT,
        phase TEXT NOT NULL,
        cutover_ms INTEGER,
        started_ms INTEGER NOT NULL,
        replica TEXT
    )",
    // Machines and volumes an admin forgot while their worker was lost: the copies it
    // still has are removed when it comes back (`kind` is `machine` or `volume`).
    "CREATE TABLE IF NOT EXISTS lost_copies (
        id TEXT PRIMARY KEY NOT NULL,
        worker TEXT NOT NULL,
        kind TEXT NOT NULL
    )",
];

/// The control plane's failpoints in a move (the agents have theirs): just before and just
/// after the cutover record.
pub const CONTROL_POINTS: &[&str] = &["migrate.before_cutover", "migrate.after_cutover"];

/// How long a start, stop, update or destroy waits for a move of its Machine to end.
const WAIT_FOR_MOVE: Duration = Duration::from_secs(300);

/// How often unfinished moves (their request died with a process) are settled.
const SETTLE_EVERY: Duration = Duration::from_secs(3);

/// A pre-copy pass shorter than this leaves little to copy while the Machine is down.
const SHORT_PASS: Duration = Duration::from_millis(500);

/// At most this many passes while a Machine runs before it is stopped for the last.
const MAX_LIVE_PASSES: u32 = 3;

/// The Machines being moved by this process, each with a channel that closes when its
/// move ends.
#[derive(Default)]
pub(crate) struct Moves {
    by_machine: StdMutex<HashMap<String, watch::Receiver<()>>>,
}

/// Held while a move runs; dropping it ends the move for the waiters.
pub(crate) struct MoveGuard<'a> {
    moves: &'a Moves,
    id: String,
    _sender: watch::Sender<()>,
}

impl Drop for MoveGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut map) = self.moves.by_machine.lock() {
            map.remove(&self.id);
        }
    }
}

impl Moves {
    /// Marks `id` as moving; `None` when it already is.
    fn begin(&self, id: &str) -> Option<MoveGuard<'_>> {
        let mut map = self.by_machine.lock().ok()?;
        if map.contains_key(id) {
            return None;
        }
        let (sender, receiver) = watch::channel(());
        map.insert(id.to_owned(), receiver);
        Some(MoveGuard {
            moves: self,
            id: id.to_owned(),
            _sender: sender,
        })
    }

    /// Waits until no move of `id` runs in this process.
    pub(crate) async fn settled(&self, id: &str) -> Result<(), ApiError> {
        let receiver = self
            .by_machine
            .lock()
            .ok()
            .and_then(|map| map.get(id).cloned());
        let Some(mut receiver) = receiver else {
            return Ok(());
        };
        // `changed` fails once the guard's sender is gone: the move ended.
        match tokio::time::timeout(WAIT_FOR_MOVE, receiver.changed()).await {
            Ok(_) => Ok(()),
            Err(_) => Err(migrating(id)),
        }
    }
}

fn migrating(id: &str) -> ApiError {
    let mut error = ApiError::new(
        StatusCode::CONFLICT,
        "machine_migrating",
        format!("machine {id} is moving between workers; retry once the move ends"),
    );
    error.body.retry_after_ms = Some(1000);
    error
}

/// The move's grant: the source serves its files only to whoever holds it.
fn new_grant() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// One row of the `migrations` table.
#[derive(Debug, Clone)]
struct MoveRow {
    machine_id: String,
    source: String,
    dest: String,
    grant: String,
    running: bool,
    from_address: Option<String>,
    cut_over: bool,
    cutover_ms: Option<i64>,
    /// The volumes the Machine mounts: their index rows move at the cutover.
    volumes: Vec<String>,
}

impl ControlPlane {
    /// Moves an admitted Machine to `request.to_worker` (or where placement picks).
    pub(crate) async fn migrate_admitted(
        &self,
        app: &AppRow,
        row: &MachineIndexRow,
        request: MigrateMachineRequest,
    ) -> Result<MigrateMachineResponse, ApiError> {
        let began = Instant::now();
        let id = row.id.as_str();
        let Some(_guard) = self.moves.begin(id) else {
            return Err(migrating(id));
        };
        // An earlier move that a crash cut off is settled first.
        if self.move_recorded(id).await {
            return Err(migrating(id));
        }
        let source_name = row.worker.clone();
        let source = self.worker(&source_name)?;
        let current = source.get(id).await?;
        let volume_mb = self
            .volumes_disk_mb(&app.name, &current.config.mounts)
            .await?;
        let dest_name = self
            .migration_target(row, &current, volume_mb, request.to_worker)
            .await?;
        let dest = self.worker(&dest_name)?;
        let size = berth_api::Resources {
            cpus: current.config.guest.cpus,
            memory_mb: u64::from(current.config.guest.memory_mb),
            disk_mb: berth_core::placement::machine_disk_mb(&current.config.guest) + volume_mb,
        };
        let grant = new_grant();
        let mut moving = MoveRow {
            machine_id: id.to_owned(),
            source: source_name.clone(),
            dest: dest_name.clone(),
            grant: grant.clone(),
            running: false,
            from_address: current.private_ip.clone(),
            cut_over: false,
            cutover_ms: None,
            volumes: current
                .config
                .mounts
                .iter()
                .map(|mount| mount.volume.clone())
                .collect(),
        };
        // The destination's room is taken in the store, as a create takes it.
        let request = PlacementRequest {
            region: None,
            worker: Some(dest_name.clone()),
            cpus: size.cpus,
            memory_mb: size.memory_mb,
            disk_mb: size.disk_mb,
            runtime: current.config.runtime.clone(),
        };
        let placement = crate::workers::Placement {
            machine_id: id,
            size,
            starts: true,
        };
        let pool = self.store.pool();
        let Some(hold) = self
            .workers
            .reserve(pool, &dest_name, &request, self.placement, placement)
            .await?
        else {
            let mut error = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "insufficient_capacity",
                format!("worker {dest_name} has no room for machine {id} now"),
            );
            error.body.retry_after_ms = Some(5000);
            return Err(error);
        };
        if let Err(error) = self.insert_move(&app.name, &moving).await {
            hold.create_ended(false).await?;
            return Err(error);
        }
        // The destination pulls the pinned digest; an imported one from the shared registry.
        let pull = berth_image::PullScope {
            source: self.pinned_source(&current.image_ref),
            ..berth_image::PullScope::default()
        };
        let moved = self
            .run_move(app, &source, &dest, &mut moving, pull, began)
            .await;
        hold.create_ended(moved.is_ok()).await?;
        match moved {
            Ok(answer) => Ok(answer),
            Err(error) if moving.cut_over => {
                // Past the cutover the move rolls forward: the settling loop finishes it.
                tracing::warn!(machine = %id, error = %error.body.message, "finishing a move later");
                Err(error)
            }
            Err(mut error) => {
                let (source_answer, rest) = self.roll_back(&source, &dest, &moving).await;
                if let Some(source_answer) = source_answer {
                    say_rolled_back(&mut error, &moving, &source_answer);
                }
                if let Err(abort_error) = rest {
                    tracing::warn!(machine = %id, error = %abort_error.body.message, "rolling a move back later");
                }
                Err(error)
            }
        }
    }

    /// Moves a volume that no Machine holds (a drain's) to where placement picks among
    /// the other workers: a Machine's move's steps, keyed by the volume's id, with one
    /// pass (nothing writes the image). Its index row and its snapshots' move at the
    /// same cutover record; before it a failure rolls back, after it the move rolls
    /// forward, here or in the settling loop. A volume deleted meanwhile is done.
    pub(crate) async fn migrate_lone_volume(
        &self,
        row: &crate::store::VolumeIndexRow,
    ) -> Result<(), ApiError> {
        let id = row.id.as_str();
        let Some(_guard) = self.moves.begin(id) else {
            return Err(migrating(id));
        };
        if self.move_recorded(id).await {
            return Err(migrating(id));
        }
        let others: Vec<_> = self
            .workers
            .capacities(self.store.pool())
            .await?
            .into_iter()
            .filter(|worker| worker.name != row.worker)
            .collect();
        if others.is_empty() {
            return Err(no_other_worker(&row.worker, &format!("volume {id}")));
        }
        // Placed as a volume's create is: by its provisioned size.
        let dest_name = self.place_among(
            others,
            &PlacementRequest {
                region: None,
                worker: None,
                cpus: 0,
                memory_mb: 0,
                disk_mb: u64::from(row.size_gb) * 1024,
                runtime: None,
            },
        )?;
        let (source, dest) = (self.worker(&row.worker)?, self.worker(&dest_name)?);
        let mut moving = MoveRow {
            machine_id: id.to_owned(),
            source: row.worker.clone(),
            dest: dest_name,
            grant: new_grant(),
            running: false,
            from_address: None,
            cut_over: false,
            cutover_ms: None,
            volumes: vec![id.to_owned()],
        };
        self.insert_move(&row.app, &moving).await?;
        match self.run_volume_move(&source, &dest, &mut moving).await {
            Ok(()) => {
                tracing::info!(volume = %id, from = %moving.source, to = %moving.dest, "volume moved");
                Ok(())
            }
            Err(error) if moving.cut_over => {
                tracing::warn!(volume = %id, error = %error.body.message, "finishing a volume's move later");
                Err(error)
            }
            Err(error) => {
                if let (_, Err(abort_error)) = self.roll_back(&source, &dest, &moving).await {
                    tracing::warn!(volume = %id, error = %abort_error.body.message, "rolling a volume's move back later");
                }
                if error.status == StatusCode::NOT_FOUND {
                    return Ok(());
                }
                Err(error)
            }
        }
    }

    async fn run_volume_move(
        &self,
        source: &Arc<dyn WorkerService>,
        dest: &Arc<dyn WorkerService>,
        moving: &mut MoveRow,
    ) -> Result<(), ApiError> {
        let (id, grant) = (moving.machine_id.clone(), moving.grant.clone());
        let export = source
            .migration(MigrationStep::Begin {
                id: id.clone(),
                grant: grant.clone(),
                to_worker: moving.dest.clone(),
            })
            .await?
            .export
            .ok_or_else(|| ApiError::internal("the source answered no export"))?;
        dest.migration(MigrationStep::Receive(Box::new(MigrateIn {
            id: id.clone(),
            grant,
            source: MigrationPeer {
                worker: moving.source.clone(),
                url: self.workers.url(&moving.source),
            },
            export,
            pull: berth_image::PullScope::default(),
        })))
        .await?;
        let cutover_ms = self.clock.now_ms();
        self.cut_over(&id, &moving.dest, &moving.volumes, cutover_ms)
            .await?;
        moving.cut_over = true;
        moving.cutover_ms = Some(cutover_ms);
        self.commit(dest, moving).await?;
        self.finish_source(source, moving).await
    }

    /// The disk the Machine's volumes take where they go: their provisioned size, as at
    /// their create.
    async fn volumes_disk_mb(
        &self,
        app: &str,
        mounts: &[berth_api::MachineMount],
    ) -> Result<u64, ApiError> {
        let mut total = 0u64;
        for mount in mounts {
            if let Some(volume) = self.store.volume(app, &mount.volume).await? {
                total += u64::from(volume.size_gb) * 1024;
            }
        }
        Ok(total)
    }

    /// The worker a Machine moves to: the one asked for, checked, or placement's pick
    /// among the others, with room for its volumes (`volume_mb`) too.
    async fn migration_target(
        &self,
        row: &MachineIndexRow,
        machine: &berth_api::Machine,
        volume_mb: u64,
        asked: Option<String>,
    ) -> Result<String, ApiError> {
        let capacities = self.workers.capacities(self.store.pool()).await?;
        if let Some(name) = &asked {
            let Some(worker) = capacities.iter().find(|worker| worker.name == *name) else {
                let mut error = ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unknown_worker",
                    format!("no worker is named {name}"),
                );
                error.body.field = Some("to_worker".into());
                return Err(error);
            };
            if *name == row.worker {
                let mut error = ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "same_worker",
                    format!("machine {} is already on worker {name}", row.id),
                );
                error.body.field = Some("to_worker".into());
                return Err(error);
            }
            if !worker.healthy || worker.cordoned {
                let mut error = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "insufficient_capacity",
                    format!("worker {name} takes no Machines now (cordoned or unreachable)"),
                );
                error.body.retry_after_ms = Some(5000);
                return Err(error);
            }
        }
        // A worker asked for is still checked for room, like any placement.
        let request = PlacementRequest {
            region: None,
            worker: asked,
            cpus: machine.config.guest.cpus,
            memory_mb: u64::from(machine.config.guest.memory_mb),
            disk_mb: berth_core::placement::machine_disk_mb(&machine.config.guest) + volume_mb,
            // It keeps its driver where it goes.
            runtime: machine.config.runtime.clone(),
        };
        let others: Vec<_> = capacities
            .into_iter()
            .filter(|worker| worker.name != row.worker)
            .collect();
        if others.is_empty() {
            return Err(no_other_worker(&row.worker, &format!("machine {}", row.id)));
        }
        self.place_among(others, &request)
    }

    async fn run_move(
        &self,
        app: &AppRow,
        source: &Arc<dyn WorkerService>,
        dest: &Arc<dyn WorkerService>,
        moving: &mut MoveRow,
        pull: berth_image::PullScope,
        began: Instant,
    ) -> Result<MigrateMachineResponse, ApiError> {
        let id = moving.machine_id.clone();
        let grant = moving.grant.clone();
        let begun = source
            .migration(MigrationStep::Begin {
                id: id.clone(),
                grant: grant.clone(),
                to_worker: moving.dest.clone(),
            })
            .await?;
        moving.running = begun.running;
        self.set_move_running(&id, begun.running).await?;
        let export = begun
            .export
            .ok_or_else(|| ApiError::internal("the source answered no export"))?;
        let mut copied = Copied::default();
        let pass = Instant::now();
        let first = dest
            .migration(MigrationStep::Receive(Box::new(MigrateIn {
                id: id.clone(),
                grant: grant.clone(),
                source: MigrationPeer {
                    worker: moving.source.clone(),
                    url: self.workers.url(&moving.source),
                },
                export,
                pull,
            })))
            .await?;
        copied.add(&first);
        let mut downtime_from = None;
        if moving.running {
            // Pre-copy while it runs, until a pass is short: what is left to copy while
            // the Machine is down is what changed during that last short pass.
            let mut last = pass.elapsed();
            while last > SHORT_PASS && copied.passes < MAX_LIVE_PASSES {
                let pass = Instant::now();
                let answer = self.sync(dest, &id, &grant).await?;
                copied.add(&answer);
                last = pass.elapsed();
            }
            downtime_from = Some(Instant::now());
            source
                .migration(MigrationStep::Halt {
                    id: id.clone(),
                    grant: grant.clone(),
                })
                .await?;
            let answer = self.sync(dest, &id, &grant).await?;
            copied.add(&answer);
        }
        let cutover_ms = self.clock.now_ms();
        self.cut_over(&id, &moving.dest, &moving.volumes, cutover_ms)
            .await?;
        moving.cut_over = true;
        moving.cutover_ms = Some(cutover_ms);
        let committed = self.commit(dest, moving).await?;
        let downtime_ms = downtime_from.map(|from| from.elapsed().as_millis() as u64);
        // The source's copy goes once the Machine runs on the destination: removing a large
        // disk is not downtime. On one host the two share the cgroup path, whose removal
        // leaves a cgroup holding the destination's processes.
        self.finish_source(source, moving).await?;
        let machine = committed
            .machine
            .ok_or_else(|| ApiError::internal("the destination answered no machine"))?;
        let machine = crate::machines::seen(self, machine, &moving.dest).await;
        tracing::info!(machine = %id, app = %app.name, from = %moving.source, to = %moving.dest, bytes = copied.file_bytes, ?downtime_ms, "moved");
        Ok(MigrateMachineResponse {
            machine,
            from_worker: moving.source.clone(),
            to_worker: moving.dest.clone(),
            bytes_moved: copied.file_bytes,
            bytes_sent: copied.stream_bytes,
            passes: copied.passes,
            duration_ms: began.elapsed().as_millis() as u64,
            downtime_ms,
        })
    }

    async fn sync(
        &self,
        dest: &Arc<dyn WorkerService>,
        id: &str,
        grant: &str,
    ) -> Result<MigrationAnswer, ApiError> {
        Ok(dest
            .migration(MigrationStep::Sync {
                id: id.to_owned(),
                grant: grant.to_owned(),
            })
            .await?)
    }

    /// After the commit: the source removes its copy, and the move's row goes.
    async fn finish_source(
        &self,
        source: &Arc<dyn WorkerService>,
        moving: &MoveRow,
    ) -> Result<(), ApiError> {
        source
            .migration(MigrationStep::Finish {
                id: moving.machine_id.clone(),
                grant: moving.grant.clone(),
                cutover_ms: moving.cutover_ms.unwrap_or_else(|| self.clock.now_ms()),
            })
            .await?;
        sqlx::query("DELETE FROM migrations WHERE machine_id = $1")
            .bind(&moving.machine_id)
            .execute(self.store.pool())
            .await?;
        Ok(())
    }

    /// After the cutover: the destination takes the Machine (and boots it if it ran).
    /// Idempotent: a commit sent again answers the committed Machine.
    async fn commit(
        &self,
        dest: &Arc<dyn WorkerService>,
        moving: &MoveRow,
    ) -> Result<MigrationAnswer, ApiError> {
        let committed = dest
            .migration(MigrationStep::Commit {
                id: moving.machine_id.clone(),
                grant: moving.grant.clone(),
                start: moving.running,
                from_address: moving.from_address.clone(),
                cutover_ms: moving.cutover_ms.unwrap_or_else(|| self.clock.now_ms()),
            })
            .await?;
        Ok(committed)
    }

    /// Before the cutover: both workers undo their part, then the row goes. The source's
    /// answer comes back even when the destination's part waits for the settling loop.
    async fn roll_back(
        &self,
        source: &Arc<dyn WorkerService>,
        dest: &Arc<dyn WorkerService>,
        moving: &MoveRow,
    ) -> (Option<MigrationAnswer>, Result<(), ApiError>) {
        let abort = || MigrationStep::Abort {
            id: moving.machine_id.clone(),
            grant: moving.grant.clone(),
        };
        // The source first: a Machine the move stopped runs again there even while the
        // destination does not answer; its staged copy goes when it does.
        let source_answer = match source.migration(abort()).await {
            Ok(answer) => answer,
            Err(error) => return (None, Err(error.into())),
        };
        let rest = async {
            dest.migration(abort()).await?;
            sqlx::query("DELETE FROM migrations WHERE machine_id = $1")
                .bind(&moving.machine_id)
                .execute(self.store.pool())
                .await?;
            Ok(())
        };
        (Some(source_answer), rest.await)
    }

    async fn insert_move(&self, app: &str, moving: &MoveRow) -> Result<(), ApiError> {
        let inserted = sqlx::query(
            "INSERT INTO migrations
                (machine_id, app, source, dest, grant_token, running, from_address, phase, started_ms,
                 replica)
             VALUES ($1, $2, $3, $4, $5, 0, $6, 'copying', $7, $8)
             ON CONFLICT (machine_id) DO NOTHING",
        )
        .bind(&moving.machine_id)
        .bind(app)
        .bind(&moving.source)
        .bind(&moving.dest)
        .bind(&moving.grant)
        .bind(&moving.from_address)
        .bind(self.clock.now_ms())
        .bind(self.replicas.id())
        .execute(self.store.pool())
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(migrating(&moving.machine_id));
        }
        Ok(())
    }

    async fn set_move_running(&self, id: &str, running: bool) -> Result<(), ApiError> {
        sqlx::query("UPDATE migrations SET running = $1 WHERE machine_id = $2")
            .bind(i64::from(running))
            .bind(id)
            .execute(self.store.pool())
            .await?;
        Ok(())
    }

    /// The commit point: the index names the destination for the Machine and its
    /// volumes, and the move rolls forward.
    async fn cut_over(
        &self,
        id: &str,
        dest: &str,
        volumes: &[String],
        cutover_ms: i64,
    ) -> Result<(), ApiError> {
        berth_core::failpoint::hit("migrate.before_cutover");
        let mut transaction = self.store.pool().begin().await?;
        sqlx::query("UPDATE machines SET worker = $1 WHERE id = $2")
            .bind(dest)
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        crate::store::ControlStore::move_volumes(&mut transaction, volumes, dest).await?;
        sqlx::query(
            "UPDATE migrations SET phase = 'cut_over', cutover_ms = $1 WHERE machine_id = $2",
        )
        .bind(cutover_ms)
        .bind(id)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        berth_core::failpoint::hit("migrate.after_cutover");
        Ok(())
    }

    async fn moves(&self) -> Result<Vec<MoveRow>, sqlx::Error> {
        self.moves_where(None).await
    }

    /// The recorded moves, or the one of `id`.
    async fn moves_where(&self, id: Option<&str>) -> Result<Vec<MoveRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT machine_id, source, dest, grant_token, running, from_address, phase, cutover_ms
             FROM migrations WHERE $1 IS NULL OR machine_id = $1",
        )
        .bind(id)
        .fetch_all(self.store.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|row| MoveRow {
                machine_id: row.get(0),
                source: row.get(1),
                dest: row.get(2),
                grant: row.get(3),
                running: row.get::<i64, _>(4) != 0,
                from_address: row.get(5),
                cut_over: row.get::<String, _>(6) == "cut_over",
                cutover_ms: row.get(7),
                // Moved with the cutover, which a settled move is past or never reaches.
                volumes: Vec::new(),
            })
            .collect())
    }

    /// Takes the recorded move of `id` for this replica: it is this replica's already, or
    /// the replica that began it is no longer live. One statement, so two replicas never
    /// both take a dead one's move.
    async fn take_move(&self, id: &str) -> Result<bool, sqlx::Error> {
        let taken = sqlx::query(&format!(
            "UPDATE migrations SET replica = $1 WHERE machine_id = $2
             AND (replica = $1 OR {})",
            crate::replicas::not_live("replica", 3)
        ))
        .bind(self.replicas.id())
        .bind(id)
        .bind(crate::replicas::Replicas::cutoff())
        .execute(self.store.pool())
        .await?;
        Ok(taken.rows_affected() == 1)
    }

    /// Settles every move whose request is gone (this process restarted, or its request
    /// failed to reach a worker): forward past the cutover, back before it. A worker
    /// that does not answer is tried again next time. Moves another live replica runs
    /// are left to it.
    pub(crate) async fn settle_moves(&self) {
        let moves = match self.moves().await {
            Ok(moves) => moves,
            Err(error) => {
                tracing::warn!(%error, "reading unfinished moves");
                return;
            }
        };
        for listed in moves {
            let Some(_guard) = self.moves.begin(&listed.machine_id) else {
                continue;
            };
            match self.take_move(&listed.machine_id).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(error) => {
                    tracing::warn!(%error, "taking over an unfinished move");
                    continue;
                }
            }
            // Read again under the guard: the move the list saw may have ended, or passed
            // its cutover, since (a request held it meanwhile).
            let Ok(Some(moving)) = self
                .moves_where(Some(&listed.machine_id))
                .await
                .map(|rows| rows.into_iter().next())
            else {
                continue;
            };
            let (Ok(source), Ok(dest)) = (self.worker(&moving.source), self.worker(&moving.dest))
            else {
                continue;
            };
            let settled = if moving.cut_over {
                // Two workers of one host share the Machine's cgroup path; the source's
                // removal leaves a cgroup the booted destination's processes are in.
                match self.commit(&dest, &moving).await {
                    Ok(_) => self.finish_source(&source, &moving).await,
                    Err(error) => Err(error),
                }
            } else {
                self.roll_back(&source, &dest, &moving).await.1
            };
            match settled {
                Ok(()) => {
                    tracing::info!(machine = %moving.machine_id, forward = moving.cut_over, "settled an unfinished move")
                }
                Err(error) => {
                    tracing::debug!(machine = %moving.machine_id, error = %error.body.message, "an unfinished move waits for its workers")
                }
            }
        }
    }
}

impl ControlPlane {
    /// Makes a Machine whose worker is gone for good again, from its image, on another
    /// worker: same id, name, config and metadata; its files are lost, and an event says
    /// so. Refused while its worker answers (move it instead) and without `lose_state`.
    pub(crate) async fn recreate_machine(
        &self,
        principal: &crate::auth::Principal,
        app: &str,
        id: &str,
        request: RecreateMachineRequest,
    ) -> Result<Machine, ApiError> {
        // Looked up first: another org's Machine is not found, as if it did not exist.
        let (app_row, row) = self.machine(principal, app, id).await?;
        principal.require_admin()?;
        let Some(_guard) = self.moves.begin(id) else {
            return Err(migrating(id));
        };
        let healthy = self
            .workers
            .capacities(self.store.pool())
            .await?
            .iter()
            .any(|worker| worker.name == row.worker && worker.healthy);
        if healthy {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "worker_available",
                format!(
                    "worker {} holds machine {id}'s files and answers: migrate it instead",
                    row.worker
                ),
            ));
        }
        if !request.lose_state {
            let mut error = ApiError::new(
                StatusCode::CONFLICT,
                "state_would_be_lost",
                format!(
                    "machine {id}'s files are on worker {}, which is unavailable; recreating it loses them: send lose_state: true to accept that",
                    row.worker
                ),
            );
            error.body.field = Some("lose_state".into());
            return Err(error);
        }
        let last: Machine = self
            .last_known
            .get(&self.store, id)
            .await?
            .and_then(|json| serde_json::from_str(&json).ok())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "config_unknown",
                    format!("the control plane never saw machine {id}'s config"),
                )
            })?;
        // Its volumes' bytes and snapshots are only on the lost worker: each is made again
        // empty where the Machine goes, with its id, name, size and flags, and an event
        // on the Machine says its data was lost.
        let volumes = self.lost_volumes(app, &last.config.mounts).await?;
        // A move cut off with the lost worker is over: the other side drops its part if
        // it can, and the row goes, so the settling loop stops waiting for the lost one.
        if let Some(moving) = self
            .moves()
            .await?
            .into_iter()
            .find(|moving| moving.machine_id == id)
        {
            for side in [&moving.source, &moving.dest] {
                if let Ok(worker) = self.worker(side) {
                    let _ = worker
                        .migration(MigrationStep::Abort {
                            id: id.to_owned(),
                            grant: moving.grant.clone(),
                        })
                        .await;
                }
            }
            sqlx::query("DELETE FROM migrations WHERE machine_id = $1")
                .bind(id)
                .execute(self.store.pool())
                .await?;
        }
        let volume_mb = volumes
            .iter()
            .map(|(row, _)| u64::from(row.size_gb) * 1024)
            .sum();
        let dest_name = self
            .migration_target(&row, &last, volume_mb, request.to_worker)
            .await?;
        let dest = self.worker(&dest_name)?;
        let mut pull = crate::images::pull_scope(self, principal, &app_row.org_slug).await?;
        pull.source = self.pull_source(&last.config.image).await?;
        for (volume_row, known) in &volumes {
            // A create sent again (a recreate retried) answers the volume it made.
            dest.volume_create(berth_worker::CreateVolumeOnWorker {
                id: volume_row.id.clone(),
                app: app.to_owned(),
                request: berth_api::CreateVolumeRequest {
                    name: known.name.clone(),
                    size_gb: Some(volume_row.size_gb),
                    snapshot_retention: Some(known.snapshot_retention),
                    auto_backup_enabled: Some(known.auto_backup_enabled),
                    // Made again as it was: an unencrypted volume stays unencrypted.
                    encrypted: Some(known.encrypted),
                    ..berth_api::CreateVolumeRequest::default()
                },
            })
            .await?;
        }
        let answer = dest
            .migration(MigrationStep::Recreate {
                request: Box::new(CreateOnWorker {
                    from_checkpoint: None,
                    id: id.to_owned(),
                    app: app.to_owned(),
                    name: row.name.clone(),
                    config: last.config,
                    skip_launch: true,
                    org: Some(app_row.org_slug.clone()),
                    pull,
                }),
                lost_worker: row.worker.clone(),
            })
            .await?;
        let volume_ids: Vec<String> = volumes.iter().map(|(row, _)| row.id.clone()).collect();
        self.cut_over_recreated(id, &dest_name, &volume_ids).await?;
        tracing::warn!(machine = %id, from = %row.worker, to = %dest_name, "recreated from its image; its files are lost");
        let machine = answer
            .machine
            .ok_or_else(|| ApiError::internal("the worker answered no machine"))?;
        Ok(crate::machines::seen(self, machine, &dest_name).await)
    }

    /// Admin, `lose_state`: records that `id` (a Machine or a volume, `kind`) on `worker`
    /// is forgotten, so the copy the worker has goes if it comes back. Refused while the
    /// worker answers (then the normal destroy or delete does it) and during a move.
    pub(crate) async fn forget_on_lost_worker(
        &self,
        principal: &crate::auth::Principal,
        worker: &str,
        id: &str,
        kind: &str,
    ) -> Result<(), ApiError> {
        principal.require_admin()?;
        let healthy = self
            .workers
            .capacities(self.store.pool())
            .await?
            .iter()
            .any(|each| each.name == worker && each.healthy);
        if healthy {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "worker_available",
                format!(
                    "worker {worker} holds {kind} {id} and answers: delete it without lose_state"
                ),
            ));
        }
        if self.move_recorded(id).await {
            return Err(migrating(id));
        }
        sqlx::query(
            "INSERT INTO lost_copies (id, worker, kind) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET worker = excluded.worker, kind = excluded.kind",
        )
        .bind(id)
        .bind(worker)
        .bind(kind)
        .execute(self.store.pool())
        .await?;
        tracing::warn!(%id, %worker, %kind, "forgotten on a lost worker; its data is lost");
        Ok(())
    }

    /// A worker back (adopted): its copies of what was forgotten while it was lost are
    /// removed, Machines first (a volume is released by its Machine's destroy). A copy
    /// that cannot be removed now is tried at the next adoption.
    pub(crate) async fn remove_lost_copies(&self, name: &str, worker: &Arc<dyn WorkerService>) {
        let rows = match sqlx::query(
            "SELECT id, kind FROM lost_copies WHERE worker = $1 ORDER BY kind, id",
        )
        .bind(name)
        .fetch_all(self.store.pool())
        .await
        {
            Ok(rows) => rows,
            Err(error) => {
                tracing::warn!(%error, "reading forgotten copies");
                return;
            }
        };
        for row in rows {
            let (Ok(id), Ok(kind)) = (row.try_get::<String, _>(0), row.try_get::<String, _>(1))
            else {
                continue;
            };
            let removed = match kind.as_str() {
                "machine" => worker.destroy(&id, true).await.map(|_| ()),
                _ => worker.volume_delete(&id).await.map(|_| ()),
            };
            let gone = match removed {
                Ok(()) => true,
                Err(error) => error.to_response().0 == 404,
            };
            if !gone {
                tracing::warn!(%id, worker = %name, "a forgotten copy stays until the next adoption");
                continue;
            }
            tracing::info!(%id, worker = %name, %kind, "removed a copy forgotten while its worker was lost");
            let _ = sqlx::query("DELETE FROM lost_copies WHERE id = $1")
                .bind(&id)
                .execute(self.store.pool())
                .await;
        }
    }

    /// Whether a move of `id` is recorded (running, or waiting to be settled).
    pub(crate) async fn move_recorded(&self, id: &str) -> bool {
        sqlx::query("SELECT 1 FROM migrations WHERE machine_id = $1")
            .bind(id)
            .fetch_optional(self.store.pool())
            .await
            .map_or(true, |row| row.is_some())
    }

    /// The index names the new worker for the Machine and its volumes, whose snapshots
    /// (on the lost worker) are forgotten, in one transaction.
    async fn cut_over_recreated(
        &self,
        id: &str,
        dest: &str,
        volumes: &[String],
    ) -> Result<(), ApiError> {
        let mut transaction = self.store.pool().begin().await?;
        sqlx::query("UPDATE machines SET worker = $1 WHERE id = $2")
            .bind(dest)
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        for volume in volumes {
            sqlx::query("DELETE FROM volume_snapshots WHERE volume_id = $1")
                .bind(volume)
                .execute(&mut *transaction)
                .await?;
        }
        crate::store::ControlStore::move_volumes(&mut transaction, volumes, dest).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// The index rows and last known JSON of the volumes a Machine of a lost worker
    /// mounts. A volume never seen whole here (made before its JSON was kept) is refused:
    /// its name and flags would be guessed.
    async fn lost_volumes(
        &self,
        app: &str,
        mounts: &[berth_api::MachineMount],
    ) -> Result<Vec<(crate::store::VolumeIndexRow, berth_api::Volume)>, ApiError> {
        let mut volumes = Vec::new();
        for (index, mount) in mounts.iter().enumerate() {
            let Some(row) = self.store.volume(app, &mount.volume).await? else {
                let mut error = ApiError::new(
                    StatusCode::NOT_FOUND,
                    "volume_not_found",
                    format!("volume {} not found", mount.volume),
                );
                error.body.field = Some(format!("config.mounts[{index}].volume"));
                return Err(error);
            };
            let known = self
                .store
                .volume_last_json(&row.id)
                .await?
                .and_then(|json| serde_json::from_str::<berth_api::Volume>(&json).ok())
                .ok_or_else(|| {
                    let mut error = ApiError::new(
                        StatusCode::CONFLICT,
                        "config_unknown",
                        format!(
                            "the control plane never kept volume {}'s name and settings, so it cannot make it again",
                            row.id
                        ),
                    );
                    error.body.field = Some(format!("config.mounts[{index}].volume"));
                    error
                })?;
            volumes.push((row, known));
        }
        Ok(volumes)
    }
}

/// 503 `insufficient_capacity`: `worker` is the cluster's only one, so `what` has nowhere
/// to go until another joins.
fn no_other_worker(worker: &str, what: &str) -> ApiError {
    let mut error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "insufficient_capacity",
        format!("no worker but {worker} is in the cluster to take {what}"),
    );
    error.body.retry_after_ms = Some(5000);
    error
}

/// Tells a failed move's caller where its Machine is now: still on the source, and
/// running again there if the move had stopped it.
fn say_rolled_back(error: &mut ApiError, moving: &MoveRow, source_answer: &MigrationAnswer) {
    let restarted = if source_answer.running {
        " and runs again there"
    } else {
        ""
    };
    error.body.message = format!(
        "{}; the move was rolled back: machine {} stays on worker {}{restarted}",
        error.body.message, moving.machine_id, moving.source
    );
    error.body.worker = Some(moving.source.clone());
    if let Some(machine) = &source_answer.machine {
        error.body.state = Some(machine.state);
    }
}

/// Settles unfinished moves now and then, for as long as the control plane lives.
pub(crate) fn spawn_settling(control: &Arc<ControlPlane>) {
    let weak = Arc::downgrade(control);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SETTLE_EVERY);
        loop {
            tick.tick().await;
            let Some(control) = weak.upgrade() else {
                return;
            };
            control.settle_moves().await;
            control.resume_drains().await;
        }
    });
}

#[derive(Debug, Default)]
struct Copied {
    passes: u32,
    file_bytes: u64,
    stream_bytes: u64,
}

impl Copied {
    fn add(&mut self, answer: &MigrationAnswer) {
        self.passes += 1;
        self.file_bytes += answer.file_bytes;
        self.stream_bytes += answer.stream_bytes;
    }
}
