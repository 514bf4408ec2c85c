//! Small helpers: timestamps, uids, random suffixes, JSON field access.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::jiff::Timestamp;
use serde_json::{Map, Value};

/// RFC 3339 timestamp with second precision (`metav1.Time`).
pub(crate) fn now_rfc3339() -> String {
    format_time(SystemTime::now(), false)
}

/// Formats a time as RFC 3339 in UTC, truncated to seconds or, for `metav1.MicroTime`, to
/// microseconds (as the API server writes them).
pub(crate) fn format_time(t: SystemTime, micros: bool) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    // Out of jiff's range (years beyond 9999) only for a clock gone wrong: the latest time.
    let ts = Timestamp::from_second(seconds).unwrap_or(Timestamp::MAX);
    let whole = ts.strftime("%Y-%m-%dT%H:%M:%S");
    if micros {
        format!("{whole}.{:06}Z", d.subsec_micros())
    } else {
        format!("{whole}Z")
    }
}

/// Parses an RFC 3339 timestamp as the API writes them (`2024-01-02T03:04:05Z`, optional
/// fraction, `Z` or a numeric offset). The one parser of the crate.
pub(crate) fn parse_time(s: &str) -> Option<SystemTime> {
    let ts: Timestamp = s.parse().ok()?;
    Some(SystemTime::from(ts))
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fast, non-cryptographic random number (splitmix64 over time and a counter).
pub(crate) fn random_u64() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut z = nanos.wrapping_add(
        COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A random version-4-shaped UUID string.
pub(crate) fn new_uid() -> String {
    let a = random_u64();
    let b = random_u64();
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

/// Five-character suffix for `generateName`, from the same alphabet Kubernetes uses.
pub(crate) fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = random_u64();
    (0..5)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

/// `obj.metadata` as a mutable map, creating it if needed.
pub(crate) fn meta_mut(obj: &mut Value) -> Option<&mut Map<String, Value>> {
    let map = obj.as_object_mut()?;
    let meta = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    meta.as_object_mut()
}

/// `obj.metadata.<field>` as a string.
pub(crate) fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// Reads a dotted path such as `status.phase`.
pub(crate) fn get_path<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(obj, |v, seg| v.get(seg))
}

/// Whether the object lists any finalizers.
pub(crate) fn has_finalizers(obj: &Value) -> bool {
    obj.get("metadata")
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty())
}

/// DNS-1123 subdomain check used for object names.
pub(crate) fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Standard base64 with padding (for Secret `stringData`).
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_known_timestamp() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(format_time(t, false), "2023-11-14T22:13:20Z");
        let t = UNIX_EPOCH + Duration::from_micros(951_782_400_000_001);
        assert_eq!(format_time(t, true), "2000-02-29T00:00:00.000001Z");
    }

    #[test]
    fn times_round_trip() {
        let t = parse_time("2024-02-29T12:34:56Z").expect("parses");
        assert_eq!(format_time(t, false), "2024-02-29T12:34:56Z");
        let f = parse_time("2024-02-29T12:34:56.250000Z").expect("fraction");
        assert_eq!(f.duration_since(t).ok(), Some(Duration::from_millis(250)));
        assert_eq!(format_time(f, true), "2024-02-29T12:34:56.250000Z");
        let o = parse_time("2024-02-29T14:34:56+02:00").expect("offset");
        assert_eq!(o, t);
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z"),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        for bad in [
            "yesterday",
            "garbage",
            "2024-02-30T00:00:00Z",
            "2024-02-29T12:34:56",
        ] {
            assert!(parse_time(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn dns_names() {
        assert!(is_dns_subdomain("a-b.c"));
        assert!(!is_dns_subdomain("A"));
        assert!(!is_dns_subdomain("-a"));
        assert!(!is_dns_subdomain(""));
    }
}
