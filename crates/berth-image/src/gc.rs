//! Leases and garbage collection.
//!
//! A create resolves an image and only later records the Machine that uses it. In between,
//! the digests it touches are held by a [`Lease`], and a collection never removes a leased
//! digest. A collection reads what Machines use *after* it starts, and every lease dropped
//! since it started stays protected until it ends, so a create that records its Machine
//! after that read still keeps its layers. Removal renames into `tmp/` under the lease lock
//! (a lease either comes first and protects the digest, or comes after and finds it gone),
//! and deletes outside the lock.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::error::ImageError;
use crate::reference::{is_sha256_hex, ImageReference};
use crate::store::{digest_hex, parse_manifest, read_capped, ImageStore, MAX_MANIFEST};

#[derive(Debug, Default)]
struct LeaseState {
    /// hex -> number of live leases holding it.
    counts: HashMap<String, usize>,
    /// While a collection runs: digests whose last lease went away since it started.
    released: Option<HashSet<String>>,
}

/// The store's lease bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct LeaseTable {
    state: Arc<Mutex<LeaseState>>,
    /// One collection at a time.
    collecting: Arc<tokio::sync::Mutex<()>>,
}

fn lock(state: &Mutex<LeaseState>) -> MutexGuard<'_, LeaseState> {
    // The state stays consistent even if a holder panicked: every update is one insert
    // or remove.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Digests an operation in flight is about to use. Clones share the same set; it is
/// released when the last clone drops.
#[derive(Debug, Clone)]
pub struct Lease {
    inner: Arc<LeaseInner>,
}

#[derive(Debug)]
struct LeaseInner {
    state: Arc<Mutex<LeaseState>>,
    held: Mutex<Vec<String>>,
}

impl Lease {
    /// Holds `digest` (`sha256:<hex>` or the bare hex) until the lease is dropped.
    pub fn add(&self, digest: &str) {
        let hex = digest_hex(digest).to_string();
        let mut held = self
            .inner
            .held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if held.contains(&hex) {
            return;
        }
        *lock(&self.inner.state)
            .counts
            .entry(hex.clone())
            .or_default() += 1;
        held.push(hex);
    }

    /// The digests held, as hex.
    pub fn digests(&self) -> Vec<String> {
        self.inner
            .held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl Drop for LeaseInner {
    fn drop(&mut self) {
        let held = std::mem::take(
            self.held
                .get_mut()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        let mut state = lock(&self.state);
        for hex in held {
            if let Some(count) = state.counts.get_mut(&hex) {
                *count -= 1;
                if *count == 0 {
                    state.counts.remove(&hex);
                }
            }
            if let Some(released) = state.released.as_mut() {
                released.insert(hex);
            }
        }
    }
}

/// What Machines use: the roots a collection keeps, with everything they reach.
#[derive(Debug, Clone, Default)]
pub struct InUse {
    /// Manifest digests (`sha256:<hex>`).
    pub manifests: HashSet<String>,
    /// Layer blob digests (`sha256:<hex>`), kept even when their manifest is gone.
    pub layers: HashSet<String>,
}

/// What a collection removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneReport {
    /// Tags removed, by name.
    pub images: Vec<String>,
    /// Blobs removed (manifests, configs, layers).
    pub blobs: usize,
    /// Unpacked layers removed.
    pub layers: usize,
    /// Bytes of the blobs removed.
    pub bytes: u64,
}

/// A garbage collection in progress; see the module docs for the protocol.
pub struct Collection {
    store: Arc<ImageStore>,
    _one_at_a_time: tokio::sync::OwnedMutexGuard<()>,
}

impl ImageStore {
    /// A new, empty lease.
    pub fn lease(&self) -> Lease {
        Lease {
            inner: Arc::new(LeaseInner {
                state: self.leases.state.clone(),
                held: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Starts a collection. Read what Machines use only after this returns, then call
    /// [`Collection::prune`] or [`Collection::remove`].
    pub async fn begin_collection(self: &Arc<Self>) -> Collection {
        let guard = self.leases.collecting.clone().lock_owned().await;
        lock(&self.leases.state).released = Some(HashSet::new());
        Collection {
            store: self.clone(),
            _one_at_a_time: guard,
        }
    }
}

impl Drop for Collection {
    fn drop(&mut self) {
        lock(&self.store.leases.state).released = None;
    }
}

impl Collection {
    /// Removes every tag, blob and unpacked layer that no Machine in `in_use` and no
    /// lease needs.
    pub fn prune(self, in_use: &InUse) -> Result<PruneReport, ImageError> {
        self.sweep(in_use, None)
    }

    /// Removes the tag `name`, then whatever no Machine, remaining tag or lease needs.
    pub fn remove(self, name: &str, in_use: &InUse) -> Result<PruneReport, ImageError> {
        let reference = ImageReference::parse(name)?;
        self.sweep(in_use, Some(reference))
    }

    fn sweep(
        &self,
        in_use: &InUse,
        only_tag: Option<ImageReference>,
    ) -> Result<PruneReport, ImageError> {
        let store = &self.store;
        let aside = store.new_tmp_dir("gc-")?;
        let mut report = PruneReport::default();
        {
            let state = lock(&store.leases.state);
            let mut protected: HashSet<String> = state.counts.keys().cloned().collect();
            protected.extend(state.released.iter().flatten().cloned());
            let machine_manifests: HashSet<String> = in_use
                .manifests
                .iter()
                .map(|d| digest_hex(d).to_string())
                .collect();

            // Tags first: a tag is a root, so what it reaches goes only once it is gone.
            let mut roots: HashSet<String> = machine_manifests.clone();
            roots.extend(protected.iter().cloned());
            match &only_tag {
                Some(reference) => {
                    let path = store.ref_path(reference);
                    match fs::remove_file(&path) {
                        Ok(()) => report.images.push(reference.name()),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            return Err(ImageError::NotFound(reference.name()))
                        }
                        Err(e) => {
                            return Err(ImageError::io(format!("removing tag {reference}"), e))
                        }
                    }
                    for (_, digest) in store.tags()? {
                        roots.insert(digest_hex(&digest).to_string());
                    }
                }
                None => {
                    for (reference, digest) in store.tags()? {
                        let hex = digest_hex(&digest).to_string();
                        if machine_manifests.contains(&hex) || protected.contains(&hex) {
                            continue;
                        }
                        let path = store.ref_path(&reference);
                        match fs::remove_file(&path) {
                            Ok(()) => report.images.push(reference.name()),
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                            Err(e) => {
                                return Err(ImageError::io(format!("removing tag {reference}"), e))
                            }
                        }
                    }
                }
            }

            // Everything the roots reach stays.
            let mut live: HashSet<String> = roots.clone();
            live.extend(in_use.layers.iter().map(|d| digest_hex(d).to_string()));
            for root in &roots {
                if let Some(reached) = store.manifest_children(root) {
                    live.extend(reached);
                }
            }

            for (dir, is_layer) in [("blobs/sha256", false), ("layers/sha256", true)] {
                let path = store.root().join(dir);
                let entries = fs::read_dir(&path)
                    .map_err(|e| ImageError::io(format!("listing {}", path.display()), e))?;
                for entry in entries {
                    let entry = entry.map_err(|e| ImageError::io("listing the store", e))?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if !is_sha256_hex(&name) || live.contains(&name) {
                        continue;
                    }
                    if !is_layer {
                        report.bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
                    }
                    let target = aside.path.join(format!("{}-{name}", &dir[..1]));
                    fs::rename(entry.path(), &target).map_err(|e| {
                        ImageError::io(format!("removing {}", entry.path().display()), e)
                    })?;
                    if is_layer {
                        match fs::remove_file(store.size_path(&name)) {
                            Ok(()) => {}
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                            Err(e) => return Err(ImageError::io("removing a layer size", e)),
                        }
                        report.layers += 1;
                    } else {
                        report.blobs += 1;
                    }
                }
            }
        }
        // The actual deletion happens here, outside the lock, when `aside` drops.
        drop(aside);
        report.images.sort();
        tracing::info!(
            images = report.images.len(),
            blobs = report.blobs,
            layers = report.layers,
            bytes = report.bytes,
            "image garbage collected"
        );
        Ok(report)
    }
}

impl ImageStore {
    /// Removes the blobs, unpacked layers and sizes of `hexes` (what a failed pull
    /// published) unless a lease other than `mine` holds them: another pull or create
    /// found them stored and counts on them. Done like a collection's removal, under
    /// the lease lock.
    pub(crate) fn discard(&self, hexes: &[String], mine: &Lease) -> Result<(), ImageError> {
        let aside = self.new_tmp_dir("discard-")?;
        {
            let state = lock(&self.leases.state);
            let held_by_me: HashSet<String> = mine.digests().into_iter().collect();
            let mut unique: Vec<&String> = hexes.iter().collect();
            unique.sort();
            unique.dedup();
            for hex in unique {
                let holders = state.counts.get(hex.as_str()).copied().unwrap_or(0);
                let others = holders.saturating_sub(usize::from(held_by_me.contains(hex)));
                let protected = state
                    .released
                    .as_ref()
                    .is_some_and(|released| released.contains(hex.as_str()));
                if others > 0 || protected {
                    continue;
                }
                for (path, tag) in [
                    (self.blob_path(hex), "b"),
                    (self.layer_path(hex), "l"),
                    (self.size_path(hex), "s"),
                ] {
                    match fs::rename(&path, aside.path.join(format!("{tag}-{hex}"))) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(ImageError::io(format!("removing {}", path.display()), e))
                        }
                    }
                }
            }
        }
        drop(aside);
        Ok(())
    }

    /// Describes a stored image by `[registry/]repository@digest`, tagged or not.
    pub fn describe(&self, name: &str) -> Result<crate::store::ImageInfo, ImageError> {
        let reference = ImageReference::parse(name)?;
        let digest = reference
            .digest
            .clone()
            .ok_or_else(|| ImageError::invalid_reference(name, "a digest is needed"))?;
        let file =
            fs::File::open(self.blob_path(digest_hex(&digest))).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => ImageError::NotFound(name.to_string()),
                _ => ImageError::io("opening stored manifest", e),
            })?;
        let manifest = parse_manifest(&read_capped(file, MAX_MANIFEST, "stored manifest")?)?;
        Ok(crate::store::ImageInfo {
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
        })
    }

    /// The config and layer hexes a stored manifest names, if it is stored and valid.
    fn manifest_children(&self, manifest_hex: &str) -> Option<Vec<String>> {
        let file = fs::File::open(self.blob_path(manifest_hex)).ok()?;
        // Layers are leased too; only something manifest-sized can be a manifest.
        if file.metadata().ok()?.len() > MAX_MANIFEST {
            return None;
        }
        let bytes = read_capped(file, MAX_MANIFEST, "stored manifest").ok()?;
        let manifest = parse_manifest(&bytes).ok()?;
        let mut out = vec![digest_hex(&manifest.config.digest).to_string()];
        out.extend(
            manifest
                .layers
                .iter()
                .map(|l| digest_hex(&l.digest).to_string()),
        );
        Some(out)
    }
}
