//! Volumes: a directory tree on one worker whose size the kernel enforces.
//!
//! Each volume is an ext4 filesystem in a sparse image file, attached to a loop device and
//! mounted on the worker (`<volumes>/<id>/disk.img` on `<volumes>/<id>/berth-volume-fs`).
//! Writing past its size fails with ENOSPC in whatever writes it; Berth counts nothing.
//! Project quotas on the data dir would be the lighter choice, but the kernels Berth is
//! tested on are built without them (see [`crate::quota`]).
//!
//! - The loop device is configured with `LO_FLAGS_AUTOCLEAR`: it detaches itself when the
//!   filesystem is unmounted, so no loop device outlives its volume.
//! - The filesystem's ids are the Machine's own (root is 0 on disk). A Machine sees it
//!   through a detached clone of the mount made idmapped through its user namespace at
//!   start (as its image layers are), so the same files are its root's in whichever
//!   Machine the volume is attached to next.
//! - Extend grows the image, tells the loop device (`LOOP_SET_CAPACITY`) and resizes the
//!   mounted filesystem online (`EXT4_IOC_RESIZE_FS`).
//! - A snapshot freezes the filesystem (`FIFREEZE`), copies the image's data extents
//!   (holes stay holes) and thaws it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// The mount point's name below a volume's dir. The native spawner drops its copies of
/// mounts by this name (see `native::spawner`), so only the worker's own mount pins the
/// filesystem and its loop device.
pub const VOLUME_MOUNT_DIR: &str = "berth-volume-fs";
/// Where a Machine's volume mounts are listed in its `config.json`.
pub const VOLUMES_ANNOTATION: &str = "berth.volumes";

const IMAGE_FILE: &str = "disk.img";
const BLOCK_SIZE: u64 = 4096;

// linux/loop.h
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
// linux/ext4.h: _IOW('f', 16, __u64)
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;
// linux/fs.h: _IOWR('X', 119, int) and _IOWR('X', 120, int)
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Where one volume's files live on the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeLayout {
    pub id: String,
    pub dir: PathBuf,
    /// An encrypted volume's key: added to its filesystem whenever it is mounted.
    pub key: Option<VolumeKey>,
}

impl VolumeLayout {
    pub fn new(volumes_root: &Path, id: &str) -> VolumeLayout {
        VolumeLayout {
            id: id.to_owned(),
            dir: volumes_root.join(id),
            key: None,
        }
    }
    /// The same volume, encrypted with `key` (none: not encrypted).
    pub fn with_key(mut self, key: Option<VolumeKey>) -> VolumeLayout {
        self.key = key;
        self
    }
    /// The sparse filesystem image.
    pub fn image(&self) -> PathBuf {
        self.dir.join(IMAGE_FILE)
    }
    /// Where the filesystem is mounted on the worker.
    pub fn mount_point(&self) -> PathBuf {
        self.dir.join(VOLUME_MOUNT_DIR)
    }
    /// What a Machine mounts: the filesystem's root, or an encrypted volume's data
    /// directory.
    pub fn machine_source(&self, encrypted: bool) -> PathBuf {
        match encrypted {
            true => self.mount_point().join(ENCRYPTED_DATA_DIR),
            false => self.mount_point(),
        }
    }
}

/// A volume's filesystem as `statfs` counts it, in Fly's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VolumeStats {
    pub block_size: u64,
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_avail: u64,
}

/// One volume mounted into a Machine: listed in its `config.json` at create and update,
/// mounted by the driver at every start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// The volume's mount on the worker ([`VolumeLayout::mount_point`]).
    pub source: PathBuf,
    /// The absolute path inside the Machine.
    pub destination: String,
}

/// The volume mounts `config.json` lists (none when the annotation is absent).
pub fn mounts_of(spec: &oci_spec::runtime::Spec) -> Result<Vec<VolumeMount>, String> {
    match spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(VOLUMES_ANNOTATION))
    {
        Some(json) => serde_json::from_str(json).map_err(|e| format!("{VOLUMES_ANNOTATION}: {e}")),
        None => Ok(Vec::new()),
    }
}

fn context(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn errno(e: rustix::io::Errno) -> io::Error {
    io::Error::from(e)
}

/// Makes the volume: a sparse image of `size_bytes` (a copy of `from`, a snapshot image,
/// when given; grown to `size_bytes` if smaller), its ext4 filesystem, and the mount.
/// Anything made is removed again on failure.
pub fn create(layout: &VolumeLayout, size_bytes: u64, from: Option<&Path>) -> io::Result<()> {
    let result = (|| {
        fs::create_dir_all(&layout.dir)
            .map_err(context(format!("create {}", layout.dir.display())))?;
        fs::set_permissions(
            &layout.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        let image = layout.image();
        match from {
            Some(snapshot) => {
                sparse_copy(snapshot, &image)?;
                grow_copy(&image, size_bytes)?;
            }
            None => {
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&image)
                    .map_err(context(format!("create {}", image.display())))?;
                file.set_len(size_bytes)?;
                drop(file);
                mkfs(&image, layout.key.is_some())?;
            }
        }
        mount(layout)
    })();
    if result.is_err() {
        let _ = remove(layout);
    }
    result
}

/// Grows a copied image (a snapshot's, a fork's) to `size_bytes`, its filesystem too,
/// before it is ever mounted.
fn grow_copy(image: &Path, size_bytes: u64) -> io::Result<()> {
    let file = OpenOptions::new().write(true).open(image)?;
    let grow = file.metadata()?.len() < size_bytes;
    if grow {
        file.set_len(size_bytes)?;
    }
    file.sync_all()?;
    drop(file);
    if grow {
        e2fs("e2fsck", &["-f", "-p"], image)?;
        e2fs("resize2fs", &[], image)?;
    }
    Ok(())
}

/// Makes the volume `layout` a copy of `source` as it is now (its filesystem frozen for
/// the copy, so a Machine writing to it is seen at one instant), grown to `size_bytes`,
/// and mounts it. The copy shares blocks with the source where the worker's filesystem
/// can (`FICLONE`), else copies the data extents, holes kept. An encrypted source's copy
/// is readable only with the source's key, which `layout` must carry. Anything made is
/// removed again on failure.
pub fn fork(source: &VolumeLayout, layout: &VolumeLayout, size_bytes: u64) -> io::Result<()> {
    let result = (|| {
        fs::create_dir_all(&layout.dir)
            .map_err(context(format!("create {}", layout.dir.display())))?;
        fs::set_permissions(
            &layout.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        let image = layout.image();
        frozen(source, || clone_or_copy(&source.image(), &image))?;
        grow_copy(&image, size_bytes)?;
        mount(layout)
    })();
    if result.is_err() {
        let _ = remove(layout);
    }
    result
}

/// Runs `copy` with the volume's filesystem frozen (`FIFREEZE`), thawing it after.
fn frozen<T>(layout: &VolumeLayout, copy: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let root = open_root(layout)?;
    // SAFETY: FIFREEZE takes no argument.
    if unsafe { libc::ioctl(root.as_raw_fd(), FIFREEZE, 0) } != 0 {
        return Err(context(format!("freeze volume {}", layout.id))(
            io::Error::last_os_error(),
        ));
    }
    let copied = copy();
    // SAFETY: FITHAW takes no argument.
    if unsafe { libc::ioctl(root.as_raw_fd(), FITHAW, 0) } != 0 {
        return Err(context(format!("thaw volume {}", layout.id))(
            io::Error::last_os_error(),
        ));
    }
    copied
}

/// Copies `from` to the new file `to`: a reflink (`FICLONE`) where the filesystem shares
/// blocks between files, else extent by extent. Answers whether it was a reflink.
fn clone_or_copy(from: &Path, to: &Path) -> io::Result<bool> {
    let source = File::open(from).map_err(context(format!("open {}", from.display())))?;
    let target = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(context(format!("create {}", to.display())))?;
    if rustix::fs::ioctl_ficlone(&target, &source).is_ok() {
        target.sync_all()?;
        return Ok(true);
    }
    drop(target);
    fs::remove_file(to)?;
    sparse_copy(from, to)?;
    Ok(false)
}

fn mkfs(image: &Path, encrypt: bool) -> io::Result<()> {
    // Root owned by 0: the Machine's root once idmapped. Lazy table init keeps mkfs fast
    // on a large image (the kernel zeroes the tables in the background); nodiscard leaves
    // the fresh file's holes alone.
    let features: &[&str] = match encrypt {
        true => &["-O", "encrypt"],
        false => &[],
    };
    let output = Command::new("mkfs.ext4")
        .args(features)
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-b",
            "4096",
            "-E",
            "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        ])
        .arg(image)
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .output()
        .map_err(context("run mkfs.ext4 (e2fsprogs)".into()))?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "mkfs.ext4 {}: {}",
            image.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// Whether the volume's filesystem is mounted on the worker.
pub fn is_mounted(layout: &VolumeLayout) -> io::Result<bool> {
    crate::overlay::is_mount_point(&layout.mount_point())
}

/// Attaches the image to a free loop device and mounts it (nosuid, nodev), then adds an
/// encrypted volume's key. Mounted already is success: recovery calls this for every
/// volume after an agent or host restart.
pub fn mount(layout: &VolumeLayout) -> io::Result<()> {
    mount_fs(layout)?;
    match &layout.key {
        Some(key) => unlock(layout, key),
        None => Ok(()),
    }
}

fn mount_fs(layout: &VolumeLayout) -> io::Result<()> {
    let target = layout.mount_point();
    if is_mounted(layout)? {
        return Ok(());
    }
    match fs::create_dir(&target) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    // A loop device still on the image means its filesystem is alive somewhere (a copy
    // of the mount in another mount namespace outlived ours): mount that one, the same
    // filesystem, never a second instance over the same file. A device whose last mount
    // just went (a restart after a kill) is still listed while the kernel's autoclear
    // detaches it, and mounting it then fails with EIO or ENXIO: wait for it to go.
    for _ in 0..400 {
        let Some(name) = loop_devices_of(&layout.image())?.next() else {
            break;
        };
        let path = Path::new("/dev").join(name);
        match mount_ext4(&path, &target) {
            Err(rustix::io::Errno::IO | rustix::io::Errno::NXIO) => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            mounted => return mounted.map_err(|e| mount_error(e, &path, &target)),
        }
    }
    let image = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(layout.image())
        .map_err(context(format!("open {}", layout.image().display())))?;
    let (device, path) = attach_loop(image.as_fd())?;
    // The loop device clears itself once the last holder (the mount) lets go.
    let mounted = mount_device(&path, &target);
    drop(device);
    mounted
}

fn mount_ext4(device: &Path, target: &Path) -> rustix::io::Result<()> {
    rustix::mount::mount(
        device,
        target,
        "ext4",
        rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV,
        "",
    )
}

fn mount_device(device: &Path, target: &Path) -> io::Result<()> {
    mount_ext4(device, target).map_err(|e| mount_error(e, device, target))
}

fn mount_error(e: rustix::io::Errno, device: &Path, target: &Path) -> io::Error {
    io::Error::new(
        errno(e).kind(),
        format!("mount {} on {}: {e}", device.display(), target.display()),
    )
}

/// Takes a free loop device and backs it with `image`.
fn attach_loop(image: BorrowedFd<'_>) -> io::Result<(File, PathBuf)> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")
        .map_err(context("open /dev/loop-control".into()))?;
    // Another process may take the same free device between the two calls: try again.
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if number < 0 {
            return Err(context("find a free loop device".into())(
                io::Error::last_os_error(),
            ));
        }
        let path = PathBuf::from(format!("/dev/loop{number}"));
        let device = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(context(format!("open {}", path.display())))?;
        // SAFETY: all-zero is a valid loop_config (plain integers and byte arrays).
        let mut config: LoopConfig = unsafe { std::mem::zeroed() };
        config.fd = u32::try_from(image.as_raw_fd()).map_err(io::Error::other)?;
        config.block_size = 0;
        config.info.lo_flags = LO_FLAGS_AUTOCLEAR;
        // SAFETY: LOOP_CONFIGURE reads one struct loop_config, which outlives the call.
        let rc = unsafe {
            libc::ioctl(
                device.as_raw_fd(),
                LOOP_CONFIGURE,
                &config as *const LoopConfig,
            )
        };
        if rc == 0 {
            return Ok((device, path));
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EBUSY) {
            return Err(context(format!("configure {}", path.display()))(error));
        }
    }
    Err(io::Error::other("no free loop device after 16 tries"))
}

/// Removes an encrypted volume's key and unmounts its filesystem (its loop device goes
/// with it). Not mounted is success.
pub fn unmount(layout: &VolumeLayout) -> io::Result<()> {
    if is_mounted(layout)? {
        lock(layout);
    }
    crate::overlay::unmount(&layout.mount_point())
}

/// Unmounts and removes every file of the volume. Idempotent.
pub fn remove(layout: &VolumeLayout) -> io::Result<()> {
    unmount(layout)?;
    match fs::remove_dir_all(&layout.dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(context(format!("remove {}", layout.dir.display()))(e))
        }
        _ => Ok(()),
    }
}

fn open_root(layout: &VolumeLayout) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(layout.mount_point())
        .map_err(context(format!("open {}", layout.mount_point().display())))
}

/// The mounted filesystem's size and free blocks.
pub fn stats(layout: &VolumeLayout) -> io::Result<VolumeStats> {
    if !is_mounted(layout)? {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("volume {} is not mounted", layout.id),
        ));
    }
    let stat = rustix::fs::statfs(layout.mount_point()).map_err(errno)?;
    #[allow(clippy::useless_conversion)]
    let (bsize, blocks, free, avail) = (
        u64::try_from(stat.f_bsize).unwrap_or(0),
        u64::from(stat.f_blocks),
        u64::from(stat.f_bfree),
        u64::from(stat.f_bavail),
    );
    Ok(VolumeStats {
        block_size: bsize,
        blocks,
        blocks_free: free,
        blocks_avail: avail,
    })
}

/// Grows the volume to `size_bytes`. Online (mounted, in use) where the kernel lets the
/// worker (`EXT4_IOC_RESIZE_FS` needs CAP_SYS_RESOURCE); else, with `offline_ok` (no
/// running Machine holds it), unmounted with `resize2fs` and mounted again. Without
/// either it fails with `PermissionDenied` and the filesystem keeps its size. Each step
/// checks first, so a rerun after a crash finishes the job; a smaller size changes
/// nothing.
pub fn extend(layout: &VolumeLayout, size_bytes: u64, offline_ok: bool) -> io::Result<()> {
    mount(layout)?;
    let image = OpenOptions::new().write(true).open(layout.image())?;
    if image.metadata()?.len() < size_bytes {
        image.set_len(size_bytes)?;
        image.sync_all()?;
    }
    drop(image);
    match resize(layout, size_bytes) {
        // EPERM from the resize ioctl (its context keeps the kind, not the errno).
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            if !offline_ok {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "growing volume {} while mounted needs CAP_SYS_RESOURCE, which this worker lacks",
                        layout.id
                    ),
                ));
            }
            resize_offline(layout)
        }
        other => other,
    }
}

/// Unmounts the volume, grows its filesystem to fill the image and mounts it again.
/// Refuses (and mounts it back) when the filesystem is still in use elsewhere.
fn resize_offline(layout: &VolumeLayout) -> io::Result<()> {
    if let Err(error) = release(layout) {
        mount(layout)?;
        return Err(error);
    }
    let result = e2fs("e2fsck", &["-f", "-p"], &layout.image())
        .and_then(|()| e2fs("resize2fs", &[], &layout.image()));
    let mounted = mount(layout);
    result.and(mounted)
}

/// Unmounts the volume and waits until its filesystem is gone everywhere, so that nothing
/// writes its image any more (a move's last pass, an offline resize). Refuses with
/// `PermissionDenied`, naming the processes, when a mount elsewhere keeps it alive; the
/// volume then stays unmounted here.
pub fn release(layout: &VolumeLayout) -> io::Result<()> {
    unmount(layout)?;
    // Autoclear detaches the loop device once the filesystem's last mount is gone; one
    // that stays means another mount (a Machine's) still holds it. Lazily detached mounts
    // and passing copies in other namespaces (a runc create's) go within moments. The
    // kernel detaches an autoclear device asynchronously, within milliseconds: polled
    // finely, since a move's downtime waits for it.
    for _ in 0..400 {
        if loop_devices_of(&layout.image())?.next().is_none() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let holders = holders_of(&layout.image());
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "volume {} is still mounted elsewhere (processes {holders:?})",
            layout.id
        ),
    ))
}

/// Runs an e2fsprogs tool on `image`.
fn e2fs(tool: &str, args: &[&str], image: &Path) -> io::Result<()> {
    let output = Command::new(tool)
        .args(args)
        .arg(image)
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .output()
        .map_err(context(format!("run {tool} (e2fsprogs)")))?;
    // e2fsck exits 1 when it fixed something, which `-p` may.
    let fine = output.status.success() || (tool == "e2fsck" && output.status.code() == Some(1));
    if !fine {
        return Err(io::Error::other(format!(
            "{tool} {}: {}",
            image.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// The `major:minor` of every loop device backing a volume image (`…/volumes/<id>/disk.img`
/// of any worker on the host).
pub fn volume_devices() -> Vec<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let Ok(backing) = fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = Path::new(backing.trim_end_matches('\n'));
        let is_volume = backing.file_name() == Some(std::ffi::OsStr::new(IMAGE_FILE))
            && backing
                .parent()
                .and_then(Path::parent)
                .and_then(Path::file_name)
                == Some(std::ffi::OsStr::new("volumes"));
        if is_volume {
            if let Ok(dev) = fs::read_to_string(entry.path().join("dev")) {
                found.push(dev.trim().to_owned());
            }
        }
    }
    found
}

/// Processes whose mount namespace still has a mount of the loop device of `image`: for
/// the error that names them.
fn holders_of(image: &Path) -> Vec<String> {
    let devices: Vec<String> = loop_devices_of(image)
        .map(|names| {
            names
                .filter_map(|name| fs::read_to_string(format!("/sys/block/{name}/dev")).ok())
                .map(|dev| format!(" {} ", dev.trim()))
                .collect()
        })
        .unwrap_or_default();
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(info) = fs::read_to_string(entry.path().join("mountinfo")) {
            if devices.iter().any(|dev| info.contains(dev.as_str())) {
                let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                pids.push(format!("{pid} {}", comm.trim()));
            }
        }
        if pids.len() >= 8 {
            break;
        }
    }
    pids
}

/// The loop devices backed by `image` (`/sys/block/loop*/loop/backing_file`).
pub fn loop_devices_of(image: &Path) -> io::Result<impl Iterator<Item = String>> {
    let image = fs::canonicalize(image)?;
    let mut found = Vec::new();
    for entry in fs::read_dir("/sys/block")?.flatten() {
        let backing = entry.path().join("loop/backing_file");
        if let Ok(file) = fs::read_to_string(&backing) {
            if Path::new(file.trim_end_matches('\n')) == image {
                found.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    Ok(found.into_iter())
}

/// Tells the loop device its file's size and grows the filesystem to fill it.
fn resize(layout: &VolumeLayout, size_bytes: u64) -> io::Result<()> {
    let root = open_root(layout)?;
    let device = loop_device_of(&root)?;
    // SAFETY: LOOP_SET_CAPACITY takes no argument.
    if unsafe { libc::ioctl(device.as_raw_fd(), LOOP_SET_CAPACITY, 0) } != 0 {
        return Err(context("loop set capacity".into())(
            io::Error::last_os_error(),
        ));
    }
    let current = stats(layout)?;
    let blocks = size_bytes / BLOCK_SIZE;
    if current.block_size == BLOCK_SIZE && current.blocks >= blocks {
        return Ok(());
    }
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64, the new block count, which outlives the call.
    let rc = unsafe { libc::ioctl(root.as_raw_fd(), EXT4_IOC_RESIZE_FS, &blocks as *const u64) };
    if rc != 0 {
        return Err(context(format!("resize the filesystem of {}", layout.id))(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The loop device under a mounted volume, from its device number.
fn loop_device_of(root: &File) -> io::Result<File> {
    let dev = root.metadata()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let uevent = fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))?;
    let name = uevent
        .lines()
        .find_map(|line| line.strip_prefix("DEVNAME="))
        .filter(|name| name.starts_with("loop"))
        .ok_or_else(|| io::Error::other(format!("{major}:{minor} is not a loop device")))?;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(Path::new("/dev").join(name))
}

/// A snapshot's image: its bytes of data and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotImage {
    pub bytes: u64,
    /// `sha256:` of the image's data extents, each as its offset (8 bytes, little
    /// endian) then its bytes: holes cost nothing to hash, and equal images hash equal.
    pub digest: String,
}

/// Copies the volume, consistent at one instant, to `to` (a new file): the filesystem is
/// frozen for the copy, which reads only the image's data extents.
pub fn snapshot(layout: &VolumeLayout, to: &Path) -> io::Result<SnapshotImage> {
    frozen(layout, || sparse_copy(&layout.image(), to)).inspect_err(|_| {
        let _ = fs::remove_file(to);
    })
}

/// Copies `from` to a new file `to` extent by extent (`SEEK_DATA`/`SEEK_HOLE`), keeping
/// its holes, and hashes what it copies.
fn sparse_copy(from: &Path, to: &Path) -> io::Result<SnapshotImage> {
    use rustix::fs::SeekFrom;
    use sha2::Digest;
    use std::os::unix::fs::FileExt;
    let source = File::open(from).map_err(context(format!("open {}", from.display())))?;
    let length = source.metadata()?.len();
    let target = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(context(format!("create {}", to.display())))?;
    target.set_len(length)?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0;
    let mut offset = 0u64;
    while offset < length {
        let data = match rustix::fs::seek(&source, SeekFrom::Data(offset as i64)) {
            Ok(at) => at,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(errno(e)),
        };
        let hole = rustix::fs::seek(&source, SeekFrom::Hole(data as i64)).map_err(errno)?;
        hasher.update(data.to_le_bytes());
        let mut at = data;
        while at < hole {
            let want = usize::try_from((hole - at).min(buffer.len() as u64)).unwrap_or(0);
            let n = source.read_at(&mut buffer[..want], at)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            target.write_all_at(&buffer[..n], at)?;
            at += n as u64;
            bytes += n as u64;
        }
        offset = hole;
    }
    target.sync_all()?;
    Ok(SnapshotImage {
        bytes,
        digest: format!("sha256:{:x}", hasher.finalize()),
    })
}

/// Opens a detached clone of the volume's mount, idmapped through `userns` (the
/// Machine's): what a driver mounts into the Machine at start.
pub fn idmapped_clone(source: &Path, userns: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let clone = clone_mount(source)?;
    crate::overlay::idmap_mount(clone.as_fd(), userns)
        .map_err(|e| io::Error::new(errno(e).kind(), format!("idmap {}: {e}", source.display())))?;
    Ok(clone)
}

/// A detached clone of the mount at `source` (not yet idmapped), or of an encrypted
/// volume's data directory below it. Refuses a `source` that is not on a mounted volume:
/// an unmounted volume's empty directory is on the worker's own disk, where nothing
/// limits what a Machine writes.
pub fn clone_mount(source: &Path) -> io::Result<OwnedFd> {
    use rustix::mount::{open_tree, OpenTreeFlags};
    let mount_point = match source.file_name() {
        Some(name) if name == ENCRYPTED_DATA_DIR => source.parent().unwrap_or(source),
        _ => source,
    };
    let parent = mount_point.parent().unwrap_or(Path::new("/"));
    if fs::metadata(mount_point)?.dev() == fs::metadata(parent)?.dev()
        || fs::metadata(source)?.dev() != fs::metadata(mount_point)?.dev()
    {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("volume {} is not mounted", source.display()),
        ));
    }
    open_tree(
        rustix::fs::CWD,
        source,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
    .map_err(|e| io::Error::new(errno(e).kind(), format!("clone {}: {e}", source.display())))
}

/// Attaches a detached mount onto the directory `target` refers to.
pub fn attach(mount: BorrowedFd<'_>, target: BorrowedFd<'_>) -> io::Result<()> {
    use rustix::mount::{move_mount, MoveMountFlags};
    move_mount(
        mount,
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(errno)
}

/// The directory below an encrypted volume's filesystem root that holds its data, under
/// an fscrypt policy: ext4 cannot encrypt a filesystem's root directory, so the Machine
/// is given this one.
pub const ENCRYPTED_DATA_DIR: &str = "data";

// linux/fscrypt.h
const FS_IOC_SET_ENCRYPTION_POLICY: libc::c_ulong =
    ioc(IOC_READ, b'f', 19, std::mem::size_of::<PolicyV1Size>());
const FS_IOC_GET_ENCRYPTION_POLICY_EX: libc::c_ulong = ioc(IOC_READ | IOC_WRITE, b'f', 22, 9);
const FS_IOC_ADD_ENCRYPTION_KEY: libc::c_ulong = ioc(
    IOC_READ | IOC_WRITE,
    b'f',
    23,
    std::mem::size_of::<AddKeyArg>(),
);
const FS_IOC_REMOVE_ENCRYPTION_KEY: libc::c_ulong = ioc(
    IOC_READ | IOC_WRITE,
    b'f',
    24,
    std::mem::size_of::<RemoveKeyArg>(),
);
const IOC_WRITE: libc::c_ulong = 1;
const IOC_READ: libc::c_ulong = 2;
const FSCRYPT_POLICY_V2: u8 = 2;
const FSCRYPT_MODE_AES_256_XTS: u8 = 1;
const FSCRYPT_MODE_AES_256_CTS: u8 = 4;
const FSCRYPT_POLICY_FLAGS_PAD_32: u8 = 3;
const FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER: u32 = 2;
const KEY_SIZE: usize = 64;

/// `_IOC(dir, type, nr, size)`.
const fn ioc(dir: libc::c_ulong, kind: u8, nr: u8, size: usize) -> libc::c_ulong {
    (dir << 30)
        | ((size as libc::c_ulong) << 16)
        | ((kind as libc::c_ulong) << 8)
        | nr as libc::c_ulong
}

/// `struct fscrypt_policy_v1`'s size, which the set ioctl's number is built from (it takes
/// a v2 policy too, told apart by its version byte).
#[repr(C)]
struct PolicyV1Size {
    _bytes: [u8; 12],
}

/// `struct fscrypt_policy_v2`.
#[repr(C)]
#[derive(Clone, Copy)]
struct PolicyV2 {
    version: u8,
    contents_encryption_mode: u8,
    filenames_encryption_mode: u8,
    flags: u8,
    log2_data_unit_size: u8,
    reserved: [u8; 3],
    master_key_identifier: [u8; 16],
}

/// `struct fscrypt_get_policy_ex_arg` with room for a v2 policy.
#[repr(C)]
struct GetPolicyExArg {
    policy_size: u64,
    policy: PolicyV2,
}

/// `struct fscrypt_key_specifier` naming a key by its identifier.
#[repr(C)]
#[derive(Clone, Copy)]
struct KeySpecifier {
    kind: u32,
    reserved: u32,
    identifier: [u8; 16],
    rest: [u8; 16],
}

/// `struct fscrypt_add_key_arg` followed by the raw key it carries.
#[repr(C)]
struct AddKeyArg {
    key_spec: KeySpecifier,
    raw_size: u32,
    key_id: u32,
    reserved: [u32; 8],
}

#[repr(C)]
struct AddKeyWithRaw {
    arg: AddKeyArg,
    raw: [u8; KEY_SIZE],
}

/// `struct fscrypt_remove_key_arg`.
#[repr(C)]
struct RemoveKeyArg {
    key_spec: KeySpecifier,
    removal_status_flags: u32,
    reserved: [u32; 5],
}

/// An encrypted volume's fscrypt master key: 64 random bytes. Never printed (its `Debug`
/// hides it); stored by the agent and sent only to the worker a volume moves to.
#[derive(Clone, PartialEq, Eq)]
pub struct VolumeKey([u8; KEY_SIZE]);

impl std::fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VolumeKey(<hidden>)")
    }
}

impl Drop for VolumeKey {
    /// The key's bytes do not outlive it in this copy.
    fn drop(&mut self) {
        for byte in self.0.iter_mut() {
            // SAFETY: `byte` is a valid, aligned, exclusive reference into the key; the
            // volatile write keeps the compiler from dropping the wipe as dead.
            unsafe { std::ptr::write_volatile(byte, 0) };
        }
    }
}

impl VolumeKey {
    /// A new key from the kernel's random source.
    pub fn generate() -> io::Result<VolumeKey> {
        let mut key = [0u8; KEY_SIZE];
        let mut filled = 0;
        while filled < KEY_SIZE {
            match rustix::rand::getrandom(&mut key[filled..], rustix::rand::GetRandomFlags::empty())
            {
                Ok(n) => filled += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(errno) => {
                    return Err(context("read random bytes for a volume key".into())(
                        errno.into(),
                    ))
                }
            }
        }
        Ok(VolumeKey(key))
    }
}

impl Serialize for VolumeKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let hex: String = self.0.iter().map(|byte| format!("{byte:02x}")).collect();
        serializer.serialize_str(&hex)
    }
}

impl<'de> Deserialize<'de> for VolumeKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let hex = String::deserialize(deserializer)?;
        let bad = || serde::de::Error::custom("a volume key is 128 hex digits");
        if hex.len() != KEY_SIZE * 2 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut key = [0u8; KEY_SIZE];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).map_err(|_| bad())?;
        }
        Ok(VolumeKey(key))
    }
}

/// Adds the volume's key to its mounted filesystem (which then shows the data in
/// plaintext to every mount of it) and, the first time, makes the data directory under a
/// v2 policy (AES-256-XTS contents, AES-256-CTS names) of that key. A key that is not the
/// directory's is refused.
fn unlock(layout: &VolumeLayout, key: &VolumeKey) -> io::Result<()> {
    let root = open_root(layout)?;
    let identifier =
        add_key(&root, key).map_err(context(format!("add the key of volume {}", layout.id)))?;
    let data = layout.mount_point().join(ENCRYPTED_DATA_DIR);
    match fs::create_dir(&data) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            return Err(context(format!("create {}", data.display()))(e))
        }
        _ => {}
    }
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(&data)
        .map_err(context(format!("open {}", data.display())))?;
    match policy_identifier(&dir)? {
        Some(found) if found == identifier => Ok(()),
        Some(_) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("volume {}'s data is encrypted with another key", layout.id),
        )),
        // New (or a create cut short between the directory and its policy): the kernel
        // refuses a policy on a directory that is not empty.
        None => {
            set_policy(&dir, identifier).map_err(context(format!("encrypt {}", data.display())))
        }
    }
}

/// Removes the key from the filesystem before the worker's mount goes, so that its
/// plaintext is not reachable any more. Best effort: the kernel wipes a filesystem's keys
/// with its last mount anyway.
fn lock(layout: &VolumeLayout) {
    let data = layout.mount_point().join(ENCRYPTED_DATA_DIR);
    let Ok(dir) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(data)
    else {
        return;
    };
    if let Ok(Some(identifier)) = policy_identifier(&dir) {
        let mut arg = RemoveKeyArg {
            key_spec: key_spec(identifier),
            removal_status_flags: 0,
            reserved: [0; 5],
        };
        // SAFETY: FS_IOC_REMOVE_ENCRYPTION_KEY reads and writes one fscrypt_remove_key_arg,
        // which outlives the call.
        let _ = unsafe {
            libc::ioctl(
                dir.as_raw_fd(),
                FS_IOC_REMOVE_ENCRYPTION_KEY,
                &mut arg as *mut RemoveKeyArg,
            )
        };
    }
}

fn key_spec(identifier: [u8; 16]) -> KeySpecifier {
    KeySpecifier {
        kind: FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER,
        reserved: 0,
        identifier,
        rest: [0; 16],
    }
}

/// Adds `key` to the filesystem of `root`; answers the identifier the kernel derived.
fn add_key(root: &File, key: &VolumeKey) -> io::Result<[u8; 16]> {
    let mut arg = AddKeyWithRaw {
        arg: AddKeyArg {
            key_spec: key_spec([0; 16]),
            raw_size: KEY_SIZE as u32,
            key_id: 0,
            reserved: [0; 8],
        },
        raw: key.0,
    };
    // SAFETY: FS_IOC_ADD_ENCRYPTION_KEY reads an fscrypt_add_key_arg followed by
    // `raw_size` bytes of key (both in `arg`, which outlives the call) and writes the
    // identifier into its key_spec.
    let rc = unsafe {
        libc::ioctl(
            root.as_raw_fd(),
            FS_IOC_ADD_ENCRYPTION_KEY,
            &mut arg as *mut AddKeyWithRaw,
        )
    };
    let identifier = arg.arg.key_spec.identifier;
    // The key's bytes do not outlive the call in this copy.
    arg.raw = [0; KEY_SIZE];
    std::hint::black_box(&arg.raw);
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(identifier)
}

/// The identifier of the key of the directory's v2 policy; `None` when it has no policy.
fn policy_identifier(dir: &File) -> io::Result<Option<[u8; 16]>> {
    let mut arg = GetPolicyExArg {
        policy_size: std::mem::size_of::<PolicyV2>() as u64,
        // SAFETY: all-zero is a valid fscrypt_policy_v2 (plain bytes).
        policy: unsafe { std::mem::zeroed() },
    };
    // SAFETY: FS_IOC_GET_ENCRYPTION_POLICY_EX reads policy_size and writes at most that
    // many bytes of policy into `arg`, which outlives the call.
    let rc = unsafe {
        libc::ioctl(
            dir.as_raw_fd(),
            FS_IOC_GET_ENCRYPTION_POLICY_EX,
            &mut arg as *mut GetPolicyExArg,
        )
    };
    if rc != 0 {
        let error = io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ENODATA) => Ok(None),
            _ => Err(context("read an encryption policy".into())(error)),
        };
    }
    if arg.policy.version != FSCRYPT_POLICY_V2 {
        return Err(io::Error::other("not a v2 encryption policy"));
    }
    Ok(Some(arg.policy.master_key_identifier))
}

fn set_policy(dir: &File, identifier: [u8; 16]) -> io::Result<()> {
    let policy = PolicyV2 {
        version: FSCRYPT_POLICY_V2,
        contents_encryption_mode: FSCRYPT_MODE_AES_256_XTS,
        filenames_encryption_mode: FSCRYPT_MODE_AES_256_CTS,
        flags: FSCRYPT_POLICY_FLAGS_PAD_32,
        log2_data_unit_size: 0,
        reserved: [0; 3],
        master_key_identifier: identifier,
    };
    // SAFETY: FS_IOC_SET_ENCRYPTION_POLICY reads one fscrypt_policy_v2 (told by its
    // version byte), which outlives the call.
    let rc = unsafe {
        libc::ioctl(
            dir.as_raw_fd(),
            FS_IOC_SET_ENCRYPTION_POLICY,
            &policy as *const PolicyV2,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fscrypt_ioctl_numbers_are_the_kernels() {
        // The values of linux/fscrypt.h's macros on x86_64 and arm64.
        assert_eq!(FS_IOC_SET_ENCRYPTION_POLICY, 0x800c_6613);
        assert_eq!(FS_IOC_GET_ENCRYPTION_POLICY_EX, 0xc009_6616);
        assert_eq!(FS_IOC_ADD_ENCRYPTION_KEY, 0xc050_6617);
        assert_eq!(FS_IOC_REMOVE_ENCRYPTION_KEY, 0xc040_6618);
        assert_eq!(std::mem::size_of::<PolicyV2>(), 24);
        assert_eq!(std::mem::size_of::<AddKeyWithRaw>(), 80 + KEY_SIZE);
    }

    #[test]
    fn a_volume_key_round_trips_and_is_never_printed() {
        let key = VolumeKey::generate().unwrap();
        assert_ne!(key.0, [0; KEY_SIZE]);
        assert_ne!(key, VolumeKey::generate().unwrap());
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(json.len(), 2 + 2 * KEY_SIZE);
        assert_eq!(serde_json::from_str::<VolumeKey>(&json).unwrap(), key);
        let layout = VolumeLayout::new(Path::new("/v"), "vol_1").with_key(Some(key));
        let shown = format!("{layout:?}");
        assert!(!shown.contains(&json[1..9]), "{shown}");
        assert!(serde_json::from_str::<VolumeKey>("\"00\"").is_err());
    }
}
