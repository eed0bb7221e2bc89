//! Checkpoints of a Machine's disk, in constant time: btrfs snapshots of its `disk`
//! subvolume (see [`crate::quota`]), which holds its writable layer.
//!
//! A checkpoint is a read-only snapshot, `checkpoints/<name>`, beside the disk. Nothing is
//! copied: the snapshot shares every extent with the disk until one of them writes, so
//! taking, restoring and forking cost the same for 1 MB written as for 1 GB. The overlay
//! stack never grows (the image's layers plus the one writable layer, as before), so a
//! Machine with a hundred checkpoints mounts the same stack as a fresh one, and sharing and
//! freeing are the filesystem's reference counts on extents, not Berth's.
//!
//! Restore costs one snapshot. A writable snapshot of the checkpoint goes beside the disk
//! as `disk.swap`; the disk itself is renamed into `checkpoints/` as the automatic undo
//! checkpoint (its record written first), and `disk.swap` is renamed to `disk`. The undo
//! is made read-only last ([`seal`]). A crash before the first rename leaves the old disk
//! in place and `disk.swap` is garbage; after it, there is no `disk`, and [`recover`]
//! finishes the restore. A fork's disk is staged there too and exchanged with the empty
//! disk prepare made ([`replace_disk`]).
//!
//! Only a stopped Machine's disk is swapped: an overlay mount holds its upperdir open, so
//! a running Machine is stopped for the exchange and started again by the caller.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::quota::{self, Args, IOC_READ, IOC_WRITE, SUBVOL_ROOT_INO};
use crate::MachineLayout;

/// The directory beside `disk` that holds a Machine's checkpoints.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// Where restore and fork put the new disk before the exchange.
const SWAP_DIR: &str = "disk.swap";

/// `BTRFS_IOC_SNAP_DESTROY`, `struct btrfs_ioctl_vol_args` (4096 bytes).
const IOC_SNAP_DESTROY: u64 = quota::ioc(IOC_WRITE, 15, 4096);
/// `BTRFS_IOC_SNAP_CREATE_V2`, `struct btrfs_ioctl_vol_args_v2` (4096 bytes).
const IOC_SNAP_CREATE_V2: u64 = quota::ioc(IOC_WRITE, 23, 4096);
/// `BTRFS_IOC_SUBVOL_GETFLAGS`, a `__u64`.
const IOC_SUBVOL_GETFLAGS: u64 = quota::ioc(IOC_READ, 25, 8);
/// `BTRFS_IOC_SUBVOL_SETFLAGS`, a `__u64`.
const IOC_SUBVOL_SETFLAGS: u64 = quota::ioc(IOC_WRITE, 26, 8);
/// `BTRFS_SUBVOL_RDONLY`.
const SUBVOL_RDONLY: u64 = 1 << 1;
/// The longest subvolume name the ioctls take (`BTRFS_SUBVOL_NAME_MAX`).
const NAME_MAX: usize = 4039;

impl MachineLayout {
    /// The btrfs subvolume that holds the writable layer (`upper/` and `work/`).
    pub fn disk(&self) -> PathBuf {
        self.dir.join(quota::DISK_DIR)
    }
    /// Where the Machine's checkpoints live.
    pub fn checkpoints(&self) -> PathBuf {
        self.dir.join(CHECKPOINTS_DIR)
    }
    /// One checkpoint's read-only subvolume.
    pub fn checkpoint(&self, name: &str) -> PathBuf {
        self.checkpoints().join(name)
    }
}

/// Why the Machine's disk cannot be checkpointed, if it cannot: it must be a btrfs
/// subvolume (made at create on a worker whose data dir is btrfs with quotas).
pub fn unsupported(layout: &MachineLayout) -> Option<String> {
    if !quota::has_quota_layout(layout) {
        return Some(
            "its writable layer is not in a btrfs subvolume (the worker's data dir is not btrfs \
             with quotas enabled, or the Machine was made before it was)"
                .into(),
        );
    }
    match fs::symlink_metadata(layout.disk()) {
        Ok(meta) if meta.is_dir() && meta.ino() == SUBVOL_ROOT_INO => None,
        Ok(_) => Some(format!("{} is not a subvolume", layout.disk().display())),
        Err(e) => Some(format!("{}: {e}", layout.disk().display())),
    }
}

/// Takes the checkpoint `name` of the disk: a read-only snapshot. Fails with
/// `AlreadyExists` if the name is taken. Blocking; constant time.
pub fn take(layout: &MachineLayout, name: &str) -> io::Result<()> {
    let dir = layout.checkpoints();
    fs::create_dir_all(&dir)?;
    snapshot(&layout.disk(), &dir, name, true)
}

/// Deletes a checkpoint's snapshot; one that is not there is success. Blocking.
pub fn delete(layout: &MachineLayout, name: &str) -> io::Result<()> {
    delete_subvolume(&layout.checkpoints(), name)
}

/// Deletes every checkpoint and a leftover `disk.swap`, before the Machine's directory
/// goes. Blocking.
pub fn delete_all(layout: &MachineLayout) -> io::Result<()> {
    for name in list(layout)? {
        delete(layout, &name)?;
    }
    delete_subvolume(&layout.dir, SWAP_DIR)
}

/// The checkpoint snapshots on disk, by name.
pub fn list(layout: &MachineLayout) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    let entries = match fs::read_dir(layout.checkpoints()) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(names),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() && meta.ino() == SUBVOL_ROOT_INO {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// The steps of a restore the caller acts between: the undo's record must be written
/// before the disk becomes it, and the head before the new disk takes its place.
pub trait RestoreSteps {
    /// After the new disk is staged, before the old one becomes the undo checkpoint.
    fn before_undo(&mut self) -> io::Result<()>;
    /// After the old disk became the undo checkpoint, before the new one is renamed in.
    fn before_swap_in(&mut self) -> io::Result<()>;
}

/// Makes the stopped Machine's disk a writable snapshot of its checkpoint `source`, and
/// its old disk the checkpoint `undo`: one snapshot and two renames, constant time. The
/// new disk gets the limit `limit_mb` (with quotas) before it is the disk, and the undo
/// loses it. The undo is still writable: [`seal`] it. Blocking.
pub fn restore(
    layout: &MachineLayout,
    source: &Path,
    undo: &str,
    limit_mb: Option<u64>,
    steps: &mut dyn RestoreSteps,
) -> io::Result<()> {
    let undo_path = layout
        .checkpoints()
        .join(subvolume_name(undo)?.to_string_lossy().as_ref());
    let swap = layout.dir.join(SWAP_DIR);
    let staged = (|| {
        stage(layout, source)?;
        if let Some(limit_mb) = limit_mb {
            quota::set_limit(&File::open(&swap)?, limit_mb.saturating_mul(1 << 20))?;
        }
        steps.before_undo()?;
        fs::create_dir_all(layout.checkpoints())?;
        fs::rename(layout.disk(), &undo_path)
    })();
    if let Err(error) = staged {
        // The old disk is still the disk: the staged one is garbage.
        recover(layout)?;
        return Err(error);
    }
    // From here the restore can only go forward: without a disk, recovery finishes it.
    let forward = (|| {
        steps.before_swap_in()?;
        fs::rename(&swap, layout.disk())
    })();
    if let Err(error) = forward {
        recover(layout)?;
        return Err(error);
    }
    if limit_mb.is_some() {
        // The undo is never written; a limit left on it only stays in its qgroup.
        if let Err(error) =
            File::open(&undo_path).and_then(|undo| quota::set_limit(&undo, quota::CLEAR_LIMIT))
        {
            tracing::warn!(machine = %layout.id, %error, "clearing the undo checkpoint's limit");
        }
    }
    Ok(())
}

/// Stages a writable snapshot of `source` beside the disk. Blocking.
fn stage(layout: &MachineLayout, source: &Path) -> io::Result<()> {
    delete_subvolume(&layout.dir, SWAP_DIR)?;
    snapshot(source, &layout.dir, SWAP_DIR, false)
}

/// Makes a writable snapshot of `source` (a fork's: another Machine's checkpoint) the
/// stopped Machine's disk in one exchange with the disk it had, which goes; the new disk
/// gets the limit `limit_mb` (with quotas) first. Blocking.
pub fn replace_disk(
    layout: &MachineLayout,
    source: &Path,
    limit_mb: Option<u64>,
) -> io::Result<()> {
    stage(layout, source)?;
    let swap = layout.dir.join(SWAP_DIR);
    if let Some(limit_mb) = limit_mb {
        quota::set_limit(&File::open(&swap)?, limit_mb.saturating_mul(1 << 20))?;
    }
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        &swap,
        rustix::fs::CWD,
        layout.disk(),
        rustix::fs::RenameFlags::EXCHANGE,
    )?;
    if limit_mb.is_some() {
        quota::set_limit(&File::open(&swap)?, quota::CLEAR_LIMIT)?;
    }
    delete_subvolume(&layout.dir, SWAP_DIR)
}

/// After a crash, settles what a restore or fork left under `disk.swap`: without a
/// disk, a restore had made its undo and the snapshot becomes the disk (`true`, the
/// restore is finished); beside a disk, it is garbage and goes. Blocking.
pub fn recover(layout: &MachineLayout) -> io::Result<bool> {
    let swap = layout.dir.join(SWAP_DIR);
    if fs::symlink_metadata(&swap).is_err() {
        return Ok(false);
    }
    match fs::symlink_metadata(layout.disk()) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::rename(&swap, layout.disk())?;
            Ok(true)
        }
        Err(e) => Err(e),
        Ok(_) => delete_subvolume(&layout.dir, SWAP_DIR).map(|()| false),
    }
}

/// Makes a checkpoint read-only, if it is not yet. Blocking.
pub fn seal(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    let mut args = Args::<8>::new();
    quota::ioctl(&file, IOC_SUBVOL_GETFLAGS, &mut args)?;
    let flags = args.u64_at(0);
    if flags & SUBVOL_RDONLY != 0 {
        return Ok(());
    }
    let mut args = Args::<8>::new();
    args.set_u64(0, flags | SUBVOL_RDONLY);
    quota::ioctl(&file, IOC_SUBVOL_SETFLAGS, &mut args)
}

/// Whether `path` is a read-only subvolume.
pub fn is_read_only(path: &Path) -> io::Result<bool> {
    let mut args = Args::<8>::new();
    quota::ioctl(&File::open(path)?, IOC_SUBVOL_GETFLAGS, &mut args)?;
    Ok(args.u64_at(0) & SUBVOL_RDONLY != 0)
}

/// Bytes the subvolume at `path` refers to, and bytes only it holds (what deleting it
/// would free), from its qgroup; `None` without quotas. Updated at each transaction commit.
pub fn sizes(quota: &quota::DiskQuota, path: &Path) -> io::Result<Option<(u64, u64)>> {
    quota.subvolume_bytes(&File::open(path)?)
}

/// Snapshots the subvolume `source` as `parent/name`.
fn snapshot(source: &Path, parent: &Path, name: &str, read_only: bool) -> io::Result<()> {
    let name = subvolume_name(name)?;
    let source = File::open(source)?;
    let parent = File::open(parent)?;
    // struct btrfs_ioctl_vol_args_v2 { __s64 fd; __u64 transid; __u64 flags; __u64
    // unused[4]; char name[4040]; }
    let mut args = Args::<4096>::new();
    args.set_u64(0, source.as_raw_fd() as u64);
    args.set_u64(16, if read_only { SUBVOL_RDONLY } else { 0 });
    let bytes = name.as_bytes();
    args.0[56..56 + bytes.len()].copy_from_slice(bytes);
    quota::ioctl(&parent, IOC_SNAP_CREATE_V2, &mut args)
}

/// Deletes the subvolume `parent/name` with everything in it; absent is success.
fn delete_subvolume(parent: &Path, name: &str) -> io::Result<()> {
    let name = subvolume_name(name)?;
    let dir = match File::open(parent) {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    match fs::symlink_metadata(parent.join(name.to_string_lossy().as_ref())) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(meta) if meta.ino() != SUBVOL_ROOT_INO => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not a subvolume",
                    parent.join(name.to_string_lossy().as_ref()).display()
                ),
            ))
        }
        Ok(_) => {}
    }
    // struct btrfs_ioctl_vol_args { __s64 fd; char name[4088]; }
    let mut args = Args::<4096>::new();
    let bytes = name.as_bytes();
    args.0[8..8 + bytes.len()].copy_from_slice(bytes);
    match quota::ioctl(&dir, IOC_SNAP_DESTROY, &mut args) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// A name the snapshot ioctls take: one path component, no NUL, not too long.
fn subvolume_name(name: &str) -> io::Result<CString> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && name.len() <= NAME_MAX;
    let invalid = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad subvolume name {name:?}"),
        )
    };
    if !plain {
        return Err(invalid());
    }
    CString::new(name).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(IOC_SNAP_DESTROY, 0x5000_940f);
        assert_eq!(IOC_SNAP_CREATE_V2, 0x5000_9417);
        assert_eq!(IOC_SUBVOL_GETFLAGS, 0x8008_9419);
        assert_eq!(IOC_SUBVOL_SETFLAGS, 0x4008_941a);
    }

    #[test]
    fn names_are_one_plain_component() {
        assert!(subvolume_name("cp_1").is_ok());
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(subvolume_name(bad).is_err(), "{bad:?}");
        }
        assert!(subvolume_name(&"x".repeat(NAME_MAX + 1)).is_err());
    }

    #[test]
    fn a_plain_directory_is_not_supported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = MachineLayout::new(dir.path(), "m1");
        assert!(unsupported(&layout).is_some());
    }
}
