//! Durations, ages and times for people: `3s`, `2m10s`, `1h5m`, `2d3h`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now as unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A duration at the two most significant units: `850ms`, `3s`, `2m10s`,
/// `1h5m`, `2d3h`.
pub fn duration_ms(ms: i64) -> String {
    let ms = ms.max(0) as u64;
    if ms < 1000 {
        return if ms == 0 {
            "0s".into()
        } else {
            format!("{ms}ms")
        };
    }
    let secs = ms / 1000;
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let two = |big: u64, big_unit: &str, small: u64, small_unit: &str| {
        if small == 0 {
            format!("{big}{big_unit}")
        } else {
            format!("{big}{big_unit}{small}{small_unit}")
        }
    };
    if d > 0 {
        two(d, "d", h, "h")
    } else if h > 0 {
        two(h, "h", m, "m")
    } else if m > 0 {
        two(m, "m", s, "s")
    } else {
        format!("{s}s")
    }
}

/// How long ago `then_ms` was, as of `now_ms`: `2m10s`.
pub fn age(now_ms: i64, then_ms: i64) -> String {
    duration_ms(now_ms - then_ms)
}

/// A unix-ms time as RFC 3339 UTC, to the second.
pub fn time(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A `--timeout` value: a humantime duration (`90s`, `10m`, `1h30m`) or plain
/// seconds, rounded up to whole seconds.
pub fn parse_timeout_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let duration = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. 90s, 10m or 1h30m"))?,
    };
    let secs = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    if secs == 0 {
        return Err("must be at least 1s".into());
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_show_two_units_at_most() {
        assert_eq!(duration_ms(0), "0s");
        assert_eq!(duration_ms(850), "850ms");
        assert_eq!(duration_ms(3_400), "3s");
        assert_eq!(duration_ms(130_000), "2m10s");
        assert_eq!(duration_ms(120_000), "2m");
        assert_eq!(duration_ms(3_900_000), "1h5m");
        assert_eq!(duration_ms(183_600_000), "2d3h");
        assert_eq!(duration_ms(-5), "0s");
    }

    #[test]
    fn ages_count_from_now() {
        assert_eq!(age(1_000_000, 1_000_000 - 65_000), "1m5s");
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(time(1_700_000_000_123), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn timeouts_parse_to_whole_seconds() {
        assert_eq!(parse_timeout_secs("90s"), Ok(90));
        assert_eq!(parse_timeout_secs("10m"), Ok(600));
        assert_eq!(parse_timeout_secs("1h30m"), Ok(5400));
        assert_eq!(parse_timeout_secs("45"), Ok(45));
        assert_eq!(parse_timeout_secs("1500ms"), Ok(2));
        assert!(parse_timeout_secs("0s").is_err());
        assert!(parse_timeout_secs("soon").is_err());
    }
}
