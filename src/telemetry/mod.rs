//! Logs, metrics and the health endpoints.

mod logging;
mod metrics;
mod pass_cost;
mod policy_metrics;
mod server;

pub(crate) use logging::{LogFormat, init_cli_logging, init_operator_logging};
pub(crate) use metrics::{ErrorKind, Metrics, StoreOp};
pub(crate) use pass_cost::{awaiting_store, measure as measure_pass};
pub(crate) use policy_metrics::PolicySnapshot;
pub(crate) use server::{Health, serve};
