//! A real registry (Debian's `docker-registry`, the CNCF distribution registry) on a free
//! loopback port, with its storage in a temp dir. Killed and removed on drop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Where the registry binary is looked for; `BERTH_REGISTRY_BIN` overrides it.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A running registry.
pub struct Registry {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    credentials: Option<(String, String)>,
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn binary() -> PathBuf {
    std::env::var_os("BERTH_REGISTRY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(REGISTRY_BIN))
}

impl Registry {
    /// An anonymous registry.
    pub fn start() -> Result<Registry> {
        Registry::launch(None)
    }

    /// A registry that requires HTTP basic auth (htpasswd, bcrypt) for everything.
    pub fn start_with_htpasswd(user: &str, password: &str) -> Result<Registry> {
        Registry::launch(Some((user.to_string(), password.to_string())))
    }

    fn launch(credentials: Option<(String, String)>) -> Result<Registry> {
        let dir = tempfile::Builder::new()
            .prefix("berth-registry-")
            .tempdir()
            .context("registry temp dir")?;
        let port = free_port()?;
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)?;
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: berth-test-secret\n",
            storage.display()
        );
        if let Some((user, password)) = &credentials {
            let hash = bcrypt::hash_with_result(password, 4)
                .context("hashing the test password")?
                .format_for_version(bcrypt::Version::TwoY);
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{user}:{hash}\n"))?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        std::fs::write(dir.path().join("config.yml"), config)?;
        let mut registry = Registry {
            dir,
            port,
            child: None,
            credentials,
        };
        registry.start_again()?;
        Ok(registry)
    }

    /// Starts the registry again on the same port and storage (after [`Registry::kill`]).
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("the registry is already running");
        }
        let bin = binary();
        if !bin.is_file() {
            bail!(
                "{} is missing; install Debian's docker-registry package",
                bin.display()
            );
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(&bin)
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.probe() {
                // 401 is ready too: the registry wants credentials.
                if status == 200 || status == 401 {
                    return Ok(());
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!("docker-registry exited with {status}:\n{}", self.log());
                }
            }
            if Instant::now() > deadline {
                bail!("docker-registry did not answer /v2/:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The status of `GET /v2/`, if anything answers.
    fn probe(&self) -> Option<u16> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let request = format!("GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1:{}\r\n\r\n", self.port);
        stream.write_all(request.as_bytes()).ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).ok()?;
        std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
    }

    /// `127.0.0.1:<port>`, as a registry host in image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The credentials it requires, if any.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(user, password)| (user.as_str(), password.as_str()))
    }

    /// SIGKILL, like a crash or a pulled plug. Storage stays for [`Registry::start_again`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether it is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// `GET` requests for the blob `digest` in the registry's own access log, waiting up to
    /// `settle` for at least `at_least` of them to be logged (the line is written just
    /// after the response).
    pub fn logged_blob_gets(&self, digest: &str, at_least: usize, settle: Duration) -> usize {
        let needle = format!("/blobs/{digest} HTTP/");
        let count = || {
            self.log()
                .lines()
                .filter(|line| line.contains("\"GET /v2/") && line.contains(&needle))
                .count()
        };
        let deadline = Instant::now() + settle;
        loop {
            let seen = count();
            if seen >= at_least || Instant::now() > deadline {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the registry logged, access log included.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}
