//! A private PostgreSQL for tests: `berth_testkit::Postgres` (initdb in a temp dir,
//! pg_ctl on a free loopback port, never a system cluster), failing the test on error.
//!
//! [`shared`] is one cluster per test binary; [`Cluster::database`] makes a fresh
//! database in it per test. A test that stops the server starts a [`Cluster`] of its own.
//!
//! Other crates' tests include this file with `#[path]`.

#![allow(dead_code)]

use std::path::Path;
use std::sync::OnceLock;

use berth_testkit::Postgres;

/// The environment variable that selects the backend of the control plane's tests:
/// `postgres` runs them on a private PostgreSQL, anything else (or nothing) on SQLite.
pub const BACKEND_VAR: &str = "BERTH_TEST_DATABASE";

/// Whether this run's tests use PostgreSQL.
pub fn postgres_selected() -> bool {
    std::env::var(BACKEND_VAR).is_ok_and(|value| value == "postgres")
}

/// A running PostgreSQL cluster, stopped (`-m immediate`) and removed on drop.
pub struct Cluster(Postgres);

impl Cluster {
    /// Initializes and starts a cluster of its own.
    pub fn start() -> Cluster {
        Cluster(Postgres::start().unwrap_or_else(|error| panic!("{error:#}")))
    }

    /// Starts the server (again, after [`Cluster::stop`]) on the cluster's port.
    pub fn start_server(&self) {
        self.0
            .start_server()
            .unwrap_or_else(|error| panic!("{error:#}"));
    }

    /// Stops the server at once, as a crash would: connections drop, nothing is flushed.
    pub fn stop(&self) {
        self.0.stop().unwrap_or_else(|error| panic!("{error:#}"));
    }

    pub fn port(&self) -> u16 {
        self.0.port()
    }

    /// The URL of `database` in this cluster.
    pub fn url(&self, database: &str) -> String {
        self.0.url(database)
    }

    /// A new, empty database, for one test.
    pub async fn database(&self) -> String {
        self.0
            .database()
            .await
            .unwrap_or_else(|error| panic!("{error:#}"))
    }
}

/// The test binary's one shared cluster, started on first use.
pub fn shared() -> &'static Cluster {
    static SHARED: OnceLock<Cluster> = OnceLock::new();
    SHARED.get_or_init(Cluster::start)
}

/// A fresh database in the shared cluster, as a control plane's `--database` URL.
pub async fn fresh_database() -> String {
    shared().database().await
}

/// Where a control plane of this test run keeps its state: the SQLite file in `data_dir`,
/// or a fresh PostgreSQL database when [`BACKEND_VAR`] says `postgres`.
pub async fn test_database(data_dir: &Path) -> berth_control::store::Database {
    if postgres_selected() {
        berth_control::store::Database::Postgres(fresh_database().await)
    } else {
        berth_control::store::Database::in_data_dir(data_dir)
    }
}
