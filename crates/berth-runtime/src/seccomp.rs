//! The default seccomp profile: what Docker's default profile denies a container without
//! extra capabilities, as a deny list (everything else is allowed), plus io_uring, socket
//! families other than the five ordinary ones, and `personality` flags.
//!
//! It is written into `config.json` (`linux.seccomp`), so runc applies it, and the native
//! driver compiles the same section with `seccompiler`: one profile, two drivers.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder,
    LinuxSeccompOperator, LinuxSyscallBuilder,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Syscalls Docker's default profile does not allow without added capabilities: kernel
/// modules, keyrings, mounts, namespaces, clocks, reboot, tracing of other processes'
/// memory, BPF and perf, NUMA policy, handle-based opens.
pub const DENIED_SYSCALLS: &[(&str, libc::c_long)] = &[
    ("acct", libc::SYS_acct),
    ("add_key", libc::SYS_add_key),
    ("bpf", libc::SYS_bpf),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("clock_settime", libc::SYS_clock_settime),
    ("delete_module", libc::SYS_delete_module),
    ("finit_module", libc::SYS_finit_module),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fsopen", libc::SYS_fsopen),
    ("fspick", libc::SYS_fspick),
    ("get_mempolicy", libc::SYS_get_mempolicy),
    ("init_module", libc::SYS_init_module),
    // A second syscall interface that seccomp cannot see into, and a steady source of
    // kernel bugs; Docker's profile dropped it too.
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("kcmp", libc::SYS_kcmp),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("kexec_load", libc::SYS_kexec_load),
    ("keyctl", libc::SYS_keyctl),
    ("mbind", libc::SYS_mbind),
    ("mount", libc::SYS_mount),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("move_mount", libc::SYS_move_mount),
    ("move_pages", libc::SYS_move_pages),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("open_tree", libc::SYS_open_tree),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("pivot_root", libc::SYS_pivot_root),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("quotactl", libc::SYS_quotactl),
    ("reboot", libc::SYS_reboot),
    ("request_key", libc::SYS_request_key),
    ("set_mempolicy", libc::SYS_set_mempolicy),
    ("setns", libc::SYS_setns),
    ("settimeofday", libc::SYS_settimeofday),
    ("swapoff", libc::SYS_swapoff),
    ("swapon", libc::SYS_swapon),
    ("syslog", libc::SYS_syslog),
    ("umount2", libc::SYS_umount2),
    ("unshare", libc::SYS_unshare),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("vhangup", libc::SYS_vhangup),
    #[cfg(target_arch = "x86_64")]
    ("ioperm", libc::SYS_ioperm),
    #[cfg(target_arch = "x86_64")]
    ("iopl", libc::SYS_iopl),
    #[cfg(target_arch = "x86_64")]
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    #[cfg(target_arch = "x86_64")]
    ("nfsservctl", libc::SYS_nfsservctl),
    #[cfg(target_arch = "x86_64")]
    ("sysfs", libc::SYS_sysfs),
    #[cfg(target_arch = "x86_64")]
    ("_sysctl", libc::SYS__sysctl),
    #[cfg(target_arch = "x86_64")]
    ("uselib", libc::SYS_uselib),
    #[cfg(target_arch = "x86_64")]
    ("ustat", libc::SYS_ustat),
];

/// `clone` flags that make namespaces; Docker allows `clone` only without them.
pub const NAMESPACE_CLONE_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// The socket families a Machine may open: local, IPv4, IPv6, netlink (for `ip` and
/// libc's address lookups) and packet (which still needs CAP_NET_RAW). Docker refuses only
/// AF_VSOCK; the rest (AF_ALG, AF_XDP, AF_TIPC, AF_RDS, ...) are rarely needed in a
/// container and often the way into a kernel bug. Others get EPERM, as Docker answers
/// AF_VSOCK (an errno of their own would cost a third filter, ~0.1 ms at every start).
pub const SOCKET_FAMILIES: [u64; 5] = [
    libc::AF_UNIX as u64,
    libc::AF_INET as u64,
    libc::AF_INET6 as u64,
    libc::AF_NETLINK as u64,
    libc::AF_PACKET as u64,
];

/// The `personality` flags a Machine may set, as Docker allows: `PER_LINUX32` and
/// `UNAME26`, alone or together (or none). Also allowed: the query, `0xffffffff`. Anything
/// else (e.g. `READ_IMPLIES_EXEC`, `ADDR_NO_RANDOMIZE`) is EPERM.
pub const PERSONALITY_FLAGS: u64 = 0x8 | 0x2_0000;
const PERSONALITY_QUERY: u64 = 0xffff_ffff;

/// Conditions (each a rule of its own, see [`all_but`]) matching every `personality`
/// argument but those of [`PERSONALITY_FLAGS`] and the query, in 33 rules: a value is
/// refused when it has a bit past 32, or a bit outside the flags and yet is not all ones.
/// The second is covered by "bit b set, bit c clear" for each outside bit b, with c the
/// next outside bit in a cycle (a value holding some but not all outside bits has such a
/// pair), and "first outside bit set, flag f clear" for each flag bit (a value holding
/// every outside bit is not all ones only if a flag bit is clear).
fn personality_conditions() -> Vec<(LinuxSeccompOperator, u64, u64)> {
    let outside: Vec<u64> = (0..32)
        .map(|bit| 1u64 << bit)
        .filter(|bit| PERSONALITY_FLAGS & bit == 0)
        .collect();
    let flags = (0..32)
        .map(|bit| 1u64 << bit)
        .filter(|bit| PERSONALITY_FLAGS & bit != 0);
    let mut conditions: Vec<_> = outside
        .iter()
        .zip(outside.iter().cycle().skip(1))
        .map(|(&set, &clear)| (LinuxSeccompOperator::ScmpCmpMaskedEq, set | clear, set))
        .collect();
    if let Some(&first) = outside.first() {
        conditions.extend(
            flags.map(|clear| (LinuxSeccompOperator::ScmpCmpMaskedEq, first | clear, first)),
        );
    }
    conditions.push((LinuxSeccompOperator::ScmpCmpGt, PERSONALITY_QUERY, 0));
    conditions
}

/// Conditions on one argument that together match every value except `allowed`: one
/// masked-equal per aligned block of each gap, and greater-than past the largest. Each
/// goes in a rule of its own: runc (libseccomp) ORs conditions on the same argument
/// within a rule, so "none of these" cannot be one rule. Compared on all 64 bits, so a
/// value the kernel would truncate to an allowed one is refused, not let through.
fn all_but(allowed: &[u64]) -> Vec<(LinuxSeccompOperator, u64, u64)> {
    let mut allowed = allowed.to_vec();
    allowed.sort_unstable();
    allowed.dedup();
    let mut conditions = Vec::new();
    let mut next = 0u64;
    for &value in &allowed {
        // The gap [next, value - 1], in aligned power-of-two blocks.
        let mut lo = next;
        while lo < value {
            let mut size = if lo == 0 {
                1u64 << 63
            } else {
                1u64 << lo.trailing_zeros()
            };
            while size > value - lo {
                size >>= 1;
            }
            conditions.push((LinuxSeccompOperator::ScmpCmpMaskedEq, !(size - 1), lo));
            lo += size;
        }
        next = value.saturating_add(1);
    }
    if let Some(&max) = allowed.last() {
        if max < u64::MAX {
            conditions.push((LinuxSeccompOperator::ScmpCmpGt, max, 0));
        }
    }
    conditions
}

/// The number of a syscall the profile names.
fn syscall_number(name: &str) -> Option<libc::c_long> {
    match name {
        "clone" => Some(libc::SYS_clone),
        "clone3" => Some(libc::SYS_clone3),
        "personality" => Some(libc::SYS_personality),
        "socket" => Some(libc::SYS_socket),
        "socketpair" => Some(libc::SYS_socketpair),
        _ => DENIED_SYSCALLS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, nr)| *nr),
    }
}

/// The profile as the OCI `linux.seccomp` section.
pub fn default_profile() -> Result<LinuxSeccomp, oci_spec::OciSpecError> {
    let eperm = i64::from(libc::EPERM) as u32;
    let mut syscalls = vec![LinuxSyscallBuilder::default()
        .names(
            DENIED_SYSCALLS
                .iter()
                .map(|(name, _)| (*name).to_owned())
                .collect::<Vec<_>>(),
        )
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(eperm)
        .build()?];
    // Docker answers clone3 with ENOSYS so libcs fall back to clone, whose flags a filter
    // can see (clone3 passes them in memory).
    syscalls.push(
        LinuxSyscallBuilder::default()
            .names(vec!["clone3".to_owned()])
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(libc::ENOSYS as u32)
            .build()?,
    );
    for flag in NAMESPACE_CLONE_FLAGS {
        syscalls.push(
            LinuxSyscallBuilder::default()
                .names(vec!["clone".to_owned()])
                .action(LinuxSeccompAction::ScmpActErrno)
                .errno_ret(eperm)
                .args(vec![LinuxSeccompArgBuilder::default()
                    .index(0usize)
                    .value(flag)
                    .value_two(flag)
                    .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                    .build()?])
                .build()?,
        );
    }
    // socketpair works only for AF_UNIX, but another family's socket is still created
    // before the kernel says so.
    let families = [
        ("socket", all_but(&SOCKET_FAMILIES)),
        ("socketpair", all_but(&[libc::AF_UNIX as u64])),
        ("personality", personality_conditions()),
    ];
    for (name, conditions) in families {
        for (op, value, value_two) in conditions {
            syscalls.push(
                LinuxSyscallBuilder::default()
                    .names(vec![name.to_owned()])
                    .action(LinuxSeccompAction::ScmpActErrno)
                    .errno_ret(eperm)
                    .args(vec![LinuxSeccompArgBuilder::default()
                        .index(0usize)
                        .value(value)
                        .value_two(value_two)
                        .op(op)
                        .build()?])
                    .build()?,
            );
        }
    }
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .syscalls(syscalls)
        .build()
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp profile: {0}")]
    Unsupported(String),
    #[error("seccomp filter: {0}")]
    Compile(#[from] seccompiler::BackendError),
}

/// The default profile and its programs, compiled once in the spawner so that every
/// Machine's init, forked from it, finds them ready.
static PRECOMPILED: OnceLock<(LinuxSeccomp, Vec<BpfProgram>)> = OnceLock::new();

/// Compiles [`default_profile`] for [`compile_or_reuse`] in this process and its children.
pub fn precompile_default() -> Result<(), SeccompError> {
    let profile = default_profile().map_err(|e| SeccompError::Unsupported(e.to_string()))?;
    let programs = compile(&profile)?;
    let _ = PRECOMPILED.set((profile, programs));
    Ok(())
}

/// [`compile`], unless `profile` is the precompiled default: then its programs.
pub fn compile_or_reuse(profile: &LinuxSeccomp) -> Result<Vec<BpfProgram>, SeccompError> {
    match PRECOMPILED.get() {
        Some((default, programs)) if default == profile => Ok(programs.clone()),
        _ => compile(profile),
    }
}

/// Compiles an OCI seccomp section of the shape [`default_profile`] writes: default
/// allow, rules that answer an errno, argument comparisons. Anything else is refused
/// rather than half applied. As runc does, an entry's conditions on different arguments
/// must all hold, and conditions on the same argument are alternatives. seccompiler has
/// one match action per filter, so each errno gets its own program; install them all
/// (the kernel runs every filter).
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<BpfProgram>, SeccompError> {
    let unsupported = |what: String| SeccompError::Unsupported(what);
    if profile.default_action() != LinuxSeccompAction::ScmpActAllow {
        return Err(unsupported(format!(
            "default action {:?}",
            profile.default_action()
        )));
    }
    // errno -> syscall -> rules; `None` matches every call of the syscall.
    type Rules = BTreeMap<i64, Option<Vec<SeccompRule>>>;
    let mut by_errno: BTreeMap<u32, Rules> = BTreeMap::new();
    for syscall in profile.syscalls().iter().flatten() {
        if syscall.action() != LinuxSeccompAction::ScmpActErrno {
            return Err(unsupported(format!("action {:?}", syscall.action())));
        }
        let errno = syscall.errno_ret().unwrap_or(libc::EPERM as u32);
        let mut conditions = Vec::new();
        for arg in syscall.args().iter().flatten() {
            let (op, value) = match arg.op() {
                LinuxSeccompOperator::ScmpCmpMaskedEq => (
                    SeccompCmpOp::MaskedEq(arg.value()),
                    arg.value_two().unwrap_or(0),
                ),
                LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
                LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
                LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
                LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
                LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
                LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
            };
            let index = u8::try_from(arg.index())
                .map_err(|_| unsupported(format!("argument {}", arg.index())))?;
            conditions.push(SeccompCondition::new(
                index,
                SeccompCmpArgLen::Qword,
                op,
                value,
            )?);
        }
        let mut indexes: Vec<_> = syscall.args().iter().flatten().map(|a| a.index()).collect();
        indexes.sort_unstable();
        let repeated = indexes.windows(2).any(|w| w[0] == w[1]);
        // One rule of all conditions, or (runc's reading of a repeated argument) one rule
        // per condition.
        let rules: Vec<Vec<SeccompCondition>> = if repeated {
            conditions.into_iter().map(|c| vec![c]).collect()
        } else {
            vec![conditions]
        };
        for name in syscall.names() {
            let Some(nr) = syscall_number(name) else {
                return Err(unsupported(format!("unknown syscall {name}")));
            };
            let entry = by_errno
                .entry(errno)
                .or_default()
                .entry(nr)
                .or_insert_with(|| Some(Vec::new()));
            for conditions in &rules {
                match entry {
                    None => {}
                    Some(_) if conditions.is_empty() => *entry = None,
                    Some(list) => list.push(SeccompRule::new(conditions.clone())?),
                }
            }
        }
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| unsupported(format!("architecture {}", std::env::consts::ARCH)))?;
    let mut programs = Vec::new();
    for (errno, rules) in by_errno {
        let rules = rules
            .into_iter()
            .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
            .collect();
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno),
            arch,
        )?;
        programs.push(filter.try_into()?);
    }
    Ok(programs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_profile_compiles() {
        let profile = default_profile().unwrap();
        let programs = compile(&profile).unwrap();
        // EPERM for everything but clone3, which gets ENOSYS: two filters, as before.
        assert_eq!(programs.len(), 2);
        let json = serde_json::to_value(&profile).unwrap();
        assert_eq!(json["defaultAction"], "SCMP_ACT_ALLOW");
        let names = json["syscalls"][0]["names"].as_array().unwrap();
        for denied in [
            "mount",
            "unshare",
            "setns",
            "keyctl",
            "bpf",
            "reboot",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
        ] {
            assert!(names.iter().any(|n| n == denied), "{denied}");
        }
        // What runc gets: one condition per entry, in operators libseccomp knows.
        let socket: Vec<_> = json["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["names"][0] == "socket")
            .collect();
        assert!(!socket.is_empty());
        for rule in socket {
            assert_eq!(rule["errnoRet"], libc::EPERM);
            assert_eq!(rule["args"].as_array().unwrap().len(), 1);
            let op = rule["args"][0]["op"].as_str().unwrap();
            assert!(["SCMP_CMP_MASKED_EQ", "SCMP_CMP_GT"].contains(&op), "{op}");
        }
    }

    /// Whether any of `conditions` (alternatives, as in the profile) matches `value`.
    fn matches(conditions: &[(LinuxSeccompOperator, u64, u64)], value: u64) -> bool {
        conditions.iter().any(|&(op, a, b)| match op {
            LinuxSeccompOperator::ScmpCmpMaskedEq => value & a == b,
            LinuxSeccompOperator::ScmpCmpGt => value > a,
            other => panic!("unexpected {other:?}"),
        })
    }

    #[test]
    fn the_conditions_match_exactly_what_is_not_allowed() {
        let mut samples: Vec<u64> = (0..70_000).collect();
        for bit in 0..64 {
            samples.extend([1u64 << bit, (1u64 << bit) - 1, (1u64 << bit) + 1]);
            // All ones in 32 bits but one or two: the hard cases of `personality`.
            for other in 0..32 {
                samples.push(0xffff_ffff ^ (1u64 << (bit % 32)) ^ (1u64 << other));
            }
        }
        let personalities = [0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];
        for allowed in personalities.iter().chain(&SOCKET_FAMILIES) {
            samples.extend([allowed.wrapping_sub(1), *allowed, allowed + 1]);
            // What the kernel would truncate to an allowed value.
            samples.extend([allowed | (1 << 32), allowed | (1 << 63)]);
        }
        // A cheap spread over the 32-bit range.
        let mut x = 1u64;
        for _ in 0..200_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            samples.extend([x >> 32, x]);
        }
        let cases = [
            (&SOCKET_FAMILIES[..], all_but(&SOCKET_FAMILIES)),
            (&[1][..], all_but(&[1])),
            (&personalities[..], personality_conditions()),
        ];
        for (allowed, conditions) in cases {
            for &value in &samples {
                assert_eq!(
                    matches(&conditions, value),
                    !allowed.contains(&value),
                    "{value:#x} against {allowed:x?}"
                );
            }
        }
        // Small enough to stay cheap on the paths that run it.
        assert_eq!(all_but(&SOCKET_FAMILIES).len(), 7);
        assert_eq!(personality_conditions().len(), 33);
    }

    #[test]
    fn repeated_arguments_are_alternatives_as_in_runc() {
        let rule = |op, value: u64| {
            LinuxSeccompArgBuilder::default()
                .index(0usize)
                .value(value)
                .op(op)
                .build()
                .unwrap()
        };
        let either = LinuxSyscallBuilder::default()
            .names(vec!["personality".to_owned()])
            .action(LinuxSeccompAction::ScmpActErrno)
            .args(vec![
                rule(LinuxSeccompOperator::ScmpCmpEq, 1),
                rule(LinuxSeccompOperator::ScmpCmpEq, 2),
            ])
            .build()
            .unwrap();
        let separate = |value: u64| {
            LinuxSyscallBuilder::default()
                .names(vec!["personality".to_owned()])
                .action(LinuxSeccompAction::ScmpActErrno)
                .args(vec![rule(LinuxSeccompOperator::ScmpCmpEq, value)])
                .build()
                .unwrap()
        };
        let profile = |syscalls| {
            LinuxSeccompBuilder::default()
                .default_action(LinuxSeccompAction::ScmpActAllow)
                .syscalls(syscalls)
                .build()
                .unwrap()
        };
        assert_eq!(
            compile(&profile(vec![either])).unwrap(),
            compile(&profile(vec![separate(1), separate(2)])).unwrap()
        );
    }

    #[test]
    fn the_precompiled_default_is_reused_only_for_the_same_profile() {
        precompile_default().unwrap();
        let default = default_profile().unwrap();
        assert_eq!(
            compile_or_reuse(&default).unwrap(),
            compile(&default).unwrap()
        );
        let mut narrower = default.clone();
        let mut syscalls = narrower.syscalls().clone().unwrap();
        syscalls.truncate(1);
        narrower.set_syscalls(Some(syscalls));
        assert_ne!(
            compile_or_reuse(&narrower).unwrap(),
            compile(&default).unwrap()
        );
    }

    #[test]
    fn refuses_what_it_cannot_apply() {
        let mut profile = default_profile().unwrap();
        profile.set_default_action(LinuxSeccompAction::ScmpActKillProcess);
        assert!(compile(&profile).is_err());
    }
}
