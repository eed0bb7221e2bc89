//! Attacks on the worker network, against the real kernel: a bridge, veth pairs and
//! network namespaces made by the runtime, the nftables filter applied by `nft`, and
//! native Machines running busybox. Needs root.
//!
//! Every test has its own bridge and its own fd43::/48-derived /64 (ULA), and only talks
//! to addresses it made, inside namespaces the runtime made (the host side is the test's
//! own bridge). A guard deletes the test's links and nftables tables even when it fails.
//!
//! How each test was shown to fail: `BERTH_ESCAPE_UNFILTERED=1` deletes the worker's
//! filter tables right after set-up (as on the pre-fix commit 34edac3, which had none);
//! each test's comment says what the attack did then.
//!
//! The attacker inside a Machine is modelled by the test acting in the Machine's network
//! namespace as root (adding addresses, changing the MAC, sending hand-made frames on a
//! packet socket). That is more than any Machine may do (CAP_NET_RAW gives packet
//! sockets; nothing gives CAP_NET_ADMIN), and the filter sits outside the namespace, on
//! the host's end of the veth, so it must hold against all of it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_runtime::isolation;
use berth_runtime::netns;
use berth_runtime::network::{Ipv6Net, NetworkConfig, WorkerNetwork};
use common::{Driver, Fixture};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The capability's bit in /proc/self/status's sets.
const CAP_NET_RAW: u32 = 13;

/// One test's worker network, and what to delete at the end whatever happens.
struct TestNet {
    bridge: String,
    prefix: Ipv6Net,
    links: Mutex<Vec<String>>,
}

impl TestNet {
    fn new() -> TestNet {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let bridge = format!("be{pid:x}n{n}");
        assert!(bridge.len() <= 15, "{bridge}");
        let prefix = Ipv6Net::new(
            Ipv6Addr::new(0xfd43, (pid >> 16) as u16, pid as u16, n as u16, 0, 0, 0, 0),
            64,
        )
        .unwrap();
        TestNet {
            links: Mutex::new(vec![bridge.clone()]),
            bridge,
            prefix,
        }
    }

    fn config(&self, allow_host_ports: &[u16]) -> NetworkConfig {
        let mut config = NetworkConfig::new(self.bridge.clone(), self.prefix);
        config.allow_host_ports = allow_host_ports.to_vec();
        config
    }

    async fn ensure(&self, allow_host_ports: &[u16]) -> Arc<WorkerNetwork> {
        Arc::new(
            WorkerNetwork::ensure(self.config(allow_host_ports))
                .await
                .unwrap(),
        )
    }

    fn address(&self, n: u16) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.prefix.network()) | (0x100 + u128::from(n)))
    }

    fn gateway(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.prefix.network()) | 1)
    }

    fn track(&self, machine_id: &str) -> String {
        let name = WorkerNetwork::host_link_name_on(&self.bridge, machine_id);
        self.links.lock().unwrap().push(name.clone());
        name
    }

    /// The negative control: with this set, the filter is deleted after set-up, so every
    /// attack below is expected to succeed (and its test to fail).
    fn maybe_unfilter(&self) {
        if std::env::var_os("BERTH_ESCAPE_UNFILTERED").is_some() {
            eprintln!(
                "BERTH_ESCAPE_UNFILTERED: deleting the filter of {}",
                self.bridge
            );
            let config = self.config(&[]);
            nft(&isolation::teardown_ruleset(&config));
        }
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let names = self.links.lock().map(|l| l.clone()).unwrap_or_default();
        common::delete_links(names);
        nft(&isolation::teardown_ruleset(&self.config(&[])));
    }
}

/// Runs an nftables script with plain `nft`; the result is the test's to check.
fn nft(script: &str) -> bool {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    child.wait().unwrap().success()
}

/// `ip` inside a namespace, as root: what a Machine could do with every capability.
fn ip_in(netns_path: &Path, args: &[&str]) {
    let status = Command::new("nsenter")
        .arg(format!("--net={}", netns_path.display()))
        .arg("ip")
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "ip {args:?} in {}", netns_path.display());
}

/// The MAC of eth0 in the namespace (sysfs would show the host's own interfaces).
fn mac_in(netns_path: &Path) -> [u8; 6] {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns_path.display()))
        .args(["ip", "-o", "link", "show", "dev", "eth0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    while let Some(word) = words.next() {
        if word == "link/ether" {
            return parse_mac(words.next().unwrap());
        }
    }
    panic!("no MAC in {text}");
}

fn parse_mac(text: &str) -> [u8; 6] {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

/// The host's neighbour entry for `address` on the bridge: its MAC, if it has one.
fn host_neighbour(bridge: &str, address: Ipv6Addr) -> Option<[u8; 6]> {
    let out = Command::new("ip")
        .args(["-6", "neigh", "show", &address.to_string(), "dev", bridge])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    while let Some(word) = words.next() {
        if word == "lladdr" {
            return words.next().map(parse_mac);
        }
    }
    None
}

/// GET /who from the host (the proxy's path), retrying while the server comes up.
fn http_get(address: Ipv6Addr, port: u16) -> String {
    let addr = SocketAddr::new(address.into(), port);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(mut stream) => {
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                stream.write_all(b"GET /who HTTP/1.0\r\n\r\n").unwrap();
                let mut body = String::new();
                stream.read_to_string(&mut body).unwrap();
                return body;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "connect {addr}: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// A listener that greets every client with `greeting`, on `addr` in the host's
/// namespace, or in `netns_path`'s.
fn greeter(netns_path: Option<&Path>, addr: SocketAddr, greeting: &'static str) -> SocketAddr {
    let bind = move || TcpListener::bind(addr);
    let listener = match netns_path {
        Some(path) => netns::in_netns(path, bind).unwrap(),
        None => bind().unwrap(),
    };
    let bound = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(greeting.as_bytes());
        }
    });
    bound
}

/// Connects from inside `netns_path` to `to`, from source `from` if given (it must be an
/// address of the namespace), and reads the greeting. Errors are the test's to judge.
async fn greeting(
    netns_path: &Path,
    from: Option<Ipv6Addr>,
    to: SocketAddr,
) -> std::io::Result<String> {
    use tokio::io::AsyncReadExt;
    // Made (and bound) on a thread in the namespace; it stays there.
    let socket = netns::in_netns(netns_path, move || {
        let socket = tokio::net::TcpSocket::new_v6()?;
        if let Some(from) = from {
            socket.bind(SocketAddr::new(from.into(), 0))?;
        }
        Ok(socket)
    })?;
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
    let mut stream = tokio::time::timeout(Duration::from_millis(1500), socket.connect(to))
        .await
        .map_err(|_| timed_out())??;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(3), stream.read_to_string(&mut text))
        .await
        .map_err(|_| timed_out())??;
    Ok(text)
}

/// A UDP socket on `addr` in `netns_path` that records the source of every datagram.
fn udp_sink(netns_path: &Path, addr: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<SocketAddr>>>) {
    let socket = netns::in_netns(netns_path, move || std::net::UdpSocket::bind(addr)).unwrap();
    let bound = socket.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = socket.recv_from(&mut buf) {
            record.lock().unwrap().push(from);
        }
    });
    (bound, seen)
}

/// Sends a few datagrams from `from` (an address of the namespace) to `to`.
fn udp_send(netns_path: &Path, from: Ipv6Addr, to: SocketAddr) {
    netns::in_netns(netns_path, move || {
        let socket = std::net::UdpSocket::bind(SocketAddr::new(from.into(), 0))?;
        for _ in 0..5 {
            socket.send_to(b"hello", to)?;
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    })
    .unwrap();
}

/// A pinned namespace under the fixture's temp dir, attached as `id` of `org`.
async fn bare_machine(
    f: &Fixture,
    net: &TestNet,
    network: &WorkerNetwork,
    name: &str,
    n: u16,
    org: &str,
) -> (String, PathBuf, Ipv6Addr) {
    let id = format!("{}-{name}", f.id());
    net.track(&id);
    let path = f.tmp.path().join(format!("ns-{name}"));
    netns::create(&path).unwrap();
    let address = net.address(n);
    network
        .attach(&id, &path, address, Some(org))
        .await
        .unwrap();
    (id, path, address)
}

/// An ICMPv6 neighbour advertisement, as an Ethernet frame to all nodes: "`target` is
/// at `lladdr`", with the override flag, from `src_mac`/`src_ip`.
fn neighbour_advert(
    src_mac: [u8; 6],
    src_ip: Ipv6Addr,
    target: Ipv6Addr,
    lladdr: [u8; 6],
) -> Vec<u8> {
    let dst_ip: Ipv6Addr = "ff02::1".parse().unwrap();
    let mut icmp = vec![136u8, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&lladdr);
    // Checksum over the pseudo-header and the message.
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    };
    add(&src_ip.octets());
    add(&dst_ip.octets());
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(&icmp);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let checksum = !(sum as u16);
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());

    let mut frame = vec![0x33, 0x33, 0, 0, 0, 1];
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&[0x86, 0xdd]);
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[58, 255]);
    frame.extend_from_slice(&src_ip.octets());
    frame.extend_from_slice(&dst_ip.octets());
    frame.extend_from_slice(&icmp);
    frame
}

/// Sends `frame` out of eth0 of `netns_path` on a packet socket (what CAP_NET_RAW allows).
fn send_frame(netns_path: &Path, frame: Vec<u8>) {
    netns::in_netns(netns_path, move || {
        // SAFETY: plain socket calls on a descriptor owned here; the address is a valid,
        // zeroed sockaddr_ll filled in below, and the frame outlives the call.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let index = libc::if_nametoindex(c"eth0".as_ptr());
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = index as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&frame[..6]);
            let sent = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            let error = std::io::Error::last_os_error();
            libc::close(fd);
            if sent < 0 {
                return Err(error);
            }
        }
        Ok(())
    })
    .unwrap();
}

/// Machines of different orgs on one worker.
///
/// Unfiltered (BERTH_ESCAPE_UNFILTERED=1, or on 34edac3) the attacker of org A fetched
/// org B's private page: "attacker: victim".
/// Also proves the proxy's path: the host reaches the Machines through the filter.
#[tokio::test]
async fn another_orgs_machine_is_unreachable_and_the_same_orgs_is_reachable() {
    let net = TestNet::new();
    let network = net.ensure(&[]).await;
    let f = Fixture::of_with_config(Driver::Native, "iso-orgs", |c| {
        c.host.network = Some(network.clone())
    });
    let victim = f.layout.clone();
    let friend = f.another_layout("iso-friend");
    let attacker = f.another_layout("iso-attacker");
    for layout in [&victim, &friend, &attacker] {
        net.track(&layout.id);
    }
    let victim_ip = net.address(1);
    // busybox's `wget -T` crashes on a refused connection; nc -w times out cleanly.
    let fetch = |me: &str| {
        format!(
            "i=0; while [ $i -lt 6 ]; do \
               if printf 'GET /who HTTP/1.0\\r\\n\\r\\n' | nc -w 1 {victim_ip} 8080 >/tmp/r \
                  && grep -q victim /tmp/r; then echo \"{me}: victim\"; exec sleep 1000; fi; \
               i=$((i+1)); sleep 0.2; \
             done; echo \"{me}: unreachable\"; exec sleep 1000"
        )
    };
    let machines = [
        (
            &victim,
            1,
            "org-b",
            "echo victim > /www/who; exec httpd -f -p 8080 -h /www".to_owned(),
        ),
        (&friend, 2, "org-b", fetch("friend")),
        (&attacker, 3, "org-a", fetch("attacker")),
    ];
    for (layout, n, org, script) in &machines {
        let mut spec = f.spec_for(layout, &["sh", "-c", script]);
        spec.private_ip = Some(net.address(*n));
        spec.org = Some((*org).to_owned());
        f.runtime.prepare(layout, &spec).await.unwrap();
    }
    net.maybe_unfilter();
    f.runtime.start(&victim, &f.lowerdirs()).await.unwrap();
    // The host (the proxy's path) reaches the victim.
    assert_eq!(http_get(victim_ip, 8080).lines().last(), Some("victim"));
    for layout in [&friend, &attacker] {
        f.runtime.start(layout, &f.lowerdirs()).await.unwrap();
    }
    let friend_logs = f.wait_logs_of(&friend, "friend: ", Duration::from_secs(20));
    let attacker_logs = f.wait_logs_of(&attacker, "attacker: ", Duration::from_secs(20));
    assert!(friend_logs.contains("friend: victim"), "{friend_logs}");
    assert!(
        attacker_logs.contains("attacker: unreachable"),
        "org A reached org B: {attacker_logs}"
    );
    // And the host still reaches every one of them after all that.
    assert_eq!(http_get(victim_ip, 8080).lines().last(), Some("victim"));

    for layout in [&victim, &friend, &attacker] {
        f.runtime.remove(layout).await.unwrap();
    }
    // Destroy took the ports out of the filter.
    let listing = Command::new("nft")
        .args([
            "list",
            "table",
            "bridge",
            &isolation::bridge_table(&net.config(&[])),
        ])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for layout in [&victim, &friend, &attacker] {
        let port = WorkerNetwork::host_link_name_on(&net.bridge, &layout.id);
        assert!(!listing.contains(&port), "{port} left in\n{listing}");
    }
    f.assert_no_leaks();
}

/// A Machine with CAP_NET_RAW forges neighbour advertisements claiming another Machine's
/// address, to take the host's (the proxy's) traffic for it.
///
/// Unfiltered, the host's neighbour entry for the victim moved to the attacker's MAC and
/// the host's GET to the victim's address was answered "attacker".
#[tokio::test]
async fn forged_neighbour_advertisements_do_not_redirect_the_host() {
    let net = TestNet::new();
    let network = net.ensure(&[]).await;
    let f = Fixture::of_with_config(Driver::Native, "iso-nd", |c| {
        c.host.network = Some(network.clone())
    });
    let victim = f.layout.clone();
    let attacker = f.another_layout("iso-nd-attacker");
    net.track(&victim.id);
    net.track(&attacker.id);
    let (victim_ip, attacker_ip) = (net.address(1), net.address(2));
    let serve = |who: &str| {
        format!(
            "echo {who} > /www/who; grep CapEff /proc/self/status; \
             exec httpd -f -p 8080 -h /www"
        )
    };
    for (layout, address, org, who, net_raw) in [
        (&victim, victim_ip, "org-b", "victim", false),
        (&attacker, attacker_ip, "org-a", "attacker", true),
    ] {
        let mut spec = f.spec_for(layout, &["sh", "-c", &serve(who)]);
        spec.private_ip = Some(address);
        spec.org = Some(org.to_owned());
        spec.net_raw = net_raw;
        f.runtime.prepare(layout, &spec).await.unwrap();
        f.runtime.start(layout, &f.lowerdirs()).await.unwrap();
    }
    net.maybe_unfilter();
    // The attacker really holds CAP_NET_RAW (bit 13).
    let logs = f.wait_logs_of(&attacker, "CapEff:", Duration::from_secs(10));
    let caps = u64::from_str_radix(
        logs.lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .unwrap()
            .trim(),
        16,
    )
    .unwrap();
    assert_ne!(caps & (1 << CAP_NET_RAW), 0, "{logs}");

    assert_eq!(http_get(victim_ip, 8080).lines().last(), Some("victim"));
    let victim_mac = mac_in(&victim.netns());
    let attacker_mac = mac_in(&attacker.netns());
    assert_eq!(host_neighbour(&net.bridge, victim_ip), Some(victim_mac));

    // The attacker takes the victim's address too (so it would answer for it), then
    // advertises it: from its own address (only the target is a lie), and from the
    // victim's; unsolicited, to all nodes, with the override flag; several times.
    ip_in(
        &attacker.netns(),
        &[
            "-6",
            "addr",
            "add",
            &format!("{victim_ip}/128"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    for _ in 0..5 {
        for source in [attacker_ip, victim_ip] {
            send_frame(
                &attacker.netns(),
                neighbour_advert(attacker_mac, source, victim_ip, attacker_mac),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        host_neighbour(&net.bridge, victim_ip),
        Some(victim_mac),
        "the host's neighbour entry for the victim was rewritten"
    );
    for _ in 0..3 {
        assert_eq!(http_get(victim_ip, 8080).lines().last(), Some("victim"));
    }

    for layout in [&victim, &attacker] {
        f.runtime.remove(layout).await.unwrap();
    }
    f.assert_no_leaks();
}

/// A host service listening on every address ([::]) is closed to Machines, unless the
/// operator allows its port; the host still reaches a Machine's own listener.
///
/// Unfiltered, the Machine read "host service" from the closed port.
#[tokio::test]
async fn host_services_are_closed_unless_the_operator_allows_the_port() {
    let net = TestNet::new();
    let closed = greeter(None, "[::]:0".parse().unwrap(), "host service\n");
    let open = greeter(None, "[::]:0".parse().unwrap(), "allowed service\n");
    let network = net.ensure(&[open.port()]).await;
    let f = Fixture::new("iso-host");
    let (_, ns, address) = bare_machine(&f, &net, &network, "m", 1, "org-a").await;
    net.maybe_unfilter();
    let gateway = net.gateway();

    // The proxy's direction: host to a listener in the Machine.
    let inside = greeter(Some(&ns), SocketAddr::new(address.into(), 0), "machine\n");
    let mut stream = TcpStream::connect_timeout(&inside, Duration::from_secs(2)).unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert_eq!(text, "machine\n");

    assert_eq!(
        greeting(&ns, None, SocketAddr::new(gateway.into(), open.port()))
            .await
            .unwrap(),
        "allowed service\n"
    );
    let refused = greeting(&ns, None, SocketAddr::new(gateway.into(), closed.port())).await;
    assert!(refused.is_err(), "reached a closed host port: {refused:?}");
    network.detach(&format!("{}-m", f.id())).await.unwrap();
    netns::remove(&ns).unwrap();
    f.assert_no_leaks();
}

/// A Machine takes another's address, or its MAC, and talks to a same-org Machine and to
/// an allowed host port with it.
///
/// Unfiltered, the same-org friend received the datagrams from the stolen address, the
/// host greeted the stolen address (and the host's own connection to the victim then
/// failed: its neighbour entry had moved), and with the victim's MAC the attacker got
/// both greetings.
#[tokio::test]
async fn spoofed_sources_and_macs_are_dropped() {
    let net = TestNet::new();
    let host = greeter(None, "[::]:0".parse().unwrap(), "host\n");
    let network = net.ensure(&[host.port()]).await;
    let f = Fixture::new("iso-spoof");
    let (_, attacker, attacker_ip) = bare_machine(&f, &net, &network, "att", 1, "org-a").await;
    let (_, friend, friend_ip) = bare_machine(&f, &net, &network, "fr", 2, "org-a").await;
    let (_, victim, victim_ip) = bare_machine(&f, &net, &network, "vic", 3, "org-b").await;
    net.maybe_unfilter();
    let friend_listener = greeter(
        Some(&friend),
        SocketAddr::new(friend_ip.into(), 0),
        "friend\n",
    );
    let victim_listener = greeter(
        Some(&victim),
        SocketAddr::new(victim_ip.into(), 0),
        "victim\n",
    );
    let host = SocketAddr::new(net.gateway().into(), host.port());

    let (friend_udp, friend_seen) = udp_sink(&friend, SocketAddr::new(friend_ip.into(), 0));

    // Control: with its own address the attacker reaches both (ND settles here too).
    assert_eq!(
        greeting(&attacker, None, friend_listener).await.unwrap(),
        "friend\n"
    );
    assert_eq!(greeting(&attacker, None, host).await.unwrap(), "host\n");
    udp_send(&attacker, attacker_ip, friend_udp);

    // Its eth0 gets the victim's address; what it sends from it reaches no one. (A TCP
    // answer would go to the real victim, so the same-org check is on UDP, where the
    // friend's socket shows what arrived.)
    ip_in(
        &attacker,
        &[
            "-6",
            "addr",
            "add",
            &format!("{victim_ip}/128"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    udp_send(&attacker, victim_ip, friend_udp);
    let spoofed = greeting(&attacker, Some(victim_ip), host).await;
    assert!(
        spoofed.is_err(),
        "from {victim_ip} to the host: {spoofed:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let seen = friend_seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|from| from.ip() == std::net::IpAddr::V6(attacker_ip)),
        "the control datagrams did not arrive: {seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|from| from.ip() == std::net::IpAddr::V6(victim_ip)),
        "datagrams from the stolen address arrived: {seen:?}"
    );
    // The victim is still the victim, for the host.
    let mut stream = TcpStream::connect_timeout(&victim_listener, Duration::from_secs(2)).unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert_eq!(text, "victim\n");

    // Now the victim's MAC, with its own address: dropped too, and the bridge does not
    // learn the victim's MAC on the attacker's port.
    ip_in(
        &attacker,
        &[
            "-6",
            "addr",
            "del",
            &format!("{victim_ip}/128"),
            "dev",
            "eth0",
        ],
    );
    let victim_mac = mac_in(&victim);
    let mac_text = victim_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    ip_in(
        &attacker,
        &["link", "set", "dev", "eth0", "address", &mac_text],
    );
    ip_in(&attacker, &["-6", "neigh", "flush", "dev", "eth0"]);
    for target in [friend_listener, host] {
        let spoofed = greeting(&attacker, None, target).await;
        assert!(
            spoofed.is_err(),
            "with MAC {mac_text} to {target}: {spoofed:?}"
        );
    }
    let mut stream = TcpStream::connect_timeout(&victim_listener, Duration::from_secs(2)).unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert_eq!(text, "victim\n");

    for name in ["att", "fr", "vic"] {
        network.detach(&format!("{}-{name}", f.id())).await.unwrap();
    }
    for path in [&attacker, &friend, &victim] {
        netns::remove(path).unwrap();
    }
    f.assert_no_leaks();
}

/// CAP_NET_RAW is off by default and on when asked, on both drivers.
#[tokio::test]
async fn net_raw_is_dropped_by_default_and_given_on_request() {
    for driver in [Driver::Native, Driver::Runc] {
        let f = Fixture::of(driver, "iso-caps");
        let other = f.another_layout("iso-caps-raw");
        for (layout, net_raw) in [(&f.layout, false), (&other, true)] {
            let mut spec = f.spec_for(
                layout,
                &["sh", "-c", "grep -E 'Cap(Eff|Bnd)' /proc/self/status"],
            );
            spec.net_raw = net_raw;
            f.runtime.prepare(layout, &spec).await.unwrap();
            f.runtime.start(layout, &f.lowerdirs()).await.unwrap();
            let logs = f.wait_logs_of(layout, "CapBnd:", Duration::from_secs(10));
            for line in ["CapEff:", "CapBnd:"] {
                let caps = u64::from_str_radix(
                    logs.lines()
                        .find_map(|l| l.strip_prefix(line))
                        .unwrap()
                        .trim(),
                    16,
                )
                .unwrap();
                assert_eq!(
                    caps & (1 << CAP_NET_RAW) != 0,
                    net_raw,
                    "{} {line} net_raw={net_raw}: {logs}",
                    driver.name()
                );
            }
            f.runtime
                .wait_exit(layout, Some(Duration::from_secs(10)))
                .await
                .unwrap();
            f.runtime.remove(layout).await.unwrap();
        }
        f.assert_no_leaks();
    }
}
