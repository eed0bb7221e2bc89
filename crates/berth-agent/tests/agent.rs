//! The agent's operations and crash recovery against the fake runtime and a real image
//! store: what each operation asks of the host, and what a restarted agent concludes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth_agent::record::PendingOp;
use berth_agent::{Agent, AgentConfig, CreateOnWorker, EventSource, WorkerError, WorkerService};
use berth_api::{
    EventKind, InitConfig, MachineConfig, MachineState, StopRequest, UpdateMachineRequest,
};
use berth_image::build::{busybox_layer, Compression, ImageBuilder, LayerBuilder};
use berth_image::{ImageStore, UnpackLimits};
use berth_runtime::fake::FakeRuntime;
use berth_runtime::quota::DiskUsage;

struct Fixture {
    dir: tempfile::TempDir,
    runtime: Arc<FakeRuntime>,
    images: Arc<ImageStore>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let images = Arc::new(
            ImageStore::open(&dir.path().join("images"), UnpackLimits::default()).expect("store"),
        );
        Fixture {
            dir,
            runtime: Arc::new(FakeRuntime::new()),
            images,
        }
    }

    fn import(&self, name: &str, marker: &str) {
        let layout = self.dir.path().join(format!("layout-{marker}"));
        ImageBuilder::new()
            .layer(
                busybox_layer(Path::new("/bin/busybox")).expect("busybox"),
                Compression::Gzip,
            )
            .layer(
                LayerBuilder::new().file("marker", marker.as_bytes(), 0o644),
                Compression::None,
            )
            .cmd(&["/bin/sh"])
            .write_layout(&layout)
            .expect("layout");
        self.images.import(&layout, name).expect("import");
    }

    async fn agent(&self) -> Agent {
        Agent::open(
            AgentConfig {
                data_dir: self.dir.path().join("worker"),
                name: "test".into(),
                region: "test".into(),
                pids_limit: 64,
                machine_prefix: None,
                join_token: None,
                capacity: berth_api::Resources {
                    cpus: 4,
                    memory_mb: 2048,
                    disk_mb: 100_000,
                },
            },
            self.runtime.clone(),
            self.images.clone(),
        )
        .await
        .expect("agent")
    }
}

fn config(image: &str) -> MachineConfig {
    MachineConfig {
        image: image.into(),
        init: InitConfig {
            cmd: Some(vec!["sleep".into(), "3600".into()]),
            entrypoint: None,
            exec: None,
            tty: false,
        },
        // These tests watch exits as they happen: no policy restarts behind them (tests of
        // the policy set their own).
        restart: berth_api::RestartConfig {
            policy: berth_api::RestartPolicy::No,
            max_retries: None,
        },
        ..MachineConfig::default()
    }
}

fn create_request(id: &str, image: &str, skip_launch: bool) -> CreateOnWorker {
    CreateOnWorker {
        from_checkpoint: None,
        id: id.into(),
        app: "app".into(),
        name: format!("n-{id}"),
        config: config(image),
        skip_launch,
        org: None,
        pull: Default::default(),
    }
}

/// The runtime calls the agent made, without the exit watcher's `wait_exit`, which runs
/// in the background and may or may not have begun.
async fn lifecycle_calls(fixture: &Fixture) -> Vec<String> {
    fixture
        .runtime
        .calls()
        .await
        .into_iter()
        .filter(|call| !call.starts_with("wait_exit"))
        .collect()
}

#[tokio::test]
async fn start_does_only_runtime_work_and_survives_a_deleted_tag() {
    let fixture = Fixture::new();
    fixture.import("demo/img:1", "one");
    let agent = fixture.agent().await;
    let machine = agent
        .create(create_request("00000000000001", "demo/img:1", false))
        .await
        .expect("create");
    assert_eq!(machine.state, MachineState::Started);
    assert_eq!(
        lifecycle_calls(&fixture).await,
        ["prepare 00000000000001", "start 00000000000001"]
    );

    agent
        .stop("00000000000001", StopRequest::default())
        .await
        .expect("stop");
    fixture.images.untag("demo/img:1").expect("untag");
    fixture.runtime.clear_calls().await;
    let answer = agent
        .start("00000000000001", EventSource::User)
        .await
        .expect("start without the tag");
    assert_eq!(answer.previous_state, MachineState::Stopped);
    // No prepare (bundle), nothing but the boot itself.
    assert_eq!(lifecycle_calls(&fixture).await, ["start 00000000000001"]);
    let lowerdirs = fixture
        .runtime
        .lowerdirs("00000000000001")
        .await
        .expect("started");
    assert_eq!(lowerdirs.len(), 2, "both image layers, bottom first");
    assert!(std::fs::read_to_string(lowerdirs[1].join("marker"))
        .expect("marker")
        .contains("one"));
}

#[tokio::test]
async fn start_and_stop_are_idempotent() {
    let fixture = Fixture::new();
    fixture.import("demo/img:1", "one");
    let agent = fixture.agent().await;
    agent
        .create(create_request("00000000000002", "demo/img:1", false))
        .await
        .expect("create");
    let again = agent
        .start("00000000000002", EventSource::User)
        .await
        .expect("start again");
    assert_eq!(again.previous_state, MachineState::Started);
    assert!(again.note.is_some());
    agent
        .stop("00000000000002", StopRequest::default())
        .await
        .expect("stop");
    let again = agent
        .stop("00000000000002", StopRequest::default())
        .await
        .expect("stop again");
    assert_eq!(again.previous_state, MachineState::Stopped);
    assert!(again.note.is_some());
}

#[tokio::test]
async fn a_machine_still_being_created_is_busy_not_missing() {
    let fixture = Fixture::new();
    fixture.import("demo/img:1", "one");
    let agent = fixture.agent().await;
    let held = fixture.runtime.hold_prepares().await;
    let creating = {
        let agent = agent.clone();
        tokio::spawn(async move {
            agent
                .create(create_request("00000000000009", "demo/img:1", true))
                .await
        })
    };
    // Until the create takes the Machine's lock the id is simply unknown; once it has, a
    // get must not answer not_found (the control plane would forget its index entry).
    let mut answer = agent.get("00000000000009").await;
    for _ in 0..500 {
        if !matches!(answer, Err(WorkerError::NotFound(_))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        answer = agent.get("00000000000009").await;
    }
    assert!(
        matches!(answer, Err(WorkerError::Busy { .. })),
        "{answer:?}"
    );
    // Later the half-made record is in the store while prepare is held: still busy,
    // because the create may yet roll back.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let answer = agent.get("00000000000009").await;
    assert!(
        matches!(answer, Err(WorkerError::Busy { .. })),
        "{answer:?}"
    );
    drop(held);
    creating.await.expect("create task").expect("create");
    let machine = agent.get("00000000000009").await.expect("created");
    assert_eq!(machine.state, MachineState::Created);
}

#[tokio::test]
async fn a_stop_that_fails_halfway_does_not_leave_the_machine_stopping() {
    let fixture = Fixture::new();
    fixture.import("demo/img:1", "one");
    let agent = fixture.agent().await;
    let id = "0000000000000a";
    agent
        .create(create_request(id, "demo/img:1", false))
        .await
        .expect("create");
    fixture.runtime.fail_next_cleanup("device busy").await;
    let error = agent
        .stop(id, StopRequest::default())
        .await
        .expect_err("the stop fails");
    assert_eq!(error.to_response().0, 500, "{error}");
    // Settled from what the host shows (the process is gone), not stuck in `stopping`,
    // so the next actions are not refused.
    let machine = agent.get(id).await.expect("get");
    assert_eq!(machine.state, MachineState::Stopped);
    let events = agent.events(id).await.expect("events");
    let last = events.last().expect("an event");
    assert_eq!(last.reason.as_deref(), Some("operation_failed"));
    agent
        .start(id, EventSource::User)
        .await
        .expect("start again");
}

#[tokio::test]
async fn a_missing_image_leaves_no_trace() {
    let fixture = Fixture::new();
    let agent = fixture.agent().await;
    let error = agent
        .create(create_request("00000000000003", "ghost/img:1", false))
        .await
        .expect_err("no image");
    assert_eq!(error.to_response().1.error, "image_not_found");
    assert!(fixture.runtime.calls().await.is_empty());
    assert!(matches!(
        agent.get("00000000000003").await,
        Err(WorkerError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_failed_start_leaves_the_machine_failed_and_cleaned_up() {
    let fixture = Fixture::new();
    fixture.import("demo/img:1", "one");
    let agent = fixture.agent().await;
    fixture
        .runtime
        .fail_next_start("exec: \"nope\": executable file not found")
        .await;
    let error = agent
        .create(create_request("00000000000004", "demo/img:1", false))
        .await
        .expect_err("start fails");
    let (status, body) = error.to_response();
    assert_eq!((status, body.error.as_str()), (422, "start_failed"));
    assert!(
        body.message.contains("executable file not found"),
        "{}",
        body.message
    );
    let machine = agent.get("00000000000004").await.expect("kept");
    assert_eq!(machine.state, MachineState::Failed);
    assert!(fixture
        .runtime
        .calls()
        .await
        .contains(&"cleanup 00000000000004".to_string()));
    // A failed Machine can be started again once the cause is gone.
    agent
        .start("00000000000004", EventSource::User)
        .await
        .expect("second start");
}

#[tokio::test]
async fn stop_escalates_to_sigkill_after_the_timeout() {
    let fixture = Fixture::new();
    fixture.import("demo/img:1", "one");
    let agent = fixture.agent().await;
    agent
        .create(create_request("00000000000005", "demo/img:1", false))
        .await
        .expect("create");
    fixture.runtime.set_ignore_term(true).await;
    let request = StopRequest {
        id: None,
        source: None,
        signal: None,
        timeout: Some(berth_api::ApiDuration(Duration::from_millis(100))),
    };
    let answer = agent.stop("00000000000005", request).await.expect("stop");
    assert_eq!(answer.machine.state, MachineState::Stopped);
    let calls = fixture.runtime.calls().await;
    assert!(
        calls.contains(&"signal 00000000000005 15".to_string()),
        "{calls:?}"
    );
    assert!(
        calls.contains(&"signal 00000000000005 9".to_string()),
        "{calls:?}"
    );
    assert_eq!(answer.machine.last_exit.expect("exit").signal, Some(9));
}

#[tokio::test]
async fn an_exit_by_itself_is_recorded() {
    let fixture = Fixture::new();
    fixture.import("demo/img:1", "one");
    let agent = fixture.agent().await;
    agent
        .create(create_request("00000000000006", "demo/img:1", false))
        .await
        .expect("create");
    assert!(fixture.runtime.exit("00000000000006", 7).await);
    let mut machine = agent.get("00000000000006").await.expect("get");
    for _ in 0..200 {
        if machine.state == MachineState::Stopped {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        machine = agent.get("00000000000006").await.expect("get");
    }
    assert_eq!(machine.state, MachineState::Stopped);
    let exit = machine.last_exit.expect("exit");
    assert_eq!((exit.exit_code, exit.reason.as_str()), (Some(7), "exited"));
    let events = agent.events("00000000000006").await.expect("events");
    assert!(events.iter().any(|event| event.kind == EventKind::Exit
        && event.source == EventSource::System
        && event.exit_code == Some(7)));
}

#[tokio::test]
async fn a_full_disk_is_told_once_by_an_event_and_sizes_reach_the_runtime_and_stats() {
    let fixture = Fixture::new();
    fixture.import("demo/img:1", "one");
    let agent = fixture.agent().await;
    let mut request = create_request("00000000000009", "demo/img:1", false);
    request.config.guest.disk_mb = Some(64);
    agent.create(request).await.expect("create");
    agent
        .create(create_request("0000000000000a", "demo/img:1", true))
        .await
        .expect("create");
    // The runtime enforces what the config says; the other gets the default.
    let spec = |id: &'static str| {
        let runtime = fixture.runtime.clone();
        async move { runtime.spec(id).await.expect("spec").disk_mb }
    };
    assert_eq!(spec("00000000000009").await, Some(64));
    assert_eq!(
        spec("0000000000000a").await,
        Some(berth_agent::MACHINE_DISK_MB)
    );
    // Placement's view of this worker counts the same numbers.
    let stats = agent.stats().await.expect("stats");
    assert_eq!(stats.used.disk_mb, 64 + berth_agent::MACHINE_DISK_MB);

    let quota_events = |agent: Agent| async move {
        agent
            .events("00000000000009")
            .await
            .expect("events")
            .into_iter()
            .filter(|event| event.kind == EventKind::DiskQuotaExceeded)
            .collect::<Vec<_>>()
    };
    fixture
        .runtime
        .set_disk_usage(
            "00000000000009",
            DiskUsage {
                used_bytes: (64 << 20) - 16 * 1024,
                limit_bytes: 64 << 20,
            },
        )
        .await;
    // No event on start, nor before anyone looks.
    assert!(quota_events(agent.clone()).await.is_empty());
    agent
        .stop("00000000000009", StopRequest::default())
        .await
        .expect("stop");
    let events = quota_events(agent.clone()).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].source, EventSource::System);
    assert!(
        events[0].reason.as_deref().unwrap_or("").contains("64 MiB"),
        "{events:?}"
    );
    // Still full at the next sample: told once.
    agent.sample_storage().await;
    assert_eq!(quota_events(agent.clone()).await.len(), 1);
    // Freed, then full again: told again.
    fixture
        .runtime
        .set_disk_usage(
            "00000000000009",
            DiskUsage {
                used_bytes: 1 << 20,
                limit_bytes: 64 << 20,
            },
        )
        .await;
    agent.sample_storage().await;
    fixture
        .runtime
        .set_disk_usage(
            "00000000000009",
            DiskUsage {
                used_bytes: 64 << 20,
                limit_bytes: 64 << 20,
            },
        )
        .await;
    agent.sample_storage().await;
    assert_eq!(quota_events(agent.clone()).await.len(), 2);
}

#[tokio::test]
async fn update_resolves_the_new_image_and_issues_a_new_instance() {
    let fixture = Fixture::new();
    fixture.import("demo/img:1", "one");
    let agent = fixture.agent().await;
    let before = agent
        .create(create_request("00000000000007", "demo/img:1", false))
        .await
        .expect("create");
    fixture.import("demo/img:1", "two");
    let after = agent
        .update(
            "00000000000007",
            UpdateMachineRequest {
                config: config("demo/img:1"),
                skip_launch: false,
                skip_secrets: false,
                min_secrets_version: None,
            },
            Default::default(),
        )
        .await
        .expect("update");
    assert_ne!(after.instance_id, before.instance_id);
    assert_ne!(after.image_ref.digest, before.image_ref.digest);
    assert_eq!(after.state, MachineState::Started);
    let lowerdirs = fixture
        .runtime
        .lowerdirs("00000000000007")
        .await
        .expect("started");
    assert!(std::fs::read_to_string(lowerdirs[1].join("marker"))
        .expect("marker")
        .contains("two"));

    // A bad update changes nothing.
    let error = agent
        .update(
            "00000000000007",
            UpdateMachineRequest {
                config: config("ghost/img:9"),
                skip_launch: false,
                skip_secrets: false,
                min_secrets_version: None,
            },
            Default::default(),
        )
        .await
        .expect_err("no such image");
    assert_eq!(error.to_response().1.error, "image_not_found");
    let unchanged = agent.get("00000000000007").await.expect("get");
    assert_eq!(unchanged.instance_id, after.instance_id);
    assert_eq!(unchanged.state, MachineState::Started);
}

#[tokio::test]
async fn recovery_rolls_back_a_half_done_create_and_settles_in_flight_states() {
    let fixture = Fixture::new();
    fixture.import("demo/img:1", "one");
    {
        let agent = fixture.agent().await;
        agent
            .create(create_request("00000000000008", "demo/img:1", true))
            .await
            .expect("create");
        agent
            .create(create_request("00000000000009", "demo/img:1", false))
            .await
            .expect("create");
        agent
            .create(create_request("0000000000000a", "demo/img:1", false))
            .await
            .expect("create");

        // Rewrite the records as a crash mid-operation would have left them.
        let mut half_created = agent
            .store()
            .get("00000000000008")
            .await
            .expect("read")
            .expect("record");
        half_created.pending = Some(PendingOp::Create);
        agent.store().save(&half_created, None).await.expect("save");
        let mut starting = agent
            .store()
            .get("00000000000009")
            .await
            .expect("read")
            .expect("record");
        starting.state = MachineState::Starting;
        agent.store().save(&starting, None).await.expect("save");
        let mut stopping = agent
            .store()
            .get("0000000000000a")
            .await
            .expect("read")
            .expect("record");
        stopping.state = MachineState::Stopping;
        agent.store().save(&stopping, None).await.expect("save");
        agent.store().close().await;
    }
    fixture.runtime.clear_calls().await;
    let agent = fixture.agent().await;
    assert!(
        matches!(
            agent.get("00000000000008").await,
            Err(WorkerError::NotFound(_))
        ),
        "unfinished create is undone"
    );
    assert!(!fixture.runtime.exists("00000000000008").await);
    // The runtime says it runs: the start had happened.
    assert_eq!(
        agent.get("00000000000009").await.expect("get").state,
        MachineState::Started
    );
    // A stop in flight is finished.
    assert_eq!(
        agent.get("0000000000000a").await.expect("get").state,
        MachineState::Stopped
    );
    let calls = fixture.runtime.calls().await;
    assert!(
        calls.contains(&"remove 00000000000008".to_string()),
        "{calls:?}"
    );
    assert!(
        calls.contains(&"signal 0000000000000a 9".to_string()),
        "{calls:?}"
    );
}

#[tokio::test]
async fn start_refuses_to_overcommit_the_host() {
    let fixture = Fixture::new();
    fixture.import("demo/img:1", "one");
    let agent = fixture.agent().await;
    // 4 CPUs and 2048 MB: two 2-CPU Machines fit, a third does not.
    let mut big = create_request("0000000000000b", "demo/img:1", false);
    big.config.guest.cpus = 2;
    agent.create(big.clone()).await.expect("first");
    big.id = "0000000000000c".into();
    big.name = "n-c".into();
    agent.create(big.clone()).await.expect("second");
    big.id = "0000000000000d".into();
    big.name = "n-d".into();
    big.skip_launch = true;
    agent.create(big).await.expect("created without starting");
    let error = agent
        .start("0000000000000d", EventSource::User)
        .await
        .expect_err("no room");
    let (status, body) = error.to_response();
    assert_eq!(
        (status, body.error.as_str()),
        (503, "insufficient_capacity")
    );
    assert!(
        body.message.contains("test") && body.message.contains("CPUs"),
        "{}",
        body.message
    );
    assert!(body.retry_after_ms.is_some());
    assert_eq!(
        agent.get("0000000000000d").await.expect("get").state,
        MachineState::Created,
        "a refused start changes nothing"
    );
    // A stopped Machine gives its CPUs back.
    agent
        .stop("0000000000000b", StopRequest::default())
        .await
        .expect("stop");
    agent
        .start("0000000000000d", EventSource::User)
        .await
        .expect("now it fits");
    let stats = agent.stats().await.expect("stats");
    assert_eq!((stats.used.cpus, stats.running, stats.machines), (4, 2, 3));
}

/// Polls until the Machine is in `state`.
async fn wait_state(agent: &Agent, id: &str, state: MachineState) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while agent.get(id).await.expect("get").state != state {
        assert!(tokio::time::Instant::now() < deadline, "never {state}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// Real time: tokio's paused time fires sqlx's pool timeouts while SQLite works on its
// own thread. Two retries keep it to 3 s.
#[tokio::test]
async fn a_crash_loop_backs_off_exponentially_then_gives_up() {
    let fixture = Fixture::new();
    fixture.import("demo/img:1", "one");
    let agent = fixture.agent().await;
    let id = "000000000000c1";
    let mut request = create_request(id, "demo/img:1", false);
    request.config.restart = berth_api::RestartConfig {
        policy: berth_api::RestartPolicy::OnFailure,
        max_retries: Some(2),
    };
    agent.create(request).await.expect("create");
    let mut waits = Vec::new();
    for _ in 0..3 {
        wait_state(&agent, id, MachineState::Started).await;
        assert!(fixture.runtime.exit(id, 1).await, "it ran");
        let crashed = tokio::time::Instant::now();
        wait_state(&agent, id, MachineState::Stopped).await;
        // Either it comes back (after the backoff) or it has given up.
        loop {
            let machine = agent.get(id).await.expect("get");
            if machine.state == MachineState::Started {
                waits.push(crashed.elapsed());
                break;
            }
            if machine.restart_count == 2 && waits.len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Backoff doubles from 1 s (then 4 s, 8 s, … up to 60 s; berth-core's unit tests
    // cover the curve): a crash loop costs a few boots a minute, not a core.
    let seconds: Vec<u64> = waits.iter().map(|wait| wait.as_secs()).collect();
    assert_eq!(seconds, vec![1, 2], "{waits:?}");
    // Given up: stopped, and it stays stopped.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let machine = agent.get(id).await.expect("get");
    assert_eq!(machine.state, MachineState::Stopped);
    assert_eq!(machine.restart_count, 2);
    assert_eq!(
        machine.last_exit.as_ref().map(|exit| exit.reason.as_str()),
        Some("max_retries_exceeded")
    );
    let starts = fixture
        .runtime
        .calls()
        .await
        .iter()
        .filter(|call| call.starts_with("start "))
        .count();
    assert_eq!(starts, 3, "the first boot and two restarts");
    let events = agent.events(id).await.expect("events");
    let last = events.last().expect("an event");
    assert_eq!(
        (
            last.kind.as_str(),
            last.source.as_str(),
            last.reason.as_deref()
        ),
        ("exit", "system", Some("max_retries_exceeded"))
    );
}

#[tokio::test]
async fn policy_no_never_restarts_and_always_does() {
    let fixture = Fixture::new();
    fixture.import("demo/img:1", "one");
    let agent = fixture.agent().await;
    for (id, policy) in [
        ("000000000000d1", berth_api::RestartPolicy::No),
        ("000000000000d2", berth_api::RestartPolicy::Always),
    ] {
        let mut request = create_request(id, "demo/img:1", false);
        request.config.restart.policy = policy;
        agent.create(request).await.expect("create");
    }
    for id in ["000000000000d1", "000000000000d2"] {
        assert!(fixture.runtime.exit(id, 0).await, "it ran");
    }
    wait_state(&agent, "000000000000d1", MachineState::Stopped).await;
    // always: back after the first backoff (1 s), even from a clean exit.
    wait_state(&agent, "000000000000d2", MachineState::Stopped).await;
    wait_state(&agent, "000000000000d2", MachineState::Started).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        agent.get("000000000000d1").await.expect("get").state,
        MachineState::Stopped,
        "policy no stays stopped"
    );
}

fn volume_request(id: &str, name: &str) -> berth_worker::CreateVolumeOnWorker {
    berth_worker::CreateVolumeOnWorker {
        id: id.into(),
        app: "app".into(),
        request: berth_api::CreateVolumeRequest {
            name: name.into(),
            size_gb: Some(1),
            ..Default::default()
        },
    }
}

#[tokio::test]
async fn recovery_settles_volume_operations_and_frees_claims_of_machines_gone() {
    use berth_agent::volumes::VolumePending;
    let fixture = Fixture::new();
    fixture.import("demo/img:1", "one");
    let (created, extended, deleted, held) = (
        "vol_aaaaaaaaaaaaaaaa",
        "vol_bbbbbbbbbbbbbbbb",
        "vol_cccccccccccccccc",
        "vol_dddddddddddddddd",
    );
    {
        let agent = fixture.agent().await;
        for (id, name) in [(created, "a"), (extended, "b"), (deleted, "c"), (held, "d")] {
            agent
                .volume_create(volume_request(id, name))
                .await
                .expect("volume");
        }
        // A Machine holds `held`, then its record vanishes, as after a destroy that
        // crashed before the release.
        let mut request = create_request("0000000000000b", "demo/img:1", true);
        request.config.mounts = vec![berth_api::MachineMount {
            volume: held.into(),
            path: "/data".into(),
            ..Default::default()
        }];
        agent.create(request).await.expect("create");
        assert_eq!(
            agent
                .volume_get(held)
                .await
                .expect("get")
                .attached_machine_id,
            Some("0000000000000b".into())
        );
        agent
            .store()
            .delete("0000000000000b")
            .await
            .expect("delete");
        // The others as a crash in the middle of each operation left them.
        for (id, pending, size_gb) in [
            (created, VolumePending::Create, 1),
            (extended, VolumePending::Extend, 2),
            (deleted, VolumePending::Delete, 1),
        ] {
            let mut record = agent
                .store()
                .volume(id)
                .await
                .expect("read")
                .expect("record");
            record.pending = Some(pending);
            record.size_gb = size_gb;
            agent.store().save_volume(&record).await.expect("save");
        }
        fixture.runtime.unmount_volume(held).await;
        agent.store().close().await;
    }
    fixture.runtime.clear_calls().await;
    let agent = fixture.agent().await;
    let calls = fixture.runtime.calls().await;
    // An unfinished create is undone, a delete finished, an extend finished.
    for gone in [created, deleted] {
        assert!(agent.volume_get(gone).await.is_err(), "{gone} is gone");
        assert_eq!(fixture.runtime.volume_size(gone).await, None);
        assert!(
            calls.contains(&format!("volume_remove {gone}")),
            "{calls:?}"
        );
    }
    assert_eq!(agent.volume_get(extended).await.expect("get").size_gb, 2);
    assert_eq!(fixture.runtime.volume_size(extended).await, Some(2 << 30));
    // Every kept volume is mounted again, and the vanished Machine's claim is released.
    assert!(calls.contains(&format!("volume_mount {held}")), "{calls:?}");
    let freed = agent.volume_get(held).await.expect("get");
    assert_eq!(freed.attached_machine_id, None);
    assert_eq!(freed.state, "created");
    // The doctor finds no volume left over (the journal of the Machine whose record was
    // cut out above is another matter).
    let report = agent.run_doctor(false).await.expect("doctor");
    assert!(
        report.findings.iter().all(|finding| !matches!(
            finding.kind,
            berth_api::FindingKind::OrphanVolume | berth_api::FindingKind::VolumeNotMounted
        )),
        "{report:?}"
    );
    // An orphan volume directory is found, and removed by a repair.
    let orphan = agent.volume_layout("vol_eeeeeeeeeeeeeeee");
    std::fs::create_dir_all(orphan.mount_point()).expect("orphan dir");
    let report = agent.run_doctor(true).await.expect("doctor");
    let found: Vec<_> = report
        .findings
        .iter()
        .filter(|finding| finding.kind == berth_api::FindingKind::OrphanVolume)
        .collect();
    assert_eq!(found.len(), 1, "{report:?}");
    assert!(found[0].repaired);
    assert!(!orphan.dir.exists());
}

#[tokio::test]
async fn a_leaving_machines_volumes_are_marked_refuse_changes_and_come_back_on_abort() {
    use berth_agent::volumes::VolumePending;
    use berth_worker::MigrationStep;
    let fixture = Fixture::new();
    fixture.import("demo/img:1", "one");
    let volume = "vol_ffffffffffffffff";
    let machine = "0000000000000c";
    let agent = fixture.agent().await;
    agent
        .volume_create(volume_request(volume, "data"))
        .await
        .expect("volume");
    let mut request = create_request(machine, "demo/img:1", true);
    request.config.mounts = vec![berth_api::MachineMount {
        volume: volume.into(),
        path: "/data".into(),
        ..Default::default()
    }];
    agent.create(request).await.expect("create");
    let begin = || MigrationStep::Begin {
        id: machine.into(),
        grant: "g".repeat(64),
        to_worker: "other".into(),
    };
    let begun = agent.migration(begin()).await.expect("begin");
    let export = begun.export.expect("export");
    assert_eq!(export["volumes"][0]["id"], volume, "{export}");
    assert_eq!(export["volumes"][0]["name"], "data", "{export}");
    // Sent again (its answer lost): the same.
    agent.migration(begin()).await.expect("begin again");
    let record = agent
        .store()
        .volume(volume)
        .await
        .expect("read")
        .expect("record");
    assert_eq!(record.pending, Some(VolumePending::MigrateOut));
    // A volume that moves takes no extend, snapshot or update meanwhile.
    let refused = [
        agent.volume_extend(volume, 2).await.map(|_| ()),
        agent.volume_snapshot(volume).await.map(|_| ()),
        agent
            .volume_update(volume, berth_api::UpdateVolumeRequest::default())
            .await
            .map(|_| ()),
    ];
    for result in refused {
        let (status, body) = result.expect_err("refused").to_response();
        assert_eq!((status, body.error.as_str()), (409, "machine_migrating"));
        assert!(body.retry_after_ms.is_some(), "{body:?}");
    }
    // Recovery mounts it again and keeps the mark for the move's owner to settle.
    agent.store().close().await;
    drop(agent);
    fixture.runtime.unmount_volume(volume).await;
    fixture.runtime.clear_calls().await;
    let agent = fixture.agent().await;
    assert!(fixture
        .runtime
        .calls()
        .await
        .contains(&format!("volume_mount {volume}")));
    let record = agent
        .store()
        .volume(volume)
        .await
        .expect("read")
        .expect("record");
    assert_eq!(record.pending, Some(VolumePending::MigrateOut));
    // Abort: the volume is the Machine's again, unmarked, and takes an extend.
    agent
        .migration(MigrationStep::Abort {
            id: machine.into(),
            grant: "g".repeat(64),
        })
        .await
        .expect("abort");
    let record = agent
        .store()
        .volume(volume)
        .await
        .expect("read")
        .expect("record");
    assert_eq!(record.pending, None);
    assert_eq!(record.attached_machine.as_deref(), Some(machine));
    assert_eq!(
        agent
            .volume_extend(volume, 2)
            .await
            .expect("extend")
            .size_gb,
        2
    );
}

/// A sealed memory image (its manifest) in the Machine's directory, as the gvisor driver
/// leaves one.
fn seal_image(fixture: &Fixture, id: &str) -> std::path::PathBuf {
    let image = fixture
        .dir
        .path()
        .join("worker/machines")
        .join(id)
        .join("memory");
    std::fs::create_dir_all(&image).expect("image dir");
    std::fs::write(image.join("checkpoint.img"), vec![7u8; 4096]).expect("pages");
    std::fs::write(image.join("manifest.json"), b"{}").expect("manifest");
    image
}

// Seen to fail without recovery's suspend rows (berth_core::recovery::plan): the
// checkpointed Machine was recovered `stopped`, not `suspended`.
#[tokio::test]
async fn recovery_settles_a_suspend_or_resume_cut_short_by_the_image_it_finds() {
    let fixture = Fixture::new();
    fixture.import("demo/img:1", "one");
    let ids = [
        "0000000000000b",
        "0000000000000c",
        "0000000000000d",
        "0000000000000e",
    ];
    {
        let agent = fixture.agent().await;
        for id in ids {
            agent
                .create(create_request(id, "demo/img:1", false))
                .await
                .expect("create");
            agent.stop(id, StopRequest::default()).await.expect("stop");
        }
        // Rewrite the records as a crash mid-operation would have left them; nothing runs.
        let rewrite = |id: &'static str, state: MachineState, memory_bytes: u64| {
            let agent = agent.clone();
            async move {
                let mut record = agent.store().get(id).await.expect("read").expect("record");
                record.state = state;
                record.memory_bytes = memory_bytes;
                record.storage_bytes += memory_bytes;
                agent.store().save(&record, None).await.expect("save");
            }
        };
        // Checkpointed, then killed before recording `suspended`.
        rewrite(ids[0], MachineState::Suspending, 0).await;
        seal_image(&fixture, ids[0]);
        // Killed before the checkpoint sealed anything, the run gone.
        rewrite(ids[1], MachineState::Suspending, 0).await;
        // A resume recorded `starting` that never began.
        rewrite(ids[2], MachineState::Starting, 4096).await;
        seal_image(&fixture, ids[2]);
        // A stopped Machine beside a stale image.
        rewrite(ids[3], MachineState::Stopped, 4096).await;
        seal_image(&fixture, ids[3]);
        agent.store().close().await;
    }
    let agent = fixture.agent().await;
    let image = |id: &str| {
        fixture
            .dir
            .path()
            .join("worker/machines")
            .join(id)
            .join("memory")
    };
    let state = |id: &'static str| {
        let agent = agent.clone();
        async move { agent.get(id).await.expect("never lost").state }
    };
    assert_eq!(state(ids[0]).await, MachineState::Suspended);
    assert!(
        image(ids[0]).join("manifest.json").exists(),
        "its image is kept"
    );
    let record = agent
        .store()
        .get(ids[0])
        .await
        .expect("read")
        .expect("record");
    assert!(record.memory_bytes > 0, "the image counts as storage");
    assert_eq!(state(ids[1]).await, MachineState::Stopped);
    let events = agent.machine_events(ids[1], 0, 100).await.expect("events");
    assert_eq!(
        events.last().map(|event| event.kind),
        Some(EventKind::MemoryLost),
        "{events:?}"
    );
    assert_eq!(state(ids[2]).await, MachineState::Suspended);
    assert!(image(ids[2]).join("manifest.json").exists());
    assert_eq!(state(ids[3]).await, MachineState::Stopped);
    assert!(!image(ids[3]).exists(), "a stale image is discarded");
    let record = agent
        .store()
        .get(ids[3])
        .await
        .expect("read")
        .expect("record");
    assert_eq!(record.memory_bytes, 0);
    let storage: Vec<u64> = agent
        .usage_since(0, 1000)
        .await
        .expect("usage")
        .into_iter()
        .filter(|entry| entry.machine_id == ids[3] && entry.kind == berth_api::UsageKind::Storage)
        .map(|entry| entry.storage_bytes)
        .collect();
    assert_eq!(storage.last(), Some(&(record.storage_bytes)), "{storage:?}");

    // The doctor: a suspended Machine without its image, and an orphaned image.
    std::fs::remove_dir_all(image(ids[2])).expect("lose the image");
    seal_image(&fixture, ids[1]);
    let report = agent.doctor(false).await.expect("doctor");
    let found: Vec<(berth_api::FindingKind, Option<String>)> = report
        .findings
        .iter()
        .map(|finding| (finding.kind, finding.machine_id.clone()))
        .collect();
    assert!(
        found.contains(&(
            berth_api::FindingKind::MissingMemoryImage,
            Some(ids[2].into())
        )),
        "{found:?}"
    );
    assert!(
        found.contains(&(
            berth_api::FindingKind::OrphanMemoryImage,
            Some(ids[1].into())
        )),
        "{found:?}"
    );
    let repaired = agent.doctor(true).await.expect("repair");
    assert!(repaired
        .findings
        .iter()
        .any(|f| f.kind == berth_api::FindingKind::OrphanMemoryImage && f.repaired));
    assert!(!image(ids[1]).exists(), "repair removed the orphaned image");
    // A suspended Machine's lost image is told, not made up: its next start boots fresh.
    let answer = agent.start(ids[2], EventSource::User).await.expect("start");
    assert!(!answer.resumed);
    assert!(
        answer
            .note
            .as_deref()
            .is_some_and(|note| note.contains("booted fresh")),
        "{answer:?}"
    );
    let kinds: Vec<EventKind> = agent
        .machine_events(ids[2], 0, 100)
        .await
        .expect("events")
        .into_iter()
        .map(|event| event.kind)
        .collect();
    assert!(
        kinds.ends_with(&[EventKind::MemoryLost, EventKind::Start]),
        "{kinds:?}"
    );
    // The fake cannot suspend: a started Machine is refused with the driver's name.
    let refused = agent
        .suspend(ids[2], EventSource::User)
        .await
        .expect_err("refused");
    let (status, body) = refused.to_response();
    assert_eq!((status, body.error.as_str()), (422, "suspend_unsupported"));
    assert!(body.message.contains("fake driver"), "{}", body.message);
}
