//! Draining a worker: cordon it, then move every Machine it holds elsewhere, a few at a
//! time. A Machine that cannot move stays where it is and is listed with the error it met.
//!
//! The progress is a row of `drains`, so every replica shows the same one and a second
//! drain of the worker is refused whichever replica it reaches. The row names the replica
//! running the drain; once that replica is no longer live, the settling loop of another
//! takes the drain over and goes on with the Machines still on the worker.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::Json;
use berth_api::{
    DrainFailure, DrainProgress, DrainState, DrainVolumes, MigrateMachineRequest, Worker,
};
use futures::StreamExt;
use sqlx::Row;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::replicas::{not_live, Replicas};
use crate::store::{MachineIndexRow, VolumeIndexRow};
use crate::{format_ms, now_ms, ControlPlane, Shared};

/// Moves at once during a drain: each is disk- and network-bound on two workers.
const DRAIN_CONCURRENCY: usize = 4;

pub(crate) const SCHEMA: &[&str] = &["CREATE TABLE IF NOT EXISTS drains (
        worker TEXT PRIMARY KEY NOT NULL,
        replica TEXT,
        state TEXT NOT NULL,
        progress TEXT NOT NULL
    )"];

const DRAINING: &str = "draining";

/// The drains this replica runs. Each update changes the copy here and writes it whole to
/// the row under the same lock, so rows are written in the order of the changes.
#[derive(Default)]
pub(crate) struct Drains {
    running: tokio::sync::Mutex<HashMap<String, DrainProgress>>,
}

fn state_text(state: DrainState) -> &'static str {
    match state {
        DrainState::Draining => DRAINING,
        DrainState::Drained => "drained",
        DrainState::Incomplete => "incomplete",
    }
}

fn progress_of(row: &sqlx::any::AnyRow) -> Option<DrainProgress> {
    let text: String = row.try_get("progress").ok()?;
    serde_json::from_str(&text).ok()
}

#[utoipa::path(get, path = "/workers/{name}", tag = "workers", params(("name" = String, Path)),
    responses((status = 200, body = Worker, description = "the worker, with its drain's progress if it was drained"),
              (status = "default", body = berth_api::ErrorBody)))]
pub(crate) async fn get_worker(
    State(control): State<Shared>,
    principal: Principal,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Worker>, ApiError> {
    principal.require_admin()?;
    control.worker_view(&name).await.map(Json)
}

#[utoipa::path(post, path = "/workers/{name}/drain", tag = "workers", params(("name" = String, Path)),
    responses((status = 202, body = Worker, description = "cordoned; its Machines are moving away. `GET /v1/workers/{name}` shows the progress"),
              (status = 409, body = berth_api::ErrorBody, description = "`drain_running`: a drain of it already runs"),
              (status = "default", body = berth_api::ErrorBody)))]
pub(crate) async fn drain_worker(
    State(control): State<Shared>,
    principal: Principal,
    UrlPath(name): UrlPath<String>,
) -> Result<(StatusCode, Json<Worker>), ApiError> {
    principal.require_admin()?;
    control.set_worker_cordon(&name, true).await?;
    let machines = control.store.machines_on(&name).await?;
    if !control.begin_drain(&name, machines.len() as u64).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "drain_running",
            format!("worker {name} is already being drained"),
        ));
    }
    let draining = control.clone();
    let worker = name.clone();
    tokio::spawn(async move { draining.drain(&worker, machines).await });
    Ok((
        StatusCode::ACCEPTED,
        Json(control.worker_view(&name).await?),
    ))
}

impl ControlPlane {
    /// The worker as the API shows it, with its drain.
    pub(crate) async fn worker_view(&self, name: &str) -> Result<Worker, ApiError> {
        let mut worker = self
            .workers
            .view(name)
            .ok_or_else(|| ApiError::not_found(format!("worker {name:?}")))?;
        worker.drain = self.drain_of(name).await?;
        Ok(worker)
    }

    /// The last drain of `worker`, as recorded.
    async fn drain_of(&self, worker: &str) -> Result<Option<DrainProgress>, ApiError> {
        let row = sqlx::query("SELECT progress FROM drains WHERE worker = $1")
            .bind(worker)
            .fetch_optional(self.store.pool())
            .await?;
        Ok(row.as_ref().and_then(progress_of))
    }

    /// The last drain of every worker that was drained.
    pub(crate) async fn drains(&self) -> Result<HashMap<String, DrainProgress>, ApiError> {
        let rows = sqlx::query("SELECT worker, progress FROM drains")
            .fetch_all(self.store.pool())
            .await?;
        Ok(rows
            .iter()
            .filter_map(|row| Some((row.try_get("worker").ok()?, progress_of(row)?)))
            .collect())
    }

    /// Records a new drain of `worker` for this replica; `false` when one already runs
    /// on a live replica. One statement, so two replicas never both begin one.
    async fn begin_drain(&self, worker: &str, total: u64) -> Result<bool, ApiError> {
        let progress = DrainProgress {
            state: DrainState::Draining,
            started_at: format_ms(now_ms()),
            finished_at: None,
            total,
            left: total,
            moving: 0,
            moved: 0,
            failed: Vec::new(),
            volumes: DrainVolumes::default(),
        };
        let mut running = self.drains.running.lock().await;
        let begun = sqlx::query(&format!(
            "INSERT INTO drains (worker, replica, state, progress) VALUES ($1, $2, $3, $4)
             ON CONFLICT (worker) DO UPDATE SET replica = excluded.replica,
                 state = excluded.state, progress = excluded.progress
             WHERE drains.state <> $3 OR {}",
            not_live("drains.replica", 5)
        ))
        .bind(worker)
        .bind(self.replicas.id())
        .bind(DRAINING)
        .bind(serde_json::to_string(&progress).unwrap_or_default())
        .bind(Replicas::cutoff())
        .execute(self.store.pool())
        .await?;
        if begun.rows_affected() != 1 {
            return Ok(false);
        }
        running.insert(worker.to_owned(), progress);
        Ok(true)
    }

    /// Changes this replica's drain of `worker` and records it. A write the store refuses
    /// is logged: the next change writes the whole progress again.
    async fn update_drain(&self, worker: &str, change: impl FnOnce(&mut DrainProgress)) {
        let mut running = self.drains.running.lock().await;
        let Some(progress) = running.get_mut(worker) else {
            return;
        };
        change(progress);
        let written = sqlx::query(
            "UPDATE drains SET state = $1, progress = $2 WHERE worker = $3 AND replica = $4",
        )
        .bind(state_text(progress.state))
        .bind(serde_json::to_string(&*progress).unwrap_or_default())
        .bind(worker)
        .bind(self.replicas.id())
        .execute(self.store.pool())
        .await;
        if let Err(error) = written {
            tracing::warn!(%worker, %error, "recording a drain's progress");
        }
        if progress.state != DrainState::Draining {
            running.remove(worker);
        }
    }

    /// Takes over the drains whose replica is no longer live, and goes on with each from
    /// the Machines still on its worker. Called by the settling loop, after the dead
    /// replica's moves were settled.
    pub(crate) async fn resume_drains(self: &Arc<Self>) {
        let rows = match sqlx::query(&format!(
            "SELECT worker, progress FROM drains WHERE state = $1 AND {}",
            not_live("replica", 2)
        ))
        .bind(DRAINING)
        .bind(Replicas::cutoff())
        .fetch_all(self.store.pool())
        .await
        {
            Ok(rows) => rows,
            Err(error) => {
                tracing::warn!(%error, "reading drains to take over");
                return;
            }
        };
        for row in rows {
            let (Ok(worker), Some(progress)) =
                (row.try_get::<String, _>("worker"), progress_of(&row))
            else {
                continue;
            };
            if let Err(error) = self.clone().resume_drain(&worker, progress).await {
                tracing::warn!(%worker, error = %error.body.message, "taking over a drain");
            }
        }
    }

    async fn resume_drain(
        self: Arc<Self>,
        worker: &str,
        mut progress: DrainProgress,
    ) -> Result<(), ApiError> {
        let machines = self.store.machines_on(worker).await?;
        // The dead replica's moves were settled: each Machine is on one worker or the
        // other. What is still here is left to do.
        progress.moving = 0;
        progress.left = machines.len() as u64;
        let mut running = self.drains.running.lock().await;
        let taken = sqlx::query(&format!(
            "UPDATE drains SET replica = $1, progress = $2 WHERE worker = $3 AND state = $4
             AND {}",
            not_live("replica", 5)
        ))
        .bind(self.replicas.id())
        .bind(serde_json::to_string(&progress).unwrap_or_default())
        .bind(worker)
        .bind(DRAINING)
        .bind(Replicas::cutoff())
        .execute(self.store.pool())
        .await?;
        if taken.rows_affected() != 1 {
            return Ok(());
        }
        running.insert(worker.to_owned(), progress);
        drop(running);
        tracing::info!(%worker, left = machines.len(), "took over the drain of a replica that is gone");
        let draining = self.clone();
        let worker = worker.to_owned();
        tokio::spawn(async move { draining.drain(&worker, machines).await });
        Ok(())
    }

    async fn drain(self: Arc<Self>, worker: &str, machines: Vec<MachineIndexRow>) {
        let moves = futures::stream::iter(machines)
            .map(|row| {
                let control = self.clone();
                async move {
                    control
                        .update_drain(worker, |progress| {
                            progress.left = progress.left.saturating_sub(1);
                            progress.moving += 1;
                        })
                        .await;
                    let moved = control.drain_one(worker, &row).await;
                    control
                        .update_drain(worker, |progress| {
                            progress.moving = progress.moving.saturating_sub(1);
                            match moved {
                                Ok(()) => progress.moved += 1,
                                Err(error) => progress.failed.push(DrainFailure {
                                    machine: row.id.clone(),
                                    volume: None,
                                    app: row.app.clone(),
                                    error: error.body.error.clone(),
                                    message: error.body.message.clone(),
                                }),
                            }
                        })
                        .await;
                }
            })
            .buffer_unordered(DRAIN_CONCURRENCY);
        moves.collect::<Vec<()>>().await;
        // Then what the Machines did not take along: volumes no Machine holds.
        self.drain_volumes(worker).await;
        // Done when the worker holds nothing: a Machine made there before the cordon took
        // effect would still be on it.
        let remaining = match (
            self.store.machines_on(worker).await,
            self.volumes_on(worker).await,
        ) {
            (Ok(machines), Ok(volumes)) => machines.len() + volumes.len(),
            _ => usize::MAX,
        };
        self.update_drain(worker, |progress| {
            progress.state = if remaining == 0 {
                DrainState::Drained
            } else {
                DrainState::Incomplete
            };
            progress.finished_at = Some(format_ms(now_ms()));
        })
        .await;
        tracing::info!(%worker, remaining, "drain ended");
    }
    /// Moves every volume still on `worker` away, each on its own, a few at a time.
    async fn drain_volumes(self: &Arc<Self>, worker: &str) {
        let volumes = match self.volumes_on(worker).await {
            Ok(volumes) => volumes,
            Err(error) => {
                tracing::warn!(%worker, error = %error.body.message, "listing a drained worker's volumes");
                return;
            }
        };
        // A drain taken over from a replica that is gone counts what that one moved.
        self.update_drain(worker, |progress| {
            progress.volumes.total = progress.volumes.moved + volumes.len() as u64;
            progress.volumes.left = volumes.len() as u64;
            progress.volumes.moving = 0;
        })
        .await;
        let moves = futures::stream::iter(volumes)
            .map(|row| {
                let control = self.clone();
                async move {
                    control
                        .update_drain(worker, |progress| {
                            progress.volumes.left = progress.volumes.left.saturating_sub(1);
                            progress.volumes.moving += 1;
                        })
                        .await;
                    let moved = control.migrate_lone_volume(&row).await;
                    control
                        .update_drain(worker, |progress| {
                            progress.volumes.moving = progress.volumes.moving.saturating_sub(1);
                            match moved {
                                Ok(()) => progress.volumes.moved += 1,
                                Err(error) => progress.failed.push(DrainFailure {
                                    machine: String::new(),
                                    volume: Some(row.id.clone()),
                                    app: row.app.clone(),
                                    error: error.body.error.clone(),
                                    message: error.body.message.clone(),
                                }),
                            }
                        })
                        .await;
                }
            })
            .buffer_unordered(DRAIN_CONCURRENCY);
        moves.collect::<Vec<()>>().await;
    }

    /// The volumes the index places on `worker`.
    async fn volumes_on(&self, worker: &str) -> Result<Vec<VolumeIndexRow>, ApiError> {
        let rows = sqlx::query(
            "SELECT id, app, worker, size_gb FROM volumes WHERE worker = $1 ORDER BY id",
        )
        .bind(worker)
        .fetch_all(self.store.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|row| VolumeIndexRow {
                id: row.get(0),
                app: row.get(1),
                worker: row.get(2),
                size_gb: u32::try_from(row.get::<i64, _>(3)).unwrap_or(0),
            })
            .collect())
    }

    /// Moves one Machine away; a Machine destroyed meanwhile counts as moved.
    async fn drain_one(&self, worker: &str, row: &MachineIndexRow) -> Result<(), ApiError> {
        self.moves.settled(&row.id).await?;
        let (Some(app), Some(row)) = (
            self.store.app(&row.app).await?,
            self.store.machine(&row.app, &row.id).await?,
        ) else {
            return Ok(());
        };
        if row.worker != worker {
            return Ok(());
        }
        match self
            .migrate_admitted(&app, &row, MigrateMachineRequest::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(error) if error.status == StatusCode::NOT_FOUND => Ok(()),
            Err(error) => Err(error),
        }
    }
}
