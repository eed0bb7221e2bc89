//! `/v1/apps`: apps group Machines and belong to an org.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use berth_api::{App, AppOrganization, CreateAppRequest, ErrorBody, ListAppsResponse};
use berth_core::{ids, validate};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::limits::Action;
use crate::store::{AppRow, Inserted};
use crate::{format_ms, ControlPlane, Shared, DEFAULT_ORG};

async fn app_json(control: &ControlPlane, row: AppRow) -> Result<App, ApiError> {
    let machine_count = control.store.machines(&row.name).await?.len() as u64;
    // An org outlives its apps, so a missing row only means the name is unknown.
    let org_name = match control.store.org(&row.org_slug).await? {
        Some(org) => org.name,
        None => row.org_slug.clone(),
    };
    let volume_count = control.store.volumes(&row.name).await?.len() as u64;
    Ok(App {
        id: row.id,
        name: row.name,
        organization: AppOrganization {
            name: org_name,
            slug: row.org_slug.clone(),
        },
        status: "deployed".into(),
        machine_count,
        volume_count,
        network: "default".into(),
        created_at: format_ms(row.created_at_ms),
        org_slug: Some(row.org_slug),
    })
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListAppsQuery {
    /// Only this org's apps (Fly's filter); without it, every app the caller may see.
    org_slug: Option<String>,
}

#[utoipa::path(post, path = "/apps", tag = "apps", request_body = CreateAppRequest,
    responses((status = 201, body = App), (status = "default", body = ErrorBody)))]
pub(crate) async fn create_app(
    State(control): State<Shared>,
    principal: Principal,
    ApiJson(request): ApiJson<CreateAppRequest>,
) -> Result<(StatusCode, Json<App>), ApiError> {
    control.create_app(&principal, request).await
}

#[utoipa::path(get, path = "/apps", tag = "apps", params(ListAppsQuery),
    responses((status = 200, body = ListAppsResponse), (status = "default", body = ErrorBody)))]
pub(crate) async fn list_apps(
    State(control): State<Shared>,
    principal: Principal,
    ApiQuery(query): ApiQuery<ListAppsQuery>,
) -> Result<Json<ListAppsResponse>, ApiError> {
    control.list_apps(&principal, query).await
}

#[utoipa::path(get, path = "/apps/{app}", tag = "apps", params(("app" = String, Path)),
    responses((status = 200, body = App), (status = "default", body = ErrorBody)))]
pub(crate) async fn get_app(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath(app): ApiPath<String>,
) -> Result<Json<App>, ApiError> {
    control.get_app(&principal, &app).await
}

/// Deleting an app destroys its Machines first, like Fly's.
#[utoipa::path(delete, path = "/apps/{app}", tag = "apps", params(("app" = String, Path)),
    responses((status = 202, description = "the app and its Machines are gone"),
              (status = "default", body = ErrorBody)))]
pub(crate) async fn delete_app(
    State(control): State<Shared>,
    principal: Principal,
    ApiPath(app): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    control.delete_app(&principal, &app).await
}

impl ControlPlane {
    /// Makes an app in the caller's org, or in the one named if the caller may see it.
    pub(crate) async fn create_app(
        &self,
        principal: &Principal,
        request: CreateAppRequest,
    ) -> Result<(StatusCode, Json<App>), ApiError> {
        self.check_rate(principal, Action::Create, None).await?;
        validate::validate_name("app_name", &request.app_name)?;
        // An org's token makes apps in its own org; naming another is naming nothing.
        let org_slug = request
            .org_slug
            .unwrap_or_else(|| principal.org().unwrap_or(DEFAULT_ORG).to_owned());
        if !principal.can_see(&org_slug) || !self.store.org_exists(&org_slug).await? {
            return Err(ApiError::not_found(format!("org {org_slug:?}")));
        }
        let row = AppRow {
            id: ids::new_app_id(),
            name: request.app_name,
            org_slug,
            created_at_ms: self.clock.now_ms(),
        };
        if self.store.insert_app(&row).await? == Inserted::AlreadyExists {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "already_exists",
                format!("an app named {} already exists", row.name),
            ));
        }
        self.remember_app(&row.name, &row.org_slug);
        self.announce(crate::caches::Change::App(&row.name)).await;
        Ok((StatusCode::CREATED, Json(app_json(self, row).await?)))
    }

    /// The apps the caller may see, in Fly's envelope.
    pub(crate) async fn list_apps(
        &self,
        principal: &Principal,
        query: ListAppsQuery,
    ) -> Result<Json<ListAppsResponse>, ApiError> {
        self.check_rate(principal, Action::Read, None).await?;
        let mut apps = Vec::new();
        for row in self.store.apps().await? {
            let wanted = query
                .org_slug
                .as_ref()
                .is_none_or(|org| *org == row.org_slug);
            if wanted && principal.can_see(&row.org_slug) {
                apps.push(app_json(self, row).await?);
            }
        }
        Ok(Json(ListAppsResponse {
            total_apps: apps.len() as u64,
            apps,
        }))
    }

    pub(crate) async fn get_app(
        &self,
        principal: &Principal,
        app: &str,
    ) -> Result<Json<App>, ApiError> {
        self.check_rate(principal, Action::Read, None).await?;
        let row = self.app(principal, app).await?;
        Ok(Json(app_json(self, row).await?))
    }

    /// Destroys the app's Machines on their workers, then forgets the app.
    pub(crate) async fn delete_app(
        &self,
        principal: &Principal,
        app: &str,
    ) -> Result<StatusCode, ApiError> {
        self.app(principal, app).await?;
        self.check_rate(principal, Action::Destroy, None).await?;
        for machine in self.store.machines(app).await? {
            self.worker(&machine.worker)?
                .destroy(&machine.id, true)
                .await
                .or_else(ignore_not_found)?;
            self.store.delete_machine(&machine.id).await?;
            crate::leases::forget(self, &machine.id).await?;
        }
        // Its Machines are gone, so no volume is held.
        self.delete_app_volumes(app).await?;
        self.store.delete_app(app).await?;
        self.forget_app(app);
        self.announce(crate::caches::Change::App(app)).await;
        Ok(StatusCode::ACCEPTED)
    }
}

pub(crate) fn ignore_not_found(error: berth_worker::WorkerError) -> Result<(), ApiError> {
    match error {
        berth_worker::WorkerError::NotFound(_) => Ok(()),
        other => Err(other.into()),
    }
}
