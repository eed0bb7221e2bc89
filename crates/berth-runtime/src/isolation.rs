//! Filtering on a worker's bridge, with nftables (the `nft` binary, one atomic transaction
//! per change):
//!
//! - `bridge berth_isolate_<bridge>`: every frame a Machine's port sends must carry the
//!   port's own MAC and one of its own IPv6 sources (its address, its EUI-64 link-local,
//!   or `::` for duplicate address detection); neighbour advertisements may only name the
//!   port's own addresses; router advertisements, redirects, anything but IPv6, and
//!   packets that ask the host to route them to another Machine are dropped. Between
//!   ports, a frame passes only when both are in the same org. The
//!   per-port data lives in sets keyed by the port's name, so a Machine comes and goes by
//!   adding and deleting elements, never by rewriting the table.
//! - `inet berth_host_<bridge>`: what comes in from the bridge to the host itself is
//!   replies, neighbour discovery, echo to the gateway and the operator's allowed ports.
//!
//! Orgs are not marks: each org has its own set of ports and a chain that accepts output
//! ports in it, named by a hash of the org (`g_` + 128 bits of SHA-256), so two orgs can
//! never share a group by a collision of short marks.

use std::net::Ipv6Addr;

use sha2::{Digest, Sha256};

use crate::network::NetworkConfig;
use crate::RuntimeError;

/// The group of a Machine that has no org recorded (made before orgs reached the
/// runtime): such Machines reach each other, and no Machine of an org.
const DEFAULT_GROUP: &str = "g_default";

/// The bridge-family table of a worker's bridge.
pub fn bridge_table(config: &NetworkConfig) -> String {
    format!("berth_isolate_{}", table_suffix(&config.bridge))
}

/// The inet-family table guarding the host against the worker's Machines.
pub fn host_table(config: &NetworkConfig) -> String {
    format!("berth_host_{}", table_suffix(&config.bridge))
}

pub(crate) fn table_suffix(bridge: &str) -> String {
    bridge
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The name of an org's group (set and chain) in the bridge table.
pub fn group_of(org: Option<&str>) -> String {
    match org {
        None => DEFAULT_GROUP.to_owned(),
        Some(org) => {
            let digest = Sha256::digest(org.as_bytes());
            let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
            format!("g_{hex}")
        }
    }
}

/// The bridge table's skeleton and base chains. Re-applying keeps every set's elements
/// (the Machines' ports) and replaces the base chains' rules. `bridge_mac` is the
/// bridge's own MAC: frames to it that ask the host to route to another Machine are
/// dropped (that would go around the org check).
///
/// The kernel may lack `meta ibrname` (CONFIG_NFT_BRIDGE_META), so the table knows its
/// bridge by its ports: the set `ports`. Frames from a port not in it are not checked
/// here, but cannot reach a known port; `berth doctor` reports such ports.
pub fn bridge_ruleset(config: &NetworkConfig, bridge_mac: [u8; 6]) -> String {
    let table = bridge_table(config);
    let prefix = config.prefix;
    let gateway = Ipv6Addr::from(u128::from(prefix.network()) | 1);
    let bridge_mac = format_mac(bridge_mac);
    format!(
        "table bridge {table} {{
    set ports {{ type ifname; }}
    set port_mac {{ type ifname . ether_addr; }}
    set port_ip6 {{ type ifname . ipv6_addr; }}
    set port_nd {{ typeof iifname . @th,64,128; }}
    map port_org {{ type ifname : verdict; }}
    chain prerouting {{ type filter hook prerouting priority -200; policy accept; }}
    chain forward {{ type filter hook forward priority filter; policy accept; }}
    chain from_machine {{ }}
}}
flush chain bridge {table} prerouting
flush chain bridge {table} forward
flush chain bridge {table} from_machine
table bridge {table} {{
    chain prerouting {{
        iifname @ports jump from_machine
    }}
    chain from_machine {{
        iifname . ether saddr != @port_mac drop
        ether type != ip6 drop
        icmpv6 type {{ nd-router-advert, nd-redirect }} drop
        icmpv6 type nd-neighbor-advert iifname . @th,64,128 != @port_nd drop
        ip6 saddr :: icmpv6 type nd-neighbor-solicit iifname . @th,64,128 @port_nd accept
        ip6 saddr :: icmpv6 type {{ mld-listener-report, mld2-listener-report }} accept
        iifname . ip6 saddr != @port_ip6 drop
        ether daddr {bridge_mac} ip6 daddr {prefix} ip6 daddr != {gateway} drop
    }}
    chain forward {{
        iifname vmap @port_org
        iifname @ports drop
        oifname @ports drop
    }}
}}
"
    )
}

/// The host table: new connections from the bridge to the host only to the operator's
/// ports; replies, neighbour discovery and echo to the gateway always. Replaced whole.
pub fn host_ruleset(config: &NetworkConfig) -> String {
    let table = host_table(config);
    let bridge = &config.bridge;
    let gateway = Ipv6Addr::from(u128::from(config.prefix.network()) | 1);
    let mut ports: Vec<u16> = config.allow_host_ports.clone();
    ports.sort_unstable();
    ports.dedup();
    let allowed = if ports.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        format!(
            "        meta l4proto {{ tcp, udp }} th dport {{ {} }} accept\n",
            list.join(", ")
        )
    };
    format!(
        "table inet {table}
delete table inet {table}
table inet {table} {{
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname != \"{bridge}\" accept
        ct state established,related accept
        icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, mld-listener-report, mld2-listener-report }} accept
        icmpv6 type echo-request ip6 daddr {gateway} accept
{allowed}        drop
    }}
}}
"
    )
}

/// Deletes both tables (an operator retiring a worker, tests). Missing is success.
pub fn teardown_ruleset(config: &NetworkConfig) -> String {
    let bridge = bridge_table(config);
    let host = host_table(config);
    format!(
        "table bridge {bridge}
delete table bridge {bridge}
table inet {host}
delete table inet {host}
"
    )
}

/// What a Machine's port may send, and whom it may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// The host-side veth, `bv` + 12 hex digits.
    pub name: String,
    /// The MAC of the Machine's `eth0`.
    pub mac: [u8; 6],
    /// The Machine's address on the worker network.
    pub address: Ipv6Addr,
    pub org: Option<String>,
}

impl Port {
    /// The sources the port may use: its address and the link-local address the kernel
    /// derives from its MAC (EUI-64, the default `addr_gen_mode` of a fresh namespace).
    pub fn sources(&self) -> [Ipv6Addr; 2] {
        [self.address, link_local(self.mac)]
    }
}

/// The EUI-64 link-local address of `mac`.
pub fn link_local(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ])
}

fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One element of a set or map in the bridge table, as listed by `nft -j`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Element {
    pub set: String,
    /// The key's members; the first is the port name.
    pub key: Vec<String>,
}

impl Element {
    /// The key as nft reads it back: the port name quoted, the rest as listed (only
    /// address and number characters are let through).
    fn render(&self) -> Option<String> {
        let (port, rest) = self.key.split_first()?;
        let mut members = vec![format!("\"{port}\"")];
        for member in rest {
            if member.is_empty()
                || !member
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.' || b == b'x')
            {
                return None;
            }
            members.push(member.clone());
        }
        Some(members.join(" . "))
    }
}

/// The elements of `port` in every set and map of the table, from `nft -j list table`.
pub(crate) fn elements_of(listing: &serde_json::Value, port: &str) -> Vec<Element> {
    let mut found = Vec::new();
    let Some(objects) = listing.get("nftables").and_then(|v| v.as_array()) else {
        return found;
    };
    for object in objects {
        let Some(set) = object.get("set").or_else(|| object.get("map")) else {
            continue;
        };
        let Some(name) = set.get("name").and_then(|n| n.as_str()) else {
            continue;
        };
        for elem in set
            .get("elem")
            .and_then(|e| e.as_array())
            .into_iter()
            .flatten()
        {
            if let Some(key) = element_key(elem) {
                if key.first().map(String::as_str) == Some(port) {
                    found.push(Element {
                        set: name.to_owned(),
                        key,
                    });
                }
            }
        }
    }
    found
}

/// A listed element's key: `"bv.."`, `{"concat": [..]}`, a map's `[key, value]`, or any
/// of them wrapped in `{"elem": {"val": ..}}`.
fn element_key(elem: &serde_json::Value) -> Option<Vec<String>> {
    use serde_json::Value;
    match elem {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(pair) => element_key(pair.first()?),
        Value::Object(map) => {
            if let Some(members) = map.get("concat").and_then(|c| c.as_array()) {
                members
                    .iter()
                    .map(|m| match m {
                        Value::String(s) => Some(s.clone()),
                        Value::Number(n) => Some(n.to_string()),
                        _ => None,
                    })
                    .collect()
            } else if let Some(val) = map.get("elem").and_then(|e| e.get("val")) {
                element_key(val)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// One transaction that replaces whatever `existing` holds for the port with `port`'s
/// elements, and makes the port's group if it is the first of its org.
pub(crate) fn attach_script(table: &str, existing: &[Element], port: &Port) -> String {
    let group = group_of(port.org.as_deref());
    let name = &port.name;
    let mut script = format!(
        "add set bridge {table} {group} {{ type ifname; }}
add chain bridge {table} {group}
flush chain bridge {table} {group}
add rule bridge {table} {group} oifname @{group} accept
"
    );
    push_deletes(&mut script, table, existing);
    let sources = port.sources();
    let ip6: Vec<String> = sources
        .iter()
        .map(|a| format!("\"{name}\" . {a}"))
        .collect();
    let nd: Vec<String> = sources
        .iter()
        .map(|a| format!("\"{name}\" . 0x{:032x}", u128::from(*a)))
        .collect();
    script.push_str(&format!(
        "add element bridge {table} ports {{ \"{name}\" }}
add element bridge {table} port_mac {{ \"{name}\" . {mac} }}
add element bridge {table} port_ip6 {{ {ip6} }}
add element bridge {table} port_nd {{ {nd} }}
add element bridge {table} {group} {{ \"{name}\" }}
add element bridge {table} port_org {{ \"{name}\" : jump {group} }}
",
        mac = format_mac(port.mac),
        ip6 = ip6.join(", "),
        nd = nd.join(", "),
    ));
    script
}

/// The transaction that forgets a port; empty when it has nothing.
pub(crate) fn detach_script(table: &str, existing: &[Element]) -> String {
    let mut script = String::new();
    push_deletes(&mut script, table, existing);
    script
}

/// Removes the groups `existing` left empty: a separate transaction, because it fails
/// (and may, harmlessly) when another Machine of the org was attached meanwhile.
pub(crate) fn cleanup_script(
    table: &str,
    listing: &serde_json::Value,
    existing: &[Element],
) -> String {
    let mut script = String::new();
    for element in existing {
        if !element.set.starts_with("g_") {
            continue;
        }
        let others = set_size(listing, &element.set).saturating_sub(1);
        if others == 0 {
            let group = &element.set;
            script.push_str(&format!(
                "flush chain bridge {table} {group}
delete chain bridge {table} {group}
delete set bridge {table} {group}
"
            ));
        }
    }
    script
}

fn set_size(listing: &serde_json::Value, name: &str) -> usize {
    listing
        .get("nftables")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter_map(|object| object.get("set"))
        .filter(|set| set.get("name").and_then(|n| n.as_str()) == Some(name))
        .map(|set| {
            set.get("elem")
                .and_then(|e| e.as_array())
                .map_or(0, Vec::len)
        })
        .sum()
}

fn push_deletes(script: &mut String, table: &str, existing: &[Element]) {
    for element in existing {
        if let Some(key) = element.render() {
            script.push_str(&format!(
                "delete element bridge {table} {} {{ {key} }}\n",
                element.set
            ));
        }
    }
}

/// The bridge table as `nft -j` lists it.
pub(crate) async fn list_bridge_table(table: &str) -> Result<serde_json::Value, RuntimeError> {
    let output = tokio::process::Command::new("nft")
        .args(["-j", "list", "table", "bridge", table])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| RuntimeError::io("run nft (is the nftables package installed?)", e))?;
    if !output.status.success() {
        return Err(RuntimeError::Network {
            context: format!("list nftables table bridge {table}"),
            error: std::io::Error::other(String::from_utf8_lossy(&output.stderr).trim().to_owned()),
        });
    }
    serde_json::from_slice(&output.stdout)
        .map_err(|e| RuntimeError::Internal(format!("parse the listing of {table}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(org: Option<&str>) -> Port {
        Port {
            name: "bv0123456789ab".into(),
            mac: [0x02, 0x11, 0x22, 0x33, 0x44, 0x55],
            address: "fd42::5".parse().unwrap(),
            org: org.map(str::to_owned),
        }
    }

    #[test]
    fn link_local_is_eui64() {
        assert_eq!(
            link_local([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]),
            "fe80::11:22ff:fe33:4455".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn groups_are_per_org_and_never_the_default() {
        assert_eq!(group_of(None), DEFAULT_GROUP);
        assert_eq!(group_of(Some("a")), group_of(Some("a")));
        assert_ne!(group_of(Some("a")), group_of(Some("b")));
        assert_ne!(group_of(Some("")), DEFAULT_GROUP);
        assert_eq!(group_of(Some("a")).len(), 2 + 32);
    }

    #[test]
    fn listed_elements_of_a_port_are_found_and_rendered() {
        let listing: serde_json::Value = serde_json::json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"set": {"name": "port_mac", "elem": [
                {"concat": ["bv0123456789ab", "02:11:22:33:44:55"]},
                {"concat": ["bvffffffffffff", "02:00:00:00:00:01"]}]}},
            {"set": {"name": "port_nd", "elem": [
                {"concat": ["bv0123456789ab", "0xfd420000000000000000000000000005"]}]}},
            {"map": {"name": "port_org", "elem": [
                ["bv0123456789ab", {"jump": {"target": "g_default"}}]]}},
            {"set": {"name": "g_default", "elem": ["bv0123456789ab"]}},
            {"set": {"name": "g_x", "elem": ["bv0123456789ab", "bvffffffffffff"]}},
        ]});
        let found = elements_of(&listing, "bv0123456789ab");
        assert_eq!(found.len(), 5, "{found:?}");
        let script = detach_script("t", &found);
        assert!(script.contains(
            "delete element bridge t port_mac { \"bv0123456789ab\" . 02:11:22:33:44:55 }"
        ));
        assert!(script.contains("delete element bridge t port_org { \"bv0123456789ab\" }"));
        // Only the group the port was alone in goes.
        let cleanup = cleanup_script("t", &listing, &found);
        assert!(cleanup.contains("delete chain bridge t g_default"));
        assert!(!cleanup.contains("g_x"));
        // Nothing odd from a listing reaches a script.
        let hostile = Element {
            set: "port_ip6".into(),
            key: vec!["bv0123456789ab".into(), "x }; flush ruleset".into()],
        };
        assert_eq!(hostile.render(), None);
    }

    #[test]
    fn attach_replaces_and_adds_in_one_script() {
        let existing = vec![Element {
            set: "port_mac".into(),
            key: vec!["bv0123456789ab".into(), "02:aa:aa:aa:aa:aa".into()],
        }];
        let script = attach_script("t", &existing, &port(Some("acme")));
        let group = group_of(Some("acme"));
        assert!(script.contains("delete element bridge t port_mac"));
        assert!(script.contains(&format!(
            "add element bridge t port_org {{ \"bv0123456789ab\" : jump {group} }}"
        )));
        assert!(script.contains("\"bv0123456789ab\" . fe80::11:22ff:fe33:4455"));
        assert!(script.contains("\"bv0123456789ab\" . 0xfd420000000000000000000000000005"));
    }

    #[test]
    fn host_ruleset_opens_only_the_allowed_ports() {
        let mut config = NetworkConfig::new("berth0", "fd00:1:2:3::/64".parse().unwrap());
        let closed = host_ruleset(&config);
        assert!(!closed.contains("dport"));
        assert!(closed.contains("iifname != \"berth0\" accept"));
        config.allow_host_ports = vec![8080, 53, 8080];
        let open = host_ruleset(&config);
        assert!(open.contains("th dport { 53, 8080 } accept"), "{open}");
        assert!(open.contains("ip6 daddr fd00:1:2:3::1 accept"));
    }
}
