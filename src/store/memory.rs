//! In-process store: the embedded default and the reference the other stores are tested against.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::entry::now_seconds;
use super::{Entry, Result, Store, StoreOptions, Sweep, validate_id};

/// A concurrent in-memory store with a per-worker index, so worker-level operations cost
/// O(sessions of that worker).
#[derive(Debug, Default)]
pub struct MemoryStore {
    options: StoreOptions,
    inner: Mutex<Tables>,
}

#[derive(Debug, Default)]
struct Tables {
    sessions: HashMap<String, Record>,
    by_worker: HashMap<String, HashSet<String>>,
}

#[derive(Debug, Clone)]
struct Record {
    entry: Entry,
    /// `None` when the store has no idle TTL.
    expires_at: Option<DateTime<Utc>>,
}

impl Record {
    fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }
}

impl Tables {
    fn insert(&mut self, id: &str, record: Record) {
        let worker = record.entry.worker_id.clone();
        if let Some(old) = self.sessions.insert(id.to_string(), record) {
            self.unindex(&old.entry.worker_id, id);
        }
        self.by_worker
            .entry(worker)
            .or_default()
            .insert(id.to_string());
    }

    fn remove(&mut self, id: &str) -> Option<Record> {
        let old = self.sessions.remove(id)?;
        self.unindex(&old.entry.worker_id, id);
        Some(old)
    }

    fn unindex(&mut self, worker: &str, id: &str) {
        if let Some(ids) = self.by_worker.get_mut(worker) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_worker.remove(worker);
            }
        }
    }

    fn live_of_worker(
        &self,
        worker: &str,
        now: DateTime<Utc>,
    ) -> impl Iterator<Item = (&String, &Record)> {
        self.by_worker
            .get(worker)
            .into_iter()
            .flatten()
            .filter_map(|id| self.sessions.get_key_value(id))
            .filter(move |(_, r)| r.is_live(now))
    }
}

impl MemoryStore {
    pub fn new(options: StoreOptions) -> Self {
        Self {
            options,
            inner: Mutex::default(),
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        // A panic while holding the lock cannot leave the tables half-updated in a way that
        // matters more than losing the whole store, so recover the data.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn expires_at(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // An expiry beyond chrono's range is as good as none.
        let ttl = chrono::TimeDelta::from_std(self.options.expiry_ttl()?).ok()?;
        now.checked_add_signed(ttl)
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, id: &str) -> Result<Option<Entry>> {
        validate_id("session id", id)?;
        let now = Utc::now();
        Ok(self
            .tables()
            .sessions
            .get(id)
            .filter(|r| r.is_live(now))
            .map(|r| r.entry.clone()))
    }

    async fn set(&self, id: &str, entry: &Entry) -> Result<()> {
        validate_id("session id", id)?;
        validate_id("worker id", &entry.worker_id)?;
        let expires_at = self.expires_at(Utc::now());
        self.tables().insert(
            id,
            Record {
                entry: entry.clone(),
                expires_at,
            },
        );
        Ok(())
    }

    async fn touch(&self, id: &str) -> Result<bool> {
        validate_id("session id", id)?;
        let now = Utc::now();
        let expires_at = self.expires_at(now);
        let mut tables = self.tables();
        match tables.sessions.get_mut(id).filter(|r| r.is_live(now)) {
            Some(record) => {
                record.entry.last_access = now_seconds();
                record.expires_at = expires_at;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn delete(&self, id: &str) -> Result<bool> {
        validate_id("session id", id)?;
        Ok(self.tables().remove(id).is_some())
    }

    async fn delete_many(&self, ids: &[String]) -> Result<u64> {
        let mut tables = self.tables();
        Ok(ids.iter().filter(|id| tables.remove(id).is_some()).count() as u64)
    }

    async fn delete_by_worker(&self, worker_id: &str) -> Result<u64> {
        validate_id("worker id", worker_id)?;
        let mut tables = self.tables();
        let ids = tables.by_worker.remove(worker_id).unwrap_or_default();
        for id in &ids {
            tables.sessions.remove(id);
        }
        Ok(ids.len() as u64)
    }

    async fn count_for_worker(&self, worker_id: &str) -> Result<u64> {
        validate_id("worker id", worker_id)?;
        Ok(self.tables().live_of_worker(worker_id, Utc::now()).count() as u64)
    }

    async fn count_for_workers(&self, worker_ids: &[String]) -> Result<u64> {
        for w in worker_ids {
            validate_id("worker id", w)?;
        }
        let now = Utc::now();
        let tables = self.tables();
        let unique: HashSet<&String> = worker_ids.iter().collect();
        Ok(unique
            .into_iter()
            .map(|w| tables.live_of_worker(w, now).count() as u64)
            .sum())
    }

    async fn counts_by_worker(&self) -> Result<BTreeMap<String, u64>> {
        let now = Utc::now();
        let tables = self.tables();
        Ok(tables
            .by_worker
            .keys()
            .map(|w| (w.clone(), tables.live_of_worker(w, now).count() as u64))
            .filter(|(_, n)| *n > 0)
            .collect())
    }

    async fn reroute_worker(&self, from: &str, to: &str) -> Result<u64> {
        validate_id("worker id", from)?;
        validate_id("worker id", to)?;
        let now = Utc::now();
        let mut tables = self.tables();
        let ids: Vec<String> = tables
            .live_of_worker(from, now)
            .map(|(id, _)| id.clone())
            .collect();
        if from == to {
            return Ok(ids.len() as u64);
        }
        for id in &ids {
            if let Some(mut record) = tables.remove(id) {
                record.entry.worker_id = to.to_string();
                tables.insert(id, record);
            }
        }
        Ok(ids.len() as u64)
    }

    async fn entries_for_worker(&self, worker_id: &str) -> Result<HashMap<String, Entry>> {
        validate_id("worker id", worker_id)?;
        Ok(self
            .tables()
            .live_of_worker(worker_id, Utc::now())
            .map(|(id, r)| (id.clone(), r.entry.clone()))
            .collect())
    }

    async fn sweep_batch(&self, sweep: Sweep<'_>, limit: usize) -> Result<Vec<String>> {
        let now = Utc::now();
        let mut tables = self.tables();
        let doomed: Vec<String> = match sweep {
            Sweep::Expired => tables
                .sessions
                .iter()
                .filter(|(_, r)| !r.is_live(now))
                .map(|(id, _)| id.clone())
                .take(limit)
                .collect(),
            Sweep::Idle { max_age, workers } => {
                let age = self.options.idle_cutoff_age(max_age);
                let cutoff = chrono::TimeDelta::from_std(age)
                    .ok()
                    .and_then(|age| now.checked_sub_signed(age))
                    .unwrap_or(DateTime::<Utc>::MIN_UTC);
                let idle = |r: &Record| r.entry.last_access < cutoff;
                match workers {
                    None => tables
                        .sessions
                        .iter()
                        .filter(|(_, r)| idle(r))
                        .map(|(id, _)| id.clone())
                        .take(limit)
                        .collect(),
                    Some(workers) => workers
                        .iter()
                        .filter_map(|w| tables.by_worker.get(w))
                        .flatten()
                        .filter(|id| tables.sessions.get(*id).is_some_and(idle))
                        .take(limit)
                        .cloned()
                        .collect(),
                }
            }
        };
        for id in &doomed {
            tables.remove(id);
        }
        Ok(doomed)
    }

    fn options(&self) -> &StoreOptions {
        &self.options
    }
}
