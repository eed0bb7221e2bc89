//! A seeded randomized chaos run: several clients send random operations (create, start,
//! stop, exec, update, destroy) while `berth up`, which holds the control plane and the
//! agent, is killed with SIGKILL at random moments and booted again. At the end every
//! invariant `berth doctor` checks holds, every Machine a client created and did not
//! destroy exists, and every file a Machine wrote before a successful stop is still there.
//!
//! The seed is printed; `BERTH_CHAOS_SEED=<seed>` replays a run. `BERTH_CHAOS_OPS=<n>`
//! changes the number of operations (200 by default); `BERTH_CHAOS_SOAK=1` makes it a
//! soak run of 5000.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use common::{busybox_image, Platform};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{json, Value};

const IMAGE: &str = "demo/busybox:1";
const CLIENTS: u64 = 4;

/// What one client knows about one of its Machines.
#[derive(Debug, Default)]
struct Known {
    /// A destroy was sent whose outcome is unknown (or it succeeded).
    maybe_destroyed: bool,
    destroyed: bool,
    /// Markers an exec wrote, not yet followed by a successful stop.
    written: Vec<String>,
    /// Markers written before a successful stop: they must survive anything.
    durable: Vec<String>,
}

/// `Err` when the request never got an answer (berth up was killed).
fn call(
    platform: &Platform,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value), ()> {
    let mut request = platform.request(method, path);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().map_err(|_| ())?;
    let status = response.status().as_u16();
    let text = response.text().map_err(|_| ())?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

fn healthy(platform: &Platform) -> bool {
    call(platform, Method::GET, "/v1/health", None).is_ok_and(|(status, _)| status == 200)
}

fn config(cmd: &str) -> Value {
    json!({"image": IMAGE, "init": {"cmd": ["/bin/sh", "-c", cmd]},
        "restart": {"policy": "no"}, "stop_config": {"timeout": "1s"}})
}

fn read(platform: &RwLock<Platform>) -> std::sync::RwLockReadGuard<'_, Platform> {
    platform
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits until `berth up` answers again (the killer boots it).
fn wait_healthy(platform: &RwLock<Platform>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !healthy(&read(platform)) {
        assert!(Instant::now() < deadline, "berth up never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One client's random walk over its own Machines.
fn client(
    platform: &RwLock<Platform>,
    client_id: u64,
    seed: u64,
    ops: usize,
    known: &Mutex<BTreeMap<String, Known>>,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ client_id.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut mine: Vec<String> = Vec::new();
    let mut marker = 0u64;
    for op in 0..ops {
        wait_healthy(platform);
        let platform = read(platform);
        let base = |id: &str| format!("/v1/apps/chaos/machines/{id}");
        let pick = |rng: &mut StdRng, mine: &[String]| -> Option<String> {
            (!mine.is_empty()).then(|| mine[rng.gen_range(0..mine.len())].clone())
        };
        let choice = if mine.len() < 2 {
            0
        } else {
            rng.gen_range(0..12)
        };
        match choice {
            // create (a third of them left stopped)
            0 | 1 => {
                let body = json!({"skip_launch": rng.gen_bool(0.3),
                    "config": config("exec sleep 3600")});
                if let Ok((200, machine)) = call(
                    &platform,
                    Method::POST,
                    "/v1/apps/chaos/machines",
                    Some(body),
                ) {
                    let id = machine["id"].as_str().unwrap_or_default().to_owned();
                    lock(known).insert(id.clone(), Known::default());
                    mine.push(id);
                }
            }
            2 | 3 => {
                if let Some(id) = pick(&mut rng, &mine) {
                    let _ = call(
                        &platform,
                        Method::POST,
                        &format!("{}/start", base(&id)),
                        None,
                    );
                }
            }
            4 | 5 => {
                if let Some(id) = pick(&mut rng, &mine) {
                    let answer = call(
                        &platform,
                        Method::POST,
                        &format!("{}/stop", base(&id)),
                        None,
                    );
                    if let Ok((200, _)) = answer {
                        if let Some(entry) = lock(known).get_mut(&id) {
                            let written = std::mem::take(&mut entry.written);
                            entry.durable.extend(written);
                        }
                    }
                }
            }
            6..=8 => {
                if let Some(id) = pick(&mut rng, &mine) {
                    marker += 1;
                    let token = format!("c{client_id}-op{op}-m{marker}");
                    let body = json!({"cmd": ["/bin/sh", "-c",
                        format!("echo {token} >> /markers.txt && sync")]});
                    let answer = call(
                        &platform,
                        Method::POST,
                        &format!("{}/exec", base(&id)),
                        Some(body),
                    );
                    if let Ok((200, result)) = answer {
                        if result["exit_code"] == 0 {
                            if let Some(entry) = lock(known).get_mut(&id) {
                                entry.written.push(token);
                            }
                        }
                    }
                }
            }
            9 | 10 => {
                if let Some(id) = pick(&mut rng, &mine) {
                    let body = json!({"skip_launch": rng.gen_bool(0.5),
                        "config": config(&format!("echo update {op}; exec sleep 3600"))});
                    let _ = call(&platform, Method::POST, &base(&id), Some(body));
                }
            }
            _ => {
                if let Some(id) = pick(&mut rng, &mine) {
                    let answer = call(
                        &platform,
                        Method::DELETE,
                        &format!("{}?kill=true", base(&id)),
                        None,
                    );
                    let mut map = lock(known);
                    if let Some(entry) = map.get_mut(&id) {
                        entry.maybe_destroyed = true;
                        entry.destroyed = matches!(answer, Ok((200, _)));
                    }
                    mine.retain(|other| *other != id);
                }
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
}

#[test]
fn a_seeded_chaos_run_keeps_every_invariant() {
    let seed = env_number("BERTH_CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos() as u64)
            .unwrap_or(1)
    });
    let soak = std::env::var_os("BERTH_CHAOS_SOAK").is_some();
    let ops = env_number("BERTH_CHAOS_OPS").unwrap_or(if soak { 5000 } else { 200 }) as usize;
    // Printed first, so a failure can be replayed.
    println!("chaos seed {seed} ({ops} operations); replay with BERTH_CHAOS_SEED={seed}");
    eprintln!("chaos seed {seed} ({ops} operations); replay with BERTH_CHAOS_SEED={seed}");

    let platform = Platform::start();
    platform.import(busybox_image(), IMAGE);
    platform.cli_ok(&["app", "create", "chaos"]);
    let platform = Arc::new(RwLock::new(platform));
    let known = Arc::new(Mutex::new(BTreeMap::new()));
    let done = Arc::new(AtomicBool::new(false));

    let killer = {
        let (platform, done) = (platform.clone(), done.clone());
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(7));
            let mut kills = 0u32;
            while !done.load(Ordering::SeqCst) {
                // The first kill comes early: with an init forwarding SIGTERM, stops end at
                // once and a whole run can take only a few seconds.
                let pause = if kills == 0 { 50..500 } else { 300..2500 };
                std::thread::sleep(Duration::from_millis(rng.gen_range(pause)));
                if done.load(Ordering::SeqCst) {
                    break;
                }
                // The kill lands whatever the clients are doing; the reboot waits for their
                // cut-off calls to return.
                if let Some(pid) = read(&platform).pid() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let mut platform = platform
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                platform.crash();
                platform.boot();
                kills += 1;
            }
            kills
        })
    };
    let per_client = ops / CLIENTS as usize;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client_id| {
            let (platform, known) = (platform.clone(), known.clone());
            std::thread::spawn(move || client(&platform, client_id, seed, per_client, &known))
        })
        .collect();
    let mut panicked = false;
    for handle in clients {
        panicked |= handle.join().is_err();
    }
    done.store(true, Ordering::SeqCst);
    let kills = killer.join().unwrap_or_default();
    assert!(!panicked, "a client failed (seed {seed})");
    let mut platform = Arc::try_unwrap(platform)
        .ok()
        .expect("the only owner")
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !healthy(&platform) {
        platform.crash();
        platform.boot();
    }
    println!("chaos seed {seed}: berth up was killed {kills} times");
    assert!(kills > 0 || soak, "the run had no kill; seed {seed}");

    // Every invariant: the doctor finds nothing.
    let output = platform.cli(&["doctor"]);
    assert!(
        output.status.success(),
        "doctor after chaos (seed {seed}):\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        platform.server_log()
    );
    // The API's view holds every Machine a client created and did not destroy, with
    // every file it wrote before a successful stop.
    let machines_dir = platform.data_dir.path().join("worker/machines");
    let known = lock(&known);
    let durable: usize = known.values().map(|entry| entry.durable.len()).sum();
    println!(
        "chaos seed {seed}: {} Machines created, {durable} files written before a stop",
        known.len()
    );
    assert!(!known.is_empty(), "no create succeeded (seed {seed})");
    for (id, entry) in known.iter() {
        let (status, body) =
            platform.call(Method::GET, &format!("/v1/apps/chaos/machines/{id}"), None);
        if entry.destroyed {
            assert_eq!(status, 404, "{id} was destroyed (seed {seed}): {body}");
            continue;
        }
        if entry.maybe_destroyed {
            continue;
        }
        assert_eq!(status, 200, "{id} must exist (seed {seed}): {body}");
        let markers = std::fs::read_to_string(machines_dir.join(id).join("upper/markers.txt"))
            .unwrap_or_default();
        for token in &entry.durable {
            assert!(
                markers.lines().any(|line| line == token),
                "{id} lost {token}, written before a successful stop (seed {seed})"
            );
        }
    }
    drop(known);
    platform.teardown();
}
