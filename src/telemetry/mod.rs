//! Logs, metrics and the health endpoints.

mod logging;
mod metrics;
mod policy_metrics;
mod server;

pub use logging::{LogFormat, init_cli_logging, init_operator_logging};
pub use metrics::{ErrorKind, Metrics, StoreOp};
pub use policy_metrics::PolicySnapshot;
pub use server::{Health, serve};
