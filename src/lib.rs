//! session-operator: keeps session-sticky routing tables consistent with worker pods.
//!
//! - [`store`]: the session-store library (memory, Postgres, Redis, layered);
//! - [`cli`]: the `session-operator` command line;
//! - [`telemetry`]: logging.

pub mod cli;
pub mod store;
pub mod telemetry;
