//! Which of the pods a policy selects it may act on (see [`crate::policy::overlap`] for the
//! rule), and the memory of worker ids it left to another policy.
//!
//! A pod owned by another policy is, for this policy, a pod it does not select: the planner
//! sees it as live but unselected, and its worker id as holding no sessions, so no departure,
//! late session or orphan of it is ever planned here; the idle sweep, the session count and
//! the deletion costs skip it too. The ids stay remembered after the pod is gone (while they
//! hold sessions, and for [`RETENTION`]), so that its departure is handled by its owner alone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;

use crate::policy::ValidPolicy;
use crate::policy::overlap::{self, Claimant};

/// How long a ceded worker id without sessions stays remembered: longer than the planner
/// remembers a resolved departure (`max(replacementWait, 10 min)`), for the usual waits.
pub(super) const RETENTION: Duration = Duration::from_secs(20 * 60);

/// The pods a policy selects, split by ownership.
pub(super) struct Split {
    /// Selected pods this policy owns.
    pub owned: Vec<Arc<Pod>>,
    /// Worker ids of selected pods another policy owns → that policy's name.
    pub ceded: BTreeMap<String, String>,
    /// Of those, the ids of pods that are not departing (they count as live elsewhere).
    pub ceded_live: BTreeSet<String>,
    /// The `Degraded` message when some pods are ceded.
    pub message: Option<String>,
}

/// Splits the pods a policy selects (`me`, parsed as `valid`) by the ownership rule; `others`
/// are the other valid, non-deleted policies of its namespace.
pub(super) fn split(
    me: &Claimant,
    others: &[Claimant],
    valid: &ValidPolicy,
    selected: Vec<Arc<Pod>>,
) -> Split {
    let mut split = Split {
        owned: Vec::new(),
        ceded: BTreeMap::new(),
        ceded_live: BTreeSet::new(),
        message: None,
    };
    let mut owners: BTreeSet<String> = BTreeSet::new();
    let mut count = 0;
    for pod in selected {
        match overlap::owner_instead(me, others, &pod) {
            None => split.owned.push(pod),
            Some(owner) => {
                count += 1;
                owners.insert(owner.name.clone());
                if let Some(id) = valid.worker_id(&pod) {
                    let departing = pod.metadata.deletion_timestamp.is_some()
                        || super::workers::is_finished(&pod);
                    if !departing {
                        split.ceded_live.insert(id.clone());
                    }
                    split.ceded.insert(id, owner.name.clone());
                }
            }
        }
    }
    if count > 0 {
        let names: Vec<&str> = owners.iter().map(String::as_str).collect();
        split.message = Some(overlap::message(count, &names));
    }
    split
}

/// Worker ids this policy left to other policies, remembered beyond their pods.
#[derive(Debug, Default)]
pub(super) struct Ceded {
    ids: BTreeMap<String, Instant>,
}

impl Ceded {
    /// Records this pass: `now_ceded` are ceded now; ids this policy owns now (`owned`) are its
    /// own again; ids without sessions are forgotten after [`RETENTION`].
    pub(super) fn update(
        &mut self,
        now_ceded: &BTreeMap<String, String>,
        owned: &BTreeSet<&str>,
        with_sessions: &BTreeSet<String>,
    ) {
        let now = Instant::now();
        for id in now_ceded.keys() {
            self.ids.insert(id.clone(), now);
        }
        self.ids.retain(|id, at| {
            !owned.contains(id.as_str()) && (with_sessions.contains(id) || at.elapsed() < RETENTION)
        });
        for id in with_sessions {
            if let Some(at) = self.ids.get_mut(id) {
                *at = now;
            }
        }
    }

    pub(super) fn contains(&self, id: &str) -> bool {
        self.ids.contains_key(id)
    }

    pub(super) fn ids(&self) -> impl Iterator<Item = &str> {
        self.ids.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceded_ids_are_kept_while_they_hold_sessions_and_released_when_owned() {
        let mut ceded = Ceded::default();
        let now: BTreeMap<String, String> = [("w-1".to_string(), "old".to_string())].into();
        let sessions: BTreeSet<String> = ["w-1".to_string()].into();
        ceded.update(&now, &BTreeSet::new(), &sessions);
        assert!(ceded.contains("w-1"));
        // The pod is gone (not ceded "now" any more) but its sessions remain: still ceded.
        ceded.update(&BTreeMap::new(), &BTreeSet::new(), &sessions);
        assert!(ceded.contains("w-1"));
        // The policy owns the id again (the other policy went away).
        ceded.update(&BTreeMap::new(), &["w-1"].into(), &sessions);
        assert!(!ceded.contains("w-1"));
    }
}
