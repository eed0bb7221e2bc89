//! `/v1/apps/{app}/volumes`: Fly's volumes API. The worker that holds a volume has its
//! record; this plane keeps which worker that is, places new volumes, and pins a Machine
//! that mounts one to the volume's worker.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use berth_api::{
    CreateVolumeRequest, ErrorBody, ExtendVolumeRequest, ExtendVolumeResponse, MachineMount,
    UpdateVolumeRequest, Volume, VolumeSnapshot, DEFAULT_VOLUME_SIZE_GB,
};
use berth_core::ids;
use berth_core::placement::PlacementRequest;
use berth_worker::{CreateVolumeOnWorker, WorkerError};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath, ApiQuery, OptionalJson};
use crate::limits::{self, Action};
use crate::store::{Backend, ControlStore, VolumeIndexRow};
use crate::{ControlPlane, Shared};

#[utoipa::path(post, path = "/apps/{app}/volumes", tag = "volumes",
    params(("app" = String, Path),
           ("berth-strict" = Option<bool>, Header, description = "true: refuse unknown body fields (400) instead of ignoring them and listing them in `warnings`")),
    request_body = CreateVolumeRequest,
    responses((status = 200, body = Volume),
              (status = 404, body = ErrorBody, description = "`volume_not_found` (field `source_volume_id`), `snapshot_not_found`"),
              (status = 422, body = ErrorBody, description = "`unsupported`: raw volumes"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn create_volume(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath(app): ApiPath<String>,
    ApiJson(request): ApiJson<CreateVolumeRequest>,
) -> Result<Json<Volume>, ApiError> {
    control
        .create_volume(&principal, &app, request)
        .await
        .map(Json)
}

#[utoipa::path(get, path = "/apps/{app}/volumes", tag = "volumes",
    params(("app" = String, Path)),
    responses((status = 200, body = Vec<Volume>), (status = "default", body = ErrorBody)))]
pub(crate) async fn list_volumes(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath(app): ApiPath<String>,
) -> Result<Json<Vec<Volume>>, ApiError> {
    control.list_volumes(&principal, &app).await.map(Json)
}

#[utoipa::path(get, path = "/apps/{app}/volumes/{volume_id}", tag = "volumes",
    params(("app" = String, Path), ("volume_id" = String, Path)),
    responses((status = 200, body = Volume), (status = "default", body = ErrorBody)))]
pub(crate) async fn get_volume(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath((app, id)): ApiPath<(String, String)>,
) -> Result<Json<Volume>, ApiError> {
    let (row, worker) = control.volume(&principal, &app, &id, Action::Read).await?;
    Ok(Json(worker.volume_get(&row.id).await?))
}

#[utoipa::path(put, path = "/apps/{app}/volumes/{volume_id}", tag = "volumes",
    params(("app" = String, Path), ("volume_id" = String, Path),
           ("berth-strict" = Option<bool>, Header, description = "true: refuse unknown body fields (400) instead of ignoring them and listing them in `warnings`")),
    request_body = UpdateVolumeRequest,
    responses((status = 200, body = Volume), (status = "default", body = ErrorBody)))]
pub(crate) async fn update_volume(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath((app, id)): ApiPath<(String, String)>,
    OptionalJson(request): OptionalJson<UpdateVolumeRequest>,
) -> Result<Json<Volume>, ApiError> {
    let (row, worker) = control
        .volume(&principal, &app, &id, Action::Update)
        .await?;
    let volume = worker.volume_update(&row.id, request).await?;
    control.remember_volume(&volume).await;
    Ok(Json(volume))
}

#[utoipa::path(delete, path = "/apps/{app}/volumes/{volume_id}", tag = "volumes",
    params(("app" = String, Path), ("volume_id" = String, Path), DeleteVolumeQuery),
    responses((status = 200, body = Volume, description = "the volume, `destroyed`"),
              (status = 409, body = ErrorBody, description = "`volume_attached`: a Machine holds it; destroy the Machine first. `worker_available`: with `lose_state`, its worker answers"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn delete_volume(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath((app, id)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<DeleteVolumeQuery>,
) -> Result<Json<Volume>, ApiError> {
    let (row, worker) = control
        .volume(&principal, &app, &id, Action::Destroy)
        .await?;
    if query.lose_state {
        return control.forget_lost_volume(&principal, &row).await.map(Json);
    }
    let deleted = worker.volume_delete(&row.id).await?;
    control.store.delete_volume(&row.id).await?;
    Ok(Json(deleted))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct DeleteVolumeQuery {
    /// Admin: forget a volume whose worker is unavailable (its data and snapshots are
    /// lost with it). Its copy there is deleted if the worker comes back.
    #[serde(default)]
    lose_state: bool,
}

#[utoipa::path(put, path = "/apps/{app}/volumes/{volume_id}/extend", tag = "volumes",
    params(("app" = String, Path), ("volume_id" = String, Path),
           ("berth-strict" = Option<bool>, Header, description = "true: refuse unknown body fields (400) instead of ignoring them and listing them in `warnings`")),
    request_body = ExtendVolumeRequest,
    responses((status = 200, body = ExtendVolumeResponse), (status = "default", body = ErrorBody)))]
pub(crate) async fn extend_volume(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath((app, id)): ApiPath<(String, String)>,
    ApiJson(request): ApiJson<ExtendVolumeRequest>,
) -> Result<Json<ExtendVolumeResponse>, ApiError> {
    let (row, worker) = control
        .volume(&principal, &app, &id, Action::Update)
        .await?;
    let volume = control
        .extend_within_quota(&app, &row, worker.as_ref(), request.size_gb)
        .await?;
    Ok(Json(ExtendVolumeResponse {
        volume,
        needs_restart: false,
    }))
}

#[utoipa::path(get, path = "/apps/{app}/volumes/{volume_id}/snapshots", tag = "volumes",
    params(("app" = String, Path), ("volume_id" = String, Path)),
    responses((status = 200, body = Vec<VolumeSnapshot>), (status = "default", body = ErrorBody)))]
pub(crate) async fn list_snapshots(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath((app, id)): ApiPath<(String, String)>,
) -> Result<Json<Vec<VolumeSnapshot>>, ApiError> {
    let (row, worker) = control.volume(&principal, &app, &id, Action::Read).await?;
    Ok(Json(worker.volume_snapshots(&row.id).await?))
}

#[utoipa::path(post, path = "/apps/{app}/volumes/{volume_id}/snapshots", tag = "volumes",
    params(("app" = String, Path), ("volume_id" = String, Path)),
    responses((status = 200, body = VolumeSnapshot, description = "the snapshot, taken while the filesystem was frozen"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn create_snapshot(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath((app, id)): ApiPath<(String, String)>,
) -> Result<Json<VolumeSnapshot>, ApiError> {
    let (row, worker) = control
        .volume(&principal, &app, &id, Action::Update)
        .await?;
    let snapshot = worker.volume_snapshot(&row.id).await?;
    control
        .store
        .insert_snapshot(&snapshot.id, &row.id, &row.worker)
        .await?;
    Ok(Json(snapshot))
}

fn volume_not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "volume_not_found",
        format!("volume {id} not found"),
    )
}

/// An org's volume quotas, held for one check and the write it admits: this process's
/// lock of the org, and on PostgreSQL also a transaction holding the org's advisory lock,
/// so that no two replicas can both take the last of the quota.
struct VolumeQuotaLock {
    _local: tokio::sync::OwnedMutexGuard<()>,
    held: Held,
}

enum Held {
    /// SQLite: one process, whose lock is enough; each statement commits on its own.
    Connection(sqlx::pool::PoolConnection<sqlx::Any>),
    Transaction(sqlx::Transaction<'static, sqlx::Any>),
}

impl VolumeQuotaLock {
    fn connection(&mut self) -> &mut sqlx::AnyConnection {
        match &mut self.held {
            Held::Connection(connection) => connection,
            Held::Transaction(transaction) => transaction,
        }
    }

    /// Keeps what was written under the lock and lets the lock go.
    async fn release(self) -> Result<(), sqlx::Error> {
        match self.held {
            Held::Connection(_) => Ok(()),
            Held::Transaction(transaction) => transaction.commit().await,
        }
    }
}

impl ControlPlane {
    /// Takes `org`'s volume quota lock. Its own advisory key: volume quotas do not
    /// contend with the starts of the org (`berth-org:`).
    async fn lock_volume_quota(&self, org: &str) -> Result<VolumeQuotaLock, ApiError> {
        // The process's lock first: a replica's own creates queue here, not on pool
        // connections blocked in the database.
        let local = self.lock_org(org).await;
        let held = match self.store.backend() {
            Backend::Sqlite => Held::Connection(self.store.pool().acquire().await?),
            Backend::Postgres => {
                let mut transaction = self.store.pool().begin().await?;
                sqlx::query(
                    "SELECT 1 FROM (SELECT pg_advisory_xact_lock(hashtextextended('berth-org-volumes:' || $1, 0))) AS locked",
                )
                .bind(org)
                .execute(&mut *transaction)
                .await?;
                Held::Transaction(transaction)
            }
        };
        Ok(VolumeQuotaLock {
            _local: local,
            held,
        })
    }

    /// The app's volume and its worker, after the app's access and rate checks.
    async fn volume(
        &self,
        principal: &Principal,
        app: &str,
        id: &str,
        action: Action,
    ) -> Result<
        (
            VolumeIndexRow,
            std::sync::Arc<dyn berth_worker::WorkerService>,
        ),
        ApiError,
    > {
        self.app(principal, app).await?;
        self.check_rate(principal, action, None).await?;
        if !ids::has_id_shape(id, "vol_") {
            return Err(volume_not_found(id));
        }
        let row = self
            .store
            .volume(app, id)
            .await?
            .ok_or_else(|| volume_not_found(id))?;
        let worker = self.worker(&row.worker)?;
        Ok((row, worker))
    }

    async fn create_volume(
        &self,
        principal: &Principal,
        app: &str,
        request: CreateVolumeRequest,
    ) -> Result<Volume, ApiError> {
        let org = self.app(principal, app).await?.org_slug;
        self.check_rate(principal, Action::Create, None).await?;
        let mut size_gb = request.size_gb.unwrap_or(DEFAULT_VOLUME_SIZE_GB);
        // A fork (Fly's `source_volume_id`): on the source's worker, at least its size.
        let forked = match &request.source_volume_id {
            Some(source) => {
                let row = match ids::has_id_shape(source, "vol_") {
                    true => self.store.volume(app, source).await?,
                    false => None,
                };
                let row = row.ok_or_else(|| {
                    let mut error = volume_not_found(source);
                    error.body.field = Some("source_volume_id".into());
                    error
                })?;
                size_gb = request.size_gb.unwrap_or(0).max(row.size_gb);
                Some(row.worker)
            }
            None => None,
        };
        // From a snapshot: on the snapshot's worker, where its image is.
        let pinned = match &request.snapshot_id {
            _ if forked.is_some() => forked,
            Some(snapshot) => Some(
                self.store
                    .snapshot(app, snapshot)
                    .await?
                    .ok_or_else(|| {
                        let mut error = ApiError::new(
                            StatusCode::NOT_FOUND,
                            "snapshot_not_found",
                            format!("snapshot {snapshot} not found in app {app}"),
                        );
                        error.body.field = Some("snapshot_id".into());
                        error
                    })?
                    .worker,
            ),
            None => None,
        };
        let worker_name = self
            .place(&PlacementRequest {
                // fly-go always sends the field; empty is no region asked for.
                region: request.region.clone().filter(|region| !region.is_empty()),
                worker: pinned,
                cpus: 0,
                memory_mb: 0,
                disk_mb: u64::from(size_gb) * 1024,
                runtime: None,
            })
            .await?;
        let id = ids::new_volume_id();
        let row = VolumeIndexRow {
            id: id.clone(),
            app: app.to_owned(),
            worker: worker_name.clone(),
            size_gb,
        };
        {
            // The count and the insert happen under the org's lock, on every replica: no
            // two creates can both take the last of the quota.
            let quotas = self.limits_of(&org).quotas;
            let mut lock = self.lock_volume_quota(&org).await?;
            let (volumes, volume_gb) =
                ControlStore::org_volume_totals_on(lock.connection(), &org).await?;
            if volumes >= quotas.max_volumes {
                return Err(limits::exceeded("max_volumes", quotas.max_volumes, volumes));
            }
            if volume_gb.saturating_add(u64::from(size_gb)) > quotas.max_volume_gb {
                return Err(limits::exceeded(
                    "max_volume_gb",
                    quotas.max_volume_gb,
                    volume_gb,
                ));
            }
            // Indexed first: a create whose answer is lost still has its volume found.
            ControlStore::insert_volume_on(lock.connection(), &row).await?;
            lock.release().await?;
        }
        // Billed to the org from the worker's first journal entry of it.
        crate::usage::record_owner(self.store.pool(), &id, app, &org).await?;
        let created = self
            .worker(&worker_name)?
            .volume_create(CreateVolumeOnWorker {
                id: id.clone(),
                app: app.to_owned(),
                request,
            })
            .await;
        match created {
            Ok(volume) => {
                if volume.size_gb != size_gb {
                    self.store.set_volume_size(&id, volume.size_gb).await?;
                }
                self.remember_volume(&volume).await;
                Ok(volume)
            }
            Err(error) => {
                // The worker made nothing unless it is unreachable (then recovery on it
                // removes an unfinished create, and its row here answers 503 meanwhile).
                if !matches!(error, WorkerError::Unavailable { .. }) {
                    self.store.delete_volume(&id).await?;
                }
                Err(error.into())
            }
        }
    }

    async fn list_volumes(
        &self,
        principal: &Principal,
        app: &str,
    ) -> Result<Vec<Volume>, ApiError> {
        self.app(principal, app).await?;
        self.check_rate(principal, Action::Read, None).await?;
        let rows = self.store.volumes(app).await?;
        let mut workers: Vec<&str> = rows.iter().map(|row| row.worker.as_str()).collect();
        workers.sort_unstable();
        workers.dedup();
        let mut volumes = Vec::with_capacity(rows.len());
        for worker in workers {
            // A volume is the worker's the index names: a moved volume's old copy, until
            // the source removes it, is not listed twice.
            volumes.extend(
                self.worker(worker)?
                    .volume_list(app)
                    .await?
                    .into_iter()
                    .filter(|volume| {
                        rows.iter()
                            .any(|row| row.id == volume.id && row.worker == worker)
                    }),
            );
        }
        volumes.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(volumes)
    }

    /// Grows the volume on its worker, with the growth reserved in the org's
    /// `max_volume_gb` under the org's lock first.
    async fn extend_within_quota(
        &self,
        app: &str,
        row: &VolumeIndexRow,
        worker: &dyn berth_worker::WorkerService,
        size_gb: u32,
    ) -> Result<Volume, ApiError> {
        let org = self
            .store
            .app(app)
            .await?
            .map(|app| app.org_slug)
            .ok_or_else(|| ApiError::not_found(format!("app {app:?}")))?;
        let quotas = self.limits_of(&org).quotas;
        let reserved_from = {
            let mut lock = self.lock_volume_quota(&org).await?;
            // Read again under the lock: another extend may have reserved meanwhile.
            let current = ControlStore::volume_on(lock.connection(), app, &row.id)
                .await?
                .ok_or_else(|| volume_not_found(&row.id))?
                .size_gb;
            if size_gb > current {
                let (_, volume_gb) =
                    ControlStore::org_volume_totals_on(lock.connection(), &org).await?;
                let after = volume_gb.saturating_add(u64::from(size_gb - current));
                if after > quotas.max_volume_gb {
                    return Err(limits::exceeded(
                        "max_volume_gb",
                        quotas.max_volume_gb,
                        volume_gb,
                    ));
                }
                ControlStore::set_volume_size_on(lock.connection(), &row.id, size_gb).await?;
                lock.release().await?;
                Some(current)
            } else {
                // Not a growth: the worker refuses it with the reason.
                None
            }
        };
        match worker.volume_extend(&row.id, size_gb).await {
            Ok(volume) => {
                self.store.grow_volume_size(&row.id, volume.size_gb).await?;
                Ok(volume)
            }
            Err(error) => {
                // The worker did not grow it unless it is unreachable; then the
                // reservation stays until the volume is seen again.
                if let Some(old) = reserved_from {
                    if !matches!(error, WorkerError::Unavailable { .. }) {
                        self.store
                            .release_volume_size(&row.id, size_gb, old)
                            .await?;
                    }
                }
                Err(error.into())
            }
        }
    }

    /// Keeps what a recreate needs to make the volume again. A failed write is logged:
    /// the volume itself is made.
    pub(crate) async fn remember_volume(&self, volume: &Volume) {
        let remembered = match serde_json::to_string(volume) {
            Ok(json) => self.store.remember_volume(&volume.id, &json).await,
            Err(_) => Ok(()),
        };
        if let Err(error) = remembered {
            tracing::warn!(volume = %volume.id, %error, "remembering a volume");
        }
    }

    /// Forgets a volume whose worker is unavailable (admin, `lose_state`): its index row
    /// and snapshots go, and its copy there is deleted if the worker comes back. Refused
    /// while a Machine the index still has mounts it.
    async fn forget_lost_volume(
        &self,
        principal: &Principal,
        row: &VolumeIndexRow,
    ) -> Result<Volume, ApiError> {
        principal.require_admin()?;
        for machine in self.store.machines(&row.app).await? {
            let mounts = self
                .last_known
                .get(&self.store, &machine.id)
                .await?
                .and_then(|json| serde_json::from_str::<berth_api::Machine>(&json).ok())
                .is_some_and(|last| {
                    last.config
                        .mounts
                        .iter()
                        .any(|mount| mount.volume == row.id)
                });
            if mounts {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "volume_attached",
                    format!(
                        "volume {} is attached to machine {}; destroy or recreate that machine first",
                        row.id, machine.id
                    ),
                ));
            }
        }
        let known = self
            .store
            .volume_last_json(&row.id)
            .await?
            .and_then(|json| serde_json::from_str::<Volume>(&json).ok());
        self.forget_on_lost_worker(principal, &row.worker, &row.id, "volume")
            .await?;
        self.store.delete_volume(&row.id).await?;
        let mut volume = known.unwrap_or_else(|| Volume {
            id: row.id.clone(),
            name: String::new(),
            state: String::new(),
            size_gb: row.size_gb,
            region: String::new(),
            zone: row.worker.clone(),
            encrypted: false,
            attached_machine_id: None,
            attached_alloc_id: None,
            created_at: String::new(),
            host_dedication_id: String::new(),
            snapshot_retention: 0,
            auto_backup_enabled: false,
            fstype: "ext4".into(),
            block_size: 0,
            blocks: 0,
            blocks_free: 0,
            blocks_avail: 0,
            host_status: None,
        });
        volume.state = "destroyed".into();
        volume.zone = row.worker.clone();
        volume.host_status = Some("unreachable".into());
        Ok(volume)
    }

    /// App delete, after its Machines: every volume of the app goes too.
    pub(crate) async fn delete_app_volumes(&self, app: &str) -> Result<(), ApiError> {
        for row in self.store.volumes(app).await? {
            match self.worker(&row.worker)?.volume_delete(&row.id).await {
                Ok(_) => {}
                Err(error) if error.to_response().0 == 404 => {}
                Err(error) => return Err(error.into()),
            }
            self.store.delete_volume(&row.id).await?;
        }
        Ok(())
    }

    /// An update's mounts: each volume the app's, and on the Machine's worker (else 409
    /// `volume_on_other_worker`).
    pub(crate) async fn check_mounts_on(
        &self,
        app: &str,
        mounts: &[MachineMount],
        worker: &str,
    ) -> Result<(), ApiError> {
        for (field, row) in self.mounted_volumes(app, mounts).await? {
            if row.worker != worker {
                let mut error = ApiError::new(
                    StatusCode::CONFLICT,
                    "volume_on_other_worker",
                    format!(
                        "volume {} is on worker {}, and the machine on {worker}; mount a volume on {worker}, or create a machine with this one",
                        row.id, row.worker
                    ),
                );
                error.body.field = Some(field);
                return Err(error);
            }
        }
        Ok(())
    }

    /// The index row of each mounted volume, with the field that names it; 404
    /// `volume_not_found` (with that field) for one the app does not have.
    async fn mounted_volumes(
        &self,
        app: &str,
        mounts: &[MachineMount],
    ) -> Result<Vec<(String, VolumeIndexRow)>, ApiError> {
        let mut rows = Vec::with_capacity(mounts.len());
        for (index, mount) in mounts.iter().enumerate() {
            let field = format!("config.mounts[{index}].volume");
            let row = match ids::has_id_shape(&mount.volume, "vol_") {
                true => self.store.volume(app, &mount.volume).await?,
                false => None,
            };
            let Some(row) = row else {
                let mut error = volume_not_found(&mount.volume);
                error.body.field = Some(field);
                return Err(error);
            };
            rows.push((field, row));
        }
        Ok(rows)
    }

    /// Where a Machine with these mounts must live: the worker of its volumes (all on one),
    /// or anywhere when it mounts none.
    pub(crate) async fn volumes_worker(
        &self,
        app: &str,
        mounts: &[MachineMount],
    ) -> Result<Option<String>, ApiError> {
        let mut worker: Option<String> = None;
        for (field, row) in self.mounted_volumes(app, mounts).await? {
            match &worker {
                Some(first) if *first != row.worker => {
                    return Err(ApiError::invalid_config(
                        field,
                        "every volume of a machine must be on one worker",
                    ))
                }
                _ => worker = Some(row.worker),
            }
        }
        Ok(worker)
    }
}
