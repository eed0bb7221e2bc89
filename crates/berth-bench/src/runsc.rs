//! The gVisor peers: runsc itself on the Machine's own `config.json` and image layers,
//! with the flags Berth's gvisor driver passes (`--platform=ptrace` and the rest, from
//! [`GvisorConfig::global_args`]) and a `--root` of its own. Timed as the runc peers are
//! (peers.rs): warm-up runs first, set-up and clean-up outside the clock.
//!
//! - start: `runsc run -d`, and `runsc create` then `runsc start`;
//! - suspend and resume: a running sandbox checkpointed with `runsc checkpoint
//!   --image-path` and brought back with `runsc restore --image-path --detach`, again and
//!   again, as Berth's suspend→start cycles are (the `runsc delete` that frees the
//!   checkpointed container's name in between is timed on its own).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth_runtime::gvisor::GvisorConfig;

use crate::peers::{remove_cgroup, repeat, runc_bundle_config, Outcome, Runner, WARMUP};

/// The cgroup parent the peer sandboxes run under ([`runc_bundle_config`] puts them
/// there), removed afterwards.
const PEER_CGROUP: &str = "berth-bench";

pub struct StartTimes {
    pub run: Outcome,
    pub create: Outcome,
    pub start: Outcome,
    /// `runsc create` and `runsc start` of the same sandbox, added up.
    pub create_start: Outcome,
}

pub struct CheckpointTimes {
    pub checkpoint: Outcome,
    pub restore: Outcome,
    /// `runsc delete` of the checkpointed container, between a checkpoint and a restore.
    pub delete: Outcome,
    /// The image `runsc checkpoint` wrote, in bytes (the last one).
    pub image_bytes: Option<u64>,
}

/// What a peer runs: runsc, its flags, and the bundle made of a Machine's own config.
pub struct Peer<'a> {
    pub runsc: &'a Path,
    pub runs: usize,
    /// The Machine's `config.json`, as Berth's gvisor driver wrote it.
    pub machine_config_json: &'a Path,
    pub lowerdirs: &'a [PathBuf],
    /// The Machine's pinned user namespace: the peer's overlay is mapped through it, as
    /// the driver maps the Machine's (the sandbox's gofer runs as the map's root).
    pub userns: &'a Path,
    /// A directory of its own under the bench's scratch dir.
    pub dir: &'a Path,
    /// A command that succeeds inside the sandbox (`runsc exec`) once the Machine's
    /// memory is filled: checkpoints wait for it, and it must hold after the restores.
    pub ready: Option<&'a [&'a str]>,
}

/// runsc's network set-up (in `run`, `start` and `restore`) takes a network namespace
/// with `/proc/sys/net/core/rmem_default` for the host's own and refuses it; Berth's shim
/// runs those calls in a private mount namespace with a fresh procfs over
/// `/proc/sys/net` (see `hide_proc_sys_net` in berth-runtime's oci shim). The peer does
/// the same, or it would not run at all on this kernel.
fn hide_proc_sys_net(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook makes only unshare(2) and mount(2) calls, async-signal-safe, with
    // constant C strings, in the child before it execs runsc.
    unsafe {
        command.pre_exec(|| {
            let check = |result: libc::c_int| match result {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            };
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_PRIVATE | libc::MS_REC,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"proc".as_ptr(),
                c"/proc/sys/net".as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ))
        });
    }
}

/// The subcommands that set up the sandbox's network, as the shim knows them.
fn sets_up_network(subcommand: &str) -> bool {
    matches!(subcommand, "run" | "start" | "restore")
}

/// A runsc call with the peer's `--root` and the driver's flags.
struct Runsc {
    binary: PathBuf,
    root: PathBuf,
    global_args: Vec<std::ffi::OsString>,
}

impl Runsc {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .arg("--root")
            .arg(&self.root)
            .args(&self.global_args)
            .args(args);
        if args.first().copied().is_some_and(sets_up_network) {
            hide_proc_sys_net(&mut command);
        }
        command
    }

    /// Removes the sandbox whatever its state (untimed clean-up).
    fn delete(&self, runner: &Runner, id: &str) -> Result<Duration> {
        runner.timed(&mut self.command(&["delete", "--force", id]))
    }

    /// Polls `check` inside the sandbox until it succeeds.
    fn wait_until(&self, id: &str, check: &[&str]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = self
                .command(&[&["exec", id][..], check].concat())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            if status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{check:?} did not succeed in the peer sandbox {id}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A bundle over an overlay of the Machine's layers, unmounted (and its cgroup removed)
/// when dropped.
struct Bundle {
    dir: PathBuf,
    rootfs: PathBuf,
}

impl Bundle {
    fn make(peer: &Peer<'_>) -> Result<Bundle> {
        let (upper, work, rootfs, dir) = (
            peer.dir.join("upper"),
            peer.dir.join("work"),
            peer.dir.join("rootfs"),
            peer.dir.join("bundle"),
        );
        for path in [&upper, &work, &rootfs, &dir] {
            std::fs::create_dir_all(path)?;
        }
        let userns = std::fs::File::open(peer.userns)
            .with_context(|| format!("open {}", peer.userns.display()))?;
        berth_runtime::overlay::mount_idmapped(
            peer.lowerdirs,
            &upper,
            &work,
            std::os::fd::AsFd::as_fd(&userns),
            &rootfs,
        )?;
        let bundle = Bundle { dir, rootfs };
        let config = runc_bundle_config(peer.machine_config_json, &bundle.rootfs)?;
        std::fs::write(
            bundle.dir.join("config.json"),
            serde_json::to_vec_pretty(&config)?,
        )?;
        Ok(bundle)
    }

    fn arg(&self) -> String {
        self.dir.to_string_lossy().into_owned()
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        let _ = berth_runtime::overlay::unmount(&self.rootfs);
        remove_cgroup(PEER_CGROUP);
    }
}

fn runsc_for(peer: &Peer<'_>) -> Result<(Runsc, Runner)> {
    let root = peer.dir.join("runsc-root");
    std::fs::create_dir_all(&root)?;
    let runsc = Runsc {
        binary: peer.runsc.to_path_buf(),
        root,
        global_args: GvisorConfig::new(Vec::new()).global_args(),
    };
    let runner = Runner {
        stderr_path: peer.dir.join("stderr"),
    };
    Ok((runsc, runner))
}

/// `runsc run -d`, and `runsc create` + `runsc start`, of the Machine's bundle.
pub fn measure_start(peer: &Peer<'_>) -> Result<StartTimes> {
    let (runsc, runner) = runsc_for(peer)?;
    let bundle = Bundle::make(peer)?;
    let bundle_arg = bundle.arg();
    let run = repeat(peer.runs, |index| {
        let id = format!("berth-bench-gv-run-{index}");
        let elapsed =
            runner.timed(&mut runsc.command(&["run", "--detach", "--bundle", &bundle_arg, &id]));
        runsc.delete(&runner, &id)?;
        elapsed
    });
    let (mut creates, mut starts) = (Vec::new(), Vec::new());
    let create_start = repeat(peer.runs, |index| {
        let id = format!("berth-bench-gv-cs-{index}");
        let create = runner.timed(&mut runsc.command(&["create", "--bundle", &bundle_arg, &id]));
        let start = create
            .as_ref()
            .ok()
            .map(|_| runner.timed(&mut runsc.command(&["start", &id])));
        runsc.delete(&runner, &id)?;
        let (create, start) = (create?, start.context("no start after a failed create")??);
        if index >= WARMUP {
            creates.push(create);
            starts.push(start);
        }
        Ok(create + start)
    });
    drop(bundle);
    let (create, start) = match &create_start {
        Ok(_) => (Ok(creates), Ok(starts)),
        Err(reason) => (Err(reason.clone()), Err(reason.clone())),
    };
    Ok(StartTimes {
        run,
        create,
        start,
        create_start,
    })
}

/// One running sandbox checkpointed and restored `peer.runs` times (after the warm-up
/// cycles), each checkpoint into an empty image directory.
pub fn measure_checkpoint(peer: &Peer<'_>) -> Result<CheckpointTimes> {
    let (runsc, runner) = runsc_for(peer)?;
    let bundle = Bundle::make(peer)?;
    let bundle_arg = bundle.arg();
    let image = peer.dir.join("image");
    let image_arg = image.to_string_lossy().into_owned();
    let id = "berth-bench-gv-ckpt";
    let result = (|| {
        runner.timed(&mut runsc.command(&["run", "--detach", "--bundle", &bundle_arg, id]))?;
        if let Some(check) = peer.ready {
            runsc.wait_until(id, check)?;
        }
        let (mut checkpoints, mut restores, mut deletes) = (Vec::new(), Vec::new(), Vec::new());
        let mut image_bytes = None;
        for index in 0..WARMUP + peer.runs {
            let _ = std::fs::remove_dir_all(&image);
            std::fs::create_dir_all(&image)?;
            let checkpoint = runner.timed(&mut runsc.command(&[
                "checkpoint",
                "--image-path",
                &image_arg,
                id,
            ]))?;
            image_bytes = Some(crate::harness::disk_bytes(&image)?);
            let delete = runsc.delete(&runner, id)?;
            let restore = runner.timed(&mut runsc.command(&[
                "restore",
                "--detach",
                "--image-path",
                &image_arg,
                "--bundle",
                &bundle_arg,
                id,
            ]))?;
            if index >= WARMUP {
                checkpoints.push(checkpoint);
                deletes.push(delete);
                restores.push(restore);
            }
        }
        if let Some(check) = peer.ready {
            // The memory came back with the restores.
            runsc.wait_until(id, check)?;
        }
        Ok::<_, anyhow::Error>((checkpoints, restores, deletes, image_bytes))
    })();
    let _ = runsc.delete(&runner, id);
    let _ = std::fs::remove_dir_all(&image);
    drop(bundle);
    Ok(match result {
        Ok((checkpoints, restores, deletes, image_bytes)) => CheckpointTimes {
            checkpoint: Ok(checkpoints),
            restore: Ok(restores),
            delete: Ok(deletes),
            image_bytes,
        },
        Err(error) => {
            let reason = format!("{error:#}");
            CheckpointTimes {
                checkpoint: Err(reason.clone()),
                restore: Err(reason.clone()),
                delete: Err(reason),
                image_bytes: None,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_call_has_its_own_root_and_the_drivers_flags_before_the_subcommand() {
        let runsc = Runsc {
            binary: PathBuf::from("/usr/bin/runsc"),
            root: PathBuf::from("/scratch/peer/runsc-root"),
            global_args: GvisorConfig::new(Vec::new()).global_args(),
        };
        let command = runsc.command(&["checkpoint", "--image-path", "/i", "c1"]);
        let args: Vec<&std::ffi::OsStr> = command.get_args().collect();
        assert_eq!(
            args,
            [
                "--root",
                "/scratch/peer/runsc-root",
                "--platform=ptrace",
                "--network=sandbox",
                "--oci-seccomp",
                "checkpoint",
                "--image-path",
                "/i",
                "c1"
            ]
        );
    }

    #[test]
    fn only_the_calls_that_set_up_the_network_hide_proc_sys_net() {
        for subcommand in ["run", "start", "restore"] {
            assert!(sets_up_network(subcommand), "{subcommand}");
        }
        for subcommand in ["create", "checkpoint", "delete", "exec"] {
            assert!(!sets_up_network(subcommand), "{subcommand}");
        }
    }
}
