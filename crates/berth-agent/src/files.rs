//! `config.files` and `config.dns`: files written into a Machine's writable layer (its
//! overlay upperdir) at create and update, owned by the Machine's root.
//!
//! This is attack surface: the image, and at update the Machine itself, decide what is
//! already at every path. Every step goes through a directory fd of the upperdir with
//! `openat2`'s `RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS` and `O_NOFOLLOW`, so no symlink,
//! wherever it is, makes the agent write outside the upperdir. A symlink the image has at a
//! file's parent directory refuses the file (its target would be another directory in
//! the Machine, which the agent cannot see without mounting the rootfs); one at the file
//! itself is shadowed by the new file, as a write in the Machine would replace it.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use berth_api::MachineConfig;
use berth_core::ConfigError;
use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// One file to write: where (relative to the Machine's root), what, and its mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFile {
    /// For error messages: the config field it came from.
    pub field: String,
    pub path: String,
    pub contents: Vec<u8>,
    pub mode: u32,
}

/// The files the config asks for: `files` with contents, then `/etc/resolv.conf` from
/// `dns` (it wins over a file of the same path).
pub fn guest_files(config: &MachineConfig) -> Result<Vec<GuestFile>, ConfigError> {
    let mut files = Vec::new();
    for (index, file) in config.files.iter().enumerate() {
        let field = format!("config.files[{index}]");
        let Some(contents) = berth_core::validate::file_contents(file) else {
            continue;
        };
        let contents = contents.map_err(|message| ConfigError {
            field: format!("{field}.raw_value"),
            message,
        })?;
        files.push(GuestFile {
            field,
            path: file.guest_path.clone(),
            contents,
            mode: file.mode.filter(|mode| *mode != 0).unwrap_or(0o644),
        });
    }
    if let Some(text) = config
        .dns
        .as_ref()
        .and_then(berth_api::DnsConfig::resolv_conf)
    {
        files.retain(|file| file.path != "/etc/resolv.conf");
        files.push(GuestFile {
            field: "config.dns".into(),
            path: "/etc/resolv.conf".into(),
            contents: text.into_bytes(),
            mode: 0o644,
        });
    }
    Ok(files)
}

/// Writes `files` into `upper` (the Machine's upperdir, whose root is owned by the
/// Machine's root, as create makes it), over the image `layers` (bottom first).
pub fn write_files(upper: &Path, layers: &[PathBuf], files: &[GuestFile]) -> Result<(), FileError> {
    if files.is_empty() {
        return Ok(());
    }
    let root = rustix::fs::open(
        upper,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|error| FileError::Host(format!("open {}: {error}", upper.display())))?;
    let owner = rustix::fs::fstat(&root)
        .map_err(|error| FileError::Host(format!("stat {}: {error}", upper.display())))?;
    let (base_uid, base_gid) = (owner.st_uid, owner.st_gid);
    let layer_roots: Vec<OwnedFd> = layers
        .iter()
        .rev()
        .filter_map(|layer| {
            rustix::fs::open(
                layer,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .ok()
        })
        .collect();
    for file in files {
        write_one(root.as_fd(), &layer_roots, (base_uid, base_gid), file)?;
    }
    Ok(())
}

impl crate::Agent {
    /// Writes the config's files into the Machine's upperdir, off the async threads.
    pub(crate) async fn write_guest_files(
        &self,
        id: &str,
        files: Vec<GuestFile>,
        layers: Vec<PathBuf>,
    ) -> crate::Result<()> {
        if files.is_empty() {
            return Ok(());
        }
        let upper = self.layout(id).upper();
        tokio::task::spawn_blocking(move || {
            // The runtime made it at prepare; a runtime that keeps no files (the fake)
            // did not.
            std::fs::create_dir_all(&upper)
                .map_err(|error| FileError::Host(format!("{}: {error}", upper.display())))?;
            write_files(&upper, &layers, &files)
        })
        .await
        .map_err(|error| crate::AgentError::Internal(format!("files task: {error}")))?
        .map_err(|error| match error {
            FileError::Refused { field, message } => {
                crate::AgentError::InvalidConfig(ConfigError { field, message })
            }
            FileError::Host(message) => crate::AgentError::Internal(message),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file cannot go where it asks to: the Machine's request is at fault.
    #[error("{field}: {message}")]
    Refused { field: String, message: String },
    #[error("{0}")]
    Host(String),
}

fn write_one(
    upper: BorrowedFd<'_>,
    layers_top_first: &[OwnedFd],
    (base_uid, base_gid): (u32, u32),
    file: &GuestFile,
) -> Result<(), FileError> {
    let refuse = |message: String| FileError::Refused {
        field: format!("{}.guest_path", file.field),
        message,
    };
    let relative = file.path.trim_start_matches('/');
    let (parent, name) = match relative.rsplit_once('/') {
        Some((parent, name)) => (Some(parent), name),
        None => (None, relative),
    };
    if name.is_empty() || name == "." || name == ".." {
        return Err(refuse(format!("{} names no file", file.path)));
    }
    // Each parent directory: as the image has it (no symlink, a directory), then made in
    // the upperdir with the image's mode and owner if missing there.
    let mut dir = rustix::fs::openat2(
        upper,
        ".",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_SYMLINKS,
    )
    .map_err(|error| FileError::Host(format!("open the upperdir: {error}")))?;
    let mut walked = String::new();
    for part in parent.into_iter().flat_map(|parent| parent.split('/')) {
        if part.is_empty() || part == "." || part == ".." {
            return Err(refuse(format!("{} is not a plain path", file.path)));
        }
        if !walked.is_empty() {
            walked.push('/');
        }
        walked.push_str(part);
        let image_dir = image_entry(layers_top_first, &walked)
            .map_err(|why| refuse(format!("/{walked} {why} in the image")))?;
        dir =
            enter_or_make(dir.as_fd(), part, image_dir, (base_uid, base_gid)).map_err(|error| {
                match error {
                    Errno::LOOP | Errno::NOTDIR => {
                        refuse(format!("/{walked} is not a directory in the Machine"))
                    }
                    other => FileError::Host(format!("directory /{walked}: {other}")),
                }
            })?;
    }
    // A symlink or other non-directory already in the upperdir at the file's place is
    // replaced (unlinkat never follows); a directory is refused.
    match rustix::fs::statat(&dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) if FileType::from_raw_mode(stat.st_mode) == FileType::Directory => {
            return Err(refuse(format!(
                "{} is a directory in the Machine",
                file.path
            )))
        }
        Ok(stat) if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile => {
            rustix::fs::unlinkat(&dir, name, rustix::fs::AtFlags::empty())
                .map_err(|error| FileError::Host(format!("replace {}: {error}", file.path)))?;
        }
        _ => {}
    }
    let fd = rustix::fs::openat2(
        &dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_SYMLINKS,
    )
    .map_err(|error| match error {
        Errno::LOOP | Errno::ISDIR => refuse(format!("{} cannot be replaced", file.path)),
        other => FileError::Host(format!("create {}: {other}", file.path)),
    })?;
    let host = |what: &str, error: std::io::Error| {
        FileError::Host(format!("{what} {}: {error}", file.path))
    };
    let mut handle = std::fs::File::from(fd);
    handle
        .write_all(&file.contents)
        .map_err(|error| host("write", error))?;
    std::os::unix::fs::fchown(&handle, Some(base_uid), Some(base_gid))
        .map_err(|error| host("chown", error))?;
    // After chown, which clears set-id bits.
    rustix::fs::fchmod(&handle, Mode::from_raw_mode(file.mode))
        .map_err(|error| host("chmod", error.into()))?;
    handle.sync_all().map_err(|error| host("sync", error))?;
    Ok(())
}

/// How the topmost image layer that has `relative` has it: `Ok(Some(stat))` a directory,
/// `Ok(None)` in no layer, `Err` a symlink or not a directory.
fn image_entry(
    layers_top_first: &[OwnedFd],
    relative: &str,
) -> Result<Option<rustix::fs::Stat>, &'static str> {
    for layer in layers_top_first {
        match rustix::fs::openat2(
            layer,
            relative,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_SYMLINKS,
        ) {
            Ok(found) => {
                let stat = rustix::fs::fstat(&found).map_err(|_| "cannot be read")?;
                return match FileType::from_raw_mode(stat.st_mode) {
                    FileType::Directory => Ok(Some(stat)),
                    FileType::Symlink => Err("is a symlink"),
                    _ => Err("is not a directory"),
                };
            }
            Err(Errno::NOENT) => continue,
            // A symlink on the way, in this layer.
            Err(Errno::LOOP) => return Err("is reached through a symlink"),
            Err(Errno::NOTDIR) => return Err("is not a directory"),
            Err(_) => return Err("cannot be read"),
        }
    }
    Ok(None)
}

/// Opens directory `part` of `dir` in the upperdir, making it first if missing: with the
/// image's mode and owner (shifted into the Machine's ids) when the image has it, else
/// 0755 owned by the Machine's root. Owner and mode are set through the opened fd.
fn enter_or_make(
    dir: BorrowedFd<'_>,
    part: &str,
    image_dir: Option<rustix::fs::Stat>,
    (base_uid, base_gid): (u32, u32),
) -> rustix::io::Result<OwnedFd> {
    let open = |flags: OFlags| {
        rustix::fs::openat2(
            dir,
            part,
            flags | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_SYMLINKS,
        )
    };
    match open(OFlags::PATH) {
        Err(Errno::NOENT) => {}
        other => return other,
    }
    let (mode, uid, gid) = match image_dir {
        Some(stat) => (
            stat.st_mode & 0o7777,
            base_uid.saturating_add(stat.st_uid),
            base_gid.saturating_add(stat.st_gid),
        ),
        None => (0o755, base_uid, base_gid),
    };
    match rustix::fs::mkdirat(dir, part, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(error) => return Err(error),
    }
    let made = open(OFlags::RDONLY)?;
    std::os::unix::fs::fchown(&made, Some(uid), Some(gid))
        .map_err(|error| Errno::from_io_error(&error).unwrap_or(Errno::IO))?;
    rustix::fs::fchmod(&made, Mode::from_raw_mode(mode))?;
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn file(path: &str, contents: &str) -> GuestFile {
        GuestFile {
            field: "config.files[0]".into(),
            path: path.into(),
            contents: contents.as_bytes().to_vec(),
            mode: 0o640,
        }
    }

    #[test]
    fn files_land_in_the_upperdir_with_their_mode_and_the_machines_root() {
        let upper = tempfile::tempdir().expect("upper");
        let layer = tempfile::tempdir().expect("layer");
        std::fs::create_dir(layer.path().join("etc")).expect("mkdir");
        std::fs::set_permissions(
            layer.path().join("etc"),
            std::fs::Permissions::from_mode(0o751),
        )
        .expect("chmod");
        write_files(
            upper.path(),
            &[layer.path().to_owned()],
            &[file("/etc/app/conf.json", "{}"), file("/top", "x")],
        )
        .expect("written");
        let written = upper.path().join("etc/app/conf.json");
        assert_eq!(std::fs::read_to_string(&written).expect("read"), "{}");
        let meta = std::fs::metadata(&written).expect("stat");
        assert_eq!(meta.mode() & 0o7777, 0o640);
        let owner = std::fs::metadata(upper.path()).expect("stat upper");
        assert_eq!((meta.uid(), meta.gid()), (owner.uid(), owner.gid()));
        // /etc keeps the image's mode; /etc/app, not in the image, is 0755.
        let etc = std::fs::metadata(upper.path().join("etc")).expect("etc");
        assert_eq!(etc.mode() & 0o7777, 0o751);
        let app = std::fs::metadata(upper.path().join("etc/app")).expect("app");
        assert_eq!(app.mode() & 0o7777, 0o755);
        assert_eq!(
            std::fs::read_to_string(upper.path().join("top")).expect("top"),
            "x"
        );
        // Written again (an update): replaced, not appended.
        write_files(upper.path(), &[], &[file("/etc/app/conf.json", "[]")]).expect("again");
        assert_eq!(std::fs::read_to_string(&written).expect("read"), "[]");
    }

    /// A hostile image (or a Machine, before an update) puts symlinks where the files go:
    /// nothing is ever written outside the upperdir. Proved to fail: with the walk's
    /// `O_NOFOLLOW` and the `RESOLVE_*` flags dropped, the write through the upperdir's
    /// `conf` link lands in the host directory and this test fails.
    #[test]
    fn symlinks_in_the_image_or_the_upperdir_never_lead_outside() {
        let outside = tempfile::tempdir().expect("outside");
        let target = outside.path().join("victim");
        std::fs::write(&target, "untouched").expect("victim");
        let outside_dir = outside.path().to_str().expect("utf-8").to_owned();

        // The image: /etc/passwd links to the host file, /conf links to a host dir, /deep
        // is a relative link that climbs out.
        let layer = tempfile::tempdir().expect("layer");
        std::fs::create_dir(layer.path().join("etc")).expect("mkdir");
        std::os::unix::fs::symlink(&target, layer.path().join("etc/passwd")).expect("link");
        std::os::unix::fs::symlink(&outside_dir, layer.path().join("conf")).expect("link");
        std::os::unix::fs::symlink("../../../../../../..", layer.path().join("deep"))
            .expect("link");
        let layers = [layer.path().to_owned()];

        let upper = tempfile::tempdir().expect("upper");
        // At the file itself: shadowed in the upperdir, the host file untouched.
        write_files(upper.path(), &layers, &[file("/etc/passwd", "mine")]).expect("shadowed");
        assert_eq!(
            std::fs::read_to_string(upper.path().join("etc/passwd")).expect("read"),
            "mine"
        );
        // At a parent: refused, naming the field.
        for path in ["/conf/victim", "/deep/tmp/x"] {
            let error = write_files(upper.path(), &layers, &[file(path, "x")])
                .expect_err("through a symlink");
            assert!(
                matches!(&error, FileError::Refused { field, .. } if field == "config.files[0].guest_path"),
                "{error}"
            );
        }

        // The upperdir itself (a Machine made these before an update).
        let upper = tempfile::tempdir().expect("upper");
        std::os::unix::fs::symlink(&outside_dir, upper.path().join("conf")).expect("link");
        std::os::unix::fs::symlink(&target, upper.path().join("victim")).expect("link");
        let error = write_files(upper.path(), &[], &[file("/conf/victim", "x")])
            .expect_err("parent is a symlink");
        assert!(matches!(error, FileError::Refused { .. }), "{error}");
        write_files(upper.path(), &[], &[file("/victim", "mine")]).expect("replaced");
        assert!(!std::fs::symlink_metadata(upper.path().join("victim"))
            .expect("stat")
            .file_type()
            .is_symlink());

        assert_eq!(
            std::fs::read_to_string(&target).expect("victim"),
            "untouched"
        );
        assert_eq!(
            std::fs::read_dir(outside.path()).expect("list").count(),
            1,
            "nothing new outside"
        );
    }

    #[test]
    fn dns_becomes_resolv_conf() {
        let config: MachineConfig = serde_json::from_value(serde_json::json!({
            "image": "x",
            "files": [{"guest_path": "/etc/resolv.conf", "raw_value": "eA=="},
                      {"guest_path": "/a", "raw_value": "aGk=", "mode": 256},
                      {"guest_path": "/secret"}],
            "dns": {"nameservers": ["fd00::53", "10.0.0.53"], "searches": ["internal"],
                    "options": [{"name": "ndots", "value": "2"}, {"name": "rotate"}]}
        }))
        .expect("config");
        let files = guest_files(&config).expect("files");
        assert_eq!(files.len(), 2, "{files:?}");
        assert_eq!((files[0].path.as_str(), files[0].mode), ("/a", 0o400));
        assert_eq!(files[0].contents, b"hi");
        assert_eq!(files[1].path, "/etc/resolv.conf");
        assert_eq!(
            String::from_utf8_lossy(&files[1].contents),
            "nameserver fd00::53\nnameserver 10.0.0.53\nsearch internal\noptions ndots:2 rotate\n"
        );
    }
}
