//! The images Machines run: resolved (and pulled) for create and update, found again by
//! digest for a rollback, and reported per Machine for garbage collection.

use std::sync::{Arc, Mutex as StdMutex};

use berth_api::{EventKind, ImageRef, MachineState};
use berth_image::{ImagePuller, Lease, PullEvent, PullScope, PullStatus, ResolvedImage};

use crate::error::{AgentError, Result};
use crate::record::{now_ms, LayerRef, PendingOp, RootfsStack};
use crate::service::EventSource;
use crate::service::ImageUsage;
use crate::store::MachineEvent;
use crate::Agent;

impl Agent {
    /// Resolves an image for create or update, pulling it when it names a registry. The
    /// lease keeps its layers from garbage collection until the caller has recorded the
    /// Machine; the returned events are the pull's milestones, for the Machine's history.
    pub(crate) async fn resolve_image(
        &self,
        name: &str,
        lease: &Lease,
        scope: &PullScope,
    ) -> Result<(ResolvedImage, Vec<MachineEvent>)> {
        let milestones = Arc::new(StdMutex::new(Vec::new()));
        let sink = milestones.clone();
        let progress: berth_image::Progress = Arc::new(move |event: PullEvent| {
            if let Some(reason) = pull_milestone(&event) {
                if let Ok(mut list) = sink.lock() {
                    list.push((reason, now_ms()));
                }
            }
        });
        let image = self
            .inner
            .puller
            .resolve_scoped(name, lease, progress, scope)
            .await?;
        let events = milestones
            .lock()
            .map(|list| list.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|(reason, at_ms)| MachineEvent {
                kind: EventKind::Pull,
                source: EventSource::System,
                state: MachineState::Created,
                exit_code: None,
                reason: Some(reason),
                at_ms,
            })
            .collect();
        Ok((image, events))
    }

    /// The puller that create and update use.
    pub fn puller(&self) -> &Arc<ImagePuller> {
        &self.inner.puller
    }

    pub(crate) fn image_ref(image: &ResolvedImage) -> ImageRef {
        ImageRef {
            name: image.reference.name(),
            registry: image.reference.registry.clone(),
            repository: match &image.reference.registry {
                Some(registry) => format!("{registry}/{}", image.reference.repository),
                None => image.reference.repository.clone(),
            },
            tag: image.reference.tag.clone(),
            digest: image.manifest_digest.clone(),
            labels: image.config.labels.clone(),
        }
    }

    pub(crate) fn rootfs_stack(&self, id: &str, image: &ResolvedImage) -> RootfsStack {
        RootfsStack {
            image_layers: image
                .layer_digests
                .iter()
                .zip(&image.layer_dirs)
                .map(|(digest, dir)| LayerRef {
                    digest: digest.clone(),
                    dir: dir.clone(),
                })
                .collect(),
            frozen_layers: Vec::new(),
            upper: self.layout(id).upper(),
        }
    }

    pub(crate) async fn resolve_digest(&self, digest: &str) -> Result<ResolvedImage> {
        let images = self.inner.images.clone();
        let digest = digest.to_owned();
        tokio::task::spawn_blocking(move || images.resolve_digest(&digest))
            .await
            .map_err(|error| AgentError::Internal(format!("image resolution task: {error}")))?
            .map_err(AgentError::from)
    }

    /// Every image every Machine holds, with the rollback image of an unfinished update.
    pub(crate) async fn image_usage_now(&self) -> Result<Vec<ImageUsage>> {
        let mut usage = Vec::new();
        for record in self.inner.store.list_all().await? {
            let layers = |stack: &RootfsStack| {
                stack
                    .image_layers
                    .iter()
                    .map(|layer| layer.digest.clone())
                    .collect::<Vec<_>>()
            };
            let images = &self.inner.images;
            let sizes = |layers: &[String]| {
                layers
                    .iter()
                    .map(|digest| images.layer_size(digest).ok().flatten().unwrap_or(0))
                    .collect::<Vec<u64>>()
            };
            if let Some(PendingOp::Update { previous }) = &record.pending {
                usage.push(ImageUsage {
                    machine_id: record.id.clone(),
                    app: record.app.clone(),
                    image: previous.image_ref.clone(),
                    layer_bytes: sizes(&layers(&previous.rootfs)),
                    layers: layers(&previous.rootfs),
                });
            }
            usage.push(ImageUsage {
                machine_id: record.id.clone(),
                app: record.app.clone(),
                image: record.image_ref.clone(),
                layer_bytes: sizes(&layers(&record.rootfs)),
                layers: layers(&record.rootfs),
            });
        }
        Ok(usage)
    }
}

/// The pull steps worth a line in a Machine's history.
fn pull_milestone(event: &PullEvent) -> Option<String> {
    let layer = event.layer.as_deref().unwrap_or("");
    match event.status {
        PullStatus::Resolved => Some(format!("resolved; {} bytes of layers", event.bytes_total)),
        PullStatus::Exists => Some(format!("layer {layer} already stored")),
        PullStatus::Downloaded => Some(format!(
            "layer {layer} downloaded ({} bytes)",
            event.bytes_total
        )),
        PullStatus::Done => Some("image stored".to_owned()),
        PullStatus::Waiting | PullStatus::Downloading | PullStatus::Unpacked => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `image_ref` carries Fly's `registry` apart and the image config's labels.
    #[test]
    fn the_image_ref_names_the_registry_and_carries_the_labels() {
        let image = ResolvedImage {
            reference: berth_image::ImageReference::parse("registry.example:5000/team/app:1")
                .expect("reference"),
            manifest_digest: "sha256:0".into(),
            layer_digests: Vec::new(),
            layer_dirs: Vec::new(),
            config: berth_image::RuntimeConfig {
                entrypoint: Vec::new(),
                cmd: Vec::new(),
                env: Vec::new(),
                working_dir: None,
                user: None,
                labels: [("fly.version".to_owned(), "7".to_owned())].into(),
            },
            size_bytes: 0,
            unpacked_bytes: 0,
        };
        let image_ref = Agent::image_ref(&image);
        assert_eq!(image_ref.registry.as_deref(), Some("registry.example:5000"));
        assert_eq!(image_ref.repository, "registry.example:5000/team/app");
        assert_eq!(image_ref.tag.as_deref(), Some("1"));
        assert_eq!(image_ref.labels["fly.version"], "7");
    }
}
