use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};

use super::{Result, StoreError};

/// Longest session or worker id accepted, in bytes.
///
/// Ids are primary keys of a Postgres btree index, whose entries cannot exceed about 2.7 KB; a
/// common, documented limit well below that keeps every store consistent.
pub const MAX_ID_BYTES: usize = 1024;

/// Where a session is routed: one row of the routing table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The worker (pod) that serves the session.
    pub worker_id: String,
    /// The OIDC subject bound to the session; empty when there is no OIDC.
    pub user_sub: String,
    /// When the session was last used.
    pub last_access: DateTime<Utc>,
}

impl Entry {
    /// An entry for `worker_id` last accessed now.
    pub fn new(worker_id: impl Into<String>, user_sub: impl Into<String>) -> Self {
        Self {
            worker_id: worker_id.into(),
            user_sub: user_sub.into(),
            last_access: now_seconds(),
        }
    }
}

/// The current time in whole seconds: Redis keeps `last_access` as Unix seconds (blockyard's
/// wire format), so every store's timestamps use that precision.
pub(crate) fn now_seconds() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(0)
}

/// Checks a session or worker id: non-empty, at most [`MAX_ID_BYTES`] bytes, no NUL byte
/// (Postgres `TEXT` cannot hold one). Everything else (unicode, spaces, glob characters) is
/// stored faithfully.
pub fn validate_id(kind: &'static str, id: &str) -> Result<()> {
    let reason = if id.is_empty() {
        "must not be empty".to_string()
    } else if id.len() > MAX_ID_BYTES {
        format!("is {} bytes long, the limit is {MAX_ID_BYTES}", id.len())
    } else if id.contains('\0') {
        "must not contain a NUL byte".to_string()
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidId { kind, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_unicode_and_glob_characters() {
        assert!(validate_id("session id", "sé*ss?ion[1]\\ 🙂").is_ok());
        assert!(validate_id("session id", &"a".repeat(MAX_ID_BYTES)).is_ok());
    }

    #[test]
    fn rejects_empty_long_and_nul() {
        for bad in [
            String::new(),
            "a".repeat(MAX_ID_BYTES + 1),
            "a\0b".to_string(),
        ] {
            let err = validate_id("session id", &bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::InvalidId {
                        kind: "session id",
                        ..
                    }
                ),
                "{err}"
            );
        }
    }
}
