//! The durable memory of each policy's workers, between the planner's [`Memory`] and the
//! store's [`WorkerRecords`].
//!
//! - **Load**: a policy's records are read at its first pass in this process and again when this
//!   replica becomes leader, and handed to [`Memory::restore`]: a worker the records know and no
//!   pod holds is a departure (it vanished while no operator watched, or the previous leader saw
//!   it depart), completed by whoever leads now. Records only ever name workers a pod of *this*
//!   policy held, so orphans of another policy, or of workers no policy selected, stay untouched.
//! - **Save**: after each pass the leader writes what changed in [`Memory::remembered`] (a worker
//!   appeared, departed, was forgotten), one statement per pass at most, nothing when the set is
//!   unchanged. A replica writes only after it loaded the records as leader, so it never removes
//!   records it has not read.
//!
//! [`persist`] is the only function that writes records; it checks the leader fence first.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;

use super::planner::{Memory, Recorded, Remembered};
use super::workers::Family;
use super::{Context, GuardedPolicy};
use crate::leader::NotLeader;
use crate::store::{StoreError, WorkerRecord};
use crate::telemetry::ErrorKind;

/// What a policy's state knows about its records in the store.
#[derive(Debug, Default)]
pub(super) struct RecordsState {
    /// `None`: not loaded yet; `Some(leader)`: loaded, as leader or as standby.
    loaded_as: Option<bool>,
    /// The records as the store holds them (as loaded, plus what this replica wrote since).
    written: BTreeMap<String, WorkerRecord>,
}

/// The policy's key in the records: `namespace/name`.
pub(super) fn policy_key(key: &ObjectRef<GuardedPolicy>) -> String {
    format!(
        "{}/{}",
        key.namespace.as_deref().unwrap_or_default(),
        key.name
    )
}

/// Loads the policy's records into `memory` at its first pass, and again when this replica
/// became leader since the last load. A failure is logged and retried by the next pass; the
/// planner works on with what it sees meanwhile, and nothing is written until a load succeeded.
pub(super) async fn load(
    ctx: &Context,
    key: &ObjectRef<GuardedPolicy>,
    records: &mut RecordsState,
    memory: &mut Memory,
    leader: bool,
) {
    if !leader && records.loaded_as == Some(true) {
        // Leadership ended: load again when it comes back.
        records.loaded_as = Some(false);
        return;
    }
    if records.loaded_as == Some(true) || (records.loaded_as.is_some() && !leader) {
        return;
    }
    let policy = policy_key(key);
    match ctx.records.load(&policy).await {
        Ok(loaded) => {
            memory.restore(
                loaded
                    .iter()
                    .map(|r| (r.worker_id.clone(), recorded(r)))
                    .collect::<Vec<_>>(),
            );
            tracing::debug!(%policy, records = loaded.len(), leader, "worker records loaded");
            records.written = loaded
                .into_iter()
                .map(|r| (r.worker_id.clone(), r))
                .collect();
            records.loaded_as = Some(leader);
        }
        Err(e) => {
            ctx.metrics.error(ErrorKind::WorkerRecords);
            tracing::warn!(%policy, error = %e, "loading the policy's worker records failed; retrying");
        }
    }
}

/// Writes what changed in the memory's set of workers since the last write (leader only).
pub(super) async fn save(
    ctx: &Context,
    key: &ObjectRef<GuardedPolicy>,
    records: &mut RecordsState,
    memory: &Memory,
) {
    if records.loaded_as != Some(true) || !ctx.fence.is_open() {
        return;
    }
    let (upsert, remove) = changes(&records.written, &memory.remembered(), Utc::now());
    if upsert.is_empty() && remove.is_empty() {
        return;
    }
    let policy = policy_key(key);
    match persist(ctx, &policy, &upsert, &remove).await {
        Ok(()) => {
            tracing::debug!(%policy, upserted = upsert.len(), removed = remove.len(), "worker records written");
            for id in &remove {
                records.written.remove(id);
            }
            for record in upsert {
                records.written.insert(record.worker_id.clone(), record);
            }
        }
        Err(e) => {
            ctx.metrics.error(ErrorKind::WorkerRecords);
            tracing::warn!(%policy, error = %e, "writing the policy's worker records failed; retrying");
        }
    }
}

/// Why worker records could not be written (retried by the next pass).
#[derive(Debug, thiserror::Error)]
enum PersistError {
    #[error(transparent)]
    NotLeader(#[from] NotLeader),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The one place that writes worker records: behind the leader fence, like every store mutation.
async fn persist(
    ctx: &Context,
    policy: &str,
    upsert: &[WorkerRecord],
    remove: &[String],
) -> Result<(), PersistError> {
    ctx.fence.check()?;
    Ok(ctx.records.apply(policy, upsert, remove).await?)
}

/// The records to write and to remove so that the store holds `remembered`. A record whose
/// pod, family, creation and departure are unchanged is not rewritten; the first departure time
/// is kept.
pub(super) fn changes(
    written: &BTreeMap<String, WorkerRecord>,
    remembered: &BTreeMap<String, Remembered>,
    now: DateTime<Utc>,
) -> (Vec<WorkerRecord>, Vec<String>) {
    let mut upsert = Vec::new();
    for (id, r) in remembered {
        let old = written.get(id);
        let departed = match (old.and_then(|o| o.departed), r.departed) {
            (Some(first), Some(_)) => Some(first),
            (_, departed) => departed.map(chrono_time),
        };
        let pod = r
            .pod
            .clone()
            .or_else(|| old.map(|o| o.pod.clone()))
            .unwrap_or_default();
        let family = r
            .family
            .as_ref()
            .map(family_name)
            .or_else(|| old.and_then(|o| o.family.clone()));
        let created = r
            .created
            .map(chrono_time)
            .or_else(|| old.and_then(|o| o.created));
        let unchanged = old.is_some_and(|o| {
            o.pod == pod && o.family == family && o.created == created && o.departed == departed
        });
        if unchanged {
            continue;
        }
        upsert.push(WorkerRecord {
            worker_id: id.clone(),
            pod,
            family,
            created,
            first_seen: old.map_or(now, |o| o.first_seen),
            last_seen: match (departed, old) {
                (None, _) | (Some(_), None) => now,
                (Some(_), Some(o)) => o.last_seen,
            },
            departed,
        });
    }
    let remove = written
        .keys()
        .filter(|id| !remembered.contains_key(*id))
        .cloned()
        .collect();
    (upsert, remove)
}

fn recorded(r: &WorkerRecord) -> Recorded {
    Recorded {
        pod: r.pod.clone(),
        family: r.family.as_deref().and_then(parse_family),
        created: r.created.and_then(jiff_time),
        departed: r.departed.and_then(jiff_time),
    }
}

/// `Deployment/web`, `StatefulSet/db`, `Generated/job-`.
pub(super) fn family_name(family: &Family) -> String {
    match family {
        Family::Deployment(name) => format!("Deployment/{name}"),
        Family::StatefulSet(name) => format!("StatefulSet/{name}"),
        Family::Generated(prefix) => format!("Generated/{prefix}"),
    }
}

pub(super) fn parse_family(name: &str) -> Option<Family> {
    let (kind, rest) = name.split_once('/')?;
    match kind {
        "Deployment" => Some(Family::Deployment(rest.to_string())),
        "StatefulSet" => Some(Family::StatefulSet(rest.to_string())),
        "Generated" => Some(Family::Generated(rest.to_string())),
        _ => None,
    }
}

fn chrono_time(t: Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.as_millisecond()).unwrap_or_default()
}

fn jiff_time(t: DateTime<Utc>) -> Option<Timestamp> {
    Timestamp::from_millisecond(t.timestamp_millis()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remembered(pod: &str, departed: Option<i64>) -> Remembered {
        Remembered {
            pod: Some(pod.into()),
            family: Some(Family::Deployment("web".into())),
            created: Timestamp::from_second(1_800_000_000).ok(),
            departed: departed.and_then(|s| Timestamp::from_second(s).ok()),
        }
    }

    #[test]
    fn only_changes_are_written_and_the_first_departure_is_kept() {
        let t0 = DateTime::from_timestamp(1_800_000_100, 0).unwrap_or_default();
        let mut set = BTreeMap::from([("a".to_string(), remembered("a", None))]);
        let (upsert, remove) = changes(&BTreeMap::new(), &set, t0);
        assert_eq!((upsert.len(), remove.len()), (1, 0));
        assert_eq!(upsert[0].family.as_deref(), Some("Deployment/web"));
        let written: BTreeMap<_, _> = upsert
            .into_iter()
            .map(|r| (r.worker_id.clone(), r))
            .collect();

        // The same set again: nothing to write.
        let (upsert, remove) = changes(&written, &set, t0);
        assert!(upsert.is_empty() && remove.is_empty());

        // It departs: one write; it is resolved later (another departure time): none.
        set.insert("a".into(), remembered("a", Some(1_800_000_200)));
        let (upsert, _) = changes(&written, &set, t0);
        assert_eq!(upsert.len(), 1);
        let written: BTreeMap<_, _> = upsert
            .into_iter()
            .map(|r| (r.worker_id.clone(), r))
            .collect();
        let mut resolved = remembered("a", Some(1_800_000_300));
        resolved.pod = None;
        set.insert("a".into(), resolved);
        let (upsert, remove) = changes(&written, &set, t0);
        assert!(upsert.is_empty() && remove.is_empty(), "{upsert:?}");

        // Forgotten: removed.
        let (upsert, remove) = changes(&written, &BTreeMap::new(), t0);
        assert!(upsert.is_empty());
        assert_eq!(remove, ["a"]);
    }

    #[test]
    fn families_round_trip() {
        for f in [
            Family::Deployment("web".into()),
            Family::StatefulSet("db".into()),
            Family::Generated("job-".into()),
        ] {
            assert_eq!(parse_family(&family_name(&f)), Some(f));
        }
        assert_eq!(parse_family("Job/x"), None);
    }
}
