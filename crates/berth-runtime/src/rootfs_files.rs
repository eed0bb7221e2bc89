//! Files inside a Machine's root filesystem, for the files API: stat, read, list, write,
//! mkdir, rename and remove under an fd of the rootfs (its overlay mount point).
//!
//! The Machine is hostile and live: any component of a path may be a symlink (absolute,
//! relative, `..`-laden), a FIFO or a device node, and it may swap a directory for a
//! symlink to `/` while a call runs. So a client path is never joined to the root's host
//! path, and no string check is the protection: every lookup is an `openat2` under the
//! root fd with `RESOLVE_IN_ROOT` (`..` and absolute symlinks stop at the root),
//! `RESOLVE_NO_MAGICLINKS` and `RESOLVE_NO_XDEV` ([`crate::inroot::open`]). Whatever acts
//! on a last component (stat, unlink, rename, mkdir, the temporary file of a write)
//! resolves the parent that way to a directory fd and then uses an `*at` call on the
//! plain name, which follows nothing. Walks below a directory go one plain name at a
//! time from a directory fd, with `RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV`.
//!
//! Client paths are relative to the root whether or not they start with `/` (`/etc/x` is
//! `etc/x`). Empty and `.` components are dropped, so `a/`, `a/.` and `a` are the same
//! and a trailing `/` does not follow a symlink `a`. `..` is left to the kernel, which
//! never goes above the root; but a path whose **last** component is `..` is
//! [`FileError::InvalidPath`] everywhere: it names no entry of a parent to act on, and
//! the path shown for it could not say where it went. Paths are at most 4096 bytes, with
//! no NUL. The `path` in answers is the client's path made absolute with `..` applied
//! lexically: for display only (after a symlink, `l/..` is not where `l` sits).
//!
//! A symlink as the last component is never followed by stat, read, write, rename or
//! remove: stat reports it, read and write answer [`FileError::Unsupported`], rename and
//! remove act on the link itself. [`list`] alone follows one at the listed path itself
//! (inside the root, as `ls` does), never while descending.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RawDir, RenameFlags, ResolveFlags, Stat};
use rustix::io::Errno;
use serde::Serialize;

/// The longest client path taken, as the kernel's `PATH_MAX`.
const MAX_PATH: usize = 4096;
/// How deep [`list`] and [`remove`] go: they hold one fd per level.
const MAX_DEPTH: usize = 256;
/// Bytes of directory entries read per `getdents64`.
const DIR_BUF: usize = 32 * 1024;
/// Mode of the directories made for a path's parents.
const PARENT_MODE: u32 = 0o755;
/// Mode of a new file when the client gives none.
const FILE_MODE: u32 = 0o644;
/// Passes over a directory being removed while the Machine keeps filling it.
const REMOVE_PASSES: u8 = 3;
/// Looking up one plain name retries as often when the kernel saw a rename (`EAGAIN`).
const RETRIES: usize = 16;

/// Why a files call failed. [`FileError::code`] names each for clients.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}: no such file or directory")]
    NotFound(String),
    #[error("{0}: not a directory")]
    NotADirectory(String),
    #[error("{0}: is a directory")]
    IsADirectory(String),
    #[error("{0}: already exists")]
    AlreadyExists(String),
    #[error("{0}: directory not empty")]
    NotEmpty(String),
    /// The path itself is refused; the string says why.
    #[error("invalid path: {0}")]
    InvalidPath(String),
    /// Not a regular file (a symlink, FIFO, socket or device) where one is needed.
    #[error("unsupported file type: {0}")]
    Unsupported(String),
    /// A write brought more than its `max_bytes`; nothing was left behind.
    #[error("{path}: more than {limit} bytes")]
    TooLarge { path: String, limit: u64 },
    #[error("{0}: {1}")]
    Io(String, #[source] io::Error),
}

impl FileError {
    /// A stable snake_case code for the API.
    pub fn code(&self) -> &'static str {
        match self {
            FileError::NotFound(_) => "file_not_found",
            FileError::NotADirectory(_) => "not_a_directory",
            FileError::IsADirectory(_) => "is_a_directory",
            FileError::AlreadyExists(_) => "file_exists",
            FileError::NotEmpty(_) => "directory_not_empty",
            FileError::InvalidPath(_) => "invalid_path",
            FileError::Unsupported(_) => "unsupported_file_type",
            FileError::TooLarge { .. } => "file_too_large",
            FileError::Io(..) => "io_error",
        }
    }
}

/// The host ids that new files and directories get: the Machine's mapped root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// What an entry is, as `lstat` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// One entry, as `lstat` sees it (a symlink is itself, not its target).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryInfo {
    /// The last component (`/` for the root); not UTF-8 bytes are replaced.
    pub name: String,
    /// The client path, absolute and normalized (see the module doc).
    pub path: String,
    pub kind: Kind,
    pub size: u64,
    /// Permission bits with setuid, setgid and sticky: `st_mode & 0o7777`.
    pub mode: u32,
    /// Milliseconds since the Unix epoch.
    pub mtime_ms: i64,
    /// Host ids.
    pub uid: u32,
    pub gid: u32,
    /// What a symlink points at, as stored (never resolved).
    pub link_target: Option<String>,
}

/// What [`list`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listing {
    pub entries: Vec<EntryInfo>,
    /// More entries were there than the limit.
    pub truncated: bool,
}

/// The `lstat` of `path`: a symlink as the last component is reported, not followed.
pub fn stat(root: BorrowedFd<'_>, path: &str) -> Result<EntryInfo, FileError> {
    let path = ClientPath::parse(path)?;
    let Some((parents, name)) = path.split_last() else {
        let st = rustix::fs::fstat(root).map_err(|e| fail(e, &path.shown))?;
        return Ok(entry_info(root, ".", "/".into(), path.shown.clone(), &st));
    };
    let dir = open_dir(root, parents, &path.shown)?;
    let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| fail(e, &path.shown))?;
    Ok(entry_info(
        dir.as_fd(),
        name,
        name.into(),
        path.shown.clone(),
        &st,
    ))
}

/// Opens the regular file at `path` for reading. A symlink as the last component is not
/// followed: it is [`FileError::Unsupported`], as are FIFOs, sockets and devices.
///
/// The object is first opened `O_PATH` (which opens nothing: no FIFO can block, no
/// device driver runs) and checked with `fstat`; only a regular file is then reopened
/// for reading through `/proc/self/fd`, which names that very inode.
pub fn open_read(root: BorrowedFd<'_>, path: &str) -> Result<File, FileError> {
    let path = ClientPath::parse(path)?;
    let fd = open_in(root, &path.relative(), OFlags::PATH | OFlags::NOFOLLOW)
        .map_err(|e| fail(e, &path.shown))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| fail(e, &path.shown))?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => {}
        FileType::Directory => return Err(FileError::IsADirectory(path.shown)),
        other => return Err(unsupported(&path.shown, other)),
    }
    crate::inroot::check_procfs().map_err(|e| FileError::Io(path.shown.clone(), e))?;
    let file = rustix::fs::open(
        crate::inroot::fd_path(fd.as_fd()),
        OFlags::RDONLY | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| fail(e, &path.shown))?;
    let again = rustix::fs::fstat(&file).map_err(|e| fail(e, &path.shown))?;
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
        let why = io::Error::other("reopened a different file");
        return Err(FileError::Io(path.shown, why));
    }
    Ok(File::from(file))
}

/// The entries below the directory at `path`, depth first, each directory's entries in
/// name order: `depth` 1 is the directory's own entries (0 is taken as 1), 2 adds those
/// of its subdirectories, and so on (at most 256). Symlinks are reported, never
/// descended into; nor are mount points. At most `limit` entries come back, with
/// `truncated` set when there were more; a directory is then read only as far as the
/// limit needs, so which entries come back is up to its order on disk. A symlink at
/// `path` itself is followed, inside the root.
pub fn list(
    root: BorrowedFd<'_>,
    path: &str,
    depth: u32,
    limit: usize,
) -> Result<Listing, FileError> {
    let path = ClientPath::parse(path)?;
    let depth = usize::try_from(depth)
        .unwrap_or(usize::MAX)
        .clamp(1, MAX_DEPTH);
    let dir = open_in(root, &path.relative(), OFlags::RDONLY | OFlags::DIRECTORY)
        .map_err(|e| fail(e, &path.shown))?;
    // One more than the limit, to know whether there were more.
    let budget = limit.saturating_add(1);
    let mut buf = Vec::with_capacity(DIR_BUF);
    let mut entries = Vec::new();
    let names = read_names(dir.as_fd(), budget, &mut buf).map_err(|e| fail(e, &path.shown))?;
    let mut stack = vec![Listed {
        dir,
        path: path.shown.clone(),
        names,
    }];
    while entries.len() < budget {
        let level = stack.len();
        let Some(frame) = stack.last_mut() else { break };
        let Some(name) = frame.names.pop() else {
            stack.pop();
            continue;
        };
        let shown = child_path(&frame.path, &name);
        let st = match rustix::fs::statat(&frame.dir, &*name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            // Gone since it was read.
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(fail(e, &shown)),
        };
        let label = name.to_string_lossy().into_owned();
        let info = entry_info(frame.dir.as_fd(), &*name, label, shown, &st);
        let mut below = None;
        if info.kind == Kind::Dir && level < depth {
            let flags = OFlags::RDONLY | OFlags::DIRECTORY;
            match open_child(frame.dir.as_fd(), &*name, flags, Mode::empty()) {
                Ok(dir) => {
                    let want = budget - entries.len() - 1;
                    let names =
                        read_names(dir.as_fd(), want, &mut buf).map_err(|e| fail(e, &info.path))?;
                    below = Some(Listed {
                        dir,
                        path: info.path.clone(),
                        names,
                    });
                }
                // Gone, swapped for a file or a symlink, or a mount point: not entered.
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::XDEV) => {}
                Err(e) => return Err(fail(e, &info.path)),
            }
        }
        entries.push(info);
        stack.extend(below);
    }
    let truncated = entries.len() > limit;
    entries.truncate(limit);
    Ok(Listing { entries, truncated })
}

/// Writes `data` to the file at `path`, atomically: into a new temporary file beside it,
/// which is then renamed over it, so a reader sees the old content or all of the new.
/// Returns the bytes written.
///
/// A new file gets `owner` and `mode` (0o644 by default); a file it replaces keeps its
/// owner, and its mode unless `mode` is given. A directory there is
/// [`FileError::IsADirectory`]; a symlink, FIFO, socket or device is
/// [`FileError::Unsupported`] (a symlink is neither written through nor replaced). With
/// `make_parents`, missing parents are made with mode 0o755 and `owner`. More than
/// `max_bytes` is [`FileError::TooLarge`]; on any error the temporary file is removed.
/// The data is synced before the rename.
pub fn write(
    root: BorrowedFd<'_>,
    path: &str,
    data: &mut dyn Read,
    mode: Option<u32>,
    make_parents: bool,
    owner: Owner,
    max_bytes: Option<u64>,
) -> Result<u64, FileError> {
    let path = ClientPath::parse(path)?;
    let Some((parents, name)) = path.split_last() else {
        return Err(FileError::IsADirectory(path.shown));
    };
    let dir = if make_parents {
        make_parent_dirs(root, parents, owner, &path.shown)?
    } else {
        open_dir(root, parents, &path.shown)?
    };
    let (owner, mode) = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => {
                let kept = Owner {
                    uid: st.st_uid,
                    gid: st.st_gid,
                };
                (kept, mode.unwrap_or(st.st_mode))
            }
            FileType::Directory => return Err(FileError::IsADirectory(path.shown)),
            other => return Err(unsupported(&path.shown, other)),
        },
        Err(Errno::NOENT) => (owner, mode.unwrap_or(FILE_MODE)),
        Err(e) => return Err(fail(e, &path.shown)),
    };
    // The checks above only make errors clearer: whatever the Machine swaps in after
    // them, the rename replaces a name, it never writes through one.
    let (temp, file) = create_temp(dir.as_fd()).map_err(|e| fail(e, &path.shown))?;
    let written = fill(file, data, owner, mode, max_bytes, &path.shown).and_then(|n| {
        rustix::fs::renameat(&dir, &temp, &dir, name)
            .map(|()| n)
            .map_err(|e| fail(e, &path.shown))
    });
    if written.is_err() {
        // Best effort: the error in hand is the one to report.
        let _ = rustix::fs::unlinkat(&dir, &temp, AtFlags::empty());
    }
    written
}

/// Makes the directory `path` with `mode` (0o755 by default) and `owner`. With
/// `make_parents`, missing parents are made too (0o755, `owner`) and a directory already
/// there is fine (its mode is left alone), as with `mkdir -p`.
pub fn mkdir(
    root: BorrowedFd<'_>,
    path: &str,
    mode: Option<u32>,
    make_parents: bool,
    owner: Owner,
) -> Result<(), FileError> {
    let path = ClientPath::parse(path)?;
    let Some((parents, name)) = path.split_last() else {
        return match make_parents {
            true => Ok(()),
            false => Err(FileError::AlreadyExists(path.shown)),
        };
    };
    let dir = if make_parents {
        make_parent_dirs(root, parents, owner, &path.shown)?
    } else {
        open_dir(root, parents, &path.shown)?
    };
    match make_dir(dir.as_fd(), name, mode.unwrap_or(PARENT_MODE), owner) {
        Ok(true) => Ok(()),
        // `mkdir -p` is content with a directory, or a symlink to one inside the root.
        Ok(false) if make_parents && open_in(root, &path.relative(), dir_path()).is_ok() => Ok(()),
        Ok(false) => Err(FileError::AlreadyExists(path.shown)),
        Err(e) => Err(fail(e, &path.shown)),
    }
}

/// Renames `from` to `to` (`renameat2`), both resolved in the root; a symlink is renamed
/// itself. Without `overwrite` an existing `to` is [`FileError::AlreadyExists`]
/// (`RENAME_NOREPLACE`). The root can be neither.
pub fn rename(
    root: BorrowedFd<'_>,
    from: &str,
    to: &str,
    overwrite: bool,
) -> Result<(), FileError> {
    let (from, to) = (ClientPath::parse(from)?, ClientPath::parse(to)?);
    let (Some((from_parents, from_name)), Some((to_parents, to_name))) =
        (from.split_last(), to.split_last())
    else {
        return Err(FileError::InvalidPath("the root cannot be renamed".into()));
    };
    let from_dir = open_dir(root, from_parents, &from.shown)?;
    let to_dir = open_dir(root, to_parents, &to.shown)?;
    let flags = match overwrite {
        true => RenameFlags::empty(),
        false => RenameFlags::NOREPLACE,
    };
    rustix::fs::renameat_with(&from_dir, from_name, &to_dir, to_name, flags).map_err(|e| match e {
        Errno::NOENT => FileError::NotFound(from.shown.clone()),
        Errno::INVAL => FileError::InvalidPath(format!(
            "cannot move {} to {}: a directory into itself",
            from.shown, to.shown
        )),
        e => fail(e, &to.shown),
    })
}

/// Removes the entry at `path`; a symlink is removed itself, never its target. A
/// directory must be empty unless `recursive`, which empties it by directory fd and
/// `unlinkat`, following no symlink and entering no mount point. The root cannot be
/// removed.
pub fn remove(root: BorrowedFd<'_>, path: &str, recursive: bool) -> Result<(), FileError> {
    let path = ClientPath::parse(path)?;
    let Some((parents, name)) = path.split_last() else {
        return Err(FileError::InvalidPath("the root cannot be removed".into()));
    };
    let dir = open_dir(root, parents, &path.shown)?;
    match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
        Ok(()) => Ok(()),
        Err(Errno::ISDIR) if recursive => remove_tree(dir.as_fd(), name, &path.shown),
        Err(Errno::ISDIR) => {
            rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR).map_err(|e| fail(e, &path.shown))
        }
        Err(e) => Err(fail(e, &path.shown)),
    }
}

/// A client path split into the components the kernel resolves, and shown.
struct ClientPath<'a> {
    /// No empty or `.` component; the last one is not `..`.
    parts: Vec<&'a str>,
    /// Absolute, `..` applied lexically: for messages and answers only.
    shown: String,
}

impl<'a> ClientPath<'a> {
    fn parse(path: &'a str) -> Result<ClientPath<'a>, FileError> {
        if path.len() > MAX_PATH {
            return Err(FileError::InvalidPath(format!(
                "longer than {MAX_PATH} bytes"
            )));
        }
        if path.contains('\0') {
            return Err(FileError::InvalidPath("contains a NUL byte".into()));
        }
        let parts: Vec<&str> = path
            .split('/')
            .filter(|part| !part.is_empty() && *part != ".")
            .collect();
        if parts.last() == Some(&"..") {
            return Err(FileError::InvalidPath(format!(
                "{path}: must not end in '..'"
            )));
        }
        let mut shown: Vec<&str> = Vec::new();
        for part in &parts {
            match *part {
                ".." => {
                    shown.pop();
                }
                name => shown.push(name),
            }
        }
        Ok(ClientPath {
            parts,
            shown: format!("/{}", shown.join("/")),
        })
    }

    /// The path as `openat2` takes it under the root fd.
    fn relative(&self) -> String {
        relative(&self.parts)
    }

    /// The parent's components and the last name; `None` for the root.
    fn split_last(&self) -> Option<(&[&'a str], &'a str)> {
        self.parts
            .split_last()
            .map(|(name, parents)| (parents, *name))
    }
}

fn relative(parts: &[&str]) -> String {
    match parts.is_empty() {
        true => ".".into(),
        false => parts.join("/"),
    }
}

fn child_path(parent: &str, name: &CStr) -> String {
    let name = name.to_string_lossy();
    match parent {
        "/" => format!("/{name}"),
        parent => format!("{parent}/{name}"),
    }
}

/// `O_PATH | O_DIRECTORY`: a directory to resolve names in, opened for nothing else.
fn dir_path() -> OFlags {
    OFlags::PATH | OFlags::DIRECTORY
}

/// Opens `relative` under `root`, resolved inside it, crossing no mount.
fn open_in(root: BorrowedFd<'_>, relative: &str, flags: OFlags) -> rustix::io::Result<OwnedFd> {
    crate::inroot::open(root, Path::new(relative), flags, ResolveFlags::NO_XDEV)
}

/// Opens the plain name `name` in `dir`: no symlink followed (`ELOOP`), no mount crossed
/// (`EXDEV`).
fn open_child<P: rustix::path::Arg + Copy>(
    dir: BorrowedFd<'_>,
    name: P,
    flags: OFlags,
    mode: Mode,
) -> rustix::io::Result<OwnedFd> {
    let how = ResolveFlags::BENEATH
        | ResolveFlags::NO_SYMLINKS
        | ResolveFlags::NO_MAGICLINKS
        | ResolveFlags::NO_XDEV;
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(dir, name, flags | OFlags::CLOEXEC, mode, how) {
            Err(Errno::AGAIN) if tries < RETRIES => tries += 1,
            other => return other,
        }
    }
}

/// The directory of `parts` under `root`, as an `O_PATH` fd to use with `*at` calls.
fn open_dir(root: BorrowedFd<'_>, parts: &[&str], shown: &str) -> Result<OwnedFd, FileError> {
    open_in(root, &relative(parts), dir_path()).map_err(|e| fail(e, shown))
}

/// Like [`open_dir`], making the missing directories one at a time (mode 0o755, `owner`)
/// in the parent found by the lookup before, each lookup from the root again.
fn make_parent_dirs(
    root: BorrowedFd<'_>,
    parts: &[&str],
    owner: Owner,
    shown: &str,
) -> Result<OwnedFd, FileError> {
    match open_in(root, &relative(parts), dir_path()) {
        Err(Errno::NOENT) => {}
        other => return other.map_err(|e| fail(e, shown)),
    }
    let mut dir = open_in(root, ".", dir_path()).map_err(|e| fail(e, shown))?;
    for (i, part) in parts.iter().enumerate() {
        let walked = relative(&parts[..=i]);
        dir = match open_in(root, &walked, dir_path()) {
            Err(Errno::NOENT) if *part != ".." => {
                // A dangling symlink there is EEXIST: not made, and NOENT again below.
                make_dir(dir.as_fd(), part, PARENT_MODE, owner).map_err(|e| fail(e, shown))?;
                open_in(root, &walked, dir_path())
            }
            other => other,
        }
        .map_err(|e| fail(e, shown))?;
    }
    Ok(dir)
}

/// Makes the directory `name` in `dir` with exactly `mode` (no umask) and `owner`;
/// `false` when something is already there.
fn make_dir(dir: BorrowedFd<'_>, name: &str, mode: u32, owner: Owner) -> rustix::io::Result<bool> {
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => {}
        Err(Errno::EXIST) => return Ok(false),
        Err(e) => return Err(e),
    }
    // Opened without following: if the Machine swapped it since, this fails (ELOOP) or
    // finds one of its own directories, never something outside.
    let made = open_child(dir, name, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
    set_owner_mode(made.as_fd(), owner, mode)?;
    Ok(true)
}

/// chown first: it clears setuid and setgid, which the mode may then set.
fn set_owner_mode(fd: BorrowedFd<'_>, owner: Owner, mode: u32) -> rustix::io::Result<()> {
    // u32::MAX would be chown's "leave as is".
    if owner.uid == u32::MAX || owner.gid == u32::MAX {
        return Err(Errno::INVAL);
    }
    std::os::unix::fs::fchown(fd, Some(owner.uid), Some(owner.gid))
        .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode & 0o7777))
}

/// A new, empty file with a random name in `dir`, only for us (`O_EXCL`, mode 0o600).
fn create_temp(dir: BorrowedFd<'_>) -> rustix::io::Result<(String, File)> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL;
    let mut tries = 0;
    loop {
        let mut random = [0u8; 8];
        rustix::rand::getrandom(&mut random, rustix::rand::GetRandomFlags::empty())?;
        let name = format!(".berth-write-{:016x}", u64::from_ne_bytes(random));
        match open_child(dir, name.as_str(), flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => return Ok((name, File::from(fd))),
            Err(Errno::EXIST) if tries < RETRIES => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Copies `data` into the temporary file, then gives it its owner and mode and syncs it.
fn fill(
    mut file: File,
    data: &mut dyn Read,
    owner: Owner,
    mode: u32,
    max_bytes: Option<u64>,
    shown: &str,
) -> Result<u64, FileError> {
    let io_error = |e: io::Error| FileError::Io(shown.to_owned(), e);
    let mut buf = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        let n = match data.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(e)),
        };
        written = written.saturating_add(n as u64);
        if let Some(limit) = max_bytes.filter(|&limit| written > limit) {
            let path = shown.to_owned();
            return Err(FileError::TooLarge { path, limit });
        }
        file.write_all(&buf[..n]).map_err(io_error)?;
    }
    set_owner_mode(file.as_fd(), owner, mode).map_err(|e| fail(e, shown))?;
    file.sync_all().map_err(io_error)?;
    Ok(written)
}

/// A directory being listed: the names still to show, smallest last.
struct Listed {
    dir: OwnedFd,
    path: String,
    names: Vec<CString>,
}

/// At least `want` names of `dir` (fewer when it has fewer), sorted, smallest last.
fn read_names(
    dir: BorrowedFd<'_>,
    want: usize,
    buf: &mut Vec<u8>,
) -> rustix::io::Result<Vec<CString>> {
    let mut names = Vec::new();
    while names.len() < want {
        let batch = read_batch(dir, buf)?;
        if batch.is_empty() {
            break;
        }
        names.extend(batch);
    }
    names.sort_unstable_by(|a, b| b.cmp(a));
    Ok(names)
}

/// The names of one `getdents64` on `dir` from its file offset, without `.` and `..`;
/// empty at the end. The offset moves past exactly the names returned.
fn read_batch(dir: BorrowedFd<'_>, buf: &mut Vec<u8>) -> rustix::io::Result<Vec<CString>> {
    buf.clear();
    buf.reserve(DIR_BUF);
    let mut entries = RawDir::new(dir, buf.spare_capacity_mut());
    let mut names = Vec::new();
    while let Some(entry) = entries.next() {
        let name = entry?.file_name().to_owned();
        if name.as_bytes() != b"." && name.as_bytes() != b".." {
            names.push(name);
        }
        // Stop before the next getdents: what it would buffer past here would be lost.
        if entries.is_buffer_empty() {
            break;
        }
    }
    Ok(names)
}

/// A directory being emptied.
struct Doomed {
    dir: OwnedFd,
    /// Its name in the directory below it on the stack (or the first parent).
    name: CString,
    path: String,
    /// Names read and not yet removed.
    pending: Vec<CString>,
    passes: u8,
}

/// Removes the directory `name` of `parent` and everything below it, depth first, one fd
/// per level. Entries go by `unlinkat`; only what that calls a directory (`EISDIR`) is
/// entered, opened without following a symlink or crossing a mount.
fn remove_tree(parent: BorrowedFd<'_>, name: &str, shown: &str) -> Result<(), FileError> {
    let name =
        CString::new(name).map_err(|_| FileError::InvalidPath("contains a NUL byte".into()))?;
    let Some(first) = enter(parent, name, shown.to_owned())? else {
        return Ok(());
    };
    let mut stack = vec![first];
    let mut buf = Vec::with_capacity(DIR_BUF);
    while let Some(top) = stack.last_mut() {
        if let Some(name) = top.pending.pop() {
            let shown = child_path(&top.path, &name);
            let below = match rustix::fs::unlinkat(&top.dir, &*name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => None,
                Err(Errno::ISDIR) => enter(top.dir.as_fd(), name, shown)?,
                Err(e) => return Err(fail(e, &shown)),
            };
            if let Some(below) = below {
                if stack.len() >= MAX_DEPTH {
                    let why = io::Error::other(format!("deeper than {MAX_DEPTH} levels"));
                    return Err(FileError::Io(below.path, why));
                }
                stack.push(below);
            }
            continue;
        }
        top.pending = read_batch(top.dir.as_fd(), &mut buf).map_err(|e| fail(e, &top.path))?;
        if !top.pending.is_empty() {
            continue;
        }
        let Some(mut done) = stack.pop() else { break };
        let parent = stack.last().map_or(parent, |below| below.dir.as_fd());
        match rustix::fs::unlinkat(parent, &*done.name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => {}
            // The Machine added entries behind us: read it again, a few times.
            Err(Errno::NOTEMPTY | Errno::EXIST) if done.passes < REMOVE_PASSES => {
                rustix::fs::seek(&done.dir, rustix::fs::SeekFrom::Start(0))
                    .map_err(|e| fail(e, &done.path))?;
                done.passes += 1;
                stack.push(done);
            }
            Err(e) => return Err(fail(e, &done.path)),
        }
    }
    Ok(())
}

/// Opens the directory `name` of `parent` to empty it; `None` when it is gone, or was
/// swapped for something else, which is then unlinked as that.
fn enter(parent: BorrowedFd<'_>, name: CString, path: String) -> Result<Option<Doomed>, FileError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY;
    match open_child(parent, &*name, flags, Mode::empty()) {
        Ok(dir) => Ok(Some(Doomed {
            dir,
            name,
            path,
            pending: Vec::new(),
            passes: 0,
        })),
        Err(Errno::NOENT) => Ok(None),
        Err(Errno::LOOP | Errno::NOTDIR) => {
            match rustix::fs::unlinkat(parent, &*name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => Ok(None),
                Err(e) => Err(fail(e, &path)),
            }
        }
        Err(e) => Err(fail(e, &path)),
    }
}

/// The entry `name` of `dir` from its lstat.
fn entry_info<P: rustix::path::Arg>(
    dir: BorrowedFd<'_>,
    name: P,
    label: String,
    path: String,
    st: &Stat,
) -> EntryInfo {
    let kind = kind_of(FileType::from_raw_mode(st.st_mode));
    let link_target = match kind {
        // Read from the same name: a link swapped since simply has no target shown.
        Kind::Symlink => rustix::fs::readlinkat(dir, name, Vec::new())
            .ok()
            .map(|target| target.to_string_lossy().into_owned()),
        _ => None,
    };
    let mtime_ms = (st.st_mtime as i64)
        .saturating_mul(1000)
        .saturating_add(st.st_mtime_nsec as i64 / 1_000_000);
    EntryInfo {
        name: label,
        path,
        kind,
        size: u64::try_from(st.st_size).unwrap_or(0),
        mode: st.st_mode & 0o7777,
        mtime_ms,
        uid: st.st_uid,
        gid: st.st_gid,
        link_target,
    }
}

fn kind_of(file_type: FileType) -> Kind {
    match file_type {
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        FileType::Fifo => Kind::Fifo,
        FileType::Socket => Kind::Socket,
        FileType::CharacterDevice => Kind::CharDevice,
        FileType::BlockDevice => Kind::BlockDevice,
        // `Unknown` only comes from a d_type, never from a stat's st_mode.
        FileType::RegularFile | FileType::Unknown => Kind::File,
    }
}

fn unsupported(shown: &str, file_type: FileType) -> FileError {
    let what = match kind_of(file_type) {
        Kind::Symlink => "a symbolic link",
        Kind::Fifo => "a FIFO",
        Kind::Socket => "a socket",
        Kind::CharDevice => "a character device",
        Kind::BlockDevice => "a block device",
        Kind::File | Kind::Dir => "not a regular file",
    };
    FileError::Unsupported(format!("{shown}: {what}"))
}

/// The error for `errno` from a call on `shown`.
fn fail(errno: Errno, shown: &str) -> FileError {
    let invalid = |why: &str| FileError::InvalidPath(format!("{shown}: {why}"));
    match errno {
        Errno::NOENT => FileError::NotFound(shown.into()),
        Errno::NOTDIR => FileError::NotADirectory(shown.into()),
        Errno::ISDIR => FileError::IsADirectory(shown.into()),
        Errno::EXIST => FileError::AlreadyExists(shown.into()),
        Errno::NOTEMPTY => FileError::NotEmpty(shown.into()),
        // A final symlink is caught before any O_NOFOLLOW open: this is a loop.
        Errno::LOOP => invalid("too many levels of symbolic links"),
        Errno::XDEV => invalid("crosses a mount point"),
        Errno::NAMETOOLONG => invalid("a name is too long"),
        e => FileError::Io(shown.into(), e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    const OWNER: Owner = Owner {
        uid: 100_000,
        gid: 100_000,
    };

    /// A host directory holding `rootfs` (the root) and room outside it.
    struct Host {
        _dir: tempfile::TempDir,
        base: PathBuf,
        rootfs: PathBuf,
        root: OwnedFd,
    }

    impl Host {
        fn new() -> Host {
            let dir = tempfile::tempdir().unwrap();
            let base = std::fs::canonicalize(dir.path()).unwrap();
            let rootfs = base.join("rootfs");
            std::fs::create_dir(&rootfs).unwrap();
            let root = rustix::fs::open(
                &rootfs,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .unwrap();
            Host {
                _dir: dir,
                base,
                rootfs,
                root,
            }
        }

        fn root(&self) -> BorrowedFd<'_> {
            self.root.as_fd()
        }

        /// Makes `rel` in the rootfs with `content`, and its parents.
        fn put(&self, rel: &str, content: &str) {
            let path = self.rootfs.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }

        fn read(&self, path: &str) -> Result<String, FileError> {
            let mut text = String::new();
            open_read(self.root(), path)?
                .read_to_string(&mut text)
                .unwrap();
            Ok(text)
        }

        fn write(&self, path: &str, data: &[u8], make_parents: bool) -> Result<u64, FileError> {
            write(
                self.root(),
                path,
                &mut &data[..],
                None,
                make_parents,
                OWNER,
                None,
            )
        }

        /// The names in a host directory.
        fn names(&self, dir: &Path) -> BTreeSet<String> {
            std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        }
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn random_bytes(len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            filled +=
                rustix::rand::getrandom(&mut data[filled..], rustix::rand::GetRandomFlags::empty())
                    .unwrap();
        }
        data
    }

    #[test]
    fn binary_data_round_trips_with_owner_and_mode() {
        let host = Host::new();
        let all: Vec<u8> = (0..=255).collect();
        let big = random_bytes(5 << 20);
        for (path, data) in [("/all", &all), ("big.bin", &big)] {
            let n = write(
                host.root(),
                path,
                &mut &data[..],
                Some(0o640),
                false,
                OWNER,
                None,
            );
            assert_eq!(n.unwrap(), data.len() as u64);
            let mut back = Vec::new();
            let mut file = open_read(host.root(), path).unwrap();
            file.read_to_end(&mut back).unwrap();
            assert!(back == *data, "{path}");
            let st = rustix::fs::fstat(&file).unwrap();
            assert_eq!((st.st_uid, st.st_gid), (OWNER.uid, OWNER.gid));
            assert_eq!(st.st_mode & 0o7777, 0o640);
        }
        let info = stat(host.root(), "/./big.bin/").unwrap();
        assert_eq!(
            (info.kind, info.size, info.mode),
            (Kind::File, 5 << 20, 0o640)
        );
        assert_eq!(
            (info.name.as_str(), info.path.as_str()),
            ("big.bin", "/big.bin")
        );
        // Setuid and friends are kept, after the chown that would clear them.
        write(
            host.root(),
            "suid",
            &mut &b"x"[..],
            Some(0o4755),
            false,
            OWNER,
            None,
        )
        .unwrap();
        assert_eq!(stat(host.root(), "suid").unwrap().mode, 0o4755);
        assert_eq!(host.names(&host.rootfs), set(&["all", "big.bin", "suid"]));
    }

    #[test]
    fn replacing_keeps_the_owner_and_the_mode_unless_given() {
        let host = Host::new();
        host.put("etc/conf", "old");
        let path = host.rootfs.join("etc/conf");
        std::os::unix::fs::chown(&path, Some(4242), Some(4343)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        host.write("/etc/conf", b"new", false).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (4242, 4343, 0o600)
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        write(
            host.root(),
            "etc/conf",
            &mut &b"newer"[..],
            Some(0o664),
            false,
            OWNER,
            None,
        )
        .unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (4242, 4343, 0o664)
        );
        // A new file gets the default mode whatever the umask.
        host.write("etc/fresh", b"", false).unwrap();
        let meta = std::fs::metadata(host.rootfs.join("etc/fresh")).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (OWNER.uid, 0o644));
        assert!(matches!(
            host.write("etc", b"x", false),
            Err(FileError::IsADirectory(_))
        ));
        assert!(matches!(
            host.write("/", b"x", false),
            Err(FileError::IsADirectory(_))
        ));
        assert!(matches!(
            host.write("no/such", b"x", false),
            Err(FileError::NotFound(_))
        ));
        assert!(matches!(
            host.write("etc/conf/x", b"x", true),
            Err(FileError::NotADirectory(_))
        ));
        assert_eq!(
            host.names(&host.rootfs.join("etc")),
            set(&["conf", "fresh"])
        );
    }

    #[test]
    fn parents_are_made_with_the_owner() {
        let host = Host::new();
        host.write("a/b/c/file", b"x", true).unwrap();
        for dir in ["a", "a/b", "a/b/c"] {
            let meta = std::fs::metadata(host.rootfs.join(dir)).unwrap();
            assert_eq!(
                (meta.uid(), meta.gid(), meta.mode() & 0o7777),
                (100_000, 100_000, 0o755)
            );
        }
        mkdir(host.root(), "/m", Some(0o700), false, OWNER).unwrap();
        let meta = std::fs::metadata(host.rootfs.join("m")).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (OWNER.uid, 0o700));
        let again = mkdir(host.root(), "m", None, false, OWNER);
        assert!(matches!(again, Err(FileError::AlreadyExists(_))));
        mkdir(host.root(), "m", None, true, OWNER).unwrap();
        mkdir(host.root(), "/", None, true, OWNER).unwrap();
        mkdir(host.root(), "x/../y/z", None, true, OWNER).unwrap();
        assert!(host.rootfs.join("x").is_dir() && host.rootfs.join("y/z").is_dir());
        let on_file = mkdir(host.root(), "a/b/c/file", None, true, OWNER);
        assert!(matches!(on_file, Err(FileError::AlreadyExists(_))));
        let missing = mkdir(host.root(), "q/r", None, false, OWNER);
        assert!(matches!(missing, Err(FileError::NotFound(_))));
    }

    #[test]
    fn dot_dot_never_leaves_the_root() {
        let host = Host::new();
        host.put("etc/hostname", "the machine");
        host.put("a/keep", "");
        for path in [
            "/../../etc/hostname",
            "../../etc/hostname",
            "a/../../../etc/hostname",
            "/a/../../../../../etc/./hostname",
        ] {
            assert_eq!(host.read(path).unwrap(), "the machine", "{path}");
        }
        assert!(matches!(
            host.read("../../etc/passwd"),
            Err(FileError::NotFound(_))
        ));
        host.write("/../../x", b"x", false).unwrap();
        assert!(host.rootfs.join("x").is_file());
        assert_eq!(stat(host.root(), "../a/../x").unwrap().path, "/x");
        for path in ["a/../../..", "..", "/a/.."] {
            assert!(
                matches!(stat(host.root(), path), Err(FileError::InvalidPath(_))),
                "{path}"
            );
            assert!(matches!(
                list(host.root(), path, 1, 9),
                Err(FileError::InvalidPath(_))
            ));
            assert!(matches!(
                remove(host.root(), path, true),
                Err(FileError::InvalidPath(_))
            ));
        }
        let listed = list(host.root(), "../../..//etc", 1, 9).unwrap();
        assert_eq!(listed.entries.len(), 1);
        assert_eq!(listed.entries[0].path, "/etc/hostname");
        assert!(matches!(
            remove(host.root(), "/", true),
            Err(FileError::InvalidPath(_))
        ));
        assert!(matches!(
            rename(host.root(), "/", "z", true),
            Err(FileError::InvalidPath(_))
        ));
        let long = "a/".repeat(2100);
        assert!(matches!(
            stat(host.root(), &long),
            Err(FileError::InvalidPath(_))
        ));
        assert!(matches!(
            stat(host.root(), "a\0b"),
            Err(FileError::InvalidPath(_))
        ));
        assert_eq!(stat(host.root(), "/").unwrap().kind, Kind::Dir);
    }

    #[test]
    fn planted_symlinks_resolve_inside_the_root() {
        let host = Host::new();
        host.put("etc/hostname", "the machine");
        let secret = host.base.join("secret");
        std::fs::write(&secret, "HOST").unwrap();
        symlink("/", host.rootfs.join("evil")).unwrap();
        symlink("../../../..", host.rootfs.join("evil2")).unwrap();
        symlink("/etc", host.rootfs.join("etc2")).unwrap();
        symlink(&secret, host.rootfs.join("hostfile")).unwrap();
        symlink("../../../../secret", host.rootfs.join("hostfile2")).unwrap();
        for evil in ["evil", "evil2", "etc2/../evil2"] {
            let hostname = format!("{evil}/etc/hostname");
            assert_eq!(host.read(&hostname).unwrap(), "the machine");
            let passwd = host.read(&format!("{evil}/etc/passwd"));
            assert!(matches!(passwd, Err(FileError::NotFound(_))), "{evil}");
        }
        // Intermediate symlinks inside the root resolve.
        assert_eq!(host.read("etc2/hostname").unwrap(), "the machine");
        // Writing through them lands in the root, never on the host.
        let pwned = format!("pwned-{}", std::process::id());
        let host_tmp = Path::new("/tmp").join(&pwned);
        let through = |evil: &str| format!("{evil}/tmp/{pwned}");
        assert!(matches!(
            host.write(&through("evil"), b"x", false),
            Err(FileError::NotFound(_))
        ));
        host.write(&through("evil"), b"x", true).unwrap();
        host.write(&through("evil2"), b"y", false).unwrap();
        assert!(!host_tmp.exists());
        assert_eq!(
            std::fs::read_to_string(host.rootfs.join("tmp").join(&pwned)).unwrap(),
            "y"
        );
        // A final symlink to a host file is neither read nor written through.
        for link in ["hostfile", "hostfile2", "/evil"] {
            assert!(
                matches!(host.read(link), Err(FileError::Unsupported(_))),
                "{link}"
            );
            let written = host.write(link, b"PWNED", false);
            assert!(matches!(written, Err(FileError::Unsupported(_))), "{link}");
            let info = stat(host.root(), link).unwrap();
            assert_eq!(info.kind, Kind::Symlink);
        }
        assert_eq!(
            stat(host.root(), "evil").unwrap().link_target.as_deref(),
            Some("/")
        );
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "HOST");
        // A symlink is renamed and removed itself.
        rename(host.root(), "hostfile", "etc2/moved", false).unwrap();
        assert!(host.rootfs.join("etc/moved").is_symlink());
        remove(host.root(), "etc/moved", false).unwrap();
        remove(host.root(), "evil", true).unwrap();
        assert!(secret.exists() && Path::new("/etc").is_dir());
        assert_eq!(host.names(&host.base), set(&["rootfs", "secret"]));
    }

    #[test]
    fn rename_replaces_only_when_asked() {
        let host = Host::new();
        host.put("a", "A");
        host.put("b", "B");
        host.put("d/inner", "");
        let kept = rename(host.root(), "a", "b", false);
        assert!(matches!(kept, Err(FileError::AlreadyExists(_))));
        rename(host.root(), "/a", "/b", true).unwrap();
        assert_eq!(host.read("b").unwrap(), "A");
        let gone = rename(host.root(), "a", "c", false);
        assert!(matches!(gone, Err(FileError::NotFound(_))));
        let into_itself = rename(host.root(), "d", "d/sub", false);
        assert!(matches!(into_itself, Err(FileError::InvalidPath(_))));
        host.put("e/x", "");
        let over_full = rename(host.root(), "d", "e", true);
        assert!(matches!(over_full, Err(FileError::NotEmpty(_))));
    }

    #[test]
    fn recursive_remove_never_follows_symlinks() {
        let host = Host::new();
        let precious = host.base.join("precious");
        std::fs::create_dir(&precious).unwrap();
        std::fs::write(precious.join("data"), "keep").unwrap();
        host.put("tree/a/b/c/file", "x");
        host.put("tree/top", "x");
        symlink(&precious, host.rootfs.join("tree/abs")).unwrap();
        symlink("../../../precious", host.rootfs.join("tree/a/rel")).unwrap();
        symlink(&precious, host.rootfs.join("tree/a/b/c/deep")).unwrap();
        let not_empty = remove(host.root(), "tree", false);
        assert!(matches!(not_empty, Err(FileError::NotEmpty(_))));
        remove(host.root(), "tree/a/../top", false).unwrap();
        remove(host.root(), "/tree", true).unwrap();
        assert_eq!(host.names(&host.rootfs), set(&[]));
        assert_eq!(host.names(&precious), set(&["data"]));
        assert!(matches!(
            remove(host.root(), "tree", true),
            Err(FileError::NotFound(_))
        ));
        // A path through a symlink to a host dir stays inside too.
        symlink(&precious, host.rootfs.join("p")).unwrap();
        let through = remove(host.root(), "p/data", false);
        assert!(matches!(through, Err(FileError::NotFound(_))));
        assert_eq!(host.names(&precious), set(&["data"]));
    }

    #[test]
    fn special_files_are_not_opened_and_list_reports_kinds() {
        let host = Host::new();
        host.put("dir/file", "12345");
        host.put("dir/sub/deeper", "");
        host.put("real/inside", "");
        let dir = rustix::fs::open(
            host.rootfs.join("dir"),
            OFlags::PATH | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        let node = |name: &str, kind: FileType, dev: u64| {
            rustix::fs::mknodat(&dir, name, kind, Mode::from_raw_mode(0o600), dev).unwrap();
        };
        node("fifo", FileType::Fifo, 0);
        node("null", FileType::CharacterDevice, rustix::fs::makedev(1, 3));
        node("loop", FileType::BlockDevice, rustix::fs::makedev(7, 0));
        let _socket = std::os::unix::net::UnixListener::bind(host.rootfs.join("dir/sock")).unwrap();
        symlink("../real", host.rootfs.join("dir/link")).unwrap();
        symlink(&host.base, host.rootfs.join("dir/out")).unwrap();
        // A FIFO with no writer would block an ordinary open for reading.
        let (tx, rx) = std::sync::mpsc::channel();
        let root = host.root.try_clone().unwrap();
        std::thread::spawn(move || {
            let answers: Vec<_> = ["dir/fifo", "dir/null", "dir/loop", "dir/sock"]
                .into_iter()
                .map(|path| open_read(root.as_fd(), path).map(drop))
                .collect();
            tx.send(answers).unwrap();
        });
        let answers = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("open_read blocked");
        for answer in answers {
            assert!(
                matches!(answer, Err(FileError::Unsupported(_))),
                "{answer:?}"
            );
        }
        assert!(matches!(host.read("dir"), Err(FileError::IsADirectory(_))));
        let listed = list(host.root(), "/dir", 2, 100).unwrap();
        assert!(!listed.truncated);
        let kinds: Vec<(&str, Kind)> = listed
            .entries
            .iter()
            .map(|e| (e.path.as_str(), e.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                ("/dir/fifo", Kind::Fifo),
                ("/dir/file", Kind::File),
                ("/dir/link", Kind::Symlink),
                ("/dir/loop", Kind::BlockDevice),
                ("/dir/null", Kind::CharDevice),
                ("/dir/out", Kind::Symlink),
                ("/dir/sock", Kind::Socket),
                ("/dir/sub", Kind::Dir),
                ("/dir/sub/deeper", Kind::File),
            ]
        );
        let file = &listed.entries[1];
        assert_eq!((file.name.as_str(), file.size), ("file", 5));
        assert_eq!(listed.entries[2].link_target.as_deref(), Some("../real"));
        let json = serde_json::to_value(&listed.entries[4]).unwrap();
        assert_eq!(json["kind"], "char_device");
        // The limit, and depth 1.
        let first = list(host.root(), "dir", 1, 3).unwrap();
        assert!(first.truncated);
        assert_eq!(first.entries.len(), 3);
        let shallow = list(host.root(), "dir", 1, 8).unwrap();
        assert_eq!((shallow.entries.len(), shallow.truncated), (8, false));
        // A symlink at the listed path itself is followed, inside the root.
        let linked = list(host.root(), "dir/link", 3, 100).unwrap();
        assert_eq!(linked.entries[0].path, "/dir/link/inside");
        let root_list = list(host.root(), "/", 0, 100).unwrap();
        assert_eq!(root_list.entries.len(), 2);
    }

    #[test]
    fn too_much_data_leaves_nothing_behind() {
        let host = Host::new();
        host.put("d/old", "old");
        let data = random_bytes(200_000);
        for path in ["d/new", "d/old"] {
            let written = write(
                host.root(),
                path,
                &mut &data[..],
                None,
                false,
                OWNER,
                Some(199_999),
            );
            assert!(matches!(
                written,
                Err(FileError::TooLarge { limit: 199_999, .. })
            ));
        }
        assert_eq!(host.names(&host.rootfs.join("d")), set(&["old"]));
        assert_eq!(host.read("d/old").unwrap(), "old");
        let exact = write(
            host.root(),
            "d/new",
            &mut &data[..],
            None,
            false,
            OWNER,
            Some(200_000),
        );
        assert_eq!(exact.unwrap(), 200_000);
        assert_eq!(host.names(&host.rootfs.join("d")), set(&["new", "old"]));
    }

    /// The Machine swaps `d` between a real directory and a symlink out of the root
    /// (atomically, RENAME_EXCHANGE) while we read, write, stat, list and remove under
    /// it: nothing may ever reach the outside directory.
    ///
    /// Proved able to fail: with `open_in` temporarily opening
    /// `/proc/self/fd/<root>/<path>` (the naive join of the root's path and the client
    /// path), this test failed at once (the stat of `d/f` saw OUTSIDE's 7 bytes), as did
    /// the planted-symlink test (it read the host's /etc/hostname).
    #[test]
    fn a_directory_swapped_for_a_symlink_out_of_the_root_leads_nowhere() {
        let host = Host::new();
        let outside = host.base.join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("f"), "OUTSIDE").unwrap();
        std::fs::write(outside.join("keep"), "").unwrap();
        host.put("d/f", "inside");
        symlink(&outside, host.rootfs.join("d_alt")).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = std::thread::spawn({
            let (stop, rootfs) = (Arc::clone(&stop), host.rootfs.clone());
            move || {
                let dir = rustix::fs::open(&rootfs, OFlags::PATH, Mode::empty()).unwrap();
                let mut swaps = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    rustix::fs::renameat_with(&dir, "d", &dir, "d_alt", RenameFlags::EXCHANGE)
                        .unwrap();
                    swaps += 1;
                }
                swaps
            }
        });
        let missing =
            |e: &FileError| matches!(e, FileError::NotFound(_) | FileError::NotADirectory(_));
        let (mut reads, mut writes) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            match host.read("d/f") {
                Ok(text) => {
                    assert_eq!(text, "inside");
                    reads += 1;
                }
                Err(e) => assert!(missing(&e), "{e}"),
            }
            match host.write("d/g", b"written", false) {
                Ok(_) => writes += 1,
                Err(e) => assert!(missing(&e), "{e}"),
            }
            match stat(host.root(), "d/f") {
                Ok(info) => assert_eq!(info.size, 6),
                Err(e) => assert!(missing(&e), "{e}"),
            }
            match list(host.root(), "d", 2, 10) {
                Ok(listed) => assert!(listed.entries.iter().all(|e| e.name != "keep")),
                Err(e) => assert!(missing(&e), "{e}"),
            }
            match remove(host.root(), "d/keep", false) {
                Ok(()) => panic!("removed d/keep, which only the outside has"),
                Err(e) => assert!(missing(&e), "{e}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
        let swaps = swapper.join().unwrap();
        assert!(
            reads > 0 && writes > 0 && swaps > 0,
            "{reads} {writes} {swaps}"
        );
        assert_eq!(host.names(&outside), set(&["f", "keep"]));
        assert_eq!(
            std::fs::read_to_string(outside.join("f")).unwrap(),
            "OUTSIDE"
        );
        let real = ["d", "d_alt"]
            .map(|name| host.rootfs.join(name))
            .into_iter()
            .find(|p| !p.is_symlink())
            .unwrap();
        assert_eq!(host.names(&real), set(&["f", "g"]));
    }
}
