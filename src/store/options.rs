use std::time::Duration;

use super::StoreError;

/// Longest idle TTL, touch window or sweep age accepted: far beyond any real setting, and well
/// inside what Postgres intervals, chrono and Redis TTLs can represent.
pub(super) const MAX_DURATION: Duration = Duration::from_secs(100 * 366 * 24 * 3600);

/// Settings shared by every store implementation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Idle TTL: `set` and `touch` restart it, and a session not touched for this long expires
    /// (Redis key TTL, Postgres `expires_at`). Zero means sessions never expire.
    pub idle_ttl: Duration,
    /// Touch coalescing window of [`super::LayeredStore`]: the primary is touched at most once
    /// per window per session, so its `last_access` may lag the real one by up to this much.
    ///
    /// Every store adds the window to its idle cutoffs and to `expires_at`, so a session touched
    /// within its TTL is never swept. Configure the operator with the proxies' window.
    pub touch_window: Duration,
    /// Rows or keys handled per batch by sweeps and bulk worker operations (0 counts as 1).
    pub batch_size: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            idle_ttl: Duration::ZERO,
            touch_window: Duration::ZERO,
            batch_size: 1000,
        }
    }
}

impl StoreOptions {
    /// Options with the given idle TTL and defaults otherwise.
    pub fn with_idle_ttl(idle_ttl: Duration) -> Self {
        Self {
            idle_ttl,
            ..Self::default()
        }
    }

    /// Rejects settings that would break a store's promises: a touch window as long as the idle
    /// TTL would let the primary's `last_access` lag by a whole TTL.
    pub fn validate(&self) -> Result<(), StoreError> {
        for (name, value) in [
            ("idle TTL", self.idle_ttl),
            ("touch window", self.touch_window),
        ] {
            if value > MAX_DURATION {
                return Err(StoreError::Config(format!(
                    "{name} {value:?} is longer than the supported maximum of 100 years"
                )));
            }
        }
        if !self.idle_ttl.is_zero() && self.touch_window >= self.idle_ttl {
            return Err(StoreError::Config(format!(
                "touch window {:?} must be shorter than the idle TTL {:?} (a small fraction of it)",
                self.touch_window, self.idle_ttl
            )));
        }
        Ok(())
    }

    /// The batch size, at least 1.
    pub fn batch(&self) -> usize {
        self.batch_size.max(1)
    }

    /// How long after its last touch a session may be removed by an idle sweep of `max_age`
    /// (saturating: an absurd `max_age` sweeps nothing rather than overflowing).
    pub fn idle_cutoff_age(&self, max_age: Duration) -> Duration {
        max_age.saturating_add(self.touch_window).min(MAX_DURATION)
    }

    /// The TTL written to a store, widened by the touch window (zero stays "never").
    pub fn expiry_ttl(&self) -> Option<Duration> {
        (!self.idle_ttl.is_zero()).then(|| self.idle_ttl.saturating_add(self.touch_window))
    }
}

/// The Redis key prefix as blockyard uses it: a non-empty prefix that does not end in `:`
/// gets one (`REDIS_PREFIX=myapp` → keys `myapp:session:ID`); an empty prefix stays empty.
/// The library, the CLI and the operator all apply this, so they read the keys blockyard wrote.
pub fn redis_key_prefix(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with(':') {
        prefix.to_string()
    } else {
        format!("{prefix}:")
    }
}

/// A Postgres timeout setting (`lock_timeout`, `statement_timeout`) in milliseconds. Zero is
/// Postgres' "disabled"; anything shorter than a millisecond would round to it, so it becomes
/// 1 ms instead.
pub(super) fn postgres_timeout(timeout: std::time::Duration) -> String {
    if timeout.is_zero() {
        "0".to_string()
    } else {
        format!("{}ms", timeout.as_millis().max(1))
    }
}

/// Rejects a database URL that is not a Postgres URL before anything connects to it: a
/// `mysql://` URL would otherwise be read as Postgres connection settings and sent to
/// whatever answers on that host.
pub fn check_postgres_url(url: &str) -> Result<(), StoreError> {
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    match scheme {
        Some("postgres" | "postgresql") => Ok(()),
        Some(other) => Err(StoreError::Config(format!(
            "unsupported database URL scheme {:?}: expected postgres:// or postgresql://",
            truncated(other)
        ))),
        None => Err(StoreError::Config(
            "invalid database URL: expected postgres://user@host:port/database".into(),
        )),
    }
}

/// A scheme is echoed in errors; a malformed URL's "scheme" may hold anything (a password),
/// so only a short, plain one is shown.
fn truncated(scheme: &str) -> String {
    if scheme.len() <= 20
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        scheme.to_string()
    } else {
        "(not a URL scheme)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_prefixes_end_in_a_colon_as_blockyard_makes_them() {
        assert_eq!(redis_key_prefix("myapp"), "myapp:");
        assert_eq!(redis_key_prefix("myapp:"), "myapp:");
        assert_eq!(redis_key_prefix("blockyard:"), "blockyard:");
        assert_eq!(redis_key_prefix(""), "");
    }

    #[test]
    fn zero_postgres_timeouts_mean_disabled() {
        assert_eq!(postgres_timeout(Duration::ZERO), "0");
        assert_eq!(postgres_timeout(Duration::from_micros(10)), "1ms");
        assert_eq!(postgres_timeout(Duration::from_secs(5)), "5000ms");
    }

    #[test]
    fn only_postgres_urls_are_postgres_urls() {
        assert!(check_postgres_url("postgres://u@h/db").is_ok());
        assert!(check_postgres_url("postgresql://u@h:5432/db").is_ok());
        let err = check_postgres_url("mysql://u:pw@h:5432/db").expect_err("mysql");
        assert!(err.to_string().contains("\"mysql\""), "{err}");
        let err = check_postgres_url("not a url hunter2").expect_err("no scheme");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = check_postgres_url("x:hunter2@h://db").expect_err("odd");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn touch_window_must_be_shorter_than_the_ttl() {
        let mut options = StoreOptions::with_idle_ttl(Duration::from_secs(60));
        options.touch_window = Duration::from_secs(10);
        assert!(options.validate().is_ok());
        options.touch_window = Duration::from_secs(60);
        assert!(options.validate().is_err());
        options.idle_ttl = Duration::ZERO; // never expires: any window is fine
        assert!(options.validate().is_ok());
    }

    #[test]
    fn absurd_durations_are_rejected_not_overflowed() {
        let huge = Duration::from_secs(u64::MAX / 2);
        let options = StoreOptions {
            touch_window: huge,
            ..StoreOptions::default()
        };
        assert!(options.validate().is_err());
        assert_eq!(options.idle_cutoff_age(huge), MAX_DURATION);
        assert!(options.expiry_ttl().is_none());
    }
}
