//! Validation of everything a client sends, before anything is stored or run. Each
//! refusal names the field path, so a program can fix its request without guessing.

use std::time::Duration;

use berth_api::{CheckType, CreateMachineRequest, MachineCheck, MachineConfig, MachineService};

use crate::signal::signal_number;

pub const MAX_NAME_LEN: usize = 63;
pub const MAX_IMAGE_LEN: usize = 512;
pub const MAX_ARGS: usize = 256;
pub const MAX_ARG_LEN: usize = 16 * 1024;
pub const MAX_ENV: usize = 256;
pub const MAX_ENV_VALUE_LEN: usize = 16 * 1024;
pub const MAX_METADATA: usize = 64;
pub const MAX_METADATA_KEY_LEN: usize = 64;
pub const MAX_METADATA_VALUE_LEN: usize = 1024;
pub const MAX_CPUS: u32 = 64;
pub const MIN_MEMORY_MB: u32 = 16;
pub const MAX_MEMORY_MB: u32 = 256 * 1024;
/// The smallest disk a Machine may ask for: room for a shell's writes and its logs' peers.
pub const MIN_DISK_MB: u32 = 64;
/// 16 TiB: beyond any single worker's disk.
pub const MAX_DISK_MB: u32 = 16 * 1024 * 1024;
pub const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(300);
pub const MAX_RETRIES: u32 = 1000;

/// The drivers a Machine may name in `config.runtime`. Each worker offers some of them
/// (its `runtimes`), and placement matches the two.
pub const RUNTIMES: &[&str] = &["native", "runc", "gvisor"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

/// The message of a missing image, which is a missing field rather than a bad reference.
const IMAGE_REQUIRED: &str = "is required";

impl ConfigError {
    /// The API's error code: a malformed image reference is `invalid_image_ref`, like one
    /// the reference parser refuses; everything else is `invalid_config`.
    pub fn code(&self) -> &'static str {
        if self.field == "config.image" && self.message != IMAGE_REQUIRED {
            "invalid_image_ref"
        } else {
            "invalid_config"
        }
    }
}

/// Volumes a Machine may mount.
const MAX_MOUNTS: usize = 8;

/// `config.mounts`: each an absolute path other than `/` without `..`, no volume or path
/// twice.
fn validate_mounts(mounts: &[berth_api::MachineMount]) -> Result<(), ConfigError> {
    if mounts.len() > MAX_MOUNTS {
        return Err(refuse(
            "config.mounts",
            format!("at most {MAX_MOUNTS} volumes"),
        ));
    }
    for (index, mount) in mounts.iter().enumerate() {
        let path = &mount.path;
        let valid = path.starts_with('/')
            && !path.trim_end_matches('/').is_empty()
            && path.len() <= 1024
            && !path.contains('\0')
            && !path.split('/').any(|part| part == "..");
        if !valid {
            return Err(refuse(
                format!("config.mounts[{index}].path"),
                "must be an absolute path other than / without ..",
            ));
        }
        let earlier = &mounts[..index];
        if earlier.iter().any(|other| other.volume == mount.volume) {
            return Err(refuse(
                format!("config.mounts[{index}].volume"),
                "a volume can be mounted once",
            ));
        }
        if earlier.iter().any(|other| other.path == mount.path) {
            return Err(refuse(
                format!("config.mounts[{index}].path"),
                "two volumes on one path",
            ));
        }
    }
    Ok(())
}

fn refuse(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// App and Machine names: DNS labels, so they can become host names later.
pub fn validate_name(field: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(refuse(
            field,
            format!("must be 1 to {MAX_NAME_LEN} characters"),
        ));
    }
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid_chars || name.starts_with('-') || name.ends_with('-') {
        return Err(refuse(
            field,
            "may hold only lower-case letters, digits and inner hyphens",
        ));
    }
    Ok(())
}

/// Region names are short lower-case words such as `local` or `ams`.
pub fn validate_region(region: &str) -> Result<(), ConfigError> {
    let valid = !region.is_empty()
        && region.len() <= 32
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(refuse(
            "region",
            "must be 1 to 32 lower-case letters, digits or hyphens",
        ))
    }
}

pub fn validate_create(request: &CreateMachineRequest) -> Result<(), ConfigError> {
    if let Some(name) = &request.name {
        validate_name("name", name)?;
    }
    if let Some(region) = &request.region {
        validate_region(region)?;
    }
    validate_config(&request.config)?;
    validate_runtime(&request.config)
}

/// `config.runtime`, at the API's edge: one of [`RUNTIMES`] or none. Workers check only
/// that they offer the driver a Machine names, so a test worker may name its own.
pub fn validate_runtime(config: &MachineConfig) -> Result<(), ConfigError> {
    match &config.runtime {
        Some(runtime) if !RUNTIMES.contains(&runtime.as_str()) => Err(refuse(
            "config.runtime",
            format!(
                "must be one of {}, not {:?}",
                RUNTIMES.join(", "),
                printable(runtime)
            ),
        )),
        _ => Ok(()),
    }
}

fn validate_args(field: &str, args: &[String]) -> Result<(), ConfigError> {
    if args.len() > MAX_ARGS {
        return Err(refuse(field, format!("at most {MAX_ARGS} arguments")));
    }
    for (index, arg) in args.iter().enumerate() {
        if arg.len() > MAX_ARG_LEN {
            return Err(refuse(
                format!("{field}[{index}]"),
                format!("at most {MAX_ARG_LEN} bytes"),
            ));
        }
        if arg.contains('\0') {
            return Err(refuse(format!("{field}[{index}]"), "must not contain NUL"));
        }
    }
    Ok(())
}

/// Most commands in `config.processes`.
const MAX_PROCESSES: usize = 16;

fn validate_env(
    field: &str,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    if env.len() > MAX_ENV {
        return Err(refuse(field, format!("at most {MAX_ENV} variables")));
    }
    for (key, value) in env {
        let valid_key = !key.is_empty()
            && key.len() <= 256
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_key {
            return Err(refuse(
                format!("{field}.{}", printable(key)),
                "names may hold only letters, digits and underscores, and not start with a digit",
            ));
        }
        if value.len() > MAX_ENV_VALUE_LEN || value.contains('\0') {
            return Err(refuse(
                format!("{field}.{key}"),
                format!("values are at most {MAX_ENV_VALUE_LEN} bytes, without NUL"),
            ));
        }
    }
    Ok(())
}

pub fn validate_config(config: &MachineConfig) -> Result<(), ConfigError> {
    let image = config.image.trim();
    if image.is_empty() {
        return Err(refuse("config.image", IMAGE_REQUIRED));
    }
    if config.image.len() > MAX_IMAGE_LEN
        || config
            .image
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(refuse(
            "config.image",
            format!(
                "must be an image reference of at most {MAX_IMAGE_LEN} characters, without spaces"
            ),
        ));
    }
    if let Some(cmd) = &config.init.cmd {
        validate_args("config.init.cmd", cmd)?;
    }
    if let Some(entrypoint) = &config.init.entrypoint {
        validate_args("config.init.entrypoint", entrypoint)?;
    }
    if let Some(exec) = &config.init.exec {
        if exec.is_empty() {
            return Err(refuse("config.init.exec", "must name a command"));
        }
        validate_args("config.init.exec", exec)?;
    }
    validate_env("config.env", &config.env)?;
    if config.processes.len() > MAX_PROCESSES {
        return Err(refuse(
            "config.processes",
            format!("at most {MAX_PROCESSES} processes"),
        ));
    }
    for (index, process) in config.processes.iter().enumerate() {
        let field = |name: &str| format!("config.processes[{index}].{name}");
        for (name, args) in [
            ("cmd", &process.cmd),
            ("entrypoint", &process.entrypoint),
            ("exec", &process.exec),
        ] {
            if let Some(args) = args {
                validate_args(&field(name), args)?;
            }
        }
        validate_env(&field("env"), &process.env)?;
        if let Some(user) = &process.user {
            if user.len() > 256 || user.chars().any(|c| c.is_control()) {
                return Err(refuse(
                    field("user"),
                    "at most 256 characters, without control characters",
                ));
            }
        }
    }
    let guest = &config.guest;
    if guest.cpus == 0 || guest.cpus > MAX_CPUS {
        return Err(refuse(
            "config.guest.cpus",
            format!("must be 1 to {MAX_CPUS}"),
        ));
    }
    // Fly's two kinds; Berth runs both alike (a CPU limit on shared cores) and keeps the
    // name so a client reads back what it sent.
    if let Some(kind) = &guest.cpu_kind {
        if !matches!(kind.as_str(), "shared" | "performance") {
            return Err(refuse(
                "config.guest.cpu_kind",
                "must be \"shared\" or \"performance\"",
            ));
        }
    }
    validate_mounts(&config.mounts)?;
    if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&guest.memory_mb) {
        return Err(refuse(
            "config.guest.memory_mb",
            format!("must be {MIN_MEMORY_MB} to {MAX_MEMORY_MB}"),
        ));
    }
    if guest
        .disk_mb
        .is_some_and(|disk| !(MIN_DISK_MB..=MAX_DISK_MB).contains(&disk))
    {
        return Err(refuse(
            "config.guest.disk_mb",
            format!("must be {MIN_DISK_MB} to {MAX_DISK_MB}"),
        ));
    }
    if config
        .restart
        .max_retries
        .is_some_and(|retries| retries > MAX_RETRIES)
    {
        return Err(refuse(
            "config.restart.max_retries",
            format!("at most {MAX_RETRIES}"),
        ));
    }
    if let Some(signal) = &config.stop_config.signal {
        validate_signal("config.stop_config.signal", signal)?;
    }
    if let Some(timeout) = config.stop_config.timeout {
        validate_stop_timeout("config.stop_config.timeout", timeout.as_duration())?;
    }
    if config.metadata.len() > MAX_METADATA {
        return Err(refuse(
            "config.metadata",
            format!("at most {MAX_METADATA} entries"),
        ));
    }
    for (key, value) in &config.metadata {
        let valid_key = !key.is_empty()
            && key.len() <= MAX_METADATA_KEY_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
        if !valid_key {
            return Err(refuse(
                format!("config.metadata.{}", printable(key)),
                format!("keys are 1 to {MAX_METADATA_KEY_LEN} letters, digits, '_', '-' or '.'"),
            ));
        }
        if value.len() > MAX_METADATA_VALUE_LEN {
            return Err(refuse(
                format!("config.metadata.{key}"),
                format!("values are at most {MAX_METADATA_VALUE_LEN} bytes"),
            ));
        }
    }
    validate_services(&config.services)?;
    validate_checks(&config.checks)?;
    validate_files(&config.files)?;
    if let Some(dns) = &config.dns {
        validate_dns(dns)?;
    }
    Ok(())
}

pub const MAX_FILES: usize = 64;
/// Each file's decoded size; a request body is at most 1 MiB anyway.
pub const MAX_FILE_BYTES: usize = 512 * 1024;
pub const MAX_GUEST_PATH_LEN: usize = 1024;

/// The contents of a `config.files` entry, decoded; `None` when it has none to write.
pub fn file_contents(file: &berth_api::MachineFile) -> Option<Result<Vec<u8>, String>> {
    use base64::Engine;
    let raw = file.raw_value.as_ref()?;
    Some(
        base64::engine::general_purpose::STANDARD
            .decode(raw.trim())
            .map_err(|error| format!("is not base64: {error}")),
    )
}

fn validate_files(files: &[berth_api::MachineFile]) -> Result<(), ConfigError> {
    if files.len() > MAX_FILES {
        return Err(refuse("config.files", format!("at most {MAX_FILES} files")));
    }
    for (index, file) in files.iter().enumerate() {
        let field = |name: &str| format!("config.files[{index}].{name}");
        validate_guest_path(&field("guest_path"), &file.guest_path)?;
        if files[..index]
            .iter()
            .any(|other| other.guest_path == file.guest_path)
        {
            return Err(refuse(field("guest_path"), "is already another file's"));
        }
        if let Some(contents) = file_contents(file) {
            let contents = contents.map_err(|message| refuse(field("raw_value"), message))?;
            if contents.len() > MAX_FILE_BYTES {
                return Err(refuse(
                    field("raw_value"),
                    format!("at most {MAX_FILE_BYTES} bytes once decoded"),
                ));
            }
        }
        if file.mode.is_some_and(|mode| mode > 0o7777) {
            return Err(refuse(
                field("mode"),
                "permission bits as chmod(2) takes them: at most 0o7777 (4095)",
            ));
        }
    }
    Ok(())
}

/// An absolute path of plain names: no `.`, `..`, empty components or NUL, not `/`.
pub fn validate_guest_path(field: &str, path: &str) -> Result<(), ConfigError> {
    let plain = path.len() <= MAX_GUEST_PATH_LEN
        && path.len() > 1
        && path.starts_with('/')
        && !path.contains('\0')
        && path[1..]
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if plain {
        Ok(())
    } else {
        Err(refuse(
            field,
            format!(
                "must be an absolute path of at most {MAX_GUEST_PATH_LEN} bytes, without '.', '..' or empty parts"
            ),
        ))
    }
}

fn validate_dns(dns: &berth_api::DnsConfig) -> Result<(), ConfigError> {
    if dns.nameservers.len() > 3 {
        return Err(refuse(
            "config.dns.nameservers",
            "at most 3 (resolv.conf reads no more)",
        ));
    }
    for (index, server) in dns.nameservers.iter().enumerate() {
        if server.parse::<std::net::IpAddr>().is_err() {
            return Err(refuse(
                format!("config.dns.nameservers[{index}]"),
                "must be an IP address",
            ));
        }
    }
    if dns.searches.len() > 6 {
        return Err(refuse("config.dns.searches", "at most 6 domains"));
    }
    for (index, domain) in dns.searches.iter().enumerate() {
        let valid = !domain.is_empty()
            && domain.len() <= 253
            && domain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !valid {
            return Err(refuse(
                format!("config.dns.searches[{index}]"),
                "must be a domain name",
            ));
        }
    }
    if dns.options.len() > 16 {
        return Err(refuse("config.dns.options", "at most 16 options"));
    }
    for (index, option) in dns.options.iter().enumerate() {
        let word = |text: &str, max: usize| {
            !text.is_empty()
                && text.len() <= max
                && text
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        };
        if !word(&option.name, 64) {
            return Err(refuse(
                format!("config.dns.options[{index}].name"),
                "must be a resolv.conf option name such as ndots or rotate",
            ));
        }
        if option
            .value
            .as_deref()
            .is_some_and(|value| !value.is_empty() && !word(value, 16))
        {
            return Err(refuse(
                format!("config.dns.options[{index}].value"),
                "must be a short word or number",
            ));
        }
    }
    Ok(())
}

pub const MAX_CHECKS: usize = 16;
pub const MAX_CHECK_NAME_LEN: usize = 64;
pub const MAX_CHECK_HEADERS: usize = 32;
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(3600);
pub const MIN_CHECK_TIMEOUT: Duration = Duration::from_millis(1);
pub const MAX_CHECK_TIMEOUT: Duration = Duration::from_secs(60);
pub const MAX_CHECK_GRACE: Duration = Duration::from_secs(3600);
const MAX_CHECK_PATH_LEN: usize = 2048;
const MAX_CHECK_HEADER_LEN: usize = 4096;

fn validate_checks(
    checks: &std::collections::BTreeMap<String, MachineCheck>,
) -> Result<(), ConfigError> {
    if checks.len() > MAX_CHECKS {
        return Err(refuse(
            "config.checks",
            format!("at most {MAX_CHECKS} checks"),
        ));
    }
    for (name, check) in checks {
        let valid_name = !name.is_empty()
            && name.len() <= MAX_CHECK_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
        if !valid_name {
            return Err(refuse(
                format!("config.checks.{}", printable(name)),
                format!("names are 1 to {MAX_CHECK_NAME_LEN} letters, digits, '_', '-' or '.'"),
            ));
        }
        let field = |part: &str| format!("config.checks.{name}.{part}");
        let Some(kind) = check.kind_of_check else {
            return Err(refuse(field("type"), "is required: \"tcp\" or \"http\""));
        };
        if check.port.is_none_or(|port| port == 0) {
            return Err(refuse(field("port"), "is required: 1 to 65535"));
        }
        if !(MIN_CHECK_INTERVAL..=MAX_CHECK_INTERVAL).contains(&check.interval()) {
            return Err(refuse(field("interval"), "must be 1s to 1h"));
        }
        if !(MIN_CHECK_TIMEOUT..=MAX_CHECK_TIMEOUT).contains(&check.timeout()) {
            return Err(refuse(field("timeout"), "must be 1ms to 60s"));
        }
        if check.grace_period() > MAX_CHECK_GRACE {
            return Err(refuse(field("grace_period"), "at most 1h"));
        }
        if kind == CheckType::Tcp {
            continue;
        }
        if let Some(method) = &check.method {
            let token = !method.is_empty()
                && method.len() <= 32
                && method.bytes().all(|b| b.is_ascii_alphabetic());
            if !token {
                return Err(refuse(
                    field("method"),
                    "must be an HTTP method such as GET or HEAD",
                ));
            }
        }
        if let Some(path) = &check.path {
            let valid = path.starts_with('/')
                && path.len() <= MAX_CHECK_PATH_LEN
                && path.bytes().all(|b| b.is_ascii_graphic());
            if !valid {
                return Err(refuse(
                    field("path"),
                    format!(
                        "must start with '/' and be at most {MAX_CHECK_PATH_LEN} visible ASCII characters"
                    ),
                ));
            }
        }
        if check.headers.len() > MAX_CHECK_HEADERS {
            return Err(refuse(
                field("headers"),
                format!("at most {MAX_CHECK_HEADERS} headers"),
            ));
        }
        for (index, header) in check.headers.iter().enumerate() {
            let token = !header.name.is_empty()
                && header.name.len() <= 256
                && header
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !token {
                return Err(refuse(
                    field(&format!("headers[{index}].name")),
                    "must be an HTTP header name",
                ));
            }
            for (value_index, value) in header.values.iter().enumerate() {
                let valid = value.len() <= MAX_CHECK_HEADER_LEN
                    && value
                        .bytes()
                        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
                if !valid {
                    return Err(refuse(
                        field(&format!("headers[{index}].values[{value_index}]")),
                        format!("must be at most {MAX_CHECK_HEADER_LEN} visible ASCII characters"),
                    ));
                }
            }
        }
    }
    Ok(())
}

pub const MAX_SERVICES: usize = 16;
pub const MAX_IDLE_SECONDS: u32 = 7 * 24 * 3600;
pub const MAX_CONCURRENCY: u32 = 100_000;

fn validate_services(services: &[MachineService]) -> Result<(), ConfigError> {
    if services.len() > MAX_SERVICES {
        return Err(refuse(
            "config.services",
            format!("at most {MAX_SERVICES} services"),
        ));
    }
    for (index, service) in services.iter().enumerate() {
        let field = |name: &str| format!("config.services[{index}].{name}");
        if service.internal_port == 0 {
            return Err(refuse(field("internal_port"), "must be 1 to 65535"));
        }
        if services[..index]
            .iter()
            .any(|other| other.internal_port == service.internal_port)
        {
            return Err(refuse(
                field("internal_port"),
                "is already another service's",
            ));
        }
        if service.autostop_idle_seconds == 0 || service.autostop_idle_seconds > MAX_IDLE_SECONDS {
            return Err(refuse(
                field("autostop_idle_seconds"),
                format!("must be 1 to {MAX_IDLE_SECONDS}"),
            ));
        }
        let limits = service.concurrency;
        if limits.hard_limit == 0 || limits.hard_limit > MAX_CONCURRENCY {
            return Err(refuse(
                field("concurrency.hard_limit"),
                format!("must be 1 to {MAX_CONCURRENCY}"),
            ));
        }
        if limits.soft_limit == 0 || limits.soft_limit > limits.hard_limit {
            return Err(refuse(
                field("concurrency.soft_limit"),
                "must be 1 to hard_limit",
            ));
        }
    }
    Ok(())
}

pub fn validate_signal(field: &str, signal: &str) -> Result<i32, ConfigError> {
    signal_number(signal).ok_or_else(|| {
        refuse(
            field,
            "must be one of SIGTERM, SIGINT, SIGQUIT, SIGKILL, SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH",
        )
    })
}

pub fn validate_stop_timeout(field: &str, timeout: Duration) -> Result<(), ConfigError> {
    if timeout > MAX_STOP_TIMEOUT {
        return Err(refuse(
            field,
            format!("at most {}s", MAX_STOP_TIMEOUT.as_secs()),
        ));
    }
    Ok(())
}

/// Keeps error messages readable when a key is garbage.
fn printable(text: &str) -> String {
    text.chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api::GuestConfig;
    use proptest::prelude::*;

    fn config() -> MachineConfig {
        MachineConfig {
            image: "demo/busybox:1".into(),
            ..MachineConfig::default()
        }
    }

    #[test]
    fn checks_are_refused_with_their_field_path() {
        let with = |check: serde_json::Value| {
            let mut config = config();
            config.checks.insert(
                "web".into(),
                serde_json::from_value(check).expect("a check"),
            );
            validate_config(&config).err().map(|error| error.field)
        };
        use serde_json::json;
        assert_eq!(with(json!({"type": "tcp", "port": 80})), None);
        assert_eq!(
            with(
                json!({"type": "http", "port": 80, "path": "/h", "method": "HEAD",
                        "headers": [{"name": "X-A", "values": ["b"]}]})
            ),
            None
        );
        for (check, field) in [
            (json!({"port": 80}), "config.checks.web.type"),
            (json!({"type": "tcp"}), "config.checks.web.port"),
            (json!({"type": "tcp", "port": 0}), "config.checks.web.port"),
            (
                json!({"type": "tcp", "port": 1, "interval": "10ms"}),
                "config.checks.web.interval",
            ),
            (
                json!({"type": "tcp", "port": 1, "timeout": "2m"}),
                "config.checks.web.timeout",
            ),
            (
                json!({"type": "tcp", "port": 1, "grace_period": "2h"}),
                "config.checks.web.grace_period",
            ),
            (
                json!({"type": "http", "port": 1, "path": "health"}),
                "config.checks.web.path",
            ),
            (
                json!({"type": "http", "port": 1, "method": "G T"}),
                "config.checks.web.method",
            ),
            (
                json!({"type": "http", "port": 1, "headers": [{"name": "a b"}]}),
                "config.checks.web.headers[0].name",
            ),
            (
                json!({"type": "http", "port": 1, "headers": [{"name": "a", "values": ["\n"]}]}),
                "config.checks.web.headers[0].values[0]",
            ),
        ] {
            assert_eq!(with(check.clone()).as_deref(), Some(field), "{check}");
        }
        let mut bad_name = config();
        bad_name
            .checks
            .insert("a b".into(), MachineCheck::default());
        assert_eq!(
            validate_config(&bad_name).expect_err("refused").field,
            "config.checks.a b"
        );
    }

    #[test]
    fn a_plain_config_is_valid() {
        assert_eq!(validate_config(&config()), Ok(()));
    }

    #[test]
    fn mounts_need_absolute_paths_and_each_volume_once() {
        let mount = |volume: &str, path: &str| berth_api::MachineMount {
            volume: volume.into(),
            path: path.into(),
            ..Default::default()
        };
        let with = |mounts: Vec<berth_api::MachineMount>| MachineConfig { mounts, ..config() };
        assert!(validate_config(&with(vec![mount("vol_a", "/data")])).is_ok());
        for (mounts, field) in [
            (vec![mount("vol_a", "data")], "config.mounts[0].path"),
            (vec![mount("vol_a", "/")], "config.mounts[0].path"),
            (vec![mount("vol_a", "/a/../etc")], "config.mounts[0].path"),
            (
                vec![mount("vol_a", "/a"), mount("vol_a", "/b")],
                "config.mounts[1].volume",
            ),
            (
                vec![mount("vol_a", "/a"), mount("vol_b", "/a")],
                "config.mounts[1].path",
            ),
        ] {
            assert_eq!(
                validate_config(&with(mounts)).expect_err("refused").field,
                field
            );
        }
    }

    #[test]
    fn a_runtime_is_one_of_the_drivers_or_none() {
        let with = |runtime: Option<&str>| {
            let mut config = config();
            config.runtime = runtime.map(str::to_owned);
            validate_create(&CreateMachineRequest {
                from_checkpoint: None,
                name: None,
                region: None,
                skip_launch: false,
                config,
                skip_secrets: false,
                min_secrets_version: None,
                lease_ttl: None,
            })
        };
        for runtime in [None, Some("native"), Some("runc"), Some("gvisor")] {
            assert_eq!(with(runtime), Ok(()), "{runtime:?}");
        }
        for runtime in ["", "Native", "kata", "runc "] {
            let refused = with(Some(runtime)).expect_err("refused");
            assert_eq!(
                (refused.field.as_str(), refused.code()),
                ("config.runtime", "invalid_config"),
                "{runtime:?}"
            );
        }
    }

    #[test]
    fn refusals_name_the_field() {
        let mut bad = config();
        bad.guest = GuestConfig {
            cpus: 0,
            memory_mb: 256,
            disk_mb: None,
            cpu_kind: None,
        };
        assert_eq!(
            validate_config(&bad).expect_err("refused").field,
            "config.guest.cpus"
        );
        bad.guest = GuestConfig {
            cpu_kind: Some("quantum".into()),
            ..GuestConfig::default()
        };
        assert_eq!(
            validate_config(&bad).expect_err("refused").field,
            "config.guest.cpu_kind"
        );
        bad.guest.cpu_kind = Some("shared".into());
        assert!(validate_config(&bad).is_ok());

        let mut bad = config();
        bad.guest.memory_mb = u32::MAX;
        assert_eq!(
            validate_config(&bad).expect_err("refused").field,
            "config.guest.memory_mb"
        );

        for disk in [0, MIN_DISK_MB - 1, MAX_DISK_MB + 1, u32::MAX] {
            let mut bad = config();
            bad.guest.disk_mb = Some(disk);
            assert_eq!(
                validate_config(&bad).expect_err("refused").field,
                "config.guest.disk_mb"
            );
        }
        let mut good = config();
        good.guest.disk_mb = Some(MIN_DISK_MB);
        assert_eq!(validate_config(&good), Ok(()));

        let mut bad = config();
        bad.env.insert("1BAD".into(), "x".into());
        assert!(validate_config(&bad)
            .expect_err("refused")
            .field
            .starts_with("config.env"));

        let mut bad = config();
        bad.processes = vec![berth_api::MachineProcess::default(); 1];
        bad.processes[0].env.insert("A-B".into(), "x".into());
        assert_eq!(
            validate_config(&bad).expect_err("refused").field,
            "config.processes[0].env.A-B"
        );
        bad.processes = vec![berth_api::MachineProcess::default(); MAX_PROCESSES + 1];
        assert_eq!(
            validate_config(&bad).expect_err("refused").field,
            "config.processes"
        );
        bad.processes.truncate(2);
        bad.processes[1].exec = Some(vec!["a\0b".into()]);
        assert_eq!(
            validate_config(&bad).expect_err("refused").field,
            "config.processes[1].exec[0]"
        );

        let mut bad = config();
        bad.image = String::new();
        let missing = validate_config(&bad).expect_err("refused");
        assert_eq!(missing.field, "config.image");
        assert_eq!(missing.code(), "invalid_config");
        bad.image = "demo/busy box:1".into();
        assert_eq!(
            validate_config(&bad).expect_err("refused").code(),
            "invalid_image_ref"
        );

        let mut bad = config();
        bad.stop_config.signal = Some("SIGSEGV".into());
        assert_eq!(
            validate_config(&bad).expect_err("refused").field,
            "config.stop_config.signal"
        );
    }

    #[test]
    fn services_are_checked_with_their_index() {
        let service: MachineService = serde_json::from_value(serde_json::json!({
            "internal_port": 8080, "protocol": "tcp", "autostart": true, "autostop": "stop",
            "autostop_idle_seconds": 60, "min_machines_running": 0,
            "concurrency": {"type": "requests", "soft_limit": 20, "hard_limit": 25}
        }))
        .expect("Fly's shape parses");
        let mut good = config();
        good.services = vec![service.clone()];
        assert_eq!(validate_config(&good), Ok(()));

        let mut bad = good.clone();
        bad.services.push(service.clone());
        assert_eq!(
            validate_config(&bad).expect_err("refused").field,
            "config.services[1].internal_port"
        );
        let mut bad = good.clone();
        bad.services[0].concurrency.soft_limit = 30;
        assert_eq!(
            validate_config(&bad).expect_err("refused").field,
            "config.services[0].concurrency.soft_limit"
        );
        let mut bad = good.clone();
        bad.services[0].autostop_idle_seconds = 0;
        assert_eq!(
            validate_config(&bad).expect_err("refused").field,
            "config.services[0].autostop_idle_seconds"
        );
        let mut bad = good;
        bad.services[0].internal_port = 0;
        assert_eq!(
            validate_config(&bad).expect_err("refused").field,
            "config.services[0].internal_port"
        );
    }

    #[test]
    fn fly_written_services_parse() {
        let parse = |value: serde_json::Value| serde_json::from_value::<MachineService>(value);
        let service = parse(serde_json::json!({
            "internal_port": 8080, "protocol": "tcp", "autostart": true, "autostop": true,
            "ports": [{"port": 443, "handlers": ["tls", "http"]}],
            "checks": {"alive": {"type": "tcp", "interval": "15s"}}
        }))
        .expect("Fly's shape parses");
        assert_eq!(service.autostop, berth_api::AutostopMode::Stop);
        assert_eq!(service.ports.as_ref().map(Vec::len), Some(1));
        for (autostop, expected) in [
            (serde_json::json!(false), berth_api::AutostopMode::Off),
            (serde_json::json!("off"), berth_api::AutostopMode::Off),
            (serde_json::json!("suspend"), berth_api::AutostopMode::Stop),
        ] {
            let service = parse(serde_json::json!({"internal_port": 1, "autostop": autostop}))
                .expect("parses");
            assert_eq!(service.autostop, expected);
        }
        let refused = parse(serde_json::json!({"internal_port": 1, "autostop": "sometimes"}))
            .expect_err("refused");
        assert!(
            refused.to_string().contains("unknown autostop"),
            "{refused}"
        );
        // Unknown keys are the API parser's to tell or refuse (berth-control's extract
        // tests); the type skips them, as Fly's server does.
        assert!(parse(serde_json::json!({"internal_port": 1, "bogus": 1})).is_ok());
        assert!(parse(serde_json::json!({"internal_port": "80"})).is_err());
    }

    #[test]
    fn names_are_dns_labels() {
        assert!(validate_name("name", "web-1").is_ok());
        for bad in ["", "-web", "web-", "Web", "a b", "../x", &"a".repeat(64)] {
            assert!(validate_name("name", bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn validation_never_panics(name in ".{0,80}", image in ".{0,600}", cpus in any::<u32>(), memory in any::<u32>()) {
            let _ = validate_name("name", &name);
            let mut candidate = config();
            candidate.image = image;
            candidate.guest = GuestConfig { cpus, memory_mb: memory, disk_mb: Some(cpus), cpu_kind: None };
            let _ = validate_config(&candidate);
        }
    }
}
