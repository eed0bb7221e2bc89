//! Where Berth's cgroups sit on the host, which the native driver makes and the doctor's
//! inventory finds.

/// On a v2 host where Berth enables controllers, the leaf below its own cgroup that it
/// moves itself into (a cgroup handing controllers to children may hold no process).
/// Discovery takes a process found in it as one of its parent.
pub const AGENT_LEAF: &str = "berth-agent";

/// The cgroup whose `berth/` holds the Machines, for a process in the v2 cgroup `path`
/// (a `/proc/<pid>/cgroup` path): its parent when it is [`AGENT_LEAF`], else itself.
pub fn agent_base(path: &str) -> &str {
    match path.strip_suffix(AGENT_LEAF) {
        Some(parent) if parent.ends_with('/') => match parent.trim_end_matches('/') {
            "" => "/",
            parent => parent,
        },
        _ => path,
    }
}
