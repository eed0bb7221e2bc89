//! `GET /v1/workers/{name}/doctor` and `POST /v1/workers/{name}/doctor/repair`: a
//! worker's records against its host (admin only, like every worker route).

use axum::extract::{Path as UrlPath, State};
use axum::Json;
use berth_api::DoctorReport;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::{ControlPlane, Shared};

impl ControlPlane {
    /// Asks a worker to compare its records with its host, and to repair what differs if
    /// `repair`.
    async fn doctor(
        &self,
        principal: &Principal,
        name: &str,
        repair: bool,
    ) -> Result<Json<DoctorReport>, ApiError> {
        principal.require_admin()?;
        let Some(worker) = self.workers.service(name) else {
            return Err(ApiError::not_found(format!("worker {name:?}")));
        };
        Ok(Json(worker.doctor(repair).await?))
    }
}

/// Every difference between the worker's records and its host; `findings` is empty when
/// they agree.
#[utoipa::path(get, path = "/workers/{name}/doctor", tag = "workers", params(("name" = String, Path)),
    responses((status = 200, body = DoctorReport), (status = "default", body = berth_api::ErrorBody)))]
pub(crate) async fn check(
    State(control): State<Shared>,
    principal: Principal,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<DoctorReport>, ApiError> {
    control.doctor(&principal, &name, false).await
}

/// Checks, then removes orphans and records Machines found dead as stopped. Findings it
/// fixed have `repaired: true`.
#[utoipa::path(post, path = "/workers/{name}/doctor/repair", tag = "workers", params(("name" = String, Path)),
    responses((status = 200, body = DoctorReport), (status = "default", body = berth_api::ErrorBody)))]
pub(crate) async fn repair(
    State(control): State<Shared>,
    principal: Principal,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<DoctorReport>, ApiError> {
    control.doctor(&principal, &name, true).await
}
