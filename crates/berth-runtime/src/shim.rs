//! `berth shim` (or the standalone `berth-shim`): the one program every helper process of
//! the runtime is, told apart by its first argument.

use std::ffi::OsString;

use crate::native::{exec_in, spawner};
use crate::oci::{exec_guard, shim};

/// Entry point of the `berth-shim` binary and of `berth shim`. `args` excludes the
/// program name (and subcommand): `spawner …` is the native driver's spawner, `nsexec …`
/// its exec helper, `exec-guard …` the runc driver's exec helper, and anything else the
/// runc and gVisor drivers' shim (see [`crate::oci::shim`] on when to call it).
pub fn main_with_args(args: Vec<OsString>) -> i32 {
    let Some(first) = args.first() else {
        return shim::main_with_args(args);
    };
    let rest = || args.iter().skip(1).cloned().collect();
    if first == spawner::SPAWNER_ARG {
        spawner::main_with_args(rest())
    } else if first == exec_in::NSEXEC_ARG {
        exec_in::main_with_args(rest())
    } else if first == exec_guard::EXEC_GUARD_ARG {
        exec_guard::main_with_args(rest())
    } else {
        shim::main_with_args(args)
    }
}
