//! The Machine's PID 1: `berth-init` (crates/berth-init), which forwards signals to the
//! Machine's command, reaps orphans and exits with the command's status. The build
//! script compiles it statically and it is embedded here, so it is part of Berth, never
//! a file in the image or on the Machine's disk.
//!
//! Both drivers run it from a sealed memfd (write, grow, shrink and further seals
//! refused), so `/proc/1/exe` cannot be written from inside the Machine:
//! - native: the spawner makes the memfd once; init's last step is `fexecve` of it, with
//!   the program already looked up in the Machine (see `native::init`);
//! - runc: the shim makes one per start and passes it as fd 3 (`runc create
//!   --preserve-fds 1`); `config.json` asks runc to run [`RUNC_INIT`], which init closes
//!   before it starts the command, looked up in `PATH` by init itself (`oci::init`);
//! - gvisor: runsc passes no descriptors in, so the driver keeps one read-only host file
//!   of init ([`install_file`]) that `config.json` bind-mounts at [`GVISOR_INIT`]; it runs
//!   inside gVisor's kernel, where the host cannot be written through it either.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;

/// The static `berth-init` executable.
pub(crate) const BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/berth-init"));

/// `process.args[0]` in a runc Machine's `config.json`: the memfd the shim passes.
pub const RUNC_INIT: &str = "/proc/self/fd/3";
/// `process.args[0]` in a gVisor Machine's `config.json`: a read-only bind mount of a
/// host copy of init, on the sandbox's own `/dev` tmpfs.
pub const GVISOR_INIT: &str = "/dev/.berth-init";
/// The memfd's name and init's `argv[0]` under the native driver.
const NAME: &CStr = c"berth-init";

/// A sealed, close-on-exec memfd holding [`BINARY`].
pub(crate) fn sealed_memfd() -> io::Result<OwnedFd> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    // Executable whatever `vm.memfd_noexec` says; kernels before 6.3 know no such flag.
    let fd = match rustix::fs::memfd_create(NAME, flags | MemfdFlags::EXEC) {
        Err(rustix::io::Errno::INVAL) => rustix::fs::memfd_create(NAME, flags)?,
        made => made?,
    };
    let mut file = File::from(fd);
    file.write_all(BINARY)?;
    rustix::fs::fcntl_add_seals(
        &file,
        SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
    )?;
    Ok(OwnedFd::from(file))
}

/// Init's argv for the native driver: `berth-init PROGRAM ARGV0 [ARG...]`, with
/// `program` already looked up and `args` the command's argv.
pub(crate) fn native_argv(program: &CStr, args: &[CString]) -> Vec<CString> {
    let mut argv = Vec::with_capacity(args.len() + 2);
    argv.push(NAME.to_owned());
    argv.push(program.to_owned());
    argv.extend(args.iter().cloned());
    argv
}

/// The Machine's command in `process.args`: without the init a runc or gVisor Machine's
/// `config.json` names in front of it.
pub(crate) fn command(args: &[String]) -> &[String] {
    match args {
        [init, _program, command @ ..]
            if (init == RUNC_INIT || init == GVISOR_INIT) && !command.is_empty() =>
        {
            command
        }
        _ => args,
    }
}

/// One command of a Machine's `config.processes`, resolved: what init starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitProcess {
    /// The command line; `args[0]` is looked up in `PATH` when it has no `/`.
    pub args: Vec<String>,
    /// Set over the Machine's environment for this command only.
    pub env: Vec<(String, String)>,
    /// Uid and gid; `None`: the Machine's.
    pub ids: Option<(u32, u32)>,
}

/// The entries of the Machine's environment that ask init for a terminal (`tty`) and for
/// `processes` in place of the one command (none when empty). Init reads them and keeps
/// them from the commands. The list is netstrings (`LEN:BYTES,`), for each process: uid,
/// gid (both empty for the Machine's), the number of arguments, the arguments, the number
/// of environment entries, the `KEY=VALUE` entries; crates/berth-init decodes it.
pub fn init_environment(tty: bool, processes: &[InitProcess]) -> Vec<String> {
    let mut env = Vec::new();
    if tty {
        env.push("BERTH_INIT_TTY=1".to_owned());
    }
    if processes.is_empty() {
        return env;
    }
    let mut list = String::new();
    let mut field = |text: &str| list.push_str(&format!("{}:{text},", text.len()));
    for process in processes {
        let (uid, gid) = match process.ids {
            Some((uid, gid)) => (uid.to_string(), gid.to_string()),
            None => (String::new(), String::new()),
        };
        field(&uid);
        field(&gid);
        field(&process.args.len().to_string());
        for arg in &process.args {
            field(arg);
        }
        field(&process.env.len().to_string());
        for (key, value) in &process.env {
            field(&format!("{key}={value}"));
        }
    }
    env.push(format!("BERTH_INIT_PROCESSES={list}"));
    env
}

/// Writes init to `path` (read-only, executable) unless it already holds it: the host
/// copy the gVisor driver bind-mounts. Replaced by rename, so a sandbox never sees half.
pub(crate) fn install_file(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::read(path).is_ok_and(|bytes| bytes == BINARY) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut file = File::create(&tmp)?;
    file.write_all(BINARY)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o555))?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_embedded_init_is_a_static_executable() {
        assert_eq!(&BINARY[..5], b"\x7fELF\x02", "a 64-bit ELF file");
        let number = |at: usize, len: usize| {
            let mut bytes = [0u8; 8];
            bytes[..len].copy_from_slice(&BINARY[at..at + len]);
            u64::from_le_bytes(bytes) as usize
        };
        let (table, size, count) = (number(0x20, 8), number(0x36, 2), number(0x38, 2));
        assert!(count > 0);
        // No PT_INTERP program header: it needs no loader (nor libc) in the image.
        const PT_INTERP: usize = 3;
        let types: Vec<usize> = (0..count).map(|i| number(table + i * size, 4)).collect();
        assert!(
            !types.contains(&PT_INTERP),
            "berth-init asks for a loader: {types:?}"
        );
    }

    #[test]
    fn the_memfd_holds_init_and_refuses_writes() {
        let fd = sealed_memfd().unwrap();
        let mut file = File::from(fd);
        let mut read = Vec::new();
        use std::io::{Read, Seek};
        file.seek(io::SeekFrom::Start(0)).unwrap();
        file.read_to_end(&mut read).unwrap();
        assert!(read == BINARY);
        file.seek(io::SeekFrom::Start(0)).unwrap();
        assert!(
            file.write_all(b"x").is_err(),
            "a sealed init can be written"
        );
        assert!(file.set_len(0).is_err());
    }

    #[test]
    fn the_process_list_is_netstrings_in_init_s_order() {
        let processes = [
            InitProcess {
                args: vec!["sh".into(), "-c".into(), "a, b:c".into()],
                env: vec![("A".into(), "1=2".into())],
                ids: None,
            },
            InitProcess {
                args: vec!["/w".into()],
                env: vec![],
                ids: Some((1000, 100)),
            },
        ];
        assert_eq!(
            init_environment(true, &processes),
            [
                "BERTH_INIT_TTY=1",
                "BERTH_INIT_PROCESSES=0:,0:,1:3,2:sh,2:-c,6:a, b:c,1:1,5:A=1=2,\
                 4:1000,3:100,1:1,2:/w,1:0,"
            ]
        );
        assert!(init_environment(false, &[]).is_empty());
    }

    #[test]
    fn native_argv_puts_the_found_program_first() {
        let argv = native_argv(c"/bin/sh", &[c"sh".to_owned(), c"-c".to_owned()]);
        assert_eq!(
            argv,
            [c"berth-init", c"/bin/sh", c"sh", c"-c"].map(CStr::to_owned)
        );
    }
}
