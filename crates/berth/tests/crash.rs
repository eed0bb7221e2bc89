//! Crash safety end to end: the agent killed at every step of every operation, killed
//! with Machines running, and a simulated host reboot. After each, `berth doctor` must
//! find nothing and the API must agree with the host.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_api::{DoctorReport, Machine, MachineState};
use common::{busybox_image, Platform};
use reqwest::Method;
use serde_json::{json, Value};

const IMAGE: &str = "demo/busybox:1";

fn create(platform: &Platform, app: &str, body: Value) -> Machine {
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/{app}/machines"),
        Some(body),
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).expect("machine")
}

#[cfg(feature = "failpoints")]
fn machine_body(name: &str, cmd: &str, skip_launch: bool) -> Value {
    json!({"name": name, "skip_launch": skip_launch, "config": {"image": IMAGE,
        "init": {"cmd": ["/bin/sh", "-c", cmd]},
        "restart": {"policy": "on-failure"},
        "stop_config": {"timeout": "2s"}}})
}

/// `berth doctor` through the CLI and the API's env var; its reports.
fn doctor(platform: &Platform, repair: bool) -> (bool, Vec<DoctorReport>) {
    let mut args = vec!["doctor", "--json"];
    if repair {
        args.push("--repair");
    }
    let output = platform.cli(&args);
    let reports: Vec<DoctorReport> = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!(
            "doctor printed no reports: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.success(), reports)
}

fn assert_doctor_clean(platform: &Platform, when: &str) {
    let (ok, reports) = doctor(platform, false);
    assert!(
        ok && reports.iter().all(|report| report.findings.is_empty()),
        "doctor found something {when}: {reports:#?}\n{}",
        platform.server_log()
    );
    assert!(!reports.is_empty(), "doctor checked no worker");
}

#[cfg(feature = "failpoints")]
fn machine_status(platform: &Platform, app: &str, id: &str) -> (u16, Value) {
    platform.call(Method::GET, &format!("/v1/apps/{app}/machines/{id}"), None)
}

fn list(platform: &Platform, app: &str) -> Vec<Machine> {
    let (status, body) = platform.call(Method::GET, &format!("/v1/apps/{app}/machines"), None);
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).expect("machines")
}

#[cfg(feature = "failpoints")]
fn cmd_of(machine: &Machine) -> Vec<String> {
    machine.config.init.cmd.clone().unwrap_or_default()
}

/// The worker directory of `berth up`'s single worker.
fn worker_dir(platform: &Platform) -> PathBuf {
    platform.data_dir.path().join("worker")
}

#[cfg(feature = "failpoints")]
#[test]
fn an_agent_killed_at_any_step_finishes_or_rolls_back_and_leaks_nothing() {
    use berth_agent::failpoint::POINTS;

    let mut platform = Platform::start();
    platform.import(busybox_image(), IMAGE);
    platform.cli_ok(&["app", "create", "crash"]);
    const OLD: &str = "echo old > /data.txt; exec sleep 3600";
    const NEW: &str = "echo new > /data.txt; exec sleep 3600";
    for (round, point) in POINTS.iter().enumerate() {
        let op = point.split('.').next().unwrap_or_default();
        let name = format!("m{round}");
        // The Machine the operation acts on, made before the failpoint is armed.
        let target = match op {
            "create" => None,
            "start" | "destroy" => Some(create(&platform, "crash", machine_body(&name, OLD, true))),
            _ => Some(create(&platform, "crash", machine_body(&name, OLD, false))),
        };
        let before = list(&platform, "crash").len();
        platform.shutdown();
        platform.boot_with_env(&[("BERTH_FAILPOINTS", point)]);
        let path = match &target {
            Some(machine) => format!("/v1/apps/crash/machines/{}", machine.id),
            None => "/v1/apps/crash/machines".to_owned(),
        };
        let request = match op {
            "create" => platform
                .request(Method::POST, &path)
                .json(&machine_body(&name, OLD, false)),
            "start" => platform.request(Method::POST, &format!("{path}/start")),
            "stop" => platform.request(Method::POST, &format!("{path}/stop")),
            "update" => platform
                .request(Method::POST, &path)
                .json(&json!({"config": {
                "image": IMAGE, "init": {"cmd": ["/bin/sh", "-c", NEW]},
                "restart": {"policy": "on-failure"}}})),
            _ => platform.request(Method::DELETE, &format!("{path}?kill=true")),
        };
        let answer = request.send();
        assert!(
            answer.is_err(),
            "{point}: the agent answered instead of dying: {:?}",
            answer.map(|response| response.status())
        );
        platform.wait_exit();
        platform.boot();

        // What the record says decides: completed or rolled back, and nothing between.
        let after = list(&platform, "crash");
        match (*point, &target) {
            ("create.after_record" | "create.after_prepare", _) => {
                assert_eq!(after.len(), before, "{point}: the create rolled back");
                // The index forgot it too: the name is free again.
                let again = create(&platform, "crash", machine_body(&name, OLD, true));
                assert_eq!(again.name, name);
            }
            ("create.after_record_created", _) => {
                let made = after
                    .iter()
                    .find(|machine| machine.name == name)
                    .unwrap_or_else(|| panic!("{point}: the committed create is kept"));
                assert_eq!(made.state, MachineState::Created, "{point}");
            }
            (_, Some(machine)) => {
                let (status, body) = machine_status(&platform, "crash", &machine.id);
                if op == "destroy" {
                    assert_eq!(status, 404, "{point}: the destroy finished: {body}");
                    assert_eq!(after.len(), before - 1, "{point}");
                } else {
                    assert_eq!(status, 200, "{point}: {body}");
                    let now: Machine = serde_json::from_value(body).expect("machine");
                    match *point {
                        "start.after_starting" => {
                            assert!(
                                matches!(now.state, MachineState::Stopped | MachineState::Started),
                                "{point}: {:?}",
                                now.state
                            );
                            // A run that never began counts as failed: the policy restarts
                            // it. Wait for that here, or the restart may come due during a
                            // later round's boot and meet that round's failpoint.
                            platform.wait_for(
                                &format!("{point}: the policy restart"),
                                Duration::from_secs(15),
                                || {
                                    platform.machine("crash", &machine.id).state
                                        == MachineState::Started
                                },
                            );
                        }
                        "start.after_runtime_start" | "start.after_record_started" => {
                            assert_eq!(now.state, MachineState::Started, "{point}")
                        }
                        "stop.after_stopping" | "stop.after_halt" | "stop.after_record_stopped" => {
                            assert_eq!(now.state, MachineState::Stopped, "{point}");
                            // An interrupted stop is still the user's stop: no restart.
                            std::thread::sleep(Duration::from_millis(1500));
                            let later = platform.machine("crash", &machine.id);
                            assert_eq!(later.state, MachineState::Stopped, "{point}: restarted");
                        }
                        "update.after_record_updated" => {
                            assert_eq!(now.state, MachineState::Stopped, "{point}");
                            assert!(cmd_of(&now).iter().any(|arg| arg == NEW), "{point}");
                            assert_ne!(now.instance_id, machine.instance_id, "{point}");
                        }
                        _ if op == "update" => {
                            assert_eq!(now.state, MachineState::Stopped, "{point}");
                            assert!(
                                cmd_of(&now).iter().any(|arg| arg == OLD),
                                "{point}: rolled back to the old config"
                            );
                            assert_eq!(now.instance_id, machine.instance_id, "{point}");
                        }
                        _ => unreachable!("{point}"),
                    }
                    if op == "update" {
                        // Whichever config won, it boots.
                        let (status, body) = platform.call(
                            Method::POST,
                            &format!("/v1/apps/crash/machines/{}/start", machine.id),
                            None,
                        );
                        assert_eq!(status, 200, "{point}: {body}");
                    }
                }
            }
            (_, None) => unreachable!("{point}"),
        }
        assert_doctor_clean(&platform, &format!("after a crash at {point}"));
    }
    platform.teardown();
}

/// The test process's cgroup directory in every hierarchy, where `berth up` (its child)
/// puts Machine cgroups under `berth/<id>`.
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let sys = Path::new("/sys/fs/cgroup");
    own.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            let mount = if controllers.is_empty() {
                if sys.join("unified").is_dir() {
                    sys.join("unified")
                } else {
                    sys.to_owned()
                }
            } else {
                sys.join(controllers.trim_start_matches("name="))
            };
            Some(
                mount
                    .join(path.trim_start_matches('/'))
                    .join("berth")
                    .join(id),
            )
        })
        .filter(|dir| dir.is_dir())
        .collect()
}

fn pid_in(file: &Path) -> Option<i32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

fn kill9(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// What a reboot does to a worker, with the data dir kept: every Machine process gone,
/// overlays and network namespace pins unmounted, runc's state and the cgroups gone.
fn simulate_host_reboot(platform: &mut Platform) {
    platform.crash();
    let worker = worker_dir(platform);
    let machines = worker.join("machines");
    for entry in std::fs::read_dir(&machines).expect("machines dir") {
        let dir = entry.expect("entry").path();
        let id = dir
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or_default()
            .to_owned();
        if let Some(shim) = pid_in(&dir.join("run/shim.pid")) {
            kill9(shim);
        }
        let cgroups = cgroup_dirs(&id);
        for cgroup in &cgroups {
            let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|line| line.trim().parse().ok()) {
                kill9(pid);
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for cgroup in &cgroups {
            while std::fs::remove_dir(cgroup).is_err() && cgroup.exists() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "cgroup {cgroup:?} stays"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let rootfs = dir.join("rootfs");
        let _ = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH);
        // The network namespace pin goes too, and the veth with the namespace.
        let _ = nix::mount::umount2(&dir.join("netns"), nix::mount::MntFlags::MNT_DETACH);
        let _ = nix::mount::umount2(&dir.join("userns"), nix::mount::MntFlags::MNT_DETACH);
    }
    // The runtime's state dir goes (runc keeps its state there). The agent's marker in
    // /run is kept: the lost state dir alone must tell the agent the host restarted.
    let runc_state = worker.join("runc");
    std::fs::remove_dir_all(runc_state).expect("remove the runtime state dir");
}

#[test]
fn after_a_host_reboot_machines_are_stopped_or_restarted_with_their_files() {
    let mut platform = Platform::start();
    platform.import(busybox_image(), IMAGE);
    platform.cli_ok(&["app", "create", "reboot"]);
    let script = "echo kept > /kept.txt; exec sleep 3600";
    let body = |policy: &str| {
        json!({"config": {"image": IMAGE, "init": {"cmd": ["/bin/sh", "-c", script]},
            "restart": {"policy": policy}}})
    };
    let plain = create(&platform, "reboot", body("no"));
    let on_failure = create(&platform, "reboot", body("on-failure"));
    let always = create(&platform, "reboot", body("always"));
    let stopped = create(&platform, "reboot", body("no"));
    let (status, answer) = platform.call(
        Method::POST,
        &format!("/v1/apps/reboot/machines/{}/stop", stopped.id),
        None,
    );
    assert_eq!(status, 200, "{answer}");
    for machine in [&plain, &on_failure, &always] {
        platform.wait_for("the file to be written", Duration::from_secs(10), || {
            worker_dir(&platform)
                .join("machines")
                .join(&machine.id)
                .join("upper/kept.txt")
                .exists()
        });
    }
    simulate_host_reboot(&mut platform);
    platform.boot();

    for machine in [&plain, &on_failure] {
        let now = platform.machine("reboot", &machine.id);
        assert_eq!(now.state, MachineState::Stopped, "{}", machine.id);
        assert_eq!(
            now.last_exit.as_ref().map(|exit| exit.reason.as_str()),
            Some("host_restart")
        );
        let (status, events) = platform.call(
            Method::GET,
            &format!("/v1/apps/reboot/machines/{}/events", machine.id),
            None,
        );
        assert_eq!(status, 200, "{events}");
        let last = events
            .as_array()
            .and_then(|events| events.last())
            .cloned()
            .unwrap_or_default();
        assert_eq!(last["source"], "flyd", "{events}");
        assert_eq!(last["berth_source"], "system", "{events}");
        assert_eq!(last["reason"], "host_restart", "{events}");
    }
    platform.wait_for("the always Machine back", Duration::from_secs(20), || {
        platform.machine("reboot", &always.id).state == MachineState::Started
    });
    assert_eq!(
        platform.machine("reboot", &stopped.id).state,
        MachineState::Stopped
    );
    for machine in [&plain, &on_failure, &always] {
        let kept = worker_dir(&platform)
            .join("machines")
            .join(&machine.id)
            .join("upper/kept.txt");
        assert_eq!(
            std::fs::read_to_string(&kept).unwrap_or_default().trim(),
            "kept",
            "the files of {} survive",
            machine.id
        );
    }
    assert_doctor_clean(&platform, "after a host reboot");
    // And they start again, with their files.
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/reboot/machines/{}/start", plain.id),
        None,
    );
    assert_eq!(status, 200, "{body}");
    platform.teardown();
}

#[test]
fn a_policy_restart_waiting_out_its_backoff_survives_an_agent_kill() {
    let mut platform = Platform::start();
    platform.import(busybox_image(), IMAGE);
    platform.cli_ok(&["app", "create", "backoff"]);
    // Fails on its first boot only, so after the owed restart it settles down running
    // (a crash loop would race the doctor's look at it).
    let script = "if [ -e /failed-once ]; then exec sleep 3600; fi; touch /failed-once; exit 1";
    let machine = create(
        &platform,
        "backoff",
        json!({"config": {"image": IMAGE, "init": {"cmd": ["/bin/sh", "-c", script]},
            "restart": {"policy": "on-failure", "max_retries": 5}}}),
    );
    // The first exit: the restart is due a second later (the first back-off).
    platform.wait_for("the first exit", Duration::from_secs(10), || {
        let now = platform.machine("backoff", &machine.id);
        now.state == MachineState::Stopped
            && now.last_exit.as_ref().and_then(|exit| exit.exit_code) == Some(1)
    });
    platform.crash();
    platform.boot();
    platform.wait_for(
        "the restart the policy owed",
        Duration::from_secs(15),
        || {
            let now = platform.machine("backoff", &machine.id);
            now.restart_count == 1 && now.state == MachineState::Started
        },
    );
    assert_doctor_clean(&platform, "after a pending restart was resumed");
    platform.teardown();
}

#[test]
fn running_machines_survive_an_agent_kill() {
    let mut platform = Platform::start();
    platform.import(busybox_image(), IMAGE);
    platform.cli_ok(&["app", "create", "survive"]);
    let script = "mkdir -p /www; echo hello-from-$(hostname) > /www/index.html; \
                  trap 'kill $pid; exit 0' TERM; httpd -f -p 8080 -h /www & pid=$!; wait $pid";
    let machines: Vec<Machine> = (0..5)
        .map(|_| {
            create(
                &platform,
                "survive",
                json!({"config": {"image": IMAGE, "init": {"cmd": ["/bin/sh", "-c", script]}}}),
            )
        })
        .collect();
    let fetch = |machine: &Machine| -> bool {
        let Some(address) = machine.private_ip.as_deref() else {
            return false;
        };
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        client
            .get(format!("http://[{address}]:8080/"))
            .send()
            .and_then(|response| response.text())
            .is_ok_and(|page| page.contains(&format!("hello-from-{}", machine.id)))
    };
    for machine in &machines {
        platform.wait_for("the page", Duration::from_secs(10), || fetch(machine));
    }
    platform.crash();
    for machine in &machines {
        assert!(
            fetch(machine),
            "{} serves while the agent is down",
            machine.id
        );
    }
    platform.boot();
    for machine in &machines {
        let now = platform.machine("survive", &machine.id);
        assert_eq!(now.state, MachineState::Started, "{}", machine.id);
        assert_eq!(now.instance_id, machine.instance_id);
        assert!(fetch(machine), "{} serves after the restart", machine.id);
    }
    assert_doctor_clean(&platform, "after an agent kill with Machines running");
    // Exec, logs and stop still work, and the runs were never split in the journal.
    let first = &machines[0];
    let base = format!("/v1/apps/survive/machines/{}", first.id);
    let (status, exec) = platform.call(
        Method::POST,
        &format!("{base}/exec"),
        Some(json!({"cmd": ["cat", "/www/index.html"]})),
    );
    assert_eq!(status, 200, "{exec}");
    assert!(exec["stdout"]
        .as_str()
        .is_some_and(|out| out.contains("hello-from")));
    let _ = platform.logs("survive", &first.id);
    let (status, body) = platform.call(Method::POST, &format!("{base}/stop"), None);
    assert_eq!(status, 200, "{body}");
    let db = worker_dir(&platform).join("agent.db");
    let kinds = journal_kinds(&db, &first.id);
    assert_eq!(
        kinds
            .iter()
            .filter(|kind| kind.as_str() == "run_start")
            .count(),
        1,
        "one run, not split by the restart: {kinds:?}"
    );
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("storage"),
        "{kinds:?}"
    );
    assert!(kinds.iter().any(|kind| kind == "run_stop"), "{kinds:?}");
    assert_doctor_clean(&platform, "after the stop");
    platform.teardown();
}

fn journal_kinds(db: &Path, id: &str) -> Vec<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        use sqlx::Row;
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", db.display()))
            .await
            .expect("open agent.db");
        let rows = sqlx::query("SELECT kind FROM usage_journal WHERE machine_id = ? ORDER BY seq")
            .bind(id)
            .fetch_all(&pool)
            .await
            .expect("journal");
        pool.close().await;
        rows.into_iter()
            .map(|row| row.get::<String, _>(0))
            .collect()
    })
}

#[test]
fn the_doctor_finds_and_repairs_orphans_but_never_a_machines_files() {
    let mut platform = Platform::start();
    platform.import(busybox_image(), IMAGE);
    platform.cli_ok(&["app", "create", "doc"]);
    let kept = create(
        &platform,
        "doc",
        json!({"skip_launch": true, "config": {"image": IMAGE, "init": {"cmd": ["sleep", "3600"]}}}),
    );
    assert_doctor_clean(&platform, "on a fresh platform");
    // An orphan: a Machine directory with a mounted rootfs that no record owns.
    platform.shutdown();
    let orphan = worker_dir(&platform).join("machines/00000000000abc");
    for sub in ["upper", "work", "rootfs", "bundle"] {
        std::fs::create_dir_all(orphan.join(sub)).expect("orphan dir");
    }
    nix::mount::mount(
        Some("tmpfs"),
        &orphan.join("rootfs"),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount a tmpfs");
    // A file of the kept Machine, which a repair must not touch.
    let kept_file = worker_dir(&platform)
        .join("machines")
        .join(&kept.id)
        .join("upper/precious.txt");
    std::fs::write(&kept_file, "precious").expect("write a file");
    platform.boot();

    let (ok, reports) = doctor(&platform, false);
    assert!(!ok, "doctor exits non-zero on findings");
    let kinds: Vec<_> = reports
        .iter()
        .flat_map(|report| &report.findings)
        .map(|finding| {
            (
                serde_json::to_value(finding.kind).expect("kind"),
                finding.machine_id.clone(),
            )
        })
        .collect();
    let orphan_id = Some("00000000000abc".to_owned());
    assert!(
        kinds.contains(&(json!("orphan_machine_dir"), orphan_id.clone())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&(json!("orphan_mount"), orphan_id)),
        "{kinds:?}"
    );
    assert!(
        kinds.iter().all(|(_, id)| id.as_deref() != Some(&kept.id)),
        "{kinds:?}"
    );
    // The same check per worker over the API.
    let (_, workers) = platform.call(Method::GET, "/v1/workers", None);
    let worker = workers[0]["name"].as_str().unwrap_or_default().to_owned();
    let (status, report) =
        platform.call(Method::GET, &format!("/v1/workers/{worker}/doctor"), None);
    assert_eq!(status, 200, "{report}");
    assert!(
        report["findings"]
            .as_array()
            .is_some_and(|findings| !findings.is_empty()),
        "{report}"
    );
    let (status, body) = platform.call(Method::GET, "/v1/workers/nope/doctor", None);
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );

    let (ok, reports) = doctor(&platform, true);
    assert!(ok, "repair fixed everything: {reports:#?}");
    assert!(!orphan.exists(), "the orphan is gone");
    assert_eq!(
        std::fs::read_to_string(&kept_file).unwrap_or_default(),
        "precious",
        "the Machine's files are untouched"
    );
    assert_doctor_clean(&platform, "after the repair");
    platform.teardown();
}

/// Writes into `path` until the filesystem is full.
fn fill_disk(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("ballast file");
    for chunk in [1 << 20, 4096, 512] {
        let block = vec![0x5au8; chunk];
        while file.write_all(&block).is_ok() {}
    }
    let _ = file.sync_all();
}

#[test]
fn a_full_disk_answers_insufficient_storage_leaves_nothing_and_the_agent_keeps_serving() {
    let platform = Platform::start_on_small_disk("48m");
    platform.import(busybox_image(), IMAGE);
    platform.cli_ok(&["app", "create", "full"]);
    let body = json!({"config": {"image": IMAGE, "init": {"cmd": ["sleep", "3600"]}}});
    let running = create(&platform, "full", body.clone());
    let ballast = platform.data_dir.path().join("ballast");
    fill_disk(&ballast);

    for _ in 0..3 {
        let (status, answer) =
            platform.call(Method::POST, "/v1/apps/full/machines", Some(body.clone()));
        assert_eq!(
            (status, answer["error"].as_str()),
            (507, Some("insufficient_storage")),
            "{answer}"
        );
    }
    // Nothing partial: no Machine, no directory, no index entry.
    let machines = list(&platform, "full");
    assert_eq!(machines.len(), 1, "{machines:?}");
    let dirs = std::fs::read_dir(worker_dir(&platform).join("machines"))
        .expect("machines dir")
        .count();
    assert_eq!(dirs, 1, "only the running Machine's directory");
    // Everything else is served: reads, exec, the doctor.
    assert_eq!(
        platform.machine("full", &running.id).state,
        MachineState::Started
    );
    let (status, exec) = platform.call(
        Method::POST,
        &format!("/v1/apps/full/machines/{}/exec", running.id),
        Some(json!({"cmd": ["echo", "still here"]})),
    );
    assert_eq!(status, 200, "{exec}");
    assert_doctor_clean(&platform, "on a full disk");

    std::fs::remove_file(&ballast).expect("remove the ballast");
    let (status, answer) = platform.call(Method::POST, "/v1/apps/full/machines", Some(body));
    assert_eq!(status, 200, "a create works once there is room: {answer}");
    assert_doctor_clean(&platform, "after the disk was freed");
    platform.teardown();
}

/// The control plane dies in the middle of a create (with the agent: `berth up` is one
/// process). The client retries with its idempotency key and gets one Machine, whichever
/// side of the commit the crash fell on.
#[cfg(feature = "failpoints")]
#[test]
fn a_keyed_create_retried_after_a_crash_makes_exactly_one_machine() {
    let mut platform = Platform::start();
    platform.import(busybox_image(), IMAGE);
    platform.cli_ok(&["app", "create", "keyed"]);
    for point in [
        "create.after_record",
        "create.after_prepare",
        "create.after_record_created",
        "start.after_record_started",
    ] {
        let key = format!("key-{point}");
        let body = json!({"config": {"image": IMAGE, "init": {"cmd": ["sleep", "3600"]}}});
        let send = |platform: &Platform| {
            platform
                .request(Method::POST, "/v1/apps/keyed/machines")
                .header(berth_api::IDEMPOTENCY_KEY_HEADER, &key)
                .json(&body)
                .send()
        };
        platform.shutdown();
        platform.boot_with_env(&[("BERTH_FAILPOINTS", point)]);
        assert!(send(&platform).is_err(), "{point}: died before answering");
        platform.wait_exit();
        platform.boot();
        let first = send(&platform).expect("retry");
        assert_eq!(first.status().as_u16(), 200, "{point}: {:?}", first.text());
        let machine: Machine = first.json().expect("machine");
        let again = send(&platform).expect("second retry");
        assert_eq!(again.status().as_u16(), 200, "{point}");
        let replayed: Machine = again.json().expect("machine");
        assert_eq!(replayed.id, machine.id, "{point}");
        // Each round destroys its Machine: one is all there may be.
        let all = list(&platform, "keyed");
        assert_eq!(
            all.iter()
                .map(|other| other.id.as_str())
                .collect::<Vec<_>>(),
            vec![machine.id.as_str()],
            "{point}: created twice"
        );
        assert_doctor_clean(
            &platform,
            &format!("after a keyed create crashed at {point}"),
        );
        let (status, body) = platform.call(
            Method::DELETE,
            &format!("/v1/apps/keyed/machines/{}?kill=true", machine.id),
            None,
        );
        assert_eq!(status, 200, "{body}");
    }
    platform.teardown();
}
