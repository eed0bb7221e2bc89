//! Making images in code: layers as in-memory tars, images as OCI layouts or archives.
//!
//! Used by tests and by the demo image. Output is deterministic: fixed mtimes, root
//! ownership, and no timestamps in the config.

use std::io::{self, Write};
use std::path::Path;
use std::str::FromStr;

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, Digest, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, Os, PlatformBuilder, RootFsBuilder,
};
use sha2::{Digest as _, Sha256};

use crate::error::ImageError;
use crate::store::{MEDIA_DOCKER_CONFIG, MEDIA_DOCKER_MANIFEST, PLATFORM_ARCH, PLATFORM_OS};

/// The mtime given to every entry built here.
pub const BUILD_MTIME: u64 = 1_600_000_000;

const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// The applets linked to `/bin/busybox` by [`busybox_layer`].
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "ls", "cat", "echo", "sleep", "httpd", "wc", "mkdir", "rm", "touch", "id", "hostname",
    "ps", "mount", "grep", "sed", "head", "tail", "true", "false", "env", "kill", "dd", "seq",
    "printf", "test", "[", "wget", "nc", "date", "stat", "chmod", "find", "tee", "yes", "uname",
];

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// `tar+gzip`.
    Gzip,
    /// `tar+zstd`.
    Zstd,
}

#[derive(Debug, Clone)]
enum BuildEntry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
    Hardlink {
        path: String,
        target: String,
    },
    Raw {
        header: Box<tar::Header>,
        path: Vec<u8>,
        data: Vec<u8>,
    },
}

/// Builds one layer as an in-memory tar. Entries are written in the order added, owned
/// by root, with mtime [`BUILD_MTIME`]. Leading `/` on paths is dropped.
#[derive(Debug, Clone, Default)]
pub struct LayerBuilder {
    entries: Vec<BuildEntry>,
}

fn clean(path: &str) -> String {
    path.trim_start_matches('/').to_string()
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> Self {
        Self::default()
    }

    /// A directory with `mode` (permission bits, including sticky/setgid).
    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        self.entries.push(BuildEntry::Dir {
            path: clean(path),
            mode,
        });
        self
    }

    /// A regular file.
    pub fn file(mut self, path: &str, contents: &[u8], mode: u32) -> Self {
        self.entries.push(BuildEntry::File {
            path: clean(path),
            data: contents.to_vec(),
            mode,
        });
        self
    }

    /// A symlink; the target is stored verbatim.
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        self.entries.push(BuildEntry::Symlink {
            path: clean(path),
            target: target.to_string(),
        });
        self
    }

    /// A hardlink to `target`, a path relative to the layer root, stored verbatim.
    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        self.entries.push(BuildEntry::Hardlink {
            path: clean(path),
            target: target.to_string(),
        });
        self
    }

    /// An OCI whiteout deleting `path` from lower layers (`.wh.<base>` in its parent).
    pub fn whiteout(mut self, path: &str) -> Self {
        let path = clean(path);
        let path = path.trim_end_matches('/');
        let marker = match path.rsplit_once('/') {
            Some((parent, base)) => format!("{parent}/.wh.{base}"),
            None => format!(".wh.{path}"),
        };
        self.entries.push(BuildEntry::File {
            path: marker,
            data: Vec::new(),
            mode: 0o644,
        });
        self
    }

    /// An OCI opaque marker hiding everything lower layers have in `dir`.
    pub fn opaque(mut self, dir: &str) -> Self {
        let dir = clean(dir);
        let dir = dir.trim_end_matches('/');
        let marker = if dir.is_empty() {
            ".wh..wh..opq".to_string()
        } else {
            format!("{dir}/.wh..wh..opq")
        };
        self.entries.push(BuildEntry::File {
            path: marker,
            data: Vec::new(),
            mode: 0o644,
        });
        self
    }

    /// An entry written with `header` as given except that its path is `path_bytes`
    /// verbatim (no sanitizing; a GNU long-name record is added past 100 bytes), its
    /// size is `data.len()`, and its checksum is recomputed. For malicious-tar tests.
    pub fn raw_entry(mut self, header: tar::Header, path_bytes: &[u8], data: &[u8]) -> Self {
        self.entries.push(BuildEntry::Raw {
            header: Box::new(header),
            path: path_bytes.to_vec(),
            data: data.to_vec(),
        });
        self
    }

    /// The tar bytes.
    pub fn into_tar(self) -> Result<Vec<u8>, ImageError> {
        let mut builder = tar::Builder::new(Vec::new());
        let err = |e: io::Error| ImageError::Internal(format!("building layer tar: {e}"));
        for entry in self.entries {
            match entry {
                BuildEntry::Dir { path, mode } => {
                    let mut header = base_header(tar::EntryType::Directory, mode);
                    let path = if path.is_empty() {
                        ".".to_string()
                    } else {
                        path
                    };
                    builder
                        .append_data(&mut header, path, io::empty())
                        .map_err(err)?;
                }
                BuildEntry::File { path, data, mode } => {
                    let mut header = base_header(tar::EntryType::Regular, mode);
                    header.set_size(data.len() as u64);
                    builder
                        .append_data(&mut header, path, data.as_slice())
                        .map_err(err)?;
                }
                BuildEntry::Symlink { path, target } => {
                    let mut header = base_header(tar::EntryType::Symlink, 0o777);
                    builder
                        .append_link(&mut header, path, target)
                        .map_err(err)?;
                }
                BuildEntry::Hardlink { path, target } => {
                    let mut header = base_header(tar::EntryType::Link, 0o644);
                    builder
                        .append_link(&mut header, path, target)
                        .map_err(err)?;
                }
                BuildEntry::Raw { header, path, data } => {
                    let mut header = *header;
                    if path.len() > 100 {
                        let mut long = tar::Header::new_gnu();
                        long.set_entry_type(tar::EntryType::GNULongName);
                        long.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
                        long.set_mode(0o644);
                        long.set_size(path.len() as u64 + 1);
                        long.set_cksum();
                        let mut name = path.clone();
                        name.push(0);
                        builder.append(&long, name.as_slice()).map_err(err)?;
                    }
                    let name = &mut header.as_old_mut().name;
                    name.fill(0);
                    let n = path.len().min(100);
                    name[..n].copy_from_slice(&path[..n]);
                    if let Some(ustar) = header.as_ustar_mut() {
                        ustar.prefix.fill(0);
                    }
                    header.set_size(data.len() as u64);
                    header.set_cksum();
                    builder.append(&header, data.as_slice()).map_err(err)?;
                }
            }
        }
        builder.into_inner().map_err(err)
    }
}

fn base_header(kind: tar::EntryType, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(BUILD_MTIME);
    header.set_size(0);
    header
}

/// A layer with a static busybox at `/bin/busybox`, applet symlinks in `/bin` (see
/// [`BUSYBOX_APPLETS`]), `/etc/passwd` and `/etc/group` with root and nobody, and the
/// usual top-level directories (`/tmp` is 1777).
pub fn busybox_layer(busybox_binary: &Path) -> Result<LayerBuilder, ImageError> {
    let binary = std::fs::read(busybox_binary)
        .map_err(|e| ImageError::io(format!("reading {}", busybox_binary.display()), e))?;
    let mut layer = LayerBuilder::new().dir("bin", 0o755);
    for dir in ["etc", "proc", "sys", "dev", "var", "www"] {
        layer = layer.dir(dir, 0o755);
    }
    layer = layer
        .dir("root", 0o700)
        .dir("tmp", 0o1777)
        .file("bin/busybox", &binary, 0o755);
    for applet in BUSYBOX_APPLETS {
        layer = layer.symlink(&format!("bin/{applet}"), "busybox");
    }
    Ok(layer
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            0o644,
        )
        .file("etc/group", b"root:x:0:\nnobody:x:65534:\n", 0o644))
}

/// A built blob: digest and bytes.
struct Blob {
    hex: String,
    data: Vec<u8>,
}

impl Blob {
    fn new(data: Vec<u8>) -> Blob {
        Blob {
            hex: hex::encode(Sha256::digest(&data)),
            data,
        }
    }

    fn digest(&self) -> String {
        format!("sha256:{}", self.hex)
    }

    fn descriptor(&self, media_type: MediaType) -> Result<Descriptor, ImageError> {
        let digest = Digest::from_str(&self.digest()).map_err(spec_error)?;
        Ok(Descriptor::new(media_type, self.data.len() as u64, digest))
    }
}

fn spec_error(e: impl std::fmt::Display) -> ImageError {
    ImageError::Internal(format!("building image metadata: {e}"))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, ImageError> {
    serde_json::to_vec(value).map_err(spec_error)
}

/// Everything an image layout holds.
struct BuiltLayout {
    blobs: Vec<Blob>,
    index_json: Vec<u8>,
    digest: String,
}

impl BuiltLayout {
    fn write_dir(&self, dir: &Path) -> Result<(), ImageError> {
        let blobs = dir.join("blobs/sha256");
        let io_err = |what: &str, e| ImageError::io(format!("writing {what}"), e);
        std::fs::create_dir_all(&blobs).map_err(|e| io_err("layout", e))?;
        for blob in &self.blobs {
            std::fs::write(blobs.join(&blob.hex), &blob.data).map_err(|e| io_err("blob", e))?;
        }
        std::fs::write(dir.join("index.json"), &self.index_json)
            .map_err(|e| io_err("index.json", e))?;
        std::fs::write(dir.join("oci-layout"), OCI_LAYOUT).map_err(|e| io_err("oci-layout", e))
    }
}

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Builds an image from layers and process defaults.
#[derive(Debug, Clone, Default)]
pub struct ImageBuilder {
    layers: Vec<(LayerBuilder, Compression)>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Vec<String>,
    working_dir: Option<String>,
    user: Option<String>,
    docker_media_types: bool,
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

impl ImageBuilder {
    /// An image with no layers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a layer on top.
    pub fn layer(mut self, layer: LayerBuilder, compression: Compression) -> Self {
        self.layers.push((layer, compression));
        self
    }

    /// Sets `Entrypoint`.
    pub fn entrypoint(mut self, args: &[&str]) -> Self {
        self.entrypoint = Some(strings(args));
        self
    }

    /// Sets `Cmd`.
    pub fn cmd(mut self, args: &[&str]) -> Self {
        self.cmd = Some(strings(args));
        self
    }

    /// Adds one `KEY=value` to `Env`.
    pub fn env(mut self, kv: &str) -> Self {
        self.env.push(kv.to_string());
        self
    }

    /// Sets `WorkingDir`.
    pub fn working_dir(mut self, dir: &str) -> Self {
        self.working_dir = Some(dir.to_string());
        self
    }

    /// Sets `User`.
    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.to_string());
        self
    }

    /// Uses Docker v2 manifest, config and layer media types instead of OCI ones
    /// (zstd layers keep the OCI type, which Docker lacks).
    pub fn docker_media_types(mut self) -> Self {
        self.docker_media_types = true;
        self
    }

    /// Writes an OCI layout (oci-layout, index.json, blobs/sha256/*) into `dir`
    /// (created if missing) and returns the manifest digest.
    pub fn write_layout(self, dir: &Path) -> Result<String, ImageError> {
        let built = self.build(None)?;
        built.write_dir(dir)?;
        Ok(built.digest)
    }

    /// Writes the same layout as [`ImageBuilder::write_layout`] as an uncompressed tar
    /// at `file`, and returns the manifest digest.
    pub fn write_archive(self, file: &Path) -> Result<String, ImageError> {
        let built = self.build(None)?;
        let out = std::fs::File::create(file)
            .map_err(|e| ImageError::io(format!("creating {}", file.display()), e))?;
        let mut tar = tar::Builder::new(io::BufWriter::new(out));
        let err = |e: io::Error| ImageError::io("writing archive", e);
        let mut add = |path: &str, kind: tar::EntryType, data: &[u8]| {
            let mut header = base_header(kind, if kind.is_dir() { 0o755 } else { 0o644 });
            header.set_size(data.len() as u64);
            tar.append_data(&mut header, path, data)
        };
        add("oci-layout", tar::EntryType::Regular, OCI_LAYOUT).map_err(err)?;
        add("index.json", tar::EntryType::Regular, &built.index_json).map_err(err)?;
        add("blobs/", tar::EntryType::Directory, &[]).map_err(err)?;
        add("blobs/sha256/", tar::EntryType::Directory, &[]).map_err(err)?;
        for blob in &built.blobs {
            add(
                &format!("blobs/sha256/{}", blob.hex),
                tar::EntryType::Regular,
                &blob.data,
            )
            .map_err(err)?;
        }
        let mut writer = tar.into_inner().map_err(err)?;
        writer.flush().map_err(err)?;
        Ok(built.digest)
    }

    /// Writes a layout whose index.json points at an image index blob listing one
    /// manifest per `(os, arch)`. Returns the digest of the manifest an importer on this
    /// host picks (`linux/<host arch>`), or of the index blob when none is listed.
    pub fn write_layout_with_index(
        self,
        dir: &Path,
        platforms: &[(&str, &str)],
    ) -> Result<String, ImageError> {
        let built = self.build(Some(platforms))?;
        built.write_dir(dir)?;
        Ok(built.digest)
    }

    fn build(self, platforms: Option<&[(&str, &str)]>) -> Result<BuiltLayout, ImageError> {
        let docker = self.docker_media_types;
        let mut blobs = Vec::new();
        let mut layer_descriptors = Vec::new();
        let mut diff_ids = Vec::new();
        for (layer, compression) in self.layers.iter().cloned() {
            let tar = layer.into_tar()?;
            diff_ids.push(format!("sha256:{}", hex::encode(Sha256::digest(&tar))));
            let (data, media_type) = match compression {
                Compression::None if docker => (tar, MediaType::Other(DOCKER_LAYER_TAR.into())),
                Compression::None => (tar, MediaType::ImageLayer),
                Compression::Gzip => {
                    let mut encoder =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                    encoder
                        .write_all(&tar)
                        .map_err(|e| ImageError::Internal(format!("gzip: {e}")))?;
                    let data = encoder
                        .finish()
                        .map_err(|e| ImageError::Internal(format!("gzip: {e}")))?;
                    let media_type = if docker {
                        MediaType::Other(DOCKER_LAYER_GZIP.into())
                    } else {
                        MediaType::ImageLayerGzip
                    };
                    (data, media_type)
                }
                Compression::Zstd => {
                    let data = zstd::encode_all(tar.as_slice(), 3)
                        .map_err(|e| ImageError::Internal(format!("zstd: {e}")))?;
                    (data, MediaType::ImageLayerZstd)
                }
            };
            let blob = Blob::new(data);
            layer_descriptors.push(blob.descriptor(media_type)?);
            blobs.push(blob);
        }

        let single = [(PLATFORM_OS, PLATFORM_ARCH)];
        let targets = platforms.unwrap_or(&single);
        let mut manifests = Vec::new();
        let mut picked = None;
        for (os, arch) in targets {
            let config = self.config_blob(os, arch, &diff_ids)?;
            let config_type = if docker {
                MediaType::Other(MEDIA_DOCKER_CONFIG.into())
            } else {
                MediaType::ImageConfig
            };
            let manifest_type = if docker {
                MediaType::Other(MEDIA_DOCKER_MANIFEST.into())
            } else {
                MediaType::ImageManifest
            };
            let manifest = ImageManifestBuilder::default()
                .schema_version(2u32)
                .media_type(manifest_type.clone())
                .config(config.descriptor(config_type)?)
                .layers(layer_descriptors.clone())
                .build()
                .map_err(spec_error)?;
            let manifest = Blob::new(to_json(&manifest)?);
            let mut descriptor = manifest.descriptor(manifest_type)?;
            if platforms.is_some() {
                let platform = PlatformBuilder::default()
                    .os(Os::from(*os))
                    .architecture(Arch::from(*arch))
                    .build()
                    .map_err(spec_error)?;
                descriptor.set_platform(Some(platform));
            }
            if *os == PLATFORM_OS && *arch == PLATFORM_ARCH && picked.is_none() {
                picked = Some(manifest.digest());
            }
            manifests.push(descriptor);
            blobs.push(config);
            blobs.push(manifest);
        }

        let (index_manifests, digest) = match platforms {
            None => {
                let digest = picked.ok_or_else(|| spec_error("no manifest built"))?;
                (manifests, digest)
            }
            Some(_) => {
                let index = ImageIndexBuilder::default()
                    .schema_version(2u32)
                    .media_type(MediaType::ImageIndex)
                    .manifests(manifests)
                    .build()
                    .map_err(spec_error)?;
                let index = Blob::new(to_json(&index)?);
                let descriptor = index.descriptor(MediaType::ImageIndex)?;
                let digest = picked.unwrap_or_else(|| index.digest());
                blobs.push(index);
                (vec![descriptor], digest)
            }
        };
        let index_json = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(index_manifests)
            .build()
            .map_err(spec_error)?;
        Ok(BuiltLayout {
            blobs,
            index_json: to_json(&index_json)?,
            digest,
        })
    }

    fn config_blob(&self, os: &str, arch: &str, diff_ids: &[String]) -> Result<Blob, ImageError> {
        let mut config = ConfigBuilder::default();
        if let Some(entrypoint) = &self.entrypoint {
            config = config.entrypoint(entrypoint.clone());
        }
        if let Some(cmd) = &self.cmd {
            config = config.cmd(cmd.clone());
        }
        if !self.env.is_empty() {
            config = config.env(self.env.clone());
        }
        if let Some(dir) = &self.working_dir {
            config = config.working_dir(dir.clone());
        }
        if let Some(user) = &self.user {
            config = config.user(user.clone());
        }
        let rootfs = RootFsBuilder::default()
            .typ("layers")
            .diff_ids(diff_ids.to_vec())
            .build()
            .map_err(spec_error)?;
        let image_config = ImageConfigurationBuilder::default()
            .os(Os::from(os))
            .architecture(Arch::from(arch))
            .config(config.build().map_err(spec_error)?)
            .rootfs(rootfs)
            .build()
            .map_err(spec_error)?;
        Ok(Blob::new(to_json(&image_config)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(tar_bytes: &[u8]) -> Vec<(String, tar::EntryType, Vec<u8>)> {
        let mut archive = tar::Archive::new(tar_bytes);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
                let kind = e.header().entry_type();
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut data).unwrap();
                (path, kind, data)
            })
            .collect()
    }

    #[test]
    fn layer_builder_writes_entries_in_order() {
        let tar = LayerBuilder::new()
            .dir("/etc", 0o755)
            .file("etc/hosts", b"127.0.0.1 localhost\n", 0o644)
            .symlink("etc/link", "/etc/hosts")
            .hardlink("etc/hard", "etc/hosts")
            .whiteout("usr/lib/old")
            .whiteout("top")
            .opaque("var/cache/")
            .opaque("/")
            .into_tar()
            .unwrap();
        let got: Vec<(String, tar::EntryType)> =
            entries(&tar).into_iter().map(|(p, k, _)| (p, k)).collect();
        assert_eq!(
            got,
            vec![
                ("etc".to_string(), tar::EntryType::Directory),
                ("etc/hosts".to_string(), tar::EntryType::Regular),
                ("etc/link".to_string(), tar::EntryType::Symlink),
                ("etc/hard".to_string(), tar::EntryType::Link),
                ("usr/lib/.wh.old".to_string(), tar::EntryType::Regular),
                (".wh.top".to_string(), tar::EntryType::Regular),
                (
                    "var/cache/.wh..wh..opq".to_string(),
                    tar::EntryType::Regular
                ),
                (".wh..wh..opq".to_string(), tar::EntryType::Regular),
            ]
        );
    }

    #[test]
    fn raw_entry_keeps_path_bytes() {
        let long = format!("{}/x", "d".repeat(150));
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        let tar = LayerBuilder::new()
            .raw_entry(header.clone(), b"../escape", b"x")
            .raw_entry(header.clone(), b"/abs", b"")
            .raw_entry(header, long.as_bytes(), b"yz")
            .into_tar()
            .unwrap();
        let got = entries(&tar);
        assert_eq!(got[0].0, "../escape");
        assert_eq!(got[0].2, b"x");
        assert_eq!(got[1].0, "/abs");
        assert_eq!(got[2].0, long);
        assert_eq!(got[2].2, b"yz");
    }

    #[test]
    fn builder_refuses_dotdot_in_normal_paths() {
        assert!(LayerBuilder::new()
            .file("../x", b"", 0o644)
            .into_tar()
            .is_err());
    }

    #[test]
    fn layouts_are_deterministic() {
        let make = || {
            ImageBuilder::new()
                .layer(
                    LayerBuilder::new().file("a", b"a", 0o644),
                    Compression::Gzip,
                )
                .layer(
                    LayerBuilder::new().file("b", b"b", 0o644),
                    Compression::Zstd,
                )
                .entrypoint(&["/bin/sh"])
                .env("A=1")
        };
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        let d1 = make().write_layout(one.path()).unwrap();
        let d2 = make().write_layout(two.path()).unwrap();
        assert_eq!(d1, d2);
        assert!(one.path().join("oci-layout").is_file());
        assert!(one
            .path()
            .join("blobs/sha256")
            .join(d1.trim_start_matches("sha256:"))
            .is_file());
    }
}
