//! Kubernetes-style duration strings (`30m`, `1h30m`, `250ms`, `0s`), as Go's
//! `time.ParseDuration` writes them and as users expect them in a manifest.

use std::time::Duration;

/// The pattern the CRD schema enforces; [`parse`] accepts exactly these strings.
pub const PATTERN: &str = r"^(0|([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+)$";

/// A duration string the schema pattern rejects; the text names the offending part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(String);

/// Parses a duration such as `1h30m`, `90s`, `1.5h`, `250ms` or `0`.
///
/// Negative durations do not exist in a policy; anything the schema pattern rejects is an error
/// naming the offending text.
pub fn parse(text: &str) -> Result<Duration, ParseError> {
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err(ParseError("empty duration".into()));
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| {
                ParseError(format!(
                    "{text:?}: missing unit after {rest:?} (use ns, us, ms, s, m or h)"
                ))
            })?;
        let (number, tail) = rest.split_at(number_len);
        let value: f64 = number
            .parse()
            .ok()
            .filter(|_| !number.is_empty() && !number.starts_with('.') && !number.ends_with('.'))
            .ok_or_else(|| ParseError(format!("{text:?}: expected a number before the unit")))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let seconds_per_unit = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => {
                return Err(ParseError(format!(
                    "{text:?}: unknown unit {unit:?} (use ns, us, ms, s, m or h)"
                )));
            }
        };
        total += value * seconds_per_unit;
        rest = next;
    }
    Duration::try_from_secs_f64(total)
        .map_err(|_| ParseError(format!("{text:?}: duration out of range")))
}

/// Formats a duration the way Go and kubectl print it (`1h30m0s`, `250ms`, `0s`).
pub fn format(duration: Duration) -> String {
    if duration.is_zero() {
        return "0s".into();
    }
    if duration < Duration::from_secs(1) {
        return format!("{}ms", duration.as_millis());
    }
    let secs = duration.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert_eq!(parse("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("2m10s"), Ok(Duration::from_secs(130)));
        assert_eq!(parse("1µs"), Ok(Duration::from_micros(1)));
    }

    #[test]
    fn rejects_what_the_schema_rejects() {
        for bad in [
            "",
            "10",
            "m",
            "1x",
            "-1s",
            "1 m",
            ".5s",
            "5.s",
            "1d",
            "1e3s",
            "9999999999999999999h",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn pattern_and_parser_agree() {
        let pattern = regex::Regex::new(PATTERN).expect("valid pattern");
        for text in ["0", "0s", "30m", "1h30m", "1.5h", "250ms", "2m10s", "1µs"] {
            assert!(pattern.is_match(text), "{text} should match the pattern");
            assert!(parse(text).is_ok(), "{text} should parse");
        }
        for text in ["", "10", "1x", "-1s", "1 m", "1d", ".5s", "1e3s"] {
            assert!(
                !pattern.is_match(text),
                "{text} should not match the pattern"
            );
            assert!(parse(text).is_err(), "{text} should not parse");
        }
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format(Duration::ZERO), "0s");
        assert_eq!(format(Duration::from_millis(250)), "250ms");
        assert_eq!(format(Duration::from_secs(90)), "1m30s");
        assert_eq!(format(Duration::from_secs(5400)), "1h30m0s");
        assert_eq!(format(Duration::from_secs(5)), "5s");
    }
}
