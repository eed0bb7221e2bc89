//! Pulls from a real registry (Debian's docker-registry on loopback), with images built
//! in code and pushed with oci-client.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_image::{
    no_progress, Compression, ImageBuilder, ImageError, ImagePuller, ImageReference, ImageStore,
    InUse, LayerBuilder, PullEvent, PullStatus, RegistryCredentials, RegistryOptions, UnpackLimits,
};
use berth_testkit::{push_image, push_index, Fault, Proxy, PushTarget, Registry};
use common::{names, small_image, snapshot};

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<ImageStore>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(ImageStore::open(&dir.path().join("store"), UnpackLimits::default()).unwrap());
    Fixture { _dir: dir, store }
}

fn puller(store: &Arc<ImageStore>, options: RegistryOptions) -> Arc<ImagePuller> {
    Arc::new(ImagePuller::new(store.clone(), options))
}

async fn pull(puller: &ImagePuller, name: &str) -> Result<berth_image::ResolvedImage, ImageError> {
    let lease = puller.store().lease();
    puller.resolve(name, &lease, no_progress()).await
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 64];
    rustix::fs::lgetxattr(path, name, &mut buf)
        .ok()
        .map(|n| buf[..n].to_vec())
}

/// Nothing verified-looking is left from a failed pull: no tag, no layer, no temp file.
fn assert_nothing_partial(store: &ImageStore, layers: &[String]) {
    let root = store.root();
    assert!(names(&root.join("refs")).is_empty(), "a tag was written");
    assert!(names(&root.join("tmp")).is_empty(), "tmp/ holds leftovers");
    for digest in layers {
        let hex = digest.strip_prefix("sha256:").unwrap();
        assert!(
            !root.join("blobs/sha256").join(hex).exists(),
            "blob {digest}"
        );
        assert!(
            !root.join("layers/sha256").join(hex).exists(),
            "layer {digest}"
        );
    }
}

fn busybox() -> LayerBuilder {
    berth_image::busybox_layer(Path::new("/bin/busybox")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_layer_image_with_whiteouts_opaque_dir_and_every_compression() {
    let registry = Registry::start().unwrap();
    let image = ImageBuilder::new()
        .layer(
            LayerBuilder::new()
                .dir("etc", 0o755)
                .file("etc/keep", b"keep", 0o644)
                .file("etc/removed", b"gone soon", 0o644)
                .dir("var/cache", 0o755)
                .file("var/cache/old", b"old", 0o644),
            Compression::Gzip,
        )
        .layer(
            LayerBuilder::new()
                .whiteout("etc/removed")
                .dir("var/cache", 0o755)
                .opaque("var/cache")
                .file("var/cache/new", b"new", 0o644),
            Compression::Zstd,
        )
        .layer(
            LayerBuilder::new().file("top", b"plain tar", 0o600),
            Compression::None,
        )
        .cmd(&["/bin/true"]);
    let target = PushTarget::anonymous(&registry.host());
    let digest = push_image(&target, "team/web", "1.4", image.clone())
        .await
        .unwrap();

    let f = fixture();
    let puller = puller(&f.store, RegistryOptions::default());
    let events = Arc::new(Mutex::new(Vec::<PullEvent>::new()));
    let sink = events.clone();
    let name = format!("{}/team/web:1.4", registry.host());
    let lease = f.store.lease();
    let resolved = puller
        .resolve(
            &name,
            &lease,
            Arc::new(move |event| sink.lock().unwrap().push(event)),
        )
        .await
        .unwrap();
    drop(lease);
    assert_eq!(resolved.manifest_digest, digest);
    assert_eq!(resolved.layer_dirs.len(), 3);
    assert_eq!(resolved.config.cmd, vec!["/bin/true"]);
    assert_eq!(resolved.reference.name(), name);

    // overlayfs whiteout and opaque markers, as for a local import.
    let upper = &resolved.layer_dirs[1];
    let whiteout = std::fs::symlink_metadata(upper.join("etc/removed")).unwrap();
    assert!(whiteout.file_type().is_char_device());
    assert_eq!(
        xattr(&upper.join("var/cache"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        std::fs::read(resolved.layer_dirs[2].join("top")).unwrap(),
        b"plain tar"
    );

    // Byte for byte what importing the same image gives.
    let other = fixture();
    let layout = other._dir.path().join("layout");
    image.write_layout(&layout).unwrap();
    let imported = other.store.import(&layout, "local/web:1").unwrap();
    assert_eq!(imported.manifest_digest, digest);
    for (pulled, local) in resolved.layer_dirs.iter().zip(&imported.layer_dirs) {
        assert_eq!(snapshot(pulled), snapshot(local));
    }

    // Progress: resolved first, done last, every layer downloaded and unpacked.
    let events = events.lock().unwrap().clone();
    assert_eq!(events.first().unwrap().status, PullStatus::Resolved);
    assert_eq!(events.last().unwrap().status, PullStatus::Done);
    for layer in &resolved.layer_digests {
        for status in [PullStatus::Downloaded, PullStatus::Unpacked] {
            assert!(
                events
                    .iter()
                    .any(|e| e.status == status && e.layer.as_ref() == Some(layer)),
                "{status:?} for {layer}"
            );
        }
    }

    // The tag is listed, and resolves locally afterwards.
    let listed = f.store.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, name);
    assert_eq!(f.store.resolve(&name).unwrap().manifest_digest, digest);
    assert_eq!(puller.blobs_downloaded(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_yields_this_platform_and_refuses_an_index_without_it() {
    let registry = Registry::start().unwrap();
    let target = PushTarget::anonymous(&registry.host());
    let image = small_image("index");
    push_index(
        &target,
        "multi/arch",
        "1",
        image.clone(),
        &[("linux", "arm64"), ("linux", "amd64"), ("windows", "amd64")],
    )
    .await
    .unwrap();
    push_index(&target, "arm/only", "1", image, &[("linux", "arm64")])
        .await
        .unwrap();

    let f = fixture();
    let puller = puller(&f.store, RegistryOptions::default());
    let resolved = pull(&puller, &format!("{}/multi/arch:1", registry.host()))
        .await
        .unwrap();
    let config_says = std::fs::read_to_string(
        f.store
            .root()
            .join("blobs/sha256")
            .join(resolved.manifest_digest.strip_prefix("sha256:").unwrap()),
    )
    .unwrap();
    assert!(
        config_says.contains("layers"),
        "a platform manifest is stored"
    );
    assert_eq!(resolved.layer_dirs.len(), 2);

    let refused = pull(&puller, &format!("{}/arm/only:1", registry.host()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "image_platform_unsupported", "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn htpasswd_registry_needs_the_configured_credentials() {
    let registry = Registry::start_with_htpasswd("robot", "s3cret").unwrap();
    let target = PushTarget::with_credentials(&registry.host(), "robot", "s3cret");
    push_image(&target, "private/app", "v1", small_image("private"))
        .await
        .unwrap();
    let name = format!("{}/private/app:v1", registry.host());

    let f = fixture();
    let anonymous = puller(&f.store, RegistryOptions::default());
    let refused = pull(&anonymous, &name).await.unwrap_err();
    assert_eq!(refused.code(), "registry_unauthorized", "{refused}");

    let mut wrong = RegistryCredentials::default();
    wrong.insert(&registry.host(), "robot", "guess");
    let refused = pull(
        &puller(
            &f.store,
            RegistryOptions {
                credentials: wrong,
                ..RegistryOptions::default()
            },
        ),
        &name,
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), "registry_unauthorized", "{refused}");
    assert_nothing_partial(&f.store, &[]);

    // Credentials the way `berth up --registry-auth` reads them: a docker config.json.
    let auth_file = f._dir.path().join("config.json");
    let encoded = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode("robot:s3cret")
    };
    std::fs::write(
        &auth_file,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{encoded}"}}}}}}"#,
            registry.host()
        ),
    )
    .unwrap();
    let credentials = RegistryCredentials::load(&auth_file).unwrap();
    let allowed = puller(
        &f.store,
        RegistryOptions {
            credentials,
            ..RegistryOptions::default()
        },
    );
    let resolved = pull(&allowed, &name).await.unwrap();
    assert_eq!(resolved.layer_dirs.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_challenge_flow() {
    // docker-registry only verifies tokens (JWTs signed by a configured certificate); the
    // token service here is the test proxy's, which gates a real registry behind it.
    let registry = Registry::start().unwrap();
    push_image(
        &PushTarget::anonymous(&registry.host()),
        "tokened/app",
        "1",
        small_image("token"),
    )
    .await
    .unwrap();
    let gate = Proxy::start_token_gate(&registry.host(), "ci", "t0ken-pass").unwrap();
    let name = format!("{}/tokened/app:1", gate.host());

    let f = fixture();
    let refused = pull(&puller(&f.store, RegistryOptions::default()), &name)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), "registry_unauthorized", "{refused}");

    let mut credentials = RegistryCredentials::default();
    credentials.insert(&gate.host(), "ci", "t0ken-pass");
    let puller = puller(
        &f.store,
        RegistryOptions {
            credentials,
            ..RegistryOptions::default()
        },
    );
    let resolved = pull(&puller, &name).await.unwrap();
    assert_eq!(resolved.layer_dirs.len(), 2);
    assert_eq!(gate.total_blob_gets(), 3, "two layers and the config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_blob_is_refused_and_leaves_nothing() {
    let registry = Registry::start().unwrap();
    let image = small_image("corrupt");
    push_image(
        &PushTarget::anonymous(&registry.host()),
        "team/web",
        "1",
        image.clone(),
    )
    .await
    .unwrap();
    let proxy = Proxy::start(&registry.host()).unwrap();
    proxy.set_fault(Fault::CorruptBlobs);
    let name = format!("{}/team/web:1", proxy.host());

    let f = fixture();
    let puller = puller(&f.store, RegistryOptions::default());
    let error = pull(&puller, &name).await.unwrap_err();
    assert_eq!(error.code(), "invalid_image", "{error}");
    assert!(error.to_string().contains("digest"), "{error}");
    assert_nothing_partial(&f.store, &[]);
    assert!(names(&f.store.root().join("blobs/sha256")).is_empty());
    assert!(names(&f.store.root().join("layers/sha256")).is_empty());

    // The same store pulls fine once the bytes are right.
    proxy.set_fault(Fault::None);
    let resolved = pull(&puller, &name).await.unwrap();
    assert_eq!(resolved.layer_dirs.len(), 2);
}

#[test]
fn a_registry_killed_mid_pull_leaves_nothing_partial_and_answers_unreachable() {
    let mut registry = Registry::start().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Big and incompressible, so most of it is still in the registry when it dies.
    let big: Vec<u8> = (0u32..(24 << 20) / 4)
        .flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes())
        .collect();
    let image = ImageBuilder::new().layer(
        LayerBuilder::new().file("big", &big, 0o644),
        Compression::None,
    );
    let target = PushTarget::anonymous(&registry.host());
    runtime
        .block_on(push_image(&target, "big/blob", "1", image))
        .unwrap();
    let proxy = Proxy::start(&registry.host()).unwrap();
    proxy.set_fault(Fault::PauseBlobAfter(1 << 20));
    let name = format!("{}/big/blob:1", proxy.host());

    let f = fixture();
    let puller = puller(&f.store, RegistryOptions::default());
    let pulling = {
        let puller = puller.clone();
        let name = name.clone();
        runtime.spawn(async move { pull(&puller, &name).await })
    };
    assert!(
        proxy.wait_paused(Duration::from_secs(30)),
        "the download never started"
    );
    // The config went through before the layer; now the layer is part way.
    registry.kill();
    proxy.resume();
    let error = runtime.block_on(pulling).unwrap().unwrap_err();
    assert_eq!(error.code(), "registry_unreachable", "{error}");
    assert!(error.retry_after_ms().is_some());
    assert_nothing_partial(&f.store, &[]);
    assert!(names(&f.store.root().join("blobs/sha256")).is_empty());
    assert!(names(&f.store.root().join("layers/sha256")).is_empty());

    // With the registry back, the same pull completes.
    registry.start_again().unwrap();
    let resolved = runtime.block_on(pull(&puller, &name)).unwrap();
    assert_eq!(
        std::fs::metadata(resolved.layer_dirs[0].join("big"))
            .unwrap()
            .len(),
        big.len() as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_unknown_and_malformed_references() {
    let f = fixture();
    let puller = puller(&f.store, RegistryOptions::default());
    // Nothing listens on port 9 of loopback.
    let down = pull(&puller, "127.0.0.1:9/team/web:1").await.unwrap_err();
    assert_eq!(down.code(), "registry_unreachable", "{down}");
    assert_eq!(
        down.retry_after_ms(),
        Some(berth_image::REGISTRY_RETRY_AFTER_MS)
    );

    let registry = Registry::start().unwrap();
    push_image(
        &PushTarget::anonymous(&registry.host()),
        "team/web",
        "1",
        small_image("x"),
    )
    .await
    .unwrap();
    for missing in ["team/web:2", "no/such:1"] {
        let error = pull(&puller, &format!("{}/{missing}", registry.host()))
            .await
            .unwrap_err();
        assert_eq!(error.code(), "image_not_found", "{missing}: {error}");
    }
    let error = pull(&puller, &format!("{}/Team/Web:1", registry.host()))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "invalid_image_ref");
    assert_nothing_partial(&f.store, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_download_each_blob_once_and_shared_layers_never_again() {
    let registry = Registry::start().unwrap();
    let target = PushTarget::anonymous(&registry.host());
    let base = ImageBuilder::new()
        .layer(busybox(), Compression::Gzip)
        .layer(
            LayerBuilder::new().file("one", b"1", 0o644),
            Compression::Gzip,
        );
    let first = push_image(&target, "app/one", "1", base).await.unwrap();
    // Shares the busybox layer with app/one.
    push_image(
        &target,
        "app/two",
        "1",
        ImageBuilder::new()
            .layer(busybox(), Compression::Gzip)
            .layer(
                LayerBuilder::new().file("two", b"2", 0o644),
                Compression::Zstd,
            ),
    )
    .await
    .unwrap();
    let proxy = Proxy::start(&registry.host()).unwrap();

    let f = fixture();
    let puller = puller(&f.store, RegistryOptions::default());
    let name = format!("{}/app/one:1", proxy.host());
    let pulls: Vec<_> = (0..10)
        .map(|_| {
            let puller = puller.clone();
            let name = name.clone();
            tokio::spawn(async move { pull(&puller, &name).await })
        })
        .collect();
    for handle in pulls {
        assert_eq!(handle.await.unwrap().unwrap().manifest_digest, first);
    }
    let gets = proxy.blob_gets();
    let resolved = f.store.resolve(&name).unwrap();
    for layer in &resolved.layer_digests {
        assert_eq!(gets.get(layer), Some(&1), "layer {layer}: {gets:?}");
    }
    assert_eq!(f.store.layers_unpacked(), 2);
    assert_eq!(puller.blobs_downloaded(), 2);

    // Another image with the same base layer fetches only its own layer.
    let two = pull(&puller, &format!("{}/app/two:1", proxy.host()))
        .await
        .unwrap();
    let gets = proxy.blob_gets();
    assert_eq!(gets.get(&two.layer_digests[0]), Some(&1), "{gets:?}");
    assert_eq!(gets.get(&two.layer_digests[1]), Some(&1), "{gets:?}");
    assert_eq!(f.store.layers_unpacked(), 3);

    // A digest reference that is stored resolves without the registry.
    drop(proxy);
    drop(registry);
    let by_digest = format!("127.0.0.1:9/app/one@{first}");
    assert_eq!(
        pull(&puller, &by_digest).await.unwrap().manifest_digest,
        first
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_registry_fills_in_names_without_one_but_local_tags_win() {
    let registry = Registry::start().unwrap();
    push_image(
        &PushTarget::anonymous(&registry.host()),
        "demo/busybox",
        "1",
        small_image("remote"),
    )
    .await
    .unwrap();
    let f = fixture();
    let layout = f._dir.path().join("layout");
    let local_digest = small_image("local").write_layout(&layout).unwrap();
    f.store.import(&layout, "local/only:1").unwrap();
    let puller = puller(
        &f.store,
        RegistryOptions {
            default_registry: Some(registry.host()),
            ..RegistryOptions::default()
        },
    );
    assert_eq!(puller.remote_reference("local/only:1").unwrap(), None);
    assert_eq!(
        pull(&puller, "local/only:1").await.unwrap().manifest_digest,
        local_digest
    );
    let pulled = pull(&puller, "demo/busybox:1").await.unwrap();
    assert_eq!(
        pulled.reference,
        ImageReference::parse(&format!("{}/demo/busybox:1", registry.host())).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keeps_what_machines_and_leases_hold() {
    let registry = Registry::start().unwrap();
    let target = PushTarget::anonymous(&registry.host());
    push_image(&target, "keep/me", "1", small_image("keep"))
        .await
        .unwrap();
    push_image(&target, "drop/me", "1", small_image("drop"))
        .await
        .unwrap();
    push_image(&target, "leased/me", "1", small_image("leased"))
        .await
        .unwrap();
    let f = fixture();
    let puller = puller(&f.store, RegistryOptions::default());
    let keep = pull(&puller, &format!("{}/keep/me:1", registry.host()))
        .await
        .unwrap();
    let dropped = pull(&puller, &format!("{}/drop/me:1", registry.host()))
        .await
        .unwrap();
    let leased_lease = f.store.lease();
    let leased = puller
        .resolve(
            &format!("{}/leased/me:1", registry.host()),
            &leased_lease,
            no_progress(),
        )
        .await
        .unwrap();

    let collection = f.store.begin_collection().await;
    let in_use = InUse {
        manifests: [keep.manifest_digest.clone()].into(),
        layers: keep.layer_digests.iter().cloned().collect(),
    };
    let report = collection.prune(&in_use).unwrap();
    assert_eq!(
        report.images,
        vec![format!("{}/drop/me:1", registry.host())]
    );
    // The base layer is shared by all three images; only drop/me's own layer goes.
    assert_eq!(report.layers, 1);
    assert!(!dropped.layer_dirs[1].exists());
    assert!(dropped.layer_dirs[0].exists());
    for dir in keep.layer_dirs.iter().chain(&leased.layer_dirs) {
        assert!(dir.exists(), "{}", dir.display());
    }
    assert!(names(&f.store.root().join("tmp")).is_empty());

    // Once the lease is gone, the leased image goes too.
    drop(leased_lease);
    let report = f.store.begin_collection().await.prune(&in_use).unwrap();
    assert_eq!(
        report.images,
        vec![format!("{}/leased/me:1", registry.host())]
    );
    assert!(!leased.layer_dirs[1].exists());
    assert!(f.store.resolve(&keep.reference.name()).is_ok());

    // Removing one tag removes what only it reached.
    let report = f
        .store
        .begin_collection()
        .await
        .remove(&keep.reference.name(), &InUse::default())
        .unwrap();
    assert_eq!(report.layers, 2);
    assert!(names(&f.store.root().join("layers/sha256")).is_empty());
    assert!(names(&f.store.root().join("blobs/sha256")).is_empty());
}

/// A small tmpfs, unmounted (and removed) on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn new(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        rustix::mount::mount(
            "tmpfs",
            dir.path(),
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            format!("size={size}").as_str(),
        )
        .unwrap();
        SmallDisk { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(self.dir.path(), rustix::mount::UnmountFlags::DETACH);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_insufficient_storage_and_leaves_nothing() {
    let registry = Registry::start().unwrap();
    let big: Vec<u8> = (0u32..(6 << 20) / 4)
        .flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes())
        .collect();
    push_image(
        &PushTarget::anonymous(&registry.host()),
        "big/image",
        "1",
        ImageBuilder::new().layer(
            LayerBuilder::new().file("big", &big, 0o644),
            Compression::None,
        ),
    )
    .await
    .unwrap();
    let disk = SmallDisk::new("2m");
    let store = Arc::new(
        ImageStore::open(&disk.dir.path().join("store"), UnpackLimits::default()).unwrap(),
    );
    let puller = puller(&store, RegistryOptions::default());
    let error = pull(&puller, &format!("{}/big/image:1", registry.host()))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "insufficient_storage", "{error}");
    assert_nothing_partial(&store, &[]);
    assert!(names(&store.root().join("blobs/sha256")).is_empty());
    assert!(names(&store.root().join("layers/sha256")).is_empty());
}

/// A reference by digest that the store holds needs no registry: the move of a Machine
/// to a worker that has its image goes on while the registry is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_digest_resolves_with_the_registry_down() {
    let mut registry = Registry::start().unwrap();
    let target = PushTarget::anonymous(&registry.host());
    let digest = push_image(&target, "team/app", "1", small_image("pinned"))
        .await
        .unwrap();
    let f = fixture();
    let puller = puller(&f.store, RegistryOptions::default());
    let tagged = format!("{}/team/app:1", registry.host());
    assert_eq!(
        pull(&puller, &tagged).await.unwrap().manifest_digest,
        digest
    );
    registry.kill();
    let pinned = format!("{}/team/app@{digest}", registry.host());
    let resolved = pull(&puller, &pinned).await.expect("served from the store");
    assert_eq!(resolved.manifest_digest, digest);
    // The tag needs the registry (it may have moved): refused, which shows it is down.
    assert!(matches!(
        pull(&puller, &tagged).await,
        Err(ImageError::RegistryUnreachable { .. })
    ));
}
