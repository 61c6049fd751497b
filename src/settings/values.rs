//! Humane values in settings files (`"30s"`, `"1h30m"`, `"4GiB"`) and the serde adapters that
//! read and write them.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use crate::completion::{Backoff, CompletionPolicy, NotificationType};
use crate::config::CommitPoint;

/// Duration units, smallest first, with their length in nanoseconds.
const DURATION_UNITS: [(&str, u128); 7] = [
    ("ns", 1),
    ("us", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60 * 1_000_000_000),
    ("h", 60 * 60 * 1_000_000_000),
    ("d", 24 * 60 * 60 * 1_000_000_000),
];

/// Parses `"30s"`, `"1h30m"`, `"500ms"`, `"14d"`, `"1h 30m"`.
pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = |reason: &str| format!("invalid duration {text:?}: {reason}");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(invalid(
            "it is empty; write a number and a unit, such as \"30s\"",
        ));
    }
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(invalid("expected a number before each unit"));
        }
        let (number, tail) = rest.split_at(digits);
        let number: u128 = number
            .parse()
            .map_err(|_| invalid("the number is too large"))?;
        let tail = tail.trim_start();
        let letters = tail
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(letters);
        let length = match DURATION_UNITS.iter().find(|(name, _)| *name == unit) {
            Some((_, length)) => *length,
            None if unit.is_empty() => {
                return Err(invalid(&format!(
                    "{number} has no unit (ns, us, ms, s, m, h or d)"
                )));
            }
            None => {
                return Err(invalid(&format!(
                    "unknown unit {unit:?} (expected ns, us, ms, s, m, h or d)"
                )));
            }
        };
        nanos = number
            .checked_mul(length)
            .and_then(|part| nanos.checked_add(part))
            .ok_or_else(|| invalid("it is too long"))?;
        rest = tail.trim_start();
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| invalid("it is too long"))?;
    // The remainder is below a second, so it fits.
    let subsec = (nanos % 1_000_000_000) as u32;
    Ok(Duration::new(secs, subsec))
}

/// Writes a duration the way [`parse_duration`] reads it, largest unit first: `"1h30m"`.
pub(super) fn format_duration(duration: Duration) -> String {
    let mut nanos = duration.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    let mut text = String::new();
    for (unit, length) in DURATION_UNITS.iter().rev() {
        let count = nanos / length;
        if count > 0 {
            text.push_str(&format!("{count}{unit}"));
            nanos %= length;
        }
    }
    text
}

/// Parses `"16M"`, `"4GiB"`, `"512 KiB"`, `"10MB"`, `"1024"`.
pub(super) fn parse_size(text: &str) -> Result<u64, String> {
    let invalid = |reason: &str| format!("invalid size {text:?}: {reason}");
    let trimmed = text.trim();
    let digits = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    if digits == 0 {
        return Err(invalid(
            "expected a number of bytes, optionally with a unit, such as \"16MiB\"",
        ));
    }
    let (number, unit) = trimmed.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| invalid("the number is too large"))?;
    let factor: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(invalid(&format!(
                "unknown unit {:?} (expected B, K, M, G, T, KiB, MiB, GiB, TiB, KB, MB, GB or TB)",
                unit.trim_start()
            )));
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| invalid("it is too large"))
}

/// A [`Duration`] as a humane string.
struct Humane(Duration);

impl Serialize for Humane {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Humane {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HumaneVisitor;

        impl Visitor<'_> for HumaneVisitor {
            type Value = Humane;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\", \"1h30m\" or \"14d\"")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Humane, E> {
                parse_duration(text).map(Humane).map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, number: u64) -> Result<Humane, E> {
                Err(E::custom(format!(
                    "invalid duration {number}: it has no unit; write \"{number}s\" for seconds"
                )))
            }

            fn visit_i64<E: de::Error>(self, number: i64) -> Result<Humane, E> {
                match u64::try_from(number) {
                    Ok(number) => self.visit_u64(number),
                    Err(_) => Err(E::custom(format!(
                        "invalid duration {number}: expected a string such as \"30s\""
                    ))),
                }
            }
        }

        deserializer.deserialize_any(HumaneVisitor)
    }
}

/// A byte count, from an integer or a humane string.
struct Bytes(u64);

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BytesVisitor;

        impl Visitor<'_> for BytesVisitor {
            type Value = Bytes;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of bytes, or a size such as \"16MiB\" or \"4GiB\"")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Bytes, E> {
                parse_size(text).map(Bytes).map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, number: u64) -> Result<Bytes, E> {
                Ok(Bytes(number))
            }

            fn visit_i64<E: de::Error>(self, number: i64) -> Result<Bytes, E> {
                u64::try_from(number).map(Bytes).map_err(|_| {
                    E::custom(format!("invalid size {number}: it must not be negative"))
                })
            }
        }

        deserializer.deserialize_any(BytesVisitor)
    }
}

/// `serde(with)` for an optional humane [`Duration`].
pub(super) mod duration {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        value.map(Humane).serialize(serializer)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<Humane>::deserialize(deserializer)?.map(|humane| humane.0))
    }
}

/// `serde(with)` for an optional size in bytes (written back as a plain integer).
pub(super) mod size {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(
        value: &Option<u64>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        value.serialize(serializer)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<u64>, D::Error> {
        Ok(Option::<Bytes>::deserialize(deserializer)?.map(|bytes| bytes.0))
    }
}

/// `serde(with)` for an optional [`CommitPoint`]: `"last_fragment"` or `"close_session"`.
pub(super) mod commit_point {
    use super::*;

    #[derive(Deserialize, Serialize)]
    #[serde(rename_all = "snake_case")]
    enum Name {
        LastFragment,
        CloseSession,
    }

    pub(crate) fn serialize<S: Serializer>(
        value: &Option<CommitPoint>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        value
            .map(|point| match point {
                CommitPoint::LastFragment => Name::LastFragment,
                CommitPoint::CloseSession => Name::CloseSession,
            })
            .serialize(serializer)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<CommitPoint>, D::Error> {
        Ok(
            Option::<Name>::deserialize(deserializer)?.map(|name| match name {
                Name::LastFragment => CommitPoint::LastFragment,
                Name::CloseSession => CommitPoint::CloseSession,
            }),
        )
    }
}

/// `serde(with)` for a [`NotificationType`]: `"by_reference"` or `"by_value"`.
pub(super) mod notification_type {
    use super::*;

    #[derive(Deserialize, Serialize)]
    #[serde(rename_all = "snake_case")]
    enum Name {
        ByReference,
        ByValue,
    }

    pub(crate) fn serialize<S: Serializer>(
        value: &NotificationType,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            NotificationType::ByReference => Name::ByReference,
            NotificationType::ByValue => Name::ByValue,
        }
        .serialize(serializer)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<NotificationType, D::Error> {
        Ok(match Name::deserialize(deserializer)? {
            Name::ByReference => NotificationType::ByReference,
            Name::ByValue => NotificationType::ByValue,
        })
    }
}

/// `serde(with)` for an optional [`CompletionPolicy`]: `"reject"`, `"retry_later"`,
/// `"defer"`, or `{ defer = { first, max, attempts } }`.
pub(super) mod completion_policy {
    use super::*;

    const NAMES: &[&str] = &["reject", "retry_later", "defer"];

    /// The retry schedule of `defer`; each key left out keeps [`Backoff::default`]'s.
    #[derive(Default, Deserialize, Serialize)]
    #[serde(default, deny_unknown_fields)]
    struct BackoffSettings {
        #[serde(with = "super::duration")]
        first: Option<Duration>,
        #[serde(with = "super::duration")]
        max: Option<Duration>,
        attempts: Option<u32>,
    }

    impl From<BackoffSettings> for Backoff {
        fn from(settings: BackoffSettings) -> Self {
            let default = Backoff::default();
            Backoff::new(
                settings.first.unwrap_or(default.first),
                settings.max.unwrap_or(default.max),
                settings.attempts.unwrap_or(default.attempts),
            )
        }
    }

    struct Policy(CompletionPolicy);

    impl Serialize for Policy {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            match self.0 {
                CompletionPolicy::Reject => serializer.serialize_str("reject"),
                CompletionPolicy::RetryLater => serializer.serialize_str("retry_later"),
                CompletionPolicy::Defer(backoff) => {
                    let mut map = serializer.serialize_map(Some(1))?;
                    map.serialize_entry(
                        "defer",
                        &BackoffSettings {
                            first: Some(backoff.first),
                            max: Some(backoff.max),
                            attempts: Some(backoff.attempts),
                        },
                    )?;
                    map.end()
                }
            }
        }
    }

    impl<'de> Deserialize<'de> for Policy {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct PolicyVisitor;

            impl<'de> Visitor<'de> for PolicyVisitor {
                type Value = Policy;

                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str(
                        "\"reject\", \"retry_later\", \"defer\" or { defer = { first, max, \
                         attempts } }",
                    )
                }

                fn visit_str<E: de::Error>(self, name: &str) -> Result<Policy, E> {
                    match name {
                        "reject" => Ok(Policy(CompletionPolicy::Reject)),
                        "retry_later" => Ok(Policy(CompletionPolicy::RetryLater)),
                        "defer" => Ok(Policy(CompletionPolicy::Defer(Backoff::default()))),
                        other => Err(E::unknown_variant(other, NAMES)),
                    }
                }

                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Policy, A::Error> {
                    let Some(name) = map.next_key::<String>()? else {
                        return Err(de::Error::custom(
                            "expected { defer = { first, max, attempts } }",
                        ));
                    };
                    if name != "defer" {
                        return Err(de::Error::unknown_variant(&name, &["defer"]));
                    }
                    let backoff: BackoffSettings = map.next_value()?;
                    if map.next_key::<de::IgnoredAny>()?.is_some() {
                        return Err(de::Error::custom(
                            "expected one key, defer: { defer = { first, max, attempts } }",
                        ));
                    }
                    Ok(Policy(CompletionPolicy::Defer(backoff.into())))
                }
            }

            deserializer.deserialize_any(PolicyVisitor)
        }
    }

    pub(crate) fn serialize<S: Serializer>(
        value: &Option<CompletionPolicy>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        value.map(Policy).serialize(serializer)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<CompletionPolicy>, D::Error> {
        Ok(Option::<Policy>::deserialize(deserializer)?.map(|policy| policy.0))
    }
}
