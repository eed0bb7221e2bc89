//! Layer unpacking: correct results for good layers, refusal of hostile ones.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use berth_image::{unpack_layer, ImageError, LayerBuilder, UnpackLimits};
use common::{header, link_header, Sandbox};
use tar::EntryType;

fn unpack(layer: LayerBuilder, dest: &Path) -> Result<berth_image::UnpackStats, ImageError> {
    unpack_with(layer, dest, &UnpackLimits::default())
}

fn unpack_with(
    layer: LayerBuilder,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<berth_image::UnpackStats, ImageError> {
    let tar = layer.into_tar().unwrap();
    unpack_layer(tar.as_slice(), dest, limits)
}

/// Unpacking must fail with invalid_image and leave everything beside dest alone.
fn refused(layer: LayerBuilder) -> String {
    let sandbox = Sandbox::new();
    let err = unpack(layer, &sandbox.dest).expect_err("layer should be refused");
    assert_eq!(err.code(), "invalid_image", "{err}");
    sandbox.assert_untouched();
    err.to_string()
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 64];
    match rustix::fs::lgetxattr(path, name, &mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

#[test]
fn regular_content_modes_owners_and_times() {
    let sandbox = Sandbox::new();
    let mut owned = header(EntryType::Regular, 0o640);
    owned.set_uid(1234);
    owned.set_gid(5678);
    let layer = LayerBuilder::new()
        .dir("tmp", 0o1777)
        .dir("usr/bin", 0o755)
        .file("usr/bin/su", b"setuid", 0o4755)
        .file("usr/bin/wall", b"setgid", 0o2755)
        .raw_entry(owned, b"owned", b"mine")
        .symlink("abs-link", "/")
        .symlink("rel-link", "../../etc/shadow")
        .file("deep/missing/parents/file", b"x", 0o600)
        .hardlink("usr/bin/su-again", "usr/bin/su");
    let stats = unpack(layer, &sandbox.dest).unwrap();
    assert_eq!(stats.entries, 9);
    assert_eq!(stats.bytes, 6 + 6 + 4 + 1);
    let d = &sandbox.dest;

    let tmp = std::fs::symlink_metadata(d.join("tmp")).unwrap();
    assert!(tmp.is_dir());
    assert_eq!(tmp.mode() & 0o7777, 0o1777);
    assert_eq!(tmp.mtime(), 1_600_000_000);

    let su = std::fs::symlink_metadata(d.join("usr/bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755);
    assert_eq!(su.mtime(), 1_600_000_000);
    assert_eq!(std::fs::read(d.join("usr/bin/su")).unwrap(), b"setuid");
    assert_eq!(
        std::fs::symlink_metadata(d.join("usr/bin/wall"))
            .unwrap()
            .mode()
            & 0o7777,
        0o2755
    );

    let owned = std::fs::symlink_metadata(d.join("owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1234, 5678));
    assert_eq!(owned.mode() & 0o7777, 0o640);

    assert_eq!(
        std::fs::read_link(d.join("abs-link")).unwrap(),
        Path::new("/")
    );
    assert_eq!(
        std::fs::read_link(d.join("rel-link")).unwrap(),
        Path::new("../../etc/shadow")
    );

    let parents = std::fs::symlink_metadata(d.join("deep/missing")).unwrap();
    assert!(parents.is_dir());
    assert_eq!(parents.mode() & 0o7777, 0o755);

    let again = std::fs::symlink_metadata(d.join("usr/bin/su-again")).unwrap();
    assert_eq!(again.ino(), su.ino());
    sandbox.assert_untouched();
}

#[test]
fn later_entries_replace_earlier_ones() {
    let sandbox = Sandbox::new();
    let layer = LayerBuilder::new()
        .file("a", b"first", 0o644)
        .hardlink("a-link", "a")
        .file("a", b"second", 0o600)
        .dir("d", 0o755)
        .file("d/keep", b"k", 0o644)
        .dir("d", 0o700)
        .file("f-then-dir", b"f", 0o644)
        .dir("f-then-dir", 0o755)
        .dir("dir-then-file", 0o755)
        .file("dir-then-file/child", b"c", 0o644)
        .file("dir-then-file", b"now a file", 0o644)
        // A symlink pointing out of the layer, replaced by a file: the file must
        // replace the link, not be written through it.
        .symlink("out", "../sentinel/file")
        .file("out", b"replaced", 0o644)
        .symlink("outdir", "../sentinel")
        .dir("outdir", 0o755)
        .file("outdir/file", b"inside", 0o644);
    unpack(layer, &sandbox.dest).unwrap();
    let d = &sandbox.dest;
    assert_eq!(std::fs::read(d.join("a")).unwrap(), b"second");
    // The earlier hardlink keeps the old content: the path was replaced, not rewritten.
    assert_eq!(std::fs::read(d.join("a-link")).unwrap(), b"first");
    let dir = std::fs::symlink_metadata(d.join("d")).unwrap();
    assert_eq!(dir.mode() & 0o7777, 0o700);
    assert_eq!(std::fs::read(d.join("d/keep")).unwrap(), b"k");
    assert!(d.join("f-then-dir").is_dir());
    assert_eq!(
        std::fs::read(d.join("dir-then-file")).unwrap(),
        b"now a file"
    );
    let out = std::fs::symlink_metadata(d.join("out")).unwrap();
    assert!(out.is_file());
    assert_eq!(std::fs::read(d.join("out")).unwrap(), b"replaced");
    assert!(std::fs::symlink_metadata(d.join("outdir"))
        .unwrap()
        .is_dir());
    assert_eq!(std::fs::read(d.join("outdir/file")).unwrap(), b"inside");
    sandbox.assert_untouched();
}

#[test]
fn whiteouts_become_overlay_whiteouts() {
    let sandbox = Sandbox::new();
    let layer = LayerBuilder::new()
        .dir("etc", 0o755)
        .whiteout("etc/removed")
        .whiteout("gone-top")
        .file("replaced-by-whiteout", b"x", 0o644)
        .whiteout("replaced-by-whiteout")
        .dir("var/cache", 0o755)
        .opaque("var/cache")
        .file("var/cache/new", b"n", 0o644)
        .opaque("implicit/dir");
    unpack(layer, &sandbox.dest).unwrap();
    let d = &sandbox.dest;
    for wh in ["etc/removed", "gone-top", "replaced-by-whiteout"] {
        let meta = std::fs::symlink_metadata(d.join(wh)).unwrap();
        assert!(meta.file_type().is_char_device(), "{wh}");
        assert_eq!(meta.rdev(), 0, "{wh}");
    }
    assert!(!d.join("etc/.wh.removed").exists());
    assert_eq!(
        xattr(&d.join("var/cache"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert!(!d.join("var/cache/.wh..wh..opq").exists());
    assert_eq!(std::fs::read(d.join("var/cache/new")).unwrap(), b"n");
    assert_eq!(
        xattr(&d.join("implicit/dir"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(xattr(&d.join("etc"), "trusted.overlay.opaque"), None);
    sandbox.assert_untouched();
}

#[test]
fn refuses_parent_dir_escape() {
    let h = header(EntryType::Regular, 0o644);
    refused(LayerBuilder::new().raw_entry(h.clone(), b"../escape", b"x"));
    refused(LayerBuilder::new().raw_entry(h.clone(), b"a/../../escape", b"x"));
    refused(LayerBuilder::new().raw_entry(h.clone(), b"./../sentinel/file", b"x"));
    refused(LayerBuilder::new().raw_entry(h, b"..", b""));
}

#[test]
fn refuses_absolute_paths() {
    let h = header(EntryType::Regular, 0o644);
    let msg = refused(LayerBuilder::new().raw_entry(h.clone(), b"/abs", b"x"));
    assert!(msg.contains("absolute"), "{msg}");
    refused(LayerBuilder::new().raw_entry(header(EntryType::Directory, 0o755), b"/", b""));
    assert!(!Path::new("/abs").exists());
}

#[test]
fn refuses_writes_through_symlinks() {
    let file = header(EntryType::Regular, 0o644);
    // Through a link to the sentinel: a bug would show up there.
    let msg = refused(
        LayerBuilder::new()
            .symlink("evil", "../sentinel")
            .raw_entry(file.clone(), b"evil/file", b"pwned"),
    );
    assert!(msg.contains("symlink"), "{msg}");
    refused(
        LayerBuilder::new()
            .symlink("evil", "../sentinel")
            .raw_entry(file.clone(), b"evil/new", b"pwned"),
    );
    refused(LayerBuilder::new().symlink("evil", "../..").raw_entry(
        file.clone(),
        b"evil/berth-image-test-escape",
        b"pwned",
    ));
    // Through a link to the host root.
    let name = format!("berth-image-escape-{}", std::process::id());
    refused(LayerBuilder::new().symlink("evil", "/").raw_entry(
        file.clone(),
        format!("evil/tmp/{name}").as_bytes(),
        b"pwned",
    ));
    assert!(!Path::new("/tmp").join(&name).exists());
    // A directory, whiteout or opaque marker through a link.
    refused(
        LayerBuilder::new()
            .symlink("evil", "../sentinel")
            .dir("evil/sub", 0o755),
    );
    refused(
        LayerBuilder::new()
            .symlink("evil", "../sentinel")
            .whiteout("evil/file"),
    );
    refused(
        LayerBuilder::new()
            .symlink("evil", "../sentinel")
            .opaque("evil"),
    );
    // Nested: a link deeper in the tree.
    refused(
        LayerBuilder::new()
            .dir("a", 0o755)
            .symlink("a/b", "../../sentinel")
            .file("a/b/c", b"x", 0o644),
    );
}

#[test]
fn refuses_bad_hardlinks() {
    refused(LayerBuilder::new().raw_entry(
        link_header(EntryType::Link, b"../../etc/passwd"),
        b"pw",
        b"",
    ));
    refused(LayerBuilder::new().raw_entry(
        link_header(EntryType::Link, b"/etc/passwd"),
        b"pw",
        b"",
    ));
    // To a symlink (which points outside).
    let msg = refused(
        LayerBuilder::new()
            .symlink("s", "../sentinel/file")
            .hardlink("h", "s"),
    );
    assert!(msg.contains("not a regular file"), "{msg}");
    // Through a symlinked directory.
    refused(
        LayerBuilder::new()
            .symlink("d", "../sentinel")
            .hardlink("h", "d/file"),
    );
    // To something not (yet) in the layer, to a directory, to a whiteout.
    refused(
        LayerBuilder::new()
            .hardlink("h", "later")
            .file("later", b"x", 0o644),
    );
    refused(LayerBuilder::new().dir("d", 0o755).hardlink("h", "d"));
    refused(LayerBuilder::new().whiteout("w").hardlink("h", "w"));
    refused(LayerBuilder::new().raw_entry(link_header(EntryType::Link, b""), b"h", b""));
}

#[test]
fn refuses_devices_and_fifos() {
    for kind in [EntryType::Char, EntryType::Block, EntryType::Fifo] {
        let msg = refused(LayerBuilder::new().raw_entry(header(kind, 0o644), b"dev", b""));
        assert!(msg.contains("device or FIFO"), "{msg}");
    }
    // Even a 0:0 char device, which is what a whiteout looks like once unpacked.
    let mut h = header(EntryType::Char, 0);
    h.set_device_major(0).unwrap();
    h.set_device_minor(0).unwrap();
    refused(LayerBuilder::new().raw_entry(h, b"fake-whiteout", b""));
}

#[test]
fn refuses_unknown_entry_types_and_sparse() {
    refused(LayerBuilder::new().raw_entry(header(EntryType::new(b'V'), 0o644), b"vol", b""));
    refused(LayerBuilder::new().raw_entry(header(EntryType::GNUSparse, 0o644), b"sparse", b""));
}

#[test]
fn enforces_size_and_entry_limits() {
    // Every entry is charged at least one 4 KiB block, content in 4 KiB blocks.
    let limits = UnpackLimits {
        max_layer_bytes: 8192,
        max_entries: 10,
        ..UnpackLimits::default()
    };
    // Exactly at the cap is fine.
    let sandbox = Sandbox::new();
    let stats = unpack_with(
        LayerBuilder::new().file("a", &[1u8; 8192], 0o644),
        &sandbox.dest,
        &limits,
    )
    .unwrap();
    assert_eq!((stats.bytes, stats.charged), (8192, 8192));

    for layer in [
        LayerBuilder::new().file("big", &[1u8; 8193], 0o644),
        LayerBuilder::new()
            .file("a", &[1u8; 600], 0o644)
            .file("b", &[1u8; 600], 0o644)
            .file("c", &[1u8; 600], 0o644),
    ] {
        let sandbox = Sandbox::new();
        let err = unpack_with(layer, &sandbox.dest, &limits).unwrap_err();
        assert_eq!(err.code(), "image_too_large");
        assert!(err.to_string().contains("per-layer limit"), "{err}");
    }

    let mut many = LayerBuilder::new();
    for i in 0..11 {
        many = many.file(&format!("f{i}"), b"", 0o644);
    }
    let sandbox = Sandbox::new();
    let roomy = UnpackLimits {
        max_layer_bytes: 1 << 20,
        ..limits
    };
    let err = unpack_with(many, &sandbox.dest, &roomy).unwrap_err();
    assert_eq!(err.code(), "invalid_image");
    assert!(err.to_string().contains("entries"), "{err}");
    sandbox.assert_untouched();
}

#[test]
fn refuses_overlong_paths_and_bad_symlink_targets() {
    let h = header(EntryType::Regular, 0o644);
    let long_component = "n".repeat(256);
    refused(LayerBuilder::new().raw_entry(h.clone(), long_component.as_bytes(), b""));
    let long_path = "d/".repeat(2049);
    refused(LayerBuilder::new().raw_entry(h, long_path.as_bytes(), b""));
    refused(LayerBuilder::new().raw_entry(link_header(EntryType::Symlink, b""), b"empty", b""));
    // 255 is fine.
    let sandbox = Sandbox::new();
    unpack(
        LayerBuilder::new().file(&"n".repeat(255), b"ok", 0o644),
        &sandbox.dest,
    )
    .unwrap();
}

#[test]
fn refuses_nul_in_pax_path() {
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_pax_extensions([("path", b"a\0/../../escape".as_slice())])
        .unwrap();
    let mut h = header(EntryType::Regular, 0o644);
    h.set_size(1);
    builder
        .append_data(&mut h, "placeholder", &b"x"[..])
        .unwrap();
    let tar = builder.into_inner().unwrap();
    let sandbox = Sandbox::new();
    let err = unpack_layer(tar.as_slice(), &sandbox.dest, &UnpackLimits::default()).unwrap_err();
    assert_eq!(err.code(), "invalid_image");
    sandbox.assert_untouched();
}

#[test]
fn pax_long_paths_are_unpacked() {
    let mut builder = tar::Builder::new(Vec::new());
    let path = format!("{}/{}", "p".repeat(200), "q".repeat(200));
    builder
        .append_pax_extensions([("path", path.as_bytes())])
        .unwrap();
    let mut h = header(EntryType::Regular, 0o644);
    h.set_size(2);
    builder.append_data(&mut h, "short", &b"ok"[..]).unwrap();
    let tar = builder.into_inner().unwrap();
    let sandbox = Sandbox::new();
    unpack_layer(tar.as_slice(), &sandbox.dest, &UnpackLimits::default()).unwrap();
    assert_eq!(std::fs::read(sandbox.dest.join(&path)).unwrap(), b"ok");
}

#[test]
fn refuses_file_used_as_directory() {
    refused(
        LayerBuilder::new()
            .file("f", b"x", 0o644)
            .file("f/child", b"y", 0o644),
    );
}

#[test]
fn refuses_truncated_and_garbage_streams() {
    let tar = LayerBuilder::new()
        .file("f", &[7u8; 5000], 0o644)
        .into_tar()
        .unwrap();
    let sandbox = Sandbox::new();
    let err = unpack_layer(&tar[..2048], &sandbox.dest, &UnpackLimits::default()).unwrap_err();
    assert_eq!(err.code(), "invalid_image");
    let err =
        unpack_layer(&[0x55u8; 4096][..], &sandbox.dest, &UnpackLimits::default()).unwrap_err();
    assert_eq!(err.code(), "invalid_image");
    sandbox.assert_untouched();
}

#[test]
fn read_only_directories_still_get_children() {
    // A read-only directory still receives its children (as root), and keeps 0555.
    let sandbox = Sandbox::new();
    unpack(
        LayerBuilder::new()
            .dir("ro", 0o555)
            .file("ro/inner", b"i", 0o444),
        &sandbox.dest,
    )
    .unwrap();
    let meta = std::fs::metadata(sandbox.dest.join("ro")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o555);
    assert_eq!(std::fs::read(sandbox.dest.join("ro/inner")).unwrap(), b"i");
}
