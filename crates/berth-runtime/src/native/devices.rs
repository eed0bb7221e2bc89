//! The device rules of a Machine whose cgroup has no v1 `devices` controller: an eBPF
//! program of type `BPF_PROG_TYPE_CGROUP_DEVICE` attached to its cgroup on the unified
//! hierarchy, which is how cgroup v2 expresses `devices.allow` (runc does the same).
//!
//! The kernel runs it on every open and mknod of a device node by a process in the
//! cgroup; it returns 1 to allow, 0 to refuse with EPERM. The Machine's user namespace
//! already refuses mknod, but not the opening of a device node that is there: one that an
//! image ships in its layers, or one that a mount (a volume, a devpts) brings in. The
//! filter allows only the devices of [`DEFAULT_ALLOWED`], whatever the node on disk says.
//!
//! Attached at create (and again on update) with no flags, so a second attach replaces
//! the first; the cgroup holds the program, and it goes with the cgroup. Nothing of it
//! runs on the start path.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// runc's default device rules: deny all, then these (and mknod of any device), in the
/// syntax of v1's `devices.allow`.
pub(crate) const DEFAULT_ALLOWED: [&str; 10] = [
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
];

// From the kernel's uapi `linux/bpf.h`.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
/// `access_type` of `struct bpf_cgroup_dev_ctx`: the device type in the low 16 bits,
/// the access in the high 16.
const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;
const ACC_MKNOD: u32 = 1;
const ACC_READ: u32 = 2;
const ACC_WRITE: u32 = 4;
const ACC_ALL: u32 = ACC_MKNOD | ACC_READ | ACC_WRITE;

/// One `devices.allow` line: `a`, or `c|b major|*:minor|* [rwm]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeviceRule {
    /// [`DEV_CHAR`] or [`DEV_BLOCK`]; None for any (`a`).
    kind: Option<i32>,
    major: Option<u32>,
    minor: Option<u32>,
    access: u32,
}

impl DeviceRule {
    pub(crate) fn parse(rule: &str) -> io::Result<DeviceRule> {
        let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("device rule {rule:?}"));
        let mut fields = rule.split_whitespace();
        let kind = match fields.next() {
            Some("a") => {
                return Ok(DeviceRule {
                    kind: None,
                    major: None,
                    minor: None,
                    access: ACC_ALL,
                })
            }
            Some("c") => DEV_CHAR,
            Some("b") => DEV_BLOCK,
            _ => return Err(bad()),
        };
        let (major, minor) = fields
            .next()
            .and_then(|n| n.split_once(':'))
            .ok_or_else(bad)?;
        let number = |n: &str| match n {
            "*" => Ok(None),
            n => n.parse::<u32>().map(Some).map_err(|_| bad()),
        };
        let access = fields
            .next()
            .unwrap_or("rwm")
            .chars()
            .try_fold(0, |acc, c| {
                Ok(acc
                    | match c {
                        'r' => ACC_READ,
                        'w' => ACC_WRITE,
                        'm' => ACC_MKNOD,
                        _ => return Err(bad()),
                    })
            })?;
        Ok(DeviceRule {
            kind: Some(kind),
            major: number(major)?,
            minor: number(minor)?,
            access,
        })
    }
}

/// One eBPF instruction (`struct bpf_insn`): registers are dst in the low nibble, src in
/// the high one.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

// Opcodes: class | operation | source.
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const AND_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
const RSH_K: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
const MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const MOV_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

/// The filter: the request is unpacked into r2 (type), r3 (access), r4 (major), r5
/// (minor); then one block per rule that jumps past itself on the first field that does
/// not match and otherwise returns 1; a request no rule allows returns 0.
fn program(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut out = vec![
        insn(LDX_W, 2, 1, 0, 0),
        insn(AND_K, 2, 0, 0, 0xffff),
        insn(LDX_W, 3, 1, 0, 0),
        insn(RSH_K, 3, 0, 0, 16),
        insn(LDX_W, 4, 1, 4, 0),
        insn(LDX_W, 5, 1, 8, 0),
    ];
    for rule in rules {
        // Each jump is written with its distance to the block's end, counted below.
        let mut block: Vec<(Insn, bool)> = Vec::new();
        if let Some(kind) = rule.kind {
            block.push((insn(JNE_K, 2, 0, 0, kind), true));
        }
        if rule.access != ACC_ALL {
            // Refused when the request asks for anything the rule does not grant.
            block.push((insn(MOV_X, 1, 3, 0, 0), false));
            block.push((insn(AND_K, 1, 0, 0, (!rule.access & ACC_ALL) as i32), false));
            block.push((insn(JNE_K, 1, 0, 0, 0), true));
        }
        for (register, number) in [(4, rule.major), (5, rule.minor)] {
            if let Some(number) = number {
                // Kernel device numbers are 12 and 20 bits: they fit an immediate.
                block.push((insn(JNE_K, register, 0, 0, number as i32), true));
            }
        }
        block.push((insn(MOV_K, 0, 0, 0, 1), false));
        block.push((insn(EXIT, 0, 0, 0, 0), false));
        let len = block.len();
        for (at, (mut ins, jumps)) in block.into_iter().enumerate() {
            if jumps {
                ins.off = (len - at - 1) as i16;
            }
            out.push(ins);
        }
    }
    out.push(insn(MOV_K, 0, 0, 0, 0));
    out.push(insn(EXIT, 0, 0, 0, 0));
    out
}

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD`; the kernel zero-fills
/// the rest.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
}

/// The leading fields of `union bpf_attr` for `BPF_PROG_ATTACH`.
#[repr(C)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised `#[repr(C)]` prefix of `union bpf_attr` and its
    // size is passed with it; the kernel reads (and for a load, writes a log into the
    // buffer the attr names, which the caller keeps alive) no further.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn load(insns: &[Insn]) -> io::Result<OwnedFd> {
    const LICENSE: &CStr = c"Apache-2.0";
    let attempt = |log: &mut [u8]| -> io::Result<OwnedFd> {
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: LICENSE.as_ptr() as u64,
            log_level: u32::from(!log.is_empty()),
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
        };
        let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
        // SAFETY: BPF_PROG_LOAD returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    };
    attempt(&mut []).or_else(|e| {
        // Again with the verifier's log, only to say why.
        let mut log = vec![0u8; 16 * 1024];
        attempt(&mut log).map_err(|_| {
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0').trim();
            io::Error::new(e.kind(), format!("load the device filter: {e}: {text}"))
        })
    })
}

/// Loads the filter for `rules` and attaches it to the v2 cgroup `dir`, replacing one an
/// earlier call attached there.
pub(crate) fn attach(dir: &Path, rules: &[DeviceRule]) -> io::Result<()> {
    let prog = load(&program(rules))?;
    let cgroup = rustix::fs::open(
        dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let mut attr = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: 0,
    };
    bpf(BPF_PROG_ATTACH, &mut attr)
        .map(drop)
        .map_err(|e| io::Error::new(e.kind(), format!("attach the device filter: {e}")))
}

/// [`DEFAULT_ALLOWED`], parsed.
pub(crate) fn default_rules() -> io::Result<Vec<DeviceRule>> {
    DEFAULT_ALLOWED
        .iter()
        .map(|r| DeviceRule::parse(r))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::fd::AsFd;

    #[test]
    fn parses_devices_allow_lines() {
        assert_eq!(
            DeviceRule::parse("c 136:* rw").unwrap(),
            DeviceRule {
                kind: Some(DEV_CHAR),
                major: Some(136),
                minor: None,
                access: ACC_READ | ACC_WRITE,
            }
        );
        assert_eq!(
            DeviceRule::parse("b *:* m").unwrap(),
            DeviceRule {
                kind: Some(DEV_BLOCK),
                major: None,
                minor: None,
                access: ACC_MKNOD,
            }
        );
        assert_eq!(DeviceRule::parse("a").unwrap().access, ACC_ALL);
        for bad in ["x 1:3 rwm", "c 1 rwm", "c 1:3 rwx", "c a:3 r", ""] {
            assert!(DeviceRule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_rule_jumps_to_the_next_on_a_mismatch() {
        let rules = [DeviceRule::parse("c 1:3 rw").unwrap()];
        let insns = program(&rules);
        // 6 to unpack, then: type, (mov, and, jne) for access, major, minor, mov, exit.
        let block = &insns[6..insns.len() - 2];
        assert_eq!(block.len(), 8);
        let jumps: Vec<(usize, i16)> = block
            .iter()
            .enumerate()
            .filter(|(_, i)| i.code == JNE_K)
            .map(|(at, i)| (at, i.off))
            .collect();
        // Every jump lands just past the block's exit.
        assert!(jumps.iter().all(|(at, off)| at + 1 + *off as usize == 8));
        assert_eq!(jumps.len(), 4);
        assert_eq!(block[2].imm, ACC_MKNOD as i32, "only mknod is refused");
        assert_eq!(insns.last().unwrap().code, EXIT);
    }

    /// Opens each path read-only in a child made in `cgroup`: Ok or the errno, each.
    fn open_in(cgroup: &Path, paths: &[&str]) -> Vec<Result<(), i32>> {
        let paths: Vec<CString> = paths.iter().map(|p| CString::new(*p).unwrap()).collect();
        let dir = rustix::fs::open(
            cgroup,
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        // SAFETY: the child only makes raw syscalls (open, write, _exit) on memory
        // prepared before the clone, which is safe in a child of a multi-threaded test.
        let forked = unsafe { crate::native::cgroup::clone_into(dir.as_fd()) }.unwrap();
        let Some(child) = forked else {
            for path in &paths {
                // SAFETY: a valid C string; the descriptor is closed again at once.
                let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
                let errno = if fd < 0 {
                    io::Error::last_os_error().raw_os_error().unwrap_or(-1)
                } else {
                    // SAFETY: closes the descriptor this child just opened.
                    unsafe { libc::close(fd) };
                    0
                };
                // SAFETY: writes 4 bytes from a live i32 to the pipe.
                unsafe { libc::write(w.as_raw_fd(), (&errno as *const i32).cast(), 4) };
            }
            // SAFETY: ends the child without the test harness's exit paths.
            unsafe { libc::_exit(0) }
        };
        drop(w);
        let mut bytes = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match rustix::io::read(&r, &mut buf) {
                Ok(0) => break,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => panic!("{e}"),
            }
        }
        nix::sys::wait::waitpid(child, None).unwrap();
        bytes
            .chunks(4)
            .map(|c| i32::from_ne_bytes(c.try_into().unwrap()))
            .map(|errno| if errno == 0 { Ok(()) } else { Err(errno) })
            .collect()
    }

    /// The filter, for real: a child in a v2 cgroup with it attached opens /dev/null but
    /// gets EPERM for /dev/kmsg (c 1:11, not in the list) and a block device; the same
    /// child in the same cgroup before the attach opens all three, so the EPERM is the
    /// filter's and the check can fail.
    #[test]
    fn the_filter_refuses_devices_outside_the_list() {
        let Some(base) = crate::native::cgroup::own_v2_dir_for_tests() else {
            eprintln!("no cgroup v2 hierarchy mounted: skipped");
            return;
        };
        // A block device this process may open (a sandbox may refuse some to everyone).
        let block = ["/dev/loop0", "/dev/vda", "/dev/sda", "/dev/nvme0n1"]
            .into_iter()
            .find(|p| std::fs::File::open(p).is_ok())
            .unwrap_or("/dev/null");
        let dir = base.join(format!("berth-test-devices-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let paths = ["/dev/null", "/dev/kmsg", block];
        let unfiltered = open_in(&dir, &paths);
        attach(&dir, &default_rules().unwrap()).unwrap();
        let filtered = open_in(&dir, &paths);
        // Again, replacing the first program: the rules stay the same.
        attach(&dir, &default_rules().unwrap()).unwrap();
        let replaced = open_in(&dir, &paths[..2]);
        std::fs::remove_dir(&dir).unwrap();
        assert_eq!(unfiltered, [Ok(()), Ok(()), Ok(())]);
        let refused_block = if block == "/dev/null" {
            Ok(())
        } else {
            Err(libc::EPERM)
        };
        assert_eq!(filtered, [Ok(()), Err(libc::EPERM), refused_block]);
        assert_eq!(replaced, [Ok(()), Err(libc::EPERM)]);
    }
}
