//! A private PostgreSQL from Debian's `postgresql` package: `initdb` in a temporary
//! directory, the server on a free loopback port with its socket inside that directory.
//! It never touches a system cluster. Run as root, `initdb` and the server run as the
//! `postgres` user (initdb refuses root).
//!
//! Stopped (`-m immediate`) and removed on drop; if the process dies first (a static's
//! drop never runs, or a `kill -9`), a watcher process does both once it is gone.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Context, Result};
use sqlx::Connection;

/// A running PostgreSQL cluster.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    databases: AtomicUsize,
}

/// The directory of Debian's PostgreSQL programs, the newest installed.
fn bin_dir() -> Result<PathBuf> {
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
    found.pop().context(
        "PostgreSQL's initdb (/usr/lib/postgresql/*/bin/initdb) is missing: install Debian's \
         postgresql package (scripts/install-deps.sh does)",
    )
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

fn run(command: &mut Command, what: &str) -> Result<()> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| what.to_owned())?;
    if !output.status.success() {
        bail!(
            "{what}: {}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A loopback port that is free now and lies below the kernel's ephemeral range.
///
/// A port from `bind(:0)` is ephemeral: between this check and a child's own bind, any
/// client socket on the host may be given it, and the child then fails with "Address
/// already in use". Ports below the range are never handed out that way; a per-process
/// counter keeps one test binary's ports apart.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let low = 10_000.min(ephemeral_low / 2);
    let span = ephemeral_low - low;
    let base = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let port = low + (base + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port below {ephemeral_low}")
}

impl Postgres {
    /// Initializes and starts a cluster of its own.
    pub fn start() -> Result<Postgres> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("berth-pg-")
            .tempdir()
            .context("the cluster's directory")?;
        if running_as_root() {
            run(
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(dir.path()),
                "chown the cluster's directory to postgres",
            )?;
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
        )?;
        let cluster = Postgres {
            dir,
            bin,
            port: free_port()?,
            databases: AtomicUsize::new(0),
        };
        cluster.reap_on_exit();
        cluster.start_server()?;
        Ok(cluster)
    }

    /// Starts the server (again, after [`Postgres::stop`]) on the cluster's port.
    pub fn start_server(&self) -> Result<()> {
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
        )
    }

    /// Stops the server at once, as a crash would: connections drop, nothing is flushed.
    pub fn stop(&self) -> Result<()> {
        run(
            as_server_user(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-w", "-m", "immediate", "stop"]),
            "pg_ctl stop",
        )
    }

    /// If this process dies without dropping the cluster, a watcher stops the server and
    /// removes its directory once the process is gone.
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

    /// A new, empty database; answers its URL.
    pub async fn database(&self) -> Result<String> {
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            self.databases.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = sqlx::postgres::PgConnection::connect(&self.url("postgres"))
            .await
            .context("connecting to the private PostgreSQL")?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .context("creating a database")?;
        let _ = admin.close().await;
        Ok(self.url(&name))
    }
}

impl Drop for Postgres {
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
