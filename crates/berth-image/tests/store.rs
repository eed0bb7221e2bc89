//! The image store: import, resolve, tags, sharing and failure atomicity.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use berth_image::{
    busybox_layer, Compression, ImageBuilder, ImageStore, LayerBuilder, UnpackLimits, PLATFORM_ARCH,
};
use common::{hex, names, small_image, store};

fn assert_store_empty(store: &ImageStore) {
    for dir in ["blobs/sha256", "layers/sha256", "refs", "tmp"] {
        assert_eq!(
            names(&store.root().join(dir)),
            Vec::<String>::new(),
            "{dir} should be empty"
        );
    }
}

#[test]
fn import_layout_dir_and_resolve() {
    let (tmp, store) = store();
    let layout = tmp.path().join("layout");
    let digest = small_image("one").write_layout(&layout).unwrap();

    let image = store.import(&layout, "demo/small:1").unwrap();
    assert_eq!(image.manifest_digest, digest);
    assert_eq!(image.reference.name(), "demo/small:1");
    assert_eq!(image.layer_digests.len(), 2);
    assert_eq!(image.layer_dirs.len(), 2);
    for (digest, dir) in image.layer_digests.iter().zip(&image.layer_dirs) {
        assert_eq!(dir, &store.root().join("layers/sha256").join(hex(digest)));
        assert!(dir.is_dir());
        assert!(store
            .root()
            .join("blobs/sha256")
            .join(hex(digest))
            .is_file());
    }
    assert_eq!(
        std::fs::read(image.layer_dirs[0].join("etc/os-release")).unwrap(),
        b"NAME=test\n"
    );
    assert_eq!(
        std::fs::read(image.layer_dirs[1].join("marker")).unwrap(),
        b"one"
    );
    assert_eq!(image.config.entrypoint, vec!["/bin/tool"]);
    assert_eq!(image.config.cmd, vec!["--flag"]);
    assert_eq!(image.config.env, vec!["PATH=/bin"]);
    assert_eq!(image.config.working_dir.as_deref(), Some("/etc"));
    assert_eq!(image.config.user, None);
    let blob_sizes: u64 = image
        .layer_digests
        .iter()
        .map(|d| {
            std::fs::metadata(store.root().join("blobs/sha256").join(hex(d)))
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(image.size_bytes, blob_sizes);
    assert_eq!(names(&store.root().join("tmp")), Vec::<String>::new());

    let again = store.resolve("demo/small:1").unwrap();
    assert_eq!(again.manifest_digest, digest);
    assert_eq!(again.layer_dirs, image.layer_dirs);
    assert_eq!(again.config, image.config);
    assert_eq!(again.size_bytes, image.size_bytes);

    let by_digest = store.resolve(&format!("demo/small@{digest}")).unwrap();
    assert_eq!(by_digest.manifest_digest, digest);
    assert_eq!(by_digest.reference.tag, None);

    let info = store.list().unwrap();
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].name, "demo/small:1");
    assert_eq!(info[0].digest, digest);
    assert_eq!(info[0].layers, 2);
    assert_eq!(info[0].size_bytes, image.size_bytes);
}

#[test]
fn import_archive_plain_and_gzip() {
    let (tmp, store) = store();
    let archive = tmp.path().join("image.tar");
    let digest = small_image("archived").write_archive(&archive).unwrap();
    let image = store
        .import(&archive, "127.0.0.1:5000/team/web:v1")
        .unwrap();
    assert_eq!(image.manifest_digest, digest);
    assert_eq!(
        std::fs::read(image.layer_dirs[1].join("marker")).unwrap(),
        b"archived"
    );
    assert_eq!(names(&store.root().join("tmp")), Vec::<String>::new());

    // The same archive gzipped, under another name: same digest, nothing unpacked.
    let gz_path = tmp.path().join("image.tar.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz_path).unwrap(),
        flate2::Compression::fast(),
    );
    gz.write_all(&std::fs::read(&archive).unwrap()).unwrap();
    gz.finish().unwrap();
    let unpacked = store.layers_unpacked();
    let image = store.import(&gz_path, "web:gz").unwrap();
    assert_eq!(image.manifest_digest, digest);
    assert_eq!(store.layers_unpacked(), unpacked);

    let listed: Vec<String> = store.list().unwrap().into_iter().map(|i| i.name).collect();
    assert_eq!(listed, vec!["127.0.0.1:5000/team/web:v1", "web:gz"]);
    assert_eq!(names(&store.root().join("tmp")), Vec::<String>::new());
}

#[test]
fn second_import_shares_layers() {
    let (tmp, store) = store();
    let layout = tmp.path().join("layout");
    small_image("same").write_layout(&layout).unwrap();
    let first = store.import(&layout, "a:1").unwrap();
    assert_eq!(store.layers_unpacked(), 2);
    let inodes: Vec<u64> = first
        .layer_dirs
        .iter()
        .map(|d| std::fs::metadata(d).unwrap().ino())
        .collect();

    let second = store.import(&layout, "b:1").unwrap();
    assert_eq!(
        store.layers_unpacked(),
        2,
        "nothing unpacked the second time"
    );
    assert_eq!(second.layer_dirs, first.layer_dirs);
    let again: Vec<u64> = second
        .layer_dirs
        .iter()
        .map(|d| std::fs::metadata(d).unwrap().ino())
        .collect();
    assert_eq!(again, inodes);

    // Another image on the same base layer unpacks only its own top layer.
    let other = tmp.path().join("other");
    small_image("different").write_layout(&other).unwrap();
    let third = store.import(&other, "c:1").unwrap();
    assert_eq!(store.layers_unpacked(), 3);
    assert_eq!(third.layer_dirs[0], first.layer_dirs[0]);
    assert_ne!(third.layer_dirs[1], first.layer_dirs[1]);
    assert_eq!(names(&store.root().join("layers/sha256")).len(), 3);

    // Resolving never unpacks what is already there, even from a new store instance.
    drop(store);
    let reopened = ImageStore::open(&tmp.path().join("store"), UnpackLimits::default()).unwrap();
    reopened.resolve("a:1").unwrap();
    assert_eq!(reopened.layers_unpacked(), 0);
}

#[test]
fn moved_tag_keeps_old_digest_resolvable() {
    let (tmp, store) = store();
    let v1 = tmp.path().join("v1");
    let v2 = tmp.path().join("v2");
    let d1 = small_image("v1").write_layout(&v1).unwrap();
    let d2 = small_image("v2").write_layout(&v2).unwrap();
    assert_ne!(d1, d2);
    store.import(&v1, "app:prod").unwrap();
    store.import(&v2, "app:prod").unwrap();
    assert_eq!(store.resolve("app:prod").unwrap().manifest_digest, d2);

    let old = store.resolve_digest(&d1).unwrap();
    assert_eq!(old.manifest_digest, d1);
    assert_eq!(
        std::fs::read(old.layer_dirs[1].join("marker")).unwrap(),
        b"v1"
    );
    // No tag points at d1 any more; the reference is still the digest.
    assert_eq!(old.reference.digest.as_deref(), Some(d1.as_str()));
    let current = store.resolve_digest(&d2).unwrap();
    assert_eq!(current.reference.repository, "app");

    // Even with every tag gone.
    store.untag("app:prod").unwrap();
    assert_eq!(store.resolve_digest(&d2).unwrap().manifest_digest, d2);
    // And a layer dir removed behind the store's back is unpacked again on resolve.
    std::fs::remove_dir_all(&old.layer_dirs[1]).unwrap();
    let before = store.layers_unpacked();
    let again = store.resolve_digest(&d1).unwrap();
    assert_eq!(store.layers_unpacked(), before + 1);
    assert_eq!(
        std::fs::read(again.layer_dirs[1].join("marker")).unwrap(),
        b"v1"
    );

    let missing = format!("sha256:{}", "0".repeat(64));
    assert_eq!(
        store.resolve_digest(&missing).unwrap_err().code(),
        "image_not_found"
    );
    assert_eq!(
        store.resolve_digest("sha256:nope").unwrap_err().code(),
        "invalid_image_ref"
    );
}

#[test]
fn untag_then_resolve_is_not_found() {
    let (tmp, store) = store();
    let layout = tmp.path().join("layout");
    small_image("u").write_layout(&layout).unwrap();
    store.import(&layout, "gone").unwrap();
    assert!(store.resolve("gone:latest").is_ok());
    store.untag("gone").unwrap();
    assert_eq!(store.resolve("gone").unwrap_err().code(), "image_not_found");
    assert_eq!(store.untag("gone").unwrap_err().code(), "image_not_found");
    assert_eq!(
        store.resolve("never:seen").unwrap_err().code(),
        "image_not_found"
    );
    assert_eq!(
        store.resolve("Bad Name").unwrap_err().code(),
        "invalid_image_ref"
    );
    assert_eq!(store.untag("Bad").unwrap_err().code(), "invalid_image_ref");
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn whiteouts_and_opaque_dirs_in_layer_dirs() {
    let (tmp, store) = store();
    let layout = tmp.path().join("layout");
    ImageBuilder::new()
        .layer(
            LayerBuilder::new()
                .dir("etc", 0o755)
                .file("etc/keep", b"k", 0o644)
                .file("etc/drop", b"d", 0o644)
                .dir("cache", 0o755)
                .file("cache/old", b"o", 0o644),
            Compression::Gzip,
        )
        .layer(
            LayerBuilder::new()
                .whiteout("etc/drop")
                .opaque("cache")
                .file("cache/new", b"n", 0o644),
            Compression::Zstd,
        )
        .write_layout(&layout)
        .unwrap();
    let image = store.import(&layout, "wh:1").unwrap();
    let top = &image.layer_dirs[1];
    let wh = std::fs::symlink_metadata(top.join("etc/drop")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    let mut buf = [0u8; 8];
    let n = rustix::fs::lgetxattr(top.join("cache"), "trusted.overlay.opaque", &mut buf).unwrap();
    assert_eq!(&buf[..n], b"y");
    assert!(!top.join("cache/old").exists());
    assert!(top.join("cache/new").is_file());
    let bottom = &image.layer_dirs[0];
    assert!(bottom.join("etc/drop").is_file());
    assert!(
        rustix::fs::lgetxattr(bottom.join("cache"), "trusted.overlay.opaque", &mut buf).is_err()
    );
}

#[test]
fn all_layer_compressions_and_docker_media_types() {
    let (tmp, store) = store();
    let build = || {
        ImageBuilder::new()
            .layer(
                LayerBuilder::new().file("plain", b"p", 0o644),
                Compression::None,
            )
            .layer(
                LayerBuilder::new().file("gzip", b"g", 0o644),
                Compression::Gzip,
            )
            .layer(
                LayerBuilder::new().file("zstd", b"z", 0o644),
                Compression::Zstd,
            )
    };
    let oci = tmp.path().join("oci");
    build().write_layout(&oci).unwrap();
    let image = store.import(&oci, "comp:oci").unwrap();
    for (dir, name, content) in [(0, "plain", b"p"), (1, "gzip", b"g"), (2, "zstd", b"z")] {
        assert_eq!(
            std::fs::read(image.layer_dirs[dir].join(name)).unwrap(),
            content
        );
    }
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            store
                .root()
                .join("blobs/sha256")
                .join(hex(&image.manifest_digest)),
        )
        .unwrap(),
    )
    .unwrap();
    let types: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        vec![
            "application/vnd.oci.image.layer.v1.tar",
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ]
    );

    let docker = tmp.path().join("docker");
    build().docker_media_types().write_layout(&docker).unwrap();
    let image = store.import(&docker, "comp:docker").unwrap();
    assert_eq!(
        std::fs::read(image.layer_dirs[1].join("gzip")).unwrap(),
        b"g"
    );
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            store
                .root()
                .join("blobs/sha256")
                .join(hex(&image.manifest_digest)),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        manifest["layers"][1]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
}

fn foreign_arch() -> &'static str {
    if PLATFORM_ARCH == "arm64" {
        "amd64"
    } else {
        "arm64"
    }
}

#[test]
fn index_picks_this_platform() {
    let (tmp, store) = store();
    let layout = tmp.path().join("multi");
    let picked = small_image("multi")
        .write_layout_with_index(
            &layout,
            &[
                ("linux", foreign_arch()),
                ("windows", PLATFORM_ARCH),
                ("linux", PLATFORM_ARCH),
            ],
        )
        .unwrap();
    let image = store.import(&layout, "multi:1").unwrap();
    assert_eq!(image.manifest_digest, picked);
    let config_blob: serde_json::Value = {
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(store.root().join("blobs/sha256").join(hex(&picked))).unwrap(),
        )
        .unwrap();
        let config_digest = manifest["config"]["digest"].as_str().unwrap().to_string();
        serde_json::from_slice(
            &std::fs::read(store.root().join("blobs/sha256").join(hex(&config_digest))).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(config_blob["architecture"], PLATFORM_ARCH);
    assert_eq!(config_blob["os"], "linux");
}

#[test]
fn index_without_this_platform_is_unsupported() {
    let (tmp, store) = store();
    let layout = tmp.path().join("arm");
    small_image("arm")
        .write_layout_with_index(
            &layout,
            &[("linux", foreign_arch()), ("windows", PLATFORM_ARCH)],
        )
        .unwrap();
    let err = store.import(&layout, "arm:1").unwrap_err();
    assert_eq!(err.code(), "image_platform_unsupported", "{err}");
    assert_store_empty(&store);
}

/// Overwrites one blob in a layout with different bytes of the same length.
fn corrupt_blob(layout: &Path, digest: &str) {
    let path = layout.join("blobs/sha256").join(hex(digest));
    let mut data = std::fs::read(&path).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(&path, data).unwrap();
}

fn layer_digests(layout: &Path, manifest_digest: &str) -> Vec<String> {
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.join("blobs/sha256").join(hex(manifest_digest))).unwrap(),
    )
    .unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn corrupt_layer_blob_leaves_nothing() {
    let (tmp, store) = store();
    let layout = tmp.path().join("layout");
    let digest = small_image("bad").write_layout(&layout).unwrap();
    // The top layer is bad, so the base layer was already verified and unpacked in tmp.
    let layers = layer_digests(&layout, &digest);
    corrupt_blob(&layout, &layers[1]);
    let err = store.import(&layout, "bad:1").unwrap_err();
    assert_eq!(err.code(), "invalid_image", "{err}");
    assert!(err.to_string().contains("digest"), "{err}");
    assert_store_empty(&store);
    assert_eq!(
        store.resolve("bad:1").unwrap_err().code(),
        "image_not_found"
    );
}

#[test]
fn corrupt_manifest_or_config_leaves_nothing() {
    let (tmp, store) = store();
    let layout = tmp.path().join("layout");
    let digest = small_image("m").write_layout(&layout).unwrap();
    corrupt_blob(&layout, &digest);
    assert_eq!(
        store.import(&layout, "m:1").unwrap_err().code(),
        "invalid_image"
    );
    assert_store_empty(&store);

    let layout = tmp.path().join("layout2");
    let digest = small_image("c").write_layout(&layout).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.join("blobs/sha256").join(hex(&digest))).unwrap(),
    )
    .unwrap();
    corrupt_blob(&layout, manifest["config"]["digest"].as_str().unwrap());
    assert_eq!(
        store.import(&layout, "c:1").unwrap_err().code(),
        "invalid_image"
    );
    assert_store_empty(&store);
}

#[test]
fn truncated_or_oversized_blob_is_refused() {
    let (tmp, store) = store();
    let layout = tmp.path().join("layout");
    let digest = small_image("t").write_layout(&layout).unwrap();
    let layers = layer_digests(&layout, &digest);
    let path = layout.join("blobs/sha256").join(hex(&layers[0]));
    let data = std::fs::read(&path).unwrap();
    std::fs::write(&path, &data[..data.len() - 1]).unwrap();
    assert_eq!(
        store.import(&layout, "t:1").unwrap_err().code(),
        "invalid_image"
    );
    assert_store_empty(&store);
    let mut longer = data.clone();
    longer.push(0);
    std::fs::write(&path, &longer).unwrap();
    assert_eq!(
        store.import(&layout, "t:1").unwrap_err().code(),
        "invalid_image"
    );
    assert_store_empty(&store);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        store.import(&layout, "t:1").unwrap_err().code(),
        "invalid_image"
    );
    assert_store_empty(&store);
}

#[test]
fn corrupt_blob_in_archive_leaves_nothing() {
    let (tmp, store) = store();
    let layout = tmp.path().join("layout");
    let digest = small_image("arch").write_layout(&layout).unwrap();
    let layers = layer_digests(&layout, &digest);
    corrupt_blob(&layout, &layers[1]);
    let archive = tmp.path().join("bad.tar");
    let mut tar = tar::Builder::new(std::fs::File::create(&archive).unwrap());
    tar.append_dir_all(".", &layout).unwrap();
    tar.into_inner().unwrap();
    let err = store.import(&archive, "arch:1").unwrap_err();
    assert_eq!(err.code(), "invalid_image", "{err}");
    assert_store_empty(&store);
}

#[test]
fn malicious_layer_in_image_leaves_nothing() {
    let (tmp, store) = store();
    let layout = tmp.path().join("layout");
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    ImageBuilder::new()
        .layer(
            LayerBuilder::new().file("ok", b"ok", 0o644),
            Compression::Gzip,
        )
        .layer(
            LayerBuilder::new().symlink("evil", "/").raw_entry(
                h,
                b"evil/tmp/berth-image-store-escape",
                b"x",
            ),
            Compression::Gzip,
        )
        .write_layout(&layout)
        .unwrap();
    let err = store.import(&layout, "evil:1").unwrap_err();
    assert_eq!(err.code(), "invalid_image", "{err}");
    assert!(!Path::new("/tmp/berth-image-store-escape").exists());
    assert_store_empty(&store);
}

#[test]
fn bad_layouts_are_invalid() {
    let (tmp, store) = store();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_eq!(
        store.import(&empty, "x").unwrap_err().code(),
        "invalid_image"
    );
    assert_eq!(
        store
            .import(&tmp.path().join("missing"), "x")
            .unwrap_err()
            .code(),
        "invalid_image"
    );
    let garbage = tmp.path().join("garbage.tar");
    std::fs::write(&garbage, b"this is not a tar archive at all").unwrap();
    assert_eq!(
        store.import(&garbage, "x").unwrap_err().code(),
        "invalid_image"
    );

    let layout = tmp.path().join("layout");
    small_image("x").write_layout(&layout).unwrap();
    assert_eq!(
        store.import(&layout, "UPPER").unwrap_err().code(),
        "invalid_image_ref"
    );
    // A digest in the name must match what is imported.
    let wrong = format!("x@sha256:{}", "1".repeat(64));
    assert_eq!(
        store.import(&layout, &wrong).unwrap_err().code(),
        "invalid_image"
    );
    std::fs::write(
        layout.join("index.json"),
        b"{\"schemaVersion\":2,\"manifests\":[]}",
    )
    .unwrap();
    assert_eq!(
        store.import(&layout, "x").unwrap_err().code(),
        "invalid_image"
    );
    std::fs::write(layout.join("index.json"), b"[1,2,3]").unwrap();
    assert_eq!(
        store.import(&layout, "x").unwrap_err().code(),
        "invalid_image"
    );
    std::fs::remove_file(layout.join("index.json")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", layout.join("index.json")).unwrap();
    assert_eq!(
        store.import(&layout, "x").unwrap_err().code(),
        "invalid_image"
    );
    assert_store_empty(&store);
}

#[test]
fn digest_name_import_and_resolve() {
    let (tmp, store) = store();
    let layout = tmp.path().join("layout");
    let digest = small_image("d").write_layout(&layout).unwrap();
    let name = format!("pinned/app@{digest}");
    let image = store.import(&layout, &name).unwrap();
    assert_eq!(image.reference.name(), name);
    assert_eq!(store.resolve(&name).unwrap().manifest_digest, digest);
    let listed = store.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, name);
}

#[test]
fn open_removes_stale_tmp_entries() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    drop(ImageStore::open(&root, UnpackLimits::default()).unwrap());
    std::fs::create_dir_all(root.join("tmp/layer-crashed/sub")).unwrap();
    std::fs::write(root.join("tmp/layer-crashed/sub/f"), b"x").unwrap();
    std::fs::write(root.join("tmp/blob-crashed"), b"x").unwrap();
    let store = ImageStore::open(&root, UnpackLimits::default()).unwrap();
    assert_eq!(names(&root.join("tmp")), Vec::<String>::new());

    // While a store is open, another opener leaves tmp alone (it may be in use).
    std::fs::write(root.join("tmp/in-use"), b"x").unwrap();
    let second = ImageStore::open(&root, UnpackLimits::default()).unwrap();
    assert_eq!(names(&root.join("tmp")), vec!["in-use"]);
    drop(second);
    drop(store);
}

#[test]
fn concurrent_imports_of_the_same_image() {
    let (tmp, store) = store();
    let layout = tmp.path().join("layout");
    let digest = small_image("race").write_layout(&layout).unwrap();
    let archive = tmp.path().join("race.tar");
    small_image("race").write_archive(&archive).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let store = &store;
                let source = if i % 2 == 0 {
                    layout.clone()
                } else {
                    archive.clone()
                };
                s.spawn(move || store.import(&source, &format!("race:{i}")).unwrap())
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().manifest_digest, digest);
        }
    });
    assert_eq!(store.list().unwrap().len(), 6);
    assert_eq!(names(&store.root().join("layers/sha256")).len(), 2);
    assert_eq!(names(&store.root().join("tmp")), Vec::<String>::new());
    // Two processes' worth: a second instance on the same root resolves everything.
    let other = ImageStore::open(store.root(), UnpackLimits::default()).unwrap();
    assert_eq!(other.resolve("race:3").unwrap().manifest_digest, digest);
}

#[test]
fn busybox_image() {
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        eprintln!("skipping: no /bin/busybox");
        return;
    }
    let (tmp, store) = store();
    let layout = tmp.path().join("busybox");
    ImageBuilder::new()
        .layer(busybox_layer(busybox).unwrap(), Compression::Gzip)
        .cmd(&["/bin/sh"])
        .write_layout(&layout)
        .unwrap();
    let image = store.import(&layout, "demo/busybox:1").unwrap();
    let root = &image.layer_dirs[0];
    assert_eq!(
        std::fs::read(root.join("bin/busybox")).unwrap(),
        std::fs::read(busybox).unwrap()
    );
    for applet in berth_image::build::BUSYBOX_APPLETS {
        assert_eq!(
            std::fs::read_link(root.join("bin").join(applet)).unwrap(),
            Path::new("busybox"),
            "{applet}"
        );
    }
    assert_eq!(
        std::fs::metadata(root.join("tmp"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o1777
    );
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(passwd.starts_with("root:x:0:0:"));
    assert!(passwd.contains("nobody:x:65534:65534:"));
    for dir in ["root", "proc", "sys", "dev", "etc", "var", "www"] {
        assert!(root.join(dir).is_dir(), "{dir}");
    }
    let out = std::process::Command::new(root.join("bin/busybox"))
        .args(["echo", "alive"])
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"alive\n");
}

/// Runs `f` on a thread with a private mount namespace and a small tmpfs at `dir`.
/// Returns None when that is not possible (not root, no namespaces).
fn with_small_tmpfs<T: Send>(dir: &Path, size: &str, f: impl FnOnce() -> T + Send) -> Option<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            use rustix::mount::{MountFlags, MountPropagationFlags};
            rustix::thread::unshare(rustix::thread::UnshareFlags::NEWNS).ok()?;
            rustix::mount::mount_change(
                "/",
                MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
            )
            .ok()?;
            rustix::mount::mount(
                "tmpfs",
                dir,
                "tmpfs",
                MountFlags::empty(),
                format!("size={size}"),
            )
            .ok()?;
            Some(f())
        })
        .join()
        .unwrap()
    })
}

#[test]
fn full_disk_is_insufficient_storage() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("big");
    // Incompressible content, so the blob itself is large too.
    let mut data = vec![0u8; 2 << 20];
    let mut x: u32 = 1;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    ImageBuilder::new()
        .layer(
            LayerBuilder::new().file("big", &data, 0o644),
            Compression::Gzip,
        )
        .write_layout(&layout)
        .unwrap();
    let mounted = tmp.path().join("small");
    std::fs::create_dir(&mounted).unwrap();
    let result = with_small_tmpfs(&mounted, "3m", || {
        let store = ImageStore::open(&mounted.join("store"), UnpackLimits::default()).unwrap();
        let err = store.import(&layout, "big:1").unwrap_err();
        let leftovers: Vec<Vec<String>> = ["blobs/sha256", "layers/sha256", "refs", "tmp"]
            .iter()
            .map(|d| names(&store.root().join(d)))
            .collect();
        (err.code(), err.to_string(), leftovers)
    });
    let Some((code, msg, leftovers)) = result else {
        eprintln!("skipping: cannot mount a tmpfs here");
        return;
    };
    assert_eq!(code, "insufficient_storage", "{msg}");
    assert!(leftovers.iter().all(|l| l.is_empty()), "{leftovers:?}");
}
