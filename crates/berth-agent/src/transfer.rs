//! The migration stream: a Machine's writable layer (its overlay upperdir) copied to
//! another worker exactly, in one or more passes, as a zstd-compressed tar stream.
//!
//! Every tree entry is `tree/<path>` with its path, link target, nanosecond mtime and
//! extended attributes in PAX records (`path`, `linkpath`, `mtime`, `SCHILY.xattr.*`), so
//! names and targets go byte for byte. The last entry is [`MANIFEST`]: the sha256 of every
//! tar byte before its header, the entry count and the full listing of the tree at this
//! pass. Nothing the Machine can name collides with it, since its paths are all under
//! `tree`.
//!
//! Both ends are attack surface. The tree belongs to code nobody has read, which may swap
//! any directory for a symlink while a pass runs: the exporter walks directory fds
//! (`O_NOFOLLOW`), opens files `O_PATH` and checks them with fstat before reading, and
//! never opens anything but directories and regular files. The importer creates every
//! entry relative to a directory fd resolved with `openat2(RESOLVE_IN_ROOT |
//! RESOLVE_NO_SYMLINKS)` and `*at` calls that do not follow the last component, so no
//! name in a stream reaches outside its root.
//!
//! A later pass over a running Machine sends what changed by ctime (which the Machine
//! cannot forge), the whole subtree of a directory that is new at its path (moved in, or
//! made), and the listing, from which the importer removes what the Machine deleted.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timestamps};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

pub use rustix::fs::Timespec;

mod image;
pub use image::{export_image, import_image, ChunkHash, ImagePass, IMAGE_CHUNK};

/// The top directory of every tree entry in the stream.
const TREE: &str = "tree";
/// The last entry: see the module's documentation.
pub const MANIFEST: &str = ".berth-transfer/manifest.json";
const FORMAT: u32 = 1;
/// Level 1: on a 256 MB tree (half noise, half text) export piped into import ran 1.12x
/// as fast as `tar | zstd -1 | zstd -d | tar -x`, and 1.05x at level 3 against `zstd -3`,
/// for 0.06% more bytes (`throughput_against_a_tar_pipe`).
const ZSTD_LEVEL: i32 = 1;
/// Holes are found and made again in blocks of this size.
const BLOCK: usize = 4096;
/// The fixed buffer each end streams file content through (a multiple of [`BLOCK`]).
const BUF: usize = 256 * 1024;
/// The longest relative path carried: the importer resolves each parent in one openat2,
/// which the kernel limits to PATH_MAX. It also bounds the depth of every walk.
const MAX_PATH: usize = 4095;
/// Host ids a Machine owns above its base.
const ID_RANGE: u32 = 65_536;
/// The one host id outside a Machine's range its tree may hold, on overlayfs's whiteouts
/// only, carried unshifted.
const HOST_ROOT: u32 = 0;
/// The largest manifest an importer reads (its listing is the whole tree's paths).
const MAX_MANIFEST: u64 = 1 << 30;
/// How far before its start a pass dates itself: a file changed right after the pass
/// began may carry a coarse (jiffy or whole-second) ctime earlier than the fine clock.
const CTIME_MARGIN: Duration = Duration::from_secs(1);
/// How often the exporter looks again at an entry that changed type under it.
const RETRIES: usize = 8;

/// One export pass.
#[derive(Debug, Clone, Default)]
pub struct ExportPass {
    /// Only entries whose ctime is at or after this instant (a later pass over a running
    /// Machine); None sends everything.
    pub changed_since: Option<Timespec>,
    /// The directories the previous pass saw ([`PassSummary::dirs`]). With
    /// `changed_since`, a directory that is not here under the same inode (made, or moved
    /// in, whose files keep their old ctime) is sent whole. None treats every changed
    /// directory so.
    pub known_dirs: Option<DirIndex>,
    /// Host ids in the tree are `from_base + id`; the stream carries `to_base + id`.
    pub from_base: u32,
    pub to_base: u32,
    /// The Machine's mount points, relative to the tree's root. Before mount points were
    /// made the Machine's own, each missing directory of one was made host root's in
    /// the writable layer: such a directory (a mount point, empty, or one of its parents)
    /// goes as the Machine's root's, which is what it would be made as now.
    pub mount_points: Vec<Vec<u8>>,
}

impl ExportPass {
    /// Whether `rel`, a host-root-owned directory holding `names`, is one that an older
    /// runtime made for a mount: a mount point that is empty, or a parent of one.
    fn made_for_a_mount(&self, rel: &[u8], meta: &Meta, names: &[OsString]) -> bool {
        if self.from_base == HOST_ROOT || meta.uid != HOST_ROOT || meta.gid != HOST_ROOT {
            return false;
        }
        self.mount_points.iter().any(|point| {
            (point.as_slice() == rel && names.is_empty())
                || (point.len() > rel.len()
                    && point.starts_with(rel)
                    && (rel.is_empty() || point[rel.len()] == b'/'))
        })
    }
}

/// Every directory of a tree by path, with its inode: what a later pass compares with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirIndex(HashMap<Vec<u8>, u64>);

impl DirIndex {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct PassSummary {
    /// Tree entries sent (or applied).
    pub entries: u64,
    /// Regular-file content bytes sent (or applied).
    pub file_bytes: u64,
    /// Compressed bytes on the wire.
    pub stream_bytes: u64,
    /// `sha256:<hex>` of the tar bytes before the manifest.
    pub digest: String,
    /// When the pass began reading: the next pass's `changed_since`.
    pub started_at: Timespec,
    /// The directories the export saw (for the next pass's `known_dirs`); empty after an
    /// import.
    pub dirs: DirIndex,
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// ENOSPC or EDQUOT on the importing side.
    #[error("out of disk space: {context}: {source}")]
    OutOfSpace { context: String, source: io::Error },
    /// The stream is truncated, corrupted, or names something it may not.
    #[error("corrupt transfer stream: {0}")]
    Corrupt(String),
    /// The tree holds something the stream cannot carry faithfully.
    #[error("cannot transfer {path}: {reason}")]
    Unsupported { path: String, reason: String },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

impl TransferError {
    /// The destination's disk or quota is full (HTTP 507 `insufficient_storage`).
    pub fn out_of_space(&self) -> bool {
        matches!(self, TransferError::OutOfSpace { .. })
    }

    /// A stable code for API errors.
    pub fn code(&self) -> &'static str {
        match self {
            TransferError::OutOfSpace { .. } => "insufficient_storage",
            TransferError::Corrupt(_) => "corrupt_stream",
            TransferError::Unsupported { .. } => "unsupported_entry",
            TransferError::Io { .. } => "transfer_io",
        }
    }

    fn io(context: impl Into<String>, source: impl Into<io::Error>) -> TransferError {
        let source = source.into();
        let context = context.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
                TransferError::OutOfSpace { context, source }
            }
            _ => TransferError::Io { context, source },
        }
    }
}

type Result<T, E = TransferError> = std::result::Result<T, E>;

fn shown(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// The parts of a stat this module uses, in fixed types on every architecture.
#[derive(Debug, Clone, Copy)]
struct Meta {
    dev: u64,
    ino: u64,
    nlink: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    rdev: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Meta {
    // The field types differ between architectures; on some these casts are no-ops.
    #[allow(clippy::unnecessary_cast)]
    fn of(st: &rustix::fs::Stat) -> Meta {
        Meta {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            nlink: st.st_nlink as u64,
            mode: st.st_mode as u32,
            uid: st.st_uid as u32,
            gid: st.st_gid as u32,
            rdev: st.st_rdev as u64,
            size: st.st_size as u64,
            mtime: (st.st_mtime as i64, st.st_mtime_nsec as i64),
            ctime: (st.st_ctime as i64, st.st_ctime_nsec as i64),
        }
    }

    fn file_type(&self) -> FileType {
        FileType::from_raw_mode(self.mode)
    }

    fn same_inode(&self, other: &Meta) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }
}

fn now_minus_margin() -> Timespec {
    let since = SystemTime::now()
        .checked_sub(CTIME_MARGIN)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default();
    Timespec {
        tv_sec: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(since.subsec_nanos()),
    }
}

/// `rel` joined under `name`, without a leading slash for children of the root.
fn child_path(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut path = Vec::with_capacity(rel.len() + 1 + name.len());
    if !rel.is_empty() {
        path.extend_from_slice(rel);
        path.push(b'/');
    }
    path.extend_from_slice(name);
    path
}

/// The names in a directory, sorted so that a stream is reproducible.
fn read_names(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsString::from_vec(name.to_vec()));
        }
    }
    names.sort();
    Ok(names)
}

/// `/proc/self/fd/<dir>/<name>`: a path to `name` in the directory `dir` for calls that
/// have no fd form (the `l*xattr` family). The directory is the fd's, whatever has been
/// renamed since, and the `l` calls do not follow `name`.
fn proc_path(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
    let mut path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    path.push(name);
    path
}

/// Where xattrs are read or written: an open fd, or a path not followed at its end.
enum Node<'a> {
    Fd(BorrowedFd<'a>),
    NoFollow(&'a Path),
}

type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

fn list_xattrs(node: &Node<'_>) -> io::Result<Xattrs> {
    let list = |buf: &mut [u8]| match node {
        Node::Fd(fd) => rustix::fs::flistxattr(fd, buf),
        Node::NoFollow(path) => rustix::fs::llistxattr(*path, buf),
    };
    let get = |name: &[u8], buf: &mut [u8]| match node {
        Node::Fd(fd) => rustix::fs::fgetxattr(fd, name, buf),
        Node::NoFollow(path) => rustix::fs::lgetxattr(*path, name, buf),
    };
    // The sizes can grow between the two calls: ERANGE asks again.
    let names = loop {
        let size = list(&mut [])?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match list(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                break buf;
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut xattrs = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let value = loop {
            let size = match get(name, &mut []) {
                Ok(size) => size,
                // Removed since it was listed.
                Err(Errno::NODATA) => break None,
                Err(e) => return Err(e.into()),
            };
            let mut value = vec![0; size];
            match get(name, &mut value) {
                Ok(n) => {
                    value.truncate(n);
                    break Some(value);
                }
                Err(Errno::RANGE) => continue,
                Err(Errno::NODATA) => break None,
                Err(e) => return Err(e.into()),
            }
        };
        if let Some(value) = value {
            xattrs.push((name.to_vec(), value));
        }
    }
    xattrs.sort();
    Ok(xattrs)
}

fn set_xattr(node: &Node<'_>, name: &[u8], value: &[u8]) -> io::Result<()> {
    let flags = rustix::fs::XattrFlags::empty();
    match node {
        Node::Fd(fd) => rustix::fs::fsetxattr(fd, name, value, flags),
        Node::NoFollow(path) => rustix::fs::lsetxattr(*path, name, value, flags),
    }
    .map_err(io::Error::from)
}

fn remove_xattr(node: &Node<'_>, name: &[u8]) -> io::Result<()> {
    match node {
        Node::Fd(fd) => rustix::fs::fremovexattr(fd, name),
        Node::NoFollow(path) => rustix::fs::lremovexattr(*path, name),
    }
    .map_err(io::Error::from)
}

/// POSIX ACLs and v3 file capabilities hold host ids in their values; they move with the
/// owners. `map` answers None for an id it cannot carry.
fn shift_xattr_ids(name: &[u8], value: &[u8], map: &dyn Fn(u32) -> Option<u32>) -> Option<Vec<u8>> {
    let mut value = value.to_vec();
    let shift_at = |at: usize, value: &mut Vec<u8>| -> Option<()> {
        let bytes: [u8; 4] = value.get(at..at + 4)?.try_into().ok()?;
        let id = map(u32::from_le_bytes(bytes))?;
        value[at..at + 4].copy_from_slice(&id.to_le_bytes());
        Some(())
    };
    match name {
        // struct posix_acl_xattr_header { le32 version = 2 } then entries
        // { le16 tag; le16 perm; le32 id }; ACL_USER (2) and ACL_GROUP (8) name an id.
        b"system.posix_acl_access" | b"system.posix_acl_default" => {
            if value.len() < 4 || !(value.len() - 4).is_multiple_of(8) {
                return Some(value);
            }
            for at in (4..value.len()).step_by(8) {
                let tag = u16::from_le_bytes([value[at], value[at + 1]]);
                if tag == 0x02 || tag == 0x08 {
                    shift_at(at + 4, &mut value)?;
                }
            }
            Some(value)
        }
        // struct vfs_ns_cap_data: revision 3 (magic 0x03000000) ends with the rootid.
        b"security.capability" => {
            let magic = value
                .get(0..4)
                .map(|m| u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
            if value.len() == 24 && magic.map(|m| m & 0xff00_0000) == Some(0x0300_0000) {
                shift_at(20, &mut value)?;
            }
            Some(value)
        }
        _ => Some(value),
    }
}

/// The PAX key carrying an xattr: `SCHILY.xattr.<name>` as GNU tar and bsdtar write it,
/// unless the name cannot be a key (not UTF-8, or holding `=` or a newline).
fn xattr_key(name: &[u8]) -> String {
    match std::str::from_utf8(name) {
        Ok(name) if !name.contains(['=', '\n']) => format!("SCHILY.xattr.{name}"),
        _ => format!("BERTH.xattr.hex.{}", hex::encode(name)),
    }
}

/// A PAX record as written: the tar crate reads records line by line, so a value holding
/// a newline goes hex-encoded under `BERTH.hex.<key>`.
fn pax_record(key: String, value: Vec<u8>) -> (String, Vec<u8>) {
    if value.contains(&b'\n') {
        (format!("BERTH.hex.{key}"), hex::encode(value).into_bytes())
    } else {
        (key, value)
    }
}

/// An entry's PAX records, decoded.
fn pax_records<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut records = Vec::new();
    if let Some(extensions) = entry.pax_extensions().map_err(corrupt)? {
        for record in extensions {
            let record = record.map_err(corrupt)?;
            records.push(match record.key_bytes().strip_prefix(b"BERTH.hex.") {
                Some(key) => (
                    key.to_vec(),
                    hex::decode(record.value_bytes())
                        .map_err(|_| corrupt("a bad hex PAX record"))?,
                ),
                None => (record.key_bytes().to_vec(), record.value_bytes().to_vec()),
            });
        }
    }
    Ok(records)
}

fn xattr_name(key: &[u8]) -> Option<Vec<u8>> {
    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
        return Some(name.to_vec());
    }
    key.strip_prefix(b"BERTH.xattr.hex.")
        .and_then(|hex_name| hex::decode(hex_name).ok())
}

/// Manifest paths are JSON strings: `%` and bytes that are not UTF-8 are escaped as
/// `%XX`, so any Linux name goes both ways.
fn encode_path(path: &[u8]) -> String {
    let mut out = String::with_capacity(path.len());
    for chunk in path.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '%' {
                out.push_str("%25");
            } else {
                out.push(c);
            }
        }
        for byte in chunk.invalid() {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn decode_path(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex_byte = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex_byte, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Manifest {
    format: u32,
    digest: String,
    entries: u64,
    file_bytes: u64,
    paths: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// Export
// ---------------------------------------------------------------------------------------

struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

type Encoder<W> = zstd::stream::write::Encoder<'static, CountingWriter<W>>;

/// A regular file's content, exactly `size` bytes: holes (SEEK_HOLE) are zeros not read
/// from disk, and a file that shrank or grew during the read is padded or cut (its ctime
/// changed, so the next pass sends it again).
struct FileContent<'a> {
    file: &'a File,
    size: u64,
    pos: u64,
    data_start: u64,
    data_end: u64,
}

impl<'a> FileContent<'a> {
    fn new(file: &'a File, size: u64) -> FileContent<'a> {
        FileContent {
            file,
            size,
            pos: 0,
            data_start: 0,
            data_end: 0,
        }
    }

    fn find_data(&mut self) -> io::Result<()> {
        let pos = i64::try_from(self.pos).map_err(|_| io::Error::from(Errno::FBIG))?;
        match rustix::fs::seek(self.file, rustix::fs::SeekFrom::Data(pos)) {
            Ok(start) => {
                let hole = i64::try_from(start).map_err(|_| io::Error::from(Errno::FBIG))?;
                let end = rustix::fs::seek(self.file, rustix::fs::SeekFrom::Hole(hole))?;
                self.data_start = start;
                self.data_end = end.max(start + 1);
            }
            // No data past pos: the rest is a hole.
            Err(Errno::NXIO) => {
                self.data_start = self.size;
                self.data_end = self.size;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
}

impl Read for FileContent<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.data_end && self.data_start < self.size {
            self.find_data()?;
        }
        let left = usize::try_from(self.size - self.pos).unwrap_or(usize::MAX);
        let want = buf.len().min(left);
        let n = if self.pos < self.data_start {
            let zeros = want.min(usize::try_from(self.data_start - self.pos).unwrap_or(usize::MAX));
            buf[..zeros].fill(0);
            zeros
        } else {
            let data = want.min(usize::try_from(self.data_end - self.pos).unwrap_or(usize::MAX));
            match self.file.read_at(&mut buf[..data], self.pos)? {
                // Shrunk under us: zeros up to the size the header promised.
                0 => {
                    self.data_start = self.size;
                    buf[..want].fill(0);
                    want
                }
                n => n,
            }
        };
        self.pos += n as u64;
        Ok(n)
    }
}

/// What the walk found at a name, checked against the inode it opened.
enum Found {
    Gone,
    Retry,
    Done,
}

/// Where an inode with several links was first seen in this pass.
struct LinkSeen {
    path: Vec<u8>,
    sent: bool,
}

struct Exporter<'p, W: Write> {
    tar: tar::Builder<HashingWriter<Encoder<W>>>,
    pass: &'p ExportPass,
    links: HashMap<(u64, u64), LinkSeen>,
    listing: Vec<Vec<u8>>,
    dirs: DirIndex,
    entries: u64,
    file_bytes: u64,
}

/// Writes one pass over `root` to `out`. See [`ExportPass`].
pub fn export(root: &Path, pass: &ExportPass, out: impl Write) -> Result<PassSummary> {
    export_at_level(root, pass, out, ZSTD_LEVEL)
}

fn export_at_level(
    root: &Path,
    pass: &ExportPass,
    out: impl Write,
    level: i32,
) -> Result<PassSummary> {
    let started_at = now_minus_margin();
    let root_fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| TransferError::io(format!("open {}", root.display()), e))?;
    let mut exporter = Exporter {
        tar: open_stream(out, level)?,
        pass,
        links: HashMap::new(),
        listing: Vec::new(),
        dirs: DirIndex::default(),
        entries: 0,
        file_bytes: 0,
    };
    let root_meta =
        Meta::of(&rustix::fs::fstat(&root_fd).map_err(|e| TransferError::io("stat the root", e))?);
    exporter.directory(&root_fd, &root_meta, &mut Vec::new(), false)?;

    let digest = stream_digest(&exporter.tar);
    let manifest = Manifest {
        format: FORMAT,
        digest: digest.clone(),
        entries: exporter.entries,
        file_bytes: exporter.file_bytes,
        paths: exporter.listing.iter().map(|p| encode_path(p)).collect(),
    };
    let (entries, file_bytes, dirs) = (exporter.entries, exporter.file_bytes, exporter.dirs);
    let stream_bytes = close_stream(exporter.tar, &manifest)?;
    Ok(PassSummary {
        entries,
        file_bytes,
        stream_bytes,
        digest,
        started_at,
        dirs,
    })
}

/// A tar stream, compressed, whose tar bytes are hashed as they are written.
type Stream<W> = tar::Builder<HashingWriter<Encoder<W>>>;

fn open_stream<W: Write>(out: W, level: i32) -> Result<Stream<W>> {
    let mut encoder = zstd::stream::write::Encoder::new(
        CountingWriter {
            inner: out,
            count: 0,
        },
        level,
    )
    .map_err(|e| TransferError::io("start the compressor", e))?;
    encoder
        .include_checksum(true)
        .map_err(|e| TransferError::io("start the compressor", e))?;
    let mut tar = tar::Builder::new(HashingWriter {
        inner: encoder,
        hasher: Sha256::new(),
    });
    tar.mode(tar::HeaderMode::Complete);
    Ok(tar)
}

/// `sha256:` of every tar byte written so far: what the manifest names.
fn stream_digest<W: Write>(tar: &Stream<W>) -> String {
    format!(
        "sha256:{}",
        hex::encode(tar.get_ref().hasher.clone().finalize())
    )
}

/// Appends `manifest` as the last entry ([`MANIFEST`]) and ends the stream; answers the
/// compressed bytes written.
fn close_stream<W: Write>(mut tar: Stream<W>, manifest: &impl serde::Serialize) -> Result<u64> {
    let body = serde_json::to_vec(manifest)
        .map_err(|e| TransferError::io("write the manifest", io::Error::other(e)))?;
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o600);
    header.set_size(body.len() as u64);
    let write_err = |e| TransferError::io("write the stream", e);
    tar.append_data(&mut header, MANIFEST, body.as_slice())
        .map_err(write_err)?;
    let hashing = tar.into_inner().map_err(write_err)?;
    let mut counting = hashing.inner.finish().map_err(write_err)?;
    counting.flush().map_err(write_err)?;
    Ok(counting.count)
}

impl<W: Write> Exporter<'_, W> {
    fn changed(&self, meta: &Meta, whole: bool) -> bool {
        whole
            || match self.pass.changed_since {
                None => true,
                Some(since) => meta.ctime >= (since.tv_sec, since.tv_nsec),
            }
    }

    fn shift(&self, id: u32, path: &[u8], what: &str) -> Result<u32> {
        id.checked_sub(self.pass.from_base)
            .filter(|id| *id < ID_RANGE)
            .and_then(|id| self.pass.to_base.checked_add(id))
            .ok_or_else(|| TransferError::Unsupported {
                path: shown(path),
                reason: format!(
                    "{what} {id} is outside the Machine's ids {}..{}",
                    self.pass.from_base,
                    u64::from(self.pass.from_base) + u64::from(ID_RANGE)
                ),
            })
    }

    /// One directory (`fd`, already checked against `meta`) and all below it. `whole`
    /// sends everything below regardless of ctime.
    fn directory(
        &mut self,
        fd: &OwnedFd,
        meta: &Meta,
        rel: &mut Vec<u8>,
        whole: bool,
    ) -> Result<()> {
        let known = match (&self.pass.changed_since, &self.pass.known_dirs) {
            (None, _) => false,
            (Some(_), Some(known)) => known.0.get(rel.as_slice()) == Some(&meta.ino),
            (Some(_), None) => false,
        };
        let whole = whole || (self.pass.changed_since.is_some() && !known);
        if !rel.is_empty() {
            self.listing.push(rel.clone());
        }
        self.dirs.0.insert(rel.clone(), meta.ino);
        let names = read_names(fd.as_fd())
            .map_err(|e| TransferError::io(format!("list /{}", shown(rel)), e))?;
        if self.changed(meta, whole) {
            let xattrs = list_xattrs(&Node::Fd(fd.as_fd()))
                .map_err(|e| TransferError::io(format!("xattrs of /{}", shown(rel)), e))?;
            let mut meta = *meta;
            if !rel.is_empty() && self.pass.made_for_a_mount(rel, &meta, &names) {
                (meta.uid, meta.gid) = (self.pass.from_base, self.pass.from_base);
            }
            self.append(
                rel,
                &meta,
                tar::EntryType::Directory,
                &xattrs,
                None,
                io::empty(),
            )?;
        }
        for name in names {
            let parent_len = rel.len();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(name.as_bytes());
            if rel.len() > MAX_PATH {
                return Err(TransferError::Unsupported {
                    path: shown(rel),
                    reason: format!("longer than {MAX_PATH} bytes"),
                });
            }
            let mut tries = 0;
            loop {
                match self.entry(fd.as_fd(), &name, rel, whole)? {
                    Found::Retry if tries < RETRIES => tries += 1,
                    Found::Retry => {
                        return Err(TransferError::io(
                            format!("/{} kept changing type while read", shown(rel)),
                            Errno::AGAIN,
                        ))
                    }
                    Found::Gone | Found::Done => break,
                }
            }
            rel.truncate(parent_len);
        }
        Ok(())
    }

    fn entry(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        rel: &mut Vec<u8>,
        whole: bool,
    ) -> Result<Found> {
        let context = |what: &str| format!("{what} /{}", shown(rel));
        let walked = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Meta::of(&st),
            Err(Errno::NOENT) => return Ok(Found::Gone),
            Err(e) => return Err(TransferError::io(context("stat"), e)),
        };
        match walked.file_type() {
            FileType::Directory => {
                // O_DIRECTORY | O_NOFOLLOW: a symlink or anything else swapped in fails
                // here, and nothing but a directory is ever opened.
                let fd = match rustix::fs::openat(
                    dir,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT) => return Ok(Found::Gone),
                    Err(Errno::LOOP | Errno::NOTDIR) => return Ok(Found::Retry),
                    Err(e) => return Err(TransferError::io(context("open"), e)),
                };
                let meta = Meta::of(
                    &rustix::fs::fstat(&fd).map_err(|e| TransferError::io(context("stat"), e))?,
                );
                if !meta.same_inode(&walked) {
                    return Ok(Found::Retry);
                }
                self.directory(&fd, &meta, rel, whole)?;
            }
            FileType::RegularFile => {
                // O_PATH opens no device or FIFO that a swap could put here; the file
                // is opened for reading only once fstat proves it is the regular file.
                let path_fd = match rustix::fs::openat(
                    dir,
                    name,
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    Err(Errno::NOENT) => return Ok(Found::Gone),
                    Err(e) => return Err(TransferError::io(context("open"), e)),
                };
                let meta = Meta::of(
                    &rustix::fs::fstat(&path_fd)
                        .map_err(|e| TransferError::io(context("stat"), e))?,
                );
                if !meta.same_inode(&walked) || meta.file_type() != FileType::RegularFile {
                    return Ok(Found::Retry);
                }
                self.listing.push(rel.clone());
                if !self.should_send(&meta, rel, whole)? {
                    return Ok(Found::Done);
                }
                // Reopening the O_PATH fd through procfs opens that very inode.
                let file = File::from(
                    rustix::fs::open(
                        format!("/proc/self/fd/{}", path_fd.as_raw_fd()),
                        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY,
                        Mode::empty(),
                    )
                    .map_err(|e| TransferError::io(context("open"), e))?,
                );
                let xattrs = list_xattrs(&Node::Fd(file.as_fd()))
                    .map_err(|e| TransferError::io(context("xattrs of"), e))?;
                self.file_bytes += meta.size;
                self.append(
                    rel,
                    &meta,
                    tar::EntryType::Regular,
                    &xattrs,
                    None,
                    FileContent::new(&file, meta.size),
                )?;
            }
            FileType::Symlink
            | FileType::Fifo
            | FileType::CharacterDevice
            | FileType::BlockDevice => {
                // Never opened: the name in its directory fd is enough.
                let target = if walked.file_type() == FileType::Symlink {
                    match rustix::fs::readlinkat(dir, name, Vec::new()) {
                        Ok(target) => Some(target.into_bytes()),
                        Err(Errno::NOENT) => return Ok(Found::Gone),
                        Err(Errno::INVAL) => return Ok(Found::Retry),
                        Err(e) => return Err(TransferError::io(context("read link"), e)),
                    }
                } else {
                    None
                };
                self.listing.push(rel.clone());
                if !self.should_send(&walked, rel, whole)? {
                    return Ok(Found::Done);
                }
                let xattrs = match list_xattrs(&Node::NoFollow(&proc_path(dir, name))) {
                    Ok(xattrs) => xattrs,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                        self.listing.pop();
                        return Ok(Found::Gone);
                    }
                    Err(e) => return Err(TransferError::io(context("xattrs of"), e)),
                };
                let kind = match walked.file_type() {
                    FileType::Symlink => tar::EntryType::Symlink,
                    FileType::Fifo => tar::EntryType::Fifo,
                    FileType::CharacterDevice => tar::EntryType::Char,
                    _ => tar::EntryType::Block,
                };
                self.append(rel, &walked, kind, &xattrs, target.as_deref(), io::empty())?;
            }
            // A socket is made by bind, never restored (as GNU tar does); nothing else
            // exists on Linux.
            _ => return Ok(Found::Done),
        }
        Ok(Found::Done)
    }

    /// Whether a non-directory is sent, sending it as a hard link when its inode already
    /// went (in this pass, or stays at an unchanged path the importer has).
    fn should_send(&mut self, meta: &Meta, rel: &[u8], whole: bool) -> Result<bool> {
        let send = self.changed(meta, whole);
        if meta.nlink < 2 {
            return Ok(send);
        }
        let key = (meta.dev, meta.ino);
        match self.links.get(&key) {
            Some(seen) if seen.sent || send => {
                let target = seen.path.clone();
                self.append(
                    rel,
                    meta,
                    tar::EntryType::Link,
                    &[],
                    Some(&target),
                    io::empty(),
                )?;
                Ok(false)
            }
            Some(_) => Ok(false),
            None => {
                self.links.insert(
                    key,
                    LinkSeen {
                        path: rel.to_vec(),
                        sent: send,
                    },
                );
                Ok(send)
            }
        }
    }

    fn append(
        &mut self,
        rel: &[u8],
        meta: &Meta,
        kind: tar::EntryType,
        xattrs: &[(Vec<u8>, Vec<u8>)],
        link: Option<&[u8]>,
        data: impl Read,
    ) -> Result<()> {
        let name = if rel.is_empty() {
            TREE.as_bytes().to_vec()
        } else {
            child_path(TREE.as_bytes(), rel)
        };
        let link_name = match (kind, link) {
            (tar::EntryType::Link, Some(target)) => Some(child_path(TREE.as_bytes(), target)),
            (_, link) => link.map(<[u8]>::to_vec),
        };
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(meta.mode & 0o7777);
        // overlayfs makes its whiteouts (char 0:0) with the mounter's ids, host root's:
        // the same on every worker, carried as they are. Nothing else of host root's.
        let whiteout = kind == tar::EntryType::Char && meta.rdev == 0;
        let shift = |id: u32, what: &str| match id {
            HOST_ROOT if whiteout => Ok(HOST_ROOT),
            _ => self.shift(id, rel, what),
        };
        header.set_uid(u64::from(shift(meta.uid, "uid")?));
        header.set_gid(u64::from(shift(meta.gid, "gid")?));
        header.set_mtime(u64::try_from(meta.mtime.0).unwrap_or(0));
        header.set_size(if kind == tar::EntryType::Regular {
            meta.size
        } else {
            0
        });
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            let bad = |e| TransferError::io("device number", e);
            header
                .set_device_major(rustix::fs::major(meta.rdev))
                .map_err(bad)?;
            header
                .set_device_minor(rustix::fs::minor(meta.rdev))
                .map_err(bad)?;
        }
        // The header's own name is for other tools; PAX `path` and `linkpath` are the
        // exact bytes.
        if header.set_path(OsStr::from_bytes(&name)).is_err() {
            header
                .set_path(format!("{TREE}/long-name"))
                .map_err(|e| TransferError::io("entry name", e))?;
        }
        if let Some(link_name) = &link_name {
            if link_name.len() <= 100 {
                header
                    .set_link_name_literal(link_name)
                    .map_err(|e| TransferError::io("link name", e))?;
            }
        }
        header.set_cksum();

        let mtime = pax_time(meta.mtime);
        let mut records: Vec<(String, Vec<u8>)> = vec![
            pax_record("path".into(), name.clone()),
            ("mtime".into(), mtime.into_bytes()),
        ];
        if let Some(link_name) = link_name {
            records.push(pax_record("linkpath".into(), link_name));
        }
        let map = |id: u32| {
            id.checked_sub(self.pass.from_base)
                .filter(|id| *id < ID_RANGE)
                .and_then(|id| self.pass.to_base.checked_add(id))
        };
        for (xname, value) in xattrs {
            let value =
                shift_xattr_ids(xname, value, &map).ok_or_else(|| TransferError::Unsupported {
                    path: shown(rel),
                    reason: format!("xattr {} names an id outside the Machine's", shown(xname)),
                })?;
            records.push(pax_record(xattr_key(xname), value));
        }
        let write_err = |e| TransferError::io("write the stream", e);
        self.tar
            .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .map_err(write_err)?;
        self.tar.append(&header, data).map_err(|e| {
            // A read error of the file being sent, or of the stream being written: both
            // end the pass.
            TransferError::io(format!("send /{}", shown(rel)), e)
        })?;
        self.entries += 1;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Import
// ---------------------------------------------------------------------------------------

struct CountingReader<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// Hashes what tar reads, one header block behind: when tar hands out the manifest's
/// entry, the hash covers exactly the bytes before its header.
struct HashingReader<R> {
    inner: R,
    state: Rc<RefCell<HashState>>,
}

struct HashState {
    hasher: Sha256,
    held: Vec<u8>,
    hashed: u64,
}

const HEADER: usize = 512;

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut state = self.state.borrow_mut();
        state.held.extend_from_slice(&buf[..n]);
        if state.held.len() > HEADER {
            let cut = state.held.len() - HEADER;
            let HashState {
                hasher,
                held,
                hashed,
            } = &mut *state;
            hasher.update(&held[..cut]);
            *hashed += cut as u64;
            held.drain(..cut);
        }
        Ok(n)
    }
}

/// A stream being read: its tar, the compressed bytes read so far, and the hash of the
/// tar bytes.
struct Incoming<R: Read> {
    archive: tar::Archive<
        HashingReader<zstd::stream::read::Decoder<'static, io::BufReader<CountingReader<R>>>>,
    >,
    wire: Rc<Cell<u64>>,
    hash: Rc<RefCell<HashState>>,
}

fn open_incoming<R: Read>(input: R) -> Result<Incoming<R>> {
    let wire = Rc::new(Cell::new(0));
    let decoder = zstd::stream::read::Decoder::new(CountingReader {
        inner: input,
        count: wire.clone(),
    })
    .map_err(|e| TransferError::io("start the decompressor", e))?;
    let hash = Rc::new(RefCell::new(HashState {
        hasher: Sha256::new(),
        held: Vec::with_capacity(2 * HEADER),
        hashed: 0,
    }));
    let archive = tar::Archive::new(HashingReader {
        inner: decoder,
        state: hash.clone(),
    });
    Ok(Incoming {
        archive,
        wire,
        hash,
    })
}

/// Reads the manifest entry: its body, and the digest of every tar byte before it.
fn read_manifest<R: Read, T: serde::de::DeserializeOwned>(
    entry: &mut tar::Entry<'_, R>,
    hash: &RefCell<HashState>,
) -> Result<(T, String)> {
    let digest = {
        let state = hash.borrow();
        if state.hashed != entry.raw_header_position() {
            return Err(corrupt(
                "the manifest's header is not where the stream says",
            ));
        }
        format!("sha256:{}", hex::encode(state.hasher.clone().finalize()))
    };
    if entry.size() > MAX_MANIFEST {
        return Err(corrupt("the manifest is too large"));
    }
    let mut body = Vec::new();
    entry
        .take(MAX_MANIFEST)
        .read_to_end(&mut body)
        .map_err(corrupt)?;
    let parsed: T = serde_json::from_slice(&body).map_err(|e| corrupt(format!("manifest: {e}")))?;
    Ok((parsed, digest))
}

/// The rest of the tar (its end blocks) and the zstd frame's end, whose checksum the
/// decoder verifies: nothing but zeros may follow the manifest.
fn read_to_end<R: Read>(archive: tar::Archive<R>, buf: &mut [u8]) -> Result<()> {
    let mut rest = archive.into_inner();
    loop {
        let n = rest.read(buf).map_err(corrupt)?;
        if n == 0 {
            return Ok(());
        }
        if buf[..n].iter().any(|b| *b != 0) {
            return Err(corrupt("data after the end of the archive"));
        }
    }
}

fn corrupt(what: impl std::fmt::Display) -> TransferError {
    TransferError::Corrupt(what.to_string())
}

/// A tree path from the stream: `tree` or `tree/<plain components>`.
fn tree_path(name: &[u8]) -> Result<Vec<u8>> {
    let rest = match name.strip_prefix(TREE.as_bytes()) {
        Some(b"") | Some(b"/") => return Ok(Vec::new()),
        Some(rest) if rest.first() == Some(&b'/') => &rest[1..],
        _ => {
            return Err(corrupt(format!(
                "entry {} is outside the tree",
                shown(name)
            )))
        }
    };
    let rest = rest.strip_suffix(b"/").unwrap_or(rest);
    if rest.len() > MAX_PATH
        || rest.contains(&0)
        || rest
            .split(|b| *b == b'/')
            .any(|part| part.is_empty() || part == b"." || part == b"..")
    {
        return Err(corrupt(format!(
            "entry {} is not a plain path",
            shown(name)
        )));
    }
    Ok(rest.to_vec())
}

fn split_parent(rel: &[u8]) -> (&[u8], &OsStr) {
    match rel.iter().rposition(|b| *b == b'/') {
        Some(at) => (&rel[..at], OsStr::from_bytes(&rel[at + 1..])),
        None => (b"", OsStr::from_bytes(rel)),
    }
}

/// Opens a directory of the tree: resolved inside `root`, through no symlink (nor
/// procfs magic link, nor mount), whatever the earlier entries made.
fn open_in_root(root: BorrowedFd<'_>, rel: &[u8]) -> io::Result<OwnedFd> {
    let path = if rel.is_empty() {
        OsStr::new(".")
    } else {
        OsStr::from_bytes(rel)
    };
    rustix::fs::openat2(
        root,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT
            | ResolveFlags::NO_SYMLINKS
            | ResolveFlags::NO_MAGICLINKS
            | ResolveFlags::NO_XDEV,
    )
    .map_err(io::Error::from)
}

/// Removes `name` from `dir`, with everything below it; never follows a symlink.
fn remove_all(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) => {}
        Err(e) => return Err(e.into()),
    }
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for child in read_names(fd.as_fd())? {
        remove_all(fd.as_fd(), &child)?;
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(io::Error::from)
}

/// An entry's metadata as the stream gives it.
struct EntryMeta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Timespec,
    xattrs: Xattrs,
}

/// PAX's decimal seconds: before 1970 the fraction counts down from the integer part.
fn pax_time((secs, nanos): (i64, i64)) -> String {
    if secs < 0 && nanos > 0 {
        format!("-{}.{:09}", -(secs + 1), 1_000_000_000 - nanos)
    } else {
        format!("{secs}.{nanos:09}")
    }
}

fn parse_mtime(text: &[u8]) -> Option<Timespec> {
    let text = std::str::from_utf8(text).ok()?;
    let (secs, frac) = text.split_once('.').unwrap_or((text, "0"));
    let nanos: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let mut tv_sec: i64 = secs.parse().ok()?;
    let mut tv_nsec: i64 = nanos.parse().ok()?;
    // "-1.5" is half a second before -1.
    if secs.starts_with('-') && tv_nsec != 0 {
        tv_sec -= 1;
        tv_nsec = 1_000_000_000 - tv_nsec;
    }
    Some(Timespec { tv_sec, tv_nsec })
}

struct Importer {
    root: OwnedFd,
    /// The last parent directory opened, which the next entries mostly share.
    parent: Option<(Vec<u8>, OwnedFd)>,
    /// Directories' mtimes, set once everything inside them is written.
    dir_mtimes: Vec<(Vec<u8>, Timespec)>,
    buf: Vec<u8>,
    entries: u64,
    file_bytes: u64,
}

/// Applies a stream made by [`export`] to `root`, which exists (empty for a first pass,
/// or holding the earlier passes). Returns Ok only once the manifest is verified and what
/// its listing lacks is removed. Entries are written as they arrive: after an error,
/// `root` holds part of the pass (and nothing outside it), and only a full pass makes it
/// whole again.
pub fn import(root: &Path, input: impl Read) -> Result<PassSummary> {
    let started_at = now_minus_margin();
    let root_fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| TransferError::io(format!("open {}", root.display()), e))?;
    let Incoming {
        mut archive,
        wire,
        hash,
    } = open_incoming(input)?;
    let mut importer = Importer {
        root: root_fd,
        parent: None,
        dir_mtimes: Vec::new(),
        buf: vec![0; BUF],
        entries: 0,
        file_bytes: 0,
    };
    let mut manifest: Option<(Manifest, String)> = None;
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        if manifest.is_some() {
            return Err(corrupt("an entry follows the manifest"));
        }
        let records = pax_records(&mut entry)?;
        let record = |key: &[u8]| {
            records
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let name = record(b"path").unwrap_or_else(|| entry.path_bytes().into_owned());
        let link = record(b"linkpath").or_else(|| entry.link_name_bytes().map(|l| l.into_owned()));
        if name == MANIFEST.as_bytes() {
            manifest = Some(read_manifest(&mut entry, &hash)?);
            continue;
        }
        let rel = tree_path(&name)?;
        importer.entry(&mut entry, &rel, &records, link)?;
    }
    let Some((manifest, digest)) = manifest else {
        return Err(corrupt("the stream ends before its manifest (truncated)"));
    };
    if manifest.format != FORMAT {
        return Err(corrupt(format!("unknown format {}", manifest.format)));
    }
    if manifest.digest != digest {
        return Err(corrupt(format!(
            "digest {digest} is not the manifest's {}",
            manifest.digest
        )));
    }
    if manifest.entries != importer.entries || manifest.file_bytes != importer.file_bytes {
        return Err(corrupt("the entry count or size is not the manifest's"));
    }
    read_to_end(archive, &mut importer.buf)?;
    let mut listing = HashSet::with_capacity(manifest.paths.len());
    for path in &manifest.paths {
        let path = decode_path(path).ok_or_else(|| corrupt("a bad path in the listing"))?;
        if !listing.insert(path) {
            return Err(corrupt("a path listed twice"));
        }
    }
    drop(manifest);
    importer.parent = None;
    let found = importer.prune(&listing)?;
    if found != listing.len() {
        return Err(corrupt(format!(
            "{} listed paths are missing after the pass",
            listing.len() - found
        )));
    }
    importer.set_dir_mtimes()?;
    rustix::fs::syncfs(&importer.root).map_err(|e| TransferError::io("sync", e))?;
    Ok(PassSummary {
        entries: importer.entries,
        file_bytes: importer.file_bytes,
        stream_bytes: wire.get(),
        digest,
        started_at,
        dirs: DirIndex::default(),
    })
}

impl Importer {
    fn parent_of(&mut self, rel: &[u8]) -> Result<BorrowedFd<'_>> {
        let (parent, _) = split_parent(rel);
        let cached = matches!(&self.parent, Some((path, _)) if path.as_slice() == parent);
        if !cached {
            let fd =
                open_in_root(self.root.as_fd(), parent).map_err(|e| match e.raw_os_error() {
                    Some(
                        libc::ENOENT
                        | libc::ENOTDIR
                        | libc::ELOOP
                        | libc::EXDEV
                        | libc::ENAMETOOLONG,
                    ) => corrupt(format!(
                        "/{} is not a directory inside the tree ({e})",
                        shown(parent)
                    )),
                    _ => TransferError::io(format!("open /{}", shown(parent)), e),
                })?;
            self.parent = Some((parent.to_vec(), fd));
        }
        match &self.parent {
            Some((_, fd)) => Ok(fd.as_fd()),
            None => Err(corrupt("no parent")),
        }
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        rel: &[u8],
        records: &[(Vec<u8>, Vec<u8>)],
        link: Option<Vec<u8>>,
    ) -> Result<()> {
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().map_err(corrupt)? & 0o7777;
        // u32::MAX is chown's "no change".
        let id = |id: io::Result<u64>| {
            id.map_err(corrupt).and_then(|id| {
                u32::try_from(id)
                    .ok()
                    .filter(|id| *id != u32::MAX)
                    .ok_or_else(|| corrupt("an id that is not a 32-bit id"))
            })
        };
        let uid = id(header.uid())?;
        let gid = id(header.gid())?;
        let header_mtime = header.mtime().map_err(corrupt)?;
        let device = if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            (
                header.device_major().map_err(corrupt)?.unwrap_or(0),
                header.device_minor().map_err(corrupt)?.unwrap_or(0),
            )
        } else {
            (0, 0)
        };
        let size = entry.size();
        let mut mtime = Timespec {
            tv_sec: i64::try_from(header_mtime).unwrap_or(0),
            tv_nsec: 0,
        };
        let mut xattrs = Vec::new();
        for (key, value) in records {
            if key == b"mtime" {
                mtime = parse_mtime(value).ok_or_else(|| corrupt("a bad mtime"))?;
            } else if let Some(name) = xattr_name(key) {
                xattrs.push((name, value.clone()));
            }
        }
        let meta = EntryMeta {
            mode,
            uid,
            gid,
            mtime,
            xattrs,
        };
        let shown_rel = shown(rel);
        let at = |what: &str| format!("{what} /{shown_rel}");
        let (_, name) = split_parent(rel);
        let name = name.to_os_string();

        if rel.is_empty() {
            return match kind {
                tar::EntryType::Directory => {
                    let root = rustix::fs::openat(
                        &self.root,
                        ".",
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| TransferError::io("open the root", e))?;
                    self.dir_meta(&root, rel, &meta, true)?;
                    self.entries += 1;
                    Ok(())
                }
                _ => Err(corrupt("the tree's root is not a directory")),
            };
        }

        match kind {
            tar::EntryType::Directory => {
                let parent = self.parent_of(rel)?;
                let existed = match rustix::fs::statat(parent, &name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => true,
                    Ok(_) => {
                        remove_all(parent, &name)
                            .map_err(|e| TransferError::io(at("replace"), e))?;
                        false
                    }
                    Err(Errno::NOENT) => false,
                    Err(e) => return Err(TransferError::io(at("stat"), e)),
                };
                if !existed {
                    rustix::fs::mkdirat(parent, &name, Mode::from_raw_mode(0o700))
                        .map_err(|e| TransferError::io(at("make"), e))?;
                }
                let fd = rustix::fs::openat(
                    parent,
                    &name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| TransferError::io(at("open"), e))?;
                self.dir_meta(&fd, rel, &meta, existed)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let parent = self.parent_of(rel)?;
                remove_all(parent, &name).map_err(|e| TransferError::io(at("replace"), e))?;
                let fd = rustix::fs::openat(
                    parent,
                    &name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| TransferError::io(at("create"), e))?;
                let file = File::from(fd);
                let written = write_sparse(entry, &file, 0, &mut self.buf, &shown_rel)?;
                if written != size {
                    return Err(corrupt(format!("/{shown_rel} ends early (truncated)")));
                }
                file.set_len(size)
                    .map_err(|e| TransferError::io(at("size"), e))?;
                self.file_bytes += size;
                let node = Node::Fd(file.as_fd());
                rustix::fs::fchown(&file, Some(uid_of(meta.uid)), Some(gid_of(meta.gid)))
                    .map_err(|e| TransferError::io(at("chown"), e))?;
                // After chown, which clears set-id bits.
                rustix::fs::fchmod(&file, Mode::from_raw_mode(meta.mode))
                    .map_err(|e| TransferError::io(at("chmod"), e))?;
                set_xattrs(&node, &meta.xattrs, false)
                    .map_err(|e| TransferError::io(at("set xattrs on"), e))?;
                rustix::fs::futimens(&file, &times(meta.mtime))
                    .map_err(|e| TransferError::io(at("set times on"), e))?;
            }
            tar::EntryType::Link => {
                let target =
                    link.ok_or_else(|| corrupt(format!("/{shown_rel}: a link without a target")))?;
                let target = tree_path(&target)?;
                if target.is_empty() {
                    return Err(corrupt(format!("/{shown_rel} links to the root")));
                }
                let (_, target_name) = split_parent(&target);
                let target_name = target_name.to_os_string();
                let target_dir = {
                    let (target_parent, _) = split_parent(&target);
                    open_in_root(self.root.as_fd(), target_parent).map_err(|e| {
                        corrupt(format!("/{shown_rel} links to {} ({e})", shown(&target)))
                    })?
                };
                let parent = self.parent_of(rel)?;
                remove_all(parent, &name).map_err(|e| TransferError::io(at("replace"), e))?;
                // linkat without AT_SYMLINK_FOLLOW links a symlink itself, never its target.
                rustix::fs::linkat(&target_dir, &target_name, parent, &name, AtFlags::empty())
                    .map_err(|e| match e {
                        Errno::NOENT | Errno::PERM | Errno::XDEV => {
                            corrupt(format!("/{shown_rel} links to {} ({e})", shown(&target)))
                        }
                        e => TransferError::io(at("link"), e),
                    })?;
            }
            tar::EntryType::Symlink
            | tar::EntryType::Fifo
            | tar::EntryType::Char
            | tar::EntryType::Block => {
                let parent = self.parent_of(rel)?;
                remove_all(parent, &name).map_err(|e| TransferError::io(at("replace"), e))?;
                match kind {
                    tar::EntryType::Symlink => {
                        let target = link.ok_or_else(|| {
                            corrupt(format!("/{shown_rel}: a symlink without a target"))
                        })?;
                        if target.is_empty() || target.contains(&0) {
                            return Err(corrupt(format!("/{shown_rel}: a bad symlink target")));
                        }
                        rustix::fs::symlinkat(OsStr::from_bytes(&target), parent, &name)
                            .map_err(|e| TransferError::io(at("make"), e))?;
                    }
                    _ => {
                        let file_type = match kind {
                            tar::EntryType::Fifo => FileType::Fifo,
                            tar::EntryType::Char => FileType::CharacterDevice,
                            _ => FileType::BlockDevice,
                        };
                        rustix::fs::mknodat(
                            parent,
                            &name,
                            file_type,
                            Mode::from_raw_mode(0o600),
                            rustix::fs::makedev(device.0, device.1),
                        )
                        .map_err(|e| TransferError::io(at("make"), e))?;
                    }
                }
                rustix::fs::chownat(
                    parent,
                    &name,
                    Some(uid_of(meta.uid)),
                    Some(gid_of(meta.gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| TransferError::io(at("chown"), e))?;
                if kind != tar::EntryType::Symlink {
                    // An O_PATH fd opens no device; chmod through its procfs link
                    // reaches exactly that node.
                    let node = rustix::fs::openat(
                        parent,
                        &name,
                        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| TransferError::io(at("open"), e))?;
                    std::fs::set_permissions(
                        format!("/proc/self/fd/{}", node.as_raw_fd()),
                        std::fs::Permissions::from_mode(meta.mode),
                    )
                    .map_err(|e| TransferError::io(at("chmod"), e))?;
                }
                let path = proc_path(parent, &name);
                set_xattrs(&Node::NoFollow(&path), &meta.xattrs, false)
                    .map_err(|e| TransferError::io(at("set xattrs on"), e))?;
                rustix::fs::utimensat(parent, &name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| TransferError::io(at("set times on"), e))?;
            }
            other => {
                return Err(corrupt(format!(
                    "/{shown_rel}: unexpected entry type {other:?}"
                )))
            }
        }
        self.entries += 1;
        Ok(())
    }

    fn dir_meta(
        &mut self,
        fd: &OwnedFd,
        rel: &[u8],
        meta: &EntryMeta,
        existed: bool,
    ) -> Result<()> {
        let at = |what: &str| format!("{what} /{}", shown(rel));
        rustix::fs::fchown(fd, Some(uid_of(meta.uid)), Some(gid_of(meta.gid)))
            .map_err(|e| TransferError::io(at("chown"), e))?;
        rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode))
            .map_err(|e| TransferError::io(at("chmod"), e))?;
        set_xattrs(&Node::Fd(fd.as_fd()), &meta.xattrs, existed)
            .map_err(|e| TransferError::io(at("set xattrs on"), e))?;
        self.dir_mtimes.push((rel.to_vec(), meta.mtime));
        Ok(())
    }

    /// Removes what the listing does not have, and counts the listed paths found.
    fn prune(&self, listing: &HashSet<Vec<u8>>) -> Result<usize> {
        let root = rustix::fs::openat(
            &self.root,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| TransferError::io("open the root", e))?;
        let mut found = 0;
        prune_dir(&root, &mut Vec::new(), listing, &mut found)?;
        Ok(found)
    }

    fn set_dir_mtimes(&self) -> Result<()> {
        for (rel, mtime) in &self.dir_mtimes {
            let fd = match open_in_root(self.root.as_fd(), rel) {
                Ok(fd) => fd,
                // Replaced by a later entry of the same pass.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(TransferError::io(format!("open /{}", shown(rel)), e)),
            };
            rustix::fs::futimens(&fd, &times(*mtime))
                .map_err(|e| TransferError::io(format!("set times on /{}", shown(rel)), e))?;
        }
        Ok(())
    }
}

fn prune_dir(
    dir: &OwnedFd,
    rel: &mut Vec<u8>,
    listing: &HashSet<Vec<u8>>,
    found: &mut usize,
) -> Result<()> {
    let names = read_names(dir.as_fd())
        .map_err(|e| TransferError::io(format!("list /{}", shown(rel)), e))?;
    for name in names {
        let parent_len = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(name.as_bytes());
        if !listing.contains(rel.as_slice()) {
            remove_all(dir.as_fd(), &name)
                .map_err(|e| TransferError::io(format!("remove /{}", shown(rel)), e))?;
        } else {
            *found += 1;
            match rustix::fs::openat(
                dir,
                &name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(child) => prune_dir(&child, rel, listing, found)?,
                Err(Errno::NOTDIR | Errno::LOOP) => {}
                Err(e) => return Err(TransferError::io(format!("open /{}", shown(rel)), e)),
            }
        }
        rel.truncate(parent_len);
    }
    Ok(())
}

fn uid_of(id: u32) -> rustix::fs::Uid {
    // SAFETY: never -1 (chown's "no change"): the importer refuses that id, and the
    // exporter cannot send it (it is outside every Machine's range).
    unsafe { rustix::fs::Uid::from_raw(id) }
}

fn gid_of(id: u32) -> rustix::fs::Gid {
    // SAFETY: as for `uid_of`.
    unsafe { rustix::fs::Gid::from_raw(id) }
}

fn times(mtime: Timespec) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        last_modification: mtime,
    }
}

/// Sets `xattrs`; with `clear`, first removes those the node has and the list lacks (a
/// directory kept from an earlier pass).
fn set_xattrs(node: &Node<'_>, xattrs: &Xattrs, clear: bool) -> io::Result<()> {
    if clear {
        for (name, _) in list_xattrs(node)? {
            if !xattrs.iter().any(|(n, _)| *n == name) {
                remove_xattr(node, &name)?;
            }
        }
    }
    for (name, value) in xattrs {
        set_xattr(node, name, value)?;
    }
    Ok(())
}

/// Copies an entry's content into a file at `base` (where the file is a hole: new, or
/// punched), seeking over all-zero blocks so holes stay holes. Returns the bytes read
/// from the entry.
fn write_sparse(
    entry: &mut impl Read,
    file: &File,
    base: u64,
    buf: &mut [u8],
    shown_rel: &str,
) -> Result<u64> {
    let mut offset = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match entry.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(corrupt(format!("/{shown_rel}: {e}"))),
            }
        }
        let mut at = 0;
        while at < filled {
            let end = (at + BLOCK).min(filled);
            if is_zero(&buf[at..end]) {
                at = end;
                continue;
            }
            // A run of blocks with data, written at once.
            let mut run_end = end;
            while run_end < filled {
                let next = (run_end + BLOCK).min(filled);
                if is_zero(&buf[run_end..next]) {
                    break;
                }
                run_end = next;
            }
            file.write_all_at(&buf[at..run_end], base + offset + at as u64)
                .map_err(|e| TransferError::io(format!("write /{shown_rel}"), e))?;
            at = run_end;
        }
        offset += filled as u64;
        if filled < buf.len() {
            return Ok(offset);
        }
    }
}

fn is_zero(block: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // SAFETY: u64 has no invalid bit patterns; align_to hands back the unaligned ends
        // as bytes.
        unsafe { block.align_to::<u64>() }
    };
    prefix.iter().all(|b| *b == 0)
        && words.iter().all(|w| *w == 0)
        && suffix.iter().all(|b| *b == 0)
}

// ---------------------------------------------------------------------------------------
// Digest of a tree, for comparing two
// ---------------------------------------------------------------------------------------

/// A digest of everything a transfer must keep, with ids relative to `base`: each path's
/// type, mode, owners, size, content, link target, device number, xattrs (ids inside
/// ACLs and capabilities relative too), mtime, and which paths share an inode. Walks like
/// the exporter, so it never leaves `root`. Same tree, same digest, whatever its base.
/// An id as the digest records it: relative to the Machine's base, host root as itself
/// (marked so that it cannot equal an id inside the range).
fn relative_id(id: u32, base: u32) -> u64 {
    if id == HOST_ROOT {
        1 << 32
    } else {
        u64::from(id.wrapping_sub(base))
    }
}

pub fn tree_digest(root: &Path, base: u32) -> io::Result<String> {
    let root_fd = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut hasher = Sha256::new();
    let mut inodes = HashMap::new();
    let meta = Meta::of(&rustix::fs::fstat(&root_fd)?);
    let xattrs = list_xattrs(&Node::Fd(root_fd.as_fd()))?;
    digest_entry(
        &mut hasher,
        b"",
        &meta,
        base,
        &xattrs,
        None,
        None,
        &mut inodes,
    );
    digest_dir(&mut hasher, &root_fd, &mut Vec::new(), base, &mut inodes)?;
    // Inodes with several names in the tree (a link held outside it, as overlayfs's
    // shared whiteout in its workdir, does not count).
    let mut groups: Vec<Vec<Vec<u8>>> = inodes
        .into_values()
        .filter(|paths| paths.len() > 1)
        .collect();
    groups.sort();
    for group in groups {
        hasher.update(b"same-inode");
        for path in group {
            hasher.update((path.len() as u64).to_le_bytes());
            hasher.update(&path);
        }
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

fn digest_dir(
    hasher: &mut Sha256,
    dir: &OwnedFd,
    rel: &mut Vec<u8>,
    base: u32,
    inodes: &mut HashMap<(u64, u64), Vec<Vec<u8>>>,
) -> io::Result<()> {
    for name in read_names(dir.as_fd())? {
        let parent_len = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(name.as_bytes());
        let meta = Meta::of(&rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW)?);
        match meta.file_type() {
            FileType::Directory => {
                let fd = rustix::fs::openat(
                    dir,
                    &name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                let xattrs = list_xattrs(&Node::Fd(fd.as_fd()))?;
                digest_entry(hasher, rel, &meta, base, &xattrs, None, None, inodes);
                digest_dir(hasher, &fd, rel, base, inodes)?;
            }
            FileType::RegularFile => {
                let path_fd = rustix::fs::openat(
                    dir,
                    &name,
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                let opened = Meta::of(&rustix::fs::fstat(&path_fd)?);
                if !opened.same_inode(&meta) || opened.file_type() != FileType::RegularFile {
                    return Err(io::Error::other(format!(
                        "/{} changed while read",
                        shown(rel)
                    )));
                }
                let file = File::from(rustix::fs::open(
                    format!("/proc/self/fd/{}", path_fd.as_raw_fd()),
                    OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY,
                    Mode::empty(),
                )?);
                let mut content = Sha256::new();
                let mut reader = FileContent::new(&file, meta.size);
                io::copy(&mut reader, &mut content)?;
                let xattrs = list_xattrs(&Node::Fd(file.as_fd()))?;
                digest_entry(
                    hasher,
                    rel,
                    &meta,
                    base,
                    &xattrs,
                    Some(&content.finalize()),
                    None,
                    inodes,
                );
            }
            _ => {
                let target = if meta.file_type() == FileType::Symlink {
                    Some(rustix::fs::readlinkat(dir, &name, Vec::new())?.into_bytes())
                } else {
                    None
                };
                let xattrs = list_xattrs(&Node::NoFollow(&proc_path(dir.as_fd(), &name)))?;
                digest_entry(
                    hasher,
                    rel,
                    &meta,
                    base,
                    &xattrs,
                    None,
                    target.as_deref(),
                    inodes,
                );
            }
        }
        rel.truncate(parent_len);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn digest_entry(
    hasher: &mut Sha256,
    rel: &[u8],
    meta: &Meta,
    base: u32,
    xattrs: &Xattrs,
    content: Option<&[u8]>,
    target: Option<&[u8]>,
    inodes: &mut HashMap<(u64, u64), Vec<Vec<u8>>>,
) {
    let mut field = |tag: &str, bytes: &[u8]| {
        hasher.update(tag.as_bytes());
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    field("path", rel);
    field("mode", &meta.mode.to_le_bytes());
    field("uid", &relative_id(meta.uid, base).to_le_bytes());
    field("gid", &relative_id(meta.gid, base).to_le_bytes());
    field(
        "mtime",
        format!("{}.{:09}", meta.mtime.0, meta.mtime.1).as_bytes(),
    );
    match meta.file_type() {
        FileType::Directory => {}
        FileType::RegularFile => field("size", &meta.size.to_le_bytes()),
        FileType::CharacterDevice | FileType::BlockDevice => {
            field("rdev", &meta.rdev.to_le_bytes())
        }
        _ => {}
    }
    if let Some(content) = content {
        field("content", content);
    }
    if let Some(target) = target {
        field("target", target);
    }
    let relative = |id: u32| Some(id.wrapping_sub(base));
    for (name, value) in xattrs {
        field("xattr", name);
        let value = shift_xattr_ids(name, value, &relative).unwrap_or_else(|| value.clone());
        field("value", &value);
    }
    if meta.file_type() != FileType::Directory && meta.nlink > 1 {
        inodes
            .entry((meta.dev, meta.ino))
            .or_default()
            .push(rel.to_vec());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt};

    const FROM: u32 = 0x1000_0000 + 5 * ID_RANGE;
    /// A change to a tree.
    type Change = Box<dyn Fn(&Path)>;
    /// A hand-made entry: type, PAX path, PAX linkpath, content.
    type HandEntry<'a> = (tar::EntryType, &'a [u8], Option<&'a [u8]>, &'a [u8]);
    const TO: u32 = 0x1000_0000 + 9 * ID_RANGE;

    fn full() -> ExportPass {
        ExportPass {
            from_base: FROM,
            to_base: TO,
            ..ExportPass::default()
        }
    }

    fn chown(path: &Path, id: u32) {
        std::os::unix::fs::lchown(path, Some(id), Some(id)).unwrap();
    }

    fn set_mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn xattr(path: &Path, name: &str, value: &[u8]) {
        rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty()).unwrap();
    }

    fn mknod(path: &Path, file_type: FileType, major: u32, minor: u32) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            file_type,
            Mode::from_raw_mode(0o644),
            rustix::fs::makedev(major, minor),
        )
        .unwrap();
    }

    fn set_mtime(path: &Path, secs: i64, nanos: i64) {
        rustix::fs::utimensat(
            rustix::fs::CWD,
            path,
            &times(Timespec {
                tv_sec: secs,
                tv_nsec: nanos,
            }),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
    }

    /// Everything a Machine's upperdir may hold.
    fn build_tree(root: &Path, big: usize) {
        chown(root, FROM);
        let p = |rel: &str| root.join(rel);
        // Partly compressible content, so zstd has work to do.
        let content: Vec<u8> = (0..big)
            .map(|i| ((i * 7919) >> 5) as u8 ^ (i % 251) as u8)
            .collect();
        std::fs::write(p("big"), &content).unwrap();
        chown(&p("big"), FROM);
        let sparse = File::create(p("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        sparse.write_all_at(b"hello", 0).unwrap();
        sparse.write_all_at(b"middle", 512 << 20).unwrap();
        drop(sparse);
        chown(&p("sparse"), FROM);
        std::fs::write(p("pair-a"), b"shared inode").unwrap();
        std::fs::hard_link(p("pair-a"), p("pair-b")).unwrap();
        chown(&p("pair-a"), FROM + 1000);
        symlink("/etc/passwd", p("passwd-link")).unwrap();
        chown(&p("passwd-link"), FROM);
        symlink("nowhere/../at//all", p("dangling")).unwrap();
        chown(&p("dangling"), FROM + 1000);
        xattr(&p("dangling"), "trusted.symlink-note", b"on a link");
        mknod(&p("fifo"), FileType::Fifo, 0, 0);
        mknod(&p("null"), FileType::CharacterDevice, 1, 3);
        mknod(&p("loop9"), FileType::BlockDevice, 7, 9);
        chown(&p("fifo"), FROM);
        chown(&p("null"), FROM);
        chown(&p("loop9"), FROM);
        std::fs::create_dir_all(p("etc/deep")).unwrap();
        chown(&p("etc"), FROM);
        chown(&p("etc/deep"), FROM);
        // A whiteout: the image's /etc/hosts is deleted.
        mknod(&p("etc/hosts"), FileType::CharacterDevice, 0, 0);
        chown(&p("etc/hosts"), FROM);
        // And overlayfs's xattr whiteout, a regular file.
        std::fs::write(p("etc/xwhiteout"), b"").unwrap();
        chown(&p("etc/xwhiteout"), FROM);
        xattr(&p("etc/xwhiteout"), "trusted.overlay.whiteout", b"");
        std::fs::create_dir(p("opaque")).unwrap();
        chown(&p("opaque"), FROM);
        xattr(&p("opaque"), "trusted.overlay.opaque", b"y");
        std::fs::write(p("opaque/inside"), b"x").unwrap();
        chown(&p("opaque/inside"), FROM + 1000);
        std::fs::write(p("etc/deep/noted"), b"with xattrs").unwrap();
        chown(&p("etc/deep/noted"), FROM);
        xattr(
            &p("etc/deep/noted"),
            "user.note",
            b"value with = and \n inside",
        );
        xattr(&p("etc/deep/noted"), "user.odd=name", b"1");
        xattr(&p("etc/deep/noted"), "security.test-label", b"label");
        std::fs::write(p("setuid"), b"#!/bin/sh\n").unwrap();
        chown(&p("setuid"), FROM + 1000);
        set_mode(&p("setuid"), 0o4755);
        std::fs::write(p("setgid"), b"").unwrap();
        chown(&p("setgid"), FROM);
        set_mode(&p("setgid"), 0o2710);
        std::fs::create_dir(p("sticky")).unwrap();
        chown(&p("sticky"), FROM);
        set_mode(&p("sticky"), 0o1777);
        let odd = OsStr::from_bytes(b"odd \n name \xff%41");
        std::fs::write(root.join(odd), b"odd").unwrap();
        chown(&root.join(odd), FROM);
        let long = "d".repeat(120);
        std::fs::create_dir_all(p(&format!("{long}/{long}"))).unwrap();
        chown(&p(&long), FROM);
        chown(&p(&format!("{long}/{long}")), FROM);
        symlink("t".repeat(200), p(&format!("{long}/{long}/long-target"))).unwrap();
        chown(&p(&format!("{long}/{long}/long-target")), FROM);
        std::fs::create_dir(p("readonly")).unwrap();
        std::fs::write(p("readonly/file"), b"r").unwrap();
        chown(&p("readonly/file"), FROM);
        chown(&p("readonly"), FROM);
        set_mode(&p("readonly"), 0o555);
        set_mtime(&p("etc/deep/noted"), 1_600_000_000, 123_456_789);
        set_mtime(&p("dangling"), 1_500_000_000, 5);
        set_mtime(&p("fifo"), -100, 250_000_000);
        // Directory mtimes last, as a Machine would leave them.
        for dir in ["etc/deep", "etc", "opaque", "readonly", ""] {
            set_mtime(&p(dir), 1_700_000_000, 999_999_999);
        }
    }

    fn roundtrip(src: &Path, dst: &Path, pass: &ExportPass) -> (PassSummary, PassSummary) {
        let mut stream = Vec::new();
        let sent = export(src, pass, &mut stream).unwrap();
        assert_eq!(sent.stream_bytes, stream.len() as u64);
        let got = import(dst, stream.as_slice()).unwrap();
        (sent, got)
    }

    fn tar_bytes(stream: &[u8]) -> Vec<u8> {
        zstd::decode_all(stream).unwrap()
    }

    fn compress(tar: &[u8]) -> Vec<u8> {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        encoder.include_checksum(true).unwrap();
        encoder.write_all(tar).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn a_full_pass_copies_the_tree_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        build_tree(&src, 8 << 20);
        let (sent, got) = roundtrip(&src, &dst, &full());

        assert_eq!(
            tree_digest(&src, FROM).unwrap(),
            tree_digest(&dst, TO).unwrap()
        );
        assert_eq!(
            (sent.entries, sent.file_bytes, &sent.digest),
            (got.entries, got.file_bytes, &got.digest)
        );
        assert_eq!(sent.stream_bytes, got.stream_bytes);
        assert!(
            sent.file_bytes > (1 << 30),
            "the sparse file's holes count as content"
        );
        // The 1 GiB of holes stay holes.
        let sparse = std::fs::metadata(dst.join("sparse")).unwrap();
        assert_eq!(sparse.len(), 1 << 30);
        assert!(
            sparse.blocks() * 512 < (1 << 20),
            "{} blocks",
            sparse.blocks()
        );
        assert_eq!(std::fs::read(dst.join("sparse")).unwrap()[..5], *b"hello");
        // One inode again, owned in the destination's range, set-id bits kept.
        let (a, b) = (
            std::fs::metadata(dst.join("pair-a")).unwrap(),
            std::fs::metadata(dst.join("pair-b")).unwrap(),
        );
        assert_eq!((a.ino(), a.nlink(), a.uid()), (b.ino(), 2, TO + 1000));
        let setuid = std::fs::metadata(dst.join("setuid")).unwrap();
        assert_eq!((setuid.mode() & 0o7777, setuid.uid()), (0o4755, TO + 1000));
        let hosts = std::fs::symlink_metadata(dst.join("etc/hosts")).unwrap();
        assert_eq!(
            (hosts.mode() & libc::S_IFMT, hosts.rdev()),
            (libc::S_IFCHR, 0)
        );
        assert_eq!(
            std::fs::read_link(dst.join("passwd-link")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(
            std::fs::read_link(dst.join("dangling")).unwrap(),
            Path::new("nowhere/../at//all"),
            "the target's bytes, not a normalized path"
        );
        let opaque =
            rustix::fs::lgetxattr(dst.join("opaque"), "trusted.overlay.opaque", &mut [0u8; 8]);
        assert_eq!(opaque, Ok(1));
        let noted = std::fs::metadata(dst.join("etc/deep/noted")).unwrap();
        assert_eq!(
            (noted.mtime(), noted.mtime_nsec()),
            (1_600_000_000, 123_456_789)
        );
        let root = std::fs::metadata(&dst).unwrap();
        assert_eq!((root.uid(), root.mtime_nsec()), (TO, 999_999_999));

        // Again into the same root: nothing changes (entries are replaced, not doubled).
        let _ = roundtrip(&src, &dst, &full());
        assert_eq!(
            tree_digest(&src, FROM).unwrap(),
            tree_digest(&dst, TO).unwrap()
        );
    }

    #[test]
    fn the_digest_sees_every_attribute() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("t");
        std::fs::create_dir(&root).unwrap();
        build_tree(&root, 1 << 16);
        let mut seen = HashSet::new();
        seen.insert(tree_digest(&root, FROM).unwrap());
        let changes: Vec<Change> = vec![
            Box::new(|r| std::fs::write(r.join("big"), b"other").unwrap()),
            Box::new(|r| set_mtime(&r.join("etc/deep/noted"), 1_600_000_000, 1)),
            Box::new(|r| set_mode(&r.join("setuid"), 0o755)),
            Box::new(|r| chown(&r.join("pair-a"), FROM + 1)),
            Box::new(|r| xattr(&r.join("etc/deep/noted"), "user.note", b"changed")),
            Box::new(|r| {
                std::fs::remove_file(r.join("dangling")).unwrap();
                symlink("elsewhere", r.join("dangling")).unwrap();
            }),
            Box::new(|r| {
                std::fs::remove_file(r.join("null")).unwrap();
                mknod(&r.join("null"), FileType::CharacterDevice, 1, 5);
            }),
            Box::new(|r| {
                std::fs::remove_file(r.join("pair-b")).unwrap();
                std::fs::write(r.join("pair-b"), b"shared inode").unwrap();
            }),
            Box::new(|r| std::fs::rename(r.join("fifo"), r.join("fifo2")).unwrap()),
        ];
        for change in changes {
            change(&root);
            // Keep the directory mtimes out of it: each change must show on its own.
            for dir in ["etc/deep", "etc", ""] {
                set_mtime(&root.join(dir), 1_700_000_000, 999_999_999);
            }
            assert!(
                seen.insert(tree_digest(&root, FROM).unwrap()),
                "{} changes",
                seen.len()
            );
        }
        // And ids count relative to the base.
        assert_ne!(
            tree_digest(&root, FROM).unwrap(),
            tree_digest(&root, TO).unwrap()
        );
    }

    /// True when nothing but `root` is in `parent`.
    fn only_root_in(parent: &Path) -> bool {
        let names: Vec<_> = std::fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names == [OsString::from("root")]
    }

    #[test]
    fn truncated_and_corrupted_streams_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        build_tree(&src, 1 << 20);
        let mut stream = Vec::new();
        export(&src, &full(), &mut stream).unwrap();

        let try_import = |bytes: &[u8]| {
            let parent = tempfile::tempdir().unwrap();
            let root = parent.path().join("root");
            std::fs::create_dir(&root).unwrap();
            let result = import(&root, bytes);
            assert!(only_root_in(parent.path()));
            result
        };
        for cut in [
            0,
            1,
            17,
            stream.len() / 3,
            stream.len() / 2,
            stream.len() - 40,
            stream.len() - 1,
        ] {
            let error = try_import(&stream[..cut]).unwrap_err();
            assert_eq!(error.code(), "corrupt_stream", "cut at {cut}: {error}");
        }
        // A flipped byte of the compressed stream (zstd's checksum or the tar itself).
        for at in [stream.len() / 4, stream.len() / 2, stream.len() - 10] {
            let mut flipped = stream.clone();
            flipped[at] ^= 0x20;
            assert_eq!(
                try_import(&flipped).unwrap_err().code(),
                "corrupt_stream",
                "flip at {at}"
            );
        }
        // A flipped byte of file content inside a well-formed zstd frame: only the
        // manifest's digest can tell.
        let mut tar = tar_bytes(&stream);
        let at = tar
            .windows(16)
            .position(|w| w == b"shared inode\0\0\0\0")
            .unwrap();
        tar[at] ^= 0x01;
        let error = try_import(&compress(&tar)).unwrap_err();
        assert!(error.to_string().contains("digest"), "{error}");
        assert!(try_import(&stream).is_ok());
    }

    /// A tar stream built by hand, with a correct manifest listing `paths`.
    fn hand_stream(entries: &[HandEntry<'_>], paths: &[&str]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        for (kind, name, link, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_mode(0o755);
            header.set_uid(u64::from(TO));
            header.set_gid(u64::from(TO));
            header.set_size(data.len() as u64);
            header.set_path("x").unwrap();
            header.set_cksum();
            let mut records = vec![("path", *name)];
            if let Some(link) = link {
                records.push(("linkpath", *link));
            }
            tar.append_pax_extensions(records).unwrap();
            tar.append(&header, *data).unwrap();
        }
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(tar.get_ref())));
        let manifest = Manifest {
            format: FORMAT,
            digest,
            entries: entries.len() as u64,
            file_bytes: entries.iter().map(|e| e.3.len() as u64).sum(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
        };
        let body = serde_json::to_vec(&manifest).unwrap();
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        tar.append_data(&mut header, MANIFEST, body.as_slice())
            .unwrap();
        compress(&tar.into_inner().unwrap())
    }

    /// Names in a stream never reach outside the root. Shown to fail without the
    /// protection: with `open_in_root`'s RESOLVE_* flags dropped, case 2 (`link -> /`,
    /// then `link/tmp/…`) wrote `/tmp/<outside>`; with `tree_path`'s `..` check dropped
    /// as well, case 0 wrote beside the root (either one alone stops `..`).
    #[test]
    fn hostile_names_write_nothing_outside_the_root() {
        use tar::EntryType::{Directory, Link, Regular, Symlink};
        let outside = format!("berth-transfer-outside-{}", std::process::id());
        let tmp_outside = Path::new("/tmp").join(&outside);
        let dir: HandEntry<'_> = (Directory, b"tree", None, b"");
        let escape_parent = format!("tree/../{outside}");
        let abs = format!("/tmp/{outside}");
        let via_root_link = format!("tree/link/tmp/{outside}");
        let via_up_link = format!("tree/up/{outside}");
        let hard_target = "tree/../../../etc/passwd".to_string();
        let cases: Vec<Vec<HandEntry<'_>>> = vec![
            vec![dir, (Regular, escape_parent.as_bytes(), None, b"x")],
            vec![dir, (Regular, abs.as_bytes(), None, b"x")],
            vec![
                dir,
                (Symlink, b"tree/link", Some(b"/"), b""),
                (Regular, via_root_link.as_bytes(), None, b"x"),
            ],
            vec![
                dir,
                (Symlink, b"tree/up", Some(b".."), b""),
                (Regular, via_up_link.as_bytes(), None, b"x"),
            ],
            vec![
                dir,
                (Symlink, b"tree/link", Some(b"/tmp"), b""),
                (Directory, via_root_link.as_bytes(), None, b""),
            ],
            vec![dir, (Link, b"tree/hard", Some(hard_target.as_bytes()), b"")],
            vec![
                dir,
                (Symlink, b"tree/link", Some(b"/etc"), b""),
                (Link, b"tree/hard", Some(b"tree/link/passwd"), b""),
            ],
            vec![dir, (Regular, b"tree/a\0b", None, b"x")],
            vec![dir, (Regular, b"tree/./a", None, b"x")],
        ];
        for (i, entries) in cases.iter().enumerate() {
            let parent = tempfile::tempdir().unwrap();
            let root = parent.path().join("root");
            std::fs::create_dir(&root).unwrap();
            let error = import(
                &root,
                hand_stream(entries, &["link", "up", "hard"]).as_slice(),
            )
            .unwrap_err();
            assert_eq!(error.code(), "corrupt_stream", "case {i}: {error}");
            assert!(only_root_in(parent.path()), "case {i}");
            assert!(
                !tmp_outside.exists(),
                "case {i} wrote {}",
                tmp_outside.display()
            );
            assert!(
                !root.join("hard").exists(),
                "case {i}: a link to a file outside"
            );
        }
        // The same builder makes a stream the importer takes, so the refusals above are
        // the names'.
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let fine = [
            dir,
            (
                Symlink,
                b"tree/link".as_slice(),
                Some(b"/".as_slice()),
                b"".as_slice(),
            ),
            (Regular, b"tree/file", None, b"x"),
        ];
        import(&root, hand_stream(&fine, &["link", "file"]).as_slice()).unwrap();
        assert_eq!(std::fs::read(root.join("file")).unwrap(), b"x");
    }

    #[test]
    fn a_stream_without_or_with_two_manifests_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("f"), b"data").unwrap();
        chown(&src, FROM);
        chown(&src.join("f"), FROM);
        let mut stream = Vec::new();
        export(&src, &full(), &mut stream).unwrap();
        let tar = tar_bytes(&stream);
        // The manifest's header, then its body padded to a block.
        let at = tar
            .windows(MANIFEST.len())
            .position(|w| w == MANIFEST.as_bytes())
            .unwrap();
        let body_blocks = tar[at + HEADER..]
            .iter()
            .position(|b| *b == 0)
            .unwrap()
            .div_ceil(HEADER);
        let (before, manifest) = (&tar[..at], &tar[at..at + HEADER * (1 + body_blocks)]);
        let end = vec![0u8; 2 * HEADER];
        let without = [before, &end].concat();
        let twice = [before, manifest, manifest, &end].concat();
        for (what, tar) in [("without", without), ("twice", twice)] {
            let root = tmp.path().join(what);
            std::fs::create_dir(&root).unwrap();
            let error = import(&root, compress(&tar).as_slice()).unwrap_err();
            assert_eq!(error.code(), "corrupt_stream", "{what}: {error}");
        }
        let root = tmp.path().join("once");
        std::fs::create_dir(&root).unwrap();
        import(
            &root,
            compress(&[before, manifest, &end].concat()).as_slice(),
        )
        .unwrap();
    }

    #[test]
    fn ids_outside_the_machines_range_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        chown(&src, FROM);
        // A whiteout of host root's (overlayfs makes them so) travels as it is.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            src.join("whiteout"),
            FileType::CharacterDevice,
            Mode::from_raw_mode(0),
            0,
        )
        .unwrap();
        chown(&src.join("whiteout"), 0);
        export(&src, &full(), io::sink()).unwrap();
        // Nothing else of host root's.
        std::fs::write(src.join("host-root"), b"").unwrap();
        chown(&src.join("host-root"), 0);
        let error = export(&src, &full(), io::sink()).unwrap_err();
        assert_eq!(error.code(), "unsupported_entry", "{error}");
        chown(&src.join("host-root"), FROM + ID_RANGE);
        assert_eq!(
            export(&src, &full(), io::sink()).unwrap_err().code(),
            "unsupported_entry"
        );
        chown(&src.join("host-root"), FROM + ID_RANGE - 1);
        export(&src, &full(), io::sink()).unwrap();
    }

    /// A writable layer as the runtime left it before mount points were made the
    /// Machine's own: `/srv/data` (a volume's mount point, `srv` missing from the image)
    /// made host root's. Without `mount_points` the pass is refused `unsupported_entry`
    /// (seen so before the mapping existed); with them both go as the Machine's root's.
    #[test]
    fn host_root_mount_points_of_older_machines_go_as_the_machines_root() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        std::fs::create_dir_all(src.join("srv/data")).unwrap();
        std::fs::create_dir(&dst).unwrap();
        chown(&dst, TO);
        std::fs::write(src.join("srv/note"), b"the machine's").unwrap();
        chown(&src, FROM);
        chown(&src.join("srv/note"), FROM);
        for made in ["srv", "srv/data"] {
            chown(&src.join(made), 0);
        }
        let error = export(&src, &full(), io::sink()).unwrap_err();
        assert_eq!(error.code(), "unsupported_entry", "{error}");
        let pass = ExportPass {
            mount_points: vec![b"srv/data".to_vec(), b"other".to_vec()],
            ..full()
        };
        roundtrip(&src, &dst, &pass);
        for made in ["srv", "srv/data"] {
            let meta = std::fs::symlink_metadata(dst.join(made)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (TO, TO), "{made}");
        }
        assert_eq!(
            std::fs::read(dst.join("srv/note")).unwrap(),
            b"the machine's"
        );
        // Only an empty mount point: one holding a file is not a bare mount point.
        std::fs::write(src.join("srv/data/file"), b"").unwrap();
        chown(&src.join("srv/data/file"), FROM);
        assert_eq!(
            export(&src, &pass, io::sink()).unwrap_err().code(),
            "unsupported_entry"
        );
        // Nor a host-root directory that no mount needs.
        std::fs::remove_file(src.join("srv/data/file")).unwrap();
        std::fs::create_dir(src.join("elsewhere")).unwrap();
        chown(&src.join("elsewhere"), 0);
        assert_eq!(
            export(&src, &pass, io::sink()).unwrap_err().code(),
            "unsupported_entry"
        );
    }

    #[test]
    fn acl_and_capability_ids_move_with_the_owners() {
        // An ACL naming user base+7 and group base+9, and a v3 capability with its root.
        let mut acl = 2u32.to_le_bytes().to_vec();
        for (tag, id) in [
            (0x01u16, u32::MAX),
            (0x02, FROM + 7),
            (0x04, u32::MAX),
            (0x08, FROM + 9),
            (0x20, u32::MAX),
        ] {
            acl.extend_from_slice(&tag.to_le_bytes());
            acl.extend_from_slice(&7u16.to_le_bytes());
            acl.extend_from_slice(&id.to_le_bytes());
        }
        let map = |id: u32| {
            id.checked_sub(FROM)
                .filter(|id| *id < ID_RANGE)
                .map(|id| TO + id)
        };
        let shifted = shift_xattr_ids(b"system.posix_acl_access", &acl, &map).unwrap();
        let ids: Vec<u32> = (4..shifted.len())
            .step_by(8)
            .map(|at| u32::from_le_bytes(shifted[at + 4..at + 8].try_into().unwrap()))
            .collect();
        assert_eq!(ids, [u32::MAX, TO + 7, u32::MAX, TO + 9, u32::MAX]);
        let mut cap = 0x0300_0000u32.to_le_bytes().to_vec();
        cap.extend_from_slice(&[0xff; 16]);
        cap.extend_from_slice(&FROM.to_le_bytes());
        let shifted = shift_xattr_ids(b"security.capability", &cap, &map).unwrap();
        assert_eq!(shifted[20..], TO.to_le_bytes());
        assert_eq!(shifted[..20], cap[..20]);
        // An id the Machine does not own cannot be carried.
        let mut foreign = cap.clone();
        foreign[20..].copy_from_slice(&0u32.to_le_bytes());
        assert!(shift_xattr_ids(b"security.capability", &foreign, &map).is_none());
        assert_eq!(
            shift_xattr_ids(b"user.x", b"anything", &map).unwrap(),
            b"anything"
        );
    }

    #[test]
    fn manifest_paths_and_xattr_keys_go_both_ways() {
        for path in [
            b"plain/path".as_slice(),
            b"100%",
            b"\xff\xfe%41",
            "é/ü".as_bytes(),
            b"a\nb",
        ] {
            assert_eq!(decode_path(&encode_path(path)).unwrap(), path);
        }
        for name in [b"user.a".as_slice(), b"user.a=b", b"trusted.\xff"] {
            assert_eq!(xattr_name(xattr_key(name).as_bytes()).unwrap(), name);
        }
        assert_eq!(
            parse_mtime(b"-100.25").map(|t| (t.tv_sec, t.tv_nsec)),
            Some((-101, 750_000_000))
        );
        for time in [
            (-100, 250_000_000),
            (-1, 1),
            (-5, 0),
            (0, 0),
            (1_700_000_000, 999_999_999),
        ] {
            let parsed = parse_mtime(pax_time(time).as_bytes()).unwrap();
            assert_eq!((parsed.tv_sec, parsed.tv_nsec), time);
        }
        assert_eq!(
            parse_mtime(b"5.000000001").map(|t| (t.tv_sec, t.tv_nsec)),
            Some((5, 1))
        );
    }

    fn pass_after(previous: &PassSummary) -> ExportPass {
        ExportPass {
            changed_since: Some(previous.started_at),
            known_dirs: Some(previous.dirs.clone()),
            ..full()
        }
    }

    /// A full pass, changes, a delta pass: the same tree, from a smaller stream.
    #[test]
    fn a_later_pass_sends_changes_and_deletions() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        build_tree(&src, 1 << 20);
        std::fs::create_dir_all(src.join("moved/inner")).unwrap();
        std::fs::write(src.join("moved/inner/file"), b"kept ctime").unwrap();
        std::fs::create_dir_all(src.join("becomes-file")).unwrap();
        std::fs::write(src.join("becomes-file/child"), b"c").unwrap();
        std::fs::write(src.join("becomes-dir"), b"f").unwrap();
        for path in [
            "moved",
            "moved/inner",
            "moved/inner/file",
            "becomes-file",
            "becomes-file/child",
            "becomes-dir",
        ] {
            chown(&src.join(path), FROM);
        }
        // Past the pass's ctime margin, so the delta is a delta.
        std::thread::sleep(CTIME_MARGIN + Duration::from_millis(100));
        let (first, _) = roundtrip(&src, &dst, &full());
        assert_eq!(
            tree_digest(&src, FROM).unwrap(),
            tree_digest(&dst, TO).unwrap()
        );

        std::fs::write(src.join("big"), b"rewritten").unwrap();
        std::fs::remove_file(src.join("opaque/inside")).unwrap();
        std::fs::remove_file(src.join("becomes-dir")).unwrap();
        std::fs::create_dir(src.join("becomes-dir")).unwrap();
        std::fs::write(src.join("becomes-dir/new"), b"n").unwrap();
        std::fs::remove_dir_all(src.join("becomes-file")).unwrap();
        std::fs::write(src.join("becomes-file"), b"now a file").unwrap();
        std::fs::remove_file(src.join("dangling")).unwrap();
        symlink("retargeted", src.join("dangling")).unwrap();
        std::fs::hard_link(src.join("setuid"), src.join("setuid-link")).unwrap();
        // A directory moved: its file keeps its old ctime, and must still arrive.
        std::fs::rename(src.join("moved"), src.join("etc/moved-here")).unwrap();
        set_mode(&src.join("sticky"), 0o1770);
        for path in [
            "becomes-dir",
            "becomes-dir/new",
            "becomes-file",
            "dangling",
            "setuid",
        ] {
            chown(&src.join(path), FROM + 3);
        }
        set_mode(&src.join("setuid"), 0o4755);
        let (second, applied) = roundtrip(&src, &dst, &pass_after(&first));
        assert_eq!(
            tree_digest(&src, FROM).unwrap(),
            tree_digest(&dst, TO).unwrap()
        );
        assert!(
            second.entries < first.entries / 2,
            "{} of {}",
            second.entries,
            first.entries
        );
        assert!(
            second.file_bytes < 1 << 20,
            "{} bytes resent",
            second.file_bytes
        );
        assert_eq!(applied.entries, second.entries);
        assert!(!dst.join("opaque/inside").exists());
        assert_eq!(
            std::fs::read(dst.join("etc/moved-here/inner/file")).unwrap(),
            b"kept ctime"
        );

        // Nothing changed: a pass sends nearly nothing and keeps the tree.
        let (third, _) = roundtrip(&src, &dst, &pass_after(&second));
        assert_eq!(
            tree_digest(&src, FROM).unwrap(),
            tree_digest(&dst, TO).unwrap()
        );
        assert!(third.entries <= second.entries);
    }

    /// A pass without the previous pass's directories still moves a moved directory.
    #[test]
    fn a_later_pass_without_known_dirs_sends_changed_dirs_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        std::fs::create_dir_all(src.join("a/b")).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        std::fs::write(src.join("a/b/file"), b"old").unwrap();
        std::fs::create_dir(src.join("to")).unwrap();
        for path in ["", "a", "a/b", "a/b/file", "to"] {
            chown(&src.join(path), FROM);
        }
        std::thread::sleep(CTIME_MARGIN + Duration::from_millis(100));
        let (first, _) = roundtrip(&src, &dst, &full());
        std::fs::rename(src.join("a"), src.join("to/a")).unwrap();
        let pass = ExportPass {
            changed_since: Some(first.started_at),
            ..full()
        };
        roundtrip(&src, &dst, &pass);
        assert_eq!(
            tree_digest(&src, FROM).unwrap(),
            tree_digest(&dst, TO).unwrap()
        );
    }

    /// A pass over a tree that changes all the while, then a pass after it stops: the
    /// same tree.
    #[test]
    fn passes_over_a_changing_tree_end_identical() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        build_tree(&src, 4 << 20);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (src, stop) = (src.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let dir = src.join(format!("churn/{}", i % 7));
                    std::fs::create_dir_all(&dir).unwrap();
                    let file = dir.join(format!("f{}", i % 13));
                    std::fs::write(&file, i.to_le_bytes().repeat((i % 3000) as usize)).unwrap();
                    if i.is_multiple_of(5) {
                        let _ = std::fs::remove_file(dir.join(format!("f{}", (i + 3) % 13)));
                    }
                    if i.is_multiple_of(11) {
                        let _ = std::fs::rename(
                            src.join(format!("churn/{}", (i + 1) % 7)),
                            src.join(format!("churn/r{i}")),
                        );
                    }
                    std::fs::write(src.join("big"), i.to_le_bytes()).unwrap();
                    i += 1;
                }
                // A Machine's files belong to it.
                for entry in walk_paths(&src.join("churn")) {
                    chown(&entry, FROM);
                }
                chown(&src.join("churn"), FROM);
            })
        };
        chown(&src, FROM);
        let mut previous: Option<PassSummary> = None;
        for _ in 0..3 {
            let pass = previous.as_ref().map_or_else(full, pass_after);
            // Files the writer just made still belong to host root: a pass may refuse
            // them, and the next pass takes them again.
            let mut stream = Vec::new();
            match export(&src, &pass, &mut stream) {
                Ok(summary) => {
                    import(&dst, stream.as_slice()).unwrap();
                    previous = Some(summary);
                }
                Err(error) => assert_eq!(error.code(), "unsupported_entry", "{error}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        let pass = previous.as_ref().map_or_else(full, pass_after);
        roundtrip(&src, &dst, &pass);
        assert_eq!(
            tree_digest(&src, FROM).unwrap(),
            tree_digest(&dst, TO).unwrap()
        );
    }

    fn walk_paths(dir: &Path) -> Vec<PathBuf> {
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.symlink_metadata().unwrap().is_dir() {
                paths.extend(walk_paths(&path));
            }
            paths.push(path);
        }
        paths
    }

    /// While a thread swaps a directory of the tree for a symlink to `/` or to a
    /// directory outside the root, no pass reads outside the root. Shown to fail without
    /// the protection: with the walk's directory open lacking O_NOFOLLOW and the fstat
    /// check after it, a stream held the canary within a second.
    #[test]
    fn a_pass_never_reads_outside_the_root_while_the_tree_swaps() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let canary = format!("canary-{}-never-in-a-stream", std::process::id());
        std::fs::write(outside.join(&canary), b"secret").unwrap();
        // Owned like the Machine's files, so a walk that strayed would stream it rather
        // than stop at a foreign owner.
        chown(&outside, FROM);
        chown(&outside.join(&canary), FROM);
        std::fs::write(root.join("sub/inside"), b"fine").unwrap();
        for path in ["", "sub", "sub/inside"] {
            chown(&root.join(path), FROM);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicU64::new(0));
        let swapper = {
            let (root, outside, stop, swaps) =
                (root.clone(), outside.clone(), stop.clone(), swaps.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::fs::rename(root.join("sub"), root.join("held")).unwrap();
                    let target = if swaps.load(Ordering::Relaxed) % 2 == 0 {
                        Path::new("/")
                    } else {
                        outside.as_path()
                    };
                    symlink(target, root.join("sub")).unwrap();
                    // The symlink is the Machine's.
                    chown(&root.join("sub"), FROM);
                    std::thread::yield_now();
                    std::fs::remove_file(root.join("sub")).unwrap();
                    std::fs::rename(root.join("held"), root.join("sub")).unwrap();
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        // Enough that the swap lands between the walk's lstat and its open many times.
        const PASSES: u64 = 3000;
        let (mut passes, mut saw_dir, mut saw_link) = (0u64, 0, 0);
        let started = std::time::Instant::now();
        // Until the walk has met both states many times (a loaded host schedules the
        // swapper less often).
        while started.elapsed() < Duration::from_secs(60)
            && (passes < PASSES
                || swaps.load(Ordering::Relaxed) < PASSES
                || saw_dir == 0
                || saw_link == 0)
        {
            let mut stream = Vec::new();
            if let Err(error) = export(&root, &full(), &mut stream) {
                // A refusal may name only what is inside.
                let text = error.to_string();
                assert!(
                    !text.contains("sub/") || text.contains("sub/inside"),
                    "{text}"
                );
                continue;
            }
            passes += 1;
            let tar = tar_bytes(&stream);
            let text = String::from_utf8_lossy(&tar);
            assert!(
                !text.contains(&canary),
                "the canary outside the root was read"
            );
            assert!(!text.contains("secret"));
            assert!(
                !text.contains("tree/sub/etc"),
                "/ was walked through the symlink"
            );
            assert!(!text.contains("tree/sub/tmp"));
            saw_dir += usize::from(text.contains("tree/sub/inside"));
            saw_link += usize::from(!text.contains("tree/sub/inside") && text.contains("tree/sub"));
        }
        stop.store(true, Ordering::Relaxed);
        swapper.join().unwrap();
        let swaps = swaps.load(Ordering::Relaxed);
        assert!(
            passes >= PASSES && swaps >= PASSES,
            "{passes} passes, {swaps} swaps"
        );
        // Both states were seen, so the walk raced the swaps.
        assert!(
            saw_dir > 0 && saw_link > 0,
            "{saw_dir} as a directory, {saw_link} as a link"
        );
    }

    /// ENOSPC on the destination is `insufficient_storage`, not a corrupt stream.
    #[test]
    fn a_full_disk_is_told_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        chown(&src, FROM);
        let noise: Vec<u8> = (0..(4u32 << 20))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(src.join("big"), &noise).unwrap();
        chown(&src.join("big"), FROM);
        let mut stream = Vec::new();
        export(&src, &full(), &mut stream).unwrap();

        let small = tmp.path().join("small");
        std::fs::create_dir(&small).unwrap();
        rustix::mount::mount(
            "tmpfs",
            &small,
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            "size=1m",
        )
        .unwrap();
        let result = import(&small, stream.as_slice());
        rustix::mount::unmount(&small, rustix::mount::UnmountFlags::DETACH).unwrap();
        let error = result.unwrap_err();
        assert!(error.out_of_space(), "{error}");
        assert_eq!(error.code(), "insufficient_storage");
    }

    /// Throughput of export piped into import against `tar -c | zstd | zstd -d | tar -x` on the
    /// same 256 MB tree, in one run. Run optimized:
    /// `cargo test -p berth-agent --lib --config 'profile.dev.package.berth-agent.opt-level=3'
    /// --config 'profile.dev.package.tar.opt-level=3' transfer::tests::throughput -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn throughput_against_a_tar_pipe() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        chown(&src, FROM);
        // 128 MB in 8 large files, half noise, half text-like; 128 MB in 4096 small ones.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect()
        };
        let text: Vec<u8> =
            b"GET /api/v1/items?id=12345 200 0.004 user-agent: berth\n".repeat(320_000);
        for i in 0..8 {
            let data = if i % 2 == 0 {
                noise(16 << 20)
            } else {
                text[..16 << 20].to_vec()
            };
            std::fs::write(src.join(format!("large-{i}")), data).unwrap();
            chown(&src.join(format!("large-{i}")), FROM);
        }
        for d in 0..64 {
            let dir = src.join(format!("dir-{d}"));
            std::fs::create_dir(&dir).unwrap();
            chown(&dir, FROM);
            for f in 0..64 {
                let data = if f % 2 == 0 {
                    noise(32 << 10)
                } else {
                    text[f * 7..f * 7 + (32 << 10)].to_vec()
                };
                std::fs::write(dir.join(format!("f{f}")), data).unwrap();
                chown(&dir.join(format!("f{f}")), FROM);
            }
        }
        rustix::fs::sync();
        let ours = |level: i32, n: usize| {
            let dst = tmp.path().join(format!("ours-{level}-{n}"));
            std::fs::create_dir(&dst).unwrap();
            let (reader, writer) = rustix::pipe::pipe().unwrap();
            let started = std::time::Instant::now();
            let exporter = {
                let src = src.clone();
                std::thread::spawn(move || {
                    export_at_level(&src, &full(), File::from(writer), level).unwrap()
                })
            };
            let got = import(&dst, File::from(reader)).unwrap();
            let sent = exporter.join().unwrap();
            let seconds = started.elapsed().as_secs_f64();
            assert_eq!(sent.digest, got.digest);
            (seconds, sent.stream_bytes)
        };
        let tar_pipe = |level: i32, n: usize| {
            let dst = tmp.path().join(format!("tar-{level}-{n}"));
            std::fs::create_dir(&dst).unwrap();
            let started = std::time::Instant::now();
            let status = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "tar -C {} -cf - . | zstd -q -{level} -c | zstd -q -d -c | tar -C {} -xpf - && sync -f {}",
                    src.display(),
                    dst.display(),
                    dst.display()
                ))
                .status()
                .unwrap();
            assert!(status.success());
            started.elapsed().as_secs_f64()
        };
        let bytes = 256.0 * 1024.0 * 1024.0;
        for level in [1, 3] {
            for n in 0..3 {
                let (ours_s, wire) = ours(level, n);
                let tar_s = tar_pipe(level, n);
                println!(
                    "level {level} run {n}: ours {ours_s:.2} s ({:.0} MB/s, {wire} bytes on the wire), tar|zstd|tar {tar_s:.2} s ({:.0} MB/s), ratio {:.2}",
                    bytes / ours_s / 1e6,
                    bytes / tar_s / 1e6,
                    tar_s / ours_s
                );
            }
        }
    }
}
