//! The Machine's rootfs: an overlayfs of the image layers under its own upperdir.

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountFlags, UnmountFlags};

/// The kernel copies mount options into one page.
const MAX_OPTIONS_LEN: usize = 4095;

/// Mounts an overlay at `target`. `lowerdirs` are bottom-first (image layer order);
/// overlayfs wants the top layer first, so they are reversed here. Already mounted is
/// success, so a retried start does not stack a second overlay.
pub fn mount(lowerdirs: &[PathBuf], upper: &Path, work: &Path, target: &Path) -> io::Result<()> {
    if is_mount_point(target)? {
        return Ok(());
    }
    let layers = OpenedLayers::open(lowerdirs, upper, work)?;
    let data = layers.options()?;
    rustix::mount::mount(
        "overlay",
        target,
        "overlay",
        MountFlags::empty(),
        data.as_str(),
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!(
                "mount overlay on {}: {e} (options {data})",
                target.display()
            ),
        )
    })
}

/// The overlay option string; rejects paths overlayfs cannot take unescaped.
pub fn mount_options(lowerdirs: &[PathBuf], upper: &Path, work: &Path) -> io::Result<String> {
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    if lowerdirs.is_empty() {
        return Err(invalid("overlay needs at least one lowerdir".into()));
    }
    let check = |p: &Path| -> io::Result<String> {
        let s = p
            .to_str()
            .ok_or_else(|| invalid(format!("non-utf8 path {}", p.display())))?;
        if !p.is_absolute() || s.contains([':', ',', '\\']) {
            return Err(invalid(format!(
                "overlay path must be absolute without ':' ',' '\\': {s}"
            )));
        }
        Ok(s.to_owned())
    };
    let lower = lowerdirs
        .iter()
        .rev()
        .map(|p| check(p))
        .collect::<io::Result<Vec<_>>>()?
        .join(":");
    // index=off: an upperdir may be remounted over a different set of layers after an
    // image update, which the inode index would refuse.
    let data = format!(
        "lowerdir={lower},upperdir={},workdir={},index=off",
        check(upper)?,
        check(work)?
    );
    if data.len() > MAX_OPTIONS_LEN {
        return Err(invalid(format!(
            "overlay options are {} bytes, over one page",
            data.len()
        )));
    }
    Ok(data)
}

/// The layer directories of an overlay, opened, so the mount options can name them as
/// `/proc/self/fd/N`. The kernel shows the option strings as given in every
/// `/proc/*/mountinfo`, a Machine's own included; so it sees fd numbers, not the host's
/// data-dir paths. The strings are also short, so more layers fit in one page. Needs
/// the host's /proc, and the fds open until the mount is made.
pub struct OpenedLayers {
    /// Bottom first, as given.
    lower: Vec<OwnedFd>,
    upper: OwnedFd,
    work: OwnedFd,
}

impl OpenedLayers {
    pub fn open(lowerdirs: &[PathBuf], upper: &Path, work: &Path) -> io::Result<OpenedLayers> {
        if lowerdirs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "overlay needs at least one lowerdir",
            ));
        }
        let open = |dir: &Path| {
            rustix::fs::open(
                dir,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!("open {}: {e}", dir.display()),
                )
            })
        };
        Ok(OpenedLayers {
            lower: lowerdirs
                .iter()
                .map(|dir| open(dir))
                .collect::<io::Result<_>>()?,
            upper: open(upper)?,
            work: open(work)?,
        })
    }

    /// The overlay option string naming the opened directories.
    pub fn options(&self) -> io::Result<String> {
        let name = |fd: &OwnedFd| PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        let lower: Vec<PathBuf> = self.lower.iter().map(name).collect();
        mount_options(&lower, &name(&self.upper), &name(&self.work))
    }
}

/// Unmounts `target`, detaching lazily when it is busy. Not mounted is success.
pub fn unmount(target: &Path) -> io::Result<()> {
    // Loop in case mounts were stacked on the same point.
    for _ in 0..8 {
        if !is_mount_point(target)? {
            return Ok(());
        }
        match rustix::mount::unmount(target, UnmountFlags::empty()) {
            Ok(()) => {}
            Err(rustix::io::Errno::BUSY) => {
                rustix::mount::unmount(target, UnmountFlags::DETACH).map_err(|e| {
                    io::Error::new(
                        io::Error::from(e).kind(),
                        format!("detach {}: {e}", target.display()),
                    )
                })?;
            }
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => {
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("unmount {}: {e}", target.display()),
                ))
            }
        }
    }
    Err(io::Error::other(format!(
        "{} is still mounted",
        target.display()
    )))
}

/// Whether `path` is the mount point of some mount in this mount namespace.
/// A missing path is not a mount point.
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    let path = match fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    let found = mount_points(&info).any(|p| Path::new(&p) == path);
    Ok(found)
}

/// The mount point field of each `/proc/self/mountinfo` line, unescaped.
pub fn mount_points(mountinfo: &str) -> impl Iterator<Item = String> + '_ {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4).map(unescape))
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            let octal = bytes
                .get(i + 1..i + 4)
                .and_then(|o| std::str::from_utf8(o).ok());
            if let Some(v) = octal.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A Machine's overlay layers, opened for the new mount API: each image layer a detached,
/// idmapped clone (host root's files are the Machine root's, through the user namespace
/// `userns`), and the upper and work dirs through one detached clone of their parent
/// (overlayfs wants both on one mount). Handed to overlayfs by descriptor, so nothing is
/// attached on the host and the Machine's mountinfo names no host path
/// (`lowerdir+=/,upperdir=/upper`). The upperdir keeps host ids (see `userns`):
/// overlayfs writes it as its mounter, whose ids an idmapped upper could not hold.
///
/// Closing the last descriptor of a detached mount tears it down, which waits for an RCU
/// grace period: the native supervisor holds these until its Machine exits, off the start
/// path.
pub struct OverlayLayers {
    /// Top layer first, as overlayfs takes them.
    lower: Vec<OwnedFd>,
    /// The clone that `upper` and `work` are opened in; held so it outlives them.
    _parent: OwnedFd,
    upper: OwnedFd,
    work: OwnedFd,
}

impl OverlayLayers {
    /// `lowerdirs` bottom first (image layer order).
    pub fn open(
        lowerdirs: &[PathBuf],
        upper: &Path,
        work: &Path,
        userns: BorrowedFd<'_>,
    ) -> io::Result<OverlayLayers> {
        use rustix::mount::{open_tree, OpenTreeFlags};
        if lowerdirs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "overlay needs at least one lowerdir",
            ));
        }
        let clone = |path: &Path| {
            open_tree(
                rustix::fs::CWD,
                path,
                OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
            )
            .map_err(context(format!("clone {}", path.display())))
        };
        let lower = lowerdirs
            .iter()
            .rev()
            .map(|layer| {
                let fd = clone(layer)?;
                idmap_mount(fd.as_fd(), userns)
                    .map_err(context(format!("idmap layer {}", layer.display())))?;
                Ok(fd)
            })
            .collect::<io::Result<Vec<_>>>()?;
        // They may be Berth's links into the Machine's quota subvolume; the Machine
        // cannot reach either path.
        let upper = fs::canonicalize(upper)?;
        let work = fs::canonicalize(work)?;
        let parent_path = upper
            .parent()
            .filter(|p| work.parent() == Some(*p))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "upper and work must be siblings",
                )
            })?;
        let parent = clone(parent_path)?;
        let open = |path: &Path| {
            rustix::fs::openat(
                parent.as_fd(),
                path.file_name().unwrap_or_default(),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(context(format!("open {}", path.display())))
        };
        let (upper, work) = (open(&upper)?, open(&work)?);
        Ok(OverlayLayers {
            lower,
            _parent: parent,
            upper,
            work,
        })
    }

    /// Every descriptor on `dir` itself, nothing cloned: for unit tests of a caller that
    /// never mounts them.
    #[cfg(test)]
    pub(crate) fn unmounted(dir: &Path) -> io::Result<OverlayLayers> {
        let open = || {
            rustix::fs::open(
                dir,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
        };
        Ok(OverlayLayers {
            lower: vec![open()?],
            _parent: open()?,
            upper: open()?,
            work: open()?,
        })
    }

    /// Every descriptor held, for a child that must keep them across a close-all.
    pub fn raw_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.lower
            .iter()
            .chain([&self._parent, &self.upper, &self.work])
            .map(|fd| fd.as_raw_fd())
            .collect()
    }

    /// Makes the overlay and mounts it at `target`.
    pub fn mount(&self, target: &Path) -> io::Result<()> {
        use rustix::mount::{
            fsconfig_create, fsconfig_set_fd, fsconfig_set_string, fsmount, fsopen, move_mount,
            FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags,
        };
        let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
            .map_err(context("fsopen overlay".into()))?;
        // Top layer first: each "lowerdir+" goes below the ones before it.
        for layer in &self.lower {
            fsconfig_set_fd(fs.as_fd(), "lowerdir+", layer.as_fd())
                .map_err(context("add a layer".into()))?;
        }
        fsconfig_set_fd(fs.as_fd(), "upperdir", self.upper.as_fd())
            .map_err(context("set upperdir".into()))?;
        fsconfig_set_fd(fs.as_fd(), "workdir", self.work.as_fd())
            .map_err(context("set workdir".into()))?;
        // See `mount_options`: an upperdir may meet another set of layers after an update.
        fsconfig_set_string(fs.as_fd(), "index", "off").map_err(context("set index=off".into()))?;
        fsconfig_create(fs.as_fd()).map_err(context("create overlay".into()))?;
        let mount = fsmount(
            fs.as_fd(),
            FsMountFlags::FSMOUNT_CLOEXEC,
            MountAttrFlags::empty(),
        )
        .map_err(context("fsmount overlay".into()))?;
        move_mount(
            mount.as_fd(),
            "",
            rustix::fs::CWD,
            target,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(context(format!("mount overlay on {}", target.display())))
    }
}

/// [`OverlayLayers::open`] and [`OverlayLayers::mount`] at once, for a caller that mounts
/// the rootfs on the host (the runc driver).
pub fn mount_idmapped(
    lowerdirs: &[PathBuf],
    upper: &Path,
    work: &Path,
    userns: BorrowedFd<'_>,
    target: &Path,
) -> io::Result<()> {
    OverlayLayers::open(lowerdirs, upper, work, userns)?.mount(target)
}

fn context(what: String) -> impl FnOnce(rustix::io::Errno) -> io::Error {
    move |e| io::Error::new(io::Error::from(e).kind(), format!("{what}: {e}"))
}

/// Makes a detached mount idmapped through `userns`.
pub(crate) fn idmap_mount(
    mount: BorrowedFd<'_>,
    userns: BorrowedFd<'_>,
) -> Result<(), rustix::io::Errno> {
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: mount_setattr reads `size_of::<mount_attr>()` bytes of a valid struct and an
    // empty, NUL-terminated path; both outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(
            rustix::io::Errno::from_io_error(&io::Error::last_os_error())
                .unwrap_or(rustix::io::Errno::INVAL),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_list_top_layer_first() {
        let lowers = vec![PathBuf::from("/l/bottom"), PathBuf::from("/l/top")];
        let data = mount_options(&lowers, Path::new("/m/upper"), Path::new("/m/work")).unwrap();
        assert_eq!(
            data,
            "lowerdir=/l/top:/l/bottom,upperdir=/m/upper,workdir=/m/work,index=off"
        );
    }

    #[test]
    fn options_reject_bad_paths() {
        let up = Path::new("/u");
        let wk = Path::new("/w");
        assert!(mount_options(&[], up, wk).is_err());
        assert!(mount_options(&[PathBuf::from("/a:b")], up, wk).is_err());
        assert!(mount_options(&[PathBuf::from("rel")], up, wk).is_err());
        let many: Vec<PathBuf> = (0..200)
            .map(|i| PathBuf::from(format!("/layers/{i:040}")))
            .collect();
        assert!(mount_options(&many, up, wk).is_err());
    }

    #[test]
    fn opened_layers_are_named_by_fd() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["a", "b", "u", "w"] {
            fs::create_dir(dir.path().join(d)).unwrap();
        }
        let p = |d: &str| dir.path().join(d);
        let layers = OpenedLayers::open(&[p("a"), p("b")], &p("u"), &p("w")).unwrap();
        let data = layers.options().unwrap();
        assert!(!data.contains(dir.path().to_str().unwrap()), "{data}");
        let top = format!("/proc/self/fd/{}", layers.lower[1].as_raw_fd());
        assert!(data.starts_with(&format!("lowerdir={top}:")), "{data}");
        assert!(OpenedLayers::open(&[p("missing")], &p("u"), &p("w")).is_err());
    }

    #[test]
    fn unescapes_mountinfo() {
        let info =
            "36 35 98:0 / /mnt/a\\040b rw - ext4 /dev/x rw\n37 35 98:0 / / rw - ext4 /dev/y rw\n";
        let points: Vec<String> = mount_points(info).collect();
        assert_eq!(points, ["/mnt/a b", "/"]);
    }

    #[test]
    fn root_is_a_mount_point_and_missing_is_not() {
        assert!(is_mount_point(Path::new("/")).unwrap());
        assert!(!is_mount_point(Path::new("/definitely/not/here")).unwrap());
    }
}
