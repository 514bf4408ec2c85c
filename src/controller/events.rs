//! Kubernetes Events on policies, published by one background task.
//!
//! Passes and migrations only queue an Event: a rollout's next wave must not wait for one API
//! call per migration, and one publisher keeps the [`Recorder`]'s aggregation cache (repeats of
//! an Event become a series) free of races.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use kube::runtime::events::{Event, Recorder};
use tokio::sync::mpsc;

use crate::leader::Fence;
use crate::policy::SessionPolicy;
use crate::telemetry::Metrics;

/// Events waiting to be published; beyond this, new ones are dropped (and counted as errors)
/// rather than letting a slow API server grow the operator's memory.
const QUEUE: usize = 4096;

/// The sending side: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Events {
    queue: mpsc::Sender<(ObjectReference, Event)>,
    metrics: Metrics,
}

impl Events {
    /// Starts the publisher. It publishes only while this replica leads: a standby's Events
    /// would describe mutations it did not make.
    pub fn spawn(recorder: Recorder, fence: Fence, metrics: Metrics) -> Self {
        let (queue, mut rx) = mpsc::channel::<(ObjectReference, Event)>(QUEUE);
        tokio::spawn({
            let metrics = metrics.clone();
            async move {
                while let Some((reference, event)) = rx.recv().await {
                    if !fence.is_open() {
                        continue;
                    }
                    if let Err(e) = recorder.publish(&event, &reference).await {
                        metrics.error("event");
                        tracing::debug!(error = %e, "publishing an event failed");
                    }
                }
            }
        });
        Self { queue, metrics }
    }

    /// Queues an Event on `policy`.
    pub fn publish(&self, policy: &SessionPolicy, event: Event) {
        if self.queue.try_send((reference(policy), event)).is_err() {
            self.metrics.error("event");
            tracing::debug!("event queue full; an event was dropped");
        }
    }
}

/// The policy's reference without its resourceVersion: the key of an Event series must not
/// change with every status write.
pub fn reference(policy: &SessionPolicy) -> ObjectReference {
    let mut reference = policy.object_ref(&());
    reference.resource_version = None;
    reference
}
