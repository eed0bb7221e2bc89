//! Turning a Machine config plus its image's config into what the bundle is built from.

use std::os::fd::AsRawFd;
use std::path::Path;

use berth_api::MachineConfig;
use berth_core::ConfigError;
use berth_image::RuntimeConfig;
use berth_runtime::BundleSpec;

/// Docker's rules: the config's entrypoint replaces the image's, and then the image's cmd
/// is dropped too unless the config gives one. Fly's `init.exec` replaces all of them.
pub fn command_line(
    config: &MachineConfig,
    image: &RuntimeConfig,
) -> Result<Vec<String>, ConfigError> {
    if let Some(exec) = config.init.exec.as_ref().filter(|exec| !exec.is_empty()) {
        return Ok(exec.clone());
    }
    let entrypoint = config
        .init
        .entrypoint
        .clone()
        .unwrap_or_else(|| image.entrypoint.clone());
    let cmd = match (&config.init.cmd, &config.init.entrypoint) {
        (Some(cmd), _) => cmd.clone(),
        (None, Some(_)) => Vec::new(),
        (None, None) => image.cmd.clone(),
    };
    let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if args.is_empty() {
        return Err(ConfigError {
            field: "config.init.cmd".into(),
            message: "the image names no command, so the config must give one".into(),
        });
    }
    Ok(args)
}

/// The command line of one of `config.processes`: its own `exec`, `entrypoint` and `cmd`
/// over the Machine's, by the same rules as [`command_line`].
fn process_command_line(
    config: &MachineConfig,
    process: &berth_api::MachineProcess,
    index: usize,
    image: &RuntimeConfig,
) -> Result<Vec<String>, ConfigError> {
    if let Some(exec) = process.exec.as_ref().filter(|exec| !exec.is_empty()) {
        return Ok(exec.clone());
    }
    let mut merged = config.clone();
    if process.entrypoint.is_some() {
        merged.init.entrypoint = process.entrypoint.clone();
        merged.init.cmd = None;
        merged.init.exec = None;
    }
    if process.cmd.is_some() {
        merged.init.cmd = process.cmd.clone();
        merged.init.exec = None;
    }
    command_line(&merged, image).map_err(|_| ConfigError {
        field: format!("config.processes[{index}].cmd"),
        message: "neither the process, the config nor the image names a command".into(),
    })
}

/// Image environment first, then the config's, which wins on a clash.
pub fn environment(config: &MachineConfig, image: &RuntimeConfig) -> Vec<String> {
    let mut env: Vec<String> = image
        .env
        .iter()
        .filter(|entry| {
            let key = entry.split('=').next().unwrap_or_default();
            !config.env.contains_key(key)
        })
        .cloned()
        .collect();
    if !env.iter().any(|entry| entry.starts_with("PATH=")) && !config.env.contains_key("PATH") {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    env.extend(
        config
            .env
            .iter()
            .map(|(key, value)| format!("{key}={value}")),
    );
    env
}

/// Resolves the image's `user` (`uid[:gid]` or a name from the image's /etc/passwd).
pub fn user_ids(
    user: Option<&str>,
    layer_dirs_bottom_first: &[impl AsRef<Path>],
) -> Result<(u32, u32), ConfigError> {
    let refuse = |message: String| ConfigError {
        field: "config.image".into(),
        message,
    };
    let Some(user) = user.map(str::trim).filter(|user| !user.is_empty()) else {
        return Ok((0, 0));
    };
    let (user_part, group_part) = match user.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (user, None),
    };
    let passwd = read_top_file(layer_dirs_bottom_first, "etc/passwd");
    let (uid, primary_gid) = match user_part.parse::<u32>() {
        Ok(uid) => (
            uid,
            lookup(&passwd, |fields| fields[2] == user_part)
                .map(|f| f.1)
                .unwrap_or(0),
        ),
        Err(_) => lookup(&passwd, |fields| fields[0] == user_part).ok_or_else(|| {
            refuse(format!(
                "the image's user {user_part:?} is not in its /etc/passwd"
            ))
        })?,
    };
    let gid = match group_part {
        None => primary_gid,
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let groups = read_top_file(layer_dirs_bottom_first, "etc/group");
                lookup(&groups, |fields| fields[0] == group)
                    .map(|(gid, _)| gid)
                    .ok_or_else(|| {
                        refuse(format!(
                            "the image's group {group:?} is not in its /etc/group"
                        ))
                    })?
            }
        },
    };
    Ok((uid, gid))
}

/// The first two numeric fields (passwd: uid, gid; group: gid, unused) of the first
/// matching line.
fn lookup(file: &str, matches: impl Fn(&[&str]) -> bool) -> Option<(u32, u32)> {
    file.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 3 || !matches(&fields) {
            return None;
        }
        let first = fields[2].parse().ok()?;
        let second = fields
            .get(3)
            .and_then(|field| field.parse().ok())
            .unwrap_or(first);
        Some((first, second))
    })
}

/// Reads a small file from the topmost layer that has it. Only used at create.
fn read_top_file(layer_dirs_bottom_first: &[impl AsRef<Path>], relative: &str) -> String {
    layer_dirs_bottom_first
        .iter()
        .rev()
        .find_map(|dir| read_in_layer(dir.as_ref(), relative))
        .unwrap_or_default()
}

/// The regular file `relative` of one layer, at most 1 MiB. Every symlink on the way is
/// resolved inside the layer (`RESOLVE_IN_ROOT`): a hostile image whose `/etc` links to
/// the host's `/etc` reads nothing, never the host's files.
fn read_in_layer(layer: &Path, relative: &str) -> Option<String> {
    use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
    let root = rustix::fs::open(
        layer,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let found = rustix::fs::openat2(
        &root,
        relative,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .ok()?;
    let stat = rustix::fs::fstat(&found).ok()?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile || stat.st_size > 1 << 20 {
        return None;
    }
    // Reopened through the fd, so what is read is the file just checked.
    std::fs::read_to_string(format!("/proc/self/fd/{}", found.as_raw_fd())).ok()
}

pub fn bundle_spec(
    machine_id: &str,
    config: &MachineConfig,
    image: &RuntimeConfig,
    layer_dirs: &[impl AsRef<Path>],
    pids_limit: i64,
) -> Result<BundleSpec, ConfigError> {
    let (uid, gid) = user_ids(image.user.as_deref(), layer_dirs)?;
    let mut processes = Vec::with_capacity(config.processes.len());
    for (index, process) in config.processes.iter().enumerate() {
        let user = process
            .user
            .as_deref()
            .filter(|user| !user.trim().is_empty());
        let ids = match user {
            None => None,
            Some(user) => Some(
                user_ids(Some(user), layer_dirs).map_err(|error| ConfigError {
                    field: format!("config.processes[{index}].user"),
                    message: error.message,
                })?,
            ),
        };
        processes.push(berth_runtime::InitProcess {
            args: process_command_line(config, process, index, image)?,
            env: process.env.clone().into_iter().collect(),
            ids,
        });
    }
    // With processes, the runtime checks and starts as the first; init runs them all.
    let args = match processes.first() {
        Some(first) => first.args.clone(),
        None => command_line(config, image)?,
    };
    let mut env = environment(config, image);
    env.extend(berth_runtime::init_environment(config.init.tty, &processes));
    Ok(BundleSpec {
        machine_id: machine_id.to_owned(),
        args,
        env,
        cwd: image
            .working_dir
            .clone()
            .filter(|dir| dir.starts_with('/'))
            .unwrap_or_else(|| "/".into()),
        uid,
        gid,
        cpus: config.guest.cpus,
        memory_mb: config.guest.memory_mb,
        pids_limit,
        disk_mb: Some(crate::machine_disk_mb(&config.guest)),
        private_ip: None,
        org: None,
        net_raw: config.sandbox.net_raw,
        // Filled by the agent, which knows where each volume is mounted.
        volumes: Vec::new(),
    })
}

impl crate::Agent {
    /// The bundle of `record` run with `config` on `image`, with the Machine's address,
    /// org and volumes as recorded: what create, update, an update's roll-back and a
    /// move's arrival all lay out.
    pub(crate) fn machine_spec(
        &self,
        record: &crate::record::MachineRecord,
        config: &MachineConfig,
        image: &berth_image::ResolvedImage,
    ) -> Result<BundleSpec, ConfigError> {
        let mut spec = bundle_spec(
            &record.id,
            config,
            &image.config,
            &image.layer_dirs,
            self.inner.config.pids_limit,
        )?;
        spec.private_ip = record.private_ip;
        spec.org = record.org.clone();
        spec.volumes = self.volume_mounts(&config.mounts);
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api::InitConfig;

    fn image() -> RuntimeConfig {
        RuntimeConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["serve".into()],
            env: vec!["PATH=/bin".into(), "MODE=image".into()],
            working_dir: Some("/app".into()),
            user: None,
            labels: Default::default(),
        }
    }

    fn config(entrypoint: Option<&[&str]>, cmd: Option<&[&str]>) -> MachineConfig {
        let owned = |args: &[&str]| args.iter().map(|arg| arg.to_string()).collect();
        MachineConfig {
            image: "x".into(),
            init: InitConfig {
                entrypoint: entrypoint.map(owned),
                exec: None,
                cmd: cmd.map(owned),
                tty: false,
            },
            ..MachineConfig::default()
        }
    }

    #[test]
    fn each_process_falls_back_on_the_machine_s_command_and_the_image_s() {
        let process = |exec: Option<&[&str]>, entrypoint: Option<&[&str]>, cmd: Option<&[&str]>| {
            let owned = |args: &[&str]| args.iter().map(|arg| arg.to_string()).collect();
            berth_api::MachineProcess {
                exec: exec.map(owned),
                entrypoint: entrypoint.map(owned),
                cmd: cmd.map(owned),
                ..Default::default()
            }
        };
        let machine = config(None, Some(&["machine-cmd"]));
        let line = |p: &berth_api::MachineProcess| process_command_line(&machine, p, 0, &image());
        assert_eq!(
            line(&process(None, None, None)).unwrap(),
            ["/entry", "machine-cmd"]
        );
        assert_eq!(
            line(&process(None, None, Some(&["own"]))).unwrap(),
            ["/entry", "own"]
        );
        assert_eq!(line(&process(None, Some(&["/e"]), None)).unwrap(), ["/e"]);
        assert_eq!(
            line(&process(Some(&["/x", "1"]), Some(&["/e"]), Some(&["c"]))).unwrap(),
            ["/x", "1"]
        );
    }

    #[test]
    fn processes_and_tty_reach_init_through_the_environment() {
        let mut machine = config(None, None);
        machine.init.tty = true;
        let layers: [&Path; 0] = [];
        let spec = bundle_spec("m", &machine, &image(), &layers, 64).unwrap();
        assert_eq!(spec.args, ["/entry", "serve"]);
        assert!(spec.env.contains(&"BERTH_INIT_TTY=1".to_owned()));
        assert!(!spec
            .env
            .iter()
            .any(|e| e.starts_with("BERTH_INIT_PROCESSES=")));

        machine.processes = vec![
            berth_api::MachineProcess {
                cmd: Some(vec!["one".into()]),
                user: Some("7:8".into()),
                ..Default::default()
            },
            berth_api::MachineProcess {
                exec: Some(vec!["/two".into()]),
                env: [("K".to_owned(), "v".to_owned())].into(),
                ..Default::default()
            },
        ];
        let spec = bundle_spec("m", &machine, &image(), &layers, 64).unwrap();
        assert_eq!(spec.args, ["/entry", "one"], "the runtime checks the first");
        let list = berth_runtime::init_environment(
            true,
            &[
                berth_runtime::InitProcess {
                    args: vec!["/entry".into(), "one".into()],
                    env: vec![],
                    ids: Some((7, 8)),
                },
                berth_runtime::InitProcess {
                    args: vec!["/two".into()],
                    env: vec![("K".into(), "v".into())],
                    ids: None,
                },
            ],
        );
        assert!(
            list.iter().all(|entry| spec.env.contains(entry)),
            "{:?}",
            spec.env
        );

        machine.processes[0].user = Some("nobody-here".into());
        let refused = bundle_spec("m", &machine, &image(), &layers, 64).unwrap_err();
        assert_eq!(refused.field, "config.processes[0].user");
    }

    #[test]
    fn command_line_follows_docker_rules() {
        assert_eq!(
            command_line(&config(None, None), &image()).expect("ok"),
            ["/entry", "serve"]
        );
        assert_eq!(
            command_line(&config(None, Some(&["x"])), &image()).expect("ok"),
            ["/entry", "x"]
        );
        assert_eq!(
            command_line(&config(Some(&["/sh"]), None), &image()).expect("ok"),
            ["/sh"]
        );
        // Fly's exec is the whole command line.
        let mut exec = config(Some(&["/sh"]), Some(&["x"]));
        exec.init.exec = Some(vec!["/bin/true".into(), "now".into()]);
        assert_eq!(
            command_line(&exec, &image()).expect("ok"),
            ["/bin/true", "now"]
        );
        let empty = RuntimeConfig {
            entrypoint: vec![],
            cmd: vec![],
            ..image()
        };
        assert_eq!(
            command_line(&config(None, None), &empty)
                .expect_err("no command")
                .field,
            "config.init.cmd"
        );
    }

    #[test]
    fn config_env_overrides_image_env() {
        let mut machine = config(None, None);
        machine.env.insert("MODE".into(), "machine".into());
        let env = environment(&machine, &image());
        assert!(env.contains(&"MODE=machine".to_string()));
        assert!(!env.contains(&"MODE=image".to_string()));
        assert!(env.contains(&"PATH=/bin".to_string()));
    }

    #[test]
    fn users_resolve_from_the_image_passwd() {
        let layer = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(layer.path().join("etc")).expect("mkdir");
        std::fs::write(
            layer.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nweb:x:1000:1001::/:/bin/sh\n",
        )
        .expect("write");
        std::fs::write(layer.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").expect("write");
        let layers = [layer.path()];
        assert_eq!(user_ids(Some("web"), &layers).expect("ok"), (1000, 1001));
        assert_eq!(
            user_ids(Some("web:staff"), &layers).expect("ok"),
            (1000, 50)
        );
        assert_eq!(user_ids(Some("7:8"), &layers).expect("ok"), (7, 8));
        assert!(user_ids(Some("ghost"), &layers).is_err());
        assert_eq!(user_ids(None, &layers).expect("ok"), (0, 0));
    }

    /// Issue 13: an image's `User` was looked up through a symlinked `/etc` in the host's
    /// `/etc/passwd`. Proved able to fail: with the `symlink_metadata` + path read of
    /// commit 34edac3, the host's first user resolved from both hostile layers.
    #[test]
    fn users_are_never_read_through_a_symlink_out_of_the_layer() {
        let host_passwd = std::fs::read_to_string("/etc/passwd").expect("host passwd");
        let host_user = host_passwd
            .lines()
            .next()
            .and_then(|line| line.split(':').next())
            .expect("a host user");
        for target in ["/etc", "../../../../../../../../etc"] {
            let layer = tempfile::tempdir().expect("tempdir");
            std::os::unix::fs::symlink(target, layer.path().join("etc")).expect("symlink");
            let layers = [layer.path()];
            let err = user_ids(Some(host_user), &layers).expect_err("host user must not resolve");
            assert!(err.message.contains("not in its /etc/passwd"), "{err:?}");
            assert!(user_ids(Some("root:root"), &layers).is_err());
        }
        // Inside the layer, a symlink is followed, to the layer's own file.
        let layer = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(layer.path().join("real-etc")).expect("mkdir");
        std::fs::write(
            layer.path().join("real-etc/passwd"),
            "web:x:1000:1001::/:/bin/sh\n",
        )
        .expect("write");
        std::os::unix::fs::symlink("/real-etc", layer.path().join("etc")).expect("symlink");
        assert_eq!(
            user_ids(Some("web"), &[layer.path()]).expect("ok"),
            (1000, 1001)
        );
    }
}
