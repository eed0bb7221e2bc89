//! Pushing an image from the store to a registry with oci-client: every blob by digest,
//! skipped when the registry already has it (a HEAD), then the manifest under its tag.
//! The control plane pushes imported images to the registry its replicas share.

use futures::TryStreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::error::ImageError;
use crate::pull::{install_tls_provider, registry_error};
use crate::store::{
    descriptor_hex, digest_hex, parse_manifest, ImageStore, MAX_MANIFEST, MEDIA_OCI_MANIFEST,
};

/// Where a push goes.
#[derive(Clone)]
pub struct PushTarget {
    /// `host[:port]`.
    pub registry: String,
    /// The repository there, e.g. `team/web`.
    pub repository: String,
    /// Plain HTTP instead of HTTPS.
    pub plain_http: bool,
    /// Basic credentials, if the registry needs them.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for PushTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("PushTarget")
            .field("registry", &self.registry)
            .field("repository", &self.repository)
            .field("plain_http", &self.plain_http)
            .finish()
    }
}

/// What a push sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushReport {
    /// Blobs uploaded (config and layers).
    pub pushed: Vec<String>,
    /// Blobs the registry already had.
    pub present: Vec<String>,
}

impl PushTarget {
    fn client(&self) -> Result<Client, ImageError> {
        install_tls_provider();
        Client::try_from(ClientConfig {
            protocol: if self.plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            platform_resolver: None,
            ..ClientConfig::default()
        })
        .map_err(|e| ImageError::Internal(format!("building the registry client: {e}")))
    }

    fn auth(&self) -> RegistryAuth {
        match &self.credentials {
            Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
            None => RegistryAuth::Anonymous,
        }
    }

    /// The repository at `digest`.
    pub fn by_digest(&self, digest: &str) -> Reference {
        Reference::with_digest(
            self.registry.clone(),
            self.repository.clone(),
            digest.to_owned(),
        )
    }
}

/// Pushes the stored manifest `manifest_digest` (a platform manifest, as an import keeps)
/// and its blobs to `target`, tagged `tag` (or by digest alone). Blobs stream from the
/// store's files.
pub async fn push_stored(
    store: &ImageStore,
    manifest_digest: &str,
    target: &PushTarget,
    tag: Option<&str>,
) -> Result<PushReport, ImageError> {
    let manifest_bytes = read_blob(store, manifest_digest, MAX_MANIFEST).await?;
    let manifest = parse_manifest(&manifest_bytes)?;
    let client = target.client()?;
    let registry = target.registry.as_str();
    client.store_auth_if_needed(registry, &target.auth()).await;
    let mut report = PushReport::default();
    let blobs = std::iter::once(&manifest.config).chain(&manifest.layers);
    for desc in blobs {
        let hex = descriptor_hex(desc)?;
        let remote = target.by_digest(&desc.digest);
        let present = client
            .blob_exists(&remote, &desc.digest)
            .await
            .map_err(|e| registry_error(registry, &desc.digest, e))?;
        if present {
            report.present.push(desc.digest.clone());
            continue;
        }
        let file = tokio::fs::File::open(store.blob_path(hex))
            .await
            .map_err(|e| ImageError::io(format!("opening blob {}", desc.digest), e))?;
        let stream = tokio_util::io::ReaderStream::new(file).map_err(OciDistributionError::IoError);
        client
            .push_blob_stream(&remote, stream, &desc.digest, Some(desc.size))
            .await
            .map_err(|e| registry_error(registry, &desc.digest, e))?;
        report.pushed.push(desc.digest.clone());
    }
    let media_type = serde_json::from_slice::<serde_json::Value>(&manifest_bytes)
        .ok()
        .and_then(|doc| doc["mediaType"].as_str().map(str::to_owned))
        .unwrap_or_else(|| MEDIA_OCI_MANIFEST.to_owned());
    let content_type = media_type
        .parse()
        .map_err(|_| ImageError::invalid(format!("bad manifest media type {media_type:?}")))?;
    let tagged = match tag {
        Some(tag) => Reference::with_tag(
            target.registry.clone(),
            target.repository.clone(),
            tag.to_owned(),
        ),
        None => target.by_digest(manifest_digest),
    };
    client
        .push_manifest_raw(&tagged, manifest_bytes, content_type)
        .await
        .map_err(|e| registry_error(registry, manifest_digest, e))?;
    Ok(report)
}

async fn read_blob(store: &ImageStore, digest: &str, cap: u64) -> Result<Vec<u8>, ImageError> {
    let path = store.blob_path(digest_hex(digest));
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| ImageError::io(format!("reading {digest}"), e))?;
    if bytes.len() as u64 > cap {
        return Err(ImageError::invalid(format!("{digest} is over {cap} bytes")));
    }
    Ok(bytes)
}

/// What a manifest delete came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// The registry removed the manifest (and every tag naming it).
    Removed,
    /// The registry refused: deletes disabled (405), or an answer like it; it keeps it.
    Kept(u16),
}

/// Deletes the manifest `digest` from `target`'s repository (the distribution API's
/// `DELETE /v2/<name>/manifests/<digest>`, which oci-client does not offer). Basic
/// credentials only; a registry with token auth answers 401 and keeps it.
pub async fn delete_manifest(target: &PushTarget, digest: &str) -> Result<Deleted, ImageError> {
    install_tls_provider();
    let scheme = if target.plain_http { "http" } else { "https" };
    let url = format!(
        "{scheme}://{}/v2/{}/manifests/{digest}",
        target.registry, target.repository
    );
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| ImageError::Internal(format!("building the registry client: {e}")))?;
    let mut request = client.delete(&url);
    if let Some((user, password)) = &target.credentials {
        request = request.basic_auth(user, Some(password));
    }
    let answer = request
        .send()
        .await
        .map_err(|e| ImageError::RegistryUnreachable {
            registry: target.registry.clone(),
            message: e.to_string(),
        })?;
    if answer.status().is_success() {
        Ok(Deleted::Removed)
    } else {
        Ok(Deleted::Kept(answer.status().as_u16()))
    }
}
