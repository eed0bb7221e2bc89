//! Pulling images from OCI registries (the distribution spec), with `oci-client`.
//!
//! A pull has two phases. [`ImagePuller::plan`] resolves the reference to one manifest
//! (picking `linux/<host arch>` from an index) and fetches its config: everything that can
//! refuse the image happens here, before any layer moves. [`ImagePuller::fetch`] then
//! downloads the layers the store lacks, each into `tmp/`, hashing as it streams, and
//! renames a blob into `blobs/` only once its size and digest match. Layers are unpacked
//! from the stored blob (verified again on the way), and the manifest and the tag are
//! written last, so a crash or a cancel at any point leaves nothing a later create would
//! trust. Downloads of one blob are single-flight within the process; across processes
//! the store's no-replace renames keep the first copy.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::error::{shorten, ImageError};
use crate::gc::Lease;
use crate::reference::ImageReference;
use crate::store::{
    descriptor_hex, digest_hex, is_index_type, is_manifest_type, parse_config, parse_json,
    parse_manifest, rename_noreplace, sha256_hex, sync_dir, verify_bytes, Descriptor, ImageStore,
    IndexDoc, Manifest, ResolvedImage, RuntimeConfig, MAX_CONFIG, MAX_INDEX_DEPTH, MAX_MANIFEST,
    MEDIA_DOCKER_INDEX, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, PLATFORM_ARCH,
    PLATFORM_OS,
};
use crate::unpack::Budget;

const ACCEPTED_MANIFESTS: &[&str] = &[
    MEDIA_OCI_MANIFEST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_INDEX,
    MEDIA_DOCKER_INDEX,
];
/// Layers of one image downloaded at once.
const LAYER_CONCURRENCY: usize = 4;
/// How often a download reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Credentials per registry host, from a docker-style `config.json`.
#[derive(Clone, Default)]
pub struct RegistryCredentials {
    by_host: HashMap<String, (String, String)>,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("RegistryCredentials")
            .field("hosts", &self.by_host.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

impl RegistryCredentials {
    /// Reads a docker-style `config.json` (`{"auths": {"host": {"auth": base64(user:pass)}}}`
    /// or with `username` and `password`).
    pub fn load(path: &Path) -> Result<RegistryCredentials, ImageError> {
        let bytes = std::fs::read(path)
            .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
        RegistryCredentials::parse(&bytes).map_err(|e| match e {
            ImageError::Invalid(message) => {
                ImageError::Invalid(format!("{}: {message}", path.display()))
            }
            other => other,
        })
    }

    /// Parses the text of a docker-style `config.json`.
    pub fn parse(bytes: &[u8]) -> Result<RegistryCredentials, ImageError> {
        let config: DockerConfig = serde_json::from_slice(bytes)
            .map_err(|e| ImageError::invalid(format!("bad registry auth file: {e}")))?;
        let mut out = RegistryCredentials::default();
        for (key, entry) in config.auths {
            let host = normalize_host(&key);
            let pair = match (entry.username, entry.password, entry.auth) {
                (Some(user), Some(password), _) => (user, password),
                (_, _, Some(auth)) => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|_| {
                            ImageError::invalid(format!("auth for {host} is not base64"))
                        })?;
                    let text = String::from_utf8(decoded).map_err(|_| {
                        ImageError::invalid(format!("auth for {host} is not UTF-8"))
                    })?;
                    let (user, password) = text.split_once(':').ok_or_else(|| {
                        ImageError::invalid(format!("auth for {host} is not user:password"))
                    })?;
                    (user.to_string(), password.to_string())
                }
                _ => continue,
            };
            out.by_host.insert(host, pair);
        }
        Ok(out)
    }

    /// Adds or replaces the credentials of `host`.
    pub fn insert(&mut self, host: &str, user: &str, password: &str) {
        self.by_host.insert(
            normalize_host(host),
            (user.to_string(), password.to_string()),
        );
    }

    /// The user and password of `host`, if any.
    pub fn of_host(&self, host: &str) -> Option<(String, String)> {
        self.by_host.get(&normalize_host(host)).cloned()
    }

    fn auth_for(&self, registry: &str) -> RegistryAuth {
        match self.by_host.get(&normalize_host(registry)) {
            Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
            None => RegistryAuth::Anonymous,
        }
    }
}

/// Whether `--insecure-registry` entry `listed` covers `registry`: the same host and
/// port, or a bare host that covers every port of it.
fn insecure_host_matches(listed: &str, registry: &str) -> bool {
    let listed = normalize_host(listed);
    let registry = normalize_host(registry);
    if listed == registry {
        return true;
    }
    let has_port = |host: &str| {
        host.rsplit_once(':')
            .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
            && !host.ends_with(']')
    };
    !has_port(&listed)
        && registry
            .rsplit_once(':')
            .is_some_and(|(host, port)| port.parse::<u16>().is_ok() && host == listed)
}

/// `https://host:port/v1/` -> `host:port`.
fn normalize_host(key: &str) -> String {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    without_scheme
        .split('/')
        .next()
        .unwrap_or(without_scheme)
        .to_ascii_lowercase()
}

/// Plain HTTP is for loopback, which never leaves the host.
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// reqwest is built without a default TLS crypto provider: installs ring's, once per
/// process. A provider installed earlier by someone else is just as good.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// How the puller reaches registries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Credentials per host; anonymous elsewhere.
    pub credentials: RegistryCredentials,
    /// Hosts (`host[:port]`) reached over plain HTTP, in addition to loopback.
    pub insecure: Vec<String>,
    /// Registries (`host[:port]`; a bare host covers every port) that pulls for org
    /// tokens may use. Empty: any registry whose every address is public. Listed hosts
    /// may resolve to loopback or private addresses; nothing else may.
    pub allowed: Vec<String>,
    /// Where references without a registry are pulled from when no local tag matches.
    pub default_registry: Option<String>,
    /// Limit on establishing a connection.
    pub connect_timeout: Duration,
    /// Limit on each read while a response streams.
    pub read_timeout: Duration,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            credentials: RegistryCredentials::default(),
            insecure: Vec::new(),
            allowed: Vec::new(),
            default_registry: None,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(10),
        }
    }
}

/// Who a pull is for, and what it may therefore do. The default is the operator's:
/// any registry, detailed errors, no storage quota.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullScope {
    /// Asked for by an org token: only registries the operator allows
    /// ([`RegistryOptions::allowed`], or public addresses), and one generic error for
    /// every way a registry can fail to answer as a registry, so that a pull cannot
    /// tell an open port from a closed one.
    #[serde(default)]
    pub restricted: bool,
    /// Bytes of unpacked layers the org may still add; `None` for no quota.
    #[serde(default)]
    pub storage_left_bytes: Option<u64>,
    /// The org's quota in MiB, for the error message.
    #[serde(default)]
    pub storage_limit_mb: Option<u64>,
    /// Layer digests the org's Machines already use: already counted, not charged again.
    #[serde(default)]
    pub charged_layers: Vec<String>,
    /// Where the image really comes from, when the control plane resolved its name in a
    /// shared registry (images imported with several replicas). Absent: the name itself
    /// says, as always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PullSource>,
}

/// An image the control plane pushed to a shared registry: the agent pulls this
/// manifest by digest from there, and keeps the name it was asked for.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullSource {
    /// `host[:port]` of the registry.
    pub registry: String,
    /// The repository in that registry.
    pub repository: String,
    /// `sha256:<hex>` of the manifest the name resolved to.
    pub digest: String,
    /// Plain HTTP (loopback always is).
    #[serde(default)]
    pub insecure: bool,
    /// Basic credentials, when the registry needs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

impl std::fmt::Debug for PullSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("PullSource")
            .field("registry", &self.registry)
            .field("repository", &self.repository)
            .field("digest", &self.digest)
            .field("insecure", &self.insecure)
            .field("username", &self.username)
            .finish()
    }
}

impl PullSource {
    /// The reference pulled: `registry/repository@digest`.
    pub fn reference(&self) -> ImageReference {
        ImageReference {
            registry: Some(self.registry.clone()),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(self.digest.clone()),
        }
    }

    fn serves(&self, registry: &str) -> bool {
        normalize_host(&self.registry) == normalize_host(registry)
    }

    fn auth(&self) -> Option<RegistryAuth> {
        match (&self.username, &self.password) {
            (Some(user), Some(password)) => {
                Some(RegistryAuth::Basic(user.clone(), password.clone()))
            }
            _ => None,
        }
    }
}

impl PullScope {
    fn org_budget(&self) -> Option<Budget> {
        let left = self.storage_left_bytes?;
        let limit = self
            .storage_limit_mb
            .map(|mb| format!("{mb} MiB"))
            .unwrap_or_else(|| "its limit".to_owned());
        Some(Budget::new(
            left,
            format!("the org's image storage quota ({limit}; {left} bytes left)"),
        ))
    }

    fn is_charged(&self, digest: &str) -> bool {
        self.charged_layers.iter().any(|d| d == digest)
    }
}

/// The one answer an org token gets for a registry that did not answer as a registry.
fn generic_unreachable(registry: &str) -> ImageError {
    ImageError::RegistryUnreachable {
        registry: registry.to_string(),
        message: "no registry answered there (refused, timed out, not a registry, or \
                  a TLS failure)"
            .to_string(),
    }
}

/// Whether an address is one an org token may reach without the operator listing it:
/// not loopback, unspecified, private, carrier-grade NAT, link-local, ULA, multicast,
/// documentation or benchmarking space, nor an IPv4 address dressed as IPv6.
pub fn is_public_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0)
                || (a == 198 && (18..20).contains(&b))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_address(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first & 0xffc0) == 0xfec0
                || first == 0x2001 && v6.segments()[1] == 0x0db8
                || first == 0x0064 && v6.segments()[1] == 0xff9b
                || first == 0x2002
                || (v6.segments()[..6].iter().all(|s| *s == 0)))
        }
    }
}

/// One step of a pull, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullStatus {
    /// The manifest and config are known; `bytes_total` is the sum of the layers.
    Resolved,
    /// This layer is already in the store; nothing to download.
    Exists,
    /// Another pull in this process is downloading this layer.
    Waiting,
    /// Bytes are arriving.
    Downloading,
    /// The blob is complete, verified and stored.
    Downloaded,
    /// The layer is unpacked and ready.
    Unpacked,
    /// The image is stored and tagged.
    Done,
}

impl PullStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            PullStatus::Resolved => "resolved",
            PullStatus::Exists => "exists",
            PullStatus::Waiting => "waiting",
            PullStatus::Downloading => "downloading",
            PullStatus::Downloaded => "downloaded",
            PullStatus::Unpacked => "unpacked",
            PullStatus::Done => "done",
        }
    }
}

/// A progress event. Layer events name the layer blob's digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullEvent {
    /// What happened.
    pub status: PullStatus,
    /// `sha256:<hex>` of the layer, for layer events.
    pub layer: Option<String>,
    /// Bytes of this layer (or, without a layer, the image) done so far.
    pub bytes_done: u64,
    /// Bytes of this layer (or the image) in all.
    pub bytes_total: u64,
}

/// Where progress goes; called from the pulling task, so it must be quick.
pub type Progress = Arc<dyn Fn(PullEvent) + Send + Sync>;

/// A progress sink that drops everything.
pub fn no_progress() -> Progress {
    Arc::new(|_| {})
}

/// A resolved manifest and its config, ready to fetch.
pub struct PullPlan {
    /// The reference with its registry (the default one filled in).
    pub reference: ImageReference,
    /// `sha256:<hex>` of the platform manifest.
    pub manifest_digest: String,
    /// Process defaults from the config.
    pub config: RuntimeConfig,
    manifest_bytes: Vec<u8>,
    manifest: Manifest,
    config_bytes: Vec<u8>,
    remote: Reference,
    registry: String,
    scope: PullScope,
}

impl PullPlan {
    /// Layer digests and sizes, bottom first.
    pub fn layers(&self) -> Vec<(String, u64)> {
        self.manifest
            .layers
            .iter()
            .map(|l| (l.digest.clone(), l.size))
            .collect()
    }

    /// Sum of the layer sizes.
    pub fn total_bytes(&self) -> u64 {
        self.manifest
            .layers
            .iter()
            .map(|l| l.size)
            .fold(0, u64::saturating_add)
    }
}

/// Pulls images into an [`ImageStore`]. Share one per process: single-flight works
/// within one puller.
pub struct ImagePuller {
    store: Arc<ImageStore>,
    options: RegistryOptions,
    clients: Mutex<HashMap<String, Client>>,
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Configs fetched for pulls not yet stored, for the concurrent pulls of the same
    /// image. Kept out of the store until a pull completes, so a failed one leaves nothing;
    /// `fetch` drops the entry when its pull ends either way.
    configs_in_flight: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    blobs_downloaded: AtomicU64,
}

impl std::fmt::Debug for ImagePuller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImagePuller")
            .field("store", &self.store.root())
            .field("options", &self.options)
            .finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each map update is a single insert or remove; a panicked holder leaves it usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ImagePuller {
    /// A puller over `store`.
    pub fn new(store: Arc<ImageStore>, options: RegistryOptions) -> ImagePuller {
        install_tls_provider();
        ImagePuller {
            store,
            options,
            clients: Mutex::new(HashMap::new()),
            flights: Mutex::new(HashMap::new()),
            configs_in_flight: Mutex::new(HashMap::new()),
            blobs_downloaded: AtomicU64::new(0),
        }
    }

    /// The registry that names without one are pulled from, if any.
    pub fn default_registry(&self) -> Option<&str> {
        self.options.default_registry.as_deref()
    }

    /// The store pulled into.
    pub fn store(&self) -> &Arc<ImageStore> {
        &self.store
    }

    /// How many blob downloads this puller has started (layers only).
    pub fn blobs_downloaded(&self) -> u64 {
        self.blobs_downloaded.load(Ordering::Relaxed)
    }

    /// Where `name` comes from: `Some(reference with registry)` to pull, `None` when the
    /// local store answers it. A reference without a registry is local unless a default
    /// registry is set and no local tag (or stored digest) matches.
    pub fn remote_reference(&self, name: &str) -> Result<Option<ImageReference>, ImageError> {
        let reference = ImageReference::parse(name)?;
        if reference.registry.is_some() {
            return Ok(Some(reference));
        }
        let Some(registry) = &self.options.default_registry else {
            return Ok(None);
        };
        let local = match &reference.digest {
            Some(digest) => self.store.blob_path(digest_hex(digest)).is_file(),
            None => self.store.read_ref(&reference)?.is_some(),
        };
        if local {
            return Ok(None);
        }
        Ok(Some(ImageReference {
            registry: Some(registry.clone()),
            ..reference
        }))
    }

    /// Resolves `name` for a create or an update: from the store, or pulled. Every
    /// digest touched is held by `lease`.
    pub async fn resolve(
        &self,
        name: &str,
        lease: &Lease,
        progress: Progress,
    ) -> Result<ResolvedImage, ImageError> {
        self.resolve_scoped(name, lease, progress, &PullScope::default())
            .await
    }

    /// [`ImagePuller::resolve`] for `scope`: an org token's registry limits, and its
    /// storage quota for whatever the image adds to what the org already uses.
    pub async fn resolve_scoped(
        &self,
        name: &str,
        lease: &Lease,
        progress: Progress,
        scope: &PullScope,
    ) -> Result<ResolvedImage, ImageError> {
        if let Some(source) = &scope.source {
            return self
                .resolve_from_source(name, source, lease, progress, scope)
                .await;
        }
        let Some(reference) = self.remote_reference(name)? else {
            let store = self.store.clone();
            let name = name.to_string();
            let lease = lease.clone();
            let resolved = blocking(move || store.resolve_leased(&name, &lease)).await?;
            self.check_stored(&resolved, scope)?;
            return Ok(resolved);
        };
        // A digest is content-addressed: when stored, the registry has nothing to add.
        if let Some(digest) = reference.digest.clone() {
            if self.store.blob_path(digest_hex(&digest)).is_file() {
                let store = self.store.clone();
                let lease = lease.clone();
                let resolved = blocking(move || store.load(reference, &digest, &lease)).await?;
                self.check_stored(&resolved, scope)?;
                return Ok(resolved);
            }
        }
        let plan = self.plan_scoped(&reference, lease, scope).await?;
        self.fetch(plan, lease, progress).await
    }

    /// `name` as the control plane resolved it in a shared registry: the pinned digest,
    /// from the store when stored, else pulled from `source`; the image keeps `name`.
    async fn resolve_from_source(
        &self,
        name: &str,
        source: &PullSource,
        lease: &Lease,
        progress: Progress,
        scope: &PullScope,
    ) -> Result<ResolvedImage, ImageError> {
        let reference = ImageReference::parse(name)?;
        let remote = source.reference();
        if self.store.blob_path(digest_hex(&source.digest)).is_file() {
            let store = self.store.clone();
            let lease = lease.clone();
            let digest = source.digest.clone();
            let resolved = blocking(move || store.load(reference, &digest, &lease)).await?;
            self.check_stored(&resolved, scope)?;
            return Ok(resolved);
        }
        let plan = self.plan_scoped(&remote, lease, scope).await?;
        let mut resolved = self.fetch(plan, lease, progress).await?;
        resolved.reference = reference;
        Ok(resolved)
    }

    /// The org quota for an image found in the store: its layers the org does not
    /// use yet must fit in what it may still store.
    fn check_stored(&self, image: &ResolvedImage, scope: &PullScope) -> Result<(), ImageError> {
        let Some(budget) = scope.org_budget() else {
            return Ok(());
        };
        for digest in &image.layer_digests {
            if !scope.is_charged(digest) {
                budget.take(self.store.layer_size(digest)?.unwrap_or(0))?;
            }
        }
        Ok(())
    }

    /// Refuses, for an org token, a registry the operator does not allow: one not on
    /// the allow-list (when there is one), or one with any address that is not public
    /// (unless listed). Every address the name resolves to is checked.
    async fn check_registry(&self, registry: &str, scope: &PullScope) -> Result<(), ImageError> {
        // The default registry is the operator's own choice (for agents, the control
        // plane's): always allowed; so is the shared registry the control plane names.
        let listed = self
            .options
            .allowed
            .iter()
            .chain(&self.options.default_registry)
            .any(|host| insecure_host_matches(host, registry))
            || scope.source.as_ref().is_some_and(|s| s.serves(registry));
        let refused = || ImageError::RegistryRefused {
            registry: registry.to_string(),
        };
        if listed {
            return Ok(());
        }
        if !self.options.allowed.is_empty() {
            return Err(refused());
        }
        let host_port = registry_socket_name(registry);
        let addresses: Vec<std::net::SocketAddr> = match tokio::time::timeout(
            self.options.connect_timeout,
            tokio::net::lookup_host(host_port),
        )
        .await
        {
            Ok(Ok(addresses)) => addresses.collect(),
            // Refused like a private name, so that internal names stay unprobed.
            _ => return Err(refused()),
        };
        if addresses.is_empty() || addresses.iter().any(|a| !is_public_address(a.ip())) {
            return Err(refused());
        }
        Ok(())
    }

    fn client(&self, registry: &str, scope: &PullScope) -> Result<Client, ImageError> {
        let mut clients = lock(&self.clients);
        if let Some(client) = clients.get(registry) {
            return Ok(client.clone());
        }
        let plain_http = is_loopback_registry(registry)
            || scope
                .source
                .as_ref()
                .is_some_and(|s| s.insecure && s.serves(registry))
            || self
                .options
                .insecure
                .iter()
                .any(|host| insecure_host_matches(host, registry));
        let config = ClientConfig {
            protocol: if plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            connect_timeout: Some(self.options.connect_timeout),
            read_timeout: Some(self.options.read_timeout),
            // Index entries are picked here, with our own errors.
            platform_resolver: None,
            ..ClientConfig::default()
        };
        let client = Client::try_from(config)
            .map_err(|e| ImageError::Internal(format!("building the registry client: {e}")))?;
        clients.insert(registry.to_string(), client.clone());
        Ok(client)
    }

    /// Resolves `reference` (which names a registry) to a platform manifest and fetches
    /// its config. Nothing is written to the store.
    pub async fn plan(
        &self,
        reference: &ImageReference,
        lease: &Lease,
    ) -> Result<PullPlan, ImageError> {
        self.plan_scoped(reference, lease, &PullScope::default())
            .await
    }

    /// [`ImagePuller::plan`] for `scope`. For an org token the registry is checked
    /// first, and every failure to get a valid manifest from it (connection refused,
    /// timeout, TLS, an answer that is not a registry's) is one generic error; only
    /// errors a registry states in its own OCI error format keep their code.
    pub async fn plan_scoped(
        &self,
        reference: &ImageReference,
        lease: &Lease,
        scope: &PullScope,
    ) -> Result<PullPlan, ImageError> {
        let registry = reference.registry.clone().ok_or_else(|| {
            ImageError::invalid_reference(&reference.name(), "no registry to pull from")
        })?;
        if !scope.restricted {
            return self
                .plan_inner(reference, lease, scope, registry)
                .await
                .map_err(|e| e.error);
        }
        self.check_registry(&registry, scope).await?;
        match self
            .plan_inner(reference, lease, scope, registry.clone())
            .await
        {
            Ok(plan) => Ok(plan),
            Err(PlanError {
                error,
                stated: true,
            }) => Err(error),
            Err(PlanError { error, .. }) => Err(match error {
                ImageError::PlatformUnsupported(_)
                | ImageError::InvalidReference { .. }
                | ImageError::TooLarge(_)
                | ImageError::RegistryRefused { .. }
                | ImageError::InsufficientStorage { .. } => error,
                other => {
                    tracing::info!(registry = %registry, error = %other, "org pull failed");
                    generic_unreachable(&registry)
                }
            }),
        }
    }

    async fn plan_inner(
        &self,
        reference: &ImageReference,
        lease: &Lease,
        scope: &PullScope,
        registry: String,
    ) -> Result<PullPlan, PlanError> {
        let client = self.client(&registry, scope)?;
        let auth = scope
            .source
            .as_ref()
            .filter(|s| s.serves(&registry))
            .and_then(PullSource::auth)
            .unwrap_or_else(|| self.options.credentials.auth_for(&registry));
        let top = match (&reference.digest, &reference.tag) {
            (Some(digest), _) => Reference::with_digest(
                registry.clone(),
                reference.repository.clone(),
                digest.clone(),
            ),
            (None, tag) => Reference::with_tag(
                registry.clone(),
                reference.repository.clone(),
                tag.clone().unwrap_or_else(|| "latest".to_string()),
            ),
        };
        let (mut bytes, _) = client
            .pull_manifest_raw(&top, &auth, ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| registry_plan_error(&registry, &reference.name(), e))?;
        check_manifest_size(&bytes)?;
        let mut digest = format!("sha256:{}", sha256_hex(&bytes));
        if let Some(wanted) = &reference.digest {
            if *wanted != digest {
                return Err(ImageError::invalid(format!(
                    "registry {registry} served manifest {digest} for {wanted}"
                ))
                .into());
            }
        }

        // Descend through indexes to this platform's manifest.
        let mut depth = 0;
        while is_index(&bytes)? {
            if depth >= MAX_INDEX_DEPTH {
                return Err(ImageError::invalid("image indexes nested too deeply").into());
            }
            depth += 1;
            let index: IndexDoc = parse_json(&bytes, "image index")?;
            let chosen = pick_platform(&index)?;
            let child = Reference::with_digest(
                registry.clone(),
                reference.repository.clone(),
                chosen.digest.clone(),
            );
            let (child_bytes, _) = client
                .pull_manifest_raw(&child, &auth, ACCEPTED_MANIFESTS)
                .await
                .map_err(|e| registry_plan_error(&registry, &reference.name(), e))?;
            check_manifest_size(&child_bytes)?;
            verify_bytes(&child_bytes, &chosen)?;
            bytes = child_bytes;
            digest = chosen.digest.clone();
        }

        let manifest = parse_manifest(&bytes)?;
        lease.add(&digest);
        lease.add(descriptor_hex(&manifest.config)?);
        for layer in &manifest.layers {
            lease.add(descriptor_hex(layer)?);
        }
        let config_bytes = self
            .config_bytes(&client, &top, &registry, &manifest.config)
            .await?;
        let config = parse_config(&config_bytes)?;
        Ok(PullPlan {
            reference: reference.clone(),
            manifest_digest: digest,
            config,
            manifest_bytes: bytes.to_vec(),
            manifest,
            config_bytes,
            remote: top,
            registry,
            scope: scope.clone(),
        })
    }

    async fn config_bytes(
        &self,
        client: &Client,
        remote: &Reference,
        registry: &str,
        desc: &Descriptor,
    ) -> Result<Vec<u8>, ImageError> {
        let hex = descriptor_hex(desc)?;
        if desc.size > MAX_CONFIG {
            return Err(ImageError::invalid(format!(
                "config {} is larger than {MAX_CONFIG} bytes",
                desc.digest
            )));
        }
        // Single-flight like layers: concurrent creates of one image fetch its config once.
        let flight = self.flight(hex);
        let result = async {
            let _guard = flight.lock().await;
            if let Ok(bytes) = std::fs::read(self.store.blob_path(hex)) {
                if verify_bytes(&bytes, desc).is_ok() {
                    return Ok(bytes);
                }
            }
            if let Some(bytes) = lock(&self.configs_in_flight).get(hex) {
                return Ok(bytes.to_vec());
            }
            let bytes = self.download_config(client, remote, registry, desc).await?;
            lock(&self.configs_in_flight).insert(hex.to_owned(), Arc::new(bytes.clone()));
            Ok(bytes)
        }
        .await;
        self.land(hex, flight);
        result
    }

    async fn download_config(
        &self,
        client: &Client,
        remote: &Reference,
        registry: &str,
        desc: &Descriptor,
    ) -> Result<Vec<u8>, ImageError> {
        let mut stream = client
            .pull_blob_stream(remote, &oci_descriptor(desc))
            .await
            .map_err(|e| registry_error(registry, &desc.digest, e))?;
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| stream_error(registry, e))?;
            if (bytes.len() + chunk.len()) as u64 > desc.size {
                return Err(ImageError::invalid(format!(
                    "config {} is larger than its descriptor says",
                    desc.digest
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        verify_bytes(&bytes, desc)?;
        Ok(bytes)
    }

    /// Downloads and unpacks what the store lacks, then stores the config, the manifest
    /// and the tag.
    pub async fn fetch(
        &self,
        plan: PullPlan,
        lease: &Lease,
        progress: Progress,
    ) -> Result<ResolvedImage, ImageError> {
        let config_hex = descriptor_hex(&plan.manifest.config)?.to_owned();
        let outcome = self.fetch_planned(plan, lease, progress).await;
        // Stored now, or the pull failed and a later one fetches it again.
        lock(&self.configs_in_flight).remove(&config_hex);
        outcome
    }

    async fn fetch_planned(
        &self,
        plan: PullPlan,
        lease: &Lease,
        progress: Progress,
    ) -> Result<ResolvedImage, ImageError> {
        progress(PullEvent {
            status: PullStatus::Resolved,
            layer: None,
            bytes_done: 0,
            bytes_total: plan.total_bytes(),
        });
        let budgets = Budgets {
            image: Arc::new(self.store.image_budget()),
            org: plan.scope.org_budget().map(Arc::new),
        };
        // Blobs and layers this pull publishes: if it fails, they go again (see below).
        let published = Mutex::new(Vec::new());
        // Collected first: a closure inside the stream type makes the future not Send.
        let downloads: Vec<_> = plan
            .manifest
            .layers
            .iter()
            .map(|layer| self.fetch_layer(&plan, layer, progress.clone(), &budgets, &published))
            .collect();
        let results: Vec<Result<(), ImageError>> = futures::stream::iter(downloads)
            .buffer_unordered(LAYER_CONCURRENCY)
            .collect()
            .await;
        if let Some(error) = results.into_iter().find_map(Result::err) {
            // A failed pull keeps nothing: what it published that no other pull or create
            // holds is removed, the blob of a layer that would not unpack included.
            let mine = std::mem::take(&mut *lock(&published));
            let store = self.store.clone();
            let lease = lease.clone();
            if let Err(cleanup) = blocking(move || store.discard(&mine, &lease)).await {
                tracing::warn!(error = %cleanup, "removing what a failed pull stored");
            }
            return Err(error);
        }

        let store = self.store.clone();
        let lease_for_load = lease.clone();
        let total = plan.total_bytes();
        let PullPlan {
            reference,
            manifest_digest,
            manifest_bytes,
            manifest,
            config_bytes,
            ..
        } = plan;
        let resolved = blocking(move || {
            store.put_blob(descriptor_hex(&manifest.config)?, &config_bytes)?;
            store.put_blob(digest_hex(&manifest_digest), &manifest_bytes)?;
            // A tag that already says this (a warm create) costs no fsync.
            if store.read_ref(&reference)?.as_deref() != Some(manifest_digest.as_str()) {
                store.write_ref(&reference, &manifest_digest)?;
            }
            store.load(reference, &manifest_digest, &lease_for_load)
        })
        .await?;
        progress(PullEvent {
            status: PullStatus::Done,
            layer: None,
            bytes_done: total,
            bytes_total: total,
        });
        Ok(resolved)
    }

    fn flight(&self, hex: &str) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.flights)
            .entry(hex.to_string())
            .or_default()
            .clone()
    }

    fn land(&self, hex: &str, flight: Arc<tokio::sync::Mutex<()>>) {
        let mut flights = lock(&self.flights);
        // Only the map and this caller hold it: nobody else is waiting.
        if Arc::strong_count(&flight) <= 2 {
            flights.remove(hex);
        }
    }

    async fn fetch_layer(
        &self,
        plan: &PullPlan,
        desc: &Descriptor,
        progress: Progress,
        budgets: &Budgets,
        published: &Mutex<Vec<String>>,
    ) -> Result<(), ImageError> {
        let hex = descriptor_hex(desc)?.to_string();
        let charged_already = plan.scope.is_charged(&desc.digest);
        let flight = self.flight(&hex);
        let result = async {
            let _guard = match flight.try_lock() {
                Ok(guard) => guard,
                Err(_) => {
                    progress(layer_event(desc, PullStatus::Waiting, 0));
                    flight.lock().await
                }
            };
            if let Some(size) = self.store.layer_size(&hex)? {
                // Stored already (for anyone): it still counts for this image and org.
                budgets.image.take(size)?;
                if let (Some(org), false) = (&budgets.org, charged_already) {
                    org.take(size)?;
                }
                progress(layer_event(desc, PullStatus::Exists, desc.size));
                return Ok(());
            }
            if self.store.blob_path(&hex).is_file() {
                progress(layer_event(desc, PullStatus::Exists, desc.size));
            } else {
                self.download(plan, desc, &hex, &progress).await?;
                lock(published).push(hex.clone());
            }
            let store = self.store.clone();
            let owned = desc.clone();
            let image = budgets.image.clone();
            let org = budgets.org.clone().filter(|_| !charged_already);
            blocking(move || {
                let mut all: Vec<&Budget> = vec![&image];
                all.extend(org.as_deref());
                store.ensure_layer(&owned, &all)
            })
            .await?;
            lock(published).push(hex.clone());
            progress(layer_event(desc, PullStatus::Unpacked, desc.size));
            Ok(())
        }
        .await;
        self.land(&hex, flight);
        result
    }

    async fn download(
        &self,
        plan: &PullPlan,
        desc: &Descriptor,
        hex: &str,
        progress: &Progress,
    ) -> Result<(), ImageError> {
        self.blobs_downloaded.fetch_add(1, Ordering::Relaxed);
        let registry = &plan.registry;
        let client = self.client(registry, &plan.scope)?;
        let (file, tmp) = self.store.new_tmp_file("pull-")?;
        let mut out = tokio::fs::File::from_std(file);
        let mut stream = client
            .pull_blob_stream(&plan.remote, &oci_descriptor(desc))
            .await
            .map_err(|e| registry_error(registry, &desc.digest, e))?;
        let mut hasher = Sha256::new();
        let mut done: u64 = 0;
        let mut last_report = Instant::now();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| stream_error(registry, e))?;
            done = done.saturating_add(chunk.len() as u64);
            if done > desc.size {
                return Err(ImageError::invalid(format!(
                    "blob {} is larger than its descriptor says ({} bytes)",
                    desc.digest, desc.size
                )));
            }
            hasher.update(&chunk);
            out.write_all(&chunk)
                .await
                .map_err(|e| ImageError::io("writing a downloaded blob", e))?;
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                progress(PullEvent {
                    status: PullStatus::Downloading,
                    layer: Some(desc.digest.clone()),
                    bytes_done: done,
                    bytes_total: desc.size,
                });
            }
        }
        if done != desc.size {
            return Err(ImageError::invalid(format!(
                "blob {} has {done} bytes, its descriptor says {}",
                desc.digest, desc.size
            )));
        }
        if hex::encode(hasher.finalize()) != hex {
            return Err(ImageError::invalid(format!(
                "blob {} from {registry} does not match its digest",
                desc.digest
            )));
        }
        out.sync_all()
            .await
            .map_err(|e| ImageError::io("syncing a downloaded blob", e))?;
        drop(out);
        let final_path = self.store.blob_path(hex);
        let tmp_path = tmp.path.clone();
        let published = blocking(move || {
            let published = rename_noreplace(&tmp_path, &final_path)?;
            if let Some(parent) = final_path.parent() {
                sync_dir(parent)?;
            }
            Ok(published)
        })
        .await?;
        if published {
            tmp.disarm();
        }
        progress(PullEvent {
            status: PullStatus::Downloaded,
            layer: Some(desc.digest.clone()),
            bytes_done: done,
            bytes_total: desc.size,
        });
        Ok(())
    }
}

impl ImageStore {
    /// Stores verified bytes as a blob unless it is already there.
    pub(crate) fn put_blob(&self, hex: &str, bytes: &[u8]) -> Result<(), ImageError> {
        use std::io::Write as _;
        let final_path = self.blob_path(hex);
        if final_path.is_file() {
            return Ok(());
        }
        let (mut file, tmp) = self.new_tmp_file("blob-")?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| ImageError::io("writing blob", e))?;
        if rename_noreplace(&tmp.path, &final_path)? {
            tmp.disarm();
        }
        sync_dir(&self.root().join("blobs/sha256"))
    }
}

fn layer_event(desc: &Descriptor, status: PullStatus, done: u64) -> PullEvent {
    PullEvent {
        status,
        layer: Some(desc.digest.clone()),
        bytes_done: done,
        bytes_total: desc.size,
    }
}

fn check_manifest_size(bytes: &[u8]) -> Result<(), ImageError> {
    if bytes.len() as u64 > MAX_MANIFEST {
        return Err(ImageError::invalid(format!(
            "manifest larger than {MAX_MANIFEST} bytes"
        )));
    }
    Ok(())
}

fn is_index(bytes: &[u8]) -> Result<bool, ImageError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
    }
    let probe: Probe = parse_json(bytes, "manifest")?;
    Ok(match probe.media_type.as_deref() {
        Some(media_type) => is_index_type(media_type),
        None => probe.manifests.is_some(),
    })
}

/// The entry for this host's platform.
fn pick_platform(index: &IndexDoc) -> Result<Descriptor, ImageError> {
    if index.schema_version != 2 {
        return Err(ImageError::invalid("index schemaVersion must be 2"));
    }
    index
        .manifests
        .iter()
        .filter(|d| is_manifest_type(&d.media_type) || is_index_type(&d.media_type))
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == PLATFORM_OS && p.architecture == PLATFORM_ARCH)
        })
        .cloned()
        .ok_or_else(|| {
            ImageError::PlatformUnsupported(format!(
                "{PLATFORM_OS}/{PLATFORM_ARCH} (the index lists {})",
                index
                    .manifests
                    .iter()
                    .filter_map(|d| d.platform.as_ref())
                    .map(|p| format!("{}/{}", shorten(&p.os), shorten(&p.architecture)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

fn oci_descriptor(desc: &Descriptor) -> OciDescriptor {
    OciDescriptor {
        media_type: desc.media_type.clone(),
        digest: desc.digest.clone(),
        size: i64::try_from(desc.size).unwrap_or(i64::MAX),
        ..OciDescriptor::default()
    }
}

/// Runs store work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ImageError::Internal(format!("image store task: {e}")))?
}

/// The allowances one pull's layers draw on together.
struct Budgets {
    image: Arc<Budget>,
    org: Option<Arc<Budget>>,
}

/// A planning failure, with whether a registry stated it in its own OCI error format
/// (which proves a registry answered, so an org token may see it as it is).
struct PlanError {
    error: ImageError,
    stated: bool,
}

impl From<ImageError> for PlanError {
    fn from(error: ImageError) -> PlanError {
        PlanError {
            error,
            stated: false,
        }
    }
}

fn registry_plan_error(registry: &str, what: &str, error: OciDistributionError) -> PlanError {
    let stated = matches!(error, OciDistributionError::RegistryError { .. });
    PlanError {
        error: registry_error(registry, what, error),
        stated,
    }
}

/// `host[:port]` for a socket lookup: the port the client uses when none is given.
fn registry_socket_name(registry: &str) -> String {
    let has_port = registry
        .rsplit_once(':')
        .is_some_and(|(host, port)| port.parse::<u16>().is_ok() && !host.is_empty())
        && !registry.ends_with(']');
    if has_port {
        registry.to_string()
    } else if is_loopback_registry(registry) {
        format!("{registry}:80")
    } else {
        format!("{registry}:443")
    }
}

/// Maps a registry client error onto the API's codes.
pub(crate) fn registry_error(
    registry: &str,
    what: &str,
    error: OciDistributionError,
) -> ImageError {
    let unauthorized = |message: String| ImageError::RegistryUnauthorized {
        registry: registry.to_string(),
        message,
    };
    let unreachable = |message: String| ImageError::RegistryUnreachable {
        registry: registry.to_string(),
        message,
    };
    match error {
        OciDistributionError::RequestError(e) => unreachable(error_chain(&e)),
        OciDistributionError::IoError(e) => unreachable(e.to_string()),
        OciDistributionError::UnauthorizedError { .. } => {
            unauthorized("the registry answered 401 Unauthorized".to_string())
        }
        OciDistributionError::AuthenticationFailure(reason) => {
            unauthorized(format!("authentication failed: {}", shorten(&reason)))
        }
        OciDistributionError::ImageManifestNotFoundError(_) => {
            ImageError::NotFound(what.to_string())
        }
        OciDistributionError::ServerError { code, message, .. } => match code {
            401 | 403 => unauthorized(format!("the registry answered {code}")),
            404 => ImageError::NotFound(what.to_string()),
            429 | 500..=599 => unreachable(format!(
                "the registry answered {code}: {}",
                shorten(&message)
            )),
            _ => ImageError::invalid(format!(
                "the registry answered {code}: {}",
                shorten(&message)
            )),
        },
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            let message = shorten(&envelope.to_string());
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                ImageError::NotFound(what.to_string())
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                unauthorized(message)
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Toomanyrequests))
            {
                unreachable(message)
            } else {
                ImageError::invalid(format!("registry {registry}: {message}"))
            }
        }
        OciDistributionError::DigestError(e) => {
            ImageError::invalid(format!("registry {registry}: {e}"))
        }
        other => ImageError::invalid(format!("registry {registry}: {other}")),
    }
}

/// A read error in the middle of a body: corruption the client library caught, or a
/// connection that broke.
fn stream_error(registry: &str, error: std::io::Error) -> ImageError {
    let is_digest = error
        .get_ref()
        .is_some_and(|inner| inner.is::<oci_client::errors::DigestError>());
    if is_digest {
        ImageError::invalid(format!("registry {registry}: {error}"))
    } else {
        ImageError::RegistryUnreachable {
            registry: registry.to_string(),
            message: format!("the download broke off: {}", error_chain(&error)),
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_insecure_host_covers_its_ports_and_a_host_port_only_itself() {
        assert!(insecure_host_matches("reg.internal", "reg.internal:5000"));
        assert!(insecure_host_matches("REG.internal", "reg.internal"));
        assert!(insecure_host_matches(
            "http://reg.internal:5000/",
            "reg.internal:5000"
        ));
        assert!(!insecure_host_matches(
            "reg.internal:5000",
            "reg.internal:5001"
        ));
        assert!(!insecure_host_matches("reg.internal:5000", "reg.internal"));
        assert!(!insecure_host_matches("reg", "reg.internal:5000"));
        assert!(insecure_host_matches("[fd00::1]", "[fd00::1]:5000"));
    }

    #[test]
    fn credentials_match_the_host_in_any_case() {
        let mut credentials = RegistryCredentials::default();
        credentials.insert("Reg.Internal:5000", "u", "p");
        assert!(matches!(
            credentials.auth_for("reg.INTERNAL:5000"),
            RegistryAuth::Basic(..)
        ));
        assert!(matches!(
            credentials.auth_for("reg.internal:5001"),
            RegistryAuth::Anonymous
        ));
    }

    #[test]
    fn loopback_is_recognised() {
        for host in [
            "127.0.0.1:5000",
            "127.1.2.3",
            "localhost",
            "LOCALHOST:80",
            "[::1]:5000",
        ] {
            assert!(is_loopback_registry(host), "{host}");
        }
        for host in [
            "10.0.0.1:5000",
            "registry.example.com",
            "localhost.example.com",
        ] {
            assert!(!is_loopback_registry(host), "{host}");
        }
    }

    #[test]
    fn docker_config_is_parsed() {
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        let text = format!(
            r#"{{"auths": {{"https://reg.example.com/v1/": {{"auth": "{auth}"}},
                 "127.0.0.1:5000": {{"username": "bob", "password": "pw"}},
                 "empty.example.com": {{}}}}}}"#
        );
        let creds = RegistryCredentials::parse(text.as_bytes()).unwrap();
        assert_eq!(
            creds.auth_for("reg.example.com"),
            RegistryAuth::Basic("alice".into(), "s3cr:et".into())
        );
        assert_eq!(
            creds.auth_for("127.0.0.1:5000"),
            RegistryAuth::Basic("bob".into(), "pw".into())
        );
        assert_eq!(creds.auth_for("empty.example.com"), RegistryAuth::Anonymous);
        assert!(!format!("{creds:?}").contains("pw"));
        assert!(RegistryCredentials::parse(br#"{"auths": {"x": {"auth": "!!"}}}"#).is_err());
        assert!(RegistryCredentials::parse(b"not json").is_err());
    }

    #[test]
    fn index_selection_picks_this_platform() {
        let hex = "a".repeat(64);
        let entry = |os: &str, arch: &str| {
            format!(
                r#"{{"mediaType":"{MEDIA_OCI_MANIFEST}","digest":"sha256:{hex}","size":1,"platform":{{"os":"{os}","architecture":"{arch}"}}}}"#
            )
        };
        let index = |entries: &[String]| -> IndexDoc {
            let text = format!(
                r#"{{"schemaVersion":2,"manifests":[{}]}}"#,
                entries.join(",")
            );
            serde_json::from_str(&text).unwrap()
        };
        let picked = pick_platform(&index(&[
            entry("linux", "arm64"),
            entry(PLATFORM_OS, PLATFORM_ARCH),
        ]))
        .unwrap();
        assert_eq!(picked.platform.unwrap().architecture, PLATFORM_ARCH);
        let refused = pick_platform(&index(&[entry("linux", "s390x")])).unwrap_err();
        assert_eq!(refused.code(), "image_platform_unsupported");
        assert!(refused.to_string().contains("linux/s390x"));
    }

    #[test]
    fn registry_errors_map_to_stable_codes() {
        let code = |e| registry_error("r", "x", e).code();
        assert_eq!(
            code(OciDistributionError::UnauthorizedError { url: "u".into() }),
            "registry_unauthorized"
        );
        assert_eq!(
            code(OciDistributionError::ServerError {
                code: 403,
                url: "u".into(),
                message: String::new()
            }),
            "registry_unauthorized"
        );
        assert_eq!(
            code(OciDistributionError::ServerError {
                code: 503,
                url: "u".into(),
                message: String::new()
            }),
            "registry_unreachable"
        );
        assert_eq!(
            code(OciDistributionError::ServerError {
                code: 404,
                url: "u".into(),
                message: String::new()
            }),
            "image_not_found"
        );
        let envelope: oci_client::errors::OciEnvelope = serde_json::from_str(
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
        )
        .unwrap();
        assert_eq!(
            code(OciDistributionError::RegistryError {
                envelope,
                url: "u".into()
            }),
            "image_not_found"
        );
        let envelope: oci_client::errors::OciEnvelope =
            serde_json::from_str(r#"{"errors":[{"code":"DENIED","message":"no"}]}"#).unwrap();
        assert_eq!(
            code(OciDistributionError::RegistryError {
                envelope,
                url: "u".into()
            }),
            "registry_unauthorized"
        );
    }
}
