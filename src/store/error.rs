use thiserror::Error;

/// Why a store operation failed.
///
/// Backend errors are kept apart from "not found" (which is `Ok(None)` / `Ok(false)`), so a
/// caller can always tell an absent session from an unreachable database.
///
/// Each message is complete on its own (it includes the backend's message), so backend errors
/// are not also exposed as `source()`: error reporters that walk the chain would print them twice.
#[derive(Debug, Error)]
pub enum StoreError {
    /// A session or worker id that no store accepts (see [`super::validate_id`]).
    #[error("invalid {kind}: {reason}")]
    InvalidId { kind: &'static str, reason: String },
    /// Bad store configuration (URL, schema name, options).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Postgres failed or could not be reached.
    #[error("postgres: {0}")]
    Postgres(sqlx::Error),
    /// Postgres migrations failed.
    #[error("postgres migration: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    /// An operation could not make progress within its time limits (e.g. rows kept locked by
    /// another transaction).
    #[error("timed out: {0}")]
    Timeout(String),
    /// Redis failed or could not be reached.
    #[error("redis: {0}")]
    Redis(redis::RedisError),
    /// The cache of a layered store may still hold stale routes (see
    /// [`super::LayeredStore::repair_cache`]).
    #[error("cache may hold stale sessions: {0}")]
    CacheStale(String),
    /// A stored session could not be decoded (e.g. a hash written by hand without `worker_id`).
    #[error("corrupt session {id:?}: {detail}")]
    Corrupt { id: String, detail: String },
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        // undefined_table: the most likely first-run mistake deserves a direct hint.
        if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42P01") {
            return Self::Config(format!(
                "{e}: the sessions table is missing from the configured schema; \
                 run `session-operator migrate` or check --schema"
            ));
        }
        Self::Postgres(e)
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Self::Migrate(e)
    }
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        Self::Redis(e)
    }
}

/// A URL with its password replaced by `***`, safe to print or log.
///
/// Input that does not parse as a URL is replaced entirely: it might still hold a secret.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                // Cannot fail: a URL with a password has a host.
                let _ = url.set_password(Some("***"));
            }
            // libpq-style URLs may also carry it as a query parameter (`password=`), and
            // redis-rs URLs for unix sockets as `pass=`.
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let secret =
                        k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("pass");
                    (
                        k.into_owned(),
                        if secret { "***".into() } else { v.into_owned() },
                    )
                })
                .collect();
            if !pairs.is_empty() {
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            url.to_string()
        }
        Err(_) => "<unparsable URL>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(redact_url("not a url :s3cret@"), "<unparsable URL>");
        assert_eq!(
            redact_url("postgres://app@db/x?sslmode=require&password=s3cret"),
            "postgres://app@db/x?sslmode=require&password=***"
        );
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock?db=1&pass=s3cret"),
            "redis+unix:///run/redis.sock?db=1&pass=***"
        );
    }
}
