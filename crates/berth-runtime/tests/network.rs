//! The Machine network against the real kernel: bridge, veth pairs, addresses and routes
//! made with rtnetlink, real runc Machines talking over them. Needs root.
//!
//! Every test has its own bridge and its own fd42::/64, and only talks to addresses it
//! made. A guard deletes the test's links even when the test fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_runtime::netns;
use berth_runtime::network::{
    netlink_operations, Ipv6Net, NetworkConfig, WorkerNetwork, MACHINE_INTERFACE,
};
use common::{Fixture, INDEX_HTML};
use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressHeaderFlags;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute};
use rtnetlink::{LinkMessageBuilder, LinkUnspec};
use tokio::sync::RwLock;

const WAIT: Option<Duration> = Some(Duration::from_secs(20));

/// The netlink counter is process wide: the test that asserts it stays put runs alone,
/// every other test here holds this lock shared.
static NETLINK_COUNTER: RwLock<()> = RwLock::const_new(());

static SEQ: AtomicU32 = AtomicU32::new(0);

/// One test's network: a bridge name and a /64 nobody else uses, and the links to delete
/// at the end whatever happens.
struct TestNet {
    bridge: String,
    prefix: Ipv6Net,
    links: Mutex<Vec<String>>,
}

impl TestNet {
    fn new() -> TestNet {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let bridge = format!("bt{pid:x}n{n}");
        assert!(bridge.len() <= 15, "{bridge}");
        let prefix = Ipv6Net::new(
            Ipv6Addr::new(0xfd42, (pid >> 16) as u16, pid as u16, n as u16, 0, 0, 0, 0),
            64,
        )
        .unwrap();
        TestNet {
            links: Mutex::new(vec![bridge.clone()]),
            bridge,
            prefix,
        }
    }

    fn config(&self) -> NetworkConfig {
        NetworkConfig::new(self.bridge.clone(), self.prefix)
    }

    async fn ensure(&self) -> Arc<WorkerNetwork> {
        Arc::new(WorkerNetwork::ensure(self.config()).await.unwrap())
    }

    /// Opens `port` of the host to this network's Machines (every other port is closed).
    async fn allow_host_port(&self, port: u16) {
        let mut config = self.config();
        config.allow_host_ports = vec![port];
        WorkerNetwork::ensure(config).await.unwrap();
    }

    /// The `n`th Machine address of the prefix.
    fn address(&self, n: u16) -> Ipv6Addr {
        let base = u128::from(self.prefix.network());
        Ipv6Addr::from(base | (0x100 + u128::from(n)))
    }

    /// Remembers a Machine's host link for cleanup; returns its name.
    fn track(&self, machine_id: &str) -> String {
        self.track_link(&WorkerNetwork::host_link_name_on(&self.bridge, machine_id))
    }

    fn track_link(&self, name: &str) -> String {
        self.links.lock().unwrap().push(name.to_owned());
        name.to_owned()
    }

    fn ports(&self) -> Vec<String> {
        let mut ports: Vec<String> = fs::read_dir(format!("/sys/class/net/{}/brif", self.bridge))
            .map(|dir| {
                dir.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        ports.sort();
        ports
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Without trusting the code under test: plain rtnetlink on a runtime of its own.
        let names = self.links.lock().map(|l| l.clone()).unwrap_or_default();
        common::delete_links(names);
        // The bridge's nftables tables, with plain nft.
        let suffix: String = self
            .bridge
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        for table in [
            format!("bridge berth_isolate_{suffix}"),
            format!("inet berth_host_{suffix}"),
        ] {
            let _ = std::process::Command::new("nft")
                .args(["delete", "table"])
                .args(table.split(' '))
                .stderr(std::process::Stdio::null())
                .status();
        }
        for name in self.links.lock().map(|l| l.clone()).unwrap_or_default() {
            if link_exists(&name) {
                eprintln!("test left link {name} behind");
            }
        }
    }
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn ifindex(name: &str) -> u32 {
    fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn master_of(name: &str) -> Option<String> {
    fs::read_link(format!("/sys/class/net/{name}/master"))
        .ok()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
}

fn is_up(name: &str) -> bool {
    let flags = fs::read_to_string(format!("/sys/class/net/{name}/flags")).unwrap();
    u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap() & 1 == 1
}

/// GET /index.html from the host, retrying while the server comes up.
fn http_get(address: Ipv6Addr, port: u16) -> String {
    let addr = SocketAddr::new(address.into(), port);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(mut stream) => {
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                stream
                    .write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
                    .unwrap();
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

/// A TCP listener on the bridge's address (in the host namespace) that greets the next
/// `connections` clients.
fn gateway_listener(gateway: Ipv6Addr, connections: usize) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::new(gateway.into(), 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().take(connections).flatten() {
            let _ = stream.write_all(b"from the host\n");
        }
    });
    addr
}

/// Connects from inside `netns_path` to `addr` and reads the greeting.
fn greeting_from(netns_path: &Path, addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = netns::connect_tcp(netns_path, addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// Binds a socket to `address` inside the namespace: works only if the address is there.
fn has_address(netns_path: &Path, address: Ipv6Addr) -> bool {
    netns::in_netns(netns_path, move || {
        TcpListener::bind(SocketAddr::new(address.into(), 0)).map(|_| ())
    })
    .is_ok()
}

/// The rest of the first log line that starts with `prefix`.
fn field<'a>(logs: &'a str, prefix: &str) -> &'a str {
    logs.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in logs:\n{logs}"))
}

/// Makes a veth pair the way a crash or another tool could have left it, with plain
/// rtnetlink: `host_name` here, its peer `peer_name` in `peer_netns` (or here).
async fn craft_pair(
    host_name: &str,
    peer_name: &str,
    peer_netns: Option<&Path>,
    alias: Option<&str>,
) {
    let (connection, handle, _) = rtnetlink::new_connection().unwrap();
    tokio::spawn(connection);
    let ns_file = peer_netns.map(|p| fs::File::open(p).unwrap());
    let mut peer = LinkMessageBuilder::<LinkUnspec>::new().name(peer_name.to_owned());
    if let Some(file) = &ns_file {
        peer = peer.setns_by_fd(file.as_raw_fd());
    }
    let pair = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
        .name(host_name.to_owned())
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
        .build();
    handle.link().add(pair).execute().await.unwrap();
    if let Some(alias) = alias {
        let index = ifindex(host_name);
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .append_extra_attribute(LinkAttribute::IfAlias(alias.to_owned()))
                    .build(),
            )
            .execute()
            .await
            .unwrap();
    }
}

/// Adds `address`/64 to eth0 inside `netns_path`, with plain rtnetlink.
async fn add_stray_address(netns_path: &Path, address: Ipv6Addr) {
    let path = netns_path.to_path_buf();
    netns::in_netns_async(&path, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(connection);
            let eth0 = handle
                .link()
                .get()
                .match_name(MACHINE_INTERFACE.to_owned())
                .execute()
                .try_next()
                .await
                .map_err(std::io::Error::other)?
                .ok_or_else(|| std::io::Error::other("no eth0"))?;
            let mut request = handle.address().add(eth0.header.index, address.into(), 64);
            // Usable at once, like the real one.
            request.message_mut().header.flags = AddressHeaderFlags::Nodad;
            request.execute().await.map_err(std::io::Error::other)
        })
    })
    .await
    .unwrap();
}

/// A fresh pinned namespace under the fixture's temp dir (unmounted by its guard).
fn make_netns(f: &Fixture, name: &str) -> PathBuf {
    let path = f.tmp.path().join(format!("ns-{name}"));
    netns::create(&path).unwrap();
    path
}

#[tokio::test]
async fn host_reaches_a_machine_at_its_private_address_and_loopback_works() {
    let _shared = NETLINK_COUNTER.read().await;
    let net = TestNet::new();
    let network = net.ensure().await;
    let f = Fixture::with_config("net-host", |c| c.host.network = Some(network.clone()));
    let host_link = net.track(f.id());
    let address = net.address(1);
    let script = "httpd -p 8080 -h /www; \
        echo \"lo4=$(wget -q -O - http://127.0.0.1:8080/index.html)\"; \
        echo \"lo6=$(wget -q -O - 'http://[::1]:8080/index.html')\"; \
        ip -6 addr show dev eth0; ip -6 route show; echo \"ready\"; exec sleep 1000";
    let mut spec = f.spec(&["sh", "-c", script]);
    spec.private_ip = Some(address);
    f.runtime.prepare(&f.layout, &spec).await.unwrap();
    assert!(link_exists(&host_link));
    assert_eq!(master_of(&host_link).as_deref(), Some(net.bridge.as_str()));
    assert!(is_up(&host_link) && is_up(&net.bridge));

    f.runtime.start(&f.layout, &f.lowerdirs()).await.unwrap();
    let logs = f.wait_logs("ready\n", Duration::from_secs(10));
    let body = http_get(address, 8080);
    assert!(body.contains(INDEX_HTML.trim()), "{body}");
    // Loopback inside the Machine, both families.
    assert_eq!(field(&logs, "lo4="), INDEX_HTML.trim(), "{logs}");
    assert_eq!(field(&logs, "lo6="), INDEX_HTML.trim(), "{logs}");
    assert!(
        logs.contains(&format!("inet6 {address}/64 scope global")),
        "{logs}"
    );
    assert!(
        logs.contains(&format!("default via {} dev eth0", network.gateway())),
        "{logs}"
    );

    f.runtime.remove(&f.layout).await.unwrap();
    assert!(!link_exists(&host_link));
    f.assert_no_leaks();
}

#[tokio::test]
async fn machines_on_one_worker_reach_each_other() {
    let _shared = NETLINK_COUNTER.read().await;
    let net = TestNet::new();
    let network = net.ensure().await;
    let f = Fixture::with_config("net-a", |c| c.host.network = Some(network.clone()));
    let a = f.layout.clone();
    let b = f.another_layout("net-b");
    net.track(&a.id);
    net.track(&b.id);
    let (addr_a, addr_b) = (net.address(1), net.address(2));
    // Each serves its own name and fetches the other's, then stays up.
    let script = |me: &str, peer: Ipv6Addr| {
        format!(
            "echo {me} > /www/who; httpd -p 8080 -h /www; i=0; \
             until wget -q -O /tmp/peer 'http://[{peer}]:8080/who'; do \
               i=$((i+1)); if [ $i -gt 100 ]; then echo peer=unreachable; exec sleep 1000; fi; \
               sleep 0.1; \
             done; echo \"peer=$(cat /tmp/peer)\"; exec sleep 1000"
        )
    };
    for (layout, me, mine, peer) in [(&a, "A", addr_a, addr_b), (&b, "B", addr_b, addr_a)] {
        let mut spec = f.spec_for(layout, &["sh", "-c", &script(me, peer)]);
        spec.private_ip = Some(mine);
        f.runtime.prepare(layout, &spec).await.unwrap();
    }
    assert_eq!(net.ports().len(), 2);
    for layout in [&a, &b] {
        f.runtime.start(layout, &f.lowerdirs()).await.unwrap();
    }
    let logs_a = f.wait_logs_of(&a, "peer=", Duration::from_secs(20));
    let logs_b = f.wait_logs_of(&b, "peer=", Duration::from_secs(20));
    assert_eq!(field(&logs_a, "peer="), "B", "{logs_a}");
    assert_eq!(field(&logs_b, "peer="), "A", "{logs_b}");

    for layout in [&a, &b] {
        f.runtime.remove(layout).await.unwrap();
    }
    assert_eq!(net.ports(), Vec::<String>::new());
    f.assert_no_leaks();
}

#[tokio::test]
async fn address_and_veth_survive_stop_and_start_without_netlink() {
    // Alone: nothing else in this process may count netlink requests meanwhile.
    let _exclusive = NETLINK_COUNTER.write().await;
    let net = TestNet::new();
    let network = net.ensure().await;
    let f = Fixture::with_config("net-restart", |c| c.host.network = Some(network.clone()));
    let host_link = net.track(f.id());
    let address = net.address(7);
    let script = "echo \"eth0=$(cat /sys/class/net/eth0/ifindex)\"; exec httpd -f -p 8080 -h /www";
    let mut spec = f.spec(&["sh", "-c", script]);
    spec.private_ip = Some(address);
    let before_prepare = netlink_operations();
    f.runtime.prepare(&f.layout, &spec).await.unwrap();
    assert!(
        netlink_operations() > before_prepare,
        "prepare builds the network"
    );
    let host_index = ifindex(&host_link);

    let before_starts = netlink_operations();
    let mut inner_indexes = Vec::new();
    for round in 0..3 {
        f.runtime.start(&f.layout, &f.lowerdirs()).await.unwrap();
        let body = http_get(address, 8080);
        assert!(body.contains(INDEX_HTML.trim()), "round {round}: {body}");
        let logs = f.wait_logs("eth0=", Duration::from_secs(10));
        inner_indexes.push(field(&logs, "eth0=").to_owned());
        // busybox httpd as pid 1 ignores SIGTERM.
        f.runtime.signal(&f.layout, libc::SIGKILL).await.unwrap();
        f.runtime.wait_exit(&f.layout, WAIT).await.unwrap().unwrap();
        f.runtime.cleanup(&f.layout).await.unwrap();
        // Stopped: the veth and the address stay.
        assert_eq!(ifindex(&host_link), host_index, "round {round}");
        assert!(has_address(&f.layout.netns(), address), "round {round}");
        fs::remove_file(f.layout.log_dir().join("output.log")).unwrap();
    }
    assert_eq!(
        netlink_operations(),
        before_starts,
        "start, stop and cleanup made netlink requests"
    );
    assert_eq!(master_of(&host_link).as_deref(), Some(net.bridge.as_str()));
    assert!(
        inner_indexes.windows(2).all(|w| w[0] == w[1]),
        "eth0 changed: {inner_indexes:?}"
    );

    f.runtime.remove(&f.layout).await.unwrap();
    f.assert_no_leaks();
}

#[tokio::test]
async fn remove_deletes_the_veth_pair_the_namespace_and_the_address() {
    let _shared = NETLINK_COUNTER.read().await;
    let net = TestNet::new();
    let network = net.ensure().await;
    let f = Fixture::with_config("net-remove", |c| c.host.network = Some(network.clone()));
    let host_link = net.track(f.id());
    let address = net.address(3);
    let mut spec = f.spec(&["httpd", "-f", "-p", "8080", "-h", "/www"]);
    spec.private_ip = Some(address);
    f.runtime.prepare(&f.layout, &spec).await.unwrap();
    f.runtime.start(&f.layout, &f.lowerdirs()).await.unwrap();
    assert!(http_get(address, 8080).contains(INDEX_HTML.trim()));
    assert_eq!(net.ports(), vec![host_link.clone()]);

    f.runtime.remove(&f.layout).await.unwrap();
    assert!(!link_exists(&host_link), "host veth left");
    assert_eq!(net.ports(), Vec::<String>::new());
    assert!(!f.layout.netns().exists(), "namespace file left");
    let gone = TcpStream::connect_timeout(
        &SocketAddr::new(address.into(), 8080),
        Duration::from_millis(500),
    );
    assert!(gone.is_err(), "{address} still answers");
    // Both idempotent.
    f.runtime.remove(&f.layout).await.unwrap();
    network.detach(f.id()).await.unwrap();
    f.assert_no_leaks();
}

#[tokio::test]
async fn twenty_concurrent_attaches_on_one_bridge() {
    let _shared = NETLINK_COUNTER.read().await;
    let net = TestNet::new();
    let network = net.ensure().await;
    let f = Fixture::new("net-many");
    let machines: Vec<(String, PathBuf, Ipv6Addr)> = (0..20u16)
        .map(|n| {
            let id = format!("{}-{n}", f.id());
            net.track(&id);
            let ns = make_netns(&f, &n.to_string());
            (id, ns, net.address(n + 1))
        })
        .collect();
    let attaches = machines
        .iter()
        .map(|(id, ns, address)| network.attach(id, ns, *address, None));
    for result in futures::future::join_all(attaches).await {
        result.unwrap();
    }
    assert_eq!(net.ports().len(), 20);
    // Every namespace has its own working address and route to the host.
    let listener = gateway_listener(network.gateway(), machines.len());
    net.allow_host_port(listener.port()).await;
    for (id, ns, address) in &machines {
        assert!(has_address(ns, *address), "{id}");
        assert_eq!(
            greeting_from(ns, listener).unwrap(),
            "from the host\n",
            "{id}"
        );
    }
    let detaches = machines.iter().map(|(id, _, _)| network.detach(id));
    for result in futures::future::join_all(detaches).await {
        result.unwrap();
    }
    assert_eq!(net.ports(), Vec::<String>::new());
    for (id, ns, _) in &machines {
        assert!(!link_exists(&WorkerNetwork::host_link_name_on(
            &net.bridge,
            id
        )));
        netns::remove(ns).unwrap();
    }
    f.assert_no_leaks();
}

#[tokio::test]
async fn attach_converges_after_a_crash_halfway() {
    let _shared = NETLINK_COUNTER.read().await;
    let net = TestNet::new();
    let network = net.ensure().await;
    let f = Fixture::new("net-crash");
    let id = f.id().to_owned();
    let host_link = net.track(&id);
    let ns = make_netns(&f, "machine");
    let address = net.address(9);
    let listener = gateway_listener(network.gateway(), 3);
    net.allow_host_port(listener.port()).await;

    // Died right after making the pair: nothing enslaved, nothing up, no address.
    craft_pair(&host_link, MACHINE_INTERFACE, Some(&ns), None).await;
    let crafted = ifindex(&host_link);
    assert!(!is_up(&host_link) && master_of(&host_link).is_none());
    network.attach(&id, &ns, address, None).await.unwrap();
    assert_eq!(
        ifindex(&host_link),
        crafted,
        "the pair was repaired in place"
    );
    assert_eq!(master_of(&host_link).as_deref(), Some(net.bridge.as_str()));
    assert_eq!(greeting_from(&ns, listener).unwrap(), "from the host\n");

    // Again, and with a stray address added meanwhile: same pair, stray gone.
    let stray = net.address(99);
    add_stray_address(&ns, stray).await;
    assert!(has_address(&ns, stray));
    network.attach(&id, &ns, address, None).await.unwrap();
    assert_eq!(ifindex(&host_link), crafted);
    assert!(has_address(&ns, address) && !has_address(&ns, stray));
    assert_eq!(greeting_from(&ns, listener).unwrap(), "from the host\n");

    // The pair of an earlier namespace of this Machine: replaced by one into this one.
    network.detach(&id).await.unwrap();
    let old_ns = make_netns(&f, "old");
    craft_pair(&host_link, MACHINE_INTERFACE, Some(&old_ns), Some(&id)).await;
    let stale = ifindex(&host_link);
    network.attach(&id, &ns, address, None).await.unwrap();
    assert_ne!(ifindex(&host_link), stale, "the stale pair was replaced");
    assert_eq!(greeting_from(&ns, listener).unwrap(), "from the host\n");

    network.detach(&id).await.unwrap();
    network.detach(&id).await.unwrap();
    assert!(!link_exists(&host_link));
    for path in [&ns, &old_ns] {
        netns::remove(path).unwrap();
    }
    f.assert_no_leaks();
}

#[tokio::test]
async fn attach_and_detach_leave_another_machines_link_alone() {
    let _shared = NETLINK_COUNTER.read().await;
    let net = TestNet::new();
    let network = net.ensure().await;
    let f = Fixture::new("net-owner");
    let id = f.id().to_owned();
    let host_link = net.track(&id);
    let peer = net.track_link(&format!("bz{}", &host_link[2..]));
    let ns = make_netns(&f, "machine");
    // A link with this Machine's name, marked as another Machine's.
    craft_pair(&host_link, &peer, None, Some("someone-else")).await;
    let theirs = ifindex(&host_link);
    let err = network
        .attach(&id, &ns, net.address(4), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "network_failed", "{err}");
    assert!(err.to_string().contains("someone-else"), "{err}");
    network.detach(&id).await.unwrap();
    assert_eq!(
        ifindex(&host_link),
        theirs,
        "the other machine's link was touched"
    );
    netns::remove(&ns).unwrap();
    f.assert_no_leaks();
}

#[tokio::test]
async fn ensure_is_idempotent_and_safe_concurrently() {
    let _shared = NETLINK_COUNTER.read().await;
    let nets = [TestNet::new(), TestNet::new(), TestNet::new()];
    // Three agents with their own bridges, and two racing on the first one.
    let made = futures::future::join_all(
        nets.iter()
            .map(|n| WorkerNetwork::ensure(n.config()))
            .chain([WorkerNetwork::ensure(nets[0].config())]),
    )
    .await;
    let made: Vec<WorkerNetwork> = made.into_iter().map(Result::unwrap).collect();
    assert_eq!(made[0].bridge_index(), made[3].bridge_index());
    let mac = fs::read_to_string(format!("/sys/class/net/{}/address", nets[0].bridge)).unwrap();
    let again = WorkerNetwork::ensure(nets[0].config()).await.unwrap();
    assert_eq!(again.bridge_index(), made[0].bridge_index());
    assert_eq!(
        fs::read_to_string(format!("/sys/class/net/{}/address", nets[0].bridge)).unwrap(),
        mac
    );
    for (net, network) in nets.iter().zip(&made) {
        assert!(is_up(&net.bridge));
        // The gateway address is there and usable at once (no DAD).
        TcpListener::bind(SocketAddr::new(network.gateway().into(), 0)).unwrap();
    }
    for network in made.into_iter().take(3) {
        let bridge = network.config().bridge.clone();
        network.teardown().await.unwrap();
        assert!(!link_exists(&bridge));
    }
    again.teardown().await.unwrap();

    // Egress NAT is never turned on here (tests send nothing off the host); its ruleset
    // is checked by the kernel without being applied.
    let mut config = nets[0].config();
    config.egress_nat = true;
    berth_runtime::network::apply_nft(&berth_runtime::network::egress_ruleset(&config), true)
        .await
        .unwrap();
    let broken = berth_runtime::network::egress_ruleset(&config).replace("masquerade", "masq");
    let err = berth_runtime::network::apply_nft(&broken, true)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_network", "{err}");

    // A name taken by something that is not a bridge.
    let other = TestNet::new();
    let peer = other.track_link(&format!("{}p", other.bridge));
    craft_pair(&other.bridge, &peer, None, None).await;
    let err = WorkerNetwork::ensure(other.config()).await.unwrap_err();
    assert_eq!(err.code(), "invalid_network", "{err}");
}

#[tokio::test]
async fn prepare_refuses_addresses_it_cannot_give() {
    let _shared = NETLINK_COUNTER.read().await;
    // No network at all.
    let f = Fixture::new("net-none");
    let mut spec = f.spec(&["true"]);
    spec.private_ip = Some("fd42::5".parse().unwrap());
    let err = f.runtime.prepare(&f.layout, &spec).await.unwrap_err();
    assert_eq!(err.code(), "invalid_spec", "{err}");
    assert!(!f.layout.dir.exists(), "nothing made on the host");

    // Outside the worker's prefix, or one of its reserved addresses.
    let net = TestNet::new();
    let network = net.ensure().await;
    let f = Fixture::with_config("net-bad", |c| c.host.network = Some(network.clone()));
    net.track(f.id());
    let outside: Ipv6Addr = "fd43::5".parse().unwrap();
    for bad in [outside, net.prefix.network(), network.gateway()] {
        let mut spec = f.spec(&["true"]);
        spec.private_ip = Some(bad);
        let err = f.runtime.prepare(&f.layout, &spec).await.unwrap_err();
        assert_eq!(err.code(), "invalid_spec", "{bad}: {err}");
        assert!(!f.layout.dir.exists(), "{bad}: nothing made on the host");
    }
    f.assert_no_leaks();
}

#[tokio::test]
async fn start_rebuilds_the_network_after_a_host_reboot() {
    let _shared = NETLINK_COUNTER.read().await;
    let net = TestNet::new();
    let network = net.ensure().await;
    let f = Fixture::with_config("net-reboot", |c| c.host.network = Some(network.clone()));
    let host_link = net.track(f.id());
    let address = net.address(5);
    let mut spec = f.spec(&["httpd", "-f", "-p", "8080", "-h", "/www"]);
    spec.private_ip = Some(address);
    f.runtime.prepare(&f.layout, &spec).await.unwrap();
    // A reboot drops the namespace pins, and the veth with them.
    network.detach(f.id()).await.unwrap();
    netns::remove(&f.layout.netns()).unwrap();
    berth_runtime::userns::remove_pin(&f.layout.userns()).unwrap();
    assert!(!link_exists(&host_link));

    f.runtime.start(&f.layout, &f.lowerdirs()).await.unwrap();
    assert!(netns::is_pinned(&f.layout.netns()));
    assert_eq!(master_of(&host_link).as_deref(), Some(net.bridge.as_str()));
    assert!(http_get(address, 8080).contains(INDEX_HTML.trim()));
    f.runtime.remove(&f.layout).await.unwrap();
    assert!(!link_exists(&host_link));
    f.assert_no_leaks();
}

/// Not a check: how long prepare spends on the network (namespace, then veth, address
/// and route), median of 20. Run with
/// `cargo test -p berth-runtime --test network network_setup_timing -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "measurement"]
async fn network_setup_timing() {
    let _exclusive = NETLINK_COUNTER.write().await;
    let net = TestNet::new();
    let network = net.ensure().await;
    let f = Fixture::new("net-timing");
    let mut netns_times = Vec::new();
    let mut attach_times = Vec::new();
    let mut operations = Vec::new();
    for n in 0..20u16 {
        let id = format!("{}-{n}", f.id());
        net.track(&id);
        let path = f.tmp.path().join(format!("ns-{n}"));
        let t = Instant::now();
        netns::create(&path).unwrap();
        netns_times.push(t.elapsed());
        let ops = netlink_operations();
        let t = Instant::now();
        network
            .attach(&id, &path, net.address(n + 1), None)
            .await
            .unwrap();
        attach_times.push(t.elapsed());
        operations.push(netlink_operations() - ops);
    }
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        times[times.len() / 2]
    };
    let mut total: Vec<Duration> = netns_times
        .iter()
        .zip(&attach_times)
        .map(|(a, b)| *a + *b)
        .collect();
    eprintln!(
        "netns median {:?}, attach (veth + address + route) median {:?}, total median {:?}, \
         netlink requests per attach {:?}",
        median(&mut netns_times),
        median(&mut attach_times),
        median(&mut total),
        operations[0]
    );
    let detach_all = futures::future::join_all((0..20u16).map(|n| {
        let id = format!("{}-{n}", f.id());
        let network = network.clone();
        async move { network.detach(&id).await }
    }));
    for result in detach_all.await {
        result.unwrap();
    }
    // The same 20 attaches at once: with no lock of ours they overlap.
    let t = Instant::now();
    let attach_all = futures::future::join_all((0..20u16).map(|n| {
        let id = format!("{}-{n}", f.id());
        let path = f.tmp.path().join(format!("ns-{n}"));
        let address = net.address(n + 1);
        let network = network.clone();
        async move { network.attach(&id, &path, address, None).await }
    }));
    for result in attach_all.await {
        result.unwrap();
    }
    let concurrent = t.elapsed();
    let sequential: Duration = attach_times.iter().sum();
    eprintln!("20 attaches: {sequential:?} one after another, {concurrent:?} at once");
    for n in 0..20u16 {
        let id = format!("{}-{n}", f.id());
        network.detach(&id).await.unwrap();
        netns::remove(&f.tmp.path().join(format!("ns-{n}"))).unwrap();
    }
    f.assert_no_leaks();
}
