//! Orgs, tokens, quotas and rate limits on the wire.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::ToSchema;

/// `POST /v1/orgs`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrgRequest {
    pub slug: String,
    /// The org's display name, as Fly's orgs have one (default: the slug).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub quotas: QuotaOverrides,
    #[serde(default)]
    pub rate_limits: RateLimitOverrides,
}

/// What an org may hold at once. Checked atomically with the action that would pass it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Quotas {
    /// Machines in any state.
    pub max_machines: u64,
    /// Machines starting or started.
    pub max_started_machines: u64,
    /// Sum of `guest.cpus` over started Machines.
    pub max_cpus: u64,
    /// Sum of `guest.memory_mb` over started Machines.
    pub max_memory_mb: u64,
    /// Unpacked size of the image layers the org's Machines use, each distinct layer
    /// counted once per org (a layer shared with another org counts for both).
    #[serde(default)]
    pub max_image_storage_mb: u64,
    /// Volumes that exist, attached or not.
    #[serde(default)]
    pub max_volumes: u64,
    /// Sum of the volumes' provisioned `size_gb`.
    #[serde(default)]
    pub max_volume_gb: u64,
}

/// A GCRA limit: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

/// The limit of each action. The per-Machine actions (start, stop, update, destroy, exec)
/// are counted per token and Machine; create and read per token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RateLimits {
    pub create: RateLimit,
    pub start: RateLimit,
    pub stop: RateLimit,
    pub update: RateLimit,
    pub destroy: RateLimit,
    pub exec: RateLimit,
    pub read: RateLimit,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OrgLimits {
    pub quotas: Quotas,
    pub rate_limits: RateLimits,
}

/// Per-org settings; an absent field falls back to the server's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_machines: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_started_machines: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpus: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_image_storage_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_volumes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_volume_gb: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroy: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<RateLimit>,
}

/// `PUT /v1/orgs/{slug}/limits`: replaces the org's overrides.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetOrgLimitsRequest {
    #[serde(default)]
    pub quotas: QuotaOverrides,
    #[serde(default)]
    pub rate_limits: RateLimitOverrides,
}

/// What an org uses now, in the units of its quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct OrgUsage {
    pub machines: u64,
    pub started_machines: u64,
    pub cpus: u64,
    pub memory_mb: u64,
    #[serde(default)]
    pub volumes: u64,
    /// Sum of the volumes' provisioned `size_gb`.
    #[serde(default)]
    pub volume_gb: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Org {
    pub slug: String,
    /// The display name given at create, or the slug.
    #[serde(default)]
    pub name: String,
    pub created_at: String,
    /// The limits in force: the overrides over the server's defaults.
    pub limits: OrgLimits,
    pub overrides: SetOrgLimitsRequest,
    pub usage: OrgUsage,
}

/// `POST /v1/tokens`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    pub org_slug: String,
    pub name: String,
    /// Seconds, or a string such as `"12h"` or `"30d"`. No expiry when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<ExpiresIn>,
}

/// A token's metadata. The secret itself is never shown again after create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub org_slug: String,
    pub name: String,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

/// The answer to `POST /v1/tokens`: the only time `token` is shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    /// The bearer token. Only its hash is stored.
    pub token: String,
    #[serde(flatten)]
    pub info: TokenInfo,
}

/// A token lifetime: up to ten years, as seconds or `<n>s|m|h|d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExpiresIn(pub u64);

impl ExpiresIn {
    pub const MAX_SECONDS: u64 = 10 * 366 * 86_400;

    pub fn parse(text: &str) -> Result<ExpiresIn, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let value: u64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a lifetime such as \"3600\" or \"30d\""))?;
        let scale = match unit {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            other => return Err(format!("unknown unit {other:?} in {text:?}")),
        };
        ExpiresIn::seconds(value.saturating_mul(scale))
    }

    fn seconds(seconds: u64) -> Result<ExpiresIn, String> {
        if seconds == 0 || seconds > Self::MAX_SECONDS {
            return Err(format!(
                "a token lifetime is 1 s to {} s (ten years)",
                Self::MAX_SECONDS
            ));
        }
        Ok(ExpiresIn(seconds))
    }
}

impl Serialize for ExpiresIn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ExpiresIn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ExpiresVisitor;
        impl Visitor<'_> for ExpiresVisitor {
            type Value = ExpiresIn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("seconds as an integer, or a string such as \"12h\" or \"30d\"")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<ExpiresIn, E> {
                ExpiresIn::parse(text).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, seconds: u64) -> Result<ExpiresIn, E> {
                ExpiresIn::seconds(seconds).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, seconds: i64) -> Result<ExpiresIn, E> {
                u64::try_from(seconds)
                    .map_err(|_| E::custom("a token lifetime cannot be negative"))
                    .and_then(|seconds| self.visit_u64(seconds))
            }
        }
        deserializer.deserialize_any(ExpiresVisitor)
    }
}

impl utoipa::PartialSchema for ExpiresIn {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::SchemaType::Type(
                utoipa::openapi::schema::Type::String,
            ))
            .description(Some("seconds, or a string such as \"12h\" or \"30d\""))
            .into()
    }
}

impl utoipa::ToSchema for ExpiresIn {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_parse_and_refuse_garbage() {
        let parsed: ExpiresIn = serde_json::from_str("\"30d\"").expect("parses");
        assert_eq!(parsed.0, 30 * 86_400);
        let parsed: ExpiresIn = serde_json::from_str("60").expect("parses");
        assert_eq!(parsed.0, 60);
        assert!(serde_json::from_str::<ExpiresIn>("0").is_err());
        assert!(serde_json::from_str::<ExpiresIn>("-5").is_err());
        assert!(serde_json::from_str::<ExpiresIn>("99999999999999999999").is_err());
        assert!(serde_json::from_str::<ExpiresIn>("\"5 weeks\"").is_err());
        assert!(serde_json::from_str::<ExpiresIn>("\"999999999999d\"").is_err());
    }
}
