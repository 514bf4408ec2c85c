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
    #[error("postgres: {}", without_line_noise(&.0.to_string()))]
    Postgres(sqlx::Error),
    /// Postgres migrations failed.
    #[error("postgres migration: {}", without_line_noise(&.0.to_string()))]
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
    /// A mutation was refused because the writer no longer holds the current leadership epoch
    /// (see [`super::Fencing`]); nothing was changed.
    #[error("fenced: {0}")]
    Fenced(String),
    /// A stored session could not be decoded (e.g. a hash written by hand without `worker_id`).
    #[error("corrupt session {id:?}: {detail}")]
    Corrupt { id: String, detail: String },
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        // undefined_table: the most likely first-run mistake deserves a direct hint.
        if e.as_database_error()
            .and_then(sqlx::error::DatabaseError::code)
            .as_deref()
            == Some("42P01")
        {
            return Self::Config(format!(
                "{}: the sessions table is missing from the configured schema; \
                 run `session-operator migrate` or check --schema",
                without_line_noise(&e.to_string())
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
        // The fence check of a script (src/store/redis.rs, prelude) refused the write.
        if e.code() == Some("FENCED") {
            return Self::Fenced(e.detail().unwrap_or("superseded epoch").to_string());
        }
        Self::Redis(e)
    }
}

/// Drops the " at line N" that sqlx appends to every Postgres error: N is a line of the
/// server's C source (the protocol's `L` field), meaningless to a user and easily taken for a
/// line of their input. Only a " at line <digits>" that ends the text or a clause is removed.
pub(crate) fn without_line_noise(text: &str) -> String {
    const NOISE: &str = " at line ";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(NOISE) {
        let after = &rest[at + NOISE.len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        let ends_clause = after[digits..]
            .chars()
            .next()
            .is_none_or(|c| matches!(c, ':' | ',' | ';' | ')' | '\n'));
        if digits > 0 && ends_clause {
            out.push_str(&rest[..at]);
            rest = &after[digits..];
        } else {
            out.push_str(&rest[..at + NOISE.len()]);
            rest = after;
        }
    }
    out.push_str(rest);
    out
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
mod line_noise_tests {
    use super::without_line_noise;

    #[test]
    fn the_servers_source_line_is_dropped() {
        assert_eq!(
            without_line_noise(
                "error returned from database: relation \"x.blockyard_sessions\" does not exist at line 1452"
            ),
            "error returned from database: relation \"x.blockyard_sessions\" does not exist"
        );
        assert_eq!(
            without_line_noise("while executing migration 1: syntax error at line 12: more"),
            "while executing migration 1: syntax error: more"
        );
        // Anything else stays.
        for kept in [
            "invalid YAML at line 3 column 5",
            "at line",
            "stop at line x",
        ] {
            assert_eq!(without_line_noise(kept), kept);
        }
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
