//! Pushing images built in code (`berth_image::build`) to a registry with oci-client.

use std::path::Path;

use anyhow::{bail, Context, Result};
use berth_image::build::ImageBuilder;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::Value;

/// Where to push: a loopback registry over plain HTTP, with optional basic credentials.
#[derive(Debug, Clone)]
pub struct PushTarget {
    /// `127.0.0.1:<port>`.
    pub host: String,
    /// `user`, `password`.
    pub credentials: Option<(String, String)>,
}

impl PushTarget {
    /// An anonymous target.
    pub fn anonymous(host: &str) -> PushTarget {
        PushTarget {
            host: host.to_string(),
            credentials: None,
        }
    }

    /// A target that needs basic auth.
    pub fn with_credentials(host: &str, user: &str, password: &str) -> PushTarget {
        PushTarget {
            host: host.to_string(),
            credentials: Some((user.to_string(), password.to_string())),
        }
    }

    async fn client(&self) -> Result<Client> {
        berth_image::pull::install_tls_provider();
        let client = Client::try_from(ClientConfig {
            protocol: ClientProtocol::Http,
            platform_resolver: None,
            ..ClientConfig::default()
        })?;
        let auth = match &self.credentials {
            Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
            None => RegistryAuth::Anonymous,
        };
        client.store_auth_if_needed(&self.host, &auth).await;
        Ok(client)
    }
}

/// Pushes `image` as `repository:tag`; returns the manifest digest.
pub async fn push_image(
    target: &PushTarget,
    repository: &str,
    tag: &str,
    image: ImageBuilder,
) -> Result<String> {
    let dir = tempfile::Builder::new().prefix("berth-push-").tempdir()?;
    let digest = image.write_layout(dir.path())?;
    push_layout(target, repository, tag, dir.path()).await?;
    Ok(digest)
}

/// Pushes `image` as an image index with one manifest per `(os, arch)` under
/// `repository:tag`; returns the digest of the index.
pub async fn push_index(
    target: &PushTarget,
    repository: &str,
    tag: &str,
    image: ImageBuilder,
    platforms: &[(&str, &str)],
) -> Result<String> {
    let dir = tempfile::Builder::new().prefix("berth-push-").tempdir()?;
    image.write_layout_with_index(dir.path(), platforms)?;
    push_layout(target, repository, tag, dir.path()).await
}

fn media_type(bytes: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(bytes).ok()?;
    value.get("mediaType")?.as_str().map(str::to_string)
}

fn is_manifest_or_index(media_type: &str) -> bool {
    media_type.contains("manifest") || media_type.contains("index")
}

/// Pushes every blob of an OCI layout, then its manifests by digest, then the top one
/// (from index.json) under `tag`. Returns the top digest.
pub async fn push_layout(
    target: &PushTarget,
    repository: &str,
    tag: &str,
    layout: &Path,
) -> Result<String> {
    let client = target.client().await?;
    let by_digest = |digest: &str| {
        Reference::with_digest(
            target.host.clone(),
            repository.to_string(),
            digest.to_string(),
        )
    };
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let top = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json lists no manifest")?
        .to_string();

    let mut manifests = Vec::new();
    for entry in std::fs::read_dir(layout.join("blobs/sha256"))? {
        let entry = entry?;
        let digest = format!("sha256:{}", entry.file_name().to_string_lossy());
        let bytes = std::fs::read(entry.path())?;
        match media_type(&bytes) {
            Some(kind) if is_manifest_or_index(&kind) => manifests.push((digest, bytes, kind)),
            _ => {
                client
                    .push_blob(&by_digest(&digest), bytes, &digest)
                    .await
                    .with_context(|| format!("pushing blob {digest}"))?;
            }
        }
    }
    // Manifests before the index that lists them.
    manifests.sort_by_key(|(_, _, kind)| kind.contains("index"));
    for (digest, bytes, kind) in &manifests {
        let content_type = kind.parse()?;
        if *digest == top {
            continue;
        }
        client
            .push_manifest_raw(&by_digest(digest), bytes.clone(), content_type)
            .await
            .with_context(|| format!("pushing manifest {digest}"))?;
    }
    let Some((_, bytes, kind)) = manifests.iter().find(|(digest, _, _)| *digest == top) else {
        bail!("the top manifest {top} is not in the layout");
    };
    let tagged = Reference::with_tag(target.host.clone(), repository.to_string(), tag.to_string());
    client
        .push_manifest_raw(&tagged, bytes.clone(), kind.parse()?)
        .await
        .with_context(|| format!("pushing {repository}:{tag}"))?;
    Ok(top)
}
