//! Redis store: blockyard's session hashes plus a per-worker index.
//!
//! Layout under the key prefix `P` (default `blockyard:`):
//!
//! - `P session:{id}`: hash `worker_id`, `user_sub`, `last_access` (Unix seconds), TTL = idle
//!   TTL — exactly blockyard's format;
//! - `P session-index:worker:{worker}`: sorted set of the worker's session ids, scored by the
//!   session's expiry in Unix milliseconds (`+inf` without TTL), so the expiry sweep finds
//!   expired members by score. Counts and entries check each member's hash instead (Redis never
//!   returns an expired hash), so they never include expired sessions;
//! - `P session-index:workers`: set of worker ids that have an index.
//!
//! Every write goes through a Lua script that updates the hash and the index together, and
//! worker-level operations walk only the worker's index: O(sessions of that worker) instead of
//! blockyard's `SCAN` of the whole keyspace. Index members are verified against the hash
//! (`worker_id` must still match), so an index made stale by a foreign writer is repaired, not
//! trusted.
//!
//! Hashes written by a writer that does not maintain the index (blockyard itself) are found by
//! an incremental, non-blocking `SCAN` that adds them to the index before each worker-level
//! operation, unless [`RedisOptions::index_only`] says every writer maintains the index.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use super::cache::epoch_shard;
use super::{
    Cache, Entry, Fencing, Lookup, Result, Store, StoreError, StoreOptions, Sweep, Ticket,
    validate_id,
};

/// blockyard's default key prefix.
pub const DEFAULT_PREFIX: &str = "blockyard:";

/// Settings of the Redis store beyond [`StoreOptions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// Prefix of every key (blockyard's `{prefix}session:{id}`); a non-empty prefix without a
    /// trailing `:` gets one, as in blockyard.
    pub prefix: String,
    /// `true` when every writer maintains the per-worker index (all use this library): skips the
    /// full-keyspace `SCAN` that finds hashes written by blockyard or other foreign writers.
    pub index_only: bool,
    /// Per-command timeout; a Redis that stops answering fails operations after this long.
    pub response_timeout: Duration,
    /// PEM file of the CA that signed a `rediss://` server's certificate, when it is not in the
    /// system's trust store.
    pub ca_file: Option<std::path::PathBuf>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_string(),
            index_only: false,
            response_timeout: Duration::from_secs(2),
            ca_file: None,
        }
    }
}

/// Shared Lua helpers: key names and the index score of a session key.
const LUA_PRELUDE: &str = r#"
local P = ARGV[1]
local function skey(id) return P .. 'session:' .. id end
local function ikey(w) return P .. 'session-index:worker:' .. w end
local WORKERS = P .. 'session-index:workers'
local EPOCHS = P .. 'session-epochs'
local function epoch(shard) return tonumber(redis.call('HGET', EPOCHS, shard) or '0') end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function index(id, w, pttl)
  local score = '+inf'
  if pttl >= 0 then score = string.format('%.0f', now_ms() + pttl) end
  redis.call('ZADD', ikey(w), score, id)
  redis.call('SADD', WORKERS, w)
end
local function unindex(id, w)
  redis.call('ZREM', ikey(w), id)
  if redis.call('EXISTS', ikey(w)) == 0 then redis.call('SREM', WORKERS, w) end
end
-- Runs redis.call(cmd, key, unpack(args)) in chunks: one call per chunk instead of one per item,
-- within Lua's limit on unpacked values.
local function bulk(cmd, key, args, step)
  for i = 1, #args, step do
    redis.call(cmd, key, unpack(args, i, math.min(i + step - 1, #args)))
  end
end
local function write_ttl(key, ttl)
  if ttl > 0 then redis.call('EXPIRE', key, ttl); return ttl * 1000 end
  redis.call('PERSIST', key)
  return -1
end
-- Fencing (src/store/fencing.rs): a fenced writer passes KEYS[1] = its scope's epoch key and
-- KEYS[2] = the epoch it holds. A newer epoch refuses the script before it writes anything; an
-- older one is raised to this writer's, which fences the older leader from then on.
if KEYS[1] then
  local held = tonumber(redis.call('GET', KEYS[1]) or '0')
  local mine = tonumber(KEYS[2])
  if held > mine then
    return redis.error_reply('FENCED leadership epoch ' .. KEYS[2] .. ' was superseded by epoch ' .. held)
  end
  if held < mine then redis.call('SET', KEYS[1], KEYS[2]) end
end
"#;

/// ARGV: prefix, id, worker, user_sub, last_access, ttl seconds.
const SET: &str = r#"
local id, w = ARGV[2], ARGV[3]
local key = skey(id)
local old = redis.call('HGET', key, 'worker_id')
if old and old ~= w then unindex(id, old) end
redis.call('HSET', key, 'worker_id', w, 'user_sub', ARGV[4], 'last_access', ARGV[5])
index(id, w, write_ttl(key, tonumber(ARGV[6])))
return 1
"#;

/// ARGV: prefix, id, ttl seconds. Returns 1 when the session exists.
const TOUCH: &str = r#"
local id = ARGV[2]
local key = skey(id)
local w = redis.call('HGET', key, 'worker_id')
if not w then return 0 end
redis.call('HSET', key, 'last_access', redis.call('TIME')[1])
index(id, w, write_ttl(key, tonumber(ARGV[3])))
return 1
"#;

/// ARGV: prefix, ids… Returns how many existed.
const DELETE: &str = r#"
local n = 0
for i = 2, #ARGV do
  local key = skey(ARGV[i])
  local w = redis.call('HGET', key, 'worker_id')
  n = n + redis.call('DEL', key)
  if w then unindex(ARGV[i], w) end
end
return n
"#;

/// ARGV: prefix, worker, limit. Deletes up to `limit` index members' sessions.
/// Returns {members processed, {deleted ids}}.
const DELETE_WORKER_BATCH: &str = r#"
local w = ARGV[2]
local ids = redis.call('ZRANGE', ikey(w), 0, tonumber(ARGV[3]) - 1)
local out = {}
for _, id in ipairs(ids) do
  if redis.call('HGET', skey(id), 'worker_id') == w then
    redis.call('DEL', skey(id))
    out[#out + 1] = id
  end
end
bulk('ZREM', ikey(w), ids, 1000)
if redis.call('EXISTS', ikey(w)) == 0 then redis.call('SREM', WORKERS, w) end
return {#ids, out}
"#;

/// ARGV: prefix, from, to, limit. Moves up to `limit` index members' sessions.
/// Returns {members processed, {moved ids}}.
const REROUTE_BATCH: &str = r#"
local from, to = ARGV[2], ARGV[3]
local ids = redis.call('ZRANGE', ikey(from), 0, tonumber(ARGV[4]) - 1, 'WITHSCORES')
local out, adds, seen = {}, {}, {}
for i = 1, #ids, 2 do
  local id, score = ids[i], ids[i + 1]
  seen[#seen + 1] = id
  if redis.call('HGET', skey(id), 'worker_id') == from then
    redis.call('HSET', skey(id), 'worker_id', to)
    adds[#adds + 1] = score
    adds[#adds + 1] = id
    out[#out + 1] = id
  end
end
bulk('ZADD', ikey(to), adds, 1000)
bulk('ZREM', ikey(from), seen, 1000)
if #out > 0 then redis.call('SADD', WORKERS, to) end
if redis.call('EXISTS', ikey(from)) == 0 then redis.call('SREM', WORKERS, from) end
return {#ids / 2, out}
"#;

/// ARGV: prefix, id, shard. Returns {'1', worker, user_sub, last_access} for a session, or
/// {'0', epoch of the shard} on a miss. A hash without `worker_id` (left by blockyard's
/// non-atomic touch after expiry) is a miss.
const LOOKUP: &str = r#"
local h = redis.call('HMGET', skey(ARGV[2]), 'worker_id', 'user_sub', 'last_access')
if h[1] then return {'1', h[1], h[2] or '', h[3] or ''} end
return {'0', tostring(epoch(ARGV[3]))}
"#;

/// ARGV: prefix, id, shard, ticket, worker, user_sub, last_access, ttl seconds. Writes the
/// session only if it is absent and the shard's epoch still equals the ticket.
const FILL: &str = r#"
local id = ARGV[2]
local key = skey(id)
if epoch(ARGV[3]) ~= tonumber(ARGV[4]) or redis.call('EXISTS', key) == 1 then return 0 end
redis.call('HSET', key, 'worker_id', ARGV[5], 'user_sub', ARGV[6], 'last_access', ARGV[7])
index(id, ARGV[5], write_ttl(key, tonumber(ARGV[8])))
return 1
"#;

/// ARGV: as FILL. Writes the session if the shard's epoch still equals the ticket, deletes it
/// otherwise; bumps the epoch either way.
const OVERWRITE: &str = r#"
local id, w = ARGV[2], ARGV[5]
local key = skey(id)
local current = epoch(ARGV[3]) == tonumber(ARGV[4])
redis.call('HINCRBY', EPOCHS, ARGV[3], 1)
local old = redis.call('HGET', key, 'worker_id')
if old and (old ~= w or not current) then unindex(id, old) end
if not current then
  redis.call('DEL', key)
  return 0
end
redis.call('HSET', key, 'worker_id', w, 'user_sub', ARGV[6], 'last_access', ARGV[7])
index(id, w, write_ttl(key, tonumber(ARGV[8])))
return 1
"#;

/// ARGV: prefix, worker ('' for none), n, n ids, shards… Deletes the ids (and their index
/// members, also under `worker`, whose hash may be gone), then bumps the shards' epochs.
const INVALIDATE: &str = r#"
local worker, n = ARGV[2], tonumber(ARGV[3])
for i = 4, 3 + n do
  local id = ARGV[i]
  local w = redis.call('HGET', skey(id), 'worker_id')
  redis.call('DEL', skey(id))
  if w then unindex(id, w) end
  if worker ~= '' and worker ~= w then unindex(id, worker) end
end
for i = 4 + n, #ARGV do redis.call('HINCRBY', EPOCHS, ARGV[i], 1) end
return n
"#;

/// ARGV: prefix, from, to, n, n ids, shards… Switches the ids held with `from` to `to`, deletes
/// those held with a third worker, then bumps the shards' epochs.
const REROUTE_IDS: &str = r#"
local from, to, n = ARGV[2], ARGV[3], tonumber(ARGV[4])
for i = 5, 4 + n do
  local id = ARGV[i]
  local key = skey(id)
  local w = redis.call('HGET', key, 'worker_id')
  if w == from then
    redis.call('HSET', key, 'worker_id', to)
    redis.call('ZREM', ikey(from), id)
    index(id, to, redis.call('PTTL', key))
  elseif w and w ~= to then
    redis.call('DEL', key)
    unindex(id, w)
  end
end
if redis.call('EXISTS', ikey(from)) == 0 then redis.call('SREM', WORKERS, from) end
for i = 5 + n, #ARGV do redis.call('HINCRBY', EPOCHS, ARGV[i], 1) end
return n
"#;

/// ARGV: prefix, worker, with entries ('1' or '0'), ids… Returns the ids (with `user_sub` and
/// `last_access` when asked: a flat {id, user_sub, last_access, …}) whose hash still belongs to
/// the worker, and drops the other ids from the worker's index. Liveness comes from the hash
/// itself (Redis never returns an expired one), not from the score: blockyard touches hashes
/// without updating our index, so an old score can hide a live session. Called with at most one
/// batch of ids, so no call blocks Redis for long.
const LIVE_CHECK: &str = r#"
local w, with_entries = ARGV[2], ARGV[3] == '1'
local out = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local h = redis.call('HMGET', skey(id), 'worker_id', 'user_sub', 'last_access')
  if h[1] == w then
    out[#out + 1] = id
    if with_entries then
      out[#out + 1] = h[2] or ''
      out[#out + 1] = h[3] or ''
    end
  else
    redis.call('ZREM', ikey(w), id)
  end
end
if redis.call('EXISTS', ikey(w)) == 0 then redis.call('SREM', WORKERS, w) end
return out
"#;

/// ARGV: prefix, worker, idle age (whole seconds), start rank, window, limit. Examines at most
/// `window` index members from `start` and deletes up to `limit` sessions of the worker idle
/// longer than the age by Redis's clock — the clock that wrote `last_access` on touches — with
/// `last_access` in whole seconds: a session stored with second S may have been used until
/// S + 1, so it is idle from S + 1 + age on (a hash without a readable `last_access` is left
/// alone). Returns
/// {members examined, rank to continue from, {deleted ids}}: a sweep walks each index once, in
/// bounded steps, instead of rescanning it per batch.
const IDLE_STEP: &str = r#"
local w = ARGV[2]
local cutoff = tonumber(redis.call('TIME')[1]) - tonumber(ARGV[3])
local start, window, limit = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local ids = redis.call('ZRANGE', ikey(w), start, start + window - 1)
local out, dropped, examined = {}, 0, 0
for _, id in ipairs(ids) do
  if #out >= limit then break end
  examined = examined + 1
  local h = redis.call('HMGET', skey(id), 'worker_id', 'last_access')
  local last = tonumber(h[2])
  if h[1] ~= w then
    redis.call('ZREM', ikey(w), id)
    dropped = dropped + 1
  elseif last ~= nil and last < cutoff then
    redis.call('DEL', skey(id))
    redis.call('ZREM', ikey(w), id)
    dropped = dropped + 1
    out[#out + 1] = id
  end
end
if redis.call('EXISTS', ikey(w)) == 0 then redis.call('SREM', WORKERS, w) end
return {examined, start + examined - dropped, out}
"#;

/// KEYS: session keys found by SCAN; ARGV: prefix. Adds hashes missing from their worker's index.
const ADOPT: &str = r#"
local plen = #skey('')
local n = 0
for i = 2, #ARGV do
  local key = ARGV[i]
  if redis.call('TYPE', key).ok == 'hash' then
    local w = redis.call('HGET', key, 'worker_id')
    local id = string.sub(key, plen + 1)
    if w and not redis.call('ZSCORE', ikey(w), id) then
      index(id, w, redis.call('PTTL', key))
      n = n + 1
    end
  end
end
return n
"#;

/// ARGV: prefix, worker, limit. Examines up to `limit` members of the worker's index whose score
/// says "expired": drops those whose hash is gone or moved to another worker, and re-scores
/// from its TTL one a foreign writer kept alive. Returns {members examined, {expired ids}}.
const PRUNE_STEP: &str = r#"
local w = ARGV[2]
local ids = redis.call('ZRANGEBYSCORE', ikey(w), '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local pttl = redis.call('PTTL', skey(id))
  if pttl == -2 then
    redis.call('ZREM', ikey(w), id)
    out[#out + 1] = id
  elseif redis.call('HGET', skey(id), 'worker_id') ~= w then
    redis.call('ZREM', ikey(w), id)
  else
    index(id, w, pttl)
  end
end
if redis.call('EXISTS', ikey(w)) == 0 then redis.call('SREM', WORKERS, w) end
return {#ids, out}
"#;

struct Scripts {
    set: Script,
    touch: Script,
    delete: Script,
    delete_worker_batch: Script,
    reroute_batch: Script,
    lookup: Script,
    fill: Script,
    overwrite: Script,
    invalidate: Script,
    reroute_ids: Script,
    live_check: Script,
    idle_step: Script,
    adopt: Script,
    prune_step: Script,
}

impl Scripts {
    fn new() -> Self {
        let s = |body: &str| Script::new(&format!("{LUA_PRELUDE}{body}"));
        Self {
            set: s(SET),
            touch: s(TOUCH),
            delete: s(DELETE),
            delete_worker_batch: s(DELETE_WORKER_BATCH),
            reroute_batch: s(REROUTE_BATCH),
            lookup: s(LOOKUP),
            fill: s(FILL),
            overwrite: s(OVERWRITE),
            invalidate: s(INVALIDATE),
            reroute_ids: s(REROUTE_IDS),
            live_check: s(LIVE_CHECK),
            idle_step: s(IDLE_STEP),
            adopt: s(ADOPT),
            prune_step: s(PRUNE_STEP),
        }
    }
}

/// Sessions in Redis, wire-compatible with blockyard (see the module docs for the key layout).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    options: StoreOptions,
    redis: RedisOptions,
    scripts: std::sync::Arc<Scripts>,
    /// Set once by the operator: its writes then carry and check its epoch.
    fencing: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<dyn Fencing>>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("options", &self.options)
            .field("redis", &self.redis)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`). A malformed URL or an unreachable server is
    /// an error naming the URL without its password. The prefix is normalised as blockyard
    /// does ([`super::options::redis_key_prefix`]).
    pub async fn connect(url: &str, options: StoreOptions, redis: RedisOptions) -> Result<Self> {
        let store = Self::connect_lazy(url, options, redis)?;
        let mut conn = store.conn.clone();
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        Ok(store)
    }

    /// Like [`Self::connect`], but without waiting for the server: the connection is made on
    /// first use and re-made after failures. Only configuration errors (URL, CA file) fail here.
    /// For a cache that may be down when its user starts (the operator starts on Postgres
    /// alone and repairs the cache once Redis answers).
    pub fn connect_lazy(url: &str, options: StoreOptions, mut redis: RedisOptions) -> Result<Self> {
        options.validate()?;
        redis.prefix = super::options::redis_key_prefix(&redis.prefix);
        let client = match &redis.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    StoreError::Config(format!("reading the Redis CA file {}: {e}", path.display()))
                })?;
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                };
                redis::Client::build_with_tls(url, certs)
                    .map_err(|e| StoreError::Config(format!("invalid Redis URL or CA file: {e}")))?
            }
            None => redis::Client::open(url)
                .map_err(|e| StoreError::Config(format!("invalid Redis URL: {e}")))?,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(redis.response_timeout))
            .set_response_timeout(Some(redis.response_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self {
            conn,
            options,
            redis,
            scripts: std::sync::Arc::new(Scripts::new()),
            fencing: std::sync::Arc::default(),
        })
    }

    /// A handle on the store's connection, for the operator's own keys beside the sessions
    /// (its worker records): they share its server, TLS settings and timeouts.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.redis.prefix
    }

    /// The key of a session's hash.
    pub fn session_key(&self, id: &str) -> String {
        format!("{}session:{id}", self.redis.prefix)
    }

    /// A call of a script that only reads or repairs the index: never fenced.
    fn call<'a>(&self, script: &'a Script) -> redis::ScriptInvocation<'a> {
        let mut call = script.prepare_invoke();
        call.arg(&self.redis.prefix);
        call
    }

    /// A call of a script that writes sessions: in a fenced store it carries the epoch key and
    /// the granted epoch (see the prelude), and fails at once when the fence refuses.
    fn write_call<'a>(&self, script: &'a Script) -> Result<redis::ScriptInvocation<'a>> {
        let mut call = script.prepare_invoke();
        if let Some(fencing) = self.fencing.get() {
            let grant = fencing.grant()?;
            call.key(self.epoch_key(fencing.scope())).key(grant.epoch);
        }
        call.arg(&self.redis.prefix);
        Ok(call)
    }

    /// Where a fenced scope's leadership epoch is kept.
    fn epoch_key(&self, scope: &str) -> String {
        format!("{}operator-epoch:{scope}", self.redis.prefix)
    }

    /// The hash of invalidation epochs (see [`Cache`]).
    fn epochs_key(&self) -> String {
        format!("{}session-epochs", self.redis.prefix)
    }

    fn ttl_secs(&self) -> u64 {
        // Redis's TTL is the idle TTL itself (blockyard's format): the cache is touched on every
        // request, so it needs no coalescing slack. Sub-second TTLs round up to one second.
        let ttl = self.options.idle_ttl;
        ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)
    }

    /// Adds hashes that no index knows (written by blockyard or another foreign writer) to
    /// their worker's index, so index walks find them. Incremental `SCAN`: Redis keeps serving
    /// other clients between steps. Returns how many hashes were adopted.
    pub async fn adopt_unindexed(&self) -> Result<u64> {
        let pattern = format!("{}session:*", glob_escape(&self.redis.prefix));
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut adopted = 0;
        loop {
            let (next, raw): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            // A key that is not UTF-8 cannot name a session any store accepts: leave it alone
            // rather than fail every worker operation on it.
            let keys: Vec<String> = raw
                .into_iter()
                .filter_map(|key| String::from_utf8(key).ok())
                .collect();
            if !keys.is_empty() {
                let mut call = self.call(&self.scripts.adopt);
                for key in &keys {
                    call.arg(key);
                }
                adopted += call.invoke_async::<u64>(&mut conn).await?;
            }
            if next == 0 {
                return Ok(adopted);
            }
            cursor = next;
        }
    }

    /// Writes many sessions in pipelined round trips (bulk imports, benchmarks); each session is
    /// written by the same script as [`Store::set`], index included.
    pub async fn set_many(&self, sessions: &[(String, Entry)]) -> Result<()> {
        for (id, entry) in sessions {
            validate_id("session id", id)?;
            validate_id("worker id", &entry.worker_id)?;
        }
        let mut conn = self.conn.clone();
        // Pipelined invocations use EVALSHA only: make sure Redis knows the script.
        self.scripts
            .set
            .prepare_invoke()
            .load_async(&mut conn)
            .await?;
        for chunk in sessions.chunks(1000) {
            let mut pipe = redis::pipe();
            for (id, entry) in chunk {
                let mut call = self.write_call(&self.scripts.set)?;
                call.arg(id)
                    .arg(&entry.worker_id)
                    .arg(&entry.user_sub)
                    .arg(entry.last_access.timestamp())
                    .arg(self.ttl_secs());
                pipe.invoke_script(&call).ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        Ok(())
    }

    /// Before a worker-level operation: make foreign hashes visible to the index.
    async fn adopt_if_needed(&self) -> Result<()> {
        if !self.redis.index_only {
            self.adopt_unindexed().await?;
        }
        Ok(())
    }

    async fn live_count(&self, worker: &str) -> Result<u64> {
        let mut ids = HashSet::new();
        self.live_walk(worker, false, |flat| ids.extend(flat))
            .await?;
        Ok(ids.len() as u64)
    }

    /// Walks a worker's index with `ZSCAN` (incremental: every member present throughout is seen
    /// at least once, some maybe twice) and checks each step's members against their hashes in
    /// a script of at most one batch, so no call blocks Redis for long however large the worker.
    /// `found` receives each step's live ids (flat triples with `with_entries`).
    async fn live_walk(
        &self,
        worker: &str,
        with_entries: bool,
        mut found: impl FnMut(Vec<String>) + Send,
    ) -> Result<()> {
        let index = format!("{}session-index:worker:{worker}", self.redis.prefix);
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        loop {
            let (next, flat): (u64, Vec<String>) = redis::cmd("ZSCAN")
                .arg(&index)
                .arg(cursor)
                .arg("COUNT")
                .arg(self.options.batch())
                .query_async(&mut conn)
                .await?;
            let members: Vec<&String> = flat.iter().step_by(2).collect();
            // A small sorted set answers ZSCAN whole, whatever COUNT says: check it in batches.
            for chunk in members.chunks(self.options.batch()) {
                let mut call = self.call(&self.scripts.live_check);
                call.arg(worker).arg(if with_entries { "1" } else { "0" });
                for id in chunk {
                    call.arg(id.as_str());
                }
                found(call.invoke_async(&mut conn).await?);
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Drops index members whose hash expired, in steps of at most one batch of members per
    /// script; `pruned` receives each step's expired ids and returns whether to go on. At most
    /// `limit` ids are reported in all.
    async fn prune_walk(
        &self,
        mut pruned: impl FnMut(Vec<String>) -> bool + Send,
        limit: usize,
    ) -> Result<()> {
        let window = self.options.batch();
        let mut left = limit;
        let mut conn = self.conn.clone();
        for w in self.indexed_workers().await? {
            loop {
                if left == 0 {
                    return Ok(());
                }
                let step = left.min(window);
                let (examined, ids): (usize, Vec<String>) = self
                    .call(&self.scripts.prune_step)
                    .arg(&w)
                    .arg(step)
                    .invoke_async(&mut conn)
                    .await?;
                left -= ids.len();
                if !pruned(ids) {
                    return Ok(());
                }
                if examined < step {
                    break;
                }
            }
        }
        Ok(())
    }

    async fn indexed_workers(&self) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        Ok(conn
            .smembers(format!("{}session-index:workers", self.redis.prefix))
            .await?)
    }

    /// Deletes sessions idle longer than `max_age` (plus the touch window) from the indexes of
    /// `workers` (all indexed workers if `None`), in steps of at most one batch of members.
    /// `removed` receives each step's deleted ids and returns whether to go on; at most `limit`
    /// ids are deleted in all.
    async fn sweep_idle_walk(
        &self,
        max_age: Duration,
        workers: Option<&[String]>,
        mut removed: impl FnMut(Vec<String>) -> bool + Send,
        limit: usize,
    ) -> Result<()> {
        for w in workers.unwrap_or_default() {
            validate_id("worker id", w)?;
        }
        if workers.is_some_and(<[std::string::String]>::is_empty) {
            return Ok(());
        }
        self.adopt_if_needed().await?;
        let age = self.options.idle_cutoff_age(max_age);
        // Whole seconds, rounded up: a sweep must never cut earlier than asked. The cutoff
        // itself is computed by the script from Redis's clock.
        let age_secs = (age.as_secs() + u64::from(age.subsec_nanos() > 0)).min(i64::MAX as u64);
        let workers = match workers {
            Some(ws) => ws.to_vec(),
            None => self.indexed_workers().await?,
        };
        let window = self.options.batch();
        let mut left = limit;
        let mut conn = self.conn.clone();
        for w in &workers {
            let mut start = 0;
            loop {
                let (examined, next, ids): (usize, usize, Vec<String>) = self
                    .write_call(&self.scripts.idle_step)?
                    .arg(w)
                    .arg(age_secs)
                    .arg(start)
                    .arg(window)
                    .arg(left.min(window))
                    .invoke_async(&mut conn)
                    .await?;
                left -= ids.len();
                if !removed(ids) || left == 0 {
                    return Ok(());
                }
                if examined < window {
                    break;
                }
                start = next;
            }
        }
        Ok(())
    }

    /// One batch of a `{processed, {affected ids}}` worker script: repeats the script over stale
    /// index members until it affects a session or the index is exhausted, so an empty answer
    /// means the worker has nothing left. Every script call handles at most `limit` members.
    async fn worker_batch(
        &self,
        script: &Script,
        args: &[&str],
        limit: usize,
    ) -> Result<Vec<String>> {
        let limit = limit.max(1);
        let mut conn = self.conn.clone();
        loop {
            let mut call = self.write_call(script)?;
            for a in args {
                call.arg(*a);
            }
            let (processed, ids): (usize, Vec<String>) =
                call.arg(limit).invoke_async(&mut conn).await?;
            if !ids.is_empty() || processed < limit {
                return Ok(ids);
            }
        }
    }

    /// Runs a worker script batch by batch until the worker has nothing left.
    async fn drain(&self, script: &Script, args: &[&str]) -> Result<u64> {
        let mut total = 0;
        loop {
            let ids = self
                .worker_batch(script, args, self.options.batch())
                .await?;
            if ids.is_empty() {
                return Ok(total);
            }
            total += ids.len() as u64;
        }
    }

    /// Runs INVALIDATE or REROUTE_IDS (`head` arguments after the prefix) over `ids` in chunks
    /// of one batch, with the chunk's epoch shards appended.
    async fn by_ids(&self, script: &Script, head: &[&str], ids: &[String]) -> Result<()> {
        let mut conn = self.conn.clone();
        for chunk in ids.chunks(self.options.batch()) {
            let shards: std::collections::BTreeSet<u64> =
                chunk.iter().map(|id| epoch_shard(id)).collect();
            let mut call = self.write_call(script)?;
            for a in head {
                call.arg(*a);
            }
            call.arg(chunk.len()).arg(chunk);
            for shard in shards {
                call.arg(shard);
            }
            let _: i64 = call.invoke_async(&mut conn).await?;
        }
        Ok(())
    }

    /// FILL or OVERWRITE of one session.
    async fn write_ticketed(
        &self,
        script: &Script,
        id: &str,
        entry: &Entry,
        ticket: Ticket,
    ) -> Result<bool> {
        validate_id("session id", id)?;
        validate_id("worker id", &entry.worker_id)?;
        let mut conn = self.conn.clone();
        let wrote: i64 = self
            .write_call(script)?
            .arg(id)
            .arg(epoch_shard(id))
            .arg(ticket.0)
            .arg(&entry.worker_id)
            .arg(&entry.user_sub)
            .arg(entry.last_access.timestamp())
            .arg(self.ttl_secs())
            .invoke_async(&mut conn)
            .await?;
        Ok(wrote == 1)
    }
}

/// Escapes glob metacharacters so a prefix matches itself literally in `SCAN MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// blockyard writes `last_access` as decimal Unix seconds.
fn parse_last_access(id: &str, raw: &str) -> Result<DateTime<Utc>> {
    raw.trim()
        .parse::<i64>()
        .ok()
        .and_then(|secs| DateTime::from_timestamp(secs, 0))
        .ok_or_else(|| StoreError::Corrupt {
            id: id.to_string(),
            detail: format!("last_access {raw:?} is not Unix seconds"),
        })
}

#[async_trait]
impl Store for RedisStore {
    async fn get(&self, id: &str) -> Result<Option<Entry>> {
        validate_id("session id", id)?;
        let mut conn = self.conn.clone();
        let mut hash: HashMap<String, String> = conn.hgetall(self.session_key(id)).await?;
        // A hash without `worker_id` is what blockyard's non-atomic touch (HSET last_access,
        // then EXPIRE) leaves behind when the session expired in between: no session.
        let Some(worker_id) = hash.remove("worker_id") else {
            return Ok(None);
        };
        let last_access = parse_last_access(id, hash.get("last_access").map_or("", |s| s))?;
        Ok(Some(Entry {
            worker_id,
            user_sub: hash.remove("user_sub").unwrap_or_default(),
            last_access,
        }))
    }

    async fn set(&self, id: &str, entry: &Entry) -> Result<()> {
        validate_id("session id", id)?;
        validate_id("worker id", &entry.worker_id)?;
        let mut conn = self.conn.clone();
        let _: i64 = self
            .write_call(&self.scripts.set)?
            .arg(id)
            .arg(&entry.worker_id)
            .arg(&entry.user_sub)
            .arg(entry.last_access.timestamp())
            .arg(self.ttl_secs())
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn touch(&self, id: &str) -> Result<bool> {
        validate_id("session id", id)?;
        let mut conn = self.conn.clone();
        let found: i64 = self
            .write_call(&self.scripts.touch)?
            .arg(id)
            .arg(self.ttl_secs())
            .invoke_async(&mut conn)
            .await?;
        Ok(found == 1)
    }

    async fn delete(&self, id: &str) -> Result<bool> {
        validate_id("session id", id)?;
        Ok(self.delete_many(&[id.to_string()]).await? == 1)
    }

    async fn delete_many(&self, ids: &[String]) -> Result<u64> {
        for id in ids {
            validate_id("session id", id)?;
        }
        let mut conn = self.conn.clone();
        let mut total = 0;
        for chunk in ids.chunks(self.options.batch()) {
            let mut call = self.write_call(&self.scripts.delete)?;
            for id in chunk {
                call.arg(id);
            }
            total += call.invoke_async::<u64>(&mut conn).await?;
        }
        Ok(total)
    }

    async fn delete_by_worker(&self, worker_id: &str) -> Result<u64> {
        validate_id("worker id", worker_id)?;
        self.adopt_if_needed().await?;
        self.drain(&self.scripts.delete_worker_batch, &[worker_id])
            .await
    }

    async fn count_for_worker(&self, worker_id: &str) -> Result<u64> {
        validate_id("worker id", worker_id)?;
        self.adopt_if_needed().await?;
        self.live_count(worker_id).await
    }

    async fn count_for_workers(&self, worker_ids: &[String]) -> Result<u64> {
        for w in worker_ids {
            validate_id("worker id", w)?;
        }
        if worker_ids.is_empty() {
            return Ok(0);
        }
        self.adopt_if_needed().await?;
        let mut total = 0;
        for w in worker_ids.iter().collect::<HashSet<_>>() {
            total += self.live_count(w).await?;
        }
        Ok(total)
    }

    async fn counts_by_worker(&self) -> Result<BTreeMap<String, u64>> {
        self.adopt_if_needed().await?;
        let mut counts = BTreeMap::new();
        for w in self.indexed_workers().await? {
            let n = self.live_count(&w).await?;
            if n > 0 {
                counts.insert(w, n);
            }
        }
        Ok(counts)
    }

    async fn reroute_worker(&self, from: &str, to: &str) -> Result<u64> {
        validate_id("worker id", from)?;
        validate_id("worker id", to)?;
        self.adopt_if_needed().await?;
        if from == to {
            return self.live_count(from).await;
        }
        self.drain(&self.scripts.reroute_batch, &[from, to]).await
    }

    async fn reroute_batch(&self, from: &str, to: &str, limit: usize) -> Result<Vec<String>> {
        validate_id("worker id", from)?;
        validate_id("worker id", to)?;
        if from == to {
            return Ok(Vec::new());
        }
        self.adopt_if_needed().await?;
        self.worker_batch(&self.scripts.reroute_batch, &[from, to], limit)
            .await
    }

    async fn delete_worker_batch(&self, worker_id: &str, limit: usize) -> Result<Vec<String>> {
        validate_id("worker id", worker_id)?;
        self.adopt_if_needed().await?;
        self.worker_batch(&self.scripts.delete_worker_batch, &[worker_id], limit)
            .await
    }

    /// The workers of the index (after adopting foreign hashes unless index-only): O(workers).
    /// May include a worker whose last sessions expired moments ago, until the index is pruned.
    async fn workers_with_sessions(&self) -> Result<BTreeSet<String>> {
        self.adopt_if_needed().await?;
        Ok(self.indexed_workers().await?.into_iter().collect())
    }

    async fn ping(&self) -> Result<()> {
        Cache::ping(self).await
    }

    async fn workers_holding(&self, worker_ids: &[String]) -> Result<BTreeSet<String>> {
        for w in worker_ids {
            validate_id("worker id", w)?;
        }
        if worker_ids.is_empty() {
            return Ok(BTreeSet::new());
        }
        self.adopt_if_needed().await?;
        let mut conn = self.conn.clone();
        // One SMISMEMBER on the set of indexed workers: the same set `workers_with_sessions` lists.
        let held: Vec<bool> = redis::cmd("SMISMEMBER")
            .arg(format!("{}session-index:workers", self.redis.prefix))
            .arg(worker_ids)
            .query_async(&mut conn)
            .await?;
        Ok(worker_ids
            .iter()
            .zip(held)
            .filter(|(_, held)| *held)
            .map(|(w, _)| w.clone())
            .collect())
    }

    async fn entries_for_worker(&self, worker_id: &str) -> Result<HashMap<String, Entry>> {
        validate_id("worker id", worker_id)?;
        self.adopt_if_needed().await?;
        let mut entries = HashMap::new();
        self.live_walk(worker_id, true, |flat| {
            for f in flat.chunks_exact(3) {
                // One hash a foreign writer garbled must not hide the worker's other sessions.
                match parse_last_access(&f[0], &f[2]) {
                    Ok(last_access) => {
                        let entry = Entry {
                            worker_id: worker_id.to_string(),
                            user_sub: f[1].clone(),
                            last_access,
                        };
                        entries.insert(f[0].clone(), entry);
                    }
                    Err(err) => tracing::warn!(error = %err, "skipping an unreadable session"),
                }
            }
        })
        .await?;
        Ok(entries)
    }

    async fn sweep_batch(&self, sweep: Sweep<'_>, limit: usize) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let collect = |ids: Vec<String>| {
            removed.extend(ids);
            removed.len() < limit
        };
        match sweep {
            // Redis expires session hashes itself; what is left to remove are the index members
            // of expired sessions, reported as the sessions removed.
            Sweep::Expired => self.prune_walk(collect, limit).await?,
            Sweep::Idle { max_age, workers } => {
                self.sweep_idle_walk(max_age, workers, collect, limit)
                    .await?;
            }
        }
        Ok(removed)
    }

    /// Walks each index once (not once per batch as the default loop over `sweep_batch` would).
    async fn sweep(&self, sweep: Sweep<'_>) -> Result<u64> {
        match sweep {
            Sweep::Expired => {
                let mut removed = 0;
                self.prune_walk(
                    |ids| {
                        removed += ids.len() as u64;
                        true
                    },
                    usize::MAX,
                )
                .await?;
                Ok(removed)
            }
            Sweep::Idle { max_age, workers } => {
                let mut removed = 0;
                self.sweep_idle_walk(
                    max_age,
                    workers,
                    |ids| {
                        removed += ids.len() as u64;
                        true
                    },
                    usize::MAX,
                )
                .await?;
                Ok(removed)
            }
        }
    }

    fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// `INCR` of the scope's epoch key. In a layered store Postgres keeps the epoch instead,
    /// and Redis learns it from the leader's first fenced script.
    async fn claim_epoch(&self, scope: &str, _holder: &str) -> Result<Option<i64>> {
        let mut conn = self.conn.clone();
        let epoch: i64 = conn.incr(self.epoch_key(scope), 1).await?;
        Ok(Some(epoch))
    }

    fn set_fencing(&self, fencing: std::sync::Arc<dyn Fencing>) {
        if self.fencing.set(fencing).is_err() {
            tracing::warn!("the store is fenced already; keeping the first fence");
        }
    }
}

#[async_trait]
impl Cache for RedisStore {
    async fn ping(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        Ok(())
    }

    async fn lookup(&self, id: &str) -> Result<Lookup> {
        validate_id("session id", id)?;
        let mut conn = self.conn.clone();
        let found: Vec<String> = self
            .call(&self.scripts.lookup)
            .arg(id)
            .arg(epoch_shard(id))
            .invoke_async(&mut conn)
            .await?;
        match found.as_slice() {
            [hit, worker_id, user_sub, last_access] if hit == "1" => Ok(Lookup::Hit(Entry {
                worker_id: worker_id.clone(),
                user_sub: user_sub.clone(),
                last_access: parse_last_access(id, last_access)?,
            })),
            [miss, epoch] if miss == "0" => Ok(Lookup::Miss(Ticket(parse_epoch(epoch)?))),
            other => Err(StoreError::Corrupt {
                id: id.to_string(),
                detail: format!("unexpected lookup answer {other:?}"),
            }),
        }
    }

    async fn ticket(&self, id: &str) -> Result<Ticket> {
        validate_id("session id", id)?;
        let mut conn = self.conn.clone();
        let epoch: Option<String> = conn.hget(self.epochs_key(), epoch_shard(id)).await?;
        Ok(Ticket(epoch.as_deref().map_or(Ok(0), parse_epoch)?))
    }

    async fn fill(&self, id: &str, entry: &Entry, ticket: Ticket) -> Result<bool> {
        self.write_ticketed(&self.scripts.fill, id, entry, ticket)
            .await
    }

    async fn overwrite(&self, id: &str, entry: &Entry, ticket: Ticket) -> Result<bool> {
        self.write_ticketed(&self.scripts.overwrite, id, entry, ticket)
            .await
    }

    async fn invalidate(&self, ids: &[String]) -> Result<()> {
        for id in ids {
            validate_id("session id", id)?;
        }
        self.by_ids(&self.scripts.invalidate, &[""], ids).await
    }

    async fn reroute_ids(&self, ids: &[String], from: &str, to: &str) -> Result<()> {
        validate_id("worker id", from)?;
        validate_id("worker id", to)?;
        for id in ids {
            validate_id("session id", id)?;
        }
        if from == to {
            return Ok(());
        }
        self.by_ids(&self.scripts.reroute_ids, &[from, to], ids)
            .await
    }

    async fn invalidate_worker(&self, worker_id: &str) -> Result<()> {
        validate_id("worker id", worker_id)?;
        let index = format!("{}session-index:worker:{worker_id}", self.redis.prefix);
        let batch = self.options.batch();
        let mut conn = self.conn.clone();
        loop {
            let ids: Vec<String> = conn.zrange(&index, 0, batch as isize - 1).await?;
            if ids.is_empty() {
                return Ok(());
            }
            self.by_ids(&self.scripts.invalidate, &[worker_id], &ids)
                .await?;
        }
    }
}

fn parse_epoch(raw: &str) -> Result<i64> {
    raw.parse().map_err(|_| StoreError::Corrupt {
        id: String::new(),
        detail: format!("invalidation epoch {raw:?} is not an integer"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_escape_escapes_metacharacters() {
        assert_eq!(glob_escape("a*b?[c]\\d:"), "a\\*b\\?\\[c\\]\\\\d:");
    }

    #[test]
    fn last_access_must_be_unix_seconds() {
        assert_eq!(
            parse_last_access("x", "1700000000").unwrap().timestamp(),
            1_700_000_000
        );
        assert!(parse_last_access("x", "yesterday").is_err());
    }
}
