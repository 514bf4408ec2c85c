//! The one place that writes a policy's status: server-side apply of the whole status, behind
//! the leader fence (a former leader must not overwrite the new one's status), skipped when
//! nothing changed.

use std::time::{Duration, Instant};

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::super::Context;
use crate::policy::{SessionPolicy, SessionPolicyStatus};

const FIELD_MANAGER: &str = "session-operator";

/// Status numbers (counts, counters, messages) are written at most this often; a change of a
/// condition's status or reason, or of the generation, is written at once. During a rollout
/// every finished migration asks for a pass, and each pass would otherwise patch the status.
const STATUS_NUMBERS_EVERY: Duration = Duration::from_secs(2);

/// An unchanged status is written again after this long.
const STATUS_REFRESH: Duration = Duration::from_secs(60);

/// The status this replica last wrote for a policy, and when.
pub(crate) type LastStatus = Option<(Instant, SessionPolicyStatus)>;

/// Applies `status` to the policy `namespace/name` if this replica leads. With `last` (the policy's memory of its
/// last write), a status equal to it (ignoring condition timestamps) is skipped for a minute,
/// and a change of numbers only is held back: the returned duration says for how long, so the
/// caller looks again by then. Without `last` (a policy the operator keeps no state for), the
/// status is always written.
pub(crate) async fn write(
    ctx: &Context,
    namespace: &str,
    name: &str,
    status: SessionPolicyStatus,
    last: Option<&mut LastStatus>,
) -> Result<Option<Duration>, kube::Error> {
    if !ctx.fence.is_open() {
        return Ok(None);
    }
    if let Some(Some((at, written))) = last.as_deref() {
        if *written == status && at.elapsed() < STATUS_REFRESH {
            return Ok(None);
        }
        if same_conditions(written, &status) && at.elapsed() < STATUS_NUMBERS_EVERY {
            return Ok(Some(STATUS_NUMBERS_EVERY - at.elapsed()));
        }
    }
    let api: Api<SessionPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = json!({
        "apiVersion": "sessions.blockyard.io/v1alpha1",
        "kind": "SessionPolicy",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    if let Some(last) = last {
        *last = Some((Instant::now(), status));
    }
    Ok(None)
}

/// Whether two statuses agree on the generation and on every condition's status and reason.
fn same_conditions(a: &SessionPolicyStatus, b: &SessionPolicyStatus) -> bool {
    let key = |s: &SessionPolicyStatus| {
        s.conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
            .collect::<Vec<_>>()
    };
    a.observed_generation == b.observed_generation && key(a) == key(b)
}

#[cfg(test)]
mod tests {
    use super::super::super::status::{Cond, conditions};
    use super::{SessionPolicyStatus, same_conditions};
    use k8s_openapi::jiff::Timestamp;

    fn status(
        generation: i64,
        reason: &'static str,
        message: &str,
        sessions: u64,
    ) -> SessionPolicyStatus {
        SessionPolicyStatus {
            observed_generation: Some(generation),
            conditions: conditions(
                &[Cond::new("Ready", true, reason, message)],
                &[],
                Some(generation),
                Timestamp::now(),
            ),
            sessions: Some(sessions),
            ..Default::default()
        }
    }

    #[test]
    fn only_numbers_and_messages_may_wait_for_the_next_status_write() {
        let base = status(1, "Reconciled", "8 ready worker(s)", 100);
        assert!(same_conditions(
            &base,
            &status(1, "Reconciled", "7 ready worker(s)", 90)
        ));
        assert!(!same_conditions(
            &base,
            &status(1, "Paused", "8 ready worker(s)", 100)
        ));
        assert!(!same_conditions(
            &base,
            &status(2, "Reconciled", "8 ready worker(s)", 100)
        ));
    }
}
