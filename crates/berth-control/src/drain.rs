//! Draining a worker: cordon it, then move every Machine it holds elsewhere, a few at a
//! time. Progress is kept in memory and shown on the worker; a Machine that cannot move
//! stays where it is and is listed with the error it met.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::Json;
use berth_api::{DrainFailure, DrainProgress, DrainState, MigrateMachineRequest, Worker};
use futures::StreamExt;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::store::MachineIndexRow;
use crate::{format_ms, now_ms, ControlPlane, Shared};

/// Moves at once during a drain: each is disk- and network-bound on two workers.
const DRAIN_CONCURRENCY: usize = 4;

/// The last drain of each worker.
#[derive(Default)]
pub(crate) struct Drains {
    by_worker: StdMutex<HashMap<String, DrainProgress>>,
}

impl Drains {
    pub(crate) fn get(&self, worker: &str) -> Option<DrainProgress> {
        self.by_worker
            .lock()
            .ok()
            .and_then(|map| map.get(worker).cloned())
    }

    fn update(&self, worker: &str, change: impl FnOnce(&mut DrainProgress)) {
        if let Ok(mut map) = self.by_worker.lock() {
            if let Some(progress) = map.get_mut(worker) {
                change(progress);
            }
        }
    }

    /// Starts tracking a drain; `false` when one already runs.
    fn begin(&self, worker: &str, total: u64) -> bool {
        let Ok(mut map) = self.by_worker.lock() else {
            return false;
        };
        if map
            .get(worker)
            .is_some_and(|progress| progress.state == DrainState::Draining)
        {
            return false;
        }
        map.insert(
            worker.to_owned(),
            DrainProgress {
                state: DrainState::Draining,
                started_at: format_ms(now_ms()),
                finished_at: None,
                total,
                left: total,
                moving: 0,
                moved: 0,
                failed: Vec::new(),
            },
        );
        true
    }
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
    control.worker_view(&name).map(Json)
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
    if !control.drains.begin(&name, machines.len() as u64) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "drain_running",
            format!("worker {name} is already being drained"),
        ));
    }
    let draining = control.clone();
    let worker = name.clone();
    tokio::spawn(async move { draining.drain(&worker, machines).await });
    Ok((StatusCode::ACCEPTED, Json(control.worker_view(&name)?)))
}

impl ControlPlane {
    /// The worker as the API shows it, with its drain.
    pub(crate) fn worker_view(&self, name: &str) -> Result<Worker, ApiError> {
        let mut worker = self
            .workers
            .view(name)
            .ok_or_else(|| ApiError::not_found(format!("worker {name:?}")))?;
        worker.drain = self.drains.get(name);
        Ok(worker)
    }

    async fn drain(self: Arc<Self>, worker: &str, machines: Vec<MachineIndexRow>) {
        let moves = futures::stream::iter(machines)
            .map(|row| {
                let control = self.clone();
                async move {
                    control.drains.update(worker, |progress| {
                        progress.left -= 1;
                        progress.moving += 1;
                    });
                    let moved = control.drain_one(worker, &row).await;
                    control.drains.update(worker, |progress| {
                        progress.moving -= 1;
                        match moved {
                            Ok(()) => progress.moved += 1,
                            Err(error) => progress.failed.push(DrainFailure {
                                machine: row.id.clone(),
                                app: row.app.clone(),
                                error: error.body.error.clone(),
                                message: error.body.message.clone(),
                            }),
                        }
                    });
                }
            })
            .buffer_unordered(DRAIN_CONCURRENCY);
        moves.collect::<Vec<()>>().await;
        // Done when the worker holds nothing: a Machine made there before the cordon took
        // effect would still be on it.
        let remaining = self
            .store
            .machines_on(worker)
            .await
            .map(|rows| rows.len())
            .unwrap_or(usize::MAX);
        self.drains.update(worker, |progress| {
            progress.state = if remaining == 0 {
                DrainState::Drained
            } else {
                DrainState::Incomplete
            };
            progress.finished_at = Some(format_ms(now_ms()));
        });
        tracing::info!(%worker, remaining, "drain ended");
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
