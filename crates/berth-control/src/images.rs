//! `/v1/images`: importing, listing and untagging images.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use berth_api::{ErrorBody, ImageSummary};
use futures::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::ApiQuery;
use crate::limits::Action;
use crate::Shared;

/// The largest image archive `POST /v1/images/import` accepts.
pub const MAX_IMAGE_ARCHIVE: u64 = 8 * 1024 * 1024 * 1024;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ImageQuery {
    /// The image name, e.g. `demo/busybox:1`.
    name: String,
}

/// `POST /v1/images/import?name=…` with an OCI archive (a tar of an OCI image layout) as
/// the body. The body is streamed to disk, never held in memory. Images are shared by
/// every org, so only the operator adds them.
#[utoipa::path(post, path = "/images/import", tag = "images", params(ImageQuery),
    request_body(content = Vec<u8>, content_type = "application/x-tar"),
    responses((status = 200, body = ImageSummary), (status = "default", body = ErrorBody)))]
pub(crate) async fn import_image(
    State(control): State<Shared>,
    principal: Principal,
    ApiQuery(query): ApiQuery<ImageQuery>,
    body: axum::body::Body,
) -> Result<Json<ImageSummary>, ApiError> {
    principal.require_admin()?;
    berth_image::ImageReference::parse(&query.name).map_err(|error| {
        let mut api = ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_image_ref",
            error.to_string(),
        );
        api.body.field = Some("name".into());
        api
    })?;
    let upload = tempfile::Builder::new()
        .prefix("import-")
        .tempfile_in(&control.scratch_dir)
        .map_err(ApiError::internal)?;
    let mut file = tokio::fs::File::from_std(upload.reopen().map_err(ApiError::internal)?);
    let mut stream = body.into_data_stream();
    let mut written: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_image",
                format!("reading the upload: {error}"),
            )
        })?;
        written += chunk.len() as u64;
        if written > MAX_IMAGE_ARCHIVE {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("image archives are limited to {MAX_IMAGE_ARCHIVE} bytes"),
            ));
        }
        file.write_all(&chunk)
            .await
            .map_err(|error| storage_error(&error))?;
    }
    file.flush().await.map_err(|error| storage_error(&error))?;
    let images = control.images.clone();
    let name = query.name.clone();
    let upload_path = upload.path().to_owned();
    let resolved = tokio::task::spawn_blocking(move || images.import(&upload_path, &name))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::from)?;
    drop(upload);
    Ok(Json(ImageSummary {
        name: resolved.reference.name(),
        digest: resolved.manifest_digest,
        size_bytes: resolved.size_bytes,
        layers: resolved.layer_dirs.len(),
    }))
}

fn storage_error(error: &std::io::Error) -> ApiError {
    if error.raw_os_error() == Some(libc::ENOSPC) {
        ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "insufficient_storage",
            "no space left for the upload",
        )
    } else {
        ApiError::internal(format!("writing the upload: {error}"))
    }
}

#[utoipa::path(get, path = "/images", tag = "images",
    responses((status = 200, body = Vec<ImageSummary>), (status = "default", body = ErrorBody)))]
pub(crate) async fn list_images(
    State(control): State<Shared>,
    principal: Principal,
) -> Result<Json<Vec<ImageSummary>>, ApiError> {
    control.check_rate(&principal, Action::Read, None).await?;
    let images = control.images.clone();
    let infos = tokio::task::spawn_blocking(move || images.list())
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::from)?;
    Ok(Json(
        infos
            .into_iter()
            .map(|info| ImageSummary {
                name: info.name,
                digest: info.digest,
                size_bytes: info.size_bytes,
                layers: info.layers,
            })
            .collect(),
    ))
}

/// `DELETE /v1/images?name=…` removes a tag. Machines keep their resolved digest, so
/// nothing that exists stops working.
#[utoipa::path(delete, path = "/images", tag = "images", params(ImageQuery),
    responses((status = 204, description = "untagged"), (status = "default", body = ErrorBody)))]
pub(crate) async fn delete_image(
    State(control): State<Shared>,
    principal: Principal,
    ApiQuery(query): ApiQuery<ImageQuery>,
) -> Result<StatusCode, ApiError> {
    principal.require_admin()?;
    let images = control.images.clone();
    tokio::task::spawn_blocking(move || images.untag(&query.name))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::from)?;
    Ok(StatusCode::NO_CONTENT)
}
