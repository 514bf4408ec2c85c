//! session-operator: keeps session-sticky routing tables consistent with worker pods.
//!
//! Modules:
//!
//! - [`store`] — the session-store library (memory, Postgres, Redis, layered);
//! - [`bench`] — benchmarks behind `session-operator bench`;
//! - [`cli`] — the `session-operator` command line;
//! - [`telemetry`] — logging setup.

pub mod bench;
pub mod cli;
pub mod store;
pub mod telemetry;
