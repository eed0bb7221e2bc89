//! The peers, measured in the same run on the same rootfs and command as Berth's Machine:
//! `runc run -d`, `runc create` + `runc start`, `podman create` / `start` / `run -d`, and
//! the `unshare` floor. Each is timed like hyperfine does: a few untimed warm-up runs, then
//! the timed ones, each with its set-up and clean-up outside the clock. A peer that cannot
//! run is reported with the reason, never with a figure.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth::platform::find_program;
use serde_json::{json, Value};

/// Untimed runs before the timed ones: they fill the page cache and runc's and podman's
/// own caches, as hyperfine's `--warmup` does.
pub(crate) const WARMUP: usize = 3;

/// The samples of one peer, or why it could not run.
pub type Outcome = std::result::Result<Vec<Duration>, String>;

pub struct PeerTimes {
    pub runc_run: Outcome,
    pub runc_create: Outcome,
    pub runc_start: Outcome,
    /// `runc create` and `runc start` of the same container, added up.
    pub runc_create_start: Outcome,
    pub podman_create: Outcome,
    pub podman_start: Outcome,
    pub podman_run: Outcome,
    pub unshare: Outcome,
}

/// The command's stderr goes to a file rather than a pipe: a detached container inherits
/// it, and a pipe would stay open for as long as the container runs.
pub(crate) struct Runner {
    pub(crate) stderr_path: PathBuf,
}

impl Runner {
    /// Runs the command to its end and returns how long it took; a failure carries the
    /// command's stderr.
    pub(crate) fn timed(&self, command: &mut Command) -> Result<Duration> {
        let stderr = File::create(&self.stderr_path)?;
        let clock = Instant::now();
        let status = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .status()
            .with_context(|| format!("running {command:?}"))?;
        let elapsed = clock.elapsed();
        if !status.success() {
            let message = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
            bail!("{command:?} failed ({status}): {}", message.trim());
        }
        Ok(elapsed)
    }
}

/// `warmup` untimed then `runs` timed calls of `one`, which returns the sample of call `i`.
pub(crate) fn repeat(
    runs: usize,
    mut one: impl FnMut(usize) -> Result<Duration>,
) -> std::result::Result<Vec<Duration>, String> {
    let mut samples = Vec::with_capacity(runs);
    for index in 0..WARMUP + runs {
        let sample = one(index).map_err(|error| format!("{error:#}"))?;
        if index >= WARMUP {
            samples.push(sample);
        }
    }
    Ok(samples)
}

/// What the peers share: the Machine's own bundle config and image layers.
pub struct PeerInputs<'a> {
    pub runs: usize,
    pub runc: &'a Path,
    /// The Machine's `config.json`, as Berth's runtime wrote it.
    pub machine_config_json: &'a Path,
    pub lowerdirs: &'a [PathBuf],
    pub scratch: &'a Path,
}

/// Mounts an overlay of the Machine's layers, measures every peer on it, and unmounts it
/// and removes what the peers made, whatever happened.
pub fn measure(inputs: &PeerInputs<'_>) -> Result<PeerTimes> {
    let root = inputs.scratch.join("peer");
    let (upper, work, rootfs, bundle) = (
        root.join("upper"),
        root.join("work"),
        root.join("rootfs"),
        root.join("bundle"),
    );
    for dir in [&upper, &work, &rootfs, &bundle] {
        std::fs::create_dir_all(dir)?;
    }
    berth_runtime::overlay::mount(inputs.lowerdirs, &upper, &work, &rootfs)?;
    let result = measure_on(inputs, &root, &rootfs, &bundle);
    let _ = berth_runtime::overlay::unmount(&rootfs);
    remove_cgroup(RUNC_PEER_CGROUP);
    result
}

fn measure_on(
    inputs: &PeerInputs<'_>,
    root: &Path,
    rootfs: &Path,
    bundle: &Path,
) -> Result<PeerTimes> {
    let runner = Runner {
        stderr_path: root.join("stderr"),
    };
    // podman imports the rootfs before runc has run anything in it.
    let podman = measure_podman(inputs, &runner, root, rootfs);
    let unshare = measure_unshare(inputs.runs, &runner, rootfs);
    let runc = measure_runc(inputs, &runner, root, rootfs, bundle)?;
    Ok(PeerTimes {
        runc_run: runc.run,
        runc_create: runc.create,
        runc_start: runc.start,
        runc_create_start: runc.create_start,
        podman_create: podman.create,
        podman_start: podman.start,
        podman_run: podman.run,
        unshare,
    })
}

struct RuncTimes {
    run: Outcome,
    create: Outcome,
    start: Outcome,
    create_start: Outcome,
}

/// The Machine's `config.json` over the peer's overlay, with runc (or runsc) making fresh
/// namespaces (the Machine's own network namespace belongs to the Machine).
pub(crate) fn runc_bundle_config(machine_config_json: &Path, rootfs: &Path) -> Result<Value> {
    let mut config: Value = serde_json::from_slice(&std::fs::read(machine_config_json)?)?;
    config["root"]["path"] = json!(rootfs);
    if let Some(namespaces) = config["linux"]["namespaces"].as_array_mut() {
        for namespace in namespaces.iter_mut() {
            if let Some(object) = namespace.as_object_mut() {
                object.remove("path");
            }
        }
    }
    config["linux"]["cgroupsPath"] = json!(format!("{RUNC_PEER_CGROUP}/peer"));
    Ok(config)
}

fn measure_runc(
    inputs: &PeerInputs<'_>,
    runner: &Runner,
    root: &Path,
    rootfs: &Path,
    bundle: &Path,
) -> Result<RuncTimes> {
    let config = runc_bundle_config(inputs.machine_config_json, rootfs)?;
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&config)?,
    )?;
    let state_root = root.join("runc-state");
    let runc = |args: &[&str]| {
        let mut command = Command::new(inputs.runc);
        command.arg("--root").arg(&state_root).args(args);
        command
    };
    let bundle_arg = bundle.to_string_lossy().into_owned();
    let run = repeat(inputs.runs, |index| {
        let id = format!("berth-bench-peer-run-{index}");
        let elapsed = runner.timed(&mut runc(&["run", "-d", "--bundle", &bundle_arg, &id]));
        runner.timed(&mut runc(&["delete", "--force", &id]))?;
        elapsed
    });
    let mut creates = Vec::new();
    let mut starts = Vec::new();
    let create_start = repeat(inputs.runs, |index| {
        let id = format!("berth-bench-peer-cs-{index}");
        let create = runner.timed(&mut runc(&["create", "--bundle", &bundle_arg, &id]))?;
        let start = runner.timed(&mut runc(&["start", &id]));
        runner.timed(&mut runc(&["delete", "--force", &id]))?;
        let start = start?;
        if index >= WARMUP {
            creates.push(create);
            starts.push(start);
        }
        Ok(create + start)
    });
    let (create, start) = match &create_start {
        Ok(_) => (Ok(creates), Ok(starts)),
        Err(reason) => (Err(reason.clone()), Err(reason.clone())),
    };
    Ok(RuncTimes {
        run,
        create,
        start,
        create_start,
    })
}

/// The floor: new pid, mount, uts, ipc and net namespaces, a chroot into the same rootfs,
/// and a process that runs and exits.
fn measure_unshare(runs: usize, runner: &Runner, rootfs: &Path) -> Outcome {
    let Some(unshare) = find_program(Path::new("unshare")) else {
        return Err("unshare (util-linux) is not installed".into());
    };
    let mut root_arg = std::ffi::OsString::from("--root=");
    root_arg.push(rootfs);
    repeat(runs, |_| {
        runner.timed(
            Command::new(&unshare)
                .args(["--pid", "--mount", "--uts", "--ipc", "--net", "--fork"])
                .arg(&root_arg)
                .arg("/bin/true"),
        )
    })
}

struct PodmanTimes {
    create: Outcome,
    start: Outcome,
    run: Outcome,
}

impl PodmanTimes {
    fn unavailable(reason: String) -> PodmanTimes {
        PodmanTimes {
            create: Err(reason.clone()),
            start: Err(reason.clone()),
            run: Err(reason),
        }
    }
}

/// Debian's podman as root, configured as the issue describes (the host withholds
/// CAP_SYS_RESOURCE, hence the ulimits), with all its state in a temp dir.
pub fn podman_containers_conf(dir: &Path) -> String {
    format!(
        "[containers]\n\
         netns = \"none\"\n\
         default_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
         \n\
         [engine]\n\
         cgroup_manager = \"cgroupfs\"\n\
         runtime = \"runc\"\n\
         events_logger = \"file\"\n\
         events_logfile_path = \"{dir}/events.log\"\n\
         tmp_dir = \"{dir}/tmp\"\n\
         static_dir = \"{dir}/static\"\n\
         volume_path = \"{dir}/volumes\"\n",
        dir = dir.display()
    )
}

pub fn podman_storage_conf(dir: &Path) -> String {
    format!(
        "[storage]\n\
         driver = \"overlay\"\n\
         graphroot = \"{dir}/storage\"\n\
         runroot = \"{dir}/run\"\n",
        dir = dir.display()
    )
}

fn measure_podman(
    inputs: &PeerInputs<'_>,
    runner: &Runner,
    root: &Path,
    rootfs: &Path,
) -> PodmanTimes {
    let Some(podman) = find_program(Path::new("podman")) else {
        return PodmanTimes::unavailable(
            "podman is not installed (scripts/install-deps.sh --bench installs it)".into(),
        );
    };
    let dir = root.join("podman");
    let podman_cgroup_existed = cgroup_exists(PODMAN_CGROUP);
    let result = run_podman(inputs.runs, runner, &podman, &dir, rootfs);
    // Tear down whatever the run made: containers, the image, podman's mounts.
    let podman_cmd = |args: &[&str]| podman_command(&podman, &dir, args);
    let _ = runner.timed(&mut podman_cmd(&["rm", "--all", "--force", "--time", "0"]));
    let _ = runner.timed(&mut podman_cmd(&["system", "reset", "--force"]));
    unmount_below(&dir);
    if !podman_cgroup_existed {
        remove_cgroup(PODMAN_CGROUP);
    }
    result.unwrap_or_else(|error| PodmanTimes::unavailable(format!("podman failed: {error:#}")))
}

fn podman_command(podman: &Path, dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(podman);
    command
        .env("CONTAINERS_CONF", dir.join("containers.conf"))
        .env("CONTAINERS_STORAGE_CONF", dir.join("storage.conf"))
        .args(args);
    command
}

fn run_podman(
    runs: usize,
    runner: &Runner,
    podman: &Path,
    dir: &Path,
    rootfs: &Path,
) -> Result<PodmanTimes> {
    std::fs::create_dir_all(dir.join("tmp"))?;
    std::fs::write(dir.join("containers.conf"), podman_containers_conf(dir))?;
    std::fs::write(dir.join("storage.conf"), podman_storage_conf(dir))?;
    let podman_cmd = |args: &[&str]| podman_command(podman, dir, args);
    // The same rootfs as an image: a tar of the overlay, imported.
    let archive = dir.join("rootfs.tar");
    runner.timed(
        Command::new("tar")
            .arg("-C")
            .arg(rootfs)
            .arg("-cf")
            .arg(&archive)
            .arg("."),
    )?;
    let image = "localhost/berth-bench-peer:1";
    let archive_arg = archive.to_string_lossy().into_owned();
    runner.timed(&mut podman_cmd(&["import", &archive_arg, image]))?;
    let command = ["/bin/sleep", "3600"];

    let create = repeat(runs, |index| {
        let name = format!("berth-bench-create-{index}");
        let mut args = vec!["create", "--name", &name, image];
        args.extend(command);
        let elapsed = runner.timed(&mut podman_cmd(&args));
        runner.timed(&mut podman_cmd(&["rm", "--force", &name]))?;
        elapsed
    });
    // One container started and stopped again and again, as Berth's start is measured.
    let start = (|| {
        let name = "berth-bench-start";
        let mut args = vec!["create", "--name", name, image];
        args.extend(command);
        runner.timed(&mut podman_cmd(&args))?;
        let samples = repeat(runs, |_| {
            let elapsed = runner.timed(&mut podman_cmd(&["start", name]));
            runner.timed(&mut podman_cmd(&["stop", "--time", "0", name]))?;
            elapsed
        });
        runner.timed(&mut podman_cmd(&["rm", "--force", name]))?;
        Ok::<_, anyhow::Error>(samples)
    })()
    .unwrap_or_else(|error| Err(format!("{error:#}")));
    let run = repeat(runs, |index| {
        let name = format!("berth-bench-run-{index}");
        let mut args = vec!["run", "--detach", "--name", &name, image];
        args.extend(command);
        let elapsed = runner.timed(&mut podman_cmd(&args));
        runner.timed(&mut podman_cmd(&["rm", "--force", "--time", "0", &name]))?;
        elapsed
    });
    Ok(PodmanTimes { create, start, run })
}

/// The cgroup the runc peer's containers run under, removed afterwards.
const RUNC_PEER_CGROUP: &str = "berth-bench";
/// Where podman with `cgroup_manager = "cgroupfs"` puts conmon and its containers.
const PODMAN_CGROUP: &str = "libpod_parent";

/// The cgroup hierarchies: every v1 controller's and the v2 one (hybrid or unified).
fn cgroup_roots() -> Vec<PathBuf> {
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(entries.flatten().map(|entry| entry.path()));
    }
    roots
}

fn cgroup_exists(name: &str) -> bool {
    cgroup_roots().iter().any(|root| root.join(name).is_dir())
}

/// Removes the (empty) cgroup `name` and its children from every hierarchy, leaves
/// first; a cgroup that still holds a process stays.
pub(crate) fn remove_cgroup(name: &str) {
    for root in cgroup_roots() {
        let top = root.join(name);
        let mut dirs = Vec::new();
        let mut pending = vec![top];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            pending.extend(
                entries
                    .flatten()
                    .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                    .map(|entry| entry.path()),
            );
            dirs.push(dir);
        }
        for dir in dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Unmounts anything podman left mounted under `dir`, deepest first.
fn unmount_below(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|point| point.starts_with(&prefix))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in points {
        let _ = Command::new("umount")
            .args(["--lazy", point])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeat_drops_the_warmup_runs_and_stops_at_the_first_failure() {
        let samples = repeat(4, |index| Ok(Duration::from_millis(index as u64))).unwrap();
        assert_eq!(
            samples,
            (WARMUP..WARMUP + 4)
                .map(|i| Duration::from_millis(i as u64))
                .collect::<Vec<_>>()
        );
        let mut calls = 0;
        let failed = repeat(4, |index| {
            calls += 1;
            if index == WARMUP + 1 {
                bail!("no runtime")
            }
            Ok(Duration::ZERO)
        });
        assert_eq!(failed, Err("no runtime".to_owned()));
        assert_eq!(calls, WARMUP + 2);
    }

    #[test]
    fn podman_config_is_the_one_the_issue_names_and_stays_in_the_temp_dir() {
        let dir = Path::new("/tmp/berth-bench-x/podman");
        let conf = podman_containers_conf(dir);
        for line in [
            "cgroup_manager = \"cgroupfs\"",
            "runtime = \"runc\"",
            "netns = \"none\"",
            "events_logger = \"file\"",
            "default_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]",
        ] {
            assert!(conf.contains(line), "{line} missing from {conf}");
        }
        for conf in [conf, podman_storage_conf(dir)] {
            for line in conf.lines().filter(|line| line.contains('/')) {
                assert!(line.contains("/tmp/berth-bench-x/podman/"), "{line}");
            }
        }
    }

    #[test]
    fn the_runc_peer_gets_fresh_namespaces_over_its_own_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("config.json");
        std::fs::write(
            &config_path,
            serde_json::to_vec(&json!({
                "root": {"path": "/machines/a/rootfs"},
                "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/a"}],
                          "cgroupsPath": "berth/a"}
            }))
            .unwrap(),
        )
        .unwrap();
        let config = runc_bundle_config(&config_path, Path::new("/peer/rootfs")).unwrap();
        assert_eq!(config["root"]["path"], "/peer/rootfs");
        assert_eq!(
            config["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "network"}])
        );
        assert_eq!(config["linux"]["cgroupsPath"], "berth-bench/peer");
    }
}
