//! The Machine network of one worker: a Linux bridge that holds the `::1` of the worker's
//! IPv6 ULA /64, and per Machine a veth pair whose inner end is `eth0` in the Machine's
//! persistent network namespace, with the Machine's address and a default route via the
//! bridge.
//!
//! Everything is made with rtnetlink at create and is idempotent: a create that died
//! halfway converges when it runs again. Start never comes here (except to rebuild what a
//! host reboot dropped). No lock is taken: every call opens its own netlink sockets, so
//! the kernel's rtnl lock, held for each request only, is the one point concurrent creates
//! meet.

use std::fs::File;
use std::io;
use std::net::Ipv6Addr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::TryStreamExt;
pub use ipnet::Ipv6Net;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, AsyncSocket, TokioSocket};
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};
use sha2::{Digest, Sha256};

use crate::isolation::{self, Port};
use crate::netns;
use crate::RuntimeError;

/// The Machine's side of its veth pair, inside its network namespace.
pub const MACHINE_INTERFACE: &str = "eth0";
/// Every worker network is one /64: Machines get addresses in it, the bridge gets `::1`.
pub const PREFIX_LEN: u8 = 64;
/// Linux's limit on interface names (IFNAMSIZ - 1).
pub const MAX_INTERFACE_NAME: usize = 15;

static NETLINK_OPERATIONS: AtomicU64 = AtomicU64::new(0);

/// Netlink requests this process has sent through this module since it started. Lets a
/// test prove that a code path (start) makes none.
pub fn netlink_operations() -> u64 {
    NETLINK_OPERATIONS.load(Ordering::Relaxed)
}

/// How a worker's Machine network is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The bridge's interface name, e.g. `berth0`: at most 15 bytes of `[A-Za-z0-9_.-]`.
    pub bridge: String,
    /// The worker's IPv6 ULA /64 (inside `fc00::/7`). The bridge takes its `::1`.
    pub prefix: Ipv6Net,
    /// Let Machines reach the outside world: IPv6 forwarding on, and nftables masquerade of
    /// the prefix towards every interface but the bridge ([`egress_ruleset`]). Off by
    /// default; needs the `nft` binary.
    pub egress_nat: bool,
    /// Ports (TCP and UDP) of the host that Machines may open connections to. Every other
    /// new connection from the bridge to the host is dropped ([`isolation::host_ruleset`]).
    pub allow_host_ports: Vec<u16>,
}

impl NetworkConfig {
    /// A config with egress NAT off.
    pub fn new(bridge: impl Into<String>, prefix: Ipv6Net) -> NetworkConfig {
        NetworkConfig {
            bridge: bridge.into(),
            prefix,
            egress_nat: false,
            allow_host_ports: Vec::new(),
        }
    }

    fn validate(&self) -> Result<(), RuntimeError> {
        let invalid = |m: String| Err(RuntimeError::InvalidNetwork(m));
        let name = &self.bridge;
        if !valid_interface_name(name) {
            return invalid(format!(
                "bridge name {name:?} must be 1-{MAX_INTERFACE_NAME} of [A-Za-z0-9_.-], \
                 starting alphanumeric"
            ));
        }
        if self.prefix.prefix_len() != PREFIX_LEN {
            return invalid(format!("prefix {} must be a /{PREFIX_LEN}", self.prefix));
        }
        if self.prefix.addr() != self.prefix.network() {
            return invalid(format!(
                "prefix {} has host bits set; use {}",
                self.prefix,
                self.prefix.trunc()
            ));
        }
        // Unique local addresses only: Machine networks must never look routable.
        if self.prefix.network().segments()[0] & 0xfe00 != 0xfc00 {
            return invalid(format!(
                "prefix {} is not a unique local (fc00::/7) prefix",
                self.prefix
            ));
        }
        Ok(())
    }
}

/// How the host-side veth of every Machine is named: this prefix, and its alias is the
/// Machine id.
pub const HOST_LINK_PREFIX: &str = "bv";

/// The bridge of one worker, made (or found) by [`WorkerNetwork::ensure`].
#[derive(Debug)]
pub struct WorkerNetwork {
    config: NetworkConfig,
    bridge_index: u32,
}

impl WorkerNetwork {
    /// Makes the bridge if it is missing, gives it the prefix's `::1` (no DAD) and brings
    /// it up. Idempotent; agents with different bridges may call it concurrently, and two
    /// racing on the same bridge both succeed.
    pub async fn ensure(config: NetworkConfig) -> Result<WorkerNetwork, RuntimeError> {
        config.validate()?;
        let bridge = config.bridge.clone();
        let context = |what: &str| format!("{what} bridge {bridge}");
        let nl = Netlink::host().map_err(|e| network_error(context("open netlink for"), e))?;
        let link = match nl.link_by_name(&bridge).await {
            Ok(Some(link)) => link,
            Ok(None) => {
                let message = LinkBridge::new(&bridge)
                    .address(bridge_mac(&bridge).to_vec())
                    .build();
                match nl.add_link(message).await {
                    // Another agent of this host made it in the meantime.
                    Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                    other => other.map_err(|e| netlink_error(context("create"), e))?,
                }
                nl.link_by_name(&bridge)
                    .await
                    .map_err(|e| netlink_error(context("look up"), e))?
                    .ok_or_else(|| {
                        network_error(
                            context("look up"),
                            io::Error::new(io::ErrorKind::NotFound, "gone right after creation"),
                        )
                    })?
            }
            Err(e) => return Err(netlink_error(context("look up"), e)),
        };
        if link_kind(&link) != Some(&InfoKind::Bridge) {
            return Err(RuntimeError::InvalidNetwork(format!(
                "interface {bridge} exists and is not a bridge"
            )));
        }
        let index = link.header.index;
        let gateway = gateway_of(&config.prefix);
        nl.add_address(index, gateway)
            .await
            .map_err(|e| netlink_error(context(&format!("add {gateway}/{PREFIX_LEN} to")), e))?;
        if !link.header.flags.contains(LinkFlags::Up) {
            nl.set_link(LinkUnspec::new_with_index(index).up().build())
                .await
                .map_err(|e| netlink_error(context("bring up"), e))?;
        }
        // Before any Machine is attached: a port the table does not know sends nothing.
        let mac = link_mac(&link).unwrap_or_else(|| bridge_mac(&bridge));
        apply_nft(&isolation::bridge_ruleset(&config, mac), false).await?;
        apply_nft(&isolation::host_ruleset(&config), false).await?;
        if config.egress_nat {
            enable_egress(&config).await?;
        }
        Ok(WorkerNetwork {
            config,
            bridge_index: index,
        })
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// The bridge's interface index, as found or made by `ensure`. Machines are enslaved
    /// by it, so the bridge must not be made again under a running agent.
    pub fn bridge_index(&self) -> u32 {
        self.bridge_index
    }

    /// The bridge's address, the `::1` of the prefix: the Machines' default gateway.
    pub fn gateway(&self) -> Ipv6Addr {
        gateway_of(&self.config.prefix)
    }

    /// The host-side veth name of a Machine on this worker: [`HOST_LINK_PREFIX`] and 12
    /// hex digits of the SHA-256 of the bridge and the id, so every agent process derives
    /// the same name without keeping it anywhere, and two workers of one host holding the
    /// same Machine (while it moves between them) name their veths apart.
    pub fn host_link_name(&self, machine_id: &str) -> String {
        Self::host_link_name_on(&self.config.bridge, machine_id)
    }

    /// [`WorkerNetwork::host_link_name`] for the worker whose bridge is `bridge`.
    pub fn host_link_name_on(bridge: &str, machine_id: &str) -> String {
        link_name(&format!("{bridge}/{machine_id}"))
    }

    /// The name before veths were named per bridge, from the id alone: a Machine attached
    /// then has its pair made again (see [`WorkerNetwork::attach`]).
    fn old_host_link_name(machine_id: &str) -> String {
        link_name(machine_id)
    }

    /// Deletes the Machine's veth under its old name if it is plugged into this bridge.
    async fn delete_old_link(&self, host: &Netlink, machine_id: &str) -> Result<(), RuntimeError> {
        let old_name = Self::old_host_link_name(machine_id);
        let context = || format!("delete veth {old_name} of machine {machine_id}");
        let Some(link) = host
            .link_by_name(&old_name)
            .await
            .map_err(|e| netlink_error(context(), e))?
        else {
            return Ok(());
        };
        if alias(&link) != Some(machine_id) || controller(&link) != Some(self.bridge_index) {
            return Ok(());
        }
        host.del_link(link.header.index)
            .await
            .map_err(|e| netlink_error(context(), e))?;
        self.forget_port(&old_name).await
    }

    /// Whether `address` can be given to a Machine: inside the prefix, and neither the
    /// prefix's own address nor the bridge's.
    pub fn check_address(&self, machine_id: &str, address: Ipv6Addr) -> Result<(), RuntimeError> {
        let prefix = &self.config.prefix;
        if !prefix.contains(&address) || address == prefix.network() || address == self.gateway() {
            return Err(RuntimeError::InvalidSpec {
                id: machine_id.to_owned(),
                message: format!(
                    "private address {address} is not a Machine address of {prefix} \
                     (its ::0 and ::1 are reserved)"
                ),
            });
        }
        Ok(())
    }

    /// Plugs the Machine's network namespace into the bridge: a veth pair named by
    /// [`host_link_name`](Self::host_link_name) on the host (enslaved, up, its alias the
    /// Machine id) and `eth0` inside, with `address`/64 (no DAD), up, and a default route
    /// via the bridge's `::1`. Idempotent: after a crash halfway it repairs what is
    /// missing, and it never touches a host link whose alias names another Machine.
    ///
    /// Last, the port's filter ([`isolation`]): its MAC (fixed per Machine when the pair
    /// is made here), its sources and its org's group, in one nftables transaction.
    /// Machines of the same `org` reach each other; `None` is the default group.
    pub async fn attach(
        &self,
        machine_id: &str,
        netns_path: &Path,
        address: Ipv6Addr,
        org: Option<&str>,
    ) -> Result<(), RuntimeError> {
        self.check_address(machine_id, address)?;
        let host_name = self.host_link_name(machine_id);
        let context = |what: &str| format!("{what} for machine {machine_id}");
        let ns_file = File::open(netns_path).map_err(|e| {
            RuntimeError::io(
                context(&format!("open network namespace {}", netns_path.display())),
                e,
            )
        })?;
        let host = Netlink::host().map_err(|e| network_error(context("open netlink"), e))?;
        // A pair made under the old name is made again under the new one.
        self.delete_old_link(&host, machine_id).await?;
        let inner = Netlink::in_netns(netns_path)
            .await
            .map_err(|e| network_error(context("open netlink in the network namespace"), e))?;

        let (host_link, eth0) = futures::try_join!(
            host.link_by_name(&host_name),
            inner.link_by_name(MACHINE_INTERFACE)
        )
        .map_err(|e| netlink_error(context("look up the veth pair"), e))?;
        // Each end names the other's index: this is the Machine's own pair.
        let paired = match (&host_link, &eth0) {
            (Some(h), Some(e)) => {
                peer_index(e) == Some(h.header.index) && peer_index(h) == Some(e.header.index)
            }
            _ => false,
        };
        let (eth0, created) = match eth0 {
            Some(eth0) if paired => (eth0, false),
            stale_eth0 => {
                if let Some(link) = &host_link {
                    // Its peer is not this Machine's eth0: a pair made for an earlier
                    // namespace of this Machine, or another Machine's.
                    if let Some(owner) = alias(link).filter(|owner| *owner != machine_id) {
                        return Err(network_error(
                            context(&format!("create veth {host_name}")),
                            io::Error::new(
                                io::ErrorKind::AlreadyExists,
                                format!("{host_name} already belongs to machine {owner}"),
                            ),
                        ));
                    }
                    host.del_link(link.header.index).await.map_err(|e| {
                        netlink_error(context(&format!("delete stale {host_name}")), e)
                    })?;
                }
                if let Some(link) = stale_eth0 {
                    inner
                        .del_link(link.header.index)
                        .await
                        .map_err(|e| netlink_error(context("delete stale eth0"), e))?;
                }
                let peer = LinkMessageBuilder::<LinkUnspec>::new()
                    .name(MACHINE_INTERFACE)
                    .address(machine_mac(machine_id).to_vec())
                    .setns_by_fd(ns_file.as_raw_fd())
                    .build();
                let pair = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
                    .name(host_name.clone())
                    .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                    .build();
                host.add_link(pair)
                    .await
                    .map_err(|e| netlink_error(context(&format!("create veth {host_name}")), e))?;
                let eth0 = inner
                    .link_by_name(MACHINE_INTERFACE)
                    .await
                    .map_err(|e| netlink_error(context("look up eth0"), e))?
                    .ok_or_else(|| {
                        network_error(
                            context("look up eth0"),
                            io::Error::new(io::ErrorKind::NotFound, "missing right after creation"),
                        )
                    })?;
                (eth0, true)
            }
        };
        let host_index = peer_index(&eth0).ok_or_else(|| {
            network_error(
                context("read the peer of eth0"),
                io::Error::other("eth0 is not a veth"),
            )
        })?;

        // One request sets everything of the host side, whatever state a crash left.
        host.set_link(
            LinkUnspec::new_with_index(host_index)
                .controller(self.bridge_index)
                .up()
                .append_extra_attribute(LinkAttribute::IfAlias(machine_id.to_owned()))
                .build(),
        )
        .await
        .map_err(|e| netlink_error(context(&format!("attach {host_name} to the bridge")), e))?;

        let index = eth0.header.index;
        if !eth0.header.flags.contains(LinkFlags::Up) {
            inner
                .set_link(LinkUnspec::new_with_index(index).up().build())
                .await
                .map_err(|e| netlink_error(context("bring up eth0"), e))?;
        }
        // A fresh eth0 has no address; an old one may hold a wrong one.
        let mut present = false;
        if !created {
            let addresses = inner
                .addresses(index)
                .await
                .map_err(|e| netlink_error(context("list addresses of eth0"), e))?;
            for message in addresses {
                if message.header.scope != AddressScope::Universe {
                    continue;
                }
                if address_of(&message) == Some(address) && message.header.prefix_len == PREFIX_LEN
                {
                    present = true;
                } else {
                    inner
                        .del_address(message)
                        .await
                        .map_err(|e| netlink_error(context("remove a stale address"), e))?;
                }
            }
        }
        if !present {
            inner.add_address(index, address).await.map_err(|e| {
                netlink_error(context(&format!("add {address}/{PREFIX_LEN} to eth0")), e)
            })?;
        }
        let gateway = self.gateway();
        inner
            .replace_default_route(index, gateway)
            .await
            .map_err(|e| netlink_error(context(&format!("route via {gateway}")), e))?;
        // A pair made before MACs were fixed keeps the one it has.
        let mac = link_mac(&eth0).ok_or_else(|| {
            network_error(
                context("read the MAC of eth0"),
                io::Error::other("eth0 has no 6-byte address"),
            )
        })?;
        self.isolate(&Port {
            name: host_name,
            mac,
            address,
            org: org.map(str::to_owned),
        })
        .await
        .map_err(|e| match e {
            RuntimeError::Network {
                context: what,
                error,
            } => network_error(context(&what), error),
            other => other,
        })
    }

    /// Replaces the port's elements in the bridge table with `port`'s, in one transaction.
    pub async fn isolate(&self, port: &Port) -> Result<(), RuntimeError> {
        let table = isolation::bridge_table(&self.config);
        let listing = isolation::list_bridge_table(&table).await?;
        let existing = isolation::elements_of(&listing, &port.name);
        let script = isolation::attach_script(&table, &existing, port);
        run_nft(&script, &format!("filter port {}", port.name)).await
    }

    /// Deletes every element of the port `name` from the bridge table (missing is
    /// success), then the org group it leaves empty, if no Machine joined it meanwhile.
    pub async fn forget_port(&self, name: &str) -> Result<(), RuntimeError> {
        let table = isolation::bridge_table(&self.config);
        let listing = isolation::list_bridge_table(&table).await?;
        let existing = isolation::elements_of(&listing, name);
        if existing.is_empty() {
            return Ok(());
        }
        run_nft(
            &isolation::detach_script(&table, &existing),
            &format!("forget port {name}"),
        )
        .await?;
        let cleanup = isolation::cleanup_script(&table, &listing, &existing);
        if !cleanup.is_empty() {
            if let Err(error) = run_nft(&cleanup, "remove an empty org group").await {
                tracing::debug!(%error, "org group still in use; kept");
            }
        }
        Ok(())
    }

    /// Deletes the Machine's host-side veth; its peer goes with it. Missing is success,
    /// and a link whose alias names another Machine is left alone.
    pub async fn detach(&self, machine_id: &str) -> Result<(), RuntimeError> {
        let host_name = self.host_link_name(machine_id);
        let context = || format!("delete veth {host_name} of machine {machine_id}");
        let host = Netlink::host().map_err(|e| network_error(context(), e))?;
        self.delete_old_link(&host, machine_id).await?;
        let Some(link) = host
            .link_by_name(&host_name)
            .await
            .map_err(|e| netlink_error(context(), e))?
        else {
            return Ok(());
        };
        if let Some(owner) = alias(&link).filter(|owner| *owner != machine_id) {
            tracing::warn!(machine = machine_id, %owner, link = %host_name,
                "host link belongs to another machine; not deleting it");
            return Ok(());
        }
        host.del_link(link.header.index)
            .await
            .map_err(|e| netlink_error(context(), e))?;
        self.forget_port(&host_name).await
    }

    /// Deletes the bridge and its filter tables (for tests and for an operator retiring a
    /// worker). Machines' host-side veths stay, detached.
    pub async fn teardown(self) -> Result<(), RuntimeError> {
        let bridge = &self.config.bridge;
        let context = || format!("delete bridge {bridge}");
        let host = Netlink::host().map_err(|e| network_error(context(), e))?;
        if let Some(link) = host
            .link_by_name(bridge)
            .await
            .map_err(|e| netlink_error(context(), e))?
        {
            host.del_link(link.header.index)
                .await
                .map_err(|e| netlink_error(context(), e))?;
        }
        apply_nft(&isolation::teardown_ruleset(&self.config), false).await
    }
}

/// Whether `name` is usable as a Linux interface name.
pub fn valid_interface_name(name: &str) -> bool {
    name.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
        && name.len() <= MAX_INTERFACE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn gateway_of(prefix: &Ipv6Net) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(prefix.network()) | 1)
}

/// A fixed, locally administered unicast MAC for a Machine's `eth0`, so the port's filter
/// and its neighbours' caches stay right when a reboot makes the pair again.
pub fn machine_mac(machine_id: &str) -> [u8; 6] {
    let digest = Sha256::digest(format!("eth0 {machine_id}").as_bytes());
    [0x02, digest[0], digest[1], digest[2], digest[3], digest[4]]
}

fn link_mac(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
            _ => None,
        })
}

/// A fixed, locally administered MAC for the bridge. Without one the bridge takes the
/// lowest MAC of its ports, which changes as Machines come and go and leaves stale
/// neighbour entries behind in every Machine.
fn bridge_mac(bridge: &str) -> [u8; 6] {
    let digest = Sha256::digest(bridge.as_bytes());
    [0x02, digest[0], digest[1], digest[2], digest[3], digest[4]]
}

/// One netlink connection, in the host's or in a Machine's network namespace. The
/// connection's task ends with it.
struct Netlink {
    handle: Handle,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Netlink {
    /// A connection in this process's network namespace (the host's).
    fn host() -> io::Result<Netlink> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        Ok(Netlink {
            handle,
            connection: tokio::spawn(connection),
        })
    }

    /// A connection in the network namespace at `path`: the socket is made on a thread
    /// that joined it and stays in it afterwards.
    async fn in_netns(path: &Path) -> io::Result<Netlink> {
        let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let socket = netns::in_netns_async(path, move || {
            // Registers the socket with the caller's runtime, from the namespace's thread.
            let _entered = runtime.enter();
            TokioSocket::new(NETLINK_ROUTE)
        })
        .await?;
        let (connection, handle, _) = rtnetlink::from_socket(socket);
        Ok(Netlink {
            handle,
            connection: tokio::spawn(connection),
        })
    }

    async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>, rtnetlink::Error> {
        count();
        let mut links = self.handle.link().get().match_name(name).execute();
        match links.try_next().await {
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            other => other,
        }
    }

    async fn add_link(&self, message: LinkMessage) -> Result<(), rtnetlink::Error> {
        count();
        self.handle.link().add(message).execute().await
    }

    async fn set_link(&self, message: LinkMessage) -> Result<(), rtnetlink::Error> {
        count();
        self.handle.link().set(message).execute().await
    }

    /// Missing is success.
    async fn del_link(&self, index: u32) -> Result<(), rtnetlink::Error> {
        count();
        match self.handle.link().del(index).execute().await {
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            other => other,
        }
    }

    /// The IPv6 addresses of link `index`.
    async fn addresses(&self, index: u32) -> Result<Vec<AddressMessage>, rtnetlink::Error> {
        count();
        let mut request = self.handle.address().get().set_link_index_filter(index);
        request.message_mut().header.family = AddressFamily::Inet6;
        request.execute().try_collect().await
    }

    /// Adds (or updates) `address`/64 on link `index`, without duplicate address
    /// detection: the address is unique by construction and usable at once.
    async fn add_address(&self, index: u32, address: Ipv6Addr) -> Result<(), rtnetlink::Error> {
        count();
        let mut request = self
            .handle
            .address()
            .add(index, address.into(), PREFIX_LEN)
            .replace();
        let message = request.message_mut();
        message.header.flags = AddressHeaderFlags::Nodad;
        message
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        request.execute().await
    }

    async fn del_address(&self, message: AddressMessage) -> Result<(), rtnetlink::Error> {
        count();
        match self.handle.address().del(message).execute().await {
            Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => Ok(()),
            other => other,
        }
    }

    async fn replace_default_route(
        &self,
        index: u32,
        gateway: Ipv6Addr,
    ) -> Result<(), rtnetlink::Error> {
        count();
        let route = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .gateway(gateway)
            .output_interface(index)
            .build();
        self.handle.route().add(route).replace().execute().await
    }
}

fn count() {
    NETLINK_OPERATIONS.fetch_add(1, Ordering::Relaxed);
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(message) => Some(message.raw_code().abs()),
        _ => None,
    }
}

fn netlink_error(context: String, e: rtnetlink::Error) -> RuntimeError {
    let source = match &e {
        rtnetlink::Error::NetlinkError(message) => message.to_io(),
        other => io::Error::other(other.to_string()),
    };
    network_error(context, source)
}

fn network_error(context: String, error: io::Error) -> RuntimeError {
    RuntimeError::Network { context, error }
}

fn link_kind(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
                LinkInfo::Kind(kind) => Some(kind),
                _ => None,
            }),
            _ => None,
        })
}

/// The index of a veth's peer (in the peer's namespace).
fn peer_index(link: &LinkMessage) -> Option<u32> {
    if link_kind(link) != Some(&InfoKind::Veth) {
        return None;
    }
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Link(index) => Some(*index),
            _ => None,
        })
}

/// The owner mark `attach` puts on host-side veths.
/// [`HOST_LINK_PREFIX`] and 12 hex digits of the SHA-256 of `key`.
fn link_name(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("{HOST_LINK_PREFIX}{hex}")
}

/// The bridge a link is plugged into.
fn controller(link: &LinkMessage) -> Option<u32> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Controller(index) => Some(*index),
            _ => None,
        })
}

fn alias(link: &LinkMessage) -> Option<&str> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::IfAlias(alias) if !alias.is_empty() => Some(alias.as_str()),
            _ => None,
        })
}

fn address_of(message: &AddressMessage) -> Option<Ipv6Addr> {
    message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            AddressAttribute::Address(std::net::IpAddr::V6(address)) => Some(*address),
            _ => None,
        })
}

/// The nftables table that holds a worker's egress rules: one per bridge, so workers
/// sharing a host don't step on each other, and removing it undoes egress entirely
/// (`nft delete table ip6 <name>`).
pub fn egress_table(config: &NetworkConfig) -> String {
    let bridge: String = config
        .bridge
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("berth_egress_{bridge}")
}

/// The ruleset for egress NAT, applied atomically by `nft -f -`. Re-applying replaces the
/// table's rules rather than adding to them. Machines' traffic leaving by any interface
/// but the bridge is masqueraded; replies come back in; nothing else from outside is
/// forwarded to the bridge. Other forwarded traffic of the host is left alone.
pub fn egress_ruleset(config: &NetworkConfig) -> String {
    let table = egress_table(config);
    let bridge = &config.bridge;
    let prefix = config.prefix;
    format!(
        "table ip6 {table}
delete table ip6 {table}
table ip6 {table} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip6 saddr {prefix} oifname != \"{bridge}\" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname \"{bridge}\" ip6 saddr {prefix} accept
        oifname \"{bridge}\" ct state established,related accept
        oifname \"{bridge}\" iifname != \"{bridge}\" drop
    }}
}}
"
    )
}

/// Runs `nft` on a ruleset; `check_only` asks the kernel to validate without applying.
pub async fn apply_nft(ruleset: &str, check_only: bool) -> Result<(), RuntimeError> {
    use tokio::io::AsyncWriteExt;
    let mut command = tokio::process::Command::new("nft");
    if check_only {
        command.arg("--check");
    }
    let mut child = command
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| RuntimeError::io("run nft (is the nftables package installed?)", e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(ruleset.as_bytes())
            .await
            .map_err(|e| RuntimeError::io("write the ruleset to nft", e))?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| RuntimeError::io("wait for nft", e))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(RuntimeError::InvalidNetwork(format!(
            "nft refused the ruleset: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// [`apply_nft`] for a Machine's change: a refusal is a `network_failed` about `what`.
async fn run_nft(script: &str, what: &str) -> Result<(), RuntimeError> {
    apply_nft(script, false).await.map_err(|e| match e {
        RuntimeError::InvalidNetwork(message) => {
            network_error(what.to_owned(), io::Error::other(message))
        }
        other => other,
    })
}

async fn enable_egress(config: &NetworkConfig) -> Result<(), RuntimeError> {
    apply_nft(&egress_ruleset(config), false).await?;
    // IPv6 has no per-interface forwarding switch that routers honour; this is host-wide,
    // which is why egress is an operator's choice and off by default.
    tokio::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", b"1")
        .await
        .map_err(|e| RuntimeError::io("turn on IPv6 forwarding", e))
}

/// After a host reboot the veth went with the namespace: plug the Machine's new
/// namespace in again, with the address and org recorded in its `config.json`. Never runs
/// on a normal start. Nothing to do without a worker network.
pub(crate) async fn reattach(
    network: Option<&WorkerNetwork>,
    layout: &crate::MachineLayout,
) -> Result<(), RuntimeError> {
    let Some(network) = network else {
        return Ok(());
    };
    let config = layout.config_json();
    let recorded = crate::host::blocking(move || crate::spec::read_network(&config)).await?;
    if let Some(address) = recorded.private_ip {
        network
            .attach(
                &layout.id,
                &layout.netns(),
                address,
                recorded.org.as_deref(),
            )
            .await?;
    }
    Ok(())
}

/// `Runtime::restore_network` for either driver: pins the namespace again if a reboot
/// unpinned it, and plugs it in. A namespace still pinned is checked the same way
/// (attach is idempotent), which also puts back the port's filter if the table lost it
/// (an agent upgraded from before filtering, a flushed ruleset).
pub(crate) async fn restore(
    network: Option<&WorkerNetwork>,
    layout: &crate::MachineLayout,
    registry: &crate::userns::IdRegistry,
) -> Result<(), RuntimeError> {
    // Pins again what a host reboot unpinned; then attach, always, which also puts back
    // the port's filter entries (after an upgrade, or a flushed ruleset).
    {
        let layout = layout.clone();
        let registry = registry.clone();
        crate::host::blocking(move || crate::userns::ensure(&layout, &registry)).await?;
    }
    reattach(network, layout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    #[test]
    fn host_link_names_are_short_stable_and_distinct() {
        let a = WorkerNetwork::host_link_name_on("berth0", "d8e7f3a1c2b4e5");
        assert_eq!(
            a,
            WorkerNetwork::host_link_name_on("berth0", "d8e7f3a1c2b4e5")
        );
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("bv") && valid_interface_name(&a));
        assert_ne!(
            a,
            WorkerNetwork::host_link_name_on("berth0", "d8e7f3a1c2b4e6")
        );
        // Two workers of one host holding the same Machine (mid-move) name theirs apart.
        assert_ne!(
            a,
            WorkerNetwork::host_link_name_on("berth1", "d8e7f3a1c2b4e5")
        );
    }

    #[test]
    fn config_is_validated() {
        let ok = NetworkConfig::new("berth0", prefix("fd12:3456:789a:1::/64"));
        assert!(ok.validate().is_ok());
        assert!(!ok.egress_nat, "egress NAT is off by default");
        for (bridge, net) in [
            ("berth-bridge-too-long", "fd00::/64"),
            ("", "fd00::/64"),
            ("-x", "fd00::/64"),
            ("a/b", "fd00::/64"),
            ("berth0", "fd00::/48"),
            ("berth0", "fd00::1/64"),
            ("berth0", "2001:db8::/64"),
            ("berth0", "fe80::/64"),
        ] {
            let config = NetworkConfig::new(bridge, prefix(net));
            let err = config.validate().unwrap_err();
            assert_eq!(err.code(), "invalid_network", "{bridge} {net}: {err}");
        }
    }

    #[test]
    fn egress_ruleset_masquerades_only_the_machine_prefix() {
        let mut config = NetworkConfig::new("bz-1.a", prefix("fd12:3456:789a:1::/64"));
        config.egress_nat = true;
        assert_eq!(egress_table(&config), "berth_egress_bz_1_a");
        let rules = egress_ruleset(&config);
        assert!(rules.contains("ip6 saddr fd12:3456:789a:1::/64 oifname != \"bz-1.a\" masquerade"));
        assert!(rules.contains("oifname \"bz-1.a\" ct state established,related accept"));
        // Idempotent: the table is replaced, never appended to.
        let delete = rules.find("delete table ip6 berth_egress_bz_1_a").unwrap();
        let define = rules.find("table ip6 berth_egress_bz_1_a {").unwrap();
        assert!(delete < define);
    }

    #[test]
    fn bridge_mac_is_local_unicast_and_stable() {
        let mac = bridge_mac("berth0");
        assert_eq!(mac[0] & 0x03, 0x02, "locally administered, unicast");
        assert_eq!(mac, bridge_mac("berth0"));
        assert_ne!(mac, bridge_mac("berth1"));
    }

    #[test]
    fn machine_addresses_are_checked_against_the_prefix() {
        let network = WorkerNetwork {
            config: NetworkConfig::new("berth0", prefix("fd00:1:2:3::/64")),
            bridge_index: 0,
        };
        let ok: Ipv6Addr = "fd00:1:2:3::2a".parse().unwrap();
        assert!(network.check_address("m1", ok).is_ok());
        for bad in ["fd00:1:2:3::", "fd00:1:2:3::1", "fd00:1:2:4::2a", "::1"] {
            let err = network
                .check_address("m1", bad.parse().unwrap())
                .unwrap_err();
            assert_eq!(err.code(), "invalid_spec", "{bad}");
        }
    }

    #[test]
    fn gateway_is_the_prefix_one() {
        assert_eq!(
            gateway_of(&prefix("fd00:1:2:3::/64")),
            "fd00:1:2:3::1".parse::<Ipv6Addr>().unwrap()
        );
    }
}
