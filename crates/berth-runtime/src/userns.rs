//! Per-Machine user namespaces: root in a Machine is an unprivileged host uid.
//!
//! Every Machine gets 65,536 host uids and gids of its own (as podman's `--userns=auto`),
//! claimed in a host-wide registry so that no two Machines on a host, whatever worker or
//! data dir they belong to, ever share an id. At create, a user namespace with that map is
//! made and pinned by a bind mount (`<machine>/userns`), together with the Machine's
//! network namespace, made inside it (so runc, which joins the user namespace first, may
//! still join the network one, and sysfs in the Machine shows its own interfaces). Start
//! only opens the pin: no map is written on the start path.
//!
//! The image layers stay owned by host root and shared: each start mounts them idmapped
//! (`overlay::mount_idmapped`). The Machine's own upperdir holds its files with host ids
//! (base + id). Machines made before user namespaces have an upperdir with unshifted ids;
//! their first start shifts it ([`shift_tree`]) before anything else.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{lchown, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

use crate::error::{IoContext, RuntimeError};
use crate::{netns, overlay, spec, MachineLayout};

/// Ids each Machine gets: uid and gid 0 to 65535 inside.
pub const RANGE_SIZE: u32 = 65_536;
/// The first host id handed out, far above the ids of host users and of `/etc/subuid`
/// ranges that distributions hand out from 100,000.
pub const FIRST_BASE: u32 = 0x1000_0000;
/// How many ranges there are: Machines per host.
pub const SLOTS: u32 = 0x4000;
/// Where the registry lives unless configured: host-wide, and on disk, since upperdirs
/// keep the ids across reboots.
pub const DEFAULT_REGISTRY: &str = "/var/lib/berth-ids";

/// A Machine's host ids: `base` is root inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub base: u32,
}

impl IdRange {
    fn from_slot(slot: u32) -> IdRange {
        IdRange {
            base: FIRST_BASE + slot * RANGE_SIZE,
        }
    }

    /// The host id of `id` inside, if the range maps it.
    pub fn to_host(self, id: u32) -> Option<u32> {
        (id < RANGE_SIZE).then(|| self.base + id)
    }

    fn map_line(self) -> String {
        format!("0 {} {RANGE_SIZE}\n", self.base)
    }
}

/// The host-wide registry: one file per claimed range, named by its slot, holding the
/// Machine directory that owns it. A flock on `.lock` orders claims.
#[derive(Debug, Clone)]
pub struct IdRegistry {
    dir: PathBuf,
}

impl IdRegistry {
    pub fn new(dir: impl Into<PathBuf>) -> IdRegistry {
        IdRegistry { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The range of the Machine in `owner` (its directory): the one it already has, or
    /// the lowest free one. Durable before it returns.
    pub fn claim(&self, owner: &Path) -> io::Result<IdRange> {
        let _lock = self.lock()?;
        let mut used = vec![false; SLOTS as usize];
        for (slot, holder) in self.entries()? {
            if holder == owner {
                return Ok(IdRange::from_slot(slot));
            }
            // A holder whose machines directory is there but which is not: destroyed
            // without releasing (a crash). A missing parent may be an unmounted disk.
            let stale = !holder.exists() && holder.parent().is_some_and(Path::exists);
            if !stale {
                used[slot as usize] = true;
            }
        }
        let slot = used
            .iter()
            .position(|u| !u)
            .ok_or_else(|| io::Error::other(format!("all {SLOTS} id ranges are taken")))?;
        let slot = slot as u32;
        let path = self.dir.join(slot.to_string());
        crate::util::write_atomic(&path, owner.as_os_str().as_bytes())?;
        Ok(IdRange::from_slot(slot))
    }

    /// Gives back whatever range `owner` holds. None held is success.
    pub fn release(&self, owner: &Path) -> io::Result<()> {
        if !self.dir.exists() {
            return Ok(());
        }
        let _lock = self.lock()?;
        for (slot, holder) in self.entries()? {
            if holder == owner {
                crate::util::remove_file_if_exists(&self.dir.join(slot.to_string()))?;
            }
        }
        Ok(())
    }

    fn lock(&self) -> io::Result<File> {
        fs::create_dir_all(&self.dir)?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.dir.join(".lock"))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
        Ok(file)
    }

    fn entries(&self) -> io::Result<Vec<(u32, PathBuf)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Some(slot) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|s| *s < SLOTS)
            else {
                continue;
            };
            let mut holder = Vec::new();
            File::open(entry.path())?.read_to_end(&mut holder)?;
            let holder = PathBuf::from(std::ffi::OsString::from_vec(holder));
            out.push((slot, holder));
        }
        Ok(out)
    }
}

/// Makes the Machine's user namespace (root inside is `range.base`) and a network
/// namespace owned by it (`lo` up), pinned by bind mounts on `userns` and `netns_path`.
/// Pins already there are replaced. Blocking; forks one short-lived child.
pub fn create_pins(range: IdRange, userns: &Path, netns_path: &Path) -> io::Result<()> {
    for pin in [userns, netns_path] {
        overlay::unmount(pin)?;
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(pin)?;
    }
    let made = pin_from_child(range, userns, netns_path);
    if made.is_err() {
        let _ = remove_pin(userns);
        let _ = netns::remove(netns_path);
    }
    made
}

fn pin_from_child(range: IdRange, userns: &Path, netns_path: &Path) -> io::Result<()> {
    use rustix::pipe::{pipe_with, PipeFlags};
    let (to_parent_r, to_parent_w) = pipe_with(PipeFlags::CLOEXEC)?;
    let (to_child_r, to_child_w) = pipe_with(PipeFlags::CLOEXEC)?;
    // SAFETY: the child only makes raw system calls (unshare, read, write, socket, ioctl,
    // _exit): async-signal-safe, as a fork of a multi-threaded process requires.
    let child = match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => {
            drop(to_parent_r);
            drop(to_child_w);
            let code = pinned_child(to_parent_w.as_fd(), to_child_r.as_fd());
            // SAFETY: ends the child without running anything of the parent.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop(to_parent_w);
    drop(to_child_r);
    // Other threads of this process may fork meanwhile and hold copies of these pipes, so
    // neither side may wait for an end of file: each waits for a byte, or (the parent)
    // for the child's exit through a pidfd.
    let result = (|| {
        let exited = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(child.as_raw())
                .ok_or_else(|| io::Error::other("fork returned no pid"))?,
            rustix::process::PidfdFlags::empty(),
        )?;
        expect_byte(&to_parent_r, &exited, "the child's user namespace")?;
        for (file, text) in [("uid_map", range.map_line()), ("gid_map", range.map_line())] {
            fs::write(format!("/proc/{child}/{file}"), text.as_bytes())
                .map_err(|e| io::Error::new(e.kind(), format!("write {file}: {e}")))?;
        }
        rustix::io::write(&to_child_w, b"m")?;
        expect_byte(&to_parent_r, &exited, "the child's network namespace")?;
        for (ns, pin) in [("user", userns), ("net", netns_path)] {
            rustix::mount::mount_bind(format!("/proc/{child}/ns/{ns}").as_str(), pin)
                .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("pin {ns}: {e}")))?;
        }
        rustix::io::write(&to_child_w, b"d")?;
        Ok(())
    })();
    if result.is_err() {
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
    }
    let _ = nix::sys::wait::waitpid(child, None);
    result
}

/// The forked child: a user namespace, then (once the parent wrote its maps) a network
/// namespace inside it with `lo` up; then waits for the parent to pin both.
fn pinned_child(
    to_parent: rustix::fd::BorrowedFd<'_>,
    from_parent: rustix::fd::BorrowedFd<'_>,
) -> i32 {
    let mut byte = [0u8; 1];
    // Drop every descriptor the fork copied from the agent's other threads but these two:
    // held here, another create's pipes would never close and a lock (the id registry's
    // flock) would stay taken while this child lives.
    let (a, b) = {
        let (x, y) = (to_parent.as_raw_fd() as u32, from_parent.as_raw_fd() as u32);
        (x.min(y), x.max(y))
    };
    for (first, last) in [
        (3, a.wrapping_sub(1)),
        (a + 1, b.wrapping_sub(1)),
        (b + 1, u32::MAX),
    ] {
        if first <= last {
            // SAFETY: close_range only closes descriptors; none in the range is used here.
            unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
        }
    }
    // SAFETY: plain system calls on valid arguments; nothing here allocates.
    unsafe {
        if libc::unshare(libc::CLONE_NEWUSER) != 0 {
            return 1;
        }
        if libc::write(to_parent.as_raw_fd(), b"u".as_ptr().cast(), 1) != 1 {
            return 1;
        }
        if libc::read(from_parent.as_raw_fd(), byte.as_mut_ptr().cast(), 1) != 1 {
            return 1;
        }
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            return 1;
        }
    }
    if netns::loopback_up().is_err() {
        return 1;
    }
    // SAFETY: as above.
    unsafe {
        if libc::write(to_parent.as_raw_fd(), b"n".as_ptr().cast(), 1) != 1 {
            return 1;
        }
        // Until the parent has pinned both.
        libc::read(from_parent.as_raw_fd(), byte.as_mut_ptr().cast(), 1);
    }
    0
}

/// One byte from the child, or an error once the child has exited without sending it.
fn expect_byte(pipe: &OwnedFd, child: &OwnedFd, what: &str) -> io::Result<()> {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut byte = [0u8; 1];
    loop {
        let mut fds = [
            PollFd::new(pipe, PollFlags::IN),
            PollFd::new(child, PollFlags::IN),
        ];
        match poll(&mut fds, -1) {
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        let (ready, gone) = (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
        if ready {
            match rustix::io::read(pipe, &mut byte) {
                Ok(1) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if gone || ready {
            return Err(io::Error::other(format!("{what} could not be made")));
        }
    }
}

/// Whether `path` pins a namespace (one statfs).
pub fn is_pinned(path: &Path) -> bool {
    netns::is_pinned(path)
}

/// Unmounts and deletes a pin. Missing is success.
pub fn remove_pin(path: &Path) -> io::Result<()> {
    overlay::unmount(path)?;
    crate::util::remove_file_if_exists(path)
}

/// Gives the Machine's root its upperdir: the merged `/` is owned by root inside. Follows
/// `upper` if it is Berth's link into the Machine's quota subvolume.
pub fn own_upper(upper: &Path, range: IdRange) -> io::Result<()> {
    std::os::unix::fs::chown(upper, Some(range.base), Some(range.base))
}

/// Shifts every id under `dir` below [`RANGE_SIZE`] into `range`; ids already in it are
/// left, so running it again after a crash halfway finishes the job. Never follows a
/// symbolic link. Set-id bits, which chown clears, are put back.
pub fn shift_tree(dir: &Path, range: IdRange) -> io::Result<u64> {
    let mut shifted = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = fs::symlink_metadata(&path)?;
        let (uid, gid) = (meta.uid(), meta.gid());
        let new_uid = range.to_host(uid).filter(|_| uid < RANGE_SIZE);
        let new_gid = range.to_host(gid).filter(|_| gid < RANGE_SIZE);
        if new_uid.is_some() || new_gid.is_some() {
            lchown(&path, new_uid, new_gid)?;
            let setid = meta.mode() & 0o6000;
            if setid != 0 && meta.is_file() {
                fs::set_permissions(&path, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            }
            shifted += 1;
        }
        if meta.is_dir() {
            for entry in fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(shifted)
}

/// Moves every id under `dir` from the range based at `from` into the one based at `to`:
/// a fork's files, from its source Machine's host ids into its own. Ids outside `from`'s
/// range are left. Never follows a symbolic link; set-id bits, which chown clears, are
/// put back. Linear in the number of files, not in their size.
pub fn rebase_tree(dir: &Path, from: u32, to: u32) -> io::Result<u64> {
    if from == to {
        return Ok(0);
    }
    let move_id = |id: u32| {
        id.checked_sub(from)
            .filter(|offset| *offset < RANGE_SIZE)
            .map(|offset| to + offset)
    };
    let mut moved = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = fs::symlink_metadata(&path)?;
        let (uid, gid) = (move_id(meta.uid()), move_id(meta.gid()));
        if uid.is_some() || gid.is_some() {
            lchown(&path, uid, gid)?;
            let setid = meta.mode() & 0o6000;
            if setid != 0 && meta.is_file() {
                fs::set_permissions(&path, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            }
            moved += 1;
        }
        if meta.is_dir() {
            for entry in fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(moved)
}

/// At create: claims the Machine's ids, gives its root the upperdir, and pins its user
/// namespace with a network namespace inside it. Blocking.
pub(crate) fn prepare(
    layout: &MachineLayout,
    registry: &IdRegistry,
) -> Result<IdRange, RuntimeError> {
    let id = &layout.id;
    let range = registry.claim(&layout.dir).ctx(|| {
        format!(
            "claim host ids for machine {id} in {}",
            registry.dir.display()
        )
    })?;
    own_upper(&layout.upper(), range).ctx(|| format!("own the upperdir of machine {id}"))?;
    if !is_pinned(&layout.userns()) || !is_pinned(&layout.netns()) {
        create_pins(range, &layout.userns(), &layout.netns())
            .ctx(|| format!("user and network namespaces of machine {id}"))?;
    }
    Ok(range)
}

/// Before each start: one statfs while the pins are there. Otherwise (a host reboot, or
/// the first start of a Machine made before user namespaces) makes them again, after
/// moving such an old Machine's upperdir and `config.json` into ids of its own. True when
/// the pins were made, so the network must be plugged in again. Blocking.
pub(crate) fn ensure(layout: &MachineLayout, registry: &IdRegistry) -> Result<bool, RuntimeError> {
    if is_pinned(&layout.userns()) {
        return Ok(false);
    }
    let id = &layout.id;
    let config = layout.config_json();
    let mut oci = Spec::load(&config)
        .map_err(|e| RuntimeError::Internal(format!("read {}: {e}", config.display())))?;
    let range = match spec::id_range(&oci) {
        Some(range) => range,
        None => {
            // Each step may be run again: the claim finds the same range, the shift
            // leaves shifted ids, and config.json, written last, says it is done.
            let range = registry
                .claim(&layout.dir)
                .ctx(|| format!("claim host ids for machine {id}"))?;
            let upper = fs::canonicalize(layout.upper())
                .ctx(|| format!("find the upperdir of machine {id}"))?;
            let shifted = shift_tree(&upper, range)
                .ctx(|| format!("shift the upperdir of machine {id} into its ids"))?;
            spec::set_user_namespace(&mut oci, range, &layout.userns())?;
            let json = serde_json::to_vec(&oci)
                .map_err(|e| RuntimeError::Internal(format!("serialize config for {id}: {e}")))?;
            crate::util::write_atomic(&config, &json)
                .ctx(|| format!("write {}", config.display()))?;
            tracing::info!(machine = %id, base = range.base, shifted, "moved into a user namespace");
            range
        }
    };
    create_pins(range, &layout.userns(), &layout.netns())
        .ctx(|| format!("recreate the namespaces of machine {id}"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn claims_are_distinct_idempotent_and_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let registry = IdRegistry::new(dir.path().join("ids"));
        let machines = dir.path().join("machines");
        let (a, b) = (machines.join("a"), machines.join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        let ra = registry.claim(&a).unwrap();
        let rb = registry.claim(&b).unwrap();
        assert_eq!(ra.base, FIRST_BASE);
        assert_eq!(rb.base, FIRST_BASE + RANGE_SIZE);
        assert_eq!(
            registry.claim(&a).unwrap(),
            ra,
            "a second claim finds the first"
        );
        registry.release(&a).unwrap();
        let c = machines.join("c");
        fs::create_dir_all(&c).unwrap();
        assert_eq!(
            registry.claim(&c).unwrap(),
            ra,
            "a released range is reused"
        );
        // b's directory is gone while its parent is there: a destroy that crashed.
        fs::remove_dir(&b).unwrap();
        let d = machines.join("d");
        fs::create_dir_all(&d).unwrap();
        assert_eq!(registry.claim(&d).unwrap(), rb);
        // A holder whose parent is missing (an unmounted disk) keeps its range.
        let registry2 = IdRegistry::new(dir.path().join("ids2"));
        let gone = dir.path().join("unmounted/machines/x");
        let r_gone = registry2.claim(&gone).unwrap();
        assert_ne!(registry2.claim(&a).unwrap(), r_gone);
    }

    #[test]
    fn shift_moves_unshifted_ids_only_and_keeps_set_id_bits() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("upper");
        fs::create_dir_all(root.join("sub")).unwrap();
        let file = root.join("sub/suid");
        fs::write(&file, "x").unwrap();
        lchown(&file, Some(1000), Some(5)).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o6755)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        let range = IdRange { base: FIRST_BASE };
        assert_eq!(shift_tree(&root, range).unwrap(), 4);
        let meta = fs::metadata(&file).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (FIRST_BASE + 1000, FIRST_BASE + 5)
        );
        assert_eq!(meta.mode() & 0o7777, 0o6755);
        let link = fs::symlink_metadata(root.join("link")).unwrap();
        assert_eq!(link.uid(), FIRST_BASE);
        // The link's target was not touched.
        assert_eq!(fs::metadata("/etc/passwd").unwrap().uid(), 0);
        // Again, as after a crash halfway: nothing left to do.
        assert_eq!(shift_tree(&root, range).unwrap(), 0);
    }
}
