//! The control store on PostgreSQL: its schema matches SQLite's, migrations run once even
//! when replicas start together, and a database that goes away answers 503
//! `store_unavailable` quickly, then serves again when it returns.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use berth_control::store::{ControlStore, Database};
use common::postgres::{self, Cluster};
use common::Harness;
use reqwest::Method;

/// `(table, column)` of every user table.
async fn columns(store: &ControlStore, sql: &str) -> BTreeSet<(String, String)> {
    use sqlx::Row;
    sqlx::query(sql)
        .fetch_all(store.pool())
        .await
        .expect("columns")
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

#[tokio::test]
async fn a_fresh_postgres_database_gets_the_sqlite_schema() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = ControlStore::open(&dir.path().join("control.db"))
        .await
        .expect("sqlite");
    let postgres = ControlStore::connect(&Database::Postgres(postgres::fresh_database().await))
        .await
        .expect("postgres");
    let on_sqlite = columns(
        &sqlite,
        "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p
         WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'",
    )
    .await;
    let on_postgres = columns(
        &postgres,
        "SELECT CAST(table_name AS TEXT), CAST(column_name AS TEXT) FROM information_schema.columns
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations'",
    )
    .await;
    // SQLite's rowid is implicit; PostgreSQL's volumes spell it out.
    let mut expected = on_sqlite.clone();
    expected.insert(("volumes".into(), "rowid".into()));
    assert!(on_sqlite.len() > 60, "{on_sqlite:?}");
    assert_eq!(on_postgres, expected);
}

#[tokio::test]
async fn replicas_starting_together_migrate_once_and_a_restart_changes_nothing() {
    let database = Database::Postgres(postgres::fresh_database().await);
    let opened = futures::future::join_all((0..4).map(|_| {
        let database = database.clone();
        async move { ControlStore::connect(&database).await }
    }))
    .await;
    for store in &opened {
        assert!(store.is_ok(), "{store:?}");
    }
    let store = opened.into_iter().next().expect("one").expect("store");
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(store.pool())
            .await
            .expect("migrations");
    // Every migration, each once.
    let all: Vec<i64> = sqlx::migrate!("./migrations/postgres")
        .iter()
        .map(|migration| migration.version)
        .collect();
    assert_eq!(
        all,
        [1, 2, 3, 4, 5, 6, 7, 8],
        "the schema, shared placement and quotas, replicas, shared images, drains, \
         workers' runtimes, standbys, lost workers"
    );
    assert_eq!(applied, all);
    store
        .insert_org("acme", Some("Acme"), 7)
        .await
        .expect("org");
    store.close().await;
    let again = ControlStore::connect(&database).await.expect("restart");
    let acme = again.org("acme").await.expect("read").expect("kept");
    assert_eq!((acme.name.as_str(), acme.created_at_ms), ("Acme", 7));
}

#[test]
fn database_urls_pick_the_backend_and_unknown_schemes_are_refused() {
    assert_eq!(
        Database::parse("sqlite:///var/lib/berth/control.db"),
        Ok(Database::Sqlite("/var/lib/berth/control.db".into()))
    );
    for url in ["postgres://u:p@db/berth", "postgresql://db/berth"] {
        assert_eq!(Database::parse(url), Ok(Database::Postgres(url.into())));
    }
    let error = Database::parse("mysql://db/berth").expect_err("mysql");
    assert!(error.contains("\"mysql\""), "{error}");
    assert!(Database::parse("sqlite://").is_err());
    // Logs never show the password.
    let shown = Database::parse("postgres://u:secret@db:5432/berth")
        .expect("url")
        .to_string();
    assert!(!shown.contains("secret"), "{shown}");
}

#[tokio::test]
async fn a_stopped_database_answers_store_unavailable_in_bounded_time_then_service_resumes() {
    // Its own cluster: stopping the shared one would fail other tests.
    let cluster = Cluster::start();
    let url = cluster.database().await;
    let harness = Harness::start_with(|config| {
        config.database = Some(Database::Postgres(url));
    })
    .await;
    harness.app(&harness.admin, "outage").await;
    let (status, body) = harness
        .call(
            &harness.admin,
            Method::GET,
            "/v1/apps/outage/machines",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");

    cluster.stop();
    // Twice: the first request may find a pooled connection broken, the second must wait
    // for a new one and give up within the bound.
    for _ in 0..2 {
        let started = Instant::now();
        let reply = harness
            .send(
                &harness.admin,
                Method::GET,
                "/v1/apps/outage/machines",
                &[],
                None,
            )
            .await;
        let took = started.elapsed();
        assert_eq!(reply.status, 503, "{}", reply.body);
        assert_eq!(reply.body["error"], "store_unavailable", "{}", reply.body);
        assert!(
            reply.body["retry_after_ms"].as_u64().is_some(),
            "{}",
            reply.body
        );
        assert!(
            reply.headers.contains_key(reqwest::header::RETRY_AFTER),
            "{:?}",
            reply.headers
        );
        assert!(took < Duration::from_secs(3), "answered after {took:?}");
    }

    cluster.start_server();
    // The pool reconnects by itself; a request in the first moments may still find a
    // connection the restart broke.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = harness
            .call(
                &harness.admin,
                Method::GET,
                "/v1/apps/outage/machines",
                None,
            )
            .await;
        if status == 200 {
            break;
        }
        assert_eq!(body["error"], "store_unavailable", "{body}");
        assert!(Instant::now() < deadline, "no recovery: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = harness
        .call(
            &harness.admin,
            Method::POST,
            "/v1/apps",
            Some(serde_json::json!({"app_name": "after"})),
        )
        .await;
    assert!(status == 200 || status == 201, "{status} {body}");
}
