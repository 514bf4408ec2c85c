//! The closing report of the demo, and its verdict.

use std::sync::Arc;
use std::time::Duration;

use super::proxies::Proxies;
use crate::lab::shared::{LOOK_EVERY, Tracker, percentile};
use crate::store::Store;
use crate::telemetry::Metrics;

/// What the demo proved.
pub(super) struct Report {
    created: u64,
    missing: u64,
    rerouted: u64,
    deleted: u64,
    stale_reads: u64,
    stuck: usize,
    /// Per phase: departures, p50, p99.
    latency: Vec<(&'static str, usize, Duration, Duration)>,
    replacement_wait: Duration,
    elapsed: Duration,
}

impl Report {
    pub(super) async fn gather(
        store: &Arc<dyn Store>,
        proxies: &Proxies,
        tracker: &Tracker,
        metrics: &Metrics,
        replacement_wait: Duration,
        elapsed: Duration,
    ) -> anyhow::Result<Self> {
        let missing = proxies.missing_sessions(store.as_ref()).await?;
        let latency = tracker
            .latencies()
            .into_iter()
            .filter(|(_, l)| !l.is_empty())
            .map(|(phase, mut l)| {
                l.sort();
                (phase, l.len(), percentile(&l, 0.5), percentile(&l, 0.99))
            })
            .collect();
        Ok(Self {
            created: proxies.created(),
            missing,
            rerouted: metrics.sessions_rerouted.get(),
            deleted: metrics.sessions_deleted.get(),
            stale_reads: proxies.stale_reads(),
            stuck: tracker.stuck(),
            latency,
            replacement_wait,
            elapsed,
        })
    }

    pub(super) fn verdict(&self) -> anyhow::Result<()> {
        // The policy reroutes on replace and on terminate: every missing session is lost.
        anyhow::ensure!(self.missing == 0, "{} session(s) lost", self.missing);
        anyhow::ensure!(
            self.stuck == 0,
            "{} departed worker(s) still held sessions after replacementWait",
            self.stuck
        );
        Ok(())
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
        writeln!(f, "Report ({:.1} s)", self.elapsed.as_secs_f64())?;
        writeln!(
            f,
            "  sessions created by the proxies        {}",
            self.created
        )?;
        writeln!(
            f,
            "  sessions rerouted by the operator      {}",
            self.rerouted
        )?;
        writeln!(
            f,
            "  sessions deleted by the operator       {}",
            self.deleted
        )?;
        writeln!(
            f,
            "  sessions lost                          {}",
            self.missing
        )?;
        writeln!(f, "  departed workers still holding sessions")?;
        writeln!(f, "    after replacementWait                {}", self.stuck)?;
        writeln!(
            f,
            "  migration latency, departure seen → sessions moved (looked at every {} ms):",
            LOOK_EVERY.as_millis()
        )?;
        for (phase, n, p50, p99) in &self.latency {
            writeln!(
                f,
                "    {phase:<16} p50 {:>7} · p99 {:>7}  ({n} departures)",
                ms(*p50),
                ms(*p99)
            )?;
        }
        writeln!(
            f,
            "    (a scale-down has no replacement: its sessions move after replacementWait = {})",
            humantime::format_duration(self.replacement_wait)
        )?;
        writeln!(
            f,
            "  reads that found a departed worker     {} (proxies act before the operator; the next read finds the new worker)",
            self.stale_reads
        )
    }
}
