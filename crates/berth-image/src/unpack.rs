//! Safe unpacking of one layer tar into a directory, in overlayfs form.
//!
//! The tar is hostile input. Every filesystem operation is relative to a directory fd
//! reached by walking the entry's parent components one at a time with
//! `O_NOFOLLOW | O_DIRECTORY`, so no symlink is ever followed while writing and nothing
//! can be created outside the destination. Files are always created fresh
//! (`O_CREAT | O_EXCL | O_NOFOLLOW`) after removing whatever was at the path, so an
//! earlier hardlink or symlink can never redirect a write.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{
    AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps, XattrFlags, CWD,
};
use rustix::io::Errno;
use tar::EntryType;

use crate::error::{show_bytes, ImageError};

/// Longest accepted entry path (and symlink target), in bytes.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest accepted path component, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Largest accepted tar extension header (PAX, GNU long name or link); the tar reader
/// buffers these in memory.
const MAX_EXTENSION_HEADER: u64 = 1 << 20;
/// Per-entry allowance of tar framing (headers, padding, small extension headers) on
/// top of file content when capping the whole stream.
const FRAMING_PER_ENTRY: u64 = 4096;
/// Memory cap for remembered directory mtimes; past it, further ones are not restored.
const MAX_DIR_TIMES_BYTES: usize = 64 << 20;
/// Deepest tree removed when an entry replaces a directory.
const MAX_REMOVE_DEPTH: usize = MAX_PATH_LEN / 2 + 1;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// The unit unpacked sizes are counted in: each entry takes at least one block (its
/// inode and directory entry), a file's content takes its size rounded up to blocks.
pub const BLOCK: u64 = 4096;

/// Caps applied while unpacking. Sizes are unpacked sizes as counted by
/// [`charged_size`]: what the layer can take on disk, not the bytes of the tar.
#[derive(Debug, Clone, Copy)]
pub struct UnpackLimits {
    /// Unpacked size of one layer.
    pub max_layer_bytes: u64,
    /// Number of tar entries in one layer.
    pub max_entries: u64,
    /// Unpacked size of one image, all its layers together.
    pub max_image_bytes: u64,
    /// A compressed layer may unpack to at most this many times its blob size ...
    pub max_ratio: u64,
    /// ... or to this many bytes, whichever is more. Real layers unpack to 2-5 times
    /// their gzip size (text and binaries); only long runs of one byte, which is what a
    /// decompression bomb is made of, reach 100 and beyond.
    pub ratio_floor_bytes: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_layer_bytes: 16 << 30,
            max_entries: 1_000_000,
            max_image_bytes: 32 << 30,
            max_ratio: 50,
            ratio_floor_bytes: 256 << 20,
        }
    }
}

impl UnpackLimits {
    /// The most a layer blob of `compressed` bytes may unpack to, and why.
    pub fn layer_cap(&self, compressed: Option<u64>) -> (u64, String) {
        let by_ratio = compressed.map(|size| {
            size.saturating_mul(self.max_ratio)
                .max(self.ratio_floor_bytes)
        });
        match by_ratio {
            Some(cap) if cap < self.max_layer_bytes => (
                cap,
                format!(
                    "the layer unpacks to more than {cap} bytes ({} times its compressed size, at least {} bytes)",
                    self.max_ratio, self.ratio_floor_bytes
                ),
            ),
            _ => (
                self.max_layer_bytes,
                format!(
                    "the layer unpacks to more than the per-layer limit of {} bytes",
                    self.max_layer_bytes
                ),
            ),
        }
    }
}

/// The unpacked size charged for one entry of `content` bytes (0 for anything but a
/// regular file): at least one block, content rounded up to blocks. A hard link shares
/// its target's blocks and is charged one block, like any other name.
pub fn charged_size(content: u64) -> u64 {
    content.div_ceil(BLOCK).saturating_mul(BLOCK).max(BLOCK)
}

/// An allowance of unpacked bytes shared by several unpacks: every layer of one image
/// (the per-image cap), or every layer one org pull adds (what the org may still store).
/// Layers unpack concurrently, so it is drawn on atomically; nothing is ever given back,
/// since a pull that fails keeps nothing.
#[derive(Debug)]
pub struct Budget {
    remaining: AtomicU64,
    what: String,
}

impl Budget {
    /// `limit` bytes; `what` names the limit in the error, e.g. "the org's image storage
    /// quota (1024 MiB, 10 MiB left)".
    pub fn new(limit: u64, what: impl Into<String>) -> Budget {
        Budget {
            remaining: AtomicU64::new(limit),
            what: what.into(),
        }
    }

    /// Takes `bytes`, or refuses with `image_too_large` when fewer are left.
    pub fn take(&self, bytes: u64) -> Result<(), ImageError> {
        self.remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(bytes)
            })
            .map(|_| ())
            .map_err(|_| ImageError::TooLarge(format!("the image exceeds {}", self.what)))
    }

    /// Bytes still available.
    pub fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }
}

/// What one unpack wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Tar entries processed (including whiteouts and metadata entries).
    pub entries: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
    /// The unpacked size charged for the layer (see [`charged_size`]), directories
    /// created for missing parents included.
    pub charged: u64,
}

/// Layer compression, derived from a layer media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

pub(crate) fn layer_compression(media_type: &str) -> Result<LayerCompression, ImageError> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Ok(LayerCompression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(LayerCompression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
            Ok(LayerCompression::Zstd)
        }
        other => Err(ImageError::invalid(format!(
            "unsupported layer media type {:?}",
            crate::error::shorten(other)
        ))),
    }
}

/// Wraps a layer blob reader in the decompressor its media type calls for.
pub fn decompressing_reader<'a, R: Read + 'a>(
    media_type: &str,
    reader: R,
) -> Result<Box<dyn Read + 'a>, ImageError> {
    Ok(match layer_compression(media_type)? {
        LayerCompression::None => Box::new(reader),
        LayerCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        LayerCompression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(reader)
                .map_err(|e| ImageError::io("starting zstd decoder", e))?,
        ),
    })
}

/// Unpack one (already decompressed) layer tar stream into `dest` (an existing empty
/// dir), converting OCI whiteouts to overlayfs form.
///
/// On error `dest` may hold a partial tree; the caller discards it.
pub fn unpack_layer<R: Read>(
    reader: R,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<UnpackStats, ImageError> {
    unpack_layer_within(reader, dest, limits, None, &[])
}

/// [`unpack_layer`] for a layer blob of `compressed` bytes (capped by
/// [`UnpackLimits::layer_cap`]), drawing every charged byte from each of `budgets` as it
/// goes: the unpack stops with `image_too_large` at the first entry over any of them.
pub fn unpack_layer_within<R: Read>(
    reader: R,
    dest: &Path,
    limits: &UnpackLimits,
    compressed: Option<u64>,
    budgets: &[&Budget],
) -> Result<UnpackStats, ImageError> {
    let (layer_cap, layer_cap_reason) = limits.layer_cap(compressed);
    let root = rustix::fs::openat(
        CWD,
        dest,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ImageError::errno(format!("opening {}", dest.display()), e))?;

    let stream_cap = layer_cap
        .saturating_add(limits.max_entries.saturating_mul(FRAMING_PER_ENTRY))
        .saturating_add(MAX_EXTENSION_HEADER);
    let mut archive = tar::Archive::new(TarGuard::new(reader, stream_cap));
    let mut unpacker = Unpacker {
        root,
        limits: *limits,
        layer_cap,
        layer_cap_reason,
        budgets,
        stats: UnpackStats::default(),
        dir_times: Vec::new(),
        dir_times_bytes: 0,
        is_root: rustix::process::geteuid().is_root(),
        cache: None,
        use_openat2: true,
    };
    for entry in archive.entries().map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        unpacker.entry(entry)?;
    }
    unpacker.finish()?;
    Ok(unpacker.stats)
}

/// Classifies an error from the tar stream: OS errors are the host's problem, anything
/// else (bad tar, bad compression, a guard refusal) is the layer's.
fn read_error(e: io::Error) -> ImageError {
    if e.raw_os_error().is_some() {
        ImageError::io("reading layer", e)
    } else {
        ImageError::invalid(format!("malformed layer: {e}"))
    }
}

/// Classifies an errno from a write-side `*at` call. The ones a crafted layer can cause
/// are the layer's fault; disk full stays insufficient storage.
fn fs_error(context: impl Into<String>, errno: Errno) -> ImageError {
    let context = context.into();
    match errno {
        Errno::LOOP | Errno::NOTDIR | Errno::MLINK | Errno::NAMETOOLONG | Errno::ISDIR => {
            ImageError::invalid(format!("{context}: {errno}"))
        }
        _ => ImageError::errno(context, errno),
    }
}

/// A validated, normalized entry path: components relative to the layer root, none of
/// them empty, `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RelPath(Vec<Vec<u8>>);

impl RelPath {
    fn parse(raw: &[u8]) -> Result<RelPath, ImageError> {
        if raw.len() > MAX_PATH_LEN {
            return Err(ImageError::invalid(format!(
                "path longer than {MAX_PATH_LEN} bytes: {}",
                show_bytes(raw)
            )));
        }
        if raw.contains(&0) {
            return Err(ImageError::invalid(format!(
                "path contains NUL: {}",
                show_bytes(raw)
            )));
        }
        if raw.first() == Some(&b'/') {
            return Err(ImageError::invalid(format!(
                "absolute path: {}",
                show_bytes(raw)
            )));
        }
        let mut components = Vec::new();
        for component in raw.split(|b| *b == b'/') {
            match component {
                b"" | b"." => {}
                b".." => {
                    return Err(ImageError::invalid(format!(
                        "path with '..': {}",
                        show_bytes(raw)
                    )))
                }
                name if name.len() > MAX_NAME_LEN => {
                    return Err(ImageError::invalid(format!(
                        "path component longer than {MAX_NAME_LEN} bytes: {}",
                        show_bytes(raw)
                    )))
                }
                name => components.push(name.to_vec()),
            }
        }
        Ok(RelPath(components))
    }

    fn show(&self) -> String {
        show_bytes(&self.0.join(&b'/'))
    }

    fn split_last(&self) -> Option<(&[Vec<u8>], &[u8])> {
        self.0
            .split_last()
            .map(|(last, parent)| (parent, last.as_slice()))
    }
}

struct Unpacker<'b> {
    root: OwnedFd,
    limits: UnpackLimits,
    /// The most this layer may be charged, and the error's explanation.
    layer_cap: u64,
    layer_cap_reason: String,
    budgets: &'b [&'b Budget],
    stats: UnpackStats,
    /// Directory mtimes, applied at the end because creating children changes them.
    dir_times: Vec<(Vec<Vec<u8>>, u64)>,
    dir_times_bytes: usize,
    is_root: bool,
    /// The most recently opened directory; cleared whenever a directory is removed.
    cache: Option<(Vec<Vec<u8>>, Rc<OwnedFd>)>,
    /// Whether `openat2` is available.
    use_openat2: bool,
}

struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
}

impl Unpacker<'_> {
    /// Charges `bytes` of unpacked size before anything that takes them is written.
    fn charge(&mut self, bytes: u64, path: &str) -> Result<(), ImageError> {
        let total = self.stats.charged.saturating_add(bytes);
        if total > self.layer_cap {
            return Err(ImageError::TooLarge(format!(
                "{} (at {path})",
                self.layer_cap_reason
            )));
        }
        for budget in self.budgets {
            budget.take(bytes)?;
        }
        self.stats.charged = total;
        Ok(())
    }

    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), ImageError> {
        self.stats.entries += 1;
        if self.stats.entries > self.limits.max_entries {
            return Err(ImageError::invalid(format!(
                "layer has more than {} entries",
                self.limits.max_entries
            )));
        }
        let kind = entry.header().entry_type();
        if kind == EntryType::XGlobalHeader {
            // Archive-wide metadata, nothing to create.
            return Ok(());
        }
        let path = RelPath::parse(&entry.path_bytes())?;
        let Some((parent, name)) = path.split_last() else {
            // The layer root itself ("./"); its attributes come from the Machine's upper dir.
            return match kind {
                EntryType::Directory => Ok(()),
                _ => Err(ImageError::invalid(
                    "non-directory entry for the layer root",
                )),
            };
        };

        if name.starts_with(WHITEOUT_PREFIX) {
            return self.whiteout(&path, parent, name);
        }

        let meta = self.meta(&entry, &path)?;
        match kind {
            EntryType::Regular | EntryType::Continuous => {
                self.file(&mut entry, &path, parent, name, &meta)
            }
            EntryType::Directory => self.dir(&path, parent, name, &meta),
            EntryType::Symlink => {
                let target = entry.link_name_bytes().map(|t| t.into_owned());
                self.symlink(&path, parent, name, target, &meta)
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().map(|t| t.into_owned());
                self.hardlink(&path, parent, name, target)
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => Err(ImageError::invalid(
                format!("device or FIFO entry refused: {}", path.show()),
            )),
            other => Err(ImageError::invalid(format!(
                "unsupported tar entry type {:?} for {}",
                other.as_byte() as char,
                path.show()
            ))),
        }
    }

    fn meta<R: Read>(&self, entry: &tar::Entry<'_, R>, path: &RelPath) -> Result<Meta, ImageError> {
        let header = entry.header();
        let bad = |what: &str| ImageError::invalid(format!("bad {what} for {}", path.show()));
        let mode = header.mode().map_err(|_| bad("mode"))? & 0o7777;
        // u32::MAX means "unchanged" to chown, so it is refused too.
        let id = |v: u64| u32::try_from(v).ok().filter(|v| *v != u32::MAX);
        let uid = id(header.uid().map_err(|_| bad("uid"))?).ok_or_else(|| bad("uid"))?;
        let gid = id(header.gid().map_err(|_| bad("gid"))?).ok_or_else(|| bad("gid"))?;
        let mtime = header.mtime().map_err(|_| bad("mtime"))?;
        Ok(Meta {
            mode,
            uid,
            gid,
            mtime,
        })
    }

    /// Opens the directory at `components`, walking from the root without following
    /// symlinks. Missing directories are created (0755, root) when `create` is set.
    fn open_dir(
        &mut self,
        components: &[Vec<u8>],
        create: bool,
    ) -> Result<Rc<OwnedFd>, ImageError> {
        if let Some((cached, fd)) = &self.cache {
            if cached.as_slice() == components {
                return Ok(Rc::clone(fd));
            }
        }
        let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        // Fast path: one kernel walk that fails on any symlink or escape. Any failure
        // falls back to the component walk, which creates missing directories and
        // reports precisely what is wrong.
        if self.use_openat2 && !components.is_empty() {
            let joined = components.join(&b'/');
            match rustix::fs::openat2(
                &self.root,
                joined.as_slice(),
                dir_flags,
                Mode::empty(),
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
            ) {
                Ok(fd) => {
                    let fd = Rc::new(fd);
                    self.cache = Some((components.to_vec(), Rc::clone(&fd)));
                    return Ok(fd);
                }
                // Old kernel or a seccomp filter.
                Err(Errno::NOSYS) | Err(Errno::PERM) => self.use_openat2 = false,
                Err(_) => {}
            }
        }
        let mut current = rustix::fs::openat(&self.root, ".", dir_flags, Mode::empty())
            .map_err(|e| ImageError::errno("opening layer root", e))?;
        for (i, component) in components.iter().enumerate() {
            let shown = || show_bytes(&components[..=i].join(&b'/'));
            let next = match rustix::fs::openat(
                &current,
                component.as_slice(),
                dir_flags,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(Errno::NOENT) if create => {
                    self.charge(BLOCK, &shown())?;
                    match rustix::fs::mkdirat(
                        &current,
                        component.as_slice(),
                        Mode::from_raw_mode(0o755),
                    ) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(fs_error(format!("creating {}", shown()), e)),
                    }
                    rustix::fs::openat(&current, component.as_slice(), dir_flags, Mode::empty())
                        .map_err(|e| fs_error(format!("opening {}", shown()), e))?
                }
                Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                    return Err(ImageError::invalid(format!(
                        "{} is a symlink or not a directory",
                        shown()
                    )))
                }
                Err(Errno::NOENT) => {
                    return Err(ImageError::invalid(format!("{} does not exist", shown())))
                }
                Err(e) => return Err(fs_error(format!("opening {}", shown()), e)),
            };
            current = next;
        }
        let fd = Rc::new(current);
        self.cache = Some((components.to_vec(), Rc::clone(&fd)));
        Ok(fd)
    }

    /// Removes whatever is at `parent/name`, unless it is a directory and `keep_dir` is
    /// set. Returns whether a directory was kept.
    fn remove_existing(
        &mut self,
        parent: &OwnedFd,
        name: &[u8],
        keep_dir: bool,
    ) -> Result<bool, ImageError> {
        let stat = match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(fs_error(format!("inspecting {}", show_bytes(name)), e)),
        };
        if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
            if keep_dir {
                return Ok(true);
            }
            // Any cached fd may point inside the tree being removed.
            self.cache = None;
            remove_tree(parent, name, 0)?;
        } else {
            rustix::fs::unlinkat(parent, name, AtFlags::empty())
                .map_err(|e| fs_error(format!("removing {}", show_bytes(name)), e))?;
        }
        Ok(false)
    }

    fn whiteout(
        &mut self,
        path: &RelPath,
        parent: &[Vec<u8>],
        name: &[u8],
    ) -> Result<(), ImageError> {
        if name == OPAQUE_MARKER {
            let dir = self.open_dir(parent, true)?;
            return rustix::fs::fsetxattr(&*dir, OPAQUE_XATTR, b"y", XattrFlags::empty())
                .map_err(|e| fs_error(format!("marking {} opaque", path.show()), e));
        }
        if name.starts_with(WHITEOUT_META_PREFIX) {
            // Other aufs metadata (.wh..wh.plnk and the like) has no overlayfs meaning.
            return Ok(());
        }
        let target = &name[WHITEOUT_PREFIX.len()..];
        if target.is_empty() || target == b"." || target == b".." {
            return Err(ImageError::invalid(format!("bad whiteout {}", path.show())));
        }
        let dir = self.open_dir(parent, true)?;
        self.charge(BLOCK, &path.show())?;
        self.remove_existing(&dir, target, false)?;
        // The overlayfs whiteout: a 0:0 character device. The only device ever created.
        rustix::fs::mknodat(
            &*dir,
            target,
            FileType::CharacterDevice,
            Mode::empty(),
            rustix::fs::makedev(0, 0),
        )
        .map_err(|e| fs_error(format!("creating whiteout for {}", path.show()), e))
    }

    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &RelPath,
        parent: &[Vec<u8>],
        name: &[u8],
        meta: &Meta,
    ) -> Result<(), ImageError> {
        let size = entry.size();
        let total = self.stats.bytes.saturating_add(size);
        // Charged from the header, before a byte is written: content beyond it is refused
        // below, and sparse entries never get this far (the tar guard refuses them), so
        // what lands on disk is at most what was charged.
        self.charge(charged_size(size), &path.show())?;
        let dir = self.open_dir(parent, true)?;
        self.remove_existing(&dir, name, false)?;
        let fd = rustix::fs::openat(
            &*dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| fs_error(format!("creating {}", path.show()), e))?;
        let mut file = File::from(fd);
        let mut buf = vec![0u8; 64 * 1024];
        let mut copied: u64 = 0;
        loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e)),
            };
            copied += n as u64;
            if copied > size {
                return Err(ImageError::invalid(format!(
                    "{} longer than its header",
                    path.show()
                )));
            }
            file.write_all(&buf[..n])
                .map_err(|e| ImageError::io(format!("writing {}", path.show()), e))?;
        }
        if copied != size {
            return Err(ImageError::invalid(format!("{} is truncated", path.show())));
        }
        self.stats.bytes = total;
        self.apply_owner_mode(&file, path, meta)?;
        rustix::fs::futimens(&file, &timestamps(meta.mtime))
            .map_err(|e| fs_error(format!("setting times of {}", path.show()), e))
    }

    fn dir(
        &mut self,
        path: &RelPath,
        parent: &[Vec<u8>],
        name: &[u8],
        meta: &Meta,
    ) -> Result<(), ImageError> {
        let dir = self.open_dir(parent, true)?;
        self.charge(BLOCK, &path.show())?;
        if !self.remove_existing(&dir, name, true)? {
            rustix::fs::mkdirat(&*dir, name, Mode::from_raw_mode(0o700))
                .map_err(|e| fs_error(format!("creating {}", path.show()), e))?;
        }
        let fd = rustix::fs::openat(
            &*dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| fs_error(format!("opening {}", path.show()), e))?;
        self.apply_owner_mode(&fd, path, meta)?;
        let cost = path.0.iter().map(|c| c.len() + 24).sum::<usize>() + 48;
        if self.dir_times_bytes + cost <= MAX_DIR_TIMES_BYTES {
            self.dir_times_bytes += cost;
            self.dir_times.push((path.0.clone(), meta.mtime));
        }
        Ok(())
    }

    fn symlink(
        &mut self,
        path: &RelPath,
        parent: &[Vec<u8>],
        name: &[u8],
        target: Option<Vec<u8>>,
        meta: &Meta,
    ) -> Result<(), ImageError> {
        // The target is stored verbatim: it is only ever resolved inside the container.
        let target = target.unwrap_or_default();
        if target.is_empty() || target.len() > MAX_PATH_LEN || target.contains(&0) {
            return Err(ImageError::invalid(format!(
                "bad symlink target for {}",
                path.show()
            )));
        }
        let dir = self.open_dir(parent, true)?;
        // A long target takes a block of its own.
        self.charge(charged_size(target.len() as u64), &path.show())?;
        self.remove_existing(&dir, name, false)?;
        rustix::fs::symlinkat(target.as_slice(), &*dir, name)
            .map_err(|e| fs_error(format!("creating symlink {}", path.show()), e))?;
        match rustix::fs::chownat(
            &*dir,
            name,
            Some(uid(meta.uid)),
            Some(gid(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        ) {
            Ok(()) => {}
            Err(Errno::PERM) if !self.is_root => {}
            Err(e) => return Err(fs_error(format!("chown of {}", path.show()), e)),
        }
        rustix::fs::utimensat(
            &*dir,
            name,
            &timestamps(meta.mtime),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| fs_error(format!("setting times of {}", path.show()), e))
    }

    fn hardlink(
        &mut self,
        path: &RelPath,
        parent: &[Vec<u8>],
        name: &[u8],
        target: Option<Vec<u8>>,
    ) -> Result<(), ImageError> {
        let raw_target = target.unwrap_or_default();
        let target = RelPath::parse(&raw_target)?;
        let Some((target_parent, target_name)) = target.split_last() else {
            return Err(ImageError::invalid(format!(
                "hardlink {} has no target",
                path.show()
            )));
        };
        let bad_target = |why: &str| {
            ImageError::invalid(format!(
                "hardlink {} -> {}: {why}",
                path.show(),
                show_bytes(&raw_target)
            ))
        };
        let target_dir = match self.open_dir(target_parent, false) {
            Ok(fd) => fd,
            Err(ImageError::Invalid(_)) => {
                return Err(bad_target("target is not an earlier file of this layer"))
            }
            Err(e) => return Err(e),
        };
        match rustix::fs::statat(&*target_dir, target_name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) if FileType::from_raw_mode(stat.st_mode) == FileType::RegularFile => {}
            Ok(_) => return Err(bad_target("target is not a regular file")),
            Err(Errno::NOENT) => {
                return Err(bad_target("target is not an earlier file of this layer"))
            }
            Err(e) => return Err(fs_error("inspecting hardlink target", e)),
        }
        if target == *path {
            return Ok(());
        }
        // The link shares its target's blocks, already charged once; the name itself
        // is charged a block like any entry, so a million links are not free.
        self.charge(BLOCK, &path.show())?;
        let dir = self.open_dir(parent, true)?;
        self.remove_existing(&dir, name, false)?;
        // The target may have been removed if it was inside a replaced directory.
        let target_dir = self.open_dir(target_parent, false)?;
        // No AT_SYMLINK_FOLLOW: the link is to the target entry itself.
        rustix::fs::linkat(&*target_dir, target_name, &*dir, name, AtFlags::empty()).map_err(|e| {
            match e {
                Errno::NOENT => bad_target("target disappeared"),
                e => fs_error(format!("creating hardlink {}", path.show()), e),
            }
        })
    }

    fn apply_owner_mode<Fd: AsFd>(
        &self,
        fd: Fd,
        path: &RelPath,
        meta: &Meta,
    ) -> Result<(), ImageError> {
        // chown first: it clears setuid/setgid, which chmod then sets.
        match rustix::fs::fchown(&fd, Some(uid(meta.uid)), Some(gid(meta.gid))) {
            Ok(()) => {}
            Err(Errno::PERM) if !self.is_root => {}
            Err(e) => return Err(fs_error(format!("chown of {}", path.show()), e)),
        }
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(meta.mode))
            .map_err(|e| fs_error(format!("chmod of {}", path.show()), e))
    }

    fn finish(&mut self) -> Result<(), ImageError> {
        let dir_times = std::mem::take(&mut self.dir_times);
        for (components, mtime) in dir_times {
            // A directory replaced or removed by a later entry no longer needs its time.
            let fd = match self.open_dir(&components, false) {
                Ok(fd) => fd,
                Err(ImageError::Invalid(_)) => continue,
                Err(e) => return Err(e),
            };
            rustix::fs::futimens(&*fd, &timestamps(mtime))
                .map_err(|e| fs_error("setting directory times", e))?;
        }
        Ok(())
    }
}

fn uid(raw: u32) -> rustix::fs::Uid {
    // SAFETY: callers pass ids from `Unpacker::meta`, which refuses u32::MAX (-1).
    unsafe { rustix::fs::Uid::from_raw(raw) }
}

fn gid(raw: u32) -> rustix::fs::Gid {
    // SAFETY: callers pass ids from `Unpacker::meta`, which refuses u32::MAX (-1).
    unsafe { rustix::fs::Gid::from_raw(raw) }
}

fn timestamps(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Removes the tree at `parent/name` through fds only, never following symlinks.
pub(crate) fn remove_tree(parent: &OwnedFd, name: &[u8], depth: usize) -> Result<(), ImageError> {
    if depth > MAX_REMOVE_DEPTH {
        return Err(ImageError::invalid("directory tree too deep to replace"));
    }
    let dir = rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| fs_error(format!("opening {} for removal", show_bytes(name)), e))?;
    let mut children = Vec::new();
    for child in
        rustix::fs::Dir::read_from(&dir).map_err(|e| ImageError::errno("listing directory", e))?
    {
        let child = child.map_err(|e| ImageError::errno("listing directory", e))?;
        let child_name = child.file_name().to_bytes();
        if child_name != b"." && child_name != b".." {
            children.push(child_name.to_vec());
        }
    }
    for child in children {
        let stat = rustix::fs::statat(&dir, child.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| ImageError::errno("inspecting directory entry", e))?;
        if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
            remove_tree(&dir, &child, depth + 1)?;
        } else {
            rustix::fs::unlinkat(&dir, child.as_slice(), AtFlags::empty())
                .map_err(|e| ImageError::errno("removing directory entry", e))?;
        }
    }
    rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)
        .map_err(|e| fs_error(format!("removing {}", show_bytes(name)), e))
}

/// Follows the tar stream's framing alongside the tar reader and refuses, before the
/// reader buffers them, extension headers (PAX, GNU long name or link) over
/// [`MAX_EXTENSION_HEADER`], GNU sparse entries, and streams over `cap` bytes.
pub(crate) struct TarGuard<R> {
    inner: R,
    cap: u64,
    /// Stream offset of the next byte.
    pos: u64,
    /// Offset of the next header block.
    next_header: u64,
    header: tar::Header,
    header_fill: usize,
    /// Body of the current PAX header, collected to learn a `size` override.
    pax: Option<(Vec<u8>, u64)>,
    pending_pax_size: Option<u64>,
    finished: bool,
}

fn guard_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl<R: Read> TarGuard<R> {
    pub(crate) fn new(inner: R, cap: u64) -> Self {
        TarGuard {
            inner,
            cap,
            pos: 0,
            next_header: 0,
            header: tar::Header::new_old(),
            header_fill: 0,
            pax: None,
            pending_pax_size: None,
            finished: false,
        }
    }

    fn observe(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() && !self.finished {
            if self.pos < self.next_header {
                let take = usize::try_from(self.next_header - self.pos)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                if let Some((body, end)) = &mut self.pax {
                    if self.pos < *end {
                        let keep = usize::try_from(*end - self.pos)
                            .unwrap_or(usize::MAX)
                            .min(take);
                        body.extend_from_slice(&data[..keep]);
                    }
                }
                self.pos += take as u64;
                data = &data[take..];
            } else {
                let take = (512 - self.header_fill).min(data.len());
                self.header.as_mut_bytes()[self.header_fill..self.header_fill + take]
                    .copy_from_slice(&data[..take]);
                self.header_fill += take;
                self.pos += take as u64;
                data = &data[take..];
                if self.header_fill == 512 {
                    self.header_fill = 0;
                    self.on_header()?;
                }
            }
        }
        Ok(())
    }

    /// Mirrors how the tar reader sizes each member, including a PAX `size` override.
    fn on_header(&mut self) -> io::Result<()> {
        if let Some((body, _)) = self.pax.take() {
            self.pending_pax_size = tar::PaxExtensions::new(&body)
                .map_while(Result::ok)
                .find(|ext| ext.key_bytes() == b"size")
                .and_then(|ext| ext.value().ok().and_then(|v| v.parse::<u64>().ok()));
        }
        if self.header.as_bytes().iter().all(|b| *b == 0) {
            // End of archive: the reader stops here.
            self.finished = true;
            return Ok(());
        }
        let kind = self.header.entry_type();
        let header_size = self
            .header
            .entry_size()
            .map_err(|_| guard_error("bad size field in tar header"))?;
        let is_extension =
            kind.is_gnu_longname() || kind.is_gnu_longlink() || kind.is_pax_local_extensions();
        let size = if is_extension {
            let recognized = self.header.as_gnu().is_some() || self.header.as_ustar().is_some();
            if !recognized {
                return Err(guard_error("extension header in a pre-POSIX tar header"));
            }
            if header_size > MAX_EXTENSION_HEADER {
                return Err(guard_error("tar extension header too large"));
            }
            header_size
        } else if kind.is_pax_global_extensions() {
            self.pending_pax_size = None;
            if header_size > MAX_EXTENSION_HEADER {
                return Err(guard_error("tar global header too large"));
            }
            header_size
        } else if kind.is_gnu_sparse() {
            return Err(guard_error("GNU sparse tar entries are not supported"));
        } else {
            self.pending_pax_size.take().unwrap_or(header_size)
        };
        let data_start = self.pos;
        if kind.is_pax_local_extensions() {
            self.pax = Some((Vec::new(), data_start + size));
        }
        let padded = size
            .checked_add(511)
            .map(|s| s & !511)
            .ok_or_else(|| guard_error("tar size overflow"))?;
        self.next_header = data_start
            .checked_add(padded)
            .ok_or_else(|| guard_error("tar size overflow"))?;
        Ok(())
    }
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if self.pos.saturating_add(n as u64) > self.cap {
            return Err(guard_error("layer tar stream exceeds the size limit"));
        }
        self.observe(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_path_normalizes() {
        let p = RelPath::parse(b"./a//b/./c/").unwrap();
        assert_eq!(p.0, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        assert_eq!(RelPath::parse(b"./").unwrap().0.len(), 0);
    }

    #[test]
    fn rel_path_refuses_escapes() {
        for bad in [&b"../x"[..], b"a/../../x", b"/etc/passwd", b"a/\0b", b".."] {
            let e = RelPath::parse(bad).unwrap_err();
            assert_eq!(e.code(), "invalid_image", "{bad:?}");
        }
        let long_name = vec![b'a'; 256];
        assert!(RelPath::parse(&long_name).is_err());
        let long_path = [b"a/".as_slice(); 2049].concat();
        assert!(RelPath::parse(&long_path).is_err());
        let ok_name = vec![b'a'; 255];
        assert!(RelPath::parse(&ok_name).is_ok());
    }

    #[test]
    fn media_types() {
        for (mt, c) in [
            (
                "application/vnd.oci.image.layer.v1.tar",
                LayerCompression::None,
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                LayerCompression::Gzip,
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                LayerCompression::Gzip,
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                LayerCompression::Zstd,
            ),
        ] {
            assert_eq!(layer_compression(mt).unwrap(), c);
        }
        let e = layer_compression("application/vnd.oci.image.layer.v1.tar+bzip2").unwrap_err();
        assert_eq!(e.code(), "invalid_image");
        assert!(decompressing_reader("text/plain", io::empty()).is_err());
    }

    #[test]
    fn guard_refuses_huge_long_name() {
        // A GNU long-name header claiming 1 GiB: refused before anything is buffered.
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(EntryType::GNULongName);
        header.set_size(1 << 30);
        header.set_cksum();
        let mut data = header.as_bytes().to_vec();
        data.extend_from_slice(&[b'a'; 4096]);
        let dest = tempfile::tempdir().unwrap();
        let err = unpack_layer(&data[..], dest.path(), &UnpackLimits::default()).unwrap_err();
        assert_eq!(err.code(), "invalid_image");
        assert!(err.to_string().contains("extension header"), "{err}");
    }

    #[test]
    fn guard_caps_the_stream() {
        let mut builder = tar::Builder::new(Vec::new());
        for i in 0..10 {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(EntryType::Directory);
            header.set_size(0);
            header.set_mode(0o755);
            builder
                .append_data(&mut header, format!("d{i}"), io::empty())
                .unwrap();
        }
        let data = builder.into_inner().unwrap();
        let limits = UnpackLimits {
            max_layer_bytes: 0,
            max_entries: 0,
            ..UnpackLimits::default()
        };
        let dest = tempfile::tempdir().unwrap();
        // The cap (framing allowance only) is far above 10 small headers, but with
        // max_entries = 0 the first entry is refused.
        let err = unpack_layer(&data[..], dest.path(), &limits).unwrap_err();
        assert_eq!(err.code(), "invalid_image");

        let mut guard = TarGuard::new(io::repeat(0xff), 4096);
        let mut buf = vec![0u8; 8192];
        assert!(guard.read(&mut buf).is_err());
    }

    #[test]
    fn pax_size_override_is_followed() {
        // A PAX header overriding the size of the next member; the guard must agree with
        // the tar reader on where the following header is.
        let mut builder = tar::Builder::new(Vec::new());
        let contents = vec![7u8; 1000];
        builder
            .append_pax_extensions([("size", b"1000".as_slice())])
            .unwrap();
        let new_header = || {
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(EntryType::Regular);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header
        };
        // The ustar size field says 0; only the PAX record knows the real size.
        let mut header = new_header();
        header.set_size(0);
        builder
            .append_data(&mut header, "f", &contents[..])
            .unwrap();
        let mut header = new_header();
        header.set_size(3);
        builder.append_data(&mut header, "g", &b"abc"[..]).unwrap();
        let data = builder.into_inner().unwrap();
        let dest = tempfile::tempdir().unwrap();
        let stats = unpack_layer(&data[..], dest.path(), &UnpackLimits::default()).unwrap();
        assert_eq!(stats.bytes, 1003);
        assert_eq!(std::fs::read(dest.path().join("g")).unwrap(), b"abc");
    }
}
