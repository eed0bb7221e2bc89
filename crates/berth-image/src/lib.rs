//! OCI images on a worker: references, the content-addressed store, and unpacking.
//!
//! Blobs live under `blobs/sha256/<hex>` and are verified against their digest before
//! they are trusted. Each layer is unpacked once into `layers/sha256/<hex>/` (keyed by the
//! layer blob's digest) and shared read-only, as an overlayfs lowerdir, by every Machine
//! that uses it. Tags map names to manifest digests under `refs/`.

pub mod build;
pub mod gc;
pub mod pull;
pub mod push;
pub mod reference;
pub mod store;
pub mod unpack;

mod error;
pub use build::{busybox_layer, Compression, ImageBuilder, LayerBuilder};
pub use error::{ImageError, REGISTRY_RETRY_AFTER_MS};
pub use gc::{Collection, InUse, Lease, PruneReport};
pub use pull::{
    is_public_address, no_progress, ImagePuller, Progress, PullEvent, PullPlan, PullScope,
    PullSource, PullStatus, RegistryCredentials, RegistryOptions,
};
pub use push::{delete_manifest, push_stored, Deleted, PushReport, PushTarget};
pub use reference::ImageReference;
pub use store::{ImageInfo, ImageStore, ResolvedImage, RuntimeConfig, PLATFORM_ARCH, PLATFORM_OS};
pub use unpack::{
    charged_size, decompressing_reader, unpack_layer, unpack_layer_within, Budget, UnpackLimits,
    UnpackStats, BLOCK,
};
