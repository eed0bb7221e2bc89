//! Paths inside a Machine's rootfs, resolved by the kernel inside it, never through it.
//!
//! The rootfs is the image's: any component of a path in it may be a symlink that points
//! at the host (`proc -> /`, `dev -> ../../..`). Every lookup here is an `openat2` under
//! an fd of the rootfs with `RESOLVE_IN_ROOT` (`..` and absolute symlinks stop at the
//! rootfs) and `RESOLVE_NO_MAGICLINKS`; what is mounted is then mounted onto the opened
//! fd, so nothing can redirect it between the check and the mount.
//!
//! Mounting onto an fd: `mount(2)` with the target `/proc/self/fd/N`, as runc does,
//! rather than the new mount API. It keeps the option strings of `config.json` as they
//! are (the new API would split each into `fsconfig` keys and mount attributes), and the
//! `/proc` it goes through is checked to be a procfs first ([`check_procfs`]): before
//! pivot_root it is the host's, after it the Machine's own, mounted here on a checked fd.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// How often a lookup is retried when the kernel saw a rename during it (`EAGAIN`).
const RETRIES: usize = 16;

/// The path, inside the Machine, as `openat2` takes it under the rootfs fd.
fn relative(path: &Path) -> &Path {
    match path.strip_prefix("/") {
        Ok(rest) if rest.as_os_str().is_empty() => Path::new("."),
        Ok(rest) => rest,
        Err(_) => path,
    }
}

/// Opens `path` (as the Machine sees it) under `root`, resolved inside `root`.
/// `extra` adds resolve flags, e.g. `NO_SYMLINKS`.
pub(crate) fn open(
    root: BorrowedFd<'_>,
    path: &Path,
    flags: OFlags,
    extra: ResolveFlags,
) -> rustix::io::Result<OwnedFd> {
    let how = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | extra;
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(
            root,
            relative(path),
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            how,
        ) {
            Err(Errno::AGAIN) if tries < RETRIES => tries += 1,
            other => return other,
        }
    }
}

/// The `/proc/self/fd/N` path that names what `fd` is open on.
pub(crate) fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Fails unless `/proc` is a procfs, so that [`fd_path`] names what the fd is open on.
pub(crate) fn check_procfs() -> io::Result<()> {
    let fs = rustix::fs::statfs("/proc")?;
    if fs.f_type != rustix::fs::PROC_SUPER_MAGIC {
        return Err(io::Error::other("/proc is not a procfs"));
    }
    Ok(())
}

/// Opens the directory `destination` of a mount under `root`, making missing directories
/// one at a time inside the root (mkdirat on the parent's fd), owned by `owner` (the host
/// id of the Machine's root) when given: as if the Machine had made them, so no host id
/// lands in its writable layer (which a move refuses). Intermediate symlinks are followed
/// within the root; the destination itself must be a real directory: a symlink (or
/// anything else) there is refused, as runc refuses one at `/proc` and `/sys`.
pub(crate) fn mount_target(
    root: BorrowedFd<'_>,
    destination: &Path,
    owner: Option<u32>,
) -> Result<OwnedFd, String> {
    let refuse = |why: String| format!("mount destination {}: {why}", destination.display());
    let mut components = Vec::new();
    for component in destination.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => components.push(name),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(refuse("must not contain '..'".into()))
            }
        }
    }
    let Some(last) = components.len().checked_sub(1) else {
        return Err(refuse("must not be the root".into()));
    };
    // The common case, every directory there already: one lookup.
    let whole = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW;
    match open(root, destination, whole, ResolveFlags::empty()) {
        Ok(fd) => return Ok(fd),
        Err(Errno::NOENT) => {}
        Err(Errno::NOTDIR) => {
            return Err(refuse(format!(
                "is a {} in the image, not a directory; refused",
                kind_of(root, destination)
            )))
        }
        Err(e) => return Err(refuse(e.to_string())),
    }
    let mut parent = rustix::io::fcntl_dupfd_cloexec(root, 0).map_err(|e| refuse(e.to_string()))?;
    let mut walked = PathBuf::from("/");
    for (i, name) in components.into_iter().enumerate() {
        walked.push(name);
        let mut flags = OFlags::PATH | OFlags::DIRECTORY;
        if i == last {
            flags |= OFlags::NOFOLLOW;
        }
        let opened = match open(root, &walked, flags, ResolveFlags::empty()) {
            Err(Errno::NOENT) => {
                match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o755)) {
                    Ok(()) => {
                        if let Some(id) = owner {
                            // SAFETY: never -1 (chown's "no change"): a Machine's base is
                            // the start of a 65536-id range, below u32::MAX.
                            let (uid, gid) = unsafe {
                                (rustix::fs::Uid::from_raw(id), rustix::fs::Gid::from_raw(id))
                            };
                            rustix::fs::chownat(
                                &parent,
                                name,
                                Some(uid),
                                Some(gid),
                                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                            )
                            .map_err(|e| refuse(format!("chown {}: {e}", walked.display())))?;
                        }
                    }
                    Err(Errno::EXIST) => {}
                    Err(e) => return Err(refuse(format!("create {}: {e}", walked.display()))),
                }
                open(root, &walked, flags, ResolveFlags::empty())
            }
            other => other,
        };
        parent = match opened {
            Ok(fd) => fd,
            Err(Errno::NOTDIR) if i == last => {
                return Err(refuse(format!(
                    "is a {} in the image, not a directory; refused",
                    kind_of(root, &walked)
                )))
            }
            Err(e) => return Err(refuse(format!("{}: {e}", walked.display()))),
        };
    }
    Ok(parent)
}

/// Where the kernel filesystems go: each must be a directory in the image, or missing.
pub(crate) const KERNEL_MOUNT_POINTS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// Fails when `destination` exists under `root` as anything but a directory (a symlink
/// included); missing is fine. For the runc driver, before runc sees the rootfs: runc
/// 1.1 follows a symlinked `/dev` on the host when it makes `/dev/ptmx` and friends.
pub(crate) fn check_not_symlinked(root: BorrowedFd<'_>, destination: &Path) -> Result<(), String> {
    match open(
        root,
        destination,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW,
        ResolveFlags::empty(),
    ) {
        Ok(_) | Err(Errno::NOENT) => Ok(()),
        Err(Errno::NOTDIR) => Err(format!(
            "mount destination {}: is a {} in the image, not a directory; refused",
            destination.display(),
            kind_of(root, destination)
        )),
        Err(e) => Err(format!("mount destination {}: {e}", destination.display())),
    }
}

/// What is at `path` under `root`, in words, without following it; for messages.
fn kind_of(root: BorrowedFd<'_>, path: &Path) -> &'static str {
    let stat = open(
        root,
        path,
        OFlags::PATH | OFlags::NOFOLLOW,
        ResolveFlags::empty(),
    )
    .and_then(|fd| rustix::fs::fstat(fd.as_fd()));
    match stat.map(|st| FileType::from_raw_mode(st.st_mode)) {
        Ok(FileType::Symlink) => "symlink",
        Ok(FileType::RegularFile) => "file",
        Ok(FileType::Directory) => "directory",
        Ok(_) => "special file",
        Err(_) => "path that cannot be opened",
    }
}

/// A path that must exist as itself for a mask or a read-only bind: opened with no
/// symlink anywhere in it, the last component included (`RESOLVE_NO_SYMLINKS` without
/// `O_NOFOLLOW` fails on a trailing one too). `None` when it is missing, which is
/// skipped, as runc does; anything else that stops the lookup is an error.
pub(crate) fn existing_no_symlinks(
    root: BorrowedFd<'_>,
    path: &Path,
) -> Result<Option<OwnedFd>, String> {
    match open(root, path, OFlags::PATH, ResolveFlags::NO_SYMLINKS) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::NOENT) => Ok(None),
        Err(Errno::LOOP) => Err(format!("{}: has a symlink; refused", path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn root_of(dir: &Path) -> OwnedFd {
        rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap()
    }

    /// The path an fd is open on, as the host sees it.
    fn where_is(fd: &OwnedFd) -> PathBuf {
        std::fs::read_link(fd_path(fd.as_fd())).unwrap()
    }

    #[test]
    fn mount_targets_stay_inside_the_root() {
        let host = tempfile::tempdir().unwrap();
        let outside = host.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let rootfs = host.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("dev")).unwrap();
        std::fs::create_dir_all(rootfs.join("real")).unwrap();
        // Symlinks out of the root, absolute and relative, at and above destinations.
        symlink(&outside, rootfs.join("proc")).unwrap();
        symlink("../outside", rootfs.join("sys")).unwrap();
        symlink(&outside, rootfs.join("dev/pts")).unwrap();
        symlink("../../outside", rootfs.join("dev/shm")).unwrap();
        symlink("../../real", rootfs.join("up")).unwrap();
        symlink("/real", rootfs.join("inside")).unwrap();
        symlink(outside.join("new"), rootfs.join("gone")).unwrap();
        let root = root_of(&rootfs);
        for dest in ["/proc", "/sys", "/dev/pts", "/dev/shm"] {
            let err = mount_target(root.as_fd(), Path::new(dest), None).unwrap_err();
            assert!(err.contains("symlink in the image"), "{dest}: {err}");
        }
        // Above the destination, a symlink is followed inside the root: `..` stops at
        // it, an absolute target starts from it, a dangling one is not created.
        let fd = mount_target(root.as_fd(), Path::new("/up/x/y"), None).unwrap();
        // Made for a Machine: its root's, not the host's.
        mount_target(root.as_fd(), Path::new("/made/for/it"), Some(123_456)).unwrap();
        for made in ["made", "made/for", "made/for/it"] {
            let meta = std::fs::metadata(rootfs.join(made)).unwrap();
            let owner = std::os::unix::fs::MetadataExt::uid(&meta);
            let group = std::os::unix::fs::MetadataExt::gid(&meta);
            assert_eq!((owner, group), (123_456, 123_456), "{made}");
        }
        assert_eq!(where_is(&fd), rootfs.join("real/x/y"));
        assert!(mount_target(root.as_fd(), Path::new("/gone/x"), None).is_err());
        let fd = mount_target(root.as_fd(), Path::new("/inside/mnt"), None).unwrap();
        assert_eq!(where_is(&fd), rootfs.join("real/mnt"));
        let fd = mount_target(root.as_fd(), Path::new("/dev/mqueue"), None).unwrap();
        assert_eq!(where_is(&fd), rootfs.join("dev/mqueue"));
        assert!(mount_target(root.as_fd(), Path::new("/a/../b"), None).is_err());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn masked_paths_refuse_symlinks_and_skip_missing_ones() {
        let host = tempfile::tempdir().unwrap();
        let secret = host.path().join("secret");
        std::fs::write(&secret, "host").unwrap();
        let rootfs = host.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("proc/sys")).unwrap();
        std::fs::write(rootfs.join("proc/kcore"), "").unwrap();
        symlink(&secret, rootfs.join("proc/keys")).unwrap();
        symlink("/proc", rootfs.join("p")).unwrap();
        let root = root_of(&rootfs);
        let found = |p: &str| existing_no_symlinks(root.as_fd(), Path::new(p));
        let kind = |p: &str| {
            let fd = found(p).unwrap().unwrap();
            FileType::from_raw_mode(rustix::fs::fstat(fd).unwrap().st_mode)
        };
        assert_eq!(kind("/proc/kcore"), FileType::RegularFile);
        assert_eq!(kind("/proc/sys"), FileType::Directory);
        assert!(matches!(found("/proc/acpi"), Ok(None)));
        assert!(found("/proc/keys").unwrap_err().contains("symlink"));
        assert!(found("/p/kcore").unwrap_err().contains("symlink"));
    }

    /// The mount-destination swap race (CVE-2019-19921): the destination is replaced by
    /// a symlink out of the root after it was checked. The mount goes onto the fd, so it
    /// lands on the directory that was checked, wherever it is now.
    ///
    /// Proved able to fail: mounting onto `rootfs/proc` by path instead of `fd_path`
    /// put the tmpfs on the outside directory. Needs root (skipped otherwise).
    #[test]
    fn a_destination_swapped_after_its_lookup_still_gets_the_mount() {
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let host = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(host.path()).unwrap();
        let outside = base.join("outside");
        let rootfs = base.join("rootfs");
        std::fs::create_dir(&outside).unwrap();
        std::fs::create_dir_all(rootfs.join("proc")).unwrap();
        let root = root_of(&rootfs);
        let target = mount_target(root.as_fd(), Path::new("/proc"), None).unwrap();
        std::fs::rename(rootfs.join("proc"), rootfs.join("proc.old")).unwrap();
        symlink(&outside, rootfs.join("proc")).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &fd_path(target.as_fd()),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let points: Vec<String> = crate::overlay::mount_points(&info)
            .filter(|p| Path::new(p).starts_with(&base))
            .collect();
        for point in &points {
            nix::mount::umount2(point.as_str(), nix::mount::MntFlags::MNT_DETACH).unwrap();
        }
        assert_eq!(points, [rootfs.join("proc.old").display().to_string()]);
    }
}
