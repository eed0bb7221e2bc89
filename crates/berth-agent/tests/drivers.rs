//! A worker with several drivers (fakes, one per name): each Machine runs with the driver
//! its config names, keeps it across agent restarts and a change of the default, and
//! changes it only through an update.

use std::path::Path;
use std::sync::Arc;

use berth_agent::{Agent, AgentConfig, CreateOnWorker, Drivers, EventSource, WorkerService};
use berth_api::{InitConfig, MachineConfig, MachineState, StopRequest, UpdateMachineRequest};
use berth_image::build::{busybox_layer, Compression, ImageBuilder};
use berth_image::{ImagePuller, ImageStore, UnpackLimits};
use berth_runtime::fake::FakeRuntime;

const IMAGE: &str = "demo/img:1";

struct Fixture {
    dir: tempfile::TempDir,
    native: Arc<FakeRuntime>,
    runc: Arc<FakeRuntime>,
    puller: Arc<ImagePuller>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let images = Arc::new(
            ImageStore::open(&dir.path().join("images"), UnpackLimits::default()).expect("store"),
        );
        let layout = dir.path().join("layout");
        ImageBuilder::new()
            .layer(
                busybox_layer(Path::new("/bin/busybox")).expect("busybox"),
                Compression::Gzip,
            )
            .cmd(&["/bin/sh"])
            .write_layout(&layout)
            .expect("layout");
        images.import(&layout, IMAGE).expect("import");
        Fixture {
            dir,
            native: Arc::new(FakeRuntime::new()),
            runc: Arc::new(FakeRuntime::new()),
            puller: Arc::new(ImagePuller::new(images, Default::default())),
        }
    }

    /// The agent with both drivers, `default` for Machines that name none.
    async fn agent(&self, default: &str) -> Agent {
        let (first, second) = match default {
            "native" => (("native", &self.native), ("runc", &self.runc)),
            _ => (("runc", &self.runc), ("native", &self.native)),
        };
        let drivers = Drivers::new(first.0, first.1.clone()).with(second.0, second.1.clone());
        Agent::open_with_drivers(self.config(), drivers, self.puller.clone())
            .await
            .expect("agent")
    }

    /// The agent with native only.
    async fn native_only(&self) -> Agent {
        let drivers = Drivers::new("native", self.native.clone());
        Agent::open_with_drivers(self.config(), drivers, self.puller.clone())
            .await
            .expect("agent")
    }

    fn config(&self) -> AgentConfig {
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
        }
    }

    async fn clear(&self) {
        self.native.clear_calls().await;
        self.runc.clear_calls().await;
    }
}

fn config(runtime: Option<&str>) -> MachineConfig {
    MachineConfig {
        image: IMAGE.into(),
        init: InitConfig {
            cmd: Some(vec!["sleep".into(), "3600".into()]),
            entrypoint: None,
            exec: None,
            tty: false,
        },
        restart: berth_api::RestartConfig {
            policy: berth_api::RestartPolicy::No,
            max_retries: None,
        },
        runtime: runtime.map(str::to_owned),
        ..MachineConfig::default()
    }
}

fn create(id: &str, runtime: Option<&str>) -> CreateOnWorker {
    CreateOnWorker {
        from_checkpoint: None,
        id: id.into(),
        app: "app".into(),
        name: format!("n-{id}"),
        config: config(runtime),
        skip_launch: false,
        org: None,
        pull: Default::default(),
    }
}

/// The calls of `id` a driver saw, without the exit watcher's background `wait_exit`.
async fn calls_of(runtime: &FakeRuntime, id: &str) -> Vec<String> {
    runtime
        .calls()
        .await
        .into_iter()
        .filter_map(|call| {
            let mut words = call.split(' ');
            let (verb, of) = (words.next()?, words.next()?);
            (of == id && verb != "wait_exit").then(|| verb.to_owned())
        })
        .collect()
}

// Without the change, the worker had one driver: `runtime: "runc"` was ignored and both
// Machines were prepared and started by the one runtime it was opened with.
#[tokio::test]
async fn each_machine_runs_with_its_own_driver() {
    let fixture = Fixture::new();
    let agent = fixture.agent("native").await;
    assert_eq!(agent.runtimes(), ["native", "runc"]);
    let runc = agent
        .create(create("00000000000001", Some("runc")))
        .await
        .expect("create runc");
    let plain = agent
        .create(create("00000000000002", None))
        .await
        .expect("create default");
    assert_eq!(runc.config.runtime.as_deref(), Some("runc"));
    // A Machine that names none is recorded with the default, and shows it.
    assert_eq!(plain.config.runtime.as_deref(), Some("native"));
    assert_eq!(
        calls_of(&fixture.runc, "00000000000001").await,
        ["prepare", "start"]
    );
    assert!(calls_of(&fixture.native, "00000000000001").await.is_empty());
    assert_eq!(
        calls_of(&fixture.native, "00000000000002").await,
        ["prepare", "start"]
    );
    assert!(calls_of(&fixture.runc, "00000000000002").await.is_empty());

    fixture.clear().await;
    agent
        .exec("00000000000001", exec_true())
        .await
        .expect("exec");
    agent
        .stop("00000000000001", StopRequest::default())
        .await
        .expect("stop");
    agent
        .destroy("00000000000001", false)
        .await
        .expect("destroy");
    let runc_calls = calls_of(&fixture.runc, "00000000000001").await;
    for call in ["exec", "signal", "cleanup", "remove"] {
        assert!(runc_calls.iter().any(|seen| seen == call), "{runc_calls:?}");
    }
    assert!(calls_of(&fixture.native, "00000000000001").await.is_empty());
}

fn exec_true() -> berth_agent::ExecOnWorker {
    berth_agent::ExecOnWorker {
        cmd: vec!["true".into()],
        stdin: None,
        timeout: std::time::Duration::from_secs(5),
        max_output_bytes: 1024,
    }
}

// Without the change, a restarted agent ran every Machine with the driver it was opened
// with: after the default became runc, the native Machine was started by runc.
#[tokio::test]
async fn a_restarted_agent_keeps_each_machines_driver_whatever_the_default() {
    let fixture = Fixture::new();
    let agent = fixture.agent("native").await;
    for (id, runtime) in [("00000000000001", Some("runc")), ("00000000000002", None)] {
        agent.create(create(id, runtime)).await.expect("create");
        agent.stop(id, StopRequest::default()).await.expect("stop");
    }
    agent.store().close().await;
    drop(agent);

    let agent = fixture.agent("runc").await;
    fixture.clear().await;
    for id in ["00000000000001", "00000000000002"] {
        agent.start(id, EventSource::User).await.expect("start");
    }
    assert_eq!(calls_of(&fixture.runc, "00000000000001").await, ["start"]);
    assert_eq!(calls_of(&fixture.native, "00000000000002").await, ["start"]);
    assert!(calls_of(&fixture.runc, "00000000000002").await.is_empty());
    let plain = agent.get("00000000000002").await.expect("get");
    assert_eq!(plain.config.runtime.as_deref(), Some("native"));
}

// Without the change there was no record of a Machine's driver to fill in, and a worker
// reopened with another default ran its old Machines with that one.
#[tokio::test]
async fn a_machine_recorded_before_drivers_is_given_the_driver_that_ran_it() {
    let fixture = Fixture::new();
    let agent = fixture.agent("runc").await;
    agent
        .create(create("00000000000001", None))
        .await
        .expect("create");
    agent
        .stop("00000000000001", StopRequest::default())
        .await
        .expect("stop");
    // As an older agent wrote it: no driver in the config.
    let mut record = agent
        .store()
        .get("00000000000001")
        .await
        .expect("read")
        .expect("record");
    record.config.runtime = None;
    agent.store().save(&record, None).await.expect("save");
    agent.store().close().await;
    drop(agent);

    // The worker ran it with runc (its only driver then); reopened with runc as default.
    let agent = fixture.agent("runc").await;
    let recorded = agent
        .store()
        .get("00000000000001")
        .await
        .expect("read")
        .expect("record");
    assert_eq!(recorded.config.runtime.as_deref(), Some("runc"));
    agent.store().close().await;
    drop(agent);
    // Kept from then on, whatever the default becomes.
    let agent = fixture.agent("native").await;
    fixture.clear().await;
    agent
        .start("00000000000001", EventSource::User)
        .await
        .expect("start");
    assert_eq!(calls_of(&fixture.runc, "00000000000001").await, ["start"]);
    assert!(calls_of(&fixture.native, "00000000000001").await.is_empty());
}

// Without the change an update could not change the driver: the Machine was prepared and
// started again by the one runtime of the worker.
#[tokio::test]
async fn an_update_may_change_the_driver_and_otherwise_keeps_it() {
    let fixture = Fixture::new();
    let agent = fixture.agent("native").await;
    agent
        .create(create("00000000000001", Some("runc")))
        .await
        .expect("create");
    fixture.clear().await;
    let update = |runtime: Option<&str>| UpdateMachineRequest {
        config: config(runtime),
        skip_launch: false,
        skip_secrets: false,
        min_secrets_version: None,
    };
    let updated = agent
        .update("00000000000001", update(Some("native")), Default::default())
        .await
        .expect("update");
    assert_eq!(updated.state, MachineState::Started);
    assert_eq!(updated.config.runtime.as_deref(), Some("native"));
    // The old driver ended its run; the new one laid the Machine out and started it.
    let runc_calls = calls_of(&fixture.runc, "00000000000001").await;
    assert!(
        runc_calls.iter().any(|call| call == "signal"),
        "{runc_calls:?}"
    );
    assert!(
        runc_calls.iter().any(|call| call == "cleanup"),
        "{runc_calls:?}"
    );
    assert!(!runc_calls
        .iter()
        .any(|call| call == "prepare" || call == "start"));
    assert_eq!(
        calls_of(&fixture.native, "00000000000001").await,
        ["prepare", "start"]
    );

    // A config that names no driver (a Fly client's) keeps the Machine's.
    fixture.clear().await;
    let kept = agent
        .update("00000000000001", update(None), Default::default())
        .await
        .expect("update");
    assert_eq!(kept.config.runtime.as_deref(), Some("native"));
    assert!(calls_of(&fixture.runc, "00000000000001").await.is_empty());
}

// Without the change a worker took any Machine whatever driver it named.
#[tokio::test]
async fn a_driver_the_worker_lacks_is_refused_and_changes_nothing() {
    let fixture = Fixture::new();
    let agent = fixture.native_only().await;
    assert_eq!(agent.runtimes(), ["native"]);
    let refused = agent
        .create(create("00000000000001", Some("gvisor")))
        .await
        .expect_err("no gvisor here");
    let (status, body) = refused.to_response();
    assert_eq!(
        (status, body.error.as_str()),
        (503, "insufficient_capacity")
    );
    assert_eq!(body.missing, Some(vec!["runtime".to_owned()]));
    assert_eq!(body.worker.as_deref(), Some("test"));
    assert!(
        agent.get("00000000000001").await.is_err(),
        "nothing recorded"
    );
    assert!(fixture.native.calls().await.is_empty());

    agent
        .create(create("00000000000002", None))
        .await
        .expect("create");
    let refused = agent
        .update(
            "00000000000002",
            UpdateMachineRequest {
                config: config(Some("runc")),
                skip_launch: false,
                skip_secrets: false,
                min_secrets_version: None,
            },
            Default::default(),
        )
        .await
        .expect_err("no runc here");
    assert_eq!(refused.to_response().0, 503);
    let machine = agent.get("00000000000002").await.expect("get");
    assert_eq!(machine.state, MachineState::Started);
    assert_eq!(machine.config.runtime.as_deref(), Some("native"));
}
