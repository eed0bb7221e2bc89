//! Durations on the wire: a number of seconds, or a Go-style string such as `"5s"` or
//! `"250ms"`, as the Fly API accepts for `stop_config.timeout`.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiDuration(pub Duration);

impl ApiDuration {
    pub fn as_duration(self) -> Duration {
        self.0
    }

    /// Parses `"1.5s"`, `"250ms"`, `"2m"`, `"1h"` or a bare number of seconds.
    pub fn parse(text: &str) -> Result<ApiDuration, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a duration"))?;
        let scale = match unit {
            "" | "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "m" => 60.0,
            "h" => 3600.0,
            other => return Err(format!("unknown duration unit {other:?} in {text:?}")),
        };
        let seconds = value * scale;
        // Anything past a day is a mistake, and huge values would overflow Duration.
        if !seconds.is_finite() || !(0.0..=86_400.0).contains(&seconds) {
            return Err(format!("duration {text:?} is out of range (0 to 24h)"));
        }
        Ok(ApiDuration(Duration::from_secs_f64(seconds)))
    }
}

impl fmt::Display for ApiDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.0.as_millis();
        if millis.is_multiple_of(1000) {
            write!(f, "{}s", millis / 1000)
        } else {
            write!(f, "{millis}ms")
        }
    }
}

impl utoipa::PartialSchema for ApiDuration {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::SchemaType::Type(
                utoipa::openapi::schema::Type::String,
            ))
            .description(Some(
                "a duration: seconds as a number, or a string such as \"5s\" or \"250ms\"",
            ))
            .into()
    }
}

impl utoipa::ToSchema for ApiDuration {}

impl Serialize for ApiDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ApiDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;

        impl Visitor<'_> for DurationVisitor {
            type Value = ApiDuration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("seconds as a number, or a string such as \"5s\" or \"250ms\"")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<ApiDuration, E> {
                ApiDuration::parse(text).map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, seconds: u64) -> Result<ApiDuration, E> {
                ApiDuration::parse(&seconds.to_string()).map_err(E::custom)
            }

            fn visit_i64<E: de::Error>(self, seconds: i64) -> Result<ApiDuration, E> {
                if seconds < 0 {
                    return Err(E::custom("a duration cannot be negative"));
                }
                self.visit_u64(seconds.unsigned_abs())
            }

            fn visit_f64<E: de::Error>(self, seconds: f64) -> Result<ApiDuration, E> {
                ApiDuration::parse(&seconds.to_string()).map_err(E::custom)
            }
        }

        deserializer.deserialize_any(DurationVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_strings_and_numbers() {
        let parsed: ApiDuration = serde_json::from_str("\"250ms\"").expect("parses");
        assert_eq!(parsed.0, Duration::from_millis(250));
        let parsed: ApiDuration = serde_json::from_str("7").expect("parses");
        assert_eq!(parsed.0, Duration::from_secs(7));
        assert_eq!(ApiDuration(Duration::from_secs(5)).to_string(), "5s");
    }

    #[test]
    fn refuses_negative_huge_and_garbage() {
        assert!(serde_json::from_str::<ApiDuration>("-1").is_err());
        assert!(serde_json::from_str::<ApiDuration>("1e300").is_err());
        assert!(serde_json::from_str::<ApiDuration>("\"5 parsecs\"").is_err());
        assert!(serde_json::from_str::<ApiDuration>("\"NaNs\"").is_err());
    }
}
