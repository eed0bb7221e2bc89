//! End-to-end: volumes on the real host. Each is an ext4 image on a loop device; a Machine
//! writes to it as its own root, runs out of space where the kernel says so, gets more
//! after an extend, and its files outlive it and show up, still root's, in the next
//! Machine that mounts the volume. Both drivers; nothing is left on the host.

mod common;

use std::path::{Path, PathBuf};

use common::{busybox_image, Platform};
use reqwest::Method;
use serde_json::{json, Value};

const IMAGE: &str = "vol/busybox:1";

fn ok(platform: &Platform, method: Method, path: &str, body: Option<Value>) -> Value {
    let (status, reply) = platform.call(method, path, body);
    assert!(status < 300, "{path}: {status} {reply}");
    reply
}

/// A started Machine of `app` with `volume` at `path`; answers its id.
fn machine_with(platform: &Platform, app: &str, name: &str, volume: &str, path: &str) -> String {
    let reply = ok(
        platform,
        Method::POST,
        &format!("/v1/apps/{app}/machines"),
        Some(json!({
            "name": name,
            "config": {
                "image": IMAGE,
                "init": {"cmd": ["/bin/sh", "-c", "exec sleep 3600"]},
                "mounts": [{"volume": volume, "path": path}]
            }
        })),
    );
    assert_eq!(reply["state"], "started", "{reply}");
    reply["id"].as_str().expect("id").to_owned()
}

/// Runs a shell line in the Machine; answers (exit code, stdout + stderr).
fn sh(platform: &Platform, app: &str, id: &str, line: &str) -> (i64, String) {
    let reply = ok(
        platform,
        Method::POST,
        &format!("/v1/apps/{app}/machines/{id}/exec"),
        Some(json!({"cmd": ["/bin/sh", "-c", line], "timeout": "120s"})),
    );
    let out = format!(
        "{}{}",
        reply["stdout"].as_str().unwrap_or_default(),
        reply["stderr"].as_str().unwrap_or_default()
    );
    (reply["exit_code"].as_i64().unwrap_or(-1), out)
}

/// Loop devices whose backing file is below `dir`.
fn loop_devices_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let backing = entry.path().join("loop/backing_file");
        if let Ok(file) = std::fs::read_to_string(&backing) {
            if Path::new(file.trim()).starts_with(dir) {
                found.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    found
}

/// Whether this process may grow a mounted ext4 filesystem (bit 24 of its effective
/// capabilities); test hosts in containers often lack it.
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

fn data_dir(platform: &Platform) -> PathBuf {
    std::fs::canonicalize(platform.data_dir.path()).expect("data dir")
}

fn volumes_end_to_end(runtime: &str) {
    let mut platform = Platform::start_with(&["--runtime", runtime]);
    platform.import(busybox_image(), IMAGE);
    let app = format!("vols-{runtime}");
    ok(
        &platform,
        Method::POST,
        "/v1/apps",
        Some(json!({"app_name": app})),
    );
    // The volume and the first Machine come from the CLI, the rest from the API.
    let vol = platform
        .cli_ok(&[
            "volume",
            "create",
            "--app",
            &app,
            "--name",
            "data",
            "--size-gb",
            "1",
        ])
        .trim()
        .to_owned();
    let base = format!("/v1/apps/{app}/volumes/{vol}");
    assert_eq!(ok(&platform, Method::GET, &base, None)["size_gb"], 1);
    assert_eq!(loop_devices_under(&data_dir(&platform)).len(), 1);

    // The first Machine writes as its root, and the volume's root is its root's.
    let first = platform
        .cli_ok(&[
            "machine",
            "create",
            "--app",
            &app,
            "--name",
            "first",
            "--image",
            IMAGE,
            "--volume",
            &format!("{vol}:/data"),
            "--",
            "/bin/sh",
            "-c",
            "exec sleep 3600",
        ])
        .trim()
        .to_owned();
    let listed = platform.cli_ok(&["volume", "list", "--app", &app]);
    assert!(
        listed
            .lines()
            .any(|line| line.starts_with(&vol) && line.ends_with(&first)),
        "the volume is listed as attached to its Machine: {listed}"
    );
    let (code, out) = sh(
        &platform,
        &app,
        &first,
        "echo hello > /data/hello && stat -c '%u:%g' /data /data/hello && id -u",
    );
    assert_eq!((code, out.as_str()), (0, "0:0\n0:0\n0\n"));
    // On disk the ids are the Machine's own (0), not its host range: any Machine that
    // mounts the volume next sees them as its root's.
    // (Volumes are encrypted by default: their files are in the filesystem's data
    // directory.)
    let encrypted = ok(&platform, Method::GET, &base, None)["encrypted"] == true;
    assert!(encrypted);
    let layout =
        berth_runtime::volume::VolumeLayout::new(&data_dir(&platform).join("worker/volumes"), &vol);
    let on_host = layout.machine_source(encrypted).join("hello");
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&on_host).expect("hello"));
    assert_eq!(owner, 0);

    // A snapshot, taken while the Machine runs (the filesystem frozen for the copy).
    ok(&platform, Method::POST, &format!("{base}/snapshots"), None);
    let snapshots = ok(&platform, Method::GET, &format!("{base}/snapshots"), None);
    assert_eq!(snapshots.as_array().map(Vec::len), Some(1), "{snapshots}");

    // Writing past the size fails in the Machine with ENOSPC.
    let (code, out) = sh(
        &platform,
        &app,
        &first,
        "dd if=/dev/zero of=/data/big bs=1M count=1100 2>&1",
    );
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("No space left on device"), "{out}");
    let (code, out) = sh(
        &platform,
        &app,
        &first,
        "dd if=/dev/zero of=/data/more bs=1M count=200 2>&1",
    );
    assert!(
        code != 0 && out.contains("No space left on device"),
        "{out}"
    );

    // Extend: online while the Machine runs where the worker may grow a mounted
    // filesystem (CAP_SYS_RESOURCE); without it, refused while it runs, and done
    // unmounted once it is stopped. Either way the same write then fits.
    let (status, extended) = platform.call(
        Method::PUT,
        &format!("{base}/extend"),
        Some(json!({"size_gb": 2})),
    );
    if has_cap_sys_resource() {
        assert_eq!(status, 200, "{extended}");
    } else {
        assert_eq!(
            (status, extended["error"].as_str()),
            (409, Some("volume_in_use")),
            "{extended}"
        );
        let kept = ok(&platform, Method::GET, &base, None);
        assert_eq!(kept["size_gb"], 1, "{kept}");
        let machine = format!("/v1/apps/{app}/machines/{first}");
        ok(
            &platform,
            Method::POST,
            &format!("{machine}/stop"),
            Some(json!({})),
        );
        let (status, again) = platform.call(
            Method::PUT,
            &format!("{base}/extend"),
            Some(json!({"size_gb": 2})),
        );
        assert_eq!(status, 200, "{again}");
        ok(
            &platform,
            Method::POST,
            &format!("{machine}/start"),
            Some(json!({})),
        );
    }
    let grown = ok(&platform, Method::GET, &base, None);
    assert_eq!(grown["size_gb"], 2, "{grown}");
    assert!(
        grown["blocks"].as_u64().unwrap_or(0) * grown["block_size"].as_u64().unwrap_or(0) > 3 << 29,
        "{grown}"
    );
    let (code, out) = sh(
        &platform,
        &app,
        &first,
        "rm -f /data/more && dd if=/dev/zero of=/data/more bs=1M count=500 2>&1 && cat /data/hello",
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with("hello\n"), "{out}");

    // One Machine at a time, and no delete under it.
    let (status, refused) = platform.call(
        Method::POST,
        &format!("/v1/apps/{app}/machines"),
        Some(json!({"config": {
            "image": IMAGE,
            "init": {"cmd": ["/bin/sleep", "3600"]},
            "mounts": [{"volume": vol, "path": "/v"}]
        }})),
    );
    assert_eq!(
        (status, refused["error"].as_str()),
        (409, Some("volume_attached")),
        "{refused}"
    );
    let (status, refused) = platform.call(Method::DELETE, &base, None);
    assert_eq!(
        (status, refused["error"].as_str()),
        (409, Some("volume_attached")),
        "{refused}"
    );

    // Destroy the Machine: the volume stays, with its files, for the next one, whose own
    // id range reads them as its root's.
    ok(
        &platform,
        Method::DELETE,
        &format!("/v1/apps/{app}/machines/{first}?kill=true"),
        None,
    );
    let freed = ok(&platform, Method::GET, &base, None);
    assert_eq!(freed["attached_machine_id"], Value::Null, "{freed}");
    let second = machine_with(&platform, &app, "second", &vol, "/mnt/v");
    let (code, out) = sh(
        &platform,
        &app,
        &second,
        "cat /mnt/v/hello && stat -c '%u' /mnt/v/hello && touch /mnt/v/second",
    );
    assert_eq!((code, out.as_str()), (0, "hello\n0\n"));

    // Stop and start, and an agent restart after the host lost the volume's mount: the
    // volume is mounted again and the Machine sees its files.
    ok(
        &platform,
        Method::POST,
        &format!("/v1/apps/{app}/machines/{second}/stop"),
        Some(json!({})),
    );
    platform.shutdown();
    // (The key goes with the mount: the agent adds it again when it mounts the volume.)
    let mount_point = layout.mount_point();
    nix::mount::umount2(&mount_point, nix::mount::MntFlags::MNT_DETACH).expect("unmount");
    platform.boot();
    let response = platform
        .request(
            Method::POST,
            &format!("/v1/apps/{app}/machines/{second}/start"),
        )
        .json(&json!({}))
        .send()
        .expect("start");
    assert!(response.status().is_success());
    let timing = response
        .headers()
        .get("server-timing")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if runtime == "native" {
        // The one step a volume adds to start, marked.
        assert!(timing.contains("init_volumes"), "{timing}");
    }
    let (code, out) = sh(&platform, &app, &second, "ls /mnt/v");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("hello") && out.contains("second"), "{out}");

    // The doctor sees nothing wrong.
    let workers = ok(&platform, Method::GET, "/v1/workers", None);
    let worker = workers[0]["name"].as_str().unwrap_or_default().to_owned();
    let report = ok(
        &platform,
        Method::GET,
        &format!("/v1/workers/{worker}/doctor"),
        None,
    );
    let findings = report["findings"].as_array().cloned().unwrap_or_default();
    assert!(findings.is_empty(), "{report}");

    // Delete: after the Machine goes, nothing of the volume is left on the host.
    ok(
        &platform,
        Method::DELETE,
        &format!("/v1/apps/{app}/machines/{second}?kill=true"),
        None,
    );
    let deleted = ok(&platform, Method::DELETE, &base, None);
    assert_eq!(deleted["state"], "destroyed");
    assert!(!on_host.exists());
    assert_eq!(
        loop_devices_under(&data_dir(&platform)),
        Vec::<String>::new()
    );
    platform.teardown();
}

/// Whether the data extents of the (sparse) file at `path` hold `needle`.
fn image_contains(path: &Path, needle: &[u8]) -> bool {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).expect("image");
    let length = file.metadata().expect("image").len();
    let mut offset = 0u64;
    let mut buffer = vec![0u8; 4 << 20];
    while offset < length {
        let Ok(data) = rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(offset as i64)) else {
            break;
        };
        let hole = rustix::fs::seek(&file, rustix::fs::SeekFrom::Hole(data as i64)).expect("hole");
        // Chunks overlap by the needle's length, so no match is split between two.
        let mut at = data;
        while at < hole {
            let want = ((hole - at) as usize).min(buffer.len());
            let n = file.read_at(&mut buffer[..want], at).expect("read");
            if buffer[..n]
                .windows(needle.len())
                .any(|window| window == needle)
            {
                return true;
            }
            if at + n as u64 >= hole {
                break;
            }
            at += (n - needle.len().min(n)).max(1) as u64;
        }
        offset = hole;
    }
    false
}

/// Attack: a Machine writes a unique marker to its volume; after a sync, the volume's raw
/// image on the worker's disk and a snapshot's image must not hold it when the volume is
/// encrypted (Fly's default).
///
/// Proof that the test can fail: the same writes to a volume made with `encrypted: false`
/// are found in both files (the control below); with the agent made to give every volume
/// no key, the default volume read `(false, true, true)`: its image and snapshot held the
/// marker, and the test failed.
#[test]
fn an_encrypted_volumes_image_and_snapshots_hold_no_plaintext() {
    let platform = Platform::start_with(&["--runtime", "native"]);
    platform.import(busybox_image(), IMAGE);
    let app = "vols-crypt";
    ok(
        &platform,
        Method::POST,
        "/v1/apps",
        Some(json!({"app_name": app})),
    );
    let marker = format!("berth-secret-{}", std::process::id());
    let mut found = Vec::new();
    for (name, encrypted) in [("secret", None), ("plain", Some(false))] {
        let mut body = json!({"name": name, "size_gb": 1});
        if let Some(value) = encrypted {
            body["encrypted"] = json!(value);
        }
        let volume = ok(
            &platform,
            Method::POST,
            &format!("/v1/apps/{app}/volumes"),
            Some(body),
        );
        let vol = volume["id"].as_str().expect("id").to_owned();
        let machine = machine_with(&platform, app, name, &vol, "/data");
        let (code, out) = sh(
            &platform,
            app,
            &machine,
            &format!(
                "mkdir /data/{marker} && for i in $(seq 64); do echo {marker}; done > /data/{marker}/file && sync && cat /data/{marker}/file | head -1"
            ),
        );
        assert_eq!((code, out.trim()), (0, marker.as_str()));
        let base = format!("/v1/apps/{app}/volumes/{vol}");
        let snapshot = ok(&platform, Method::POST, &format!("{base}/snapshots"), None);
        let snapshot_id = snapshot["id"].as_str().expect("snapshot id");
        let dir = data_dir(&platform).join("worker/volumes").join(&vol);
        let image = dir.join("disk.img");
        let snapshot_image = dir.join("snapshots").join(format!("{snapshot_id}.img"));
        assert!(snapshot_image.exists(), "{}", snapshot_image.display());
        found.push((
            volume["encrypted"] == true,
            image_contains(&image, marker.as_bytes()),
            image_contains(&snapshot_image, marker.as_bytes()),
        ));
        ok(
            &platform,
            Method::DELETE,
            &format!("/v1/apps/{app}/machines/{machine}?kill=true"),
            None,
        );
        ok(&platform, Method::DELETE, &base, None);
    }
    assert_eq!(
        found,
        vec![(true, false, false), (false, true, true)],
        "(encrypted, marker in the image, marker in the snapshot)"
    );
    platform.teardown();
}

/// A fork taken while a Machine keeps rewriting a file on the source holds the file whole
/// (one instant of the filesystem, frozen for the copy), is encrypted with the source's
/// key (another Machine reads it), and stays sparse.
#[test]
fn a_fork_of_a_volume_in_use_is_consistent_readable_and_sparse() {
    let platform = Platform::start_with(&["--runtime", "native"]);
    platform.import(busybox_image(), IMAGE);
    let app = "vols-fork";
    ok(
        &platform,
        Method::POST,
        "/v1/apps",
        Some(json!({"app_name": app})),
    );
    let source = ok(
        &platform,
        Method::POST,
        &format!("/v1/apps/{app}/volumes"),
        Some(json!({"name": "src", "size_gb": 1})),
    );
    let source = source["id"].as_str().expect("id").to_owned();
    let writer = ok(
        &platform,
        Method::POST,
        &format!("/v1/apps/{app}/machines"),
        Some(json!({
            "name": "writer",
            "config": {
                "image": IMAGE,
                "init": {"cmd": ["/bin/sh", "-c",
                    "head -c 4000000 /dev/urandom > /data/blob; md5sum /data/blob > /data/blob.md5; i=0; while :; do i=$((i+1)); seq $i $((i+5000)) > /data/n.tmp && mv /data/n.tmp /data/n; done"]},
                "mounts": [{"volume": source, "path": "/data"}]
            }
        })),
    );
    let writer = writer["id"].as_str().expect("id").to_owned();
    let (code, out) = sh(
        &platform,
        app,
        &writer,
        "while [ ! -s /data/n ]; do sleep 0.1; done; md5sum -c /data/blob.md5",
    );
    assert_eq!(code, 0, "{out}");
    let fork = ok(
        &platform,
        Method::POST,
        &format!("/v1/apps/{app}/volumes"),
        Some(json!({"name": "fork", "source_volume_id": source})),
    );
    assert_eq!(
        (&fork["size_gb"], &fork["encrypted"]),
        (&json!(1), &json!(true)),
        "{fork}"
    );
    let fork = fork["id"].as_str().expect("id").to_owned();
    let reader = machine_with(&platform, app, "reader", &fork, "/data");
    // Whole: the blob's checksum holds and the counter file is one complete `seq` run.
    let (code, out) = sh(
        &platform,
        app,
        &reader,
        "md5sum -c /data/blob.md5 && test $(wc -l < /data/n) -eq 5001 && echo whole",
    );
    assert_eq!((code, out.lines().last()), (0, Some("whole")), "{out}");
    // Sparse: a 1 GiB image holding a few MB takes a few MB (plus ext4's metadata).
    let image = data_dir(&platform)
        .join("worker/volumes")
        .join(&fork)
        .join("disk.img");
    let meta = std::fs::metadata(&image).expect("fork image");
    let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
    assert_eq!(meta.len(), 1 << 30);
    assert!(allocated < 128 << 20, "{allocated} bytes allocated");
    platform.teardown();
}

/// An update that changes `config.mounts` on a running Machine: it is restarted with the
/// new volume mounted (encrypted, read through its key), and a volume the next update
/// removes is detached and mounts, with its files, in another Machine.
#[test]
fn an_update_changes_a_running_machines_volumes() {
    let platform = Platform::start_with(&["--runtime", "native"]);
    platform.import(busybox_image(), IMAGE);
    let app = "vols-update";
    ok(
        &platform,
        Method::POST,
        "/v1/apps",
        Some(json!({"app_name": app})),
    );
    let volume = |name: &str| {
        let reply = ok(
            &platform,
            Method::POST,
            &format!("/v1/apps/{app}/volumes"),
            Some(json!({"name": name, "size_gb": 1})),
        );
        reply["id"].as_str().expect("id").to_owned()
    };
    let (a, b) = (volume("a"), volume("b"));
    let machine = machine_with(&platform, app, "m", &a, "/data");
    let (code, out) = sh(&platform, app, &machine, "echo from-a > /data/file");
    assert_eq!(code, 0, "{out}");
    let update = |mounts: Value| {
        let path = format!("/v1/apps/{app}/machines/{machine}");
        let mut config = ok(&platform, Method::GET, &path, None)["config"].clone();
        config["mounts"] = mounts;
        ok(
            &platform,
            Method::POST,
            &path,
            Some(json!({"config": config})),
        )
    };
    let updated = update(json!([{"volume": a, "path": "/data"}, {"volume": b, "path": "/more"}]));
    assert_eq!(updated["state"], "started", "{updated}");
    let (code, out) = sh(
        &platform,
        app,
        &machine,
        "cat /data/file && echo from-b > /more/file && cat /more/file",
    );
    assert_eq!((code, out.as_str()), (0, "from-a\nfrom-b\n"));
    let holder = |id: &str| {
        ok(
            &platform,
            Method::GET,
            &format!("/v1/apps/{app}/volumes/{id}"),
            None,
        )["attached_machine_id"]
            .clone()
    };
    assert_eq!(holder(&b), json!(machine));

    let updated = update(json!([{"volume": b, "path": "/more"}]));
    assert_eq!(updated["state"], "started", "{updated}");
    let (code, out) = sh(&platform, app, &machine, "ls /data; cat /more/file");
    assert_eq!(
        (code, out.as_str()),
        (0, "from-b\n"),
        "a is gone from the Machine"
    );
    assert_eq!(holder(&a), Value::Null);
    let next = machine_with(&platform, app, "next", &a, "/data");
    let (code, out) = sh(&platform, app, &next, "cat /data/file");
    assert_eq!((code, out.as_str()), (0, "from-a\n"));
    platform.teardown();
}

#[test]
fn volumes_on_the_native_runtime() {
    volumes_end_to_end("native");
}

#[test]
fn volumes_on_the_runc_runtime() {
    volumes_end_to_end("runc");
}
