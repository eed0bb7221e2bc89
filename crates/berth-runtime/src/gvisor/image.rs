//! The memory image of a suspended gVisor Machine, on disk:
//!
//! ```text
//! <image dir>/                 (the Machine's `memory/` by default)
//!   checkpoint.img …           what `runsc checkpoint --image-path` wrote, as it wrote it
//!   manifest.json              {"version": 1, "files": [{"path", "size", "sha256"}, …]}
//! ```
//!
//! The image is written into `<image dir>.partial` and renamed into place only once the
//! checkpoint succeeded and the manifest (written last, every file and the directory
//! synced first) lists every file with its size and SHA-256. A directory at the final
//! path is therefore whole; resume still checks every file against the manifest (and that
//! no file is missing or extra) before it restores anything, so a damaged image is
//! refused rather than resumed.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const MANIFEST_FILE: &str = "manifest.json";
const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    version: u32,
    files: Vec<ManifestFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ManifestFile {
    /// Relative to the image directory.
    path: String,
    size: u64,
    /// Lowercase hex.
    sha256: String,
}

/// Where an image is written before it is renamed to `image_dir`.
pub(crate) fn partial_dir(image_dir: &Path) -> PathBuf {
    let mut name = image_dir.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    image_dir.with_file_name(name)
}

/// An empty `.partial` directory for a new image of `image_dir` (an earlier attempt's
/// leftovers go).
pub(crate) fn begin(image_dir: &Path) -> io::Result<PathBuf> {
    let partial = partial_dir(image_dir);
    remove_dir_if_exists(&partial)?;
    fs::create_dir_all(&partial)?;
    Ok(partial)
}

/// Lists, hashes and syncs what the checkpoint wrote into `partial`, writes the manifest
/// and renames the whole to `image_dir` (replacing an older image there).
pub(crate) fn seal(partial: &Path, image_dir: &Path) -> io::Result<()> {
    let mut files = Vec::new();
    for (path, relative) in files_under(partial)? {
        if relative == MANIFEST_FILE {
            return Err(io::Error::other(format!(
                "the checkpoint wrote a {MANIFEST_FILE} of its own"
            )));
        }
        let file = File::open(&path)?;
        file.sync_all()?;
        let (size, sha256) = digest(file)?;
        files.push(ManifestFile {
            path: relative,
            size,
            sha256,
        });
    }
    if files.is_empty() {
        return Err(io::Error::other("the checkpoint wrote no files"));
    }
    let manifest = serde_json::to_vec_pretty(&Manifest {
        version: VERSION,
        files,
    })
    .map_err(io::Error::other)?;
    crate::util::write_atomic(&partial.join(MANIFEST_FILE), &manifest)?;
    sync_dir(partial)?;
    remove_dir_if_exists(image_dir)?;
    fs::rename(partial, image_dir)?;
    if let Some(parent) = image_dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Checks the image against its manifest: every listed file there with its size and
/// digest, nothing else. The error says what is wrong.
pub(crate) fn verify(image_dir: &Path) -> Result<(), String> {
    if !image_dir.is_dir() {
        return Err(if partial_dir(image_dir).exists() {
            "only a half-written image is there".into()
        } else {
            "there is no image".into()
        });
    }
    let text = fs::read(image_dir.join(MANIFEST_FILE))
        .map_err(|e| format!("read {MANIFEST_FILE}: {e}"))?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| format!("parse {MANIFEST_FILE}: {e}"))?;
    if manifest.version != VERSION {
        return Err(format!("unknown image version {}", manifest.version));
    }
    let mut present: BTreeMap<String, PathBuf> = files_under(image_dir)
        .map_err(|e| format!("list the image: {e}"))?
        .into_iter()
        .map(|(path, relative)| (relative, path))
        .collect();
    present.remove(MANIFEST_FILE);
    for listed in &manifest.files {
        let path = present
            .remove(&listed.path)
            .ok_or_else(|| format!("{} is missing", listed.path))?;
        let file = File::open(&path).map_err(|e| format!("open {}: {e}", listed.path))?;
        let (size, sha256) = digest(file).map_err(|e| format!("read {}: {e}", listed.path))?;
        if size != listed.size {
            return Err(format!(
                "{} has {size} bytes, the manifest says {}",
                listed.path, listed.size
            ));
        }
        if sha256 != listed.sha256 {
            return Err(format!("{} fails its SHA-256 check", listed.path));
        }
    }
    if let Some(extra) = present.keys().next() {
        return Err(format!("{extra} is not in the manifest"));
    }
    Ok(())
}

/// Removes the image and any half-written one. Idempotent.
pub(crate) fn discard(image_dir: &Path) -> io::Result<()> {
    remove_dir_if_exists(&partial_dir(image_dir))?;
    remove_dir_if_exists(image_dir)
}

/// Regular files below `dir` as (path, path relative to `dir`); anything else (a symlink,
/// a device) is an error.
fn files_under(dir: &Path) -> io::Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(at) = pending.pop() {
        for entry in fs::read_dir(&at)? {
            let entry = entry?;
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                let relative = path
                    .strip_prefix(dir)
                    .map_err(io::Error::other)?
                    .to_string_lossy()
                    .into_owned();
                out.push((path, relative));
            } else {
                return Err(io::Error::other(format!(
                    "{} is not a regular file",
                    path.display()
                )));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn digest(mut file: File) -> io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, format!("{:x}", hasher.finalize())))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn remove_dir_if_exists(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpointed(root: &Path) -> (PathBuf, PathBuf) {
        let image = root.join("memory");
        let partial = begin(&image).unwrap();
        fs::write(partial.join("checkpoint.img"), vec![7u8; 300_000]).unwrap();
        fs::create_dir(partial.join("sub")).unwrap();
        fs::write(partial.join("sub/pages.img"), b"pages").unwrap();
        (image, partial)
    }

    #[test]
    fn a_sealed_image_verifies_and_lists_every_file() {
        let tmp = tempfile::tempdir().unwrap();
        let (image, partial) = checkpointed(tmp.path());
        assert_eq!(
            verify(&image).unwrap_err(),
            "only a half-written image is there"
        );
        seal(&partial, &image).unwrap();
        assert!(!partial.exists());
        verify(&image).unwrap();
        let manifest: Manifest =
            serde_json::from_slice(&fs::read(image.join(MANIFEST_FILE)).unwrap()).unwrap();
        let paths: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["checkpoint.img", "sub/pages.img"]);
        discard(&image).unwrap();
        assert!(!image.exists());
        assert_eq!(verify(&image).unwrap_err(), "there is no image");
    }

    #[test]
    fn damaged_images_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (image, partial) = checkpointed(tmp.path());
        seal(&partial, &image).unwrap();
        let state = image.join("checkpoint.img");
        let good = fs::read(&state).unwrap();

        // One flipped byte, same size.
        let mut flipped = good.clone();
        flipped[1234] ^= 1;
        fs::write(&state, &flipped).unwrap();
        assert!(verify(&image).unwrap_err().contains("SHA-256"));
        // Truncated.
        fs::write(&state, &good[..1000]).unwrap();
        assert!(verify(&image).unwrap_err().contains("bytes"));
        fs::write(&state, &good).unwrap();
        verify(&image).unwrap();
        // A file that is not in the manifest.
        fs::write(image.join("extra"), b"x").unwrap();
        assert!(verify(&image).unwrap_err().contains("extra"));
        fs::remove_file(image.join("extra")).unwrap();
        // A missing file, then a missing manifest.
        fs::remove_file(image.join("sub/pages.img")).unwrap();
        assert!(verify(&image).unwrap_err().contains("missing"));
        fs::remove_file(image.join(MANIFEST_FILE)).unwrap();
        assert!(verify(&image).unwrap_err().contains(MANIFEST_FILE));
    }

    #[test]
    fn a_new_image_replaces_an_old_one_and_leftovers_go() {
        let tmp = tempfile::tempdir().unwrap();
        let (image, partial) = checkpointed(tmp.path());
        seal(&partial, &image).unwrap();
        // A crashed attempt's leftovers, then a new image over the old one.
        let partial = begin(&image).unwrap();
        fs::write(partial.join("checkpoint.img"), b"newer").unwrap();
        seal(&partial, &image).unwrap();
        verify(&image).unwrap();
        assert_eq!(fs::read(image.join("checkpoint.img")).unwrap(), b"newer");
        assert!(!image.join("sub").exists());
        // A checkpoint that wrote nothing is no image.
        let partial = begin(&tmp.path().join("empty")).unwrap();
        assert!(seal(&partial, &tmp.path().join("empty")).is_err());
        assert!(!tmp.path().join("empty").exists());
    }
}
