//! The disk bytes of a tree that it does not share with another tree.
//!
//! A forked Machine's disk is a btrfs snapshot of the checkpoint it was forked from, so
//! their files share physical extents until one side writes. Billing the fork for what it
//! does not share compares where the checkpoint's data lies on the device
//! ([`physical_extents`]) with where the fork's does ([`usage_outside`]).
//!
//! The walks go by directory fd and `*at` calls that never follow a symlink, so a running
//! Machine that swaps one of its directories for a symlink cannot lead them out of its tree.

use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::rc::Rc;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, Stat, CWD};
use rustix::io::Errno;
use rustix::ioctl::{ReadWriteOpcode, Updater};

/// The physical byte ranges on the filesystem of the data of every regular file under a tree.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExtentSet {
    /// `(start, end)`, end exclusive: sorted, none empty, no two overlapping or touching.
    ranges: Vec<(u64, u64)>,
}

impl ExtentSet {
    /// The set covering `(start, len)` extents given in any order, overlapping or not.
    fn from_extents(extents: impl IntoIterator<Item = (u64, u64)>) -> ExtentSet {
        let mut ranges: Vec<(u64, u64)> = extents
            .into_iter()
            .filter(|&(_, len)| len > 0)
            .map(|(start, len)| (start, start.saturating_add(len)))
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        ExtentSet { ranges: merged }
    }

    /// The set covering both.
    pub fn union(&self, other: &ExtentSet) -> ExtentSet {
        let both = self.ranges.iter().chain(&other.ranges);
        ExtentSet::from_extents(both.map(|&(start, end)| (start, end - start)))
    }

    /// The bytes of this set that lie outside `other`.
    pub fn bytes_outside(&self, other: &ExtentSet) -> u64 {
        self.ranges
            .iter()
            .map(|&(start, end)| (end - start) - other.overlap(start, end - start))
            .sum()
    }

    /// The total bytes covered.
    pub fn len_bytes(&self) -> u64 {
        self.ranges.iter().map(|&(start, end)| end - start).sum()
    }

    /// The bytes of `[start, start + len)` that lie in the set.
    pub fn overlap(&self, start: u64, len: u64) -> u64 {
        let end = start.saturating_add(len);
        // Ends are sorted too, as the ranges are disjoint.
        let first = self.ranges.partition_point(|&(_, e)| e <= start);
        self.ranges[first..]
            .iter()
            .take_while(|&&(s, _)| s < end)
            .map(|&(s, e)| e.min(end) - s.max(start))
            .sum()
    }
}

/// Walks `dir` (never following symlinks) and collects every regular file's physical
/// extents with `FS_IOC_FIEMAP`, without forcing writeback: data not yet on disk has no
/// address and is left out, as are inline and tail-packed data. Files that vanish during
/// the walk are skipped; files on a filesystem without FIEMAP have no extents. Blocking.
///
/// btrfs reports a compressed extent with its disk address but its uncompressed length,
/// so such a range can reach past the extent's real end.
pub fn physical_extents(dir: &Path) -> io::Result<ExtentSet> {
    let mut buf = Fiemap::new();
    let mut extents = Vec::new();
    walk(dir, |parent, name, stat| {
        if !is(stat, FileType::RegularFile) {
            return Ok(());
        }
        if let Some((file, _)) = open_regular(parent, name)? {
            for_each_extent(file.as_fd(), &mut buf, |start, len| {
                extents.push((start, len));
            })?;
        }
        Ok(())
    })?;
    Ok(ExtentSet::from_extents(extents))
}

/// What `du` would count for `dir` (`st_blocks * 512` of every inode once, directories and
/// symlinks included, never following links), except that a regular file's bytes in
/// extents that lie in `shared` are not counted (never going below zero for a file).
/// Entries that vanish during the walk are skipped; files on a filesystem without FIEMAP
/// are counted fully. Blocking.
pub fn usage_outside(dir: &Path, shared: &ExtentSet) -> io::Result<u64> {
    let mut buf = None;
    let mut seen = HashSet::new();
    let mut total = 0u64;
    walk(dir, |parent, name, stat| {
        // Hard links are counted once, as du does.
        if stat.st_nlink > 1
            && !is(stat, FileType::Directory)
            && !seen.insert((stat.st_dev, stat.st_ino))
        {
            return Ok(());
        }
        let mut bytes = blocks_bytes(stat);
        if is(stat, FileType::RegularFile) && !shared.ranges.is_empty() {
            let Some((file, stat)) = open_regular(parent, name)? else {
                return Ok(());
            };
            let mut in_shared = 0u64;
            let buf = buf.get_or_insert_with(Fiemap::new);
            for_each_extent(file.as_fd(), buf, |start, len| {
                in_shared = in_shared.saturating_add(shared.overlap(start, len));
            })?;
            bytes = blocks_bytes(&stat).saturating_sub(in_shared);
        }
        total = total.saturating_add(bytes);
        Ok(())
    })?;
    Ok(total)
}

fn is(stat: &Stat, kind: FileType) -> bool {
    FileType::from_raw_mode(stat.st_mode) == kind
}

fn blocks_bytes(stat: &Stat) -> u64 {
    (stat.st_blocks as u64).saturating_mul(512)
}

/// Calls `visit` with the parent directory, name and lstat of `dir` and of everything
/// below it. `dir` itself must exist; entries that vanish, or are swapped for something
/// else, mid-walk are skipped.
fn walk(
    dir: &Path,
    mut visit: impl FnMut(BorrowedFd<'_>, &CStr, &Stat) -> io::Result<()>,
) -> io::Result<()> {
    let root = CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let stat = rustix::fs::statat(CWD, &root, AtFlags::SYMLINK_NOFOLLOW)?;
    visit(CWD, &root, &stat)?;
    if !is(&stat, FileType::Directory) {
        return Ok(());
    }
    // Directories still to read, by parent fd (None: the cwd) and name. A parent's fd
    // stays open until its last child directory is opened: about one fd per level.
    let mut pending: Vec<(Option<Rc<OwnedFd>>, CString)> = vec![(None, root)];
    while let Some((parent, name)) = pending.pop() {
        let parent = parent.as_deref().map_or(CWD, AsFd::as_fd);
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(parent, &name, flags, Mode::empty()) {
            Ok(fd) => Rc::new(fd),
            // Gone, or now a file (NOTDIR) or a symlink (LOOP).
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut names = Vec::new();
        for entry in Dir::read_from(&*fd)? {
            let entry = entry?;
            let name = entry.file_name();
            if name != c"." && name != c".." {
                names.push(name.to_owned());
            }
        }
        for name in names {
            let stat = match rustix::fs::statat(&*fd, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => stat,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            visit(fd.as_fd(), &name, &stat)?;
            if is(&stat, FileType::Directory) {
                pending.push((Some(Rc::clone(&fd)), name));
            }
        }
    }
    Ok(())
}

/// Opens `name` in `dir` if it is (still) a regular file; None if it is gone or is not.
fn open_regular(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<(OwnedFd, Stat)>> {
    // It was a regular file at lstat; if it has since been swapped for a FIFO or a tty,
    // opening must neither block nor make it our controlling terminal.
    let flags =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
    let file = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(file) => file,
        Err(Errno::NOENT | Errno::LOOP) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let stat = rustix::fs::fstat(&file)?;
    Ok(is(&stat, FileType::RegularFile).then_some((file, stat)))
}

// FIEMAP, from linux/fiemap.h and linux/fs.h.
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_UNKNOWN: u32 = 0x2;
const FIEMAP_EXTENT_DELALLOC: u32 = 0x4;
const FIEMAP_EXTENT_NOT_ALIGNED: u32 = 0x100;
const FIEMAP_EXTENT_DATA_INLINE: u32 = 0x200;
/// Extents whose physical address is not a range of the device the file owns: not yet
/// allocated, or data packed into metadata or with other files' tails.
const NO_ADDRESS: u32 = FIEMAP_EXTENT_UNKNOWN
    | FIEMAP_EXTENT_DELALLOC
    | FIEMAP_EXTENT_DATA_INLINE
    | FIEMAP_EXTENT_NOT_ALIGNED;
/// Extents asked for per ioctl.
const BATCH: usize = 256;

/// `struct fiemap` without its flexible array.
#[repr(C)]
struct FiemapHeader {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

/// `struct fiemap_extent`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

/// `struct fiemap` with room for [`BATCH`] extents.
#[repr(C)]
struct Fiemap {
    header: FiemapHeader,
    extents: [FiemapExtent; BATCH],
}

const _: () = assert!(std::mem::size_of::<FiemapHeader>() == 32);
const _: () = assert!(std::mem::size_of::<FiemapExtent>() == 56);
const _: () = assert!(std::mem::offset_of!(Fiemap, extents) == 32);

/// `FS_IOC_FIEMAP`, `_IOWR('f', 11, struct fiemap)`: the size is the header's.
type FiemapOpcode = ReadWriteOpcode<b'f', 11, FiemapHeader>;

impl Fiemap {
    fn new() -> Box<Fiemap> {
        Box::new(Fiemap {
            header: FiemapHeader {
                fm_start: 0,
                fm_length: 0,
                fm_flags: 0,
                fm_mapped_extents: 0,
                fm_extent_count: 0,
                fm_reserved: 0,
            },
            extents: [FiemapExtent::default(); BATCH],
        })
    }
}

/// Calls `each` with the physical `(start, len)` of every extent of the regular file
/// `file` that has a real address; none on a filesystem without FIEMAP.
fn for_each_extent(
    file: BorrowedFd<'_>,
    buf: &mut Fiemap,
    mut each: impl FnMut(u64, u64),
) -> io::Result<()> {
    let mut from = 0u64;
    loop {
        // No FIEMAP_FLAG_SYNC: billing must never force writeback.
        buf.header = FiemapHeader {
            fm_start: from,
            fm_length: u64::MAX - from,
            fm_flags: 0,
            fm_mapped_extents: 0,
            fm_extent_count: BATCH as u32,
            fm_reserved: 0,
        };
        // SAFETY: `buf` is a `struct fiemap` (layout asserted above) followed by room for
        // the `fm_extent_count` extents the kernel may write, borrowed mutably for the
        // call; `file` is a regular file, for which the VFS itself serves FS_IOC_FIEMAP.
        let done =
            unsafe { rustix::ioctl::ioctl(file, Updater::<FiemapOpcode, Fiemap>::new(&mut *buf)) };
        match done {
            Ok(()) => {}
            Err(Errno::INTR) => continue,
            Err(Errno::OPNOTSUPP | Errno::NOTTY) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let mapped = (buf.header.fm_mapped_extents as usize).min(BATCH);
        let mut last = mapped == 0;
        let mut next = from;
        for extent in &buf.extents[..mapped] {
            if extent.fe_flags & NO_ADDRESS == 0 {
                each(extent.fe_physical, extent.fe_length);
            }
            last |= extent.fe_flags & FIEMAP_EXTENT_LAST != 0;
            next = next.max(extent.fe_logical.saturating_add(extent.fe_length));
        }
        // `next <= from` would ask for the same extents again.
        if last || next <= from {
            return Ok(());
        }
        from = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs;
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;
    use std::process::Command;

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;

    fn set(extents: &[(u64, u64)]) -> ExtentSet {
        ExtentSet::from_extents(extents.iter().copied())
    }

    #[test]
    fn the_fiemap_opcode_matches_the_kernel_headers() {
        use rustix::ioctl::CompileTimeOpcode;
        assert_eq!(FiemapOpcode::OPCODE.raw(), 0xC020_660B);
    }

    #[test]
    fn extents_merge_when_they_overlap_or_touch() {
        let s = set(&[(100, 10), (0, 10), (5, 10), (15, 5), (50, 0), (200, 1)]);
        assert_eq!(s.ranges, vec![(0, 20), (100, 110), (200, 201)]);
        assert_eq!(s.len_bytes(), 31);
        assert_eq!(set(&[(10, 100), (20, 5)]).ranges, vec![(10, 110)]);
        assert_eq!(set(&[]), ExtentSet::default());
        assert_eq!(set(&[(0, 0)]).len_bytes(), 0);
        // Ranges reaching the end of the address space are clamped, not wrapped.
        assert_eq!(
            set(&[(u64::MAX - 1, 10)]).ranges,
            vec![(u64::MAX - 1, u64::MAX)]
        );
    }

    #[test]
    fn overlap_counts_only_bytes_inside_the_set() {
        let s = set(&[(0, 20), (100, 10), (200, 1)]);
        assert_eq!(s.overlap(0, 20), 20);
        assert_eq!(s.overlap(10, 5), 5);
        assert_eq!(s.overlap(15, 90), 5 + 5);
        assert_eq!(s.overlap(20, 80), 0);
        assert_eq!(s.overlap(0, 1000), 31);
        assert_eq!(s.overlap(109, 92), 1 + 1);
        assert_eq!(s.overlap(201, 10), 0);
        assert_eq!(s.overlap(5, 0), 0);
        assert_eq!(s.overlap(u64::MAX - 5, u64::MAX), 0);
        assert_eq!(ExtentSet::default().overlap(0, u64::MAX), 0);
    }

    #[test]
    fn union_and_difference_count_shared_bytes_once() {
        let a = set(&[(0, 20), (100, 10)]);
        let b = set(&[(10, 20), (200, 5)]);
        assert_eq!(a.union(&b).ranges, vec![(0, 30), (100, 110), (200, 205)]);
        assert_eq!(a.bytes_outside(&b), 10 + 10);
        assert_eq!(b.bytes_outside(&a), 10 + 5);
        assert_eq!(a.bytes_outside(&a), 0);
        assert_eq!(a.bytes_outside(&ExtentSet::default()), a.len_bytes());
    }

    fn run(cmd: &mut Command) -> String {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is it installed?): {e}"));
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A filesystem mounted below a temp dir, unmounted on drop even when a test fails.
    struct Mounted {
        mnt: PathBuf,
        _tmp: tempfile::TempDir,
    }

    impl Mounted {
        fn tmpfs() -> Mounted {
            let tmp = tempfile::tempdir().unwrap();
            let mnt = tmp.path().join("mnt");
            fs::create_dir(&mnt).unwrap();
            run(Command::new("mount")
                .args(["-t", "tmpfs", "tmpfs"])
                .arg(&mnt));
            Mounted { mnt, _tmp: tmp }
        }

        /// btrfs on a sparse 512 MiB image; `-o loop` attaches the loop device with
        /// autoclear, so unmounting detaches it.
        fn btrfs() -> Mounted {
            let tmp = tempfile::tempdir().unwrap();
            let img = tmp.path().join("disk.img");
            let mnt = tmp.path().join("mnt");
            fs::create_dir(&mnt).unwrap();
            run(Command::new("truncate").args(["-s", "512M"]).arg(&img));
            // Not skipped when missing: this test is the only proof the arithmetic holds
            // on real shared extents. mkfs.btrfs is in btrfs-progs.
            run(Command::new("mkfs.btrfs").arg("-q").arg(&img));
            run(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt));
            Mounted { mnt, _tmp: tmp }
        }

        fn sync(&self) {
            run(Command::new("sync").arg("-f").arg(&self.mnt));
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            match Command::new("umount").arg(&self.mnt).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "umount {}: {}",
                    self.mnt.display(),
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => eprintln!("umount {}: {e}", self.mnt.display()),
            }
        }
    }

    /// `du -sB1 dir`: st_blocks * 512 of each inode once.
    fn du(dir: &Path) -> u64 {
        let out = run(Command::new("du").arg("-sB1").arg(dir));
        let bytes = out.split_whitespace().next().unwrap_or_default();
        bytes
            .parse()
            .unwrap_or_else(|e| panic!("du said {out:?}: {e}"))
    }

    fn dd_random(file: &Path, mib_count: u64, seek_mib: u64, notrunc: bool) {
        let mut cmd = Command::new("dd");
        cmd.arg("if=/dev/urandom")
            .arg(format!("of={}", file.display()))
            .arg("bs=1M")
            .arg(format!("count={mib_count}"))
            .arg(format!("seek={seek_mib}"))
            .arg("status=none");
        if notrunc {
            cmd.arg("conv=notrunc");
        }
        run(&mut cmd);
    }

    // Seen failing: with `usage_outside` not subtracting (`bytes = blocks_bytes(&stat)`),
    // `outside` was 4194304; with `for_each_extent` skipping no flags, the inline file's
    // (0, 4096) joined the set and `len_bytes` was 4198400. Without mkfs.btrfs on PATH it
    // panics with "cannot run \"mkfs.btrfs\" ... (is it installed?)".
    #[test]
    fn btrfs_reflinked_fork_is_billed_for_only_what_it_rewrote() {
        let fs = Mounted::btrfs();
        let checkpoint = fs.mnt.join("checkpoint");
        let fork = fs.mnt.join("fork");
        fs::create_dir_all(checkpoint.join("sub")).unwrap();
        fs::create_dir(&fork).unwrap();

        let a = checkpoint.join("a");
        dd_random(&a, 4, 0, false);
        // Things the walk must not double count, follow, block on or take an address of.
        fs::hard_link(&a, checkpoint.join("sub/a-again")).unwrap();
        std::os::unix::fs::symlink(fork.join("b"), checkpoint.join("to-fork")).unwrap();
        nix::unistd::mkfifo(&checkpoint.join("sub/fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        fs::write(checkpoint.join("small"), b"inline in btrfs metadata").unwrap();
        fs.sync();

        let b = fork.join("b");
        run(Command::new("cp").arg("--reflink=always").arg(&a).arg(&b));
        dd_random(&b, 1, 1, true);
        fs.sync();

        let shared = physical_extents(&checkpoint).unwrap();
        assert_eq!(shared.len_bytes(), 4 * MIB, "{shared:?}");

        let outside = usage_outside(&fork, &shared).unwrap();
        assert!(
            (MIB..=MIB + 64 * KIB).contains(&outside),
            "the fork rewrote 1 MiB of a 4 MiB reflink but {outside} bytes are its own"
        );
        assert!(fs::metadata(&b).unwrap().blocks() * 512 >= 4 * MIB);

        // Unshared, it is what du counts.
        assert_eq!(
            usage_outside(&checkpoint, &ExtentSet::default()).unwrap(),
            du(&checkpoint)
        );
        assert_eq!(
            usage_outside(&fork, &ExtentSet::default()).unwrap(),
            du(&fork)
        );
        // Against itself, only what is not a file's own extent is left: the inline file
        // and directories.
        assert!(usage_outside(&checkpoint, &shared).unwrap() < 64 * KIB);
        // A missing root is an error, not an empty tree.
        assert!(physical_extents(&fs.mnt.join("missing")).is_err());
    }

    #[test]
    fn without_fiemap_files_have_no_extents_and_count_fully() {
        // tmpfs has no FIEMAP.
        let fs = Mounted::tmpfs();
        fs::write(fs.mnt.join("f"), vec![7u8; 3 * 4096]).unwrap();
        assert_eq!(physical_extents(&fs.mnt).unwrap(), ExtentSet::default());
        let everything = set(&[(0, u64::MAX)]);
        assert_eq!(usage_outside(&fs.mnt, &everything).unwrap(), du(&fs.mnt));
        assert!(du(&fs.mnt) >= 3 * 4096);
    }
}
