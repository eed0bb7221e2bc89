//! `/v1/images`: pulling, importing, listing, removing and pruning images.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_api::{ErrorBody, ImagePruneResponse, ImagePullEvent, ImagePullRequest, ImageSummary};
use berth_image::{ImageReference, InUse, PruneReport, PullEvent, PullScope};
use berth_worker::ImageUsage;
use futures::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiQuery};
use crate::limits::Action;
use crate::{ControlPlane, Shared};

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
    control.import_image(&principal, &query.name, body).await
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

/// Every image every Machine on every worker holds.
async fn image_usage(control: &ControlPlane) -> Result<Vec<ImageUsage>, ApiError> {
    let mut usage = Vec::new();
    for (_, worker) in control.workers.all() {
        usage.extend(worker.image_usage().await?);
    }
    Ok(usage)
}

/// Image usage of the workers that answer: a worker that is down does not stop a create
/// elsewhere, though its Machines' layers then go uncounted until it is back.
async fn reachable_image_usage(control: &ControlPlane) -> Vec<ImageUsage> {
    let mut usage = Vec::new();
    for (name, worker) in control.workers.all() {
        match worker.image_usage().await {
            Ok(list) => usage.extend(list),
            Err(error) => {
                tracing::warn!(worker = %name, error = %error, "image usage unavailable")
            }
        }
    }
    usage
}

/// The names of `org`'s apps: what usage entries are matched against.
async fn org_apps(control: &ControlPlane, org: &str) -> Result<HashSet<String>, ApiError> {
    Ok(control
        .store
        .apps()
        .await?
        .into_iter()
        .filter(|row| row.org_slug == org)
        .map(|row| row.name)
        .collect())
}

/// Distinct layers (digest, unpacked bytes) the Machines of `org` use.
async fn org_layers(
    control: &ControlPlane,
    org: &str,
    usage: &[ImageUsage],
) -> Result<BTreeMap<String, u64>, ApiError> {
    let apps = org_apps(control, org).await?;
    let mut layers = BTreeMap::new();
    for entry in usage.iter().filter(|entry| apps.contains(&entry.app)) {
        for (i, digest) in entry.layers.iter().enumerate() {
            let bytes = entry.layer_bytes.get(i).copied().unwrap_or(0);
            let slot = layers.entry(digest.clone()).or_insert(0);
            *slot = bytes.max(*slot);
        }
    }
    Ok(layers)
}

/// The pull scope of a create or update in `org` by `principal`: org tokens get the
/// operator's registry limits; every pull into an org counts against its image
/// storage quota. An org stores the distinct layers its Machines use, each counted once
/// for the org, whoever else shares it, so one org's usage says nothing about another's.
pub(crate) async fn pull_scope(
    control: &ControlPlane,
    principal: &Principal,
    org: &str,
) -> Result<PullScope, ApiError> {
    let limit_mb = control.limits_of(org).quotas.max_image_storage_mb;
    let usage = reachable_image_usage(control).await;
    let layers = org_layers(control, org, &usage).await?;
    let used: u64 = layers
        .values()
        .fold(0, |sum, bytes| sum.saturating_add(*bytes));
    Ok(PullScope {
        restricted: principal.org().is_some(),
        storage_left_bytes: Some(limit_mb.saturating_mul(1 << 20).saturating_sub(used)),
        storage_limit_mb: Some(limit_mb),
        charged_layers: layers.into_keys().collect(),
        source: None,
    })
}

/// Whether any Machine on any worker holds `digest` (a worker that does not answer
/// fails the call: its Machines might).
pub(crate) async fn machines_use(control: &ControlPlane, digest: &str) -> Result<bool, ApiError> {
    Ok(image_usage(control)
        .await?
        .iter()
        .any(|entry| entry.image.digest == digest))
}

fn in_use(usage: &[ImageUsage]) -> InUse {
    InUse {
        manifests: usage.iter().map(|u| u.image.digest.clone()).collect(),
        layers: usage
            .iter()
            .flat_map(|u| u.layers.iter().cloned())
            .collect(),
    }
}

/// `GET /v1/images`: every tag, plus every digest a Machine runs that no tag names any
/// more, each with the Machines using it.
#[utoipa::path(get, path = "/images", tag = "images",
    responses((status = 200, body = Vec<ImageSummary>), (status = "default", body = ErrorBody)))]
pub(crate) async fn list_images(
    State(control): State<Shared>,
    principal: Principal,
) -> Result<Json<Vec<ImageSummary>>, ApiError> {
    control.list_images(&principal).await
}

/// What an org token sees of `GET /v1/images`: the images its own Machines use, under
/// the names they were created with. Tags in the store are not shown: another tenant's
/// private reference (or its name for the same digest) must not leak.
async fn org_images(
    control: &ControlPlane,
    org: &str,
    usage: &[ImageUsage],
) -> Result<Vec<ImageSummary>, ApiError> {
    let apps = org_apps(control, org).await?;
    let mut by_ref: BTreeMap<(String, String), ImageSummary> = BTreeMap::new();
    for entry in usage.iter().filter(|entry| apps.contains(&entry.app)) {
        let key = (entry.image.name.clone(), entry.image.digest.clone());
        let summary = by_ref.entry(key).or_insert_with(|| ImageSummary {
            name: entry.image.name.clone(),
            digest: entry.image.digest.clone(),
            size_bytes: 0,
            unpacked_bytes: entry
                .layer_bytes
                .iter()
                .fold(0, |sum, bytes| sum.saturating_add(*bytes)),
            layers: entry.layers.len(),
            machines: Vec::new(),
        });
        summary.machines.push(entry.machine_id.clone());
    }
    let images = control.images.clone();
    let mut out: Vec<ImageSummary> = by_ref.into_values().collect();
    let out = tokio::task::spawn_blocking(move || {
        for summary in &mut out {
            summary.machines.sort();
            summary.machines.dedup();
            // The compressed size, when this host's store holds the manifest.
            if let Ok(info) = images.describe(&format!("unnamed@{}", summary.digest)) {
                summary.size_bytes = info.size_bytes;
            }
        }
        out
    })
    .await
    .map_err(ApiError::internal)?;
    Ok(out)
}

fn prune_response(report: PruneReport) -> ImagePruneResponse {
    ImagePruneResponse {
        images: report.images,
        blobs: report.blobs,
        layers: report.layers,
        bytes: report.bytes,
    }
}

/// `DELETE /v1/images?name=…` removes a tag, then whatever only it reached. Machines keep
/// their resolved digest and its layers, so nothing that exists stops working.
#[utoipa::path(delete, path = "/images", tag = "images", params(ImageQuery),
    responses((status = 204, description = "untagged"), (status = "default", body = ErrorBody)))]
pub(crate) async fn delete_image(
    State(control): State<Shared>,
    principal: Principal,
    ApiQuery(query): ApiQuery<ImageQuery>,
) -> Result<StatusCode, ApiError> {
    control.delete_image(&principal, query.name).await
}

/// `DELETE /v1/images/{reference}`: the same as `DELETE /v1/images?name=`, with the
/// reference in the path (`/v1/images/team/web:1.4`).
#[utoipa::path(delete, path = "/images/{*reference}", tag = "images",
    params(("reference" = String, Path, description = "an image reference, slashes included")),
    responses((status = 204, description = "untagged"), (status = "default", body = ErrorBody)))]
pub(crate) async fn delete_image_by_path(
    State(control): State<Shared>,
    principal: Principal,
    axum::extract::Path(reference): axum::extract::Path<String>,
) -> Result<StatusCode, ApiError> {
    control.delete_image(&principal, reference).await
}

/// `POST /v1/images/prune` removes every image and layer no Machine references.
#[utoipa::path(post, path = "/images/prune", tag = "images",
    responses((status = 200, body = ImagePruneResponse), (status = "default", body = ErrorBody)))]
pub(crate) async fn prune_images(
    State(control): State<Shared>,
    principal: Principal,
) -> Result<Json<ImagePruneResponse>, ApiError> {
    control.prune_images(&principal).await
}

fn invalid_ref(field: &str, error: &berth_image::ImageError) -> ApiError {
    let mut api = ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_image_ref",
        error.to_string(),
    );
    api.body.field = Some(field.into());
    api
}

fn ndjson_line(event: &ImagePullEvent) -> bytes::Bytes {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    line.into()
}

fn progress_line(event: PullEvent) -> ImagePullEvent {
    ImagePullEvent {
        status: event.status.as_str().to_owned(),
        layer: event.layer,
        bytes_done: event.bytes_done,
        bytes_total: event.bytes_total,
        image: None,
        digest: None,
        error: None,
        message: None,
        retry_after_ms: None,
    }
}

/// `POST /v1/images/pull {"image": …}` answers with NDJSON progress events. The manifest
/// is resolved before the answer starts, so a bad reference, a missing image, refused
/// credentials, an unreachable registry or a foreign platform get their own status and
/// JSON error; failures while layers download arrive as a last `error` line.
#[utoipa::path(post, path = "/images/pull", tag = "images", request_body = ImagePullRequest,
    responses((status = 200, description = "NDJSON progress events", body = ImagePullEvent),
        (status = "default", body = ErrorBody)))]
pub(crate) async fn pull_image(
    State(control): State<Shared>,
    principal: Principal,
    ApiJson(request): ApiJson<ImagePullRequest>,
) -> Result<Response, ApiError> {
    let events = control.pull_image(&principal, request).await?;
    Ok(ndjson_response(events))
}

fn tokio_stream_from<T: Send + 'static>(
    receiver: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    })
}

/// The pull's progress events as NDJSON, one line each, as they come.
fn ndjson_response(events: UnboundedReceiver<ImagePullEvent>) -> Response {
    let lines = tokio_stream_from(events).map(|event| Ok::<_, std::io::Error>(ndjson_line(&event)));
    let mut response = Body::from_stream(lines).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// How much of a refused upload is read and dropped before the refusal is sent.
const REFUSED_UPLOAD_DRAIN: u64 = 64 << 20;

/// Reads and drops (a bounded part of) a refused upload, so that a client still sending
/// it reads the refusal rather than a connection closed under it.
async fn drain_refused(body: axum::body::Body) {
    let mut stream = body.into_data_stream();
    let mut read: u64 = 0;
    while read < REFUSED_UPLOAD_DRAIN {
        match tokio::time::timeout(std::time::Duration::from_secs(5), stream.next()).await {
            Ok(Some(Ok(chunk))) => read += chunk.len() as u64,
            _ => break,
        }
    }
}

impl ControlPlane {
    /// Where an import of `name` goes, or why it is refused before its upload is read.
    fn import_target(
        &self,
        principal: &Principal,
        name: &str,
    ) -> Result<berth_image::ImageReference, ApiError> {
        principal.require_admin()?;
        let reference = match &self.shared_registry {
            Some(_) => crate::shared_images::importable(name)?,
            None => berth_image::ImageReference::parse(name).map_err(|error| {
                let mut api = ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_image_ref",
                    error.to_string(),
                );
                api.body.field = Some("name".into());
                api
            })?,
        };
        if self.shared_registry.is_none() && !self.sole {
            // Another replica could neither list nor serve an image kept on this one's disk.
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "image_store_not_shared",
                "images cannot be imported while the control store is PostgreSQL (shared by \
                 replicas) and no shared registry is set: start berth server with \
                 --image-registry HOST[:PORT]",
            ));
        }
        Ok(reference)
    }

    /// Streams an OCI archive to scratch space, then imports it into the store (admin only).
    pub(crate) async fn import_image(
        &self,
        principal: &Principal,
        name: &str,
        body: axum::body::Body,
    ) -> Result<Json<ImageSummary>, ApiError> {
        let reference = match self.import_target(principal, name) {
            Ok(reference) => reference,
            Err(error) => {
                drain_refused(body).await;
                return Err(error);
            }
        };
        let upload = tempfile::Builder::new()
            .prefix("import-")
            .tempfile_in(&self.scratch_dir)
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
        if let Some(shared) = &self.shared_registry {
            let summary = self.import_shared(shared, reference, upload.path()).await?;
            drop(upload);
            return Ok(Json(summary));
        }
        let images = self.images.clone();
        let name = name.to_owned();
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
            unpacked_bytes: resolved.unpacked_bytes,
            layers: resolved.layer_dirs.len(),
            machines: Vec::new(),
        }))
    }

    /// Every image, with the Machines using it that the caller may see.
    pub(crate) async fn list_images(
        &self,
        principal: &Principal,
    ) -> Result<Json<Vec<ImageSummary>>, ApiError> {
        self.check_rate(principal, Action::Read, None).await?;
        let usage = image_usage(self).await?;
        if let Some(org) = principal.org() {
            return Ok(Json(org_images(self, org, &usage).await?));
        }
        let visible = self.visible_machines_by_digest(principal, &usage).await?;
        if self.shared_registry.is_some() {
            let mut images = self.shared_images().await?;
            for image in &mut images {
                image.machines = visible.get(&image.digest).cloned().unwrap_or_default();
            }
            return Ok(Json(images));
        }
        let machines_by_digest = visible;
        let images = self.images.clone();
        let untagged: Vec<(String, String)> = usage
            .iter()
            .map(|u| (u.image.repository.clone(), u.image.digest.clone()))
            .collect();
        let infos = tokio::task::spawn_blocking(move || {
            let mut infos = images.list()?;
            let tagged: HashSet<String> = infos.iter().map(|info| info.digest.clone()).collect();
            let mut seen = HashSet::new();
            for (repository, digest) in untagged {
                if tagged.contains(&digest) || !seen.insert(digest.clone()) {
                    continue;
                }
                if let Ok(info) = images.describe(&format!("{repository}@{digest}")) {
                    infos.push(info);
                }
            }
            Ok::<_, berth_image::ImageError>(infos)
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::from)?;
        Ok(Json(
            infos
                .into_iter()
                .map(|info| ImageSummary {
                    machines: machines_by_digest
                        .get(&info.digest)
                        .cloned()
                        .unwrap_or_default(),
                    name: info.name,
                    digest: info.digest,
                    size_bytes: info.size_bytes,
                    unpacked_bytes: info.unpacked_bytes,
                    layers: info.layers,
                })
                .collect(),
        ))
    }

    /// The Machines using each digest, of those the caller may see. Images are shared by
    /// the whole platform; the Machines using them are only shown to their own org.
    async fn visible_machines_by_digest(
        &self,
        principal: &Principal,
        usage: &[ImageUsage],
    ) -> Result<BTreeMap<String, Vec<String>>, ApiError> {
        let visible_apps: HashSet<String> = self
            .store
            .apps()
            .await?
            .into_iter()
            .filter(|row| principal.can_see(&row.org_slug))
            .map(|row| row.name)
            .collect();
        let mut machines_by_digest: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for entry in usage
            .iter()
            .filter(|entry| visible_apps.contains(&entry.app))
        {
            machines_by_digest
                .entry(entry.image.digest.clone())
                .or_default()
                .push(entry.machine_id.clone());
        }
        for ids in machines_by_digest.values_mut() {
            ids.sort();
            ids.dedup();
        }
        Ok(machines_by_digest)
    }

    /// Removes a tag, then whatever only it reached (admin only).
    pub(crate) async fn delete_image(
        &self,
        principal: &Principal,
        name: String,
    ) -> Result<StatusCode, ApiError> {
        principal.require_admin()?;
        ImageReference::parse(&name).map_err(|error| invalid_ref("name", &error))?;
        if let Some(shared) = &self.shared_registry {
            self.delete_shared(shared, &name).await?;
            return Ok(StatusCode::NO_CONTENT);
        }
        // Usage is read after the collection starts: see berth_image::gc.
        let collection = self.images.begin_collection().await;
        let in_use = in_use(&image_usage(self).await?);
        tokio::task::spawn_blocking(move || collection.remove(&name, &in_use))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::from)?;
        Ok(StatusCode::NO_CONTENT)
    }

    /// Removes every image and layer no Machine references (admin only).
    pub(crate) async fn prune_images(
        &self,
        principal: &Principal,
    ) -> Result<Json<ImagePruneResponse>, ApiError> {
        principal.require_admin()?;
        let collection = self.images.begin_collection().await;
        let in_use = in_use(&image_usage(self).await?);
        let report = tokio::task::spawn_blocking(move || collection.prune(&in_use))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::from)?;
        Ok(Json(prune_response(report)))
    }

    /// Resolves the image's manifest, then pulls the rest in the background; its progress
    /// events come through the channel answered.
    pub(crate) async fn pull_image(
        &self,
        principal: &Principal,
        request: ImagePullRequest,
    ) -> Result<UnboundedReceiver<ImagePullEvent>, ApiError> {
        principal.require_admin()?;
        let mut reference =
            ImageReference::parse(&request.image).map_err(|error| invalid_ref("image", &error))?;
        if reference.registry.is_none() {
            match self.puller.default_registry() {
                Some(registry) => reference.registry = Some(registry.to_owned()),
                None => {
                    return Err(invalid_ref(
                        "image",
                        &berth_image::ImageError::InvalidReference {
                            reference: request.image.clone(),
                            reason: "names no registry, and no default registry is configured",
                        },
                    ))
                }
            }
        }
        let lease = self.images.lease();
        let plan = self
            .puller
            .plan(&reference, &lease)
            .await
            .map_err(ApiError::from)?;
        let first = ImagePullEvent {
            status: "resolved".to_owned(),
            layer: None,
            bytes_done: 0,
            bytes_total: plan.total_bytes(),
            image: Some(plan.reference.name()),
            digest: Some(plan.manifest_digest.clone()),
            error: None,
            message: None,
            retry_after_ms: None,
        };
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel::<ImagePullEvent>();
        let _ = sender.send(first);
        let puller = self.puller.clone();
        let progress_sender = sender.clone();
        // The pull runs to its end even if the client goes away: its work is never wasted.
        tokio::spawn(async move {
            let progress: berth_image::Progress = Arc::new(move |event: PullEvent| {
                if event.status != berth_image::PullStatus::Resolved {
                    let _ = progress_sender.send(progress_line(event));
                }
            });
            let last = match puller.fetch(plan, &lease, progress).await {
                Ok(image) => ImagePullEvent {
                    status: "done".to_owned(),
                    layer: None,
                    bytes_done: image.size_bytes,
                    bytes_total: image.size_bytes,
                    image: Some(image.reference.name()),
                    digest: Some(image.manifest_digest),
                    error: None,
                    message: None,
                    retry_after_ms: None,
                },
                Err(error) => {
                    let (_, body) = berth_worker::WorkerError::from(error).to_response();
                    ImagePullEvent {
                        status: "error".to_owned(),
                        layer: None,
                        bytes_done: 0,
                        bytes_total: 0,
                        image: None,
                        digest: None,
                        error: Some(body.error),
                        message: Some(body.message),
                        retry_after_ms: body.retry_after_ms,
                    }
                }
            };
            let _ = sender.send(last);
        });
        Ok(receiver)
    }
}
