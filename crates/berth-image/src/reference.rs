//! Image references: `[registry[:port]/]repository[:tag][@sha256:<64 hex>]`.
//!
//! The grammar follows the docker/distribution reference grammar, restricted to the
//! sha256 digest algorithm. Names are kept verbatim (no `docker.io/library/` expansion).

use std::fmt;

use crate::error::ImageError;

/// Longest accepted reference text.
pub const MAX_REFERENCE_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference {
    /// Registry host with optional port, e.g. `127.0.0.1:5000`.
    pub registry: Option<String>,
    /// Slash-separated lowercase path, e.g. `team/web`.
    pub repository: String,
    /// The tag; `latest` when neither a tag nor a digest was given.
    pub tag: Option<String>,
    /// `sha256:<64 lowercase hex>`.
    pub digest: Option<String>,
}

impl ImageReference {
    /// Parses and validates a reference.
    pub fn parse(text: &str) -> Result<ImageReference, ImageError> {
        let bad = |reason| ImageError::invalid_reference(text, reason);
        if text.is_empty() {
            return Err(bad("empty reference"));
        }
        if text.len() > MAX_REFERENCE_LEN {
            return Err(bad("reference longer than 255 characters"));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(
                "reference contains whitespace, control or non-ASCII characters",
            ));
        }

        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => {
                if !is_sha256_digest(digest) {
                    return Err(bad("digest must be sha256:<64 lowercase hex>"));
                }
                (rest, Some(digest.to_string()))
            }
            None => (text, None),
        };

        // A ':' after the last '/' separates the tag; earlier ones belong to a port.
        let last_slash = rest.rfind('/');
        let (name, tag) = match rest.rfind(':') {
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
                let tag = &rest[colon + 1..];
                if !is_tag(tag) {
                    return Err(bad("invalid tag"));
                }
                (&rest[..colon], Some(tag.to_string()))
            }
            _ => (rest, None),
        };

        let mut components: Vec<&str> = name.split('/').collect();
        let registry = if components.len() > 1 && looks_like_registry(components[0]) {
            let host = components.remove(0);
            if !is_registry(host) {
                return Err(bad("invalid registry host"));
            }
            Some(host.to_string())
        } else {
            None
        };
        if components.iter().any(|c| !is_path_component(c)) {
            return Err(bad(
                "repository components must be lowercase [a-z0-9] separated by '.', '_', '__' or '-'",
            ));
        }
        let repository = components.join("/");

        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(ImageReference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The canonical text of this reference.
    pub fn name(&self) -> String {
        let mut out = String::new();
        if let Some(registry) = &self.registry {
            out.push_str(registry);
            out.push('/');
        }
        out.push_str(&self.repository);
        if let Some(tag) = &self.tag {
            out.push(':');
            out.push_str(tag);
        }
        if let Some(digest) = &self.digest {
            out.push('@');
            out.push_str(digest);
        }
        out
    }

    /// `[registry/]repository` without tag or digest.
    pub fn repository_name(&self) -> String {
        match &self.registry {
            Some(registry) => format!("{registry}/{}", self.repository),
            None => self.repository.clone(),
        }
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// `sha256:` followed by 64 lowercase hex digits.
pub fn is_sha256_digest(text: &str) -> bool {
    text.strip_prefix("sha256:").is_some_and(is_sha256_hex)
}

/// 64 lowercase hex digits.
pub(crate) fn is_sha256_hex(hex: &str) -> bool {
    hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    match bytes.first() {
        Some(first) if first.is_ascii_alphanumeric() || *first == b'_' => {}
        _ => return false,
    }
    bytes.len() <= MAX_TAG_LEN
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn looks_like_registry(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// `domain-component ('.' domain-component)* (':' port)?`
fn is_registry(host: &str) -> bool {
    let (host, port) = match host.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (host, None),
    };
    if let Some(port) = port {
        let valid_port = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|p| p <= 65535);
        if !valid_port {
            return false;
        }
    }
    !host.is_empty() && host.split('.').all(is_domain_component)
}

fn is_domain_component(c: &str) -> bool {
    let bytes = c.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last))
            if first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric() =>
        {
            bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        }
        _ => false,
    }
}

/// `[a-z0-9]+ (([._]|__|-+) [a-z0-9]+)*`
fn is_path_component(c: &str) -> bool {
    let is_alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = c.as_bytes();
    let mut i = 0;
    let mut expect_alnum = true;
    while i < bytes.len() {
        let start = i;
        if expect_alnum {
            while i < bytes.len() && is_alnum(bytes[i]) {
                i += 1;
            }
            if i == start {
                return false;
            }
        } else {
            while i < bytes.len() && !is_alnum(bytes[i]) {
                i += 1;
            }
            let sep = &c[start..i];
            let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|b| b == b'-');
            // A separator must be followed by another alphanumeric run.
            if !ok || i == bytes.len() {
                return false;
            }
        }
        expect_alnum = !expect_alnum;
    }
    !bytes.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn ok(text: &str) -> ImageReference {
        match ImageReference::parse(text) {
            Ok(r) => r,
            Err(e) => panic!("{text:?} should parse: {e}"),
        }
    }

    fn refused(text: &str) {
        match ImageReference::parse(text) {
            Ok(r) => panic!("{text:?} should be refused, got {r:?}"),
            Err(e) => assert_eq!(e.code(), "invalid_image_ref", "{text:?}: {e}"),
        }
    }

    #[test]
    fn simple_name_defaults_to_latest() {
        let r = ok("busybox");
        assert_eq!(r.registry, None);
        assert_eq!(r.repository, "busybox");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.digest, None);
        assert_eq!(r.name(), "busybox:latest");
        assert_eq!(r.to_string(), "busybox:latest");
    }

    #[test]
    fn tag_and_path() {
        let r = ok("demo/busybox:1");
        assert_eq!(r.registry, None);
        assert_eq!(r.repository, "demo/busybox");
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert_eq!(r.name(), "demo/busybox:1");
    }

    #[test]
    fn registry_with_port_and_digest() {
        let text = format!("127.0.0.1:5000/team/web@sha256:{HEX}");
        let r = ok(&text);
        assert_eq!(r.registry.as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(r.repository, "team/web");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest, Some(format!("sha256:{HEX}")));
        assert_eq!(r.name(), text);
    }

    #[test]
    fn registry_detection() {
        assert_eq!(ok("localhost/x").registry.as_deref(), Some("localhost"));
        assert_eq!(
            ok("localhost:5000/x:2").registry.as_deref(),
            Some("localhost:5000")
        );
        assert_eq!(ok("ghcr.io/a/b").registry.as_deref(), Some("ghcr.io"));
        assert_eq!(
            ok("Registry.Example.com/a").registry.as_deref(),
            Some("Registry.Example.com")
        );
        // A first component without '.' or ':' is part of the repository.
        let r = ok("team/app");
        assert_eq!(r.registry, None);
        assert_eq!(r.repository, "team/app");
        // A lone component is never a registry, so "localhost" is a repository here.
        assert_eq!(ok("localhost").repository, "localhost");
        // "x:latest" is a tag, not a port.
        let r = ok("x:latest");
        assert_eq!(r.registry, None);
        assert_eq!(r.tag.as_deref(), Some("latest"));
    }

    #[test]
    fn tag_and_digest_together() {
        let r = ok(&format!("reg.io:443/a/b:v1.2-rc_3@sha256:{HEX}"));
        assert_eq!(r.registry.as_deref(), Some("reg.io:443"));
        assert_eq!(r.repository, "a/b");
        assert_eq!(r.tag.as_deref(), Some("v1.2-rc_3"));
        assert!(r.digest.is_some());
    }

    #[test]
    fn separators() {
        ok("a.b/c_d/e__f/g-h/i---j");
        ok("a0/9z");
        ok("x:_tag");
        ok("x:Tag.With-Upper_case");
        refused("a..b");
        refused("a___b");
        refused("a._b");
        refused("-a");
        refused("a-");
        refused("a_");
        refused(".a");
    }

    #[test]
    fn invalid_references() {
        refused("");
        refused("Busybox");
        refused("demo/BusyBox:1");
        refused("busy box");
        refused(" busybox");
        refused("busybox\n");
        refused("busybox\t:1");
        refused("busy\0box");
        refused("bü");
        refused("a//b");
        refused("/a");
        refused("a/");
        refused("a:");
        refused("a:-tag");
        refused("a:.tag");
        refused(&format!("a:{}", "t".repeat(129)));
        refused("a@sha256:abc");
        refused(&format!("a@sha256:{}", HEX.to_uppercase()));
        refused(&format!("a@sha512:{HEX}"));
        refused(&format!("a@{HEX}"));
        refused(&format!("a@sha256:{HEX}@sha256:{HEX}"));
        refused("a:b:c");
        refused("host:99999/a");
        refused("host:/a");
        refused("-host.com/a");
        refused("ho_st.com/a");
        refused(&"a".repeat(256));
        refused(&format!("{}/b", "a".repeat(254)));
    }

    #[test]
    fn length_limit_is_inclusive() {
        let name = "a".repeat(255);
        assert_eq!(ok(&name).repository.len(), 255);
        let tag = "t".repeat(128);
        assert_eq!(ok(&format!("a:{tag}")).tag, Some(tag));
    }

    #[test]
    fn round_trips() {
        for text in [
            "x:latest",
            "demo/busybox:1",
            "localhost:5000/a/b:c",
            &format!("127.0.0.1:5000/team/web@sha256:{HEX}"),
        ] {
            assert_eq!(ok(text).name(), text);
            assert_eq!(ok(&ok(text).name()), ok(text));
        }
    }

    #[test]
    fn digest_validation() {
        assert!(is_sha256_digest(&format!("sha256:{HEX}")));
        assert!(!is_sha256_digest(&format!("sha256:{}", &HEX[1..])));
        assert!(!is_sha256_digest(&format!("sha256:{HEX}0")));
        assert!(!is_sha256_digest(&format!("SHA256:{HEX}")));
        assert!(!is_sha256_digest(&format!("sha256:{}g", &HEX[1..])));
    }
}
