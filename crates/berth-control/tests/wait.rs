//! Wait is driven by notices, not polling: a thousand parked waiters cost no CPU. Alone
//! in its test binary, so no other test's work is counted.

mod common;

use std::time::Duration;

use common::{assert_error, Harness};
use reqwest::Method;
use serde_json::{json, Value};

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("stat");
    let fields: Vec<&str> = stat[stat.rfind(')').expect(")") + 2..].split(' ').collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf only reads a system constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / per_second
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_waiters_cost_no_cpu_and_all_wake_on_the_change() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "waited").await;
    let id = harness.machine(&harness.admin, "waited", true).await;
    let base = format!("/v1/apps/waited/machines/{id}");

    // Reached already: answers at once. Not reached in time: 408.
    let (status, body) = harness
        .call(
            &harness.admin,
            Method::GET,
            &format!("{base}/wait?state=started"),
            None,
        )
        .await;
    assert_eq!((status, body["state"].clone()), (200, json!("started")));
    let reply = harness
        .call(
            &harness.admin,
            Method::GET,
            &format!("{base}/wait?state=stopped&timeout=0"),
            None,
        )
        .await;
    assert_error(&reply, 408, "timeout");
    let reply = harness
        .call(
            &harness.admin,
            Method::GET,
            &format!("{base}/wait?state=stopped&timeout=61"),
            None,
        )
        .await;
    assert_error(&reply, 400, "invalid_config");
    let reply = harness
        .call(
            &harness.admin,
            Method::GET,
            &format!("{base}/wait?state=sleeping"),
            None,
        )
        .await;
    assert_error(&reply, 400, "invalid_config");

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let mut waiters = Vec::new();
    for _ in 0..1000 {
        let request = client
            .get(format!(
                "{}{base}/wait?state=stopped&timeout=60",
                harness.url
            ))
            .bearer_auth(&harness.admin)
            .send();
        waiters.push(tokio::spawn(async move {
            let response = request.await.expect("wait");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("json"))
        }));
    }
    while harness.control.waiting() < 1000 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Each waiter reads the Machine once when it arrives; let that settle, then the
    // parked waiters must cost nothing: a polling wait would keep the CPU busy.
    let mut quiet = false;
    for _ in 0..20 {
        let before = cpu_seconds();
        tokio::time::sleep(Duration::from_secs(1)).await;
        if cpu_seconds() - before < 0.05 {
            quiet = true;
            break;
        }
    }
    assert!(
        quiet,
        "the process never went idle with 1000 waiters parked"
    );
    let before = cpu_seconds();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_cpu = cpu_seconds() - before;
    assert!(
        idle_cpu < 0.1,
        "1000 parked waiters used {idle_cpu:.3} s of CPU in 2 s"
    );
    assert_eq!(harness.control.waiting(), 1000, "all still waiting");

    let (status, _) = harness
        .call(&harness.admin, Method::POST, &format!("{base}/stop"), None)
        .await;
    assert_eq!(status, 200);
    for waiter in waiters {
        let (status, body) = waiter.await.expect("task");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["state"], "stopped");
    }
    assert_eq!(harness.control.waiting(), 0);

    // version pins the version; destroyed is a state one can wait for.
    let (_, machine) = harness.call(&harness.admin, Method::GET, &base, None).await;
    let instance = machine["instance_id"]
        .as_str()
        .expect("instance")
        .to_owned();
    let url = format!("{base}/wait?state=stopped&version={instance}&timeout=1");
    assert_eq!(
        harness
            .call(&harness.admin, Method::GET, &url, None)
            .await
            .0,
        200
    );
    let url = format!("{base}/wait?state=stopped&version=01OTHER&timeout=0");
    assert_eq!(
        harness
            .call(&harness.admin, Method::GET, &url, None)
            .await
            .0,
        408
    );
    let destroyed = {
        let request = harness
            .http
            .get(format!(
                "{}{base}/wait?state=destroyed&timeout=30",
                harness.url
            ))
            .bearer_auth(&harness.admin)
            .send();
        tokio::spawn(async move { request.await.expect("wait").status().as_u16() })
    };
    while harness.control.waiting() < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        harness
            .call(&harness.admin, Method::DELETE, &base, None)
            .await
            .0,
        200
    );
    assert_eq!(destroyed.await.expect("task"), 200);
}
