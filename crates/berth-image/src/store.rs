//! The content-addressed image store.
//!
//! Layout under the root:
//! - `blobs/sha256/<hex>`: verified blobs (manifests, configs, layers);
//! - `layers/sha256/<layer-blob-hex>/`: unpacked layers, complete once the directory
//!   exists under its final name;
//! - `sizes/sha256/<layer-blob-hex>`: the unpacked size charged for that layer, written
//!   before the layer is published (and recomputed from the tree if missing);
//! - `refs/<escaped name>`: a tag, holding the manifest digest;
//! - `tmp/`: work in progress, renamed into place only once complete and verified.
//!
//! Every publish step is a rename, so concurrent importers (threads or processes)
//! never see partial content: the first rename of a blob or layer wins and the others
//! drop their copy. Stale `tmp/` entries are removed by [`ImageStore::open`] when no
//! other store instance holds the root open (tracked with a shared `flock`).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{FlockOperation, Mode, OFlags, CWD};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{shorten, ImageError};
use crate::gc::Lease;
use crate::reference::{is_sha256_digest, is_sha256_hex, ImageReference};
use crate::unpack::{
    charged_size, decompressing_reader, layer_compression, unpack_layer_within, Budget, TarGuard,
    UnpackLimits, BLOCK,
};

/// The operating system images must target.
pub const PLATFORM_OS: &str = "linux";
/// The architecture images must target (the host's, in OCI/Go naming).
#[cfg(target_arch = "x86_64")]
pub const PLATFORM_ARCH: &str = "amd64";
/// The architecture images must target (the host's, in OCI/Go naming).
#[cfg(target_arch = "aarch64")]
pub const PLATFORM_ARCH: &str = "arm64";
/// The architecture images must target (the host's, in OCI/Go naming).
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub const PLATFORM_ARCH: &str = std::env::consts::ARCH;

pub(crate) const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const MEDIA_DOCKER_MANIFEST: &str =
    "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const MEDIA_DOCKER_INDEX: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const MEDIA_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub(crate) const MEDIA_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

const MAX_LAYOUT_FILE: u64 = 64 << 10;
const MAX_INDEX_JSON: u64 = 4 << 20;
pub(crate) const MAX_MANIFEST: u64 = 4 << 20;
pub(crate) const MAX_CONFIG: u64 = 8 << 20;
/// overlayfs stacks at most 500 lower layers.
const MAX_LAYERS: usize = 500;
pub(crate) const MAX_INDEX_DEPTH: usize = 4;

/// The process defaults of an image config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    /// `Entrypoint`, empty when unset.
    pub entrypoint: Vec<String>,
    /// `Cmd`, empty when unset.
    pub cmd: Vec<String>,
    /// `Env` as `KEY=value` strings.
    pub env: Vec<String>,
    /// `WorkingDir`, when set and non-empty.
    pub working_dir: Option<String>,
    /// `User`, when set and non-empty.
    pub user: Option<String>,
    /// `Labels`, as the image's metadata (a Machine's `image_ref.labels`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// An image ready to run: its manifest and unpacked layers.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The name as resolved (tag kept).
    pub reference: ImageReference,
    /// `sha256:<hex>` of the manifest.
    pub manifest_digest: String,
    /// Layer blob digests, bottom first.
    pub layer_digests: Vec<String>,
    /// Unpacked, read-only, shared layer directories, bottom first (same order).
    pub layer_dirs: Vec<PathBuf>,
    /// Process defaults from the image config.
    pub config: RuntimeConfig,
    /// Sum of the compressed layer sizes.
    pub size_bytes: u64,
    /// Sum of the unpacked layer sizes (see [`crate::unpack::charged_size`]).
    pub unpacked_bytes: u64,
}

/// One tag, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Canonical name.
    pub name: String,
    /// Manifest digest.
    pub digest: String,
    /// Sum of the compressed layer sizes.
    pub size_bytes: u64,
    /// Sum of the unpacked layer sizes; layers not unpacked on this host count 0.
    #[serde(default)]
    pub unpacked_bytes: u64,
    /// Number of layers.
    pub layers: usize,
}

/// The on-disk image store. Cheap to share; all methods take `&self` and are safe to
/// call concurrently from many threads and processes.
#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    limits: UnpackLimits,
    /// Held with a shared `flock` while this store is open, so that another opener
    /// knows not to clean `tmp/`.
    _lock: File,
    /// Layers unpacked by this instance (for metrics and tests).
    unpacked: AtomicU64,
    /// Digests that creates and pulls in flight are about to use; garbage collection
    /// leaves them alone.
    pub(crate) leases: crate::gc::LeaseTable,
}

// ---- JSON documents, parsed leniently (unknown fields ignored) but validated. ----

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub(crate) media_type: String,
    pub(crate) digest: String,
    pub(crate) size: u64,
    #[serde(default)]
    pub(crate) platform: Option<Platform>,
    #[serde(default)]
    annotations: Option<HashMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Platform {
    #[serde(default)]
    pub(crate) architecture: String,
    #[serde(default)]
    pub(crate) os: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct IndexDoc {
    pub(crate) schema_version: u32,
    #[serde(default)]
    pub(crate) media_type: Option<String>,
    #[serde(default)]
    pub(crate) manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct ConfigDoc {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    config: Option<ContainerConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    labels: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutDoc {
    image_layout_version: String,
}

/// A validated manifest.
pub(crate) struct Manifest {
    pub(crate) config: Descriptor,
    pub(crate) layers: Vec<Descriptor>,
}

pub(crate) fn is_manifest_type(media_type: &str) -> bool {
    media_type == MEDIA_OCI_MANIFEST || media_type == MEDIA_DOCKER_MANIFEST
}

pub(crate) fn is_index_type(media_type: &str) -> bool {
    media_type == MEDIA_OCI_INDEX || media_type == MEDIA_DOCKER_INDEX
}

pub(crate) fn parse_json<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    what: &str,
) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| ImageError::invalid(format!("bad {what}: {e}")))
}

/// The hex part of a descriptor's digest, refusing anything but sha256.
pub(crate) fn descriptor_hex(desc: &Descriptor) -> Result<&str, ImageError> {
    if !is_sha256_digest(&desc.digest) {
        return Err(ImageError::invalid(format!(
            "unsupported or malformed digest {:?}",
            shorten(&desc.digest)
        )));
    }
    Ok(&desc.digest["sha256:".len()..])
}

pub(crate) fn parse_manifest(bytes: &[u8]) -> Result<Manifest, ImageError> {
    let doc: ManifestDoc = parse_json(bytes, "image manifest")?;
    if doc.schema_version != 2 {
        return Err(ImageError::invalid("manifest schemaVersion must be 2"));
    }
    if let Some(media_type) = &doc.media_type {
        if !is_manifest_type(media_type) {
            return Err(ImageError::invalid(format!(
                "unsupported manifest media type {:?}",
                shorten(media_type)
            )));
        }
    }
    let config_type = doc.config.media_type.as_str();
    if config_type != MEDIA_OCI_CONFIG && config_type != MEDIA_DOCKER_CONFIG {
        return Err(ImageError::invalid(format!(
            "unsupported config media type {:?}",
            shorten(config_type)
        )));
    }
    descriptor_hex(&doc.config)?;
    if doc.layers.len() > MAX_LAYERS {
        return Err(ImageError::invalid(format!(
            "more than {MAX_LAYERS} layers"
        )));
    }
    for layer in &doc.layers {
        descriptor_hex(layer)?;
        layer_compression(&layer.media_type)?;
    }
    Ok(Manifest {
        config: doc.config,
        layers: doc.layers,
    })
}

pub(crate) fn parse_config(bytes: &[u8]) -> Result<RuntimeConfig, ImageError> {
    let doc: ConfigDoc = parse_json(bytes, "image config")?;
    let os = doc.os.unwrap_or_default();
    let arch = doc.architecture.unwrap_or_default();
    if (!os.is_empty() && os != PLATFORM_OS) || (!arch.is_empty() && arch != PLATFORM_ARCH) {
        return Err(ImageError::PlatformUnsupported(format!(
            "{PLATFORM_OS}/{PLATFORM_ARCH} (image is {}/{})",
            shorten(&os),
            shorten(&arch)
        )));
    }
    let c = doc.config.unwrap_or(ContainerConfig {
        entrypoint: None,
        cmd: None,
        env: None,
        working_dir: None,
        user: None,
        labels: None,
    });
    Ok(RuntimeConfig {
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        env: c.env.unwrap_or_default(),
        working_dir: c.working_dir.filter(|s| !s.is_empty()),
        user: c.user.filter(|s| !s.is_empty()),
        labels: c.labels.unwrap_or_default(),
    })
}

/// The part after `sha256:` (callers validate it).
pub(crate) fn digest_hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub(crate) fn verify_bytes(bytes: &[u8], desc: &Descriptor) -> Result<(), ImageError> {
    let hex = descriptor_hex(desc)?;
    if bytes.len() as u64 != desc.size {
        return Err(ImageError::invalid(format!(
            "blob {} has {} bytes, descriptor says {}",
            desc.digest,
            bytes.len(),
            desc.size
        )));
    }
    if sha256_hex(bytes) != hex {
        return Err(ImageError::invalid(format!(
            "blob {} does not match its digest",
            desc.digest
        )));
    }
    Ok(())
}

/// Reads at most `max` bytes; more is an invalid image.
pub(crate) fn read_capped<R: Read>(reader: R, max: u64, what: &str) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::new();
    reader
        .take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| ImageError::io(format!("reading {what}"), e))?;
    if out.len() as u64 > max {
        return Err(ImageError::invalid(format!(
            "{what} larger than {max} bytes"
        )));
    }
    Ok(out)
}

/// Ref file names: the canonical name with its only non-filename-safe characters
/// mapped one to one, so names stay reversible and within NAME_MAX.
fn escape_name(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '/' => '+',
            ':' => '=',
            '@' => '%',
            c => c,
        })
        .collect()
}

fn unescape_name(file: &str) -> String {
    file.chars()
        .map(|c| match c {
            '+' => '/',
            '=' => ':',
            '%' => '@',
            c => c,
        })
        .collect()
}

/// Removes a tmp path on drop unless disarmed.
pub(crate) struct TmpPath {
    pub(crate) path: PathBuf,
    armed: bool,
}

impl TmpPath {
    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TmpPath {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let result = match fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.is_dir() => fs::remove_dir_all(&self.path),
            Ok(_) => fs::remove_file(&self.path),
            Err(_) => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(path = %self.path.display(), error = %e, "failed to remove temporary path");
        }
    }
}

/// A reader that hashes and counts what passes through.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    fn finish(self) -> (String, u64) {
        (hex::encode(self.hasher.finalize()), self.count)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Opens a regular file under `dir` without following symlinks or blocking on FIFOs.
fn open_regular_at(dir: &OwnedFd, name: &str) -> Result<Option<File>, ImageError> {
    let fd = match rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(Errno::LOOP) => {
            return Err(ImageError::invalid(format!(
                "{name} in the layout is a symlink"
            )))
        }
        Err(e) => {
            return Err(ImageError::errno(
                format!("opening {name} in the layout"),
                e,
            ))
        }
    };
    let stat =
        rustix::fs::fstat(&fd).map_err(|e| ImageError::errno("inspecting layout file", e))?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(ImageError::invalid(format!(
            "{name} in the layout is not a regular file"
        )));
    }
    Ok(Some(File::from(fd)))
}

/// A source OCI layout directory.
struct Layout {
    root: OwnedFd,
    blobs: Option<OwnedFd>,
    /// Set for a layout this store extracted from an archive: its blobs were already
    /// verified against their names and live in `tmp/`, so they can be renamed in.
    extracted: Option<PathBuf>,
}

impl Layout {
    fn open(path: &Path, extracted: bool) -> Result<Layout, ImageError> {
        let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let root =
            rustix::fs::openat(CWD, path, dir_flags, Mode::empty()).map_err(|e| match e {
                Errno::NOENT | Errno::NOTDIR => {
                    ImageError::invalid(format!("no OCI layout at {}", path.display()))
                }
                e => ImageError::errno(format!("opening {}", path.display()), e),
            })?;
        let nofollow = dir_flags | OFlags::NOFOLLOW;
        let blobs = match rustix::fs::openat(&root, "blobs", nofollow, Mode::empty()) {
            Ok(blobs) => match rustix::fs::openat(&blobs, "sha256", nofollow, Mode::empty()) {
                Ok(fd) => Some(fd),
                Err(Errno::NOENT) => None,
                Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                    return Err(ImageError::invalid(
                        "layout blobs/sha256 is not a directory",
                    ))
                }
                Err(e) => return Err(ImageError::errno("opening layout blobs", e)),
            },
            Err(Errno::NOENT) => None,
            Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                return Err(ImageError::invalid("layout blobs is not a directory"))
            }
            Err(e) => return Err(ImageError::errno("opening layout blobs", e)),
        };
        Ok(Layout {
            root,
            blobs,
            extracted: extracted.then(|| path.to_path_buf()),
        })
    }

    fn read_file(&self, name: &str, max: u64) -> Result<Vec<u8>, ImageError> {
        match open_regular_at(&self.root, name)? {
            Some(file) => read_capped(file, max, name),
            None => Err(ImageError::invalid(format!("layout has no {name}"))),
        }
    }

    fn open_blob(&self, desc: &Descriptor) -> Result<File, ImageError> {
        let hex = descriptor_hex(desc)?;
        let missing =
            || ImageError::invalid(format!("blob {} missing from the layout", desc.digest));
        let blobs = self.blobs.as_ref().ok_or_else(missing)?;
        open_regular_at(blobs, hex)?.ok_or_else(missing)
    }
}

/// Blobs and layers prepared in `tmp/` by one import, published by `commit`.
#[derive(Default)]
struct Staging {
    /// (tmp path, final path) of blobs not yet in the store.
    blobs: Vec<(TmpPath, PathBuf)>,
    /// hex -> where the blob can be read from until commit.
    blob_paths: HashMap<String, PathBuf>,
    /// (tmp dir, layer hex, unpacked size) of unpacked layers.
    layers: Vec<(TmpPath, String, u64)>,
    layer_hexes: HashSet<String>,
}

impl ImageStore {
    /// Opens (creating if needed) a store at `root`. When no other store instance has
    /// `root` open, leftovers of crashed imports in `tmp/` are removed.
    pub fn open(root: &Path, limits: UnpackLimits) -> Result<ImageStore, ImageError> {
        let root = root.to_path_buf();
        for dir in [
            "blobs/sha256",
            "layers/sha256",
            "sizes/sha256",
            "refs",
            "tmp",
        ] {
            let path = root.join(dir);
            fs::create_dir_all(&path)
                .map_err(|e| ImageError::io(format!("creating {}", path.display()), e))?;
        }
        let lock_path = root.join("lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(|e| ImageError::io(format!("opening {}", lock_path.display()), e))?;
        match rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                let store = ImageStore {
                    root,
                    limits,
                    _lock: lock,
                    unpacked: AtomicU64::new(0),
                    leases: Default::default(),
                };
                store.clean_tmp()?;
                rustix::fs::flock(&store._lock, FlockOperation::LockShared)
                    .map_err(|e| ImageError::errno("locking the image store", e))?;
                Ok(store)
            }
            Err(Errno::WOULDBLOCK) => {
                rustix::fs::flock(&lock, FlockOperation::LockShared)
                    .map_err(|e| ImageError::errno("locking the image store", e))?;
                Ok(ImageStore {
                    root,
                    limits,
                    _lock: lock,
                    unpacked: AtomicU64::new(0),
                    leases: Default::default(),
                })
            }
            Err(e) => Err(ImageError::errno("locking the image store", e)),
        }
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How many layers this instance has unpacked since it was opened.
    pub fn layers_unpacked(&self) -> u64 {
        self.unpacked.load(Ordering::Relaxed)
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub(crate) fn blob_path(&self, hex: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(hex)
    }

    pub(crate) fn layer_path(&self, hex: &str) -> PathBuf {
        self.root.join("layers/sha256").join(hex)
    }

    pub(crate) fn size_path(&self, hex: &str) -> PathBuf {
        self.root.join("sizes/sha256").join(hex)
    }

    /// The limits this store unpacks with.
    pub fn limits(&self) -> &UnpackLimits {
        &self.limits
    }

    /// A budget for one image's layers: the per-image cap.
    pub fn image_budget(&self) -> Budget {
        Budget::new(
            self.limits.max_image_bytes,
            format!(
                "the per-image limit of {} bytes unpacked",
                self.limits.max_image_bytes
            ),
        )
    }

    /// The unpacked size of a stored layer, `None` when it is not unpacked here. A
    /// layer unpacked before sizes were recorded is measured once and recorded.
    pub fn layer_size(&self, layer_digest: &str) -> Result<Option<u64>, ImageError> {
        let hex = digest_hex(layer_digest);
        if !is_sha256_hex(hex) {
            return Err(ImageError::invalid_reference(layer_digest, "bad digest"));
        }
        let dir = self.layer_path(hex);
        if !dir.is_dir() {
            return Ok(None);
        }
        if let Ok(text) = fs::read_to_string(self.size_path(hex)) {
            if let Ok(size) = text.trim().parse::<u64>() {
                return Ok(Some(size));
            }
        }
        let size = measure_tree(&dir)?;
        self.write_size(hex, size)?;
        Ok(Some(size))
    }

    /// Sum of the unpacked sizes of `layer_digests` (missing layers count 0).
    pub fn unpacked_size<'a>(
        &self,
        layer_digests: impl IntoIterator<Item = &'a String>,
    ) -> Result<u64, ImageError> {
        let mut total: u64 = 0;
        for digest in layer_digests {
            total = total.saturating_add(self.layer_size(digest)?.unwrap_or(0));
        }
        Ok(total)
    }

    fn write_size(&self, hex: &str, size: u64) -> Result<(), ImageError> {
        let (mut file, tmp) = self.new_tmp_file("size-")?;
        file.write_all(format!("{size}\n").as_bytes())
            .map_err(|e| ImageError::io("writing a layer size", e))?;
        fs::rename(&tmp.path, self.size_path(hex))
            .map_err(|e| ImageError::io("writing a layer size", e))?;
        tmp.disarm();
        Ok(())
    }

    pub(crate) fn ref_path(&self, reference: &ImageReference) -> PathBuf {
        self.root.join("refs").join(escape_name(&reference.name()))
    }

    fn clean_tmp(&self) -> Result<(), ImageError> {
        let tmp = self.tmp_dir();
        let entries = fs::read_dir(&tmp)
            .map_err(|e| ImageError::io(format!("listing {}", tmp.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| ImageError::io("listing tmp", e))?;
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing stale temporary entry");
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            let result = if is_dir {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            result.map_err(|e| ImageError::io(format!("removing {}", path.display()), e))?;
        }
        Ok(())
    }

    pub(crate) fn new_tmp_file(&self, prefix: &str) -> Result<(File, TmpPath), ImageError> {
        let named = tempfile::Builder::new()
            .prefix(prefix)
            .tempfile_in(self.tmp_dir())
            .map_err(|e| ImageError::io("creating a temporary file", e))?;
        let (file, path) = named
            .keep()
            .map_err(|e| ImageError::io("creating a temporary file", e.error))?;
        Ok((file, TmpPath { path, armed: true }))
    }

    pub(crate) fn new_tmp_dir(&self, prefix: &str) -> Result<TmpPath, ImageError> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(self.tmp_dir())
            .map_err(|e| ImageError::io("creating a temporary directory", e))?;
        Ok(TmpPath {
            path: dir.keep(),
            armed: true,
        })
    }

    /// Import an OCI image layout directory (oci-layout + index.json + blobs/) or an
    /// OCI archive (a tar of such a layout, optionally gzip or zstd compressed) under
    /// `name`.
    ///
    /// Every blob's sha256 and size is verified in `tmp/`; blobs and unpacked layers are
    /// renamed into place only once everything verified, and the tag is written last.
    pub fn import(&self, source: &Path, name: &str) -> Result<ResolvedImage, ImageError> {
        let reference = ImageReference::parse(name)?;
        let meta = fs::metadata(source).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                ImageError::invalid(format!("{} does not exist", source.display()))
            }
            _ => ImageError::io(format!("inspecting {}", source.display()), e),
        })?;
        if meta.is_dir() {
            let layout = Layout::open(source, false)?;
            self.import_layout(&layout, reference)
        } else {
            let extracted = self.extract_archive(source)?;
            let layout = Layout::open(&extracted.path, true)?;
            self.import_layout(&layout, reference)
        }
    }

    fn import_layout(
        &self,
        layout: &Layout,
        reference: ImageReference,
    ) -> Result<ResolvedImage, ImageError> {
        let layout_doc: LayoutDoc = parse_json(
            &layout.read_file("oci-layout", MAX_LAYOUT_FILE)?,
            "oci-layout",
        )?;
        if !layout_doc.image_layout_version.starts_with("1.") {
            return Err(ImageError::invalid(format!(
                "unsupported imageLayoutVersion {:?}",
                shorten(&layout_doc.image_layout_version)
            )));
        }
        let index: IndexDoc = parse_json(
            &layout.read_file("index.json", MAX_INDEX_JSON)?,
            "index.json",
        )?;
        let (manifest_desc, manifest_bytes) = self.select_manifest(layout, index, &reference, 0)?;
        let manifest_hex = descriptor_hex(&manifest_desc)?.to_string();
        if let Some(digest) = &reference.digest {
            if *digest != manifest_desc.digest {
                return Err(ImageError::invalid(format!(
                    "layout holds manifest {}, not {digest}",
                    manifest_desc.digest
                )));
            }
        }
        let manifest = parse_manifest(&manifest_bytes)?;
        // Held until the tag is written, so a concurrent prune cannot take what this
        // import publishes before the tag makes it reachable.
        let lease = self.lease();
        lease.add(&manifest_hex);
        lease.add(descriptor_hex(&manifest.config)?);
        for layer in &manifest.layers {
            lease.add(descriptor_hex(layer)?);
        }

        let mut staging = Staging::default();
        self.stage_bytes(&mut staging, &manifest_hex, &manifest_bytes)?;
        let config_bytes = self.read_json_blob(Some(layout), &manifest.config, MAX_CONFIG)?;
        let config = parse_config(&config_bytes)?;
        self.stage_bytes(
            &mut staging,
            descriptor_hex(&manifest.config)?,
            &config_bytes,
        )?;

        let budget = self.image_budget();
        for layer in &manifest.layers {
            let hex = descriptor_hex(layer)?.to_string();
            let final_dir = self.layer_path(&hex);
            if staging.layer_hexes.contains(&hex) {
                continue;
            }
            if final_dir.is_dir() {
                budget.take(self.layer_size(&hex)?.unwrap_or(0))?;
                continue;
            }
            let blob = self.stage_layer_blob(&mut staging, layout, layer, &hex)?;
            let (unpacked, charged) = self.unpack_blob(&blob, layer, &[&budget])?;
            staging.layer_hexes.insert(hex.clone());
            staging.layers.push((unpacked, hex, charged));
        }

        self.commit(staging)?;
        self.write_ref(&reference, &manifest_desc.digest)?;
        Ok(self.resolved(reference, manifest_desc.digest, &manifest, config))
    }

    /// Picks the manifest for this platform from an index, descending into nested
    /// indexes. Returns its descriptor and verified bytes.
    fn select_manifest(
        &self,
        layout: &Layout,
        index: IndexDoc,
        reference: &ImageReference,
        depth: usize,
    ) -> Result<(Descriptor, Vec<u8>), ImageError> {
        if index.schema_version != 2 {
            return Err(ImageError::invalid("index schemaVersion must be 2"));
        }
        if let Some(media_type) = &index.media_type {
            if !is_index_type(media_type) {
                return Err(ImageError::invalid(format!(
                    "unsupported index media type {:?}",
                    shorten(media_type)
                )));
            }
        }
        let usable: Vec<&Descriptor> = index
            .manifests
            .iter()
            .filter(|d| is_manifest_type(&d.media_type) || is_index_type(&d.media_type))
            .collect();
        if usable.is_empty() {
            return Err(ImageError::invalid("index lists no image manifest"));
        }
        let matching: Vec<&Descriptor> = usable
            .iter()
            .copied()
            .filter(|d| {
                d.platform
                    .as_ref()
                    .is_none_or(|p| p.os == PLATFORM_OS && p.architecture == PLATFORM_ARCH)
            })
            .collect();
        if matching.is_empty() {
            return Err(ImageError::PlatformUnsupported(format!(
                "{PLATFORM_OS}/{PLATFORM_ARCH}"
            )));
        }
        // Prefer the entry annotated with the requested name, then an explicit
        // platform match, then the first one.
        let wanted_names = [reference.name(), reference.tag.clone().unwrap_or_default()];
        let chosen = matching
            .iter()
            .find(|d| {
                d.annotations
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME_ANNOTATION))
                    .is_some_and(|n| wanted_names.contains(n))
            })
            .or_else(|| matching.iter().find(|d| d.platform.is_some()))
            .or_else(|| matching.first())
            .copied()
            .ok_or_else(|| ImageError::invalid("index lists no image manifest"))?;

        if is_index_type(&chosen.media_type) {
            if depth >= MAX_INDEX_DEPTH {
                return Err(ImageError::invalid("image indexes nested too deeply"));
            }
            let bytes = self.read_json_blob(Some(layout), chosen, MAX_MANIFEST)?;
            let nested: IndexDoc = parse_json(&bytes, "image index")?;
            return self.select_manifest(layout, nested, reference, depth + 1);
        }
        let bytes = self.read_json_blob(Some(layout), chosen, MAX_MANIFEST)?;
        Ok((chosen.clone(), bytes))
    }

    /// Reads and verifies a small blob, from the store if present, else the layout.
    fn read_json_blob(
        &self,
        layout: Option<&Layout>,
        desc: &Descriptor,
        max: u64,
    ) -> Result<Vec<u8>, ImageError> {
        let hex = descriptor_hex(desc)?;
        if desc.size > max {
            return Err(ImageError::invalid(format!(
                "blob {} larger than {max} bytes",
                desc.digest
            )));
        }
        let bytes = match File::open(self.blob_path(hex)) {
            Ok(file) => read_capped(file, max, "stored blob")?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => match layout {
                Some(layout) => read_capped(layout.open_blob(desc)?, max, "layout blob")?,
                None => {
                    return Err(ImageError::invalid(format!(
                        "blob {} missing from the store",
                        desc.digest
                    )))
                }
            },
            Err(e) => return Err(ImageError::io("opening stored blob", e)),
        };
        verify_bytes(&bytes, desc)?;
        Ok(bytes)
    }

    /// Stages already verified bytes as a blob, unless the store or staging has it.
    fn stage_bytes(
        &self,
        staging: &mut Staging,
        hex: &str,
        bytes: &[u8],
    ) -> Result<(), ImageError> {
        let final_path = self.blob_path(hex);
        if staging.blob_paths.contains_key(hex) || final_path.exists() {
            return Ok(());
        }
        let (mut file, tmp) = self.new_tmp_file("blob-")?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| ImageError::io("writing blob", e))?;
        staging.blob_paths.insert(hex.to_string(), tmp.path.clone());
        staging.blobs.push((tmp, final_path));
        Ok(())
    }

    /// Makes a layer blob available (stored, or verified in `tmp/`) and returns where
    /// to read it.
    fn stage_layer_blob(
        &self,
        staging: &mut Staging,
        layout: &Layout,
        desc: &Descriptor,
        hex: &str,
    ) -> Result<PathBuf, ImageError> {
        if let Some(path) = staging.blob_paths.get(hex) {
            return Ok(path.clone());
        }
        let final_path = self.blob_path(hex);
        match fs::metadata(&final_path) {
            Ok(meta) => {
                if meta.len() != desc.size {
                    return Err(ImageError::invalid(format!(
                        "descriptor size {} of {} does not match the stored blob",
                        desc.size, desc.digest
                    )));
                }
                return Ok(final_path);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ImageError::io("inspecting stored blob", e)),
        }

        let source = layout.open_blob(desc)?;
        if let Some(extracted) = &layout.extracted {
            // Verified against its name while extracting; only the size is left.
            let len = source
                .metadata()
                .map_err(|e| ImageError::io("inspecting layout blob", e))?
                .len();
            if len != desc.size {
                return Err(ImageError::invalid(format!(
                    "blob {} has {len} bytes, descriptor says {}",
                    desc.digest, desc.size
                )));
            }
            let path = extracted.join("blobs/sha256").join(hex);
            staging.blob_paths.insert(hex.to_string(), path.clone());
            staging.blobs.push((
                TmpPath {
                    path: path.clone(),
                    armed: false,
                },
                final_path,
            ));
            return Ok(path);
        }

        let (mut file, tmp) = self.new_tmp_file("blob-")?;
        let mut reader = HashingReader::new(source);
        io::copy(
            &mut (&mut reader).take(desc.size.saturating_add(1)),
            &mut file,
        )
        .map_err(|e| ImageError::io(format!("copying blob {}", desc.digest), e))?;
        let (got_hex, got_size) = reader.finish();
        if got_size != desc.size {
            return Err(ImageError::invalid(format!(
                "blob {} has {}{} bytes, descriptor says {}",
                desc.digest,
                if got_size > desc.size {
                    "more than "
                } else {
                    ""
                },
                got_size.min(desc.size),
                desc.size
            )));
        }
        if got_hex != hex {
            return Err(ImageError::invalid(format!(
                "blob {} does not match its digest",
                desc.digest
            )));
        }
        file.sync_all()
            .map_err(|e| ImageError::io("syncing blob", e))?;
        staging.blob_paths.insert(hex.to_string(), tmp.path.clone());
        staging.blobs.push((tmp, final_path));
        Ok(self.staged_path(staging, hex))
    }

    fn staged_path(&self, staging: &Staging, hex: &str) -> PathBuf {
        staging
            .blob_paths
            .get(hex)
            .cloned()
            .unwrap_or_else(|| self.blob_path(hex))
    }

    /// Unpacks a layer blob into a new `tmp/` directory, verifying the blob's digest
    /// and size as it streams.
    pub(crate) fn unpack_blob(
        &self,
        blob: &Path,
        desc: &Descriptor,
        budgets: &[&Budget],
    ) -> Result<(TmpPath, u64), ImageError> {
        let hex = descriptor_hex(desc)?;
        let file = File::open(blob).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                ImageError::invalid(format!("layer blob {} missing from the store", desc.digest))
            }
            _ => ImageError::io("opening layer blob", e),
        })?;
        let dir = self.new_tmp_dir("layer-")?;
        // The layer root is every Machine's lowest directory.
        fs::set_permissions(
            &dir.path,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .map_err(|e| ImageError::io("preparing layer directory", e))?;
        let mut reader =
            HashingReader::new(io::BufReader::new(file).take(desc.size.saturating_add(1)));
        let stats = {
            let decompressed = decompressing_reader(&desc.media_type, &mut reader)?;
            unpack_layer_within(
                decompressed,
                &dir.path,
                &self.limits,
                Some(desc.size),
                budgets,
            )?
        };
        // The tar may end before its compressed stream: hash the rest too.
        io::copy(&mut reader, &mut io::sink())
            .map_err(|e| ImageError::io("reading layer blob", e))?;
        let (got_hex, got_size) = reader.finish();
        if got_hex != hex || got_size != desc.size {
            return Err(ImageError::invalid(format!(
                "layer blob {} does not match its digest or size",
                desc.digest
            )));
        }
        self.unpacked.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(layer = %desc.digest, entries = stats.entries, bytes = stats.bytes, charged = stats.charged, "unpacked layer");
        Ok((dir, stats.charged))
    }

    /// Publishes staged blobs, then unpacked layers. Losing a race to another importer
    /// is fine: the content is the same.
    fn commit(&self, staging: Staging) -> Result<(), ImageError> {
        for (tmp, final_path) in staging.blobs {
            // A blob already published by someone else is dropped with `tmp`.
            if rename_noreplace(&tmp.path, &final_path)? {
                tmp.disarm();
            }
        }
        sync_dir(&self.root.join("blobs/sha256"))?;
        for (tmp, hex, charged) in staging.layers {
            self.install_layer(tmp, &hex, charged)?;
        }
        Ok(())
    }

    pub(crate) fn install_layer(
        &self,
        tmp: TmpPath,
        hex: &str,
        charged: u64,
    ) -> Result<(), ImageError> {
        let final_dir = &self.layer_path(hex);
        // The size first: a published layer always has one (a crash in between leaves a
        // size without a layer, which the next unpack overwrites).
        self.write_size(hex, charged)?;
        // Unpacked files are not fsynced one by one; flush the filesystem once so the
        // final name never points at a tree that a crash could have left incomplete.
        let dir = File::open(&tmp.path).map_err(|e| ImageError::io("opening unpacked layer", e))?;
        rustix::fs::syncfs(&dir).map_err(|e| ImageError::errno("syncing unpacked layer", e))?;
        drop(dir);
        if rename_noreplace(&tmp.path, final_dir)? {
            tmp.disarm();
        }
        sync_dir(&self.root.join("layers/sha256"))
    }

    pub(crate) fn write_ref(
        &self,
        reference: &ImageReference,
        digest: &str,
    ) -> Result<(), ImageError> {
        let (mut file, tmp) = self.new_tmp_file("ref-")?;
        file.write_all(format!("{digest}\n").as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| ImageError::io("writing tag", e))?;
        let final_path = self.ref_path(reference);
        fs::rename(&tmp.path, &final_path)
            .map_err(|e| ImageError::io(format!("writing tag {reference}"), e))?;
        tmp.disarm();
        sync_dir(&self.root.join("refs"))
    }

    pub(crate) fn read_ref(
        &self,
        reference: &ImageReference,
    ) -> Result<Option<String>, ImageError> {
        let path = self.ref_path(reference);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ImageError::io(format!("reading tag {reference}"), e)),
        };
        let digest = text.trim();
        if !is_sha256_digest(digest) {
            return Err(ImageError::Internal(format!(
                "corrupt tag file for {reference}"
            )));
        }
        Ok(Some(digest.to_string()))
    }

    /// Resolve a name (tag or `@digest`) to its manifest and unpacked layers, unpacking
    /// any layer not yet unpacked. A digest reference is content-addressed: it resolves
    /// whenever the store holds that manifest, whatever the repository name.
    pub fn resolve(&self, name: &str) -> Result<ResolvedImage, ImageError> {
        self.resolve_leased(name, &self.lease())
    }

    /// [`ImageStore::resolve`], with every digest it touches held by `lease` so that a
    /// concurrent prune leaves them alone.
    pub fn resolve_leased(&self, name: &str, lease: &Lease) -> Result<ResolvedImage, ImageError> {
        let reference = ImageReference::parse(name)?;
        let digest = match &reference.digest {
            Some(digest) => digest.clone(),
            None => self
                .read_ref(&reference)?
                .ok_or_else(|| ImageError::NotFound(reference.name()))?,
        };
        self.load(reference, &digest, lease)
    }

    /// Resolve by manifest digest, independent of any tag. The returned reference names
    /// a repository currently tagged with this digest, if any (else `unnamed`), in
    /// digest form.
    pub fn resolve_digest(&self, manifest_digest: &str) -> Result<ResolvedImage, ImageError> {
        self.resolve_digest_leased(manifest_digest, &self.lease())
    }

    /// [`ImageStore::resolve_digest`] under a lease.
    pub fn resolve_digest_leased(
        &self,
        manifest_digest: &str,
        lease: &Lease,
    ) -> Result<ResolvedImage, ImageError> {
        if !is_sha256_digest(manifest_digest) {
            return Err(ImageError::invalid_reference(
                manifest_digest,
                "digest must be sha256:<64 lowercase hex>",
            ));
        }
        let tagged = self
            .tags()?
            .into_iter()
            .filter(|(_, digest)| digest == manifest_digest)
            .map(|(reference, _)| reference)
            .min_by_key(|reference| reference.name());
        let reference = ImageReference {
            registry: tagged.as_ref().and_then(|r| r.registry.clone()),
            repository: tagged.map_or_else(|| "unnamed".to_string(), |r| r.repository),
            tag: None,
            digest: Some(manifest_digest.to_string()),
        };
        self.load(reference, manifest_digest, lease)
    }

    pub(crate) fn load(
        &self,
        reference: ImageReference,
        digest: &str,
        lease: &Lease,
    ) -> Result<ResolvedImage, ImageError> {
        let hex = digest_hex(digest);
        if !is_sha256_hex(hex) {
            return Err(ImageError::invalid_reference(digest, "bad digest"));
        }
        // Leased before anything is read: a prune either ran before (and the image is
        // gone) or leaves everything below alone.
        lease.add(hex);
        let manifest_path = self.blob_path(hex);
        let bytes = match File::open(&manifest_path) {
            Ok(file) => read_capped(file, MAX_MANIFEST, "stored manifest")?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::NotFound(reference.name()))
            }
            Err(e) => return Err(ImageError::io("opening stored manifest", e)),
        };
        if sha256_hex(&bytes) != hex {
            return Err(ImageError::invalid(format!(
                "stored manifest {digest} is corrupt"
            )));
        }
        let manifest = parse_manifest(&bytes)?;
        lease.add(descriptor_hex(&manifest.config)?);
        for layer in &manifest.layers {
            lease.add(descriptor_hex(layer)?);
        }
        let config = parse_config(&self.read_json_blob(None, &manifest.config, MAX_CONFIG)?)?;
        let budget = self.image_budget();
        for layer in &manifest.layers {
            match self.layer_size(&layer.digest)? {
                Some(size) => budget.take(size)?,
                None => self.ensure_layer(layer, &[&budget])?,
            }
        }
        Ok(self.resolved(reference, digest.to_string(), &manifest, config))
    }

    /// Makes sure a stored layer blob is unpacked.
    pub(crate) fn ensure_layer(
        &self,
        desc: &Descriptor,
        budgets: &[&Budget],
    ) -> Result<(), ImageError> {
        let hex = descriptor_hex(desc)?;
        let final_dir = self.layer_path(hex);
        if final_dir.is_dir() {
            return Ok(());
        }
        let (unpacked, charged) = self.unpack_blob(&self.blob_path(hex), desc, budgets)?;
        self.install_layer(unpacked, hex, charged)
    }

    pub(crate) fn resolved(
        &self,
        reference: ImageReference,
        manifest_digest: String,
        manifest: &Manifest,
        config: RuntimeConfig,
    ) -> ResolvedImage {
        let layer_digests: Vec<String> = manifest.layers.iter().map(|l| l.digest.clone()).collect();
        let layer_dirs = layer_digests
            .iter()
            .map(|d| self.layer_path(digest_hex(d)))
            .collect();
        let unpacked_bytes = self.unpacked_size(&layer_digests).unwrap_or(0);
        ResolvedImage {
            reference,
            manifest_digest,
            layer_digests,
            layer_dirs,
            config,
            unpacked_bytes,
            size_bytes: manifest
                .layers
                .iter()
                .map(|l| l.size)
                .fold(0, u64::saturating_add),
        }
    }

    /// Removes a tag. The content stays, so digests keep resolving.
    pub fn untag(&self, name: &str) -> Result<(), ImageError> {
        let reference = ImageReference::parse(name)?;
        match fs::remove_file(self.ref_path(&reference)) {
            Ok(()) => sync_dir(&self.root.join("refs")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(ImageError::NotFound(reference.name()))
            }
            Err(e) => Err(ImageError::io(format!("removing tag {reference}"), e)),
        }
    }

    /// All tags and their digests.
    pub(crate) fn tags(&self) -> Result<Vec<(ImageReference, String)>, ImageError> {
        let refs = self.root.join("refs");
        let entries = fs::read_dir(&refs)
            .map_err(|e| ImageError::io(format!("listing {}", refs.display()), e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| ImageError::io("listing refs", e))?;
            let Some(file_name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let Ok(reference) = ImageReference::parse(&unescape_name(&file_name)) else {
                continue;
            };
            if escape_name(&reference.name()) != file_name {
                continue;
            }
            match self.read_ref(&reference) {
                Ok(Some(digest)) => out.push((reference, digest)),
                Ok(None) => {}
                Err(e) => tracing::warn!(file = %file_name, error = %e, "skipping unreadable tag"),
            }
        }
        Ok(out)
    }

    /// One entry per tag, sorted by name.
    pub fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        let mut out = Vec::new();
        for (reference, digest) in self.tags()? {
            let hex = digest_hex(&digest);
            let manifest = File::open(self.blob_path(hex))
                .map_err(|e| ImageError::io("opening stored manifest", e))
                .and_then(|file| read_capped(file, MAX_MANIFEST, "stored manifest"))
                .and_then(|bytes| parse_manifest(&bytes));
            match manifest {
                Ok(manifest) => out.push(ImageInfo {
                    name: reference.name(),
                    digest,
                    size_bytes: manifest
                        .layers
                        .iter()
                        .map(|l| l.size)
                        .fold(0, u64::saturating_add),
                    unpacked_bytes: self
                        .unpacked_size(manifest.layers.iter().map(|l| &l.digest))
                        .unwrap_or(0),
                    layers: manifest.layers.len(),
                }),
                Err(e) => {
                    tracing::warn!(name = %reference, error = %e, "skipping tag with unreadable manifest")
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Extracts the layout files of an OCI archive into a new `tmp/` directory,
    /// verifying each blob against its name. Other members are ignored.
    fn extract_archive(&self, source: &Path) -> Result<TmpPath, ImageError> {
        let file = File::open(source)
            .map_err(|e| ImageError::io(format!("opening {}", source.display()), e))?;
        let mut input = io::BufReader::new(file);
        let magic = io::BufRead::fill_buf(&mut input)
            .map_err(|e| ImageError::io(format!("reading {}", source.display()), e))?
            .to_vec();
        let reader: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::MultiGzDecoder::new(input))
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(
                zstd::stream::read::Decoder::with_buffer(input)
                    .map_err(|e| ImageError::io("starting zstd decoder", e))?,
            )
        } else {
            Box::new(input)
        };

        let dir = self.new_tmp_dir("archive-")?;
        let blobs_dir = dir.path.join("blobs/sha256");
        fs::create_dir_all(&blobs_dir)
            .map_err(|e| ImageError::io("preparing archive extraction", e))?;
        let mut archive = tar::Archive::new(TarGuard::new(reader, u64::MAX));
        let entries = archive.entries().map_err(archive_error)?;
        let mut count: u64 = 0;
        for entry in entries {
            let mut entry = entry.map_err(archive_error)?;
            count += 1;
            if count > self.limits.max_entries {
                return Err(ImageError::invalid("archive has too many entries"));
            }
            let path = entry.path_bytes().into_owned();
            let mut rel: &[u8] = &path;
            while let Some(rest) = rel.strip_prefix(b"./") {
                rel = rest;
            }
            let (target, max) = match rel {
                b"oci-layout" => (dir.path.join("oci-layout"), MAX_LAYOUT_FILE),
                b"index.json" => (dir.path.join("index.json"), MAX_INDEX_JSON),
                _ => match rel.strip_prefix(b"blobs/sha256/") {
                    Some(hex) if std::str::from_utf8(hex).is_ok_and(is_sha256_hex) => {
                        let hex = String::from_utf8_lossy(hex).into_owned();
                        (
                            blobs_dir.join(hex),
                            self.limits.max_layer_bytes.max(MAX_CONFIG),
                        )
                    }
                    // Directories and anything outside the layout are not needed.
                    _ => continue,
                },
            };
            let kind = entry.header().entry_type();
            if kind != tar::EntryType::Regular && kind != tar::EntryType::Continuous {
                return Err(ImageError::invalid(format!(
                    "archive member {} is not a regular file",
                    crate::error::show_bytes(rel)
                )));
            }
            if entry.size() > max {
                return Err(ImageError::invalid(format!(
                    "archive member {} is larger than {max} bytes",
                    crate::error::show_bytes(rel)
                )));
            }
            // Names were validated above, so `target` is always inside `dir`.
            let mut out =
                File::create(&target).map_err(|e| ImageError::io("writing archive member", e))?;
            let mut reader = HashingReader::new(&mut entry);
            let copied = copy_split(&mut reader, &mut out)?;
            let (got_hex, _) = reader.finish();
            if copied != entry.size() {
                return Err(ImageError::invalid("archive member is truncated"));
            }
            if let Some(hex) = rel.strip_prefix(b"blobs/sha256/") {
                if got_hex.as_bytes() != hex {
                    return Err(ImageError::invalid(format!(
                        "blob sha256:{} in the archive does not match its digest",
                        String::from_utf8_lossy(hex)
                    )));
                }
                // Extracted blobs are renamed into the store as they are.
                out.sync_all()
                    .map_err(|e| ImageError::io("syncing archive member", e))?;
            }
        }
        Ok(dir)
    }
}

/// The unpacked size of a tree, counted as the unpacker charges it: a block at least per
/// entry, file contents in blocks, a further name of a hard-linked file one block.
fn measure_tree(root: &Path) -> Result<u64, ImageError> {
    use std::os::unix::fs::MetadataExt;
    let mut total: u64 = 0;
    let mut seen = HashSet::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = fs::read_dir(&dir)
            .map_err(|e| ImageError::io(format!("measuring {}", dir.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| ImageError::io("measuring a layer", e))?;
            let meta = entry
                .metadata()
                .map_err(|e| ImageError::io("measuring a layer", e))?;
            let cost = if meta.is_dir() {
                pending.push(entry.path());
                BLOCK
            } else if (meta.is_file() && (meta.nlink() < 2 || seen.insert(meta.ino())))
                || meta.file_type().is_symlink()
            {
                charged_size(meta.len())
            } else {
                BLOCK
            };
            total = total.saturating_add(cost);
        }
    }
    Ok(total)
}

fn archive_error(e: io::Error) -> ImageError {
    if e.raw_os_error().is_some() {
        ImageError::io("reading archive", e)
    } else {
        ImageError::invalid(format!("malformed archive: {e}"))
    }
}

/// Copies, telling read errors (a bad archive) from write errors (the disk).
fn copy_split<R: Read, W: Write>(reader: &mut R, writer: &mut W) -> Result<u64, ImageError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(archive_error(e)),
        };
        writer
            .write_all(&buf[..n])
            .map_err(|e| ImageError::io("writing archive member", e))?;
        total += n as u64;
    }
}

/// Renames without replacing. Returns false when `to` already existed (another
/// importer won); `from` is then left for the caller to discard.
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> Result<bool, ImageError> {
    match rustix::fs::renameat_with(CWD, from, CWD, to, rustix::fs::RenameFlags::NOREPLACE) {
        Ok(()) => Ok(true),
        Err(Errno::EXIST) | Err(Errno::NOTEMPTY) => Ok(false),
        Err(Errno::INVAL) | Err(Errno::NOSYS) => {
            // Filesystem without RENAME_NOREPLACE: check, then rename.
            if fs::symlink_metadata(to).is_ok() {
                return Ok(false);
            }
            match fs::rename(from, to) {
                Ok(()) => Ok(true),
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY)) =>
                {
                    Ok(false)
                }
                Err(e) => Err(ImageError::io(format!("publishing {}", to.display()), e)),
            }
        }
        Err(e) => Err(ImageError::errno(format!("publishing {}", to.display()), e)),
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ImageError::io(format!("syncing {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ImageStore>();
        assert_send_sync::<ResolvedImage>();
        assert_send_sync::<ImageError>();
    }

    #[test]
    fn ref_names_escape_reversibly() {
        let hex = "a".repeat(64);
        for name in [
            "x:latest".to_string(),
            "127.0.0.1:5000/team/web:v1".to_string(),
            format!("a/b@sha256:{hex}"),
        ] {
            let escaped = escape_name(&name);
            assert!(!escaped.contains('/'));
            assert_eq!(escaped.len(), name.len());
            assert_eq!(unescape_name(&escaped), name);
        }
    }

    #[test]
    fn manifest_validation() {
        let hex = "b".repeat(64);
        let good = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{MEDIA_OCI_CONFIG}","digest":"sha256:{hex}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{hex}","size":3}}]}}"#
        );
        assert!(parse_manifest(good.as_bytes()).is_ok());
        let bad_layer = good.replace("v1.tar\"", "v1.tar+lz4\"");
        assert_eq!(
            parse_manifest(bad_layer.as_bytes()).err().unwrap().code(),
            "invalid_image"
        );
        let bad_digest = good.replace("sha256:", "sha512:");
        assert_eq!(
            parse_manifest(bad_digest.as_bytes()).err().unwrap().code(),
            "invalid_image"
        );
        let bad_config = good.replace(MEDIA_OCI_CONFIG, "application/json");
        assert!(parse_manifest(bad_config.as_bytes()).is_err());
        assert!(parse_manifest(b"not json").is_err());
        assert!(parse_manifest(b"{\"schemaVersion\":1}").is_err());
    }

    #[test]
    fn config_parsing() {
        let cfg = parse_config(
            format!(
                r#"{{"os":"linux","architecture":"{PLATFORM_ARCH}","config":{{"Entrypoint":["/bin/sh"],"Cmd":null,"Env":["A=1"],"WorkingDir":"","User":"nobody"}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(cfg.entrypoint, vec!["/bin/sh"]);
        assert!(cfg.cmd.is_empty());
        assert_eq!(cfg.env, vec!["A=1"]);
        assert_eq!(cfg.working_dir, None);
        assert_eq!(cfg.user.as_deref(), Some("nobody"));
        assert!(cfg.labels.is_empty());
        let labelled = parse_config(br#"{"config":{"Labels":{"fly.version":"7"}}}"#).unwrap();
        assert_eq!(labelled.labels["fly.version"], "7");
        let foreign = parse_config(br#"{"os":"windows","architecture":"amd64"}"#).unwrap_err();
        assert_eq!(foreign.code(), "image_platform_unsupported");
        assert!(parse_config(b"{}").is_ok());
    }
}
