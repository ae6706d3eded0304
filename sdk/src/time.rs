//! Time for policies: durations written as in Kubernetes and Go (`30s`, `5m`,
//! `1h30m`), and RFC 3339 timestamps. Policies have no clock: `input.now` is the
//! only "now" there is, which keeps every node's answer the same.

use alloc::string::String;
use core::fmt;

use crate::Timestamp;

/// A non-negative span of time with millisecond precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Duration {
    ms: u64,
}

impl Duration {
    /// Zero.
    pub const ZERO: Duration = Duration { ms: 0 };

    /// From milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Duration { ms }
    }

    /// From seconds.
    pub const fn from_secs(s: u64) -> Self {
        Duration { ms: s * 1000 }
    }

    /// In milliseconds.
    pub const fn as_millis(self) -> u64 {
        self.ms
    }

    /// Parse `500ms`, `30s`, `5m`, `2h`, or a sum such as `1h30m`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || alloc::format!("invalid duration {text:?}: expected e.g. \"30s\", \"5m\", \"1h30m\"");
        let mut rest = text.trim();
        if rest.is_empty() {
            return Err(bad());
        }
        let mut ms: u64 = 0;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
            if digits == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
            let factor = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                _ => return Err(bad()),
            };
            rest = &rest[unit_len..];
            ms = n
                .checked_mul(factor)
                .and_then(|v| ms.checked_add(v))
                .ok_or_else(bad)?;
        }
        Ok(Duration { ms })
    }
}

impl fmt::Display for Duration {
    /// `4m12s`, `1h`, `250ms`, `0s`: the largest units, seconds rounded down past a minute.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.ms;
        if ms < 1000 {
            return if ms == 0 { write!(f, "0s") } else { write!(f, "{ms}ms") };
        }
        let total_s = ms / 1000;
        let (h, m, s) = (total_s / 3600, (total_s % 3600) / 60, total_s % 60);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if s > 0 || (h == 0 && m == 0) {
            write!(f, "{s}s")?;
        }
        Ok(())
    }
}

impl schemars::JsonSchema for Duration {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> alloc::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^([0-9]+(ms|s|m|h))+$",
            "description": "A duration: a number and a unit (ms, s, m, h), repeated, e.g. \"30s\", \"1h30m\"."
        })
    }
}

impl<'de> serde::Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        Duration::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Timestamp {
    /// From milliseconds since the Unix epoch.
    pub fn from_millis(ms: i64) -> Self {
        Timestamp {
            seconds: ms.div_euclid(1000),
            nanos: (ms.rem_euclid(1000) as u32) * 1_000_000,
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn as_millis(&self) -> i64 {
        self.seconds * 1000 + i64::from(self.nanos / 1_000_000)
    }

    /// The time from `earlier` to `self`; zero if `earlier` is later.
    pub fn since(&self, earlier: &Timestamp) -> Duration {
        Duration::from_millis(self.as_millis().saturating_sub(earlier.as_millis()).max(0) as u64)
    }

    /// `self` plus `d`.
    pub fn plus(&self, d: Duration) -> Timestamp {
        Timestamp::from_millis(self.as_millis().saturating_add(d.as_millis() as i64))
    }

    /// Parse an RFC 3339 time such as `2026-11-26T10:00:00Z` or `2026-11-26T11:00:00.5+01:00`.
    pub fn parse_rfc3339(text: &str) -> Result<Self, String> {
        let bad = || alloc::format!("invalid time {text:?}: expected RFC 3339, e.g. \"2026-11-26T10:00:00Z\"");
        let b = text.as_bytes();
        if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
            return Err(bad());
        }
        let num = |r: core::ops::Range<usize>| -> Result<i64, String> {
            let s = text.get(r).ok_or_else(bad)?;
            if !s.bytes().all(|c| c.is_ascii_digit()) {
                return Err(bad());
            }
            s.parse::<i64>().map_err(|_| bad())
        };
        let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
            return Err(bad());
        }
        let mut i = 19;
        let mut nanos: u32 = 0;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            if i == start {
                return Err(bad());
            }
            let frac = &text[start..i.min(start + 9)];
            nanos = frac.parse::<u32>().map_err(|_| bad())? * 10u32.pow(9 - frac.len() as u32);
        }
        let offset_s: i64 = match b.get(i) {
            Some(b'Z' | b'z') if i + 1 == b.len() => 0,
            Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
                let o = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
                if *sign == b'+' { o } else { -o }
            }
            _ => return Err(bad()),
        };
        let days = days_from_civil(year, month, day);
        let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_s;
        Ok(Timestamp { seconds, nanos })
    }
}

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC, e.g. `2026-11-26T10:00:00Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.seconds.div_euclid(86_400);
        let secs = self.seconds.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        write!(f, "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", secs / 3600, (secs % 3600) / 60, secs % 60)?;
        if self.nanos != 0 {
            write!(f, ".{:03}", self.nanos / 1_000_000)?;
        }
        write!(f, "Z")
    }
}

impl schemars::JsonSchema for Timestamp {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> alloc::borrow::Cow<'static, str> {
        "Timestamp".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "format": "date-time",
            "description": "A point in time, RFC 3339, e.g. \"2026-11-26T10:00:00Z\"."
        })
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        Timestamp::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

// Howard Hinnant's algorithms for the proleptic Gregorian calendar.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn durations_parse() {
        assert_eq!(Duration::parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(Duration::parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(Duration::parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(Duration::parse("250ms"), Ok(Duration::from_millis(250)));
        assert!(Duration::parse("").is_err());
        assert!(Duration::parse("5").is_err());
        assert!(Duration::parse("m5").is_err());
        assert!(Duration::parse("5 days").is_err());
    }

    #[test]
    fn durations_display() {
        assert_eq!(Duration::from_secs(252).to_string(), "4m12s");
        assert_eq!(Duration::from_secs(3600).to_string(), "1h");
        assert_eq!(Duration::from_millis(250).to_string(), "250ms");
        assert_eq!(Duration::ZERO.to_string(), "0s");
    }

    #[test]
    fn rfc3339_round_trip() {
        let t = Timestamp::parse_rfc3339("2026-11-26T10:00:00Z").unwrap();
        assert_eq!(t.seconds, 1_795_687_200);
        assert_eq!(t.to_string(), "2026-11-26T10:00:00Z");
        let t = Timestamp::parse_rfc3339("2026-11-26T11:00:00.5+01:00").unwrap();
        assert_eq!(t.to_string(), "2026-11-26T10:00:00.500Z");
        assert_eq!(Timestamp::parse_rfc3339("1970-01-01T00:00:00Z").unwrap().seconds, 0);
        assert_eq!(Timestamp::parse_rfc3339("2000-02-29T00:00:00Z").unwrap().to_string(), "2000-02-29T00:00:00Z");
        assert!(Timestamp::parse_rfc3339("2026-13-01T00:00:00Z").is_err());
        assert!(Timestamp::parse_rfc3339("yesterday").is_err());
        assert!(Timestamp::parse_rfc3339("2026-11-26T10:00:00").is_err());
    }

    #[test]
    fn since_and_plus() {
        let a = Timestamp::from_millis(10_000);
        let b = a.plus(Duration::from_secs(5));
        assert_eq!(b.since(&a), Duration::from_secs(5));
        assert_eq!(a.since(&b), Duration::ZERO);
    }
}
