//! Create and update pulling from a real registry (docker-registry on loopback), with the
//! fake runtime: tags resolve to digests at create, start never asks the registry, and
//! concurrent creates share one download per blob.

use std::path::Path;
use std::sync::Arc;

use berth_agent::{Agent, AgentConfig, CreateOnWorker, EventSource, WorkerService};
use berth_api::{
    EventKind, InitConfig, MachineConfig, MachineState, StopRequest, UpdateMachineRequest,
};
use berth_image::build::{busybox_layer, Compression, ImageBuilder, LayerBuilder};
use berth_image::{ImagePuller, ImageStore, InUse, RegistryOptions, UnpackLimits};
use berth_runtime::fake::FakeRuntime;
use berth_testkit::{push_image, Proxy, PushTarget, Registry};

struct Fixture {
    dir: tempfile::TempDir,
    runtime: Arc<FakeRuntime>,
    puller: Arc<ImagePuller>,
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
            puller: Arc::new(ImagePuller::new(images, RegistryOptions::default())),
        }
    }

    async fn agent(&self) -> Agent {
        Agent::open_with_puller(
            AgentConfig {
                data_dir: self.dir.path().join("worker"),
                name: "test".into(),
                region: "test".into(),
                pids_limit: 64,
                capacity: berth_api::Resources {
                    cpus: 64,
                    memory_mb: 65_536,
                    disk_mb: 1_000_000,
                },
                machine_prefix: None,
                join_token: None,
            },
            self.runtime.clone(),
            self.puller.clone(),
        )
        .await
        .expect("agent")
    }
}

fn image(marker: &str) -> ImageBuilder {
    ImageBuilder::new()
        .layer(
            busybox_layer(Path::new("/bin/busybox")).expect("busybox"),
            Compression::Gzip,
        )
        .layer(
            LayerBuilder::new().file("marker", marker.as_bytes(), 0o644),
            Compression::Zstd,
        )
}

fn request(id: &str, image: &str) -> CreateOnWorker {
    CreateOnWorker {
        from_checkpoint: None,
        id: id.into(),
        app: "app".into(),
        name: format!("n-{id}"),
        config: MachineConfig {
            image: image.into(),
            init: InitConfig {
                cmd: Some(vec!["sleep".into(), "3600".into()]),
                entrypoint: None,
                exec: None,
                tty: false,
            },
            ..MachineConfig::default()
        },
        skip_launch: false,
        org: None,
        pull: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_pulls_and_pins_the_digest_start_never_asks_update_pulls_again() {
    let mut registry = Registry::start().expect("registry");
    let target = PushTarget::anonymous(&registry.host());
    let first = push_image(&target, "team/web", "1.4", image("first"))
        .await
        .expect("push");
    let fixture = Fixture::new();
    let agent = fixture.agent().await;
    let name = format!("{}/team/web:1.4", registry.host());

    let machine = agent
        .create(request("00000000000001", &name))
        .await
        .expect("create");
    assert_eq!(machine.state, MachineState::Started);
    assert_eq!(machine.image_ref.digest, first);
    assert_eq!(machine.image_ref.name, name);
    let events = agent.events("00000000000001").await.expect("events");
    let pulls: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == EventKind::Pull)
        .filter_map(|e| e.reason.as_deref())
        .collect();
    assert!(pulls.iter().any(|r| r.starts_with("resolved")), "{pulls:?}");
    assert_eq!(
        pulls.iter().filter(|r| r.contains("downloaded")).count(),
        2,
        "{pulls:?}"
    );

    // The tag moves; the Machine keeps what it resolved, with the registry gone too.
    let second = push_image(&target, "team/web", "1.4", image("second"))
        .await
        .expect("push again");
    assert_ne!(first, second);
    registry.kill();
    agent
        .stop("00000000000001", StopRequest::default())
        .await
        .expect("stop");
    let started = agent
        .start("00000000000001", EventSource::User)
        .await
        .expect("start with the registry down");
    assert_eq!(started.machine.image_ref.digest, first);

    // Update with the registry down fails cleanly and changes nothing.
    let update = UpdateMachineRequest {
        config: request("00000000000001", &name).config,
        skip_launch: true,
        skip_secrets: false,
        min_secrets_version: None,
    };
    let error = agent
        .update("00000000000001", update.clone(), Default::default())
        .await
        .expect_err("registry is down");
    let (status, body) = error.to_response();
    assert_eq!((status, body.error.as_str()), (503, "registry_unreachable"));
    assert!(body.retry_after_ms.is_some());
    assert_eq!(
        agent
            .get("00000000000001")
            .await
            .expect("get")
            .image_ref
            .digest,
        first
    );

    // Update pulls the moved tag.
    registry.start_again().expect("registry back");
    let updated = agent
        .update("00000000000001", update, Default::default())
        .await
        .expect("update");
    assert_eq!(updated.image_ref.digest, second);
    let usage = agent.image_usage().await.expect("usage");
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].image.digest, second);
    assert_eq!(usage[0].layers.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_creates_download_each_blob_once() {
    let registry = Registry::start().expect("registry");
    push_image(
        &PushTarget::anonymous(&registry.host()),
        "team/web",
        "1",
        image("shared"),
    )
    .await
    .expect("push");
    let proxy = Proxy::start(&registry.host()).expect("proxy");
    let fixture = Fixture::new();
    let agent = fixture.agent().await;
    let name = format!("{}/team/web:1", proxy.host());
    let creates: Vec<_> = (0..10)
        .map(|i| {
            let agent = agent.clone();
            let name = name.clone();
            tokio::spawn(async move {
                agent
                    .create(request(&format!("{:014}", i + 1), &name))
                    .await
            })
        })
        .collect();
    let mut digests = Vec::new();
    for create in creates {
        digests.push(
            create
                .await
                .expect("task")
                .expect("create")
                .image_ref
                .digest,
        );
    }
    digests.dedup();
    assert_eq!(digests.len(), 1);
    let gets = proxy.blob_gets();
    let layers = &agent.image_usage().await.expect("usage")[0].layers;
    for layer in layers {
        assert_eq!(gets.get(layer), Some(&1), "{layer}: {gets:?}");
        // And as the registry itself saw it.
        assert_eq!(
            registry.logged_blob_gets(layer, 1, std::time::Duration::from_secs(5)),
            1,
            "{layer}"
        );
    }
    // Every blob, the config too, was fetched once: the layers and one config.
    assert_eq!(gets.len(), layers.len() + 1, "{gets:?}");
    assert!(gets.values().all(|count| *count == 1), "{gets:?}");
    assert_eq!(fixture.puller.blobs_downloaded(), 2);
    assert_eq!(fixture.puller.store().layers_unpacked(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keeps_every_machines_layers_and_a_create_in_flight() {
    let registry = Registry::start().expect("registry");
    let target = PushTarget::anonymous(&registry.host());
    push_image(&target, "used/img", "1", image("used"))
        .await
        .expect("push");
    push_image(&target, "unused/img", "1", image("unused"))
        .await
        .expect("push");
    let fixture = Fixture::new();
    let agent = fixture.agent().await;
    let store = fixture.puller.store().clone();
    let used = agent
        .create(request(
            "00000000000001",
            &format!("{}/used/img:1", registry.host()),
        ))
        .await
        .expect("create");
    agent
        .stop("00000000000001", StopRequest::default())
        .await
        .expect("stop");
    let lease = store.lease();
    let unused = fixture
        .puller
        .resolve(
            &format!("{}/unused/img:1", registry.host()),
            &lease,
            berth_image::no_progress(),
        )
        .await
        .expect("pull");

    // A prune that starts while a create holds its lease, and reads usage before that
    // create records its Machine, still keeps the create's layers.
    let collection = store.begin_collection().await;
    let usage = agent.image_usage().await.expect("usage");
    drop(lease);
    let in_use = InUse {
        manifests: usage.iter().map(|u| u.image.digest.clone()).collect(),
        layers: usage.iter().flat_map(|u| u.layers.clone()).collect(),
    };
    let report = collection.prune(&in_use).expect("prune");
    assert!(report.images.is_empty(), "{report:?}");
    assert!(unused.layer_dirs.iter().all(|dir| dir.exists()));

    // The next prune removes what nothing holds, and keeps the stopped Machine's image.
    let report = store
        .begin_collection()
        .await
        .prune(&in_use)
        .expect("prune");
    assert_eq!(
        report.images,
        vec![format!("{}/unused/img:1", registry.host())]
    );
    assert!(!unused.layer_dirs[1].exists());
    let started = agent
        .start("00000000000001", EventSource::User)
        .await
        .expect("start after prune");
    assert_eq!(started.machine.image_ref.digest, used.image_ref.digest);
    let lowerdirs = fixture
        .runtime
        .lowerdirs("00000000000001")
        .await
        .expect("started");
    assert!(lowerdirs.iter().all(|dir| dir.exists()));
}
