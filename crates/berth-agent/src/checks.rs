//! `config.checks`, run while a Machine runs: one task per running Machine that has checks,
//! spawned once its run is recorded `started` (start's path does nothing more) and
//! cancelled when the run ends. Results live in memory only; a Machine's JSON shows them
//! in Fly's shape, a check that has not run yet being `critical`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use berth_api::{
    CheckProtocol, CheckState, CheckStatus, CheckType, Machine, MachineCheck, MachineState,
};
use http_body_util::Empty;
use hyper::body::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
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

/// The host's CA certificates, read once, that https checks verify against.
fn host_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::warn!(%error, "reading the host's CA certificates for https checks");
            }
            let (_, ignored) = roots.add_parsable_certificates(found.certs);
            if ignored > 0 {
                tracing::warn!(ignored, "host CA certificates https checks cannot use");
            }
            Arc::new(roots)
        })
        .clone()
}

/// Runs one check once against `address`, within its timeout.
pub(crate) async fn probe(check: &MachineCheck, address: SocketAddr) -> (CheckState, String) {
    probe_with_roots(check, address, host_roots).await
}

/// [`probe`], with the CA certificates https checks verify against.
async fn probe_with_roots(
    check: &MachineCheck,
    address: SocketAddr,
    roots: impl FnOnce() -> Arc<RootCertStore>,
) -> (CheckState, String) {
    let timeout = check.timeout();
    let outcome = match check.kind_of_check {
        Some(CheckType::Http) if check.protocol == Some(CheckProtocol::Https) => {
            tokio::time::timeout(timeout, https_probe(check, address, roots())).await
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
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|error| format!("connect to {address}: {error}"))?;
    exchange(check, stream, &address.to_string()).await
}

/// [`http_probe`] over TLS: the certificate is verified against `roots` for
/// `tls_server_name` (the address when unset), which is also the SNI and the `Host`,
/// unless `tls_skip_verify`.
async fn https_probe(
    check: &MachineCheck,
    address: SocketAddr,
    roots: Arc<RootCertStore>,
) -> Result<(CheckState, String), String> {
    let name = match &check.tls_server_name {
        Some(name) => ServerName::try_from(name.clone())
            .map_err(|error| format!("tls_server_name {name:?}: {error}"))?,
        None => ServerName::IpAddress(address.ip().into()),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS: {error}"))?;
    let config = if check.tls_skip_verify == Some(true) {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|error| format!("connect to {address}: {error}"))?;
    let host = match &check.tls_server_name {
        Some(name) => name.clone(),
        None => address.to_string(),
    };
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
        .map_err(|error| format!("TLS to {address}: {error}"))?;
    exchange(check, stream, &host).await
}

/// `tls_skip_verify`: any certificate is taken, but the handshake's signatures are still
/// checked (the peer holds the key of the certificate it sent).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The check's request on a connected stream, and what its answer means.
async fn exchange<S>(
    check: &MachineCheck,
    stream: S,
    host: &str,
) -> Result<(CheckState, String), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let method = check
        .method
        .as_deref()
        .unwrap_or("GET")
        .to_ascii_uppercase();
    let path = check.path.as_deref().unwrap_or("/");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|error| format!("HTTP to {host}: {error}"))?;
    let driver = tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method.as_str())
        .uri(path)
        .header(hyper::header::HOST, host)
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

    /// The test CA, and a certificate it signed for `check.test` and 127.0.0.1.
    const TEST_CA: &[u8] = include_bytes!("testdata/check-ca.pem");
    const TEST_LEAF: &[u8] = include_bytes!("testdata/check-leaf.pem");
    const TEST_LEAF_KEY: &[u8] = include_bytes!("testdata/check-leaf.key");

    fn test_roots() -> Arc<RootCertStore> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(TEST_CA) {
            roots.add(cert.expect("the test CA")).expect("added");
        }
        Arc::new(roots)
    }

    /// A one-request HTTPS server on loopback with the test certificate: answers `status`
    /// and hands back the SNI and the request it was sent (`None` when the handshake
    /// failed).
    async fn serve_tls_once(
        status: &'static str,
    ) -> (
        SocketAddr,
        tokio::task::JoinHandle<Option<(Option<String>, String)>>,
    ) {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::PrivateKeyDer;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(TEST_LEAF)
            .map(|cert| cert.expect("the test certificate"))
            .collect();
        let key = PrivateKeyDer::from_pem_slice(TEST_LEAF_KEY).expect("the test key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            let mut tls = acceptor.accept(socket).await.ok()?;
            let sni = tls.get_ref().1.server_name().map(str::to_owned);
            let mut seen = Vec::new();
            let mut buffer = [0u8; 1024];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let read = tls.read(&mut buffer).await.ok()?;
                if read == 0 {
                    break;
                }
                seen.extend_from_slice(&buffer[..read]);
            }
            let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
            tls.write_all(answer.as_bytes()).await.ok()?;
            let _ = tls.shutdown().await;
            Some((sni, String::from_utf8_lossy(&seen).into_owned()))
        });
        (address, task)
    }

    #[tokio::test]
    async fn https_checks_verify_the_certificate_for_the_server_name() {
        let (address, server) = serve_tls_once("200 OK").await;
        let web = check(serde_json::json!({
            "type": "http", "protocol": "https", "port": address.port(), "path": "/health",
            "tls_server_name": "check.test"
        }));
        let (state, output) = probe_with_roots(&web, address, test_roots).await;
        assert_eq!(state, CheckState::Passing, "{output}");
        assert_eq!(output, "HTTP GET /health: 200 OK");
        let (sni, request) = server.await.expect("server").expect("a handshake");
        assert_eq!(sni.as_deref(), Some("check.test"));
        assert!(
            request
                .to_ascii_lowercase()
                .contains("host: check.test\r\n"),
            "{request}"
        );

        // Without a name, the address is verified (the certificate names 127.0.0.1), and
        // no SNI is sent for an address.
        let (address, server) = serve_tls_once("204 No Content").await;
        let web = check(serde_json::json!({
            "type": "http", "protocol": "https", "port": address.port()
        }));
        let (state, output) = probe_with_roots(&web, address, test_roots).await;
        assert_eq!(state, CheckState::Passing, "{output}");
        let (sni, _) = server.await.expect("server").expect("a handshake");
        assert_eq!(sni, None);

        let (address, _server) = serve_tls_once("503 Service Unavailable").await;
        let web = check(serde_json::json!({
            "type": "http", "protocol": "https", "port": address.port(),
            "tls_server_name": "check.test"
        }));
        let (state, output) = probe_with_roots(&web, address, test_roots).await;
        assert_eq!(state, CheckState::Critical, "{output}");
        assert!(output.ends_with("503 Service Unavailable"), "{output}");
    }

    /// Seen failing: with the verifier of `tls_skip_verify` used for every check, the
    /// untrusted and the misnamed certificates passed.
    #[tokio::test]
    async fn an_untrusted_or_misnamed_certificate_fails_unless_verification_is_skipped() {
        // A CA the checker does not trust.
        let (address, server) = serve_tls_once("200 OK").await;
        let web = check(serde_json::json!({
            "type": "http", "protocol": "https", "port": address.port(),
            "tls_server_name": "check.test"
        }));
        let (state, output) =
            probe_with_roots(&web, address, || Arc::new(RootCertStore::empty())).await;
        assert_eq!(state, CheckState::Critical, "{output}");
        assert!(output.contains("certificate"), "{output}");
        assert!(
            server.await.expect("server").is_none(),
            "no request was sent"
        );

        // A trusted certificate for another name.
        let (address, _server) = serve_tls_once("200 OK").await;
        let web = check(serde_json::json!({
            "type": "http", "protocol": "https", "port": address.port(),
            "tls_server_name": "other.test"
        }));
        let (state, output) = probe_with_roots(&web, address, test_roots).await;
        assert_eq!(state, CheckState::Critical, "{output}");
        assert!(output.contains("certificate"), "{output}");

        // Both taken with tls_skip_verify; the SNI is still the name asked for.
        for roots in [Arc::new(RootCertStore::empty()), test_roots()] {
            let (address, server) = serve_tls_once("200 OK").await;
            let web = check(serde_json::json!({
                "type": "http", "protocol": "https", "port": address.port(),
                "tls_server_name": "other.test", "tls_skip_verify": true
            }));
            let (state, output) = probe_with_roots(&web, address, || roots).await;
            assert_eq!(state, CheckState::Passing, "{output}");
            let (sni, _) = server.await.expect("server").expect("a handshake");
            assert_eq!(sni.as_deref(), Some("other.test"));
        }

        // A name that is not one is refused, not sent.
        let web = check(serde_json::json!({
            "type": "http", "protocol": "https", "port": 1, "tls_server_name": "bad name!"
        }));
        let (state, output) =
            probe_with_roots(&web, "127.0.0.1:1".parse().expect("addr"), test_roots).await;
        assert_eq!(state, CheckState::Critical);
        assert!(output.contains("tls_server_name"), "{output}");
    }
}
