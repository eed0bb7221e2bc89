//! A private PostgreSQL for tests, from Debian's `postgresql` package: `initdb` in a
//! temporary directory, the server on a free loopback port with its socket inside that
//! directory. It never touches a system cluster.
//!
//! [`shared`] is one cluster per test binary; [`Cluster::database`] makes a fresh
//! database in it per test. A test that stops the server starts a [`Cluster`] of its own.
//! Run as root, `initdb` and the server run as the `postgres` user (initdb refuses root).
//!
//! Other crates' tests include this file with `#[path]`.

#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use sqlx::Connection;

/// The environment variable that selects the backend of the control plane's tests:
/// `postgres` runs them on a private PostgreSQL, anything else (or nothing) on SQLite.
pub const BACKEND_VAR: &str = "BERTH_TEST_DATABASE";

/// Whether this run's tests use PostgreSQL.
pub fn postgres_selected() -> bool {
    std::env::var(BACKEND_VAR).is_ok_and(|value| value == "postgres")
}

/// A running PostgreSQL cluster, stopped (`-m immediate`) and removed on drop.
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    databases: AtomicUsize,
}

/// The directory of Debian's PostgreSQL programs, the newest installed.
fn bin_dir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    found.sort_by_key(|bin| {
        bin.parent()
            .and_then(Path::file_name)
            .and_then(|name| name.to_str())
            .and_then(|name| name.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().unwrap_or_else(|| {
        panic!(
            "these tests need PostgreSQL's initdb (/usr/lib/postgresql/*/bin/initdb): \
             install Debian's postgresql package (scripts/install-deps.sh does)"
        )
    })
}

fn running_as_root() -> bool {
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

/// `program args…`, as the `postgres` user when this process is root.
fn as_server_user(program: &Path) -> Command {
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(command: &mut Command, what: &str) {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("{what}: {error}"));
    assert!(
        output.status.success(),
        "{what}: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A free loopback port below the kernel's ephemeral range, so that no client socket
/// can be given it before `postgres` binds it (a `bind(:0)` port can be).
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let low = 10_000.min(ephemeral_low / 2);
    let span = ephemeral_low - low;
    // Offset from the other harness's ports, which start at the same pid-based base.
    let base = std::process::id().wrapping_mul(7919).wrapping_add(span / 2) % span;
    for _ in 0..span {
        let port = low + (base + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free loopback port below {ephemeral_low}");
}

impl Cluster {
    /// Initializes and starts a cluster of its own.
    pub fn start() -> Cluster {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("berth-pg-")
            .tempdir()
            .expect("tempdir");
        if running_as_root() {
            run(
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(dir.path()),
                "chown the cluster's directory to postgres",
            );
        }
        run(
            as_server_user(&bin.join("initdb"))
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "-D",
                ])
                .arg(dir.path().join("data")),
            "initdb",
        );
        let cluster = Cluster {
            dir,
            bin,
            port: free_port(),
            databases: AtomicUsize::new(0),
        };
        cluster.reap_on_exit();
        cluster.start_server();
        cluster
    }

    /// Starts the server (again, after [`Cluster::stop`]) on the cluster's port.
    pub fn start_server(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c fsync=off -c max_connections=300",
            self.port,
            self.dir.path().display()
        );
        run(
            as_server_user(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .arg("-l")
                .arg(self.dir.path().join("server.log"))
                .args(["-w", "-o", &options, "start"])
                .stdout(Stdio::null()),
            "pg_ctl start",
        );
    }

    /// Stops the server at once, as a crash would: connections drop, nothing is flushed.
    pub fn stop(&self) {
        run(
            as_server_user(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-w", "-m", "immediate", "stop"]),
            "pg_ctl stop",
        );
    }

    /// If this process dies without dropping the cluster (a static's drop never runs), a
    /// watcher stops the server and removes its directory once the process is gone.
    fn reap_on_exit(&self) {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.2; done; \
             pid=$(head -n 1 '{dir}/data/postmaster.pid' 2>/dev/null) && kill -QUIT \"$pid\" && \
             while kill -0 \"$pid\" 2>/dev/null; do sleep 0.05; done; rm -rf '{dir}'",
            pid = std::process::id(),
            dir = self.dir.path().display()
        );
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: an interrupt of the test run does not end it early.
            .process_group(0)
            .spawn();
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of `database` in this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A new, empty database, for one test.
    pub async fn database(&self) -> String {
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            self.databases.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = sqlx::postgres::PgConnection::connect(&self.url("postgres"))
            .await
            .expect("connect to the test cluster");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create a test database");
        let _ = admin.close().await;
        self.url(&name)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_server_user(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-w", "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
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
