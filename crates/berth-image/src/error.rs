//! Errors of the image crate, each with a stable API code.

use std::io;

/// The retry hint given with `registry_unreachable`.
pub const REGISTRY_RETRY_AFTER_MS: u64 = 2000;

/// Everything that can go wrong while parsing references, importing, resolving or
/// unpacking images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No tag, name or digest like this in the store.
    #[error("image not found: {0}")]
    NotFound(String),
    /// The text is not a valid image reference.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The offending text (shortened when long).
        reference: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Bad layout, manifest or config, digest or size mismatch, unsupported media type,
    /// or a layer entry that is unsafe or over the limits.
    #[error("invalid image: {0}")]
    Invalid(String),
    /// An image index without a manifest for this host's platform.
    #[error("image has no manifest for platform {0}")]
    PlatformUnsupported(String),
    /// A layer or image unpacks to more than a limit allows: its ratio to the compressed
    /// size, the per-layer or per-image cap, or what the org may still store. Nothing of
    /// it is kept.
    #[error("image too large: {0}")]
    TooLarge(String),
    /// The disk or the quota is full.
    #[error("insufficient storage while {context}: {source}")]
    InsufficientStorage {
        /// What was being done.
        context: String,
        /// The underlying error (ENOSPC or EDQUOT).
        #[source]
        source: io::Error,
    },
    /// Any other I/O failure.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The registry refused the credentials (or their absence): HTTP 401 or 403.
    #[error("registry {registry} refused access: {message}")]
    RegistryUnauthorized {
        /// `host[:port]`.
        registry: String,
        /// What the registry said.
        message: String,
    },
    /// The registry could not be reached, timed out, broke off, or answered 5xx/429.
    #[error("registry {registry} is unreachable: {message}")]
    RegistryUnreachable {
        /// `host[:port]`.
        registry: String,
        /// What went wrong.
        message: String,
    },
    /// An org token asked for a registry the operator does not allow.
    #[error("registry {registry} is not allowed: org tokens pull only from registries the operator allows (--allow-registry), and never from loopback or private addresses it has not listed")]
    RegistryRefused {
        /// `host[:port]`.
        registry: String,
    },
    /// A failure that is neither the caller's nor the image's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ImageError {
    /// The stable API error code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            ImageError::NotFound(_) => "image_not_found",
            ImageError::InvalidReference { .. } => "invalid_image_ref",
            ImageError::Invalid(_) => "invalid_image",
            ImageError::TooLarge(_) => "image_too_large",
            ImageError::PlatformUnsupported(_) => "image_platform_unsupported",
            ImageError::InsufficientStorage { .. } => "insufficient_storage",
            ImageError::RegistryUnauthorized { .. } => "registry_unauthorized",
            ImageError::RegistryUnreachable { .. } => "registry_unreachable",
            ImageError::RegistryRefused { .. } => "registry_not_allowed",
            ImageError::Io { .. } | ImageError::Internal(_) => "internal",
        }
    }

    /// How long a client should wait before retrying, when retrying can help.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            ImageError::RegistryUnreachable { .. } => Some(REGISTRY_RETRY_AFTER_MS),
            _ => None,
        }
    }

    /// Wraps an I/O error, classifying a full disk or quota as `insufficient_storage`.
    pub fn io(context: impl Into<String>, source: io::Error) -> ImageError {
        let context = context.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
                ImageError::InsufficientStorage { context, source }
            }
            _ => ImageError::Io { context, source },
        }
    }

    /// Wraps a raw errno from a `*at` call.
    pub(crate) fn errno(context: impl Into<String>, errno: rustix::io::Errno) -> ImageError {
        ImageError::io(context, io::Error::from_raw_os_error(errno.raw_os_error()))
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> ImageError {
        ImageError::Invalid(msg.into())
    }

    pub(crate) fn invalid_reference(reference: &str, reason: &'static str) -> ImageError {
        ImageError::InvalidReference {
            reference: shorten(reference),
            reason,
        }
    }
}

/// Caps attacker-controlled text quoted in error messages.
pub(crate) fn shorten(text: &str) -> String {
    const MAX: usize = 256;
    if text.len() <= MAX {
        return text.to_string();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// Renders attacker-controlled bytes (such as a tar path) for an error message.
pub(crate) fn show_bytes(bytes: &[u8]) -> String {
    shorten(&String::from_utf8_lossy(bytes))
        .escape_debug()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable() {
        assert_eq!(ImageError::NotFound("x".into()).code(), "image_not_found");
        assert_eq!(
            ImageError::invalid_reference("X", "uppercase").code(),
            "invalid_image_ref"
        );
        assert_eq!(ImageError::invalid("bad").code(), "invalid_image");
        assert_eq!(ImageError::TooLarge("big".into()).code(), "image_too_large");
        assert_eq!(
            ImageError::PlatformUnsupported("linux/amd64".into()).code(),
            "image_platform_unsupported"
        );
        assert_eq!(
            ImageError::io("writing", io::Error::from_raw_os_error(libc::ENOSPC)).code(),
            "insufficient_storage"
        );
        assert_eq!(
            ImageError::io("writing", io::Error::from_raw_os_error(libc::EDQUOT)).code(),
            "insufficient_storage"
        );
        assert_eq!(
            ImageError::io("reading", io::Error::from_raw_os_error(libc::EIO)).code(),
            "internal"
        );
        assert_eq!(ImageError::Internal("x".into()).code(), "internal");
        let unreachable = ImageError::RegistryUnreachable {
            registry: "r".into(),
            message: "down".into(),
        };
        assert_eq!(unreachable.code(), "registry_unreachable");
        assert_eq!(unreachable.retry_after_ms(), Some(REGISTRY_RETRY_AFTER_MS));
        let unauthorized = ImageError::RegistryUnauthorized {
            registry: "r".into(),
            message: "no".into(),
        };
        assert_eq!(unauthorized.code(), "registry_unauthorized");
        assert_eq!(unauthorized.retry_after_ms(), None);
    }

    #[test]
    fn long_text_is_shortened() {
        let long = "é".repeat(500);
        let short = shorten(&long);
        assert!(short.len() < 300);
        assert!(short.ends_with("..."));
    }
}
