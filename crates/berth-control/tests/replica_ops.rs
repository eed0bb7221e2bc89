//! Two control plane replicas on one PostgreSQL database, in one test process: tokens and
//! limits changed through one are seen by the other at once (and after a lost listener),
//! rate limits are split between them, an idempotent call or a move in flight on a live
//! replica is left to it while a dead one's is taken over, a drain is shown by both and
//! taken over from a dead replica, and one replica at a time ingests a worker's usage
//! journal.
//!
//! These run on a private PostgreSQL whatever `BERTH_TEST_DATABASE` says: replicas need
//! it. The last test is SQLite's: one process per file.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_agent::WorkerService;
use berth_control::store::{ControlStore, Database};
use berth_control::usage::{self, Pass};
use berth_control::{ControlConfig, ControlPlane};
use berth_image::{ImageStore, UnpackLimits};
use common::{assert_error, postgres, Harness};
use reqwest::Method;
use serde_json::{json, Value};
use sqlx::Row;

/// A second replica beside `first`: the same database and tokens, and the first one's
/// worker, served on its own port.
struct Replica {
    _control: Arc<ControlPlane>,
    url: String,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Replica {
    async fn beside(first: &Harness, database: &str) -> Replica {
        let images = Arc::new(
            ImageStore::open(&first.dir.path().join("images"), UnpackLimits::default())
                .expect("images"),
        );
        let data_dir = first.dir.path().join("replica-b");
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let mut config = ControlConfig::new(data_dir, first.admin.clone(), "join".into());
        config.database = Some(Database::Postgres(database.to_owned()));
        let control = ControlPlane::open(config, images)
            .await
            .expect("second replica");
        let service: Arc<dyn WorkerService> = Arc::new(first.agent.clone());
        control
            .add_local_worker(
                berth_api::RegisterWorker {
                    name: "local".into(),
                    region: "test".into(),
                    url: String::new(),
                    capacity: berth_api::Resources {
                        cpus: 1024,
                        memory_mb: 1 << 20,
                        disk_mb: 1 << 30,
                    },
                    runtimes: first.agent.runtimes(),
                },
                service,
            )
            .await
            .expect("worker");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let router = control.router();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Replica {
            _control: control,
            url,
            server,
        }
    }
}

/// Two replicas on a fresh database.
async fn two_replicas() -> (Harness, Replica, String) {
    let database = postgres::fresh_database().await;
    let url = database.clone();
    let first =
        Harness::start_with(move |config| config.database = Some(Database::Postgres(url))).await;
    let second = Replica::beside(&first, &database).await;
    (first, second, database)
}

async fn call(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut request = http
        .request(method, format!("{base}{path}"))
        .bearer_auth(token);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        headers,
    )
}

/// Waits until both replicas have stamped their rows and counted each other.
async fn until_both_live(store: &ControlStore) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM replicas")
            .fetch_one(store.pool())
            .await
            .expect("replicas");
        if rows >= 2 {
            // One more heartbeat each, so each has counted the other.
            tokio::time::sleep(Duration::from_millis(2200)).await;
            return;
        }
        assert!(Instant::now() < deadline, "the replicas never both stamped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checked against the code before the change: replica B answered 401 to the token made
/// through A (its cache was loaded at start), and kept accepting the token revoked
/// through A, and kept the limits it had loaded.
#[tokio::test]
async fn tokens_and_limits_changed_through_one_replica_hold_on_the_other_at_once() {
    let (a, b, _) = two_replicas().await;
    let http = reqwest::Client::new();
    // Room for the polling below.
    let token = a
        .org(
            "acme",
            json!({"rate_limits": {"read": {"per_second": 1000.0, "burst": 1000}}}),
        )
        .await;
    // Made through A, accepted by B straight away.
    let (status, body, _) = call(&http, &b.url, &token, Method::GET, "/v1/apps", &[], None).await;
    assert_eq!(status, 200, "{body}");
    // Revoked through A, refused by B as soon as the notice lands.
    let id = token
        .strip_prefix("bt_")
        .and_then(|rest| rest.split_once('_'))
        .map(|(id, _)| id.to_owned())
        .expect("token id");
    let (status, body) = a
        .call(&a.admin, Method::DELETE, &format!("/v1/tokens/{id}"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let revoked = Instant::now();
    loop {
        let (status, _, _) = call(&http, &b.url, &token, Method::GET, "/v1/apps", &[], None).await;
        if status == 401 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            revoked.elapsed() < Duration::from_millis(500),
            "replica B still accepts a token revoked through A"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Limits set through A are in force on B.
    let (status, body) = a
        .call(
            &a.admin,
            Method::PUT,
            "/v1/orgs/acme/limits",
            Some(json!({"quotas": {"max_machines": 3}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let changed = Instant::now();
    loop {
        let (_, org, _) = call(
            &http,
            &b.url,
            &a.admin,
            Method::GET,
            "/v1/orgs/acme",
            &[],
            None,
        )
        .await;
        if org["limits"]["quotas"]["max_machines"] == 3 {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_millis(500),
            "replica B kept the old limits: {org}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Checked against the code before the change: each replica admitted the whole burst of
/// 10, 20 in all.
#[tokio::test]
async fn rate_limits_are_split_between_the_live_replicas() {
    let (a, b, _) = two_replicas().await;
    let http = reqwest::Client::new();
    let token = a
        .org(
            "acme",
            json!({"rate_limits": {"read": {"per_second": 0.001, "burst": 10}}}),
        )
        .await;
    until_both_live(a.control.store()).await;
    let mut admitted = 0;
    for base in [&a.url, &b.url] {
        for _ in 0..20 {
            let (status, body, _) =
                call(&http, base, &token, Method::GET, "/v1/apps", &[], None).await;
            if status == 429 {
                assert_eq!(body["error"], "rate_limited", "{body}");
                break;
            }
            assert_eq!(status, 200, "{body}");
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10, "the org's burst, over both replicas together");
}

/// An unfinished claim of a live replica answers `idempotency_key_in_use`; once that
/// replica is gone, the next call takes the claim over, keeping its first claim time, and
/// a retry then gets that call's answer. Checked against the code before the change: a
/// replica opening marked the live replica's claim abandoned and ran the call beside it,
/// and a dead replica's claim (not abandoned by a restart) answered `in_use` for a day.
#[tokio::test]
async fn a_claim_is_left_to_its_live_replica_and_taken_over_from_a_dead_one() {
    let database = postgres::fresh_database().await;
    let url = database.clone();
    let a =
        Harness::start_with(move |config| config.database = Some(Database::Postgres(url))).await;
    a.app(&a.admin, "web").await;
    let id = a.machine(&a.admin, "web", true).await;
    let stop = format!("/v1/apps/web/machines/{id}/stop");
    let key = [("Idempotency-Key", "stop-once")];
    let first = a.send(&a.admin, Method::POST, &stop, &key, None).await;
    assert_eq!(first.status, 200, "{}", first.body);
    // As if the call were still running on a live replica `elsewhere`.
    let pool = a.control.store().pool();
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_millis(),
    )
    .expect("ms");
    sqlx::query("INSERT INTO replicas (id, seen_ms) VALUES ('elsewhere', $1)")
        .bind(now)
        .execute(pool)
        .await
        .expect("replica");
    sqlx::query("UPDATE idempotency SET status = NULL, body = NULL, replica = 'elsewhere'")
        .execute(pool)
        .await
        .expect("claim");
    let claimed_at: i64 = sqlx::query_scalar("SELECT created_at_ms FROM idempotency")
        .fetch_one(pool)
        .await
        .expect("claim time");
    // A replica opening now leaves it alone, and so do both replicas' calls.
    let b = Replica::beside(&a, &database).await;
    let http = reqwest::Client::new();
    for base in [&a.url, &b.url] {
        let (status, body, _) = call(&http, base, &a.admin, Method::POST, &stop, &key, None).await;
        assert_error(&(status, body), 409, "idempotency_key_in_use");
    }
    // `elsewhere` dies: its last stamp ages past liveness.
    sqlx::query("UPDATE replicas SET seen_ms = 0 WHERE id = 'elsewhere'")
        .execute(pool)
        .await
        .expect("dead");
    let (status, taken_over, headers) =
        call(&http, &b.url, &a.admin, Method::POST, &stop, &key, None).await;
    assert_eq!(status, 200, "{taken_over}");
    assert!(headers.get("idempotent-replayed").is_none());
    let row = sqlx::query("SELECT created_at_ms, replica, status FROM idempotency")
        .fetch_one(pool)
        .await
        .expect("claim");
    assert_eq!(
        row.get::<i64, _>(0),
        claimed_at,
        "the first claim time is kept"
    );
    assert_eq!(row.get::<Option<i64>, _>(2), Some(200));
    assert_ne!(
        row.get::<Option<String>, _>(1).as_deref(),
        Some("elsewhere")
    );
    // A retry through either replica gets that answer again.
    for base in [&a.url, &b.url] {
        let (status, body, headers) =
            call(&http, base, &a.admin, Method::POST, &stop, &key, None).await;
        assert_eq!((status, &body), (200, &taken_over));
        assert_eq!(
            headers
                .get("idempotent-replayed")
                .and_then(|v| v.to_str().ok()),
            Some("true")
        );
    }
}

/// While one replica's pass over a worker's journal runs, another's pass of the same
/// worker answers `Busy` without pulling, and a pass of another worker runs. Checked by
/// taking the lock out: the second pass pulled.
#[tokio::test]
async fn one_replica_at_a_time_pulls_a_workers_journal() {
    let database = Database::Postgres(postgres::fresh_database().await);
    let a = ControlStore::connect(&database).await.expect("a");
    let b = ControlStore::connect(&database).await.expect("b");
    let (inside_tx, inside) = tokio::sync::oneshot::channel();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let holding = tokio::spawn({
        let a = a.clone();
        async move {
            usage::ingest_pass(&a, "w1", |after| async move {
                assert_eq!(after, 0);
                let _ = inside_tx.send(());
                let _ = released.await;
                Ok(Vec::new())
            })
            .await
        }
    });
    inside.await.expect("first pass pulling");
    let pulled = std::sync::atomic::AtomicBool::new(false);
    let second = usage::ingest_pass(&b, "w1", |_| async {
        pulled.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(Vec::new())
    })
    .await
    .expect("second pass");
    assert_eq!(second, Pass::Busy);
    assert!(!pulled.load(std::sync::atomic::Ordering::SeqCst));
    let other = usage::ingest_pass(&b, "w2", |_| async { Ok(Vec::new()) })
        .await
        .expect("another worker");
    assert_eq!(other, Pass::Pulled(0));
    release.send(()).expect("release");
    assert_eq!(
        holding.await.expect("task").expect("first pass"),
        Pass::Pulled(0)
    );
    // Free again once the first pass is over.
    let again = usage::ingest_pass(&b, "w1", |_| async { Ok(Vec::new()) })
        .await
        .expect("after");
    assert_eq!(again, Pass::Pulled(0));
}

/// A usage report through B while A's pass over the worker's journal runs: B waits for
/// that pass (bounded by `REPORT_WAIT`, then 503 `usage_busy`) and then pulls itself, so
/// a Machine journaled before the report is in it. Checked against the code before the
/// change: B skipped the busy worker and answered 200 without the Machine, both times.
#[tokio::test]
async fn a_usage_report_waits_for_another_replicas_pass_and_misses_nothing() {
    let (a, b, _) = two_replicas().await;
    let http = reqwest::Client::new();
    let fast = json!({"per_second": 1000.0, "burst": 1000});
    let token = a
        .org(
            "metered",
            json!({"rate_limits": {"read": fast, "create": fast}}),
        )
        .await;
    a.app(&token, "metered-app").await;
    // A's pass over the worker, pulling nothing, held until released.
    let (inside_tx, inside) = tokio::sync::oneshot::channel();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let holding = tokio::spawn({
        let store = a.control.store().clone();
        async move {
            usage::ingest_pass(&store, "local", |_| async move {
                let _ = inside_tx.send(());
                let _ = released.await;
                Ok(Vec::new())
            })
            .await
        }
    });
    inside.await.expect("A's pass pulling");
    let id = a.machine(&token, "metered-app", false).await;
    let report = || {
        call(
            &http,
            &b.url,
            &token,
            Method::GET,
            "/v1/orgs/metered/usage?group_by=machine",
            &[],
            None,
        )
    };

    // A pass that outlasts the wait: a retryable refusal in bounded time, not a report
    // without the Machine.
    let clock = Instant::now();
    let (status, body, headers) = report().await;
    let waited = clock.elapsed();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "usage_busy", "{body}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    assert!(
        waited >= usage::REPORT_WAIT - Duration::from_millis(100)
            && waited < usage::REPORT_WAIT + Duration::from_secs(2),
        "answered after {waited:?}"
    );

    // A pass that ends while B waits: B then pulls and reports the Machine.
    let releasing = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = release.send(());
    });
    let (status, body, _) = report().await;
    assert_eq!(status, 200, "{body}");
    let rows = body["rows"].as_array().expect("rows");
    assert!(
        rows.iter().any(|row| row["machine"] == id.as_str()),
        "{id} is missing: {body}"
    );
    releasing.await.expect("release");
    assert_eq!(
        holding.await.expect("task").expect("A's pass"),
        Pass::Pulled(0)
    );
}

/// A move another live replica runs is left to it; once that replica is gone, the
/// settling loop of a live one takes the move over and settles it (here: rolls it back,
/// for it never reached its cutover). Checked against the code before the change: the
/// settling loop rolled the live replica's move back from under it within one round.
#[tokio::test]
async fn the_settling_loop_leaves_a_live_replicas_move_alone_and_takes_over_a_dead_ones() {
    let (a, b, _) = two_replicas().await;
    a.app(&a.admin, "web").await;
    let id = a.machine(&a.admin, "web", false).await;
    let pool = a.control.store().pool();
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_millis(),
    )
    .expect("ms");
    sqlx::query("INSERT INTO replicas (id, seen_ms) VALUES ('elsewhere', $1)")
        .bind(now + 60_000)
        .execute(pool)
        .await
        .expect("replica");
    sqlx::query(
        "INSERT INTO migrations (machine_id, app, source, dest, grant_token, running, phase,
         started_ms, replica) VALUES ($1, 'web', 'local', 'local', 'grant', 0, 'copying', $2,
         'elsewhere')",
    )
    .bind(&id)
    .bind(now)
    .execute(pool)
    .await
    .expect("move");
    let moving = || async {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT replica FROM migrations WHERE machine_id = $1",
        )
        .bind(&id)
        .fetch_optional(pool)
        .await
        .expect("read")
    };
    // Two rounds of both replicas' settling loops.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(moving().await, Some(Some("elsewhere".to_owned())));
    // A second move of it, through either replica, is refused while it runs.
    let http = reqwest::Client::new();
    for base in [&a.url, &b.url] {
        let (status, body, _) = call(
            &http,
            base,
            &a.admin,
            Method::POST,
            &format!("/v1/apps/web/machines/{id}/migrate"),
            &[],
            Some(json!({})),
        )
        .await;
        assert_error(&(status, body), 409, "machine_migrating");
    }
    sqlx::query("UPDATE replicas SET seen_ms = 0 WHERE id = 'elsewhere'")
        .execute(pool)
        .await
        .expect("dead");
    let deadline = Instant::now() + Duration::from_secs(10);
    while moving().await.is_some() {
        assert!(
            Instant::now() < deadline,
            "the dead replica's move was never settled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checked against the code from before drains were recorded: B showed no drain for the
/// worker A's peer was draining and began a second one (202), and the dead replica's
/// drain was never finished by anyone.
#[tokio::test]
async fn a_drain_is_shown_by_every_replica_and_taken_over_from_a_dead_one() {
    let (a, b, _) = two_replicas().await;
    a.app(&a.admin, "web").await;
    let first = a.machine(&a.admin, "web", false).await;
    let second = a.machine(&a.admin, "web", false).await;
    let pool = a.control.store().pool();
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_millis(),
    )
    .expect("ms");
    sqlx::query("INSERT INTO replicas (id, seen_ms) VALUES ('elsewhere', $1)")
        .bind(now + 60_000)
        .execute(pool)
        .await
        .expect("replica");
    let progress = json!({"state": "draining", "started_at": "2026-01-01T00:00:00Z",
        "total": 2, "left": 2, "moving": 0, "moved": 0, "failed": []});
    sqlx::query(
        "INSERT INTO drains (worker, replica, state, progress)
         VALUES ('local', 'elsewhere', 'draining', $1)",
    )
    .bind(progress.to_string())
    .execute(pool)
    .await
    .expect("drain");
    let http = reqwest::Client::new();
    let drain_through = |base: String| {
        let http = http.clone();
        let token = a.admin.clone();
        async move {
            let (status, worker, _) = call(
                &http,
                &base,
                &token,
                Method::GET,
                "/v1/workers/local",
                &[],
                None,
            )
            .await;
            assert_eq!(status, 200, "{worker}");
            worker["drain"].clone()
        }
    };
    for base in [&a.url, &b.url] {
        assert_eq!(drain_through(base.clone()).await, progress);
        let (status, body, _) = call(
            &http,
            base,
            &a.admin,
            Method::POST,
            "/v1/workers/local/drain",
            &[],
            None,
        )
        .await;
        assert_error(&(status, body), 409, "drain_running");
    }
    // Two rounds of both settling loops: a live replica's drain is left to it.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(drain_through(b.url.clone()).await, progress);

    sqlx::query("UPDATE replicas SET seen_ms = 0 WHERE id = 'elsewhere'")
        .execute(pool)
        .await
        .expect("dead");
    let deadline = Instant::now() + Duration::from_secs(20);
    let ended = loop {
        let drain = drain_through(b.url.clone()).await;
        if drain["state"] != "draining" {
            break drain;
        }
        assert!(
            Instant::now() < deadline,
            "the dead replica's drain never ended: {drain}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // One worker: nowhere to go, and each Machine says so.
    assert_eq!(ended["state"], "incomplete", "{ended}");
    let mut failed: Vec<&str> = ended["failed"]
        .as_array()
        .expect("failed")
        .iter()
        .map(|failure| {
            assert_eq!(failure["error"], "insufficient_capacity", "{ended}");
            failure["machine"].as_str().expect("machine")
        })
        .collect();
    failed.sort_unstable();
    let mut expected = vec![first.as_str(), second.as_str()];
    expected.sort_unstable();
    assert_eq!(failed, expected, "{ended}");
    assert_eq!(drain_through(a.url.clone()).await, ended);
}

/// A replica whose listener lost its connection misses the notices sent meanwhile, so it
/// reads its caches again once it listens again. Checked by not reading them again: B
/// kept accepting the token revoked while its listener was away.
#[tokio::test]
async fn a_replica_whose_listener_dropped_reads_its_caches_again() {
    let (a, b, _) = two_replicas().await;
    let http = reqwest::Client::new();
    let token = a
        .org(
            "acme",
            json!({"rate_limits": {"read": {"per_second": 1000.0, "burst": 1000}}}),
        )
        .await;
    let (status, _, _) = call(&http, &b.url, &token, Method::GET, "/v1/apps", &[], None).await;
    assert_eq!(status, 200);
    // Both replicas' listeners lose their connections; the revocation's notice goes out
    // before they are back.
    let pool = a.control.store().pool();
    let dropped: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'LISTEN%') AS ended",
    )
    .fetch_one(pool)
    .await
    .expect("terminate");
    assert_eq!(dropped, 2, "one listener per replica");
    let id = token
        .strip_prefix("bt_")
        .and_then(|rest| rest.split_once('_'))
        .map(|(id, _)| id.to_owned())
        .expect("token id");
    let (status, body) = a
        .call(&a.admin, Method::DELETE, &format!("/v1/tokens/{id}"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, _) = call(&http, &b.url, &token, Method::GET, "/v1/apps", &[], None).await;
        if status == 401 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            Instant::now() < deadline,
            "replica B never learned of the revocation it missed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A SQLite file has one process: the row of the run before a restart is dropped, not
/// counted as a live replica that halves the rate limits for its last seconds. Checked
/// by keeping it: 5 of the burst of 10 passed.
#[tokio::test]
async fn a_restarted_sqlite_control_plane_counts_no_earlier_run_as_a_replica() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("control.db");
    let earlier = ControlStore::open(&path).await.expect("earlier run");
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_millis(),
    )
    .expect("ms");
    sqlx::query("INSERT INTO replicas (id, seen_ms) VALUES ('earlier-run', $1)")
        .bind(now)
        .execute(earlier.pool())
        .await
        .expect("row");
    earlier.close().await;
    let harness =
        Harness::start_with(move |config| config.database = Some(Database::Sqlite(path))).await;
    let token = harness
        .org(
            "acme",
            json!({"rate_limits": {"read": {"per_second": 0.001, "burst": 10}}}),
        )
        .await;
    for call in 0..10 {
        let (status, body) = harness.call(&token, Method::GET, "/v1/apps", None).await;
        assert_eq!(status, 200, "call {call}: {body}");
    }
}
