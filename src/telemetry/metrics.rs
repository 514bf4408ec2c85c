//! Prometheus metrics, all named `session_operator_*`.

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::policy_metrics::{PolicyCollector, PolicySource};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MigrationLabels {
    pub action: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SweepLabels {
    pub sweep: &'static str,
}

/// Store operations whose latency is measured.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub(crate) enum StoreOp {
    WorkersWithSessions,
    WorkersHolding,
    CountsByWorker,
    RerouteWorker,
    DeleteByWorker,
    SweepIdle,
    Expire,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StoreOpLabels {
    pub op: StoreOp,
}

fn latency_histogram() -> Histogram {
    // 1 ms … ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// A migration waits up to its policy's `replacementWait` (2 m by default) for a replacement
/// before its sessions move, so its buckets reach beyond the store's: 1 ms … ~17 min. With
/// store buckets every slow migration would sit in `+Inf` and its p99 could never exceed 33 s.
fn migration_latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 21))
}

/// A pass is mostly in-memory work over the watched pods and one or two store reads: its
/// buckets start at 0.1 ms, so that a few-millisecond pass is not one bucket (0.1 ms … ~13 s).
fn pass_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// What level-triggered passes cost (see [`super::pass_cost`]).
#[derive(Clone, Debug)]
pub(crate) struct PassMetrics {
    pub duration: Histogram,
    pub store: Histogram,
    pub cpu: Histogram,
}

impl Default for PassMetrics {
    fn default() -> Self {
        Self {
            duration: pass_histogram(),
            store: pass_histogram(),
            cpu: pass_histogram(),
        }
    }
}

/// The operator's metrics; cheap to clone (each metric is an `Arc` inside).
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    pub reconciles: Family<ResultLabels, Counter>,
    pub errors: Family<KindLabels, Counter>,
    pub migrations: Family<MigrationLabels, Counter>,
    pub sessions_rerouted: Counter,
    pub sessions_deleted: Counter,
    pub sessions_swept: Family<SweepLabels, Counter>,
    pub migration_latency: Histogram,
    pub leader: Gauge,
    pub store_latency: Family<StoreOpLabels, Histogram, fn() -> Histogram>,
    pub pass: PassMetrics,
    /// Where `session_operator_policy_*` are read from at scrape time (the controller's
    /// policy reflectors).
    pub policies: PolicySource,
    pub cache: CacheMetrics,
    /// The leadership epoch this replica holds; 0 when none.
    pub epoch: Gauge,
}

/// The layered store's health, copied from its `LayeredStats` (see [`Metrics::observe_cache`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct CacheMetrics {
    pub available: Gauge,
    pub errors: Counter,
    pub pending_repairs: Gauge,
}

/// Label values of the labelled counters that exist from the start: a family without children is
/// not exported at all, so without them `session_operator_errors_total` would be missing from
/// /metrics until the first error, and alerts and dashboards would show no data instead of 0.
/// What went wrong, as counted in `session_operator_errors_total{kind}`. The label strings are
/// part of the interface: the chart's PrometheusRule and dashboards match them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ErrorKind {
    /// A store call failed (pass, migration, sweep, the readiness probe).
    Store,
    /// A reconcile failed on a Kubernetes API call (e.g. the status write).
    Kube,
    /// A pass over a policy whose spec is invalid.
    InvalidPolicy,
    /// A mutation refused by the leader fence (deadline or epoch).
    Fenced,
    /// A migration left sessions another transaction holds locked (retried).
    Locked,
    /// An Event could not be queued or published.
    Event,
    /// Loading or writing a policy's durable worker records failed.
    WorkerRecords,
}

impl ErrorKind {
    /// Every kind, each exported at 0 from the start so that rates and alerts see the series.
    pub(crate) const ALL: [ErrorKind; 7] = [
        ErrorKind::Store,
        ErrorKind::Kube,
        ErrorKind::InvalidPolicy,
        ErrorKind::Fenced,
        ErrorKind::Locked,
        ErrorKind::Event,
        ErrorKind::WorkerRecords,
    ];

    /// The `kind` label value.
    pub(crate) fn metric_label(self) -> &'static str {
        match self {
            ErrorKind::Store => "store",
            ErrorKind::Kube => "kube",
            ErrorKind::InvalidPolicy => "invalid_policy",
            ErrorKind::Fenced => "fenced",
            ErrorKind::Locked => "locked",
            ErrorKind::Event => "event",
            ErrorKind::WorkerRecords => "worker_records",
        }
    }
}

const RECONCILE_RESULTS: [&str; 2] = ["ok", "error"];
const SWEEPS: [&str; 2] = ["idle", "expiry"];

impl Default for Metrics {
    fn default() -> Self {
        let metrics = Self::empty();
        for kind in ErrorKind::ALL {
            let kind = kind.metric_label();
            drop(metrics.errors.get_or_create(&KindLabels { kind }));
        }
        for result in RECONCILE_RESULTS {
            drop(metrics.reconciles.get_or_create(&ResultLabels { result }));
        }
        for sweep in SWEEPS {
            drop(metrics.sessions_swept.get_or_create(&SweepLabels { sweep }));
        }
        metrics
    }
}

impl Metrics {
    fn empty() -> Self {
        Self {
            reconciles: Family::default(),
            errors: Family::default(),
            migrations: Family::default(),
            sessions_rerouted: Counter::default(),
            sessions_deleted: Counter::default(),
            sessions_swept: Family::default(),
            migration_latency: migration_latency_histogram(),
            leader: Gauge::default(),
            store_latency: Family::new_with_constructor(latency_histogram),
            pass: PassMetrics::default(),
            policies: PolicySource::default(),
            cache: CacheMetrics::default(),
            epoch: Gauge::default(),
        }
    }
}

impl Metrics {
    /// Registers every metric under the `session_operator` prefix.
    pub(crate) fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("session_operator");
        r.register(
            "reconciles",
            "Policy reconciliations by result",
            self.reconciles.clone(),
        );
        r.register(
            "errors",
            "Errors by kind (store, kube, invalid_policy, fenced)",
            self.errors.clone(),
        );
        r.register(
            "migrations",
            "Worker migrations by action and reason",
            self.migrations.clone(),
        );
        r.register(
            "sessions_rerouted",
            "Sessions moved to a replacement worker",
            self.sessions_rerouted.clone(),
        );
        r.register(
            "sessions_deleted",
            "Sessions deleted by migrations",
            self.sessions_deleted.clone(),
        );
        r.register(
            "sessions_swept",
            "Sessions removed by sweeps (idle, expiry)",
            self.sessions_swept.clone(),
        );
        r.register(
            "migration_latency_seconds",
            "Time from a departure being observed to its sessions being moved or deleted",
            self.migration_latency.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the lease",
            self.leader.clone(),
        );
        r.register(
            "store_latency_seconds",
            "Store operation latency",
            self.store_latency.clone(),
        );
        r.register(
            "pass_duration_seconds",
            "Wall time of a level-triggered pass over a policy",
            self.pass.duration.clone(),
        );
        r.register(
            "pass_store_seconds",
            "Time a pass spent awaiting the session store",
            self.pass.store.clone(),
        );
        r.register(
            "pass_cpu_seconds",
            "CPU time the operator spent computing a pass",
            self.pass.cpu.clone(),
        );
        r.register_collector(Box::new(PolicyCollector(self.policies.clone())));
        r.register(
            "cache_available",
            "1 while the Redis cache answers (only with Redis over Postgres)",
            self.cache.available.clone(),
        );
        r.register(
            "cache_errors",
            "Redis cache operations that failed (the operation was served by Postgres)",
            self.cache.errors.clone(),
        );
        r.register(
            "cache_pending_repairs",
            "Cache entries (session ids, workers, or the whole cache) awaiting repair",
            self.cache.pending_repairs.clone(),
        );
        r.register(
            "leadership_epoch",
            "Leadership epoch this replica holds and the store checks on every mutation (0: none)",
            self.epoch.clone(),
        );
    }

    /// Copies the layered store's counters into the cache metrics.
    pub(crate) fn observe_cache(&self, stats: &crate::store::LayeredStats) {
        self.cache.available.set(i64::from(stats.cache_available));
        self.cache
            .errors
            .inc_by(stats.cache_errors.saturating_sub(self.cache.errors.get()));
        self.cache
            .pending_repairs
            .set(stats.pending_repairs.min(i64::MAX as u64) as i64);
    }

    pub(crate) fn observe_pass(&self, cost: &super::pass_cost::PassCost) {
        self.pass.duration.observe(cost.duration.as_secs_f64());
        self.pass.store.observe(cost.store.as_secs_f64());
        self.pass.cpu.observe(cost.cpu.as_secs_f64());
    }

    pub(crate) fn reconciled(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub(crate) fn migration(&self, action: &'static str, reason: &'static str) {
        self.migrations
            .get_or_create(&MigrationLabels { action, reason })
            .inc();
    }

    pub(crate) fn swept(&self, sweep: &'static str, sessions: u64) {
        self.sessions_swept
            .get_or_create(&SweepLabels { sweep })
            .inc_by(sessions);
    }

    pub(crate) fn error(&self, kind: ErrorKind) {
        let kind = kind.metric_label();
        self.errors.get_or_create(&KindLabels { kind }).inc();
    }

    /// Also adds `took` to the store time of the pass awaiting the call, if any.
    pub(crate) fn observe_store(&self, op: StoreOp, took: Duration) {
        super::pass_cost::store_awaited(took);
        self.store_latency
            .get_or_create(&StoreOpLabels { op })
            .observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_counters_are_exported_before_their_first_increment() {
        let mut registry = Registry::default();
        Metrics::default().register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encode");
        for kind in ErrorKind::ALL.map(ErrorKind::metric_label) {
            let line = format!("session_operator_errors_total{{kind=\"{kind}\"}} 0");
            assert!(out.lines().any(|l| l == line), "{line} missing in\n{out}");
        }
        assert!(out.contains("session_operator_reconciles_total{result=\"error\"} 0"));
        assert!(out.contains("session_operator_sessions_swept_total{sweep=\"expiry\"} 0"));
        // The migration histogram reaches past replacementWait's default of 2 minutes.
        assert!(out.contains("session_operator_migration_latency_seconds_bucket{le=\"1048.576\"}"));
    }
}
