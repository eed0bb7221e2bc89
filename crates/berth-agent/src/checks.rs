//! `config.checks`, run while a Machine runs: one task per running Machine that has checks,
//! spawned once its run is recorded `started` (start's path does nothing more) and
//! cancelled when the run ends. Results live in memory only; a Machine's JSON shows them
//! in Fly's shape, a check that has not run yet being `critical`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use berth_api::{
    CheckProtocol, CheckState, CheckStatus, CheckType, Machine, MachineCheck, MachineState,
};
use http_body_util::Empty;
use hyper::body::Bytes;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::record::{format_ms, now_ms, MachineRecord};
use crate::Agent;

/// The checks of one run of one Machine. Dropping it stops the run's task.
pub(crate) struct RunChecks {
    generation: u64,
    statuses: BTreeMap<String, CheckStatus>,
    _stop: DropGuard,
}

impl Agent {
    /// Starts checking the Machine's run, if its config has checks.
    pub(crate) fn run_checks(&self, record: &MachineRecord) {
        if record.config.checks.is_empty() {
            self.end_checks(&record.id);
            return;
        }
        let stop = CancellationToken::new();
        let statuses = record
            .config
            .checks
            .keys()
            .map(|name| (name.clone(), not_run(name, "waiting for the grace period")))
            .collect();
        if let Ok(mut runs) = self.inner.checks.lock() {
            runs.insert(
                record.id.clone(),
                RunChecks {
                    generation: record.run_generation,
                    statuses,
                    _stop: stop.clone().drop_guard(),
                },
            );
        }
        let address = record.private_ip.map(IpAddr::V6);
        let agent = self.clone();
        let id = record.id.clone();
        let generation = record.run_generation;
        let checks = record.config.checks.clone();
        // One task per run; each check keeps its own interval inside it.
        tokio::spawn(async move {
            let loops = checks
                .iter()
                .map(|(name, check)| agent.check_loop(&id, generation, name, check, address));
            stop.run_until_cancelled(futures::future::join_all(loops))
                .await;
        });
    }

    /// Forgets the run's checks and stops their task.
    pub(crate) fn end_checks(&self, id: &str) {
        if let Ok(mut runs) = self.inner.checks.lock() {
            runs.remove(id);
        }
    }

    async fn check_loop(
        &self,
        id: &str,
        generation: u64,
        name: &str,
        check: &MachineCheck,
        address: Option<IpAddr>,
    ) {
        tokio::time::sleep(check.grace_period()).await;
        loop {
            let (status, output) = match address {
                Some(ip) => probe(check, SocketAddr::new(ip, check.port.unwrap_or(0))).await,
                None => (
                    CheckState::Critical,
                    "the Machine has no address on the worker network".to_owned(),
                ),
            };
            if let Ok(mut runs) = self.inner.checks.lock() {
                match runs.get_mut(id) {
                    Some(run) if run.generation == generation => {
                        run.statuses.insert(
                            name.to_owned(),
                            CheckStatus {
                                name: name.to_owned(),
                                status,
                                output,
                                updated_at: Some(format_ms(now_ms())),
                            },
                        );
                    }
                    _ => return,
                }
            }
            tokio::time::sleep(check.interval()).await;
        }
    }

    /// The Machine's JSON, with the results of its checks.
    pub(crate) fn api_view(&self, record: &MachineRecord) -> Machine {
        let mut machine = record.to_api();
        if record.config.checks.is_empty() {
            return machine;
        }
        let current = self.inner.checks.lock().ok().and_then(|runs| {
            runs.get(&record.id)
                .filter(|run| {
                    run.generation == record.run_generation && record.state == MachineState::Started
                })
                .map(|run| run.statuses.values().cloned().collect::<Vec<_>>())
        });
        machine.checks = current.unwrap_or_else(|| {
            record
                .config
                .checks
                .keys()
                .map(|name| not_run(name, "the Machine is not running"))
                .collect()
        });
        machine
    }
}

fn not_run(name: &str, why: &str) -> CheckStatus {
    CheckStatus {
        name: name.to_owned(),
        status: CheckState::Critical,
        output: why.to_owned(),
        updated_at: None,
    }
}

/// Runs one check once against `address`, within its timeout.
pub(crate) async fn probe(check: &MachineCheck, address: SocketAddr) -> (CheckState, String) {
    let timeout = check.timeout();
    let outcome = match check.kind_of_check {
        Some(CheckType::Http) if check.protocol == Some(CheckProtocol::Https) => {
            return (
                CheckState::Warning,
                "https checks are not run: the worker has no TLS client".to_owned(),
            )
        }
        Some(CheckType::Http) => tokio::time::timeout(timeout, http_probe(check, address)).await,
        _ => {
            tokio::time::timeout(timeout, async {
                tokio::net::TcpStream::connect(address)
                    .await
                    .map(|_| (CheckState::Passing, format!("connected to {address}")))
                    .map_err(|error| format!("connect to {address}: {error}"))
            })
            .await
        }
    };
    match outcome {
        Ok(Ok(result)) => result,
        Ok(Err(error)) => (CheckState::Critical, error),
        Err(_) => (
            CheckState::Critical,
            format!("no answer from {address} within {}ms", timeout.as_millis()),
        ),
    }
}

/// One HTTP/1.1 request on a fresh connection: 2xx and 3xx pass, 429 warns (as Consul
/// reads them), anything else fails.
async fn http_probe(
    check: &MachineCheck,
    address: SocketAddr,
) -> Result<(CheckState, String), String> {
    let method = check
        .method
        .as_deref()
        .unwrap_or("GET")
        .to_ascii_uppercase();
    let path = check.path.as_deref().unwrap_or("/");
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|error| format!("connect to {address}: {error}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|error| format!("HTTP to {address}: {error}"))?;
    let driver = tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method.as_str())
        .uri(path)
        .header(hyper::header::HOST, address.to_string())
        .header(hyper::header::USER_AGENT, "berth-check")
        .header(hyper::header::CONNECTION, "close");
    for header in &check.headers {
        for value in &header.values {
            request = request.header(header.name.as_str(), value.as_str());
        }
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|error| format!("the check's request: {error}"))?;
    let answer = sender.send_request(request).await;
    driver.abort();
    let response = answer.map_err(|error| format!("HTTP {method} {path}: {error}"))?;
    let status = response.status();
    let state = if status.is_success() || status.is_redirection() {
        CheckState::Passing
    } else if status == hyper::StatusCode::TOO_MANY_REQUESTS {
        CheckState::Warning
    } else {
        CheckState::Critical
    };
    Ok((state, format!("HTTP {method} {path}: {status}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn check(json: serde_json::Value) -> MachineCheck {
        serde_json::from_value(json).expect("a check")
    }

    /// A one-request HTTP server on loopback that answers `status` and hands back what it
    /// was sent.
    async fn serve_once(status: &'static str) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut seen = Vec::new();
            let mut buffer = [0u8; 1024];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let read = socket.read(&mut buffer).await.expect("read");
                if read == 0 {
                    break;
                }
                seen.extend_from_slice(&buffer[..read]);
            }
            let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
            socket.write_all(answer.as_bytes()).await.expect("write");
            String::from_utf8_lossy(&seen).into_owned()
        });
        (address, task)
    }

    #[tokio::test]
    async fn http_checks_pass_on_2xx_and_fail_otherwise() {
        let (address, server) = serve_once("200 OK").await;
        let web = check(serde_json::json!({
            "type": "http", "port": address.port(), "method": "head", "path": "/health?x=1",
            "headers": [{"name": "X-Probe", "values": ["a", "b"]}]
        }));
        let (state, output) = probe(&web, address).await;
        assert_eq!(state, CheckState::Passing, "{output}");
        assert_eq!(output, "HTTP HEAD /health?x=1: 200 OK");
        let request = server.await.expect("server");
        assert!(
            request.starts_with("HEAD /health?x=1 HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.to_ascii_lowercase().contains("x-probe: a\r\n"),
            "{request}"
        );
        assert!(
            request.to_ascii_lowercase().contains("x-probe: b\r\n"),
            "{request}"
        );

        for (answer, expected) in [
            ("500 Internal Server Error", CheckState::Critical),
            ("404 Not Found", CheckState::Critical),
            ("429 Too Many Requests", CheckState::Warning),
            ("302 Found", CheckState::Passing),
        ] {
            let (address, _server) = serve_once(answer).await;
            let web = check(serde_json::json!({"type": "http", "port": address.port()}));
            assert_eq!(probe(&web, address).await.0, expected, "{answer}");
        }
    }

    #[tokio::test]
    async fn tcp_checks_need_a_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr");
        let tcp = check(serde_json::json!({"type": "tcp", "port": address.port()}));
        assert_eq!(probe(&tcp, address).await.0, CheckState::Passing);
        drop(listener);
        let (state, output) = probe(&tcp, address).await;
        assert_eq!(state, CheckState::Critical);
        assert!(output.contains("connect to"), "{output}");
    }

    #[tokio::test]
    async fn a_silent_server_fails_at_the_timeout() {
        // Accepts, never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr");
        let web = check(serde_json::json!({
            "type": "http", "port": address.port(), "timeout": "100ms"
        }));
        let (state, output) = probe(&web, address).await;
        assert_eq!(state, CheckState::Critical);
        assert!(output.contains("within 100ms"), "{output}");
        drop(listener);
    }

    #[tokio::test]
    async fn https_checks_are_reported_not_run() {
        let web = check(serde_json::json!({"type": "http", "port": 1, "protocol": "https"}));
        let (state, _) = probe(&web, "127.0.0.1:1".parse().expect("addr")).await;
        assert_eq!(state, CheckState::Warning);
    }
}
