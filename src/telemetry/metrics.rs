//! Prometheus metrics, all named `session_operator_*`.

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MigrationLabels {
    pub action: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SweepLabels {
    pub sweep: &'static str,
}

/// Store operations whose latency is measured.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum StoreOp {
    WorkersWithSessions,
    CountsByWorker,
    CountForWorkers,
    RerouteWorker,
    DeleteByWorker,
    SweepIdle,
    Expire,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreOpLabels {
    pub op: StoreOp,
}

fn latency_histogram() -> Histogram {
    // 1 ms … ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The operator's metrics; cheap to clone (each metric is an `Arc` inside).
#[derive(Clone, Debug)]
pub struct Metrics {
    pub reconciles: Family<ResultLabels, Counter>,
    pub errors: Family<KindLabels, Counter>,
    pub migrations: Family<MigrationLabels, Counter>,
    pub sessions_rerouted: Counter,
    pub sessions_deleted: Counter,
    pub sessions_swept: Family<SweepLabels, Counter>,
    pub migration_latency: Histogram,
    pub leader: Gauge,
    pub store_latency: Family<StoreOpLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Family::default(),
            errors: Family::default(),
            migrations: Family::default(),
            sessions_rerouted: Counter::default(),
            sessions_deleted: Counter::default(),
            sessions_swept: Family::default(),
            migration_latency: latency_histogram(),
            leader: Gauge::default(),
            store_latency: Family::new_with_constructor(latency_histogram),
        }
    }
}

impl Metrics {
    /// Registers every metric under the `session_operator` prefix.
    pub fn register(&self, registry: &mut Registry) {
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
    }

    pub fn reconciled(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn migration(&self, action: &'static str, reason: &'static str) {
        self.migrations
            .get_or_create(&MigrationLabels { action, reason })
            .inc();
    }

    pub fn swept(&self, sweep: &'static str, sessions: u64) {
        self.sessions_swept
            .get_or_create(&SweepLabels { sweep })
            .inc_by(sessions);
    }

    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&KindLabels { kind }).inc();
    }

    pub fn observe_store(&self, op: StoreOp, took: Duration) {
        self.store_latency
            .get_or_create(&StoreOpLabels { op })
            .observe(took.as_secs_f64());
    }
}
