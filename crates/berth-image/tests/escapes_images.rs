//! Attacks on the image store through pulls: decompression bombs, hard-link floods, an
//! org over its storage quota, and registry pulls used as a port scanner (SSRF). Each
//! runs against a real registry (Debian's docker-registry on loopback) or the real
//! unpacker, and checks that nothing is left behind.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use berth_image::{
    no_progress, Compression, ImageBuilder, ImageError, ImagePuller, ImageStore, LayerBuilder,
    PullScope, RegistryOptions, UnpackLimits,
};
use berth_testkit::{push_layout, PushTarget, Registry};
use common::names;
use sha2::{Digest as _, Sha256};

const MIB: u64 = 1 << 20;

fn store_with(limits: UnpackLimits) -> (tempfile::TempDir, Arc<ImageStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ImageStore::open(&dir.path().join("store"), limits).unwrap());
    (dir, store)
}

async fn pull_scoped(
    puller: &ImagePuller,
    name: &str,
    scope: &PullScope,
) -> Result<berth_image::ResolvedImage, ImageError> {
    let lease = puller.store().lease();
    puller
        .resolve_scoped(name, &lease, no_progress(), scope)
        .await
}

/// Every directory of the store holds nothing: no tag, blob, layer, size or temp file.
fn assert_store_empty(store: &ImageStore) {
    let root = store.root();
    for dir in [
        "refs",
        "blobs/sha256",
        "layers/sha256",
        "sizes/sha256",
        "tmp",
    ] {
        assert!(
            names(&root.join(dir)).is_empty(),
            "{dir} holds {:?}",
            names(&root.join(dir))
        );
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes an OCI layout with pre-compressed layer blobs (too big to build in memory
/// uncompressed) and returns the manifest digest.
fn write_raw_layout(dir: &Path, layers: &[(&str, Vec<u8>)]) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let hex = sha256_hex(bytes);
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let config = serde_json::json!({
        "architecture": berth_image::PLATFORM_ARCH,
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []},
        "config": {"Cmd": ["/bin/true"]},
    });
    let (config_digest, config_size) = put(&serde_json::to_vec(&config).unwrap());
    let layer_descs: Vec<_> = layers
        .iter()
        .map(|(media_type, bytes)| {
            let (digest, size) = put(bytes);
            serde_json::json!({"mediaType": media_type, "digest": digest, "size": size})
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": layer_descs,
    });
    let (manifest_digest, manifest_size) = put(&serde_json::to_vec(&manifest).unwrap());
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest_size}],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    manifest_digest
}

/// A tar of `files` regular files of `each` zero bytes, streamed into `out`.
fn zero_files_tar<W: Write>(out: W, files: usize, each: u64) -> W {
    let mut builder = tar::Builder::new(out);
    let zeros = vec![0u8; 1 << 20];
    for i in 0..files {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(each);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_cksum();
        let reader =
            std::io::Read::take(std::io::Read::chain(&zeros[..], std::io::repeat(0)), each);
        builder
            .append_data(&mut header, format!("zero-{i}"), reader)
            .unwrap();
    }
    builder.into_inner().unwrap()
}

fn small_layer() -> Vec<u8> {
    let tar = LayerBuilder::new()
        .file("etc/hello", b"hello\n", 0o644)
        .into_tar()
        .unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

async fn push_raw(registry: &Registry, repository: &str, layers: &[(&str, Vec<u8>)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    write_raw_layout(dir.path(), layers);
    push_layout(
        &PushTarget::anonymous(&registry.host()),
        repository,
        "1",
        dir.path(),
    )
    .await
    .unwrap();
    format!("{}/{repository}:1", registry.host())
}

/// Decompression bombs with the default limits: a zstd layer of a few KiB holding one
/// 2 GiB file of zeros, and a gzip layer of well under 1 MiB holding 300 MiB of zero
/// files (written until the cap, since each file alone is small), each behind a small
/// good layer that is published first. Both are refused with `image_too_large`, and the
/// store is left exactly empty: no blob of either layer, no unpacked layer, no tag.
///
/// Proved able to fail: with the ratio check reverted (the old caps: `max_ratio` and
/// `ratio_floor_bytes` set to `u64::MAX >> 8` here), the gzip bomb pulled fine and
/// left 300 MiB unpacked in `layers/`; with the rollback in `fetch_planned` removed, the
/// small layer's blob and unpacked dir stayed behind after the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decompression_bombs_are_refused_and_leave_nothing() {
    let registry = Registry::start().unwrap();

    let mut zstd = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    zstd = zero_files_tar(zstd, 1, 2 << 30);
    let zstd_bomb = zstd.finish().unwrap();
    assert!(zstd_bomb.len() < 2 << 20, "{}", zstd_bomb.len());
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let gzip_bomb = zero_files_tar(gz, 75, 4 * MIB).finish().unwrap();
    assert!(gzip_bomb.len() < 2 << 20, "{}", gzip_bomb.len());

    for (name, media_type, bomb, why) in [
        (
            "bomb/zstd",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            zstd_bomb,
            "times its compressed size",
        ),
        (
            "bomb/gzip",
            "application/vnd.oci.image.layer.v1.tar+gzip",
            gzip_bomb,
            "times its compressed size",
        ),
    ] {
        let reference = push_raw(
            &registry,
            name,
            &[
                ("application/vnd.oci.image.layer.v1.tar+gzip", small_layer()),
                (media_type, bomb),
            ],
        )
        .await;
        let (_dir, store) = store_with(UnpackLimits::default());
        let puller = Arc::new(ImagePuller::new(store.clone(), RegistryOptions::default()));
        let error = pull_scoped(&puller, &reference, &PullScope::default())
            .await
            .unwrap_err();
        assert_eq!(error.code(), "image_too_large", "{name}: {error}");
        assert!(error.to_string().contains(why), "{name}: {error}");
        drop(puller);
        assert_store_empty(&store);
    }
}

/// A layer of one 1 MiB file and 3000 hard links to it. A hard link writes no data, but
/// it is a name on disk, so each is charged a block: 3000 links cost ~12 MiB of the
/// layer's allowance and a cap of 8 MiB refuses the layer. With room, the charged size is
/// at least what the tree really takes on disk (blocks of every distinct inode and of
/// every directory).
///
/// Proved able to fail: with the `charge(BLOCK)` for hard links removed, the 8 MiB cap let
/// the layer through (charged 1 MiB for 3001 names).
#[test]
fn hard_link_floods_are_charged() {
    let mut layer = LayerBuilder::new().file("big", &vec![7u8; MIB as usize], 0o644);
    for i in 0..3000 {
        layer = layer.hardlink(&format!("l/{i}"), "big");
    }
    let tar = layer.into_tar().unwrap();

    let tight = UnpackLimits {
        max_layer_bytes: 8 * MIB,
        ..UnpackLimits::default()
    };
    let dest = tempfile::tempdir().unwrap();
    let error = berth_image::unpack_layer(&tar[..], dest.path(), &tight).unwrap_err();
    assert_eq!(error.code(), "image_too_large", "{error}");

    let dest = tempfile::tempdir().unwrap();
    let stats = berth_image::unpack_layer(&tar[..], dest.path(), &UnpackLimits::default()).unwrap();
    assert!(stats.charged >= MIB + 3000 * 4096, "{stats:?}");
    let mut seen = std::collections::HashSet::new();
    let mut on_disk = 0u64;
    for entry in walkdir(dest.path()) {
        let meta = std::fs::symlink_metadata(&entry).unwrap();
        if seen.insert(meta.ino()) {
            on_disk += meta.blocks() * 512;
        }
    }
    assert!(
        on_disk <= stats.charged,
        "on disk {on_disk} > charged {}",
        stats.charged
    );
}

fn walkdir(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                pending.push(path.clone());
            }
            out.push(path);
        }
    }
    out
}

/// An org with 4 MiB of image storage left pulls an image whose second layer unpacks to
/// 8 MiB: refused with `image_too_large` naming the org's quota, as soon as the layer
/// passes what is left, and nothing stays. The same image fits once the org already
/// uses (and so was already charged for) the big layer.
///
/// Proved able to fail: with `storage_left_bytes` ignored in `fetch_planned` (no org
/// budget), the pull succeeded and left both layers in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_org_over_its_image_storage_quota_is_refused() {
    let registry = Registry::start().unwrap();
    let image = ImageBuilder::new()
        .layer(
            LayerBuilder::new().file("etc/hello", b"hi\n", 0o644),
            Compression::Gzip,
        )
        .layer(
            LayerBuilder::new().file("data", &vec![1u8; 8 * MIB as usize], 0o644),
            Compression::Gzip,
        );
    let digest_of_big = {
        let dir = tempfile::tempdir().unwrap();
        image.write_layout(dir.path()).unwrap();
        push_layout(
            &PushTarget::anonymous(&registry.host()),
            "quota/app",
            "1",
            dir.path(),
        )
        .await
        .unwrap();
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        let manifest_hex = index["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_string();
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("blobs/sha256").join(manifest_hex)).unwrap(),
        )
        .unwrap();
        manifest["layers"][1]["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let reference = format!("{}/quota/app:1", registry.host());

    let (_dir, store) = store_with(UnpackLimits::default());
    let puller = Arc::new(ImagePuller::new(store.clone(), RegistryOptions::default()));
    let scope = PullScope {
        storage_left_bytes: Some(4 * MIB),
        storage_limit_mb: Some(64),
        ..PullScope::default()
    };
    let error = pull_scoped(&puller, &reference, &scope).await.unwrap_err();
    assert_eq!(error.code(), "image_too_large", "{error}");
    assert!(
        error
            .to_string()
            .contains("org's image storage quota (64 MiB"),
        "{error}"
    );
    assert_store_empty(&store);

    let already_used = PullScope {
        charged_layers: vec![digest_of_big],
        ..scope
    };
    let image = pull_scoped(&puller, &reference, &already_used)
        .await
        .unwrap();
    assert!(image.unpacked_bytes >= 8 * MIB, "{}", image.unpacked_bytes);
    let listed = store.list().unwrap();
    assert_eq!(listed[0].unpacked_bytes, image.unpacked_bytes);
}

/// A TCP port on loopback that answers every request like a web server, not a registry.
async fn web_server() -> (u16, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let body = "<html>admin console</html>";
                let _ = socket
                    .write_all(
                        format!(
                            "HTTP/1.1 404 Not Found\r\ncontent-type: text/html\r\n\
                             content-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    (port, task)
}

fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// (code, message with the registry's own name replaced), as a client compares them.
fn answer(error: &ImageError, registry: &str) -> (String, String) {
    (
        error.code().to_string(),
        error.to_string().replace(registry, "REGISTRY"),
    )
}

/// SSRF: an org token probes 127.0.0.1 through pulls. A closed port and an open port
/// serving something else get the same answer (code and message): refused before any
/// connection when loopback is not allowed, and one generic "no registry answered" when
/// the operator allowed 127.0.0.1 (a bare host covers every port). A real registry on
/// loopback that is not allowed is refused for the org token, and works for the
/// operator and once allowed.
///
/// Proved able to fail: the operator's (unrestricted) pulls of the same two ports get
/// different answers (`registry_unreachable` "connection refused" against
/// `image_not_found`), which is what an org token got before this change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_pulls_cannot_probe_ports_or_reach_unlisted_loopback() {
    let (open, server) = web_server().await;
    let closed = closed_port();
    let open_host = format!("127.0.0.1:{open}");
    let closed_host = format!("127.0.0.1:{closed}");
    let (_dir, store) = store_with(UnpackLimits::default());
    let org = PullScope {
        restricted: true,
        ..PullScope::default()
    };

    let unlisted = Arc::new(ImagePuller::new(store.clone(), RegistryOptions::default()));
    let loopback_allowed = Arc::new(ImagePuller::new(
        store.clone(),
        RegistryOptions {
            allowed: vec!["127.0.0.1".into()],
            ..RegistryOptions::default()
        },
    ));
    let probe = |puller: Arc<ImagePuller>, host: String, scope: PullScope| async move {
        let error = pull_scoped(&puller, &format!("{host}/probe/x:1"), &scope)
            .await
            .unwrap_err();
        answer(&error, &host)
    };

    // The operator sees the difference: this is the information an org must not get.
    let admin_closed = probe(unlisted.clone(), closed_host.clone(), PullScope::default()).await;
    let admin_open = probe(unlisted.clone(), open_host.clone(), PullScope::default()).await;
    assert_ne!(admin_closed, admin_open);

    let org_closed = probe(unlisted.clone(), closed_host.clone(), org.clone()).await;
    let org_open = probe(unlisted.clone(), open_host.clone(), org.clone()).await;
    assert_eq!(org_closed, org_open);
    assert_eq!(org_closed.0, "registry_not_allowed", "{org_closed:?}");

    let org_closed = probe(loopback_allowed.clone(), closed_host, org.clone()).await;
    let org_open = probe(loopback_allowed.clone(), open_host, org.clone()).await;
    assert_eq!(org_closed, org_open);
    assert_eq!(org_closed.0, "registry_unreachable", "{org_closed:?}");
    server.abort();

    // A real registry on loopback: refused unless listed.
    let registry = Registry::start().unwrap();
    let reference = push_raw(
        &registry,
        "team/app",
        &[("application/vnd.oci.image.layer.v1.tar+gzip", small_layer())],
    )
    .await;
    let refused = pull_scoped(&unlisted, &reference, &org).await.unwrap_err();
    assert_eq!(refused.code(), "registry_not_allowed", "{refused}");
    assert_store_empty(&store);
    let listed = Arc::new(ImagePuller::new(
        store.clone(),
        RegistryOptions {
            allowed: vec![registry.host()],
            ..RegistryOptions::default()
        },
    ));
    pull_scoped(&listed, &reference, &org).await.unwrap();
    pull_scoped(&unlisted, &reference, &PullScope::default())
        .await
        .unwrap();
}

/// The address check itself: every private, loopback, link-local and ULA range is not
/// public, whichever way it is written.
#[test]
fn private_ranges_are_not_public() {
    for text in [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "::1",
        "::",
        "fd12:3456::1",
        "fe80::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
    ] {
        let ip: std::net::IpAddr = text.parse().unwrap();
        assert!(!berth_image::is_public_address(ip), "{text}");
    }
    for text in ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"] {
        let ip: std::net::IpAddr = text.parse().unwrap();
        assert!(berth_image::is_public_address(ip), "{text}");
    }
}
