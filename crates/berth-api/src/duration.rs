//! Durations on the wire, as the Fly API reads them: a Go duration string such as `"5s"`,
//! `"1m0s"` or `"300ms"`, or a bare number. Fly reads a bare number as nanoseconds (Go's
//! `time.Duration`); Berth read it as seconds. Both readings are kept because they never
//! collide: a number up to 86400 is seconds (no stop or timeout is a few microseconds
//! long), a larger one is nanoseconds.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest duration any field takes; anything past a day is a mistake.
const MAX: Duration = Duration::from_secs(86_400);
/// Bare numbers up to this are seconds, larger ones nanoseconds.
const LARGEST_SECONDS: f64 = 86_400.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiDuration(pub Duration);

impl ApiDuration {
    pub fn as_duration(self) -> Duration {
        self.0
    }

    /// Parses a Go duration (`"1.5s"`, `"250ms"`, `"1m0s"`, `"1h2m3s"`, `"0"`) or a bare
    /// number of seconds written as a string (`"5"`).
    pub fn parse(text: &str) -> Result<ApiDuration, String> {
        let text = text.trim();
        if text.starts_with('-') {
            return Err(format!("duration {text:?} is negative"));
        }
        let body = text.strip_prefix('+').unwrap_or(text);
        if body.is_empty() {
            return Err(format!("{text:?} is not a duration"));
        }
        // Berth's own form: a bare number of seconds.
        if body.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            let seconds: f64 = body
                .parse()
                .map_err(|_| format!("{text:?} is not a duration"))?;
            return Self::from_seconds(seconds, text);
        }
        let mut seconds = 0.0;
        let mut rest = body;
        while !rest.is_empty() {
            let split = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let (number, after) = rest.split_at(split);
            let value: f64 = number
                .parse()
                .map_err(|_| format!("{text:?} is not a duration"))?;
            let unit_len = after
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(after.len());
            let (unit, after) = after.split_at(unit_len);
            let scale = match unit {
                "ns" => 1e-9,
                "us" | "\u{b5}s" | "\u{3bc}s" => 1e-6,
                "ms" => 1e-3,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                "" => return Err(format!("missing unit in duration {text:?}")),
                other => return Err(format!("unknown duration unit {other:?} in {text:?}")),
            };
            seconds += value * scale;
            rest = after;
        }
        Self::from_seconds(seconds, text)
    }

    fn from_seconds(seconds: f64, text: &str) -> Result<ApiDuration, String> {
        if !seconds.is_finite() || !(0.0..=MAX.as_secs_f64()).contains(&seconds) {
            return Err(format!("duration {text:?} is out of range (0 to 24h)"));
        }
        Ok(ApiDuration(Duration::from_secs_f64(seconds)))
    }

    /// A bare JSON number: seconds up to 86400, nanoseconds above (Fly's reading).
    fn from_number(number: f64) -> Result<ApiDuration, String> {
        if number.is_nan() || number < 0.0 {
            return Err("a duration cannot be negative".to_owned());
        }
        if number <= LARGEST_SECONDS {
            Self::from_seconds(number, &number.to_string())
        } else {
            Self::from_seconds(number / 1e9, &format!("{number}ns"))
        }
    }
}

impl fmt::Display for ApiDuration {
    /// In the largest unit that keeps it exact, which Go's `time.ParseDuration` reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        if nanos.is_multiple_of(1_000_000_000) {
            write!(f, "{}s", nanos / 1_000_000_000)
        } else if nanos.is_multiple_of(1_000_000) {
            write!(f, "{}ms", nanos / 1_000_000)
        } else if nanos.is_multiple_of(1_000) {
            write!(f, "{}us", nanos / 1_000)
        } else {
            write!(f, "{nanos}ns")
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
                "a duration: a Go duration string such as \"5s\", \"1m0s\" or \"300ms\", or a \
                 number (up to 86400: seconds, Berth's reading; above: nanoseconds, Fly's)",
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
                f.write_str("a duration such as \"5s\" or \"1m0s\", or a number")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<ApiDuration, E> {
                ApiDuration::parse(text).map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, number: u64) -> Result<ApiDuration, E> {
                // Exact up to 2^53 ns (104 days), past the largest accepted.
                #[allow(clippy::cast_precision_loss)]
                ApiDuration::from_number(number as f64).map_err(E::custom)
            }

            fn visit_i64<E: de::Error>(self, number: i64) -> Result<ApiDuration, E> {
                if number < 0 {
                    return Err(E::custom("a duration cannot be negative"));
                }
                self.visit_u64(number.unsigned_abs())
            }

            fn visit_f64<E: de::Error>(self, number: f64) -> Result<ApiDuration, E> {
                ApiDuration::from_number(number).map_err(E::custom)
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
    fn reads_go_durations_and_nanoseconds_as_fly_sends_them() {
        for (text, expected) in [
            ("\"1m0s\"", Duration::from_secs(60)),
            ("\"1h2m3.5s\"", Duration::from_millis(3_723_500)),
            ("\"300ms\"", Duration::from_millis(300)),
            ("\"1500us\"", Duration::from_micros(1500)),
            ("\"0\"", Duration::ZERO),
            ("\"0s\"", Duration::ZERO),
            ("5000000000", Duration::from_secs(5)),
            ("30000000000.0", Duration::from_secs(30)),
            ("86400", Duration::from_secs(86_400)),
        ] {
            let parsed: ApiDuration = serde_json::from_str(text).expect(text);
            assert_eq!(parsed.0, expected, "{text}");
        }
        for duration in [
            Duration::from_secs(60),
            Duration::from_millis(300),
            Duration::from_micros(7),
            Duration::from_nanos(9),
        ] {
            let text = ApiDuration(duration).to_string();
            assert_eq!(
                ApiDuration::parse(&text),
                Ok(ApiDuration(duration)),
                "{text}"
            );
        }
        assert!(ApiDuration::parse("5").is_ok());
        assert!(ApiDuration::parse("1m0").is_err());
        assert!(ApiDuration::parse("25h").is_err());
        assert!(ApiDuration::parse("-1s").is_err());
    }

    #[test]
    fn refuses_negative_huge_and_garbage() {
        assert!(serde_json::from_str::<ApiDuration>("-1").is_err());
        assert!(serde_json::from_str::<ApiDuration>("1e300").is_err());
        assert!(serde_json::from_str::<ApiDuration>("\"5 parsecs\"").is_err());
        assert!(serde_json::from_str::<ApiDuration>("\"NaNs\"").is_err());
    }
}
