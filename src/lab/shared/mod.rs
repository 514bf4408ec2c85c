//! What the demo and the benchmarks share: an emulated cluster prepared for the operator, a
//! watch of its worker pods, the workload they create, and the tracker that times migrations
//! from the outside.

mod cluster;
mod manifests;
mod tracker;

pub(super) use cluster::{pod_reader, prepare, ready_workers, restart, rollout_complete};
pub(super) use manifests::{WORKERS, session_policy, workers_deployment};
pub(super) use tracker::{LOOK_EVERY, Tracker, percentile};
