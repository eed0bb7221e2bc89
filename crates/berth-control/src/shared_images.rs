//! Imported images when replicas share one database (`berth server --image-registry`):
//! an import is pushed to a registry every replica and agent reaches, and its name's
//! digest is kept in `shared_images`, so every replica lists, resolves and removes it and
//! agents pull it from that registry, never from one replica's disk.
//!
//! The mapping: `[NAMESPACE/]REPOSITORY:TAG` in the registry for the name
//! `REPOSITORY:TAG`, where NAMESPACE is the path given after the registry's host. A name
//! that carries a registry host of its own is refused: it is pulled from that host.

use axum::http::StatusCode;
use berth_api::ImageSummary;
use berth_image::{ImageReference, ImageStore, PullSource, PushTarget, RegistryCredentials};
use sqlx::Row;

use crate::error::ApiError;
use crate::ControlPlane;

pub(crate) const SCHEMA: &[&str] = &["CREATE TABLE IF NOT EXISTS shared_images (
    name TEXT PRIMARY KEY NOT NULL,
    repository TEXT NOT NULL,
    digest TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    unpacked_bytes INTEGER NOT NULL,
    layers INTEGER NOT NULL,
    imported_at_ms INTEGER NOT NULL
)"];

/// The registry the replicas share, from `--image-registry HOST[:PORT][/NAMESPACE]`.
#[derive(Clone)]
pub struct SharedRegistry {
    /// `host[:port]`.
    pub registry: String,
    /// A path prefix for every repository, possibly empty.
    pub namespace: String,
    /// Plain HTTP: loopback, or a host the operator listed as insecure.
    pub plain_http: bool,
    /// Basic credentials (user, password).
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for SharedRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("SharedRegistry")
            .field("registry", &self.registry)
            .field("namespace", &self.namespace)
            .field("plain_http", &self.plain_http)
            .finish()
    }
}

impl SharedRegistry {
    /// Parses `HOST[:PORT][/NAMESPACE]`; plain HTTP for loopback and for hosts in
    /// `insecure` (as every registry client in Berth), credentials from `auth`.
    pub fn parse(
        text: &str,
        insecure: &[String],
        auth: &RegistryCredentials,
    ) -> Result<SharedRegistry, String> {
        let bad = || format!("{text:?} is not HOST[:PORT][/NAMESPACE]");
        let (host, namespace) = text.split_once('/').unwrap_or((text, ""));
        let namespace = namespace.trim_matches('/');
        // The reference grammar decides what a registry host and a repository are.
        let probe = if namespace.is_empty() {
            format!("{host}/probe")
        } else {
            format!("{host}/{namespace}/probe")
        };
        let parsed = ImageReference::parse(&probe).map_err(|_| bad())?;
        if parsed.registry.as_deref() != Some(host) {
            return Err(bad());
        }
        Ok(SharedRegistry {
            registry: host.to_owned(),
            namespace: namespace.to_owned(),
            plain_http: berth_image::pull::is_loopback_registry(host)
                || insecure.iter().any(|listed| listed == host),
            credentials: auth.of_host(host),
        })
    }

    /// The repository in the registry for a name's repository.
    fn repository(&self, repository: &str) -> String {
        if self.namespace.is_empty() {
            repository.to_owned()
        } else {
            format!("{}/{repository}", self.namespace)
        }
    }

    fn target(&self, repository: &str) -> PushTarget {
        PushTarget {
            registry: self.registry.clone(),
            repository: repository.to_owned(),
            plain_http: self.plain_http,
            credentials: self.credentials.clone(),
        }
    }

    fn source(&self, repository: &str, digest: &str) -> PullSource {
        PullSource {
            registry: self.registry.clone(),
            repository: repository.to_owned(),
            digest: digest.to_owned(),
            insecure: self.plain_http,
            username: self.credentials.as_ref().map(|(user, _)| user.clone()),
            password: self.credentials.as_ref().map(|(_, pass)| pass.clone()),
        }
    }
}

fn summary(row: &sqlx::any::AnyRow) -> ImageSummary {
    let count = |column: &str| {
        row.try_get::<i64, _>(column)
            .ok()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0)
    };
    ImageSummary {
        name: row.get("name"),
        digest: row.get("digest"),
        size_bytes: count("size_bytes"),
        unpacked_bytes: count("unpacked_bytes"),
        layers: usize::try_from(count("layers")).unwrap_or(usize::MAX),
        machines: Vec::new(),
    }
}

/// A name an import may take: no registry host of its own.
pub(crate) fn importable(name: &str) -> Result<ImageReference, ApiError> {
    let reference = ImageReference::parse(name).map_err(|error| field_error(error.to_string()))?;
    if let Some(host) = &reference.registry {
        return Err(field_error(format!(
            "{name} names the registry {host}; images imported into the shared registry \
             are named without one"
        )));
    }
    Ok(reference)
}

fn field_error(message: String) -> ApiError {
    let mut api = ApiError::new(StatusCode::BAD_REQUEST, "invalid_image_ref", message);
    api.body.field = Some("name".into());
    api
}

impl ControlPlane {
    /// Imports the archive at `upload` into a scratch store (every check an import makes),
    /// pushes it to the shared registry, then records its name. A bad archive or a failed
    /// push records nothing; the scratch store goes either way.
    pub(crate) async fn import_shared(
        &self,
        shared: &SharedRegistry,
        reference: ImageReference,
        upload: &std::path::Path,
    ) -> Result<ImageSummary, ApiError> {
        let scratch = tempfile::Builder::new()
            .prefix("import-store-")
            .tempdir_in(&self.scratch_dir)
            .map_err(ApiError::internal)?;
        let store = std::sync::Arc::new(
            ImageStore::open(scratch.path(), *self.images.limits()).map_err(ApiError::from)?,
        );
        let name = reference.name();
        let resolved = {
            let store = store.clone();
            let name = name.clone();
            let upload = upload.to_owned();
            tokio::task::spawn_blocking(move || store.import(&upload, &name))
                .await
                .map_err(ApiError::internal)?
                .map_err(ApiError::from)?
        };
        let repository = shared.repository(&reference.repository);
        let report = berth_image::push_stored(
            &store,
            &resolved.manifest_digest,
            &shared.target(&repository),
            reference.tag.as_deref(),
        )
        .await
        .map_err(ApiError::from)?;
        tracing::info!(
            image = %name,
            registry = %shared.registry,
            %repository,
            pushed = report.pushed.len(),
            present = report.present.len(),
            "image pushed to the shared registry"
        );
        let summary = ImageSummary {
            name: name.clone(),
            digest: resolved.manifest_digest.clone(),
            size_bytes: resolved.size_bytes,
            unpacked_bytes: resolved.unpacked_bytes,
            layers: resolved.layer_digests.len(),
            machines: Vec::new(),
        };
        sqlx::query(
            "INSERT INTO shared_images
                 (name, repository, digest, size_bytes, unpacked_bytes, layers, imported_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (name) DO UPDATE SET repository = excluded.repository,
                 digest = excluded.digest, size_bytes = excluded.size_bytes,
                 unpacked_bytes = excluded.unpacked_bytes, layers = excluded.layers,
                 imported_at_ms = excluded.imported_at_ms",
        )
        .bind(&name)
        .bind(&repository)
        .bind(&summary.digest)
        .bind(i64::try_from(summary.size_bytes).unwrap_or(i64::MAX))
        .bind(i64::try_from(summary.unpacked_bytes).unwrap_or(i64::MAX))
        .bind(i64::try_from(summary.layers).unwrap_or(i64::MAX))
        .bind(self.clock.now_ms())
        .execute(self.store.pool())
        .await?;
        drop(store);
        if let Err(error) = scratch.close() {
            tracing::warn!(%error, "removing an import's scratch store");
        }
        Ok(summary)
    }

    /// Every name imported into the shared registry.
    pub(crate) async fn shared_images(&self) -> Result<Vec<ImageSummary>, ApiError> {
        let rows = sqlx::query(
            "SELECT name, digest, size_bytes, unpacked_bytes, layers FROM shared_images
             ORDER BY name",
        )
        .fetch_all(self.store.pool())
        .await?;
        Ok(rows.iter().map(summary).collect())
    }

    /// Where a create or update of `image` pulls from: the shared registry for a name
    /// imported there (by the digest recorded now, so a later import under the name
    /// changes no Machine), or for a digest without a registry; otherwise the name says.
    pub(crate) async fn pull_source(&self, image: &str) -> Result<Option<PullSource>, ApiError> {
        let Some(shared) = &self.shared_registry else {
            return Ok(None);
        };
        let Ok(reference) = ImageReference::parse(image) else {
            return Ok(None);
        };
        if reference.registry.is_some() {
            return Ok(None);
        }
        if let Some(digest) = &reference.digest {
            return Ok(Some(
                shared.source(&shared.repository(&reference.repository), digest),
            ));
        }
        let row = sqlx::query("SELECT repository, digest FROM shared_images WHERE name = $1")
            .bind(reference.name())
            .fetch_optional(self.store.pool())
            .await?;
        Ok(row.map(|row| {
            let repository: String = row.get("repository");
            let digest: String = row.get("digest");
            shared.source(&repository, &digest)
        }))
    }

    /// The pinned digest of a Machine's image, from the shared registry when it names
    /// none of its own (for a move's destination).
    pub(crate) fn pinned_source(&self, image: &berth_api::ImageRef) -> Option<PullSource> {
        let shared = self.shared_registry.as_ref()?;
        if image.registry.is_some() {
            return None;
        }
        Some(shared.source(&shared.repository(&image.repository), &image.digest))
    }

    /// Forgets `name`, then deletes its manifest from the registry when no other name and
    /// no Machine uses the digest. A registry that does not allow deletes (405) keeps it;
    /// the name is gone from Berth either way, and the registry's own tools reclaim blobs.
    pub(crate) async fn delete_shared(
        &self,
        shared: &SharedRegistry,
        name: &str,
    ) -> Result<(), ApiError> {
        let reference =
            ImageReference::parse(name).map_err(|error| field_error(error.to_string()))?;
        let row =
            sqlx::query("DELETE FROM shared_images WHERE name = $1 RETURNING repository, digest")
                .bind(reference.name())
                .fetch_optional(self.store.pool())
                .await?;
        let Some(row) = row else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "image_not_found",
                format!("no image named {}", reference.name()),
            ));
        };
        let repository: String = row.get("repository");
        let digest: String = row.get("digest");
        let named: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM shared_images WHERE digest = $1")
            .bind(&digest)
            .fetch_one(self.store.pool())
            .await?;
        let used = crate::images::machines_use(self, &digest).await?;
        if named > 0 || used {
            return Ok(());
        }
        match berth_image::delete_manifest(&shared.target(&repository), &digest).await {
            Ok(berth_image::Deleted::Removed) => {
                tracing::info!(%repository, %digest, "manifest deleted from the shared registry")
            }
            Ok(berth_image::Deleted::Kept(status)) => tracing::info!(
                %repository, %digest, status,
                "the shared registry keeps the manifest (deletes refused or disabled)"
            ),
            Err(error) => tracing::warn!(
                %repository, %digest, %error, "deleting a manifest from the shared registry"
            ),
        }
        Ok(())
    }
}
