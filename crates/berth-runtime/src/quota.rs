//! A disk quota per Machine, enforced by the filesystem.
//!
//! The worker's data dir must be on btrfs with quotas enabled (`btrfs quota enable`, or
//! `--simple` with btrfs-progs 6.7 or later). At create, each Machine gets a subvolume,
//! `machines/<id>/disk/`, holding its `upper/` and `work/` (the layout's `upper` and
//! `work` are relative symlinks into it, so overlay's renames from work into upper stay
//! inside one subvolume), and the subvolume's qgroup gets a limit on exclusive bytes.
//! Writing past it fails in the Machine with EDQUOT ("Disk quota exceeded").
//!
//! Subvolume ids are allocated by the filesystem and never reused, so workers sharing
//! one filesystem cannot collide, and nothing needs recording: the qgroup is found from
//! the subvolume itself. Start does nothing here: the overlay is mounted over the same
//! paths as without a quota.
//!
//! ext4 and XFS project quotas are the other filesystem-enforced option; the kernels
//! Berth is tested on are built without them (no `CONFIG_QFMT_V2`, no `CONFIG_XFS_QUOTA`),
//! so they are not implemented.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::MachineLayout;

/// `statfs(2)` magic of btrfs.
const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;
/// The inode number of every subvolume's root directory.
pub(crate) const SUBVOL_ROOT_INO: u64 = 256;
/// A qgroup limit value that clears the limit.
pub(crate) const CLEAR_LIMIT: u64 = u64::MAX;
const LIMIT_MAX_EXCL: u64 = 1 << 1;
/// The subvolume directory below a Machine's dir.
pub(crate) const DISK_DIR: &str = "disk";

// The btrfs ioctls used here (linux/btrfs.h), as _IOC(dir, 0x94, nr, size).
pub(crate) const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0x94 << 8) | nr
}
pub(crate) const IOC_WRITE: u64 = 1;
pub(crate) const IOC_READ: u64 = 2;
/// `BTRFS_IOC_SUBVOL_CREATE`, `struct btrfs_ioctl_vol_args` (4096 bytes).
const IOC_SUBVOL_CREATE: u64 = ioc(IOC_WRITE, 14, 4096);
/// `BTRFS_IOC_INO_LOOKUP`, `struct btrfs_ioctl_ino_lookup_args` (4096 bytes).
const IOC_INO_LOOKUP: u64 = ioc(IOC_READ | IOC_WRITE, 18, 4096);
/// `BTRFS_IOC_FS_INFO`, `struct btrfs_ioctl_fs_info_args` (1024 bytes).
const IOC_FS_INFO: u64 = ioc(IOC_READ, 31, 1024);
/// `BTRFS_IOC_QGROUP_LIMIT`, `struct btrfs_ioctl_qgroup_limit_args` (48 bytes).
const IOC_QGROUP_LIMIT: u64 = ioc(IOC_READ, 43, 48);

/// `--disk-quota`: whether a worker must, may or must not enforce disk quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuotaMode {
    /// Refuse to start where the data dir cannot enforce quotas.
    Require,
    /// Enforce where the data dir can; warn once at startup otherwise.
    #[default]
    Auto,
    /// Never set quotas.
    Off,
}

impl FromStr for QuotaMode {
    type Err = String;
    fn from_str(s: &str) -> Result<QuotaMode, String> {
        match s {
            "require" => Ok(QuotaMode::Require),
            "auto" => Ok(QuotaMode::Auto),
            "off" => Ok(QuotaMode::Off),
            other => Err(format!("{other:?} is not one of require, auto, off")),
        }
    }
}

/// What a worker found about its data dir at startup.
#[derive(Debug, Clone)]
pub enum QuotaSupport {
    Enforced(DiskQuota),
    /// Quotas are not enforced, and why.
    NotEnforced(String),
}

impl QuotaSupport {
    /// Checks `dir` (the worker's `machines/` dir) under `mode`: `Err` only for
    /// [`QuotaMode::Require`] on a filesystem that cannot enforce quotas.
    pub fn detect(dir: &Path, mode: QuotaMode) -> Result<QuotaSupport, String> {
        if mode == QuotaMode::Off {
            return Ok(QuotaSupport::NotEnforced("--disk-quota off".into()));
        }
        match DiskQuota::probe(dir) {
            Ok(quota) => Ok(QuotaSupport::Enforced(quota)),
            Err(why) if mode == QuotaMode::Require => Err(format!(
                "--disk-quota require: {} cannot enforce disk quotas: {why}",
                dir.display()
            )),
            Err(why) => Ok(QuotaSupport::NotEnforced(why)),
        }
    }

    pub fn enforced(&self) -> Option<&DiskQuota> {
        match self {
            QuotaSupport::Enforced(quota) => Some(quota),
            QuotaSupport::NotEnforced(_) => None,
        }
    }
}

/// A Machine's disk use against its limit, as the filesystem counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    pub used_bytes: u64,
    pub limit_bytes: u64,
}

impl DiskUsage {
    /// Within 1 MiB of the limit: the next write of any size may fail. The filesystem
    /// keeps a little below the limit for its own reservations, so "full" is not
    /// `used == limit`.
    pub fn is_full(&self) -> bool {
        self.used_bytes.saturating_add(1 << 20) >= self.limit_bytes
    }
}

/// Disk quotas on one btrfs filesystem with quotas enabled.
#[derive(Debug, Clone)]
pub struct DiskQuota {
    /// `/sys/fs/btrfs/<fsid>/qgroups`, where the kernel shows each qgroup's usage.
    qgroups: PathBuf,
}

impl DiskQuota {
    /// Why `dir` cannot enforce quotas, or the handle that does.
    pub fn probe(dir: &Path) -> Result<DiskQuota, String> {
        let stat = rustix::fs::statfs(dir).map_err(|e| format!("statfs: {e}"))?;
        // f_type's width differs between architectures.
        #[allow(clippy::useless_conversion)]
        let fs_type = i64::from(stat.f_type);
        if fs_type != BTRFS_SUPER_MAGIC {
            return Err(
                "the filesystem is not btrfs (per-Machine disk quotas need btrfs with quotas enabled)"
                    .into(),
            );
        }
        let file = File::open(dir).map_err(|e| format!("open: {e}"))?;
        let fsid = fs_id(&file).map_err(|e| format!("btrfs filesystem info: {e}"))?;
        let qgroups = Path::new("/sys/fs/btrfs").join(fsid).join("qgroups");
        if !qgroups.is_dir() {
            return Err("btrfs quotas are not enabled (btrfs quota enable <mount point>)".into());
        }
        Ok(DiskQuota { qgroups })
    }

    /// Create (and update): makes the Machine's `disk` subvolume with `upper/` and
    /// `work/` in it and the layout's symlinks to them, and sets its limit. Each step
    /// checks first, so a rerun after a crash finishes the job. A Machine whose upperdir
    /// is a plain directory (made before quotas were on) is left as it is: false.
    pub fn prepare(&self, layout: &MachineLayout, limit_mb: u64) -> io::Result<bool> {
        let upper = layout.upper();
        if let Ok(meta) = fs::symlink_metadata(&upper) {
            if !meta.file_type().is_symlink() {
                return Ok(false);
            }
        }
        fs::create_dir_all(&layout.dir)?;
        let disk = layout.dir.join(DISK_DIR);
        match fs::symlink_metadata(&disk) {
            Ok(meta) if meta.is_dir() && meta.ino() == SUBVOL_ROOT_INO => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a subvolume", disk.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => create_subvolume(&layout.dir)?,
            Err(e) => return Err(e),
        }
        for (name, link) in [("upper", &upper), ("work", &layout.work())] {
            let inside = disk.join(name);
            match fs::create_dir(&inside) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
            match symlink(Path::new(DISK_DIR).join(name), link) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        }
        let bytes = limit_mb.saturating_mul(1 << 20);
        set_limit(&File::open(&disk)?, bytes)?;
        Ok(true)
    }

    /// Destroy: clears the limit before the subvolume goes, so the qgroup the filesystem
    /// keeps of a deleted subvolume holds no limit. A Machine without one is fine.
    pub fn release(&self, layout: &MachineLayout) -> io::Result<()> {
        match File::open(layout.dir.join(DISK_DIR)) {
            Ok(disk) => set_limit(&disk, CLEAR_LIMIT),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The Machine's use and limit; `None` when it has no quota.
    pub fn usage(&self, layout: &MachineLayout) -> io::Result<Option<DiskUsage>> {
        let disk = match File::open(layout.dir.join(DISK_DIR)) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let dir = self.qgroups.join(format!("0_{}", subvolume_id(&disk)?));
        let read = |name: &str| -> io::Result<u64> {
            let text = fs::read_to_string(dir.join(name))?;
            text.trim().parse().map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}/{name}: {e}", dir.display()),
                )
            })
        };
        let limit_bytes = read("max_exclusive")?;
        if limit_bytes == 0 {
            return Ok(None);
        }
        // Written but not yet committed data is held as a reservation.
        let used_bytes = read("exclusive")?.saturating_add(read("rsv_data").unwrap_or(0));
        Ok(Some(DiskUsage {
            used_bytes,
            limit_bytes,
        }))
    }
}

impl DiskQuota {
    /// The bytes the subvolume of `file` refers to and the bytes only it holds, from its
    /// qgroup; `None` when the filesystem keeps no qgroup for it.
    pub fn subvolume_bytes(&self, file: &File) -> io::Result<Option<(u64, u64)>> {
        let dir = self.qgroups.join(format!("0_{}", subvolume_id(file)?));
        let read = |name: &str| -> io::Result<Option<u64>> {
            match fs::read_to_string(dir.join(name)) {
                Ok(text) => text.trim().parse().map(Some).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}/{name}: {e}", dir.display()),
                    )
                }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        };
        Ok(read("referenced")?.zip(read("exclusive")?))
    }
}

/// An ioctl argument: the kernel's structs are all u64-aligned.
#[repr(C, align(8))]
pub(crate) struct Args<const N: usize>(pub(crate) [u8; N]);

impl<const N: usize> Args<N> {
    pub(crate) fn new() -> Args<N> {
        Args([0; N])
    }
    pub(crate) fn u64_at(&self, offset: usize) -> u64 {
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.0[offset..offset + 8]);
        u64::from_ne_bytes(word)
    }
    pub(crate) fn set_u64(&mut self, offset: usize, value: u64) {
        self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
    }
}

/// Runs a btrfs ioctl whose argument struct is `N` bytes, the size `request` encodes.
pub(crate) fn ioctl<const N: usize>(
    file: &File,
    request: u64,
    args: &mut Args<N>,
) -> io::Result<()> {
    debug_assert_eq!((request >> 16) & 0x3fff, N as u64);
    // SAFETY: `args` is an N-byte, 8-aligned buffer, the size and layout the request
    // encodes, borrowed mutably for the whole call.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            request as libc::c_ulong,
            args.0.as_mut_ptr(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The filesystem's UUID, the name of its directory in `/sys/fs/btrfs`.
fn fs_id(file: &File) -> io::Result<String> {
    // struct btrfs_ioctl_fs_info_args: max_id, num_devices, then the 16-byte fsid.
    let mut args = Args::<1024>::new();
    ioctl(file, IOC_FS_INFO, &mut args)?;
    let hex: String = args.0[16..32].iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

/// Makes the subvolume `disk` in `parent`.
fn create_subvolume(parent: &Path) -> io::Result<()> {
    let dir = File::open(parent)?;
    // struct btrfs_ioctl_vol_args { __s64 fd; char name[4088]; }, name NUL-terminated.
    let mut args = Args::<4096>::new();
    let name = DISK_DIR.as_bytes();
    args.0[8..8 + name.len()].copy_from_slice(name);
    ioctl(&dir, IOC_SUBVOL_CREATE, &mut args)
}

/// The id of the subvolume `file` is in, which is its level-0 qgroup's id too.
pub(crate) fn subvolume_id(file: &File) -> io::Result<u64> {
    // struct btrfs_ioctl_ino_lookup_args { __u64 treeid; __u64 objectid; char name[4080]; }
    // treeid 0 asks for the tree of `file` itself.
    let mut args = Args::<4096>::new();
    args.set_u64(8, SUBVOL_ROOT_INO);
    ioctl(file, IOC_INO_LOOKUP, &mut args)?;
    Ok(args.u64_at(0))
}

/// Sets (or with [`CLEAR_LIMIT`] clears) the exclusive-bytes limit of the subvolume of
/// `file`.
pub(crate) fn set_limit(file: &File, bytes: u64) -> io::Result<()> {
    // struct btrfs_ioctl_qgroup_limit_args { __u64 qgroupid; struct btrfs_qgroup_limit
    // { flags, max_rfer, max_excl, rsv_rfer, rsv_excl } }; qgroupid 0 is `file`'s own.
    let mut args = Args::<48>::new();
    args.set_u64(8, LIMIT_MAX_EXCL);
    args.set_u64(24, bytes);
    ioctl(file, IOC_QGROUP_LIMIT, &mut args)
}

/// Whether the Machine's writable layer lives in a quota subvolume (made at create
/// while quotas were enforced).
pub fn has_quota_layout(layout: &MachineLayout) -> bool {
    fs::symlink_metadata(layout.upper()).is_ok_and(|m| m.file_type().is_symlink())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(IOC_SUBVOL_CREATE, 0x5000_940e);
        assert_eq!(IOC_INO_LOOKUP, 0xd000_9412);
        assert_eq!(IOC_FS_INFO, 0x8400_941f);
        assert_eq!(IOC_QGROUP_LIMIT, 0x8030_942b);
    }

    #[test]
    fn modes_parse() {
        assert_eq!("require".parse(), Ok(QuotaMode::Require));
        assert_eq!("auto".parse(), Ok(QuotaMode::Auto));
        assert_eq!("off".parse(), Ok(QuotaMode::Off));
        assert!("on".parse::<QuotaMode>().is_err());
    }

    #[test]
    fn tmp_is_not_enforced_under_auto_and_refused_under_require() {
        let dir = tempfile::tempdir().unwrap();
        if DiskQuota::probe(dir.path()).is_ok() {
            return; // a host whose temp dir is btrfs with quotas
        }
        assert!(matches!(
            QuotaSupport::detect(dir.path(), QuotaMode::Auto),
            Ok(QuotaSupport::NotEnforced(_))
        ));
        assert!(QuotaSupport::detect(dir.path(), QuotaMode::Require).is_err());
        assert!(matches!(
            QuotaSupport::detect(dir.path(), QuotaMode::Off),
            Ok(QuotaSupport::NotEnforced(_))
        ));
    }

    #[test]
    fn full_is_within_a_mebibyte() {
        let limit = 64 << 20;
        assert!(DiskUsage {
            used_bytes: limit - 20_000,
            limit_bytes: limit
        }
        .is_full());
        assert!(!DiskUsage {
            used_bytes: limit / 2,
            limit_bytes: limit
        }
        .is_full());
    }
}
