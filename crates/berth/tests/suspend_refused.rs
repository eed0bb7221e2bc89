//! End to end: a gVisor Machine holding an open TCP connection from outside cannot be
//! checkpointed by this runsc (Debian 12's 20221219: netstack saves no connected
//! endpoint, and its sandbox ends in the attempt). The suspend answers 409
//! `suspend_connections_open`, the Machine is never left `suspending` but settles
//! `stopped`, and its files are kept: a start brings it back.

mod common;

use std::time::Duration;

use common::{busybox_image, Platform};
use reqwest::Method;
use serde_json::json;

const SERVE: &str = "mkdir -p /www && echo hello > /www/index.html && \
                     httpd -p 8080 -h /www; exec sleep 100000";

fn exec(platform: &Platform, id: &str, command: &str) -> String {
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/held/machines/{id}/exec"),
        Some(json!({"command": ["/bin/sh", "-c", command]})),
    );
    assert_eq!(status, 200, "{body}");
    body["stdout"].as_str().unwrap_or_default().to_owned()
}

// Seen to fail before the agent looked at the run after a failed checkpoint: the Machine
// stayed `suspending` until the agent restarted, and every later call on it was refused.
#[test]
fn a_suspend_refused_for_an_open_connection_says_why_and_leaves_no_half_state() {
    if !std::path::Path::new("/usr/bin/runsc").exists() {
        assert!(
            std::env::var_os("BERTH_REQUIRE_RUNSC").is_none(),
            "BERTH_REQUIRE_RUNSC is set but runsc is missing"
        );
        eprintln!("SKIPPED: runsc is not installed (Debian's runsc package)");
        return;
    }
    let platform = Platform::start();
    platform.import(busybox_image(), "demo/busybox:1");
    platform.cli_ok(&["app", "create", "held"]);
    let (status, body) = platform.call(
        Method::POST,
        "/v1/apps/held/machines",
        Some(
            json!({"config": {"image": "demo/busybox:1", "runtime": "gvisor",
            "restart": {"policy": "no"},
            "init": {"cmd": ["/bin/sh", "-c", SERVE]}}}),
        ),
    );
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    let address: std::net::Ipv6Addr = body["private_ip"]
        .as_str()
        .expect("private_ip")
        .parse()
        .expect("an IPv6 address");
    let target = std::net::SocketAddr::from((address, 8080));
    let mut held = None;
    platform.wait_for("httpd in the Machine", Duration::from_secs(30), || {
        held = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)).ok();
        held.is_some()
    });
    exec(&platform, &id, "echo kept > /marker");

    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/held/machines/{id}/suspend"),
        None,
    );
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "suspend_connections_open", "{body}");
    drop(held);
    // Never left half-way: it settles as its run did. This runsc's sandbox ends in the
    // failed checkpoint, a moment after the answer, and the Machine (restart policy
    // `no`) is then `stopped`.
    platform.wait_for("the Machine to settle", Duration::from_secs(30), || {
        platform.machine("held", &id).state.as_str() == "stopped"
    });
    let (status, body) = platform.call(
        Method::POST,
        &format!("/v1/apps/held/machines/{id}/start"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(exec(&platform, &id, "cat /marker"), "kept\n");
    platform.teardown();
}
