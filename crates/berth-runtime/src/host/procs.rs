//! The processes of a running Machine, read from the host's /proc: every process whose
//! pid namespace is its init's, with the pid it has inside, its CPU time, memory and the
//! TCP sockets it listens on (from the Machine's own network namespace).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

/// One process of a Machine, as its pid namespace sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineProcess {
    /// The pid inside the Machine's pid namespace.
    pub pid: i32,
    pub command: String,
    /// User and system CPU time, in milliseconds.
    pub cpu_ms: u64,
    pub rss_bytes: u64,
    /// When it started, in milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// `(proto, address:port)` of the TCP sockets it listens on.
    pub listening: Vec<(String, String)>,
}

/// The processes in the pid namespace of `init_pid` (a host pid), init first, by inside
/// pid. Processes that end while they are read are left out.
pub fn machine_processes(init_pid: u32) -> io::Result<Vec<MachineProcess>> {
    let proc_root = PathBuf::from("/proc");
    let namespace = fs::read_link(proc_root.join(format!("{init_pid}/ns/pid")))?;
    let ticks = rustix::param::clock_ticks_per_second().max(1);
    let boot_ms = boot_time_s()?.saturating_mul(1000);
    let page = rustix::param::page_size() as u64;
    let sockets = listening_sockets(init_pid);
    let mut found = Vec::new();
    for entry in fs::read_dir(&proc_root)? {
        let Ok(entry) = entry else { continue };
        let Some(host_pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        // Another namespace, or gone since the listing: not one of the Machine's.
        match fs::read_link(dir.join("ns/pid")) {
            Ok(link) if link == namespace => {}
            _ => continue,
        }
        if let Some(process) = read_process(host_pid, ticks, boot_ms, page, &sockets) {
            found.push(process);
        }
    }
    found.sort_by_key(|process| process.pid);
    Ok(found)
}

fn read_process(
    host_pid: u32,
    ticks: u64,
    boot_ms: u64,
    page: u64,
    sockets: &HashMap<u64, (String, String)>,
) -> Option<MachineProcess> {
    let dir = PathBuf::from(format!("/proc/{host_pid}"));
    let status = fs::read_to_string(dir.join("status")).ok()?;
    // NSpid lists the pid in each namespace from the host's down; the last is the
    // Machine's own.
    let pid = status
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()?;
    let stat = fs::read_to_string(dir.join("stat")).ok()?;
    let (comm, fields) = split_stat(&stat)?;
    let field = |index: usize| -> Option<u64> { fields.get(index)?.parse().ok() };
    // Fields after the name, counted from 0 at the state (stat(5)'s field 3).
    let cpu_ticks = field(11)?.saturating_add(field(12)?);
    let start_ticks = field(19)?;
    let rss_pages = field(21)?;
    let cmdline = fs::read(dir.join("cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|byte| *byte == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    let command = if args.is_empty() {
        format!("[{comm}]")
    } else {
        args.join(" ")
    };
    let mut listening: Vec<(String, String)> = fs::read_dir(dir.join("fd"))
        .into_iter()
        .flatten()
        .filter_map(|fd| fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| socket_inode(&target.to_string_lossy()))
        .filter_map(|inode| sockets.get(&inode).cloned())
        .collect();
    listening.sort();
    listening.dedup();
    Some(MachineProcess {
        pid,
        command,
        cpu_ms: cpu_ticks.saturating_mul(1000) / ticks,
        rss_bytes: rss_pages.saturating_mul(page),
        started_at_ms: boot_ms.saturating_add(start_ticks.saturating_mul(1000) / ticks),
        listening,
    })
}

/// The name and the fields after it; the name may hold spaces and parentheses.
fn split_stat(stat: &str) -> Option<(&str, Vec<&str>)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    Some((comm, stat.get(close + 1..)?.split_whitespace().collect()))
}

/// `socket:[12345]` → 12345.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn boot_time_s() -> io::Result<u64> {
    let stat = fs::read_to_string("/proc/stat")?;
    stat.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no btime in /proc/stat"))
}

/// Listening TCP sockets of the network namespace `pid` is in, by inode.
fn listening_sockets(pid: u32) -> HashMap<u64, (String, String)> {
    let mut sockets = HashMap::new();
    for proto in ["tcp", "tcp6"] {
        let Ok(table) = fs::read_to_string(format!("/proc/{pid}/net/{proto}")) else {
            continue;
        };
        for line in table.lines().skip(1) {
            if let Some((inode, address)) = parse_listen_line(line) {
                sockets.insert(inode, (proto.to_owned(), address));
            }
        }
    }
    sockets
}

/// `(inode, address:port)` of a LISTEN row of /proc/net/tcp or tcp6.
fn parse_listen_line(line: &str) -> Option<(u64, String)> {
    const LISTEN: &str = "0A";
    let fields: Vec<&str> = line.split_whitespace().collect();
    if *fields.get(3)? != LISTEN {
        return None;
    }
    let (address, port) = fields.get(1)?.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let inode = fields.get(9)?.parse().ok()?;
    // The kernel prints each 32-bit word of the address as a number in host byte order.
    let words: Option<Vec<[u8; 4]>> = (0..address.len() / 8)
        .map(|i| {
            let word = u32::from_str_radix(address.get(i * 8..i * 8 + 8)?, 16).ok()?;
            Some(word.to_ne_bytes())
        })
        .collect();
    let bytes: Vec<u8> = words?.concat();
    let text = match bytes.len() {
        4 => format!(
            "{}:{port}",
            Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])
        ),
        16 => {
            let octets: [u8; 16] = bytes.try_into().ok()?;
            format!("[{}]:{port}", Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some((inode, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_rows_read_in_host_byte_order() {
        let v4 = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0";
        let addr = if cfg!(target_endian = "little") {
            "127.0.0.1:8080"
        } else {
            "1.0.0.127:8080"
        };
        assert_eq!(parse_listen_line(v4), Some((4242, addr.to_owned())));
        let established = v4.replace(" 0A ", " 01 ");
        assert_eq!(parse_listen_line(&established), None);
        let v6 = "   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0";
        assert_eq!(parse_listen_line(v6), Some((77, "[::]:80".to_owned())));
    }

    #[test]
    fn stat_names_may_hold_parentheses() {
        let (comm, fields) = split_stat("9 (a (b) c) S 1 9 9 0 -1 0 0 0 0 0 5 7").expect("stat");
        assert_eq!(comm, "a (b) c");
        assert_eq!(fields[0], "S");
        assert_eq!(fields[11], "5");
        assert_eq!(socket_inode("socket:[31]"), Some(31));
        assert_eq!(socket_inode("pipe:[31]"), None);
    }

    /// The test's own process: its pid namespace is the host's, so it is listed with its
    /// own pid and command line.
    #[test]
    fn lists_the_processes_of_a_namespace() {
        let me = std::process::id();
        let listed = machine_processes(me).expect("processes");
        let mine = listed
            .iter()
            .find(|process| process.pid == i32::try_from(me).unwrap_or_default())
            .expect("this process is listed");
        assert!(mine.rss_bytes > 0);
        assert!(mine.started_at_ms > 1_600_000_000_000);
        assert!(!mine.command.is_empty());
    }
}
