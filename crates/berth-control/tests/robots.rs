//! Leases, idempotency keys, wait, events, exec, metadata, logs and hostile input.

mod common;

use std::time::Duration;

use berth_control::ApiClock;
use common::{assert_error, Harness, IMAGE};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};

const NONCE: &str = "fly-machine-lease-nonce";

#[tokio::test]
async fn leases_guard_mutations_until_released_or_expired() {
    let harness = Harness::start_with(|config| config.clock = ApiClock::manual()).await;
    let holder = harness
        .org(
            "lessee",
            json!({"rate_limits": {"update": {"per_second": 100.0, "burst": 100},
                                   "start": {"per_second": 100.0, "burst": 100}}}),
        )
        .await;
    let rival = harness.token("lessee", "rival").await;
    harness.app(&holder, "leased").await;
    let id = harness.machine(&holder, "leased", false).await;
    let base = format!("/v1/apps/leased/machines/{id}");
    let lease_url = format!("{base}/lease");

    let taken = harness
        .send(
            &holder,
            Method::POST,
            &lease_url,
            &[],
            Some(json!({"ttl": 10, "description": "ci"})),
        )
        .await;
    // Fly answers a take with 200 and the lease under `data`.
    assert_eq!(taken.status, 200, "{}", taken.body);
    let nonce = taken.body["data"]["nonce"]
        .as_str()
        .expect("nonce")
        .to_owned();
    assert_eq!(nonce.len(), 32);
    assert_eq!(taken.body["data"]["owner"], "lessee-bot");
    assert!(taken.body["data"]["expires_at"].is_i64());
    let (status, read) = harness.call(&rival, Method::GET, &lease_url, None).await;
    assert_eq!((status, &read["data"]["nonce"]), (200, &json!(nonce)));

    // Without the nonce every mutating call is refused, whoever makes it.
    let start = format!("{base}/start");
    for token in [&holder, &rival, &harness.admin] {
        let reply = harness.call(token, Method::POST, &start, None).await;
        assert_error(&reply, 409, "lease_held");
    }
    let reply = harness
        .call(
            &rival,
            Method::POST,
            &format!("{base}/metadata/k"),
            Some(json!({"value": "v"})),
        )
        .await;
    assert_error(&reply, 409, "lease_held");
    assert_error(
        &harness.call(&rival, Method::POST, &lease_url, None).await,
        409,
        "lease_held",
    );
    // A nonce of the wrong shape is bad input, not a conflict.
    for bad in [
        "abc",
        "ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ",
        "../../../../../../../../../../..",
    ] {
        let reply = harness
            .send(&holder, Method::POST, &start, &[(NONCE, bad)], None)
            .await;
        assert_eq!(reply.status, 400, "{}", reply.body);
        assert_eq!(reply.body["error"], "invalid_lease_nonce");
    }
    let wrong = "0123456789abcdef0123456789abcdef";
    let reply = harness
        .send(&holder, Method::POST, &start, &[(NONCE, wrong)], None)
        .await;
    assert_eq!(reply.status, 409);
    let reply = harness
        .send(&holder, Method::POST, &start, &[(NONCE, &nonce)], None)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);

    // Refresh with the nonce: same nonce, later expiry.
    harness.clock.advance(Duration::from_secs(8));
    let refreshed = harness
        .send(
            &holder,
            Method::POST,
            &lease_url,
            &[(NONCE, &nonce)],
            Some(json!({"ttl": 10})),
        )
        .await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    assert_eq!(refreshed.body["data"]["nonce"], json!(nonce));
    assert_eq!(
        refreshed.body["data"]["expires_at"].as_i64(),
        taken.body["data"]["expires_at"].as_i64().map(|at| at + 8)
    );
    assert_ne!(
        refreshed.body["data"]["version"],
        taken.body["data"]["version"]
    );
    harness.clock.advance(Duration::from_secs(8));
    assert_error(
        &harness
            .call(&rival, Method::POST, &format!("{base}/stop"), None)
            .await,
        409,
        "lease_held",
    );

    // Release needs the nonce.
    assert_error(
        &harness.call(&rival, Method::DELETE, &lease_url, None).await,
        409,
        "lease_held",
    );
    let released = harness
        .send(
            &holder,
            Method::DELETE,
            &lease_url,
            &[(NONCE, &nonce)],
            None,
        )
        .await;
    assert_eq!(released.status, 200, "{}", released.body);
    assert_error(
        &harness.call(&rival, Method::GET, &lease_url, None).await,
        404,
        "not_found",
    );
    assert_eq!(
        harness
            .call(&rival, Method::POST, &format!("{base}/stop"), None)
            .await
            .0,
        200
    );

    // A lease ends by its TTL on the clock.
    let taken = harness
        .send(
            &rival,
            Method::POST,
            &lease_url,
            &[],
            Some(json!({"ttl": 5})),
        )
        .await;
    assert_eq!(taken.status, 200);
    assert_ne!(
        taken.body["data"]["nonce"],
        json!(nonce),
        "a new lease, a new nonce"
    );
    assert_error(
        &harness.call(&holder, Method::POST, &start, None).await,
        409,
        "lease_held",
    );
    harness.clock.advance(Duration::from_secs(6));
    assert_error(
        &harness.call(&holder, Method::GET, &lease_url, None).await,
        404,
        "not_found",
    );
    assert_eq!(
        harness.call(&holder, Method::POST, &start, None).await.0,
        200
    );
    for bad in [
        json!({"ttl": 0}),
        json!({"ttl": 1e30}),
        json!({"ttl": 86401}),
        // An unknown field is told, not refused (fly_apps.rs); a wrong type is refused.
        json!({"ttl": "five"}),
    ] {
        let reply = harness
            .call(&holder, Method::POST, &lease_url, Some(bad))
            .await;
        assert_error(&reply, 400, "invalid_config");
    }
}

#[tokio::test]
async fn idempotency_keys_replay_the_first_answer_for_a_day() {
    let harness = Harness::start_with(|config| config.clock = ApiClock::manual()).await;
    let token = harness
        .org(
            "retry",
            json!({"rate_limits": {"create": {"per_second": 100.0, "burst": 100},
                                   "start": {"per_second": 100.0, "burst": 100},
                                   "stop": {"per_second": 100.0, "burst": 100},
                                   "destroy": {"per_second": 100.0, "burst": 100}}}),
        )
        .await;
    harness.app(&token, "once").await;
    let create = json!({"skip_launch": true, "config": {"image": IMAGE}});
    let machines = "/v1/apps/once/machines";
    let key = [("idempotency-key", "create-1")];
    let first = harness
        .send(&token, Method::POST, machines, &key, Some(create.clone()))
        .await;
    assert_eq!(first.status, 200, "{}", first.body);
    let again = harness
        .send(&token, Method::POST, machines, &key, Some(create.clone()))
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body, first.body);
    assert_eq!(
        again
            .headers
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let (_, list) = harness.call(&token, Method::GET, machines, None).await;
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(1),
        "one Machine, not two"
    );
    let other = json!({"skip_launch": true, "name": "else", "config": {"image": IMAGE}});
    let reused = harness
        .send(&token, Method::POST, machines, &key, Some(other.clone()))
        .await;
    assert_eq!(reused.status, 422, "{}", reused.body);
    assert_eq!(reused.body["error"], "idempotency_key_reused");
    // Keys belong to their token: another token's same key is another call.
    let second = harness.token("retry", "other-bot").await;
    let theirs = harness
        .send(&second, Method::POST, machines, &key, Some(other.clone()))
        .await;
    assert_eq!(theirs.status, 200, "{}", theirs.body);

    // Start, stop and destroy: the retry answers as the first call did, and does nothing.
    let id = first.body["id"].as_str().expect("id").to_owned();
    let base = format!("{machines}/{id}");
    let start_key = [("idempotency-key", "start-1")];
    let started = harness
        .send(
            &token,
            Method::POST,
            &format!("{base}/start"),
            &start_key,
            None,
        )
        .await;
    assert_eq!(started.status, 200, "{}", started.body);
    assert_eq!(
        harness
            .call(&token, Method::POST, &format!("{base}/stop"), None)
            .await
            .0,
        200
    );
    let replay = harness
        .send(
            &token,
            Method::POST,
            &format!("{base}/start"),
            &start_key,
            None,
        )
        .await;
    assert_eq!(replay.body, started.body);
    let (_, machine) = harness.call(&token, Method::GET, &base, None).await;
    assert_eq!(
        machine["state"], "stopped",
        "the replayed start started nothing"
    );
    let destroy_key = [("idempotency-key", "destroy-1")];
    // `force` is Berth's earlier name for Fly's `kill`, kept for one release.
    let url = format!("{base}?force=true");
    let gone = harness
        .send(&token, Method::DELETE, &url, &destroy_key, None)
        .await;
    assert_eq!(gone.status, 200);
    let gone_again = harness
        .send(&token, Method::DELETE, &url, &destroy_key, None)
        .await;
    assert_eq!((gone_again.status, gone_again.body), (200, gone.body));

    // After 24 hours the key is free again.
    harness.clock.advance(Duration::from_secs(24 * 3600 + 1));
    let later_body = json!({"skip_launch": true, "name": "later", "config": {"image": IMAGE}});
    let later = harness
        .send(&token, Method::POST, machines, &key, Some(later_body))
        .await;
    assert_eq!(later.status, 200, "{}", later.body);
    assert_ne!(later.body["id"], first.body["id"]);
    let long = "k".repeat(300);
    let reply = harness
        .send(
            &token,
            Method::POST,
            machines,
            &[("idempotency-key", long.as_str())],
            Some(create),
        )
        .await;
    assert_eq!(
        (reply.status, reply.body["error"].clone()),
        (400, json!("invalid_idempotency_key"))
    );
    // Durable: the keys live in the database, not in memory.
    if common::postgres::postgres_selected() {
        let stored: Vec<String> = sqlx::query_scalar("SELECT key FROM idempotency")
            .fetch_all(harness.control.store().pool())
            .await
            .expect("keys");
        assert!(stored.iter().any(|key| key == "create-1"), "{stored:?}");
    } else {
        let db = std::fs::read(harness.dir.path().join("control.db")).expect("db");
        let wal = std::fs::read(harness.dir.path().join("control.db-wal")).unwrap_or_default();
        let needle = b"create-1";
        assert!(db
            .windows(needle.len())
            .chain(wal.windows(needle.len()))
            .any(|w| w == needle));
    }
}

#[tokio::test]
async fn events_page_by_increasing_ids_with_sources_and_reasons() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "history").await;
    // Exits stay exits here: no policy restarts the Machine behind the test.
    let (status, created) = harness
        .call(
            &harness.admin,
            Method::POST,
            "/v1/apps/history/machines",
            Some(json!({"config": {"image": IMAGE, "restart": {"policy": "no"}}})),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_str().expect("id").to_owned();
    let base = format!("/v1/apps/history/machines/{id}");
    assert_eq!(
        harness
            .call(&harness.admin, Method::POST, &format!("{base}/stop"), None)
            .await
            .0,
        200
    );
    assert_eq!(
        harness
            .call(&harness.admin, Method::POST, &format!("{base}/start"), None)
            .await
            .0,
        200
    );
    assert!(harness.runtime.exit(&id, 3).await);
    let wait = format!("{base}/wait?state=stopped&timeout=10");
    assert_eq!(
        harness
            .call(&harness.admin, Method::GET, &wait, None)
            .await
            .0,
        200
    );
    assert_eq!(
        harness
            .call(&harness.admin, Method::POST, &format!("{base}/start"), None)
            .await
            .0,
        200
    );
    assert!(harness.runtime.oom_kill(&id).await);
    assert_eq!(
        harness
            .call(&harness.admin, Method::GET, &wait, None)
            .await
            .0,
        200
    );

    let (status, events) = harness
        .call(&harness.admin, Method::GET, &format!("{base}/events"), None)
        .await;
    assert_eq!(status, 200, "{events}");
    let events = events.as_array().expect("list").clone();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["type"].as_str().expect("type"))
        .collect();
    // Fly's event names in `type`; Berth's earlier ones stay in `kind` for one release.
    assert_eq!(
        kinds,
        ["launch", "start", "stop", "start", "exit", "start", "exit"]
    );
    assert_eq!(events[0]["kind"], "create");
    let ids: Vec<i64> = events
        .iter()
        .map(|e| e["id"].as_str().and_then(|id| id.parse().ok()).expect("id"))
        .collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
    assert!(events.iter().all(|e| e["timestamp"].is_i64()));
    assert_eq!(events[1]["source"], "user");
    assert_eq!(events[1]["berth_source"], "user");
    assert_eq!(events[2]["reason"], "killed");
    assert_eq!(events[4]["source"], "flyd");
    assert_eq!(events[4]["berth_source"], "system");
    assert_eq!(
        (events[4]["reason"].clone(), events[4]["exit_code"].clone()),
        (json!("exited"), json!(3))
    );
    assert_eq!(events[6]["reason"], "oom_killed");
    assert_eq!(events[6]["status"], "stopped");
    // Fly's clients read an exit from `request.exit_event`.
    assert_eq!(events[4]["request"]["exit_event"]["exit_code"], 3);
    assert_eq!(events[6]["request"]["exit_event"]["oom_killed"], true);
    // Berth's earlier names, kept for one release.
    assert_eq!(
        (events[6]["kind"].clone(), events[6]["state"].clone()),
        (json!("exit"), json!("stopped"))
    );

    let since = format!("{base}/events?since={}", ids[3]);
    let (_, page) = harness
        .call(&harness.admin, Method::GET, &since, None)
        .await;
    let page_ids: Vec<i64> = page
        .as_array()
        .expect("list")
        .iter()
        .map(|e| e["id"].as_str().and_then(|id| id.parse().ok()).expect("id"))
        .collect();
    assert_eq!(page_ids, ids[4..]);
    let (_, one) = harness
        .call(
            &harness.admin,
            Method::GET,
            &format!("{base}/events?limit=1"),
            None,
        )
        .await;
    assert_eq!(one.as_array().map(Vec::len), Some(1));
    for bad in [
        "?limit=0",
        "?limit=99999999999999999999",
        "?since=abc",
        "?bogus=1",
    ] {
        let reply = harness
            .call(
                &harness.admin,
                Method::GET,
                &format!("{base}/events{bad}"),
                None,
            )
            .await;
        assert_error(&reply, 400, "invalid_config");
    }
}

#[tokio::test]
async fn exec_caps_output_and_times_out() {
    let harness = Harness::start_with(|config| config.exec_max_output_bytes = 64).await;
    harness.app(&harness.admin, "shell").await;
    let id = harness.machine(&harness.admin, "shell", true).await;
    let exec = format!("/v1/apps/shell/machines/{id}/exec");
    let run = |body: Value| harness.call(&harness.admin, Method::POST, &exec, Some(body));
    let (status, out) = run(json!({"cmd": ["echo", "hello", "there"]})).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        out,
        json!({"exit_code": 0, "stdout": "hello there\n", "stderr": "", "truncated": false, "timed_out": false})
    );
    let (_, out) = run(json!({"cmd": ["cat"], "stdin": "fed in"})).await;
    assert_eq!(out["stdout"], "fed in");
    let (_, out) = run(json!({"cmd": ["yes"]})).await;
    assert_eq!(
        (
            out["stdout"].as_str().map(str::len),
            out["truncated"].clone()
        ),
        (Some(64), json!(true))
    );
    let (_, out) = run(json!({"cmd": ["exit", "7"]})).await;
    assert_eq!(out["exit_code"], 7);
    let (_, out) = run(json!({"cmd": ["sleep", "30"], "timeout": "50ms"})).await;
    assert_eq!(
        (out["exit_code"].clone(), out["timed_out"].clone()),
        (Value::Null, json!(true))
    );
    // Fly's one-string `cmd` is split at whitespace.
    let (status, out) = run(json!({"cmd": "echo  hi"})).await;
    assert_eq!(
        (status, out["stdout"].clone()),
        (200, json!("hi\n")),
        "{out}"
    );
    for bad in [
        json!({"cmd": []}),
        json!({"cmd": ["echo"], "timeout": 601}),
        json!({"cmd": ["echo", "a\u{0}b"]}),
        json!({"cmd": 7}),
    ] {
        assert_error(&run(bad).await, 400, "invalid_config");
    }
    // An unknown field is refused under strict mode (and ignored, with a warning, without).
    let strict = harness
        .send(
            &harness.admin,
            Method::POST,
            &exec,
            &[("berth-strict", "true")],
            Some(json!({"cmd": ["echo"], "tty": true})),
        )
        .await;
    assert_error(&(strict.status, strict.body), 400, "invalid_config");
    assert_eq!(
        harness
            .call(
                &harness.admin,
                Method::POST,
                &format!("/v1/apps/shell/machines/{id}/stop"),
                None
            )
            .await
            .0,
        200
    );
    assert_error(&run(json!({"cmd": ["echo"]})).await, 409, "invalid_state");
}

#[tokio::test]
async fn metadata_is_set_read_deleted_and_filters_lists() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "tagged").await;
    let db = harness.machine(&harness.admin, "tagged", true).await;
    let web = harness.machine(&harness.admin, "tagged", false).await;
    let h = &harness;
    let set = |id: &str, key: &str, value: &str| {
        let path = format!("/v1/apps/tagged/machines/{id}/metadata/{key}");
        let body = json!({"value": value});
        async move { h.call(&h.admin, Method::POST, &path, Some(body)).await }
    };
    assert_eq!(set(&db, "role", "db").await.0, 204);
    assert_eq!(set(&web, "role", "web").await.0, 204);
    assert_eq!(set(&web, "team", "blue").await.0, 204);
    let (_, meta) = harness
        .call(
            &harness.admin,
            Method::GET,
            &format!("/v1/apps/tagged/machines/{web}/metadata"),
            None,
        )
        .await;
    assert_eq!(meta, json!({"role": "web", "team": "blue"}));
    let (_, machine) = harness
        .call(
            &harness.admin,
            Method::GET,
            &format!("/v1/apps/tagged/machines/{db}"),
            None,
        )
        .await;
    assert_eq!(
        machine["state"], "started",
        "setting metadata does not restart the Machine"
    );
    let list = |query: &str| {
        let path = format!("/v1/apps/tagged/machines{query}");
        async move { h.call(&h.admin, Method::GET, &path, None).await }
    };
    let ids = |value: Value| -> Vec<String> {
        value
            .as_array()
            .expect("list")
            .iter()
            .map(|m| m["id"].as_str().expect("id").to_owned())
            .collect()
    };
    assert_eq!(ids(list("?metadata.role=db").await.1), [db]);
    assert_eq!(
        ids(list("?metadata.role=web&metadata.team=blue").await.1),
        [web.clone()].as_slice()
    );
    assert!(ids(list("?metadata.role=web&metadata.team=red").await.1).is_empty());
    assert_eq!(ids(list("").await.1).len(), 2);
    assert_error(&list("?role=db").await, 400, "invalid_config");
    let delete = harness
        .call(
            &harness.admin,
            Method::DELETE,
            &format!("/v1/apps/tagged/machines/{web}/metadata/team"),
            None,
        )
        .await;
    assert_eq!(delete.0, 204);
    let (_, meta) = harness
        .call(
            &harness.admin,
            Method::GET,
            &format!("/v1/apps/tagged/machines/{web}/metadata"),
            None,
        )
        .await;
    assert_eq!(meta, json!({"role": "web"}));
    // (`..` is resolved away by clients; the hostile-input test sends it raw.)
    for key in ["%00", "a%2Fb", "sp%20ace", &"k".repeat(65)] {
        let reply = set(&web, key, "v").await;
        assert_eq!(reply.0, 400, "{key}: {}", reply.1);
        assert_error(&reply, 400, "invalid_config");
    }
    assert_error(
        &set(&web, "big", &"v".repeat(2000)).await,
        400,
        "invalid_config",
    );
}

#[tokio::test]
async fn logs_follow_new_output_by_position_as_text_or_ndjson() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "chatty").await;
    let id = harness.machine(&harness.admin, "chatty", true).await;
    let log_dir = harness.agent.layout(&id).log_dir();
    // The shim's writer, as each run's shim opens it.
    let write = |text: &str| {
        let mut writer =
            berth_runtime::logs::LogWriter::open(&log_dir, 1024 * 1024).expect("writer");
        writer.write(text.as_bytes()).expect("write");
    };
    write("one\ntwo\n");
    let logs = format!("{}/v1/apps/chatty/machines/{id}/logs", harness.url);
    let text = harness
        .http
        .get(&logs)
        .bearer_auth(&harness.admin)
        .send()
        .await
        .expect("logs");
    assert_eq!(text.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(text.text().await.expect("text"), "one\ntwo\n");

    let response = harness
        .http
        .get(format!("{logs}?follow=true&format=ndjson"))
        .bearer_auth(&harness.admin)
        .send()
        .await
        .expect("follow");
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let mut stream = response.bytes_stream();
    let mut buffered = Vec::new();
    let mut lines: Vec<Value> = Vec::new();
    let mut next_line = async |lines: &mut Vec<Value>, buffered: &mut Vec<u8>| loop {
        if let Some(end) = buffered.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffered.drain(..=end).collect();
            lines.push(serde_json::from_slice(&line).expect("ndjson line"));
            return;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a line within 10 s")
            .expect("stream open")
            .expect("chunk");
        buffered.extend_from_slice(&chunk);
    };
    next_line(&mut lines, &mut buffered).await;
    next_line(&mut lines, &mut buffered).await;
    assert_eq!(lines[0], json!({"position": 0, "next": 4, "line": "one"}));
    assert_eq!(lines[1], json!({"position": 4, "next": 8, "line": "two"}));
    // New output arrives on the open response, across a stop and a start.
    let base = format!("/v1/apps/chatty/machines/{id}");
    assert_eq!(
        harness
            .call(&harness.admin, Method::POST, &format!("{base}/stop"), None)
            .await
            .0,
        200
    );
    assert_eq!(
        harness
            .call(&harness.admin, Method::POST, &format!("{base}/start"), None)
            .await
            .0,
        200
    );
    write("three\n");
    next_line(&mut lines, &mut buffered).await;
    assert_eq!(
        lines[2],
        json!({"position": 8, "next": 14, "line": "three"})
    );

    // since= continues from a line's next.
    let since = harness
        .http
        .get(format!("{logs}?since=4"))
        .bearer_auth(&harness.admin)
        .send()
        .await
        .expect("since");
    assert_eq!(since.text().await.expect("text"), "two\nthree\n");
    let tail = harness
        .http
        .get(format!("{logs}?max_bytes=6"))
        .bearer_auth(&harness.admin)
        .send()
        .await
        .expect("tail");
    assert_eq!(tail.text().await.expect("text"), "three\n");
    for bad in [
        "?follow=maybe",
        "?format=xml",
        "?since=-1",
        "?max_bytes=99999999999999999999999",
    ] {
        let reply = harness
            .call(
                &harness.admin,
                Method::GET,
                &format!("{base}/logs{bad}"),
                None,
            )
            .await;
        assert_error(&reply, 400, "invalid_config");
    }
}

#[tokio::test]
async fn hostile_input_gets_json_errors_never_a_500() {
    let harness = Harness::start().await;
    harness.app(&harness.admin, "target").await;
    let id = harness.machine(&harness.admin, "target", true).await;
    let base = format!("/v1/apps/target/machines/{id}");
    let raw = |method: Method, path: String, body: Vec<u8>| {
        let request = harness
            .http
            .request(method, format!("{}{path}", harness.url))
            .bearer_auth(&harness.admin)
            .header("content-type", "application/json")
            // Unknown fields are refused only in strict mode, which this hostile input uses.
            .header("berth-strict", "true")
            .body(body)
            .send();
        async move {
            let response = request.await.expect("send");
            let status = response.status().as_u16();
            let body: Value = response.json().await.expect("a JSON error body");
            (status, body)
        }
    };
    let json_posts = [
        "/v1/orgs".to_owned(),
        "/v1/tokens".to_owned(),
        "/v1/apps".to_owned(),
        "/v1/apps/target/machines".to_owned(),
        base.clone(),
        format!("{base}/exec"),
        format!("{base}/lease"),
        format!("{base}/stop"),
        format!("{base}/metadata/k"),
    ];
    for path in &json_posts {
        let reply = raw(Method::POST, path.clone(), vec![b' '; 2 * 1024 * 1024]).await;
        assert_error(&reply, 413, "payload_too_large");
        let reply = raw(Method::POST, path.clone(), vec![b'{', 0xff, 0xfe, b'}']).await;
        assert_error(&reply, 400, "invalid_config");
        let reply = raw(
            Method::POST,
            path.clone(),
            br#"{"surprise": 1e999999}"#.to_vec(),
        )
        .await;
        assert_error(&reply, 400, "invalid_config");
        let reply = raw(
            Method::POST,
            path.clone(),
            br#"{"unknown_field": true}"#.to_vec(),
        )
        .await;
        assert_error(&reply, 400, "invalid_config");
    }
    let reply = raw(
        Method::PUT,
        "/v1/orgs/personal/limits".into(),
        br#"{"quotas":{"max_cpus":184467440737095516150}}"#.to_vec(),
    )
    .await;
    assert_error(&reply, 400, "invalid_config");
    // Path segments with .., NUL or undecodable bytes name nothing.
    for path in [
        "/v1/apps/..".to_owned(),
        "/v1/apps/%2E%2E/machines".to_owned(),
        "/v1/apps/target/machines/..%2F..%2Fetc".to_owned(),
        "/v1/apps/target%00/machines".to_owned(),
        format!("{base}%00"),
        "/v1/apps/%ff%fe/machines".to_owned(),
        "/v1/orgs/..".to_owned(),
        "/v1/orgs/%00".to_owned(),
        "/v1/tokens/..%2F..".to_owned(),
        format!("/v1/apps/target/machines/{id}/%2E%2E/wait"),
    ] {
        for method in [Method::GET, Method::POST, Method::DELETE] {
            let reply = raw(method.clone(), path.clone(), b"{}".to_vec()).await;
            assert!(
                matches!(reply.0, 400 | 404 | 405),
                "{method} {path}: {} {}",
                reply.0,
                reply.1
            );
            assert!(reply.1["error"].is_string(), "{method} {path}: {}", reply.1);
        }
    }
    // Literal `..` as a raw client would send it, which URL libraries never do.
    for path in [
        "/v1/apps/../machines".to_owned(),
        format!("/v1/apps/target/machines/{id}/metadata/.."),
        format!("/v1/apps/target/machines/../machines/{id}/start"),
        "/v1/orgs/../tokens".to_owned(),
    ] {
        let (status, body) = raw_http(&harness, &format!("POST {path}")).await;
        assert!(matches!(status, 400 | 404 | 405), "{path}: {status} {body}");
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    // Nothing above changed the Machine.
    let (_, machine) = harness.call(&harness.admin, Method::GET, &base, None).await;
    assert_eq!(machine["state"], "started");
}

/// One request written by hand on a TCP socket: `request_line` is `METHOD PATH`.
async fn raw_http(harness: &Harness, request_line: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = harness.url.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let request = format!(
        "{request_line} HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}",
        harness.admin
    );
    socket.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    socket.read_to_end(&mut answer).await.expect("read");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    (
        status,
        serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())),
    )
}
