//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use berth_image::{Compression, ImageBuilder, ImageStore, LayerBuilder, UnpackLimits};

/// A store in a fresh temp dir (kept alive by the returned guard).
pub fn store() -> (tempfile::TempDir, ImageStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&dir.path().join("store"), UnpackLimits::default()).unwrap();
    (dir, store)
}

/// A two-layer image: a base with some files, and a top layer that adds one.
pub fn small_image(marker: &str) -> ImageBuilder {
    ImageBuilder::new()
        .layer(
            LayerBuilder::new()
                .dir("etc", 0o755)
                .file("etc/os-release", b"NAME=test\n", 0o644)
                .dir("bin", 0o755)
                .file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755),
            Compression::Gzip,
        )
        .layer(
            LayerBuilder::new().file("marker", marker.as_bytes(), 0o644),
            Compression::Gzip,
        )
        .entrypoint(&["/bin/tool"])
        .cmd(&["--flag"])
        .env("PATH=/bin")
        .working_dir("/etc")
}

pub fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap()
}

/// Names directly inside `dir`, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// A description of every node under `root` (not following symlinks).
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let ft = meta.file_type();
            let desc = if ft.is_dir() {
                format!("dir {:o}", meta.mode())
            } else if ft.is_symlink() {
                format!("link {}", std::fs::read_link(&path).unwrap().display())
            } else if ft.is_file() {
                format!("file {:o} {:?}", meta.mode(), std::fs::read(&path).unwrap())
            } else if ft.is_char_device() {
                format!("chr {}", meta.rdev())
            } else {
                format!("other {:o}", meta.mode())
            };
            out.insert(rel, desc);
            if ft.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// A scratch area: `base/dest` (empty, to unpack into) beside `base/sentinel` (a dir
/// with a file) that must never change.
pub struct Sandbox {
    pub base: tempfile::TempDir,
    pub dest: PathBuf,
    pub sentinel: PathBuf,
    before: BTreeMap<PathBuf, String>,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let base = tempfile::tempdir().unwrap();
        let dest = base.path().join("dest");
        let sentinel = base.path().join("sentinel");
        std::fs::create_dir(&dest).unwrap();
        std::fs::create_dir(&sentinel).unwrap();
        std::fs::write(sentinel.join("file"), b"sentinel").unwrap();
        let before = snapshot(&sentinel);
        Sandbox {
            base,
            dest,
            sentinel,
            before,
        }
    }

    /// Nothing beside `dest` was created or changed.
    pub fn assert_untouched(&self) {
        assert_eq!(
            snapshot(&self.sentinel),
            self.before,
            "sentinel dir changed"
        );
        assert_eq!(names(self.base.path()), vec!["dest", "sentinel"]);
    }
}

/// A header for `raw_entry`.
pub fn header(kind: tar::EntryType, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h
}

/// A link header (symlink or hardlink) with `target` as link name.
pub fn link_header(kind: tar::EntryType, target: &[u8]) -> tar::Header {
    let mut h = header(kind, 0o777);
    let name = &mut h.as_old_mut().linkname;
    name.fill(0);
    name[..target.len()].copy_from_slice(target);
    h
}
