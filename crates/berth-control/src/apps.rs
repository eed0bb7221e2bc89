//! `/v1/apps`: apps group Machines and belong to an org.

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use berth_api::{App, CreateAppRequest};
use berth_core::{ids, validate};

use crate::error::ApiError;
use crate::extract::{ApiJson, BearerToken};
use crate::store::{AppRow, Inserted};
use crate::{format_ms, now_ms, ControlPlane, Shared, DEFAULT_ORG};

async fn app_json(control: &ControlPlane, row: AppRow) -> Result<App, ApiError> {
    let machine_count = control.store.machines(&row.name).await?.len() as u64;
    Ok(App {
        id: row.id,
        name: row.name,
        org_slug: row.org_slug,
        status: "deployed".into(),
        machine_count,
        created_at: format_ms(row.created_at_ms),
    })
}

async fn create_app(
    State(control): State<Shared>,
    token: BearerToken,
    ApiJson(request): ApiJson<CreateAppRequest>,
) -> Result<(StatusCode, Json<App>), ApiError> {
    control.authorize(&token)?;
    validate::validate_name("app_name", &request.app_name)?;
    let org_slug = request.org_slug.unwrap_or_else(|| DEFAULT_ORG.to_owned());
    if !control.store.org_exists(&org_slug).await? {
        return Err(ApiError::not_found(format!("org {org_slug:?}")));
    }
    let row = AppRow {
        id: ids::new_app_id(),
        name: request.app_name,
        org_slug,
        created_at_ms: now_ms(),
    };
    if control.store.insert_app(&row).await? == Inserted::AlreadyExists {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_exists",
            format!("an app named {} already exists", row.name),
        ));
    }
    Ok((StatusCode::CREATED, Json(app_json(&control, row).await?)))
}

async fn list_apps(
    State(control): State<Shared>,
    token: BearerToken,
) -> Result<Json<Vec<App>>, ApiError> {
    control.authorize(&token)?;
    let mut apps = Vec::new();
    for row in control.store.apps().await? {
        apps.push(app_json(&control, row).await?);
    }
    Ok(Json(apps))
}

async fn get_app(
    State(control): State<Shared>,
    token: BearerToken,
    UrlPath(app): UrlPath<String>,
) -> Result<Json<App>, ApiError> {
    control.authorize(&token)?;
    let row = control.app(&app).await?;
    Ok(Json(app_json(&control, row).await?))
}

/// Deleting an app destroys its Machines first, like Fly's.
async fn delete_app(
    State(control): State<Shared>,
    token: BearerToken,
    UrlPath(app): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    control.authorize(&token)?;
    control.app(&app).await?;
    for machine in control.store.machines(&app).await? {
        control
            .worker(&machine.worker)?
            .destroy(&machine.id, true)
            .await
            .or_else(ignore_not_found)?;
        control.store.delete_machine(&machine.id).await?;
    }
    control.store.delete_app(&app).await?;
    Ok(StatusCode::ACCEPTED)
}

pub(crate) fn ignore_not_found(error: berth_agent::AgentError) -> Result<(), ApiError> {
    match error {
        berth_agent::AgentError::NotFound(_) => Ok(()),
        other => Err(other.into()),
    }
}

pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/apps", get(list_apps).post(create_app))
        .route("/apps/{app}", get(get_app).delete(delete_app))
}
