//! In-process store: the embedded default and the reference the other stores are tested against.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::cache::epoch_shard;
use super::entry::now_seconds;
use super::{Cache, Entry, Lookup, Result, Store, StoreOptions, Sweep, Ticket, validate_id};

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
    /// Invalidation epochs by shard, when used as a [`Cache`].
    epochs: HashMap<u64, i64>,
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

    fn epoch(&self, id: &str) -> i64 {
        self.epochs.get(&epoch_shard(id)).copied().unwrap_or(0)
    }

    fn bump(&mut self, id: &str) {
        *self.epochs.entry(epoch_shard(id)).or_default() += 1;
    }

    /// Up to `limit` ids of a worker, expired or not.
    fn ids_of_worker(&self, worker: &str, limit: usize) -> Vec<String> {
        self.by_worker
            .get(worker)
            .into_iter()
            .flatten()
            .take(limit)
            .cloned()
            .collect()
    }

    /// Moves `ids` to worker `to`, keeping everything else.
    fn move_to(&mut self, ids: &[String], to: &str) {
        for id in ids {
            if let Some(mut record) = self.remove(id) {
                record.entry.worker_id = to.to_string();
                self.insert(id, record);
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
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
        for id in ids {
            validate_id("session id", id)?;
        }
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
        if from == to {
            return Ok(tables.live_of_worker(from, now).count() as u64);
        }
        // Expired but unswept sessions move too, as in Postgres (blockyard still routes them).
        let ids = tables.ids_of_worker(from, usize::MAX);
        tables.move_to(&ids, to);
        Ok(ids.len() as u64)
    }

    async fn reroute_batch(&self, from: &str, to: &str, limit: usize) -> Result<Vec<String>> {
        validate_id("worker id", from)?;
        validate_id("worker id", to)?;
        if from == to {
            return Ok(Vec::new());
        }
        let mut tables = self.tables();
        let ids = tables.ids_of_worker(from, limit.max(1));
        tables.move_to(&ids, to);
        Ok(ids)
    }

    async fn delete_worker_batch(&self, worker_id: &str, limit: usize) -> Result<Vec<String>> {
        validate_id("worker id", worker_id)?;
        let mut tables = self.tables();
        let ids = tables.ids_of_worker(worker_id, limit.max(1));
        for id in &ids {
            tables.remove(id);
        }
        Ok(ids)
    }

    /// Workers of the index, including those whose sessions all expired but were not swept.
    async fn workers_with_sessions(&self) -> Result<BTreeSet<String>> {
        Ok(self.tables().by_worker.keys().cloned().collect())
    }

    async fn workers_holding(&self, worker_ids: &[String]) -> Result<BTreeSet<String>> {
        for w in worker_ids {
            validate_id("worker id", w)?;
        }
        let tables = self.tables();
        Ok(worker_ids
            .iter()
            .filter(|w| tables.by_worker.contains_key(w.as_str()))
            .cloned()
            .collect())
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
        if let Sweep::Idle {
            workers: Some(workers),
            ..
        } = sweep
        {
            for w in workers {
                validate_id("worker id", w)?;
            }
        }
        let doomed: Vec<String> = match sweep {
            Sweep::Expired => tables
                .sessions
                .iter()
                .filter(|(_, r)| !r.is_live(now))
                .map(|(id, _)| id.clone())
                .take(limit)
                .collect(),
            Sweep::Idle { max_age, workers } => {
                // `last_access` has whole seconds (blockyard's precision): a session stored with
                // second S may have been used until S + 1 s, so it is idle only from then on.
                let age = self.options.idle_cutoff_age(max_age);
                let cutoff = chrono::TimeDelta::from_std(age)
                    .ok()
                    .and_then(|age| now.checked_sub_signed(age))
                    .and_then(|at| at.checked_sub_signed(chrono::TimeDelta::seconds(1)))
                    .unwrap_or(DateTime::<Utc>::MIN_UTC);
                let idle = |r: &Record| r.entry.last_access <= cutoff;
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
                        .collect::<BTreeSet<_>>()
                        .into_iter()
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

#[async_trait]
impl Cache for MemoryStore {
    async fn lookup(&self, id: &str) -> Result<Lookup> {
        validate_id("session id", id)?;
        let now = Utc::now();
        let tables = self.tables();
        Ok(match tables.sessions.get(id).filter(|r| r.is_live(now)) {
            Some(record) => Lookup::Hit(record.entry.clone()),
            None => Lookup::Miss(Ticket(tables.epoch(id))),
        })
    }

    async fn ticket(&self, id: &str) -> Result<Ticket> {
        validate_id("session id", id)?;
        Ok(Ticket(self.tables().epoch(id)))
    }

    async fn fill(&self, id: &str, entry: &Entry, ticket: Ticket) -> Result<bool> {
        validate_id("session id", id)?;
        validate_id("worker id", &entry.worker_id)?;
        let now = Utc::now();
        let expires_at = self.expires_at(now);
        let mut tables = self.tables();
        let present = tables.sessions.get(id).is_some_and(|r| r.is_live(now));
        if present || tables.epoch(id) != ticket.0 {
            return Ok(false);
        }
        let entry = entry.clone();
        tables.insert(id, Record { entry, expires_at });
        Ok(true)
    }

    async fn overwrite(&self, id: &str, entry: &Entry, ticket: Ticket) -> Result<bool> {
        validate_id("session id", id)?;
        validate_id("worker id", &entry.worker_id)?;
        let expires_at = self.expires_at(Utc::now());
        let mut tables = self.tables();
        let current = tables.epoch(id) == ticket.0;
        tables.bump(id);
        if current {
            let entry = entry.clone();
            tables.insert(id, Record { entry, expires_at });
        } else {
            tables.remove(id);
        }
        Ok(current)
    }

    async fn invalidate(&self, ids: &[String]) -> Result<()> {
        for id in ids {
            validate_id("session id", id)?;
        }
        let mut tables = self.tables();
        for id in ids {
            tables.remove(id);
            tables.bump(id);
        }
        Ok(())
    }

    async fn reroute_ids(&self, ids: &[String], from: &str, to: &str) -> Result<()> {
        validate_id("worker id", from)?;
        validate_id("worker id", to)?;
        for id in ids {
            validate_id("session id", id)?;
        }
        let mut tables = self.tables();
        for id in ids {
            let held = tables.sessions.get(id).map(|r| r.entry.worker_id.clone());
            match held {
                Some(w) if w == from => tables.move_to(std::slice::from_ref(id), to),
                Some(w) if w != to => {
                    tables.remove(id);
                }
                _ => {}
            }
            tables.bump(id);
        }
        Ok(())
    }

    async fn invalidate_worker(&self, worker_id: &str) -> Result<()> {
        validate_id("worker id", worker_id)?;
        let mut tables = self.tables();
        for id in tables.ids_of_worker(worker_id, usize::MAX) {
            tables.remove(&id);
            tables.bump(&id);
        }
        Ok(())
    }
}
