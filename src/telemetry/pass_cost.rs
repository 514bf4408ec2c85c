//! What one level-triggered pass costs: its wall time, the time it spent awaiting the session
//! store, and the CPU time the operator spent computing it.
//!
//! [`measure`] wraps the pass future. Each poll reads the polling thread's CPU clock
//! (`CLOCK_THREAD_CPUTIME_ID`) before and after, so their differences add up to the CPU the
//! pass itself used, also when the multi-threaded runtime moves the future between threads;
//! work other tasks do meanwhile (decoding watch events, migrations, the Redis connection's
//! driver) is not counted. During each poll a task-local accumulator is set: store calls the
//! pass awaits report their latency to it through [`store_awaited`] (which
//! `Metrics::observe_store` calls), while tasks the pass spawns (migrations, the background
//! refresh of session counts) do not inherit it and are not counted.

use std::cell::Cell;
use std::future::Future;
use std::time::{Duration, Instant};

tokio::task_local! {
    /// The store time of the pass being polled, if any.
    static STORE_TIME: Cell<Duration>;
}

/// The cost of one pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PassCost {
    /// From the first poll to completion.
    pub duration: Duration,
    /// The sum of the latencies of the store calls the pass awaited.
    pub store: Duration,
    /// CPU time spent polling the pass.
    pub cpu: Duration,
}

/// Runs `pass` and measures what it cost.
pub(crate) async fn measure<F: Future>(pass: F) -> (F::Output, PassCost) {
    let mut pass = std::pin::pin!(pass);
    let mut cost = PassCost::default();
    let started = Instant::now();
    let output = std::future::poll_fn(|cx| {
        let before = thread_cpu();
        let (poll, store) = STORE_TIME.sync_scope(Cell::new(cost.store), || {
            let poll = pass.as_mut().poll(cx);
            (poll, STORE_TIME.with(Cell::get))
        });
        cost.store = store;
        cost.cpu += thread_cpu().saturating_sub(before);
        poll
    })
    .await;
    cost.duration = started.elapsed();
    (output, cost)
}

/// Awaits `call`, a store call not measured by `Metrics::observe_store` (the worker records),
/// and adds its latency to the pass being polled.
pub(crate) async fn awaiting_store<F: Future>(call: F) -> F::Output {
    let started = Instant::now();
    let output = call.await;
    store_awaited(started.elapsed());
    output
}

/// Adds a store call's latency to the pass being polled; nothing outside a pass.
pub(crate) fn store_awaited(took: Duration) {
    let _ = STORE_TIME.try_with(|store| store.set(store.get() + took));
}

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spins until the thread has used `cpu` of CPU time.
    fn burn(cpu: Duration) {
        let start = thread_cpu();
        while thread_cpu() - start < cpu {
            std::hint::black_box(0u64);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_the_store_calls_and_the_cpu_of_the_pass_alone() {
        let (out, cost) = measure(async {
            burn(Duration::from_millis(20));
            store_awaited(Duration::from_millis(7));
            // Another task's CPU and store calls are not the pass's.
            tokio::spawn(async {
                burn(Duration::from_millis(50));
                store_awaited(Duration::from_secs(1));
            })
            .await
            .expect("task");
            // Awaiting (not computing) costs no CPU.
            tokio::time::sleep(Duration::from_millis(30)).await;
            store_awaited(Duration::from_millis(5));
            burn(Duration::from_millis(10));
            42
        })
        .await;
        assert_eq!(out, 42);
        assert_eq!(cost.store, Duration::from_millis(12));
        assert!(cost.cpu >= Duration::from_millis(30), "{cost:?}");
        assert!(cost.cpu < Duration::from_millis(80), "{cost:?}");
        assert!(
            cost.duration >= Duration::from_millis(30) + cost.cpu,
            "{cost:?}"
        );
        // Outside a pass nothing is recorded, nothing fails.
        store_awaited(Duration::from_secs(1));
    }
}
