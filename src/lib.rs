//! session-operator: keeps session-sticky routing tables consistent with worker pods.
//!
//! Modules:
//!
//! - [`store`] — the session-store library (memory, Postgres, Redis, layered);
//! - [`bench`] — benchmarks behind `session-operator bench`;
//! - [`policy`] — the `SessionPolicy` custom resource;
//! - [`controller`] — pod watch, migration planner, reconciliation;
//! - [`leader`] — lease-based leadership with fencing;
//! - [`sweep`] — expiry and idle sweeps;
//! - [`operator`] — the runtime wiring them together;
//! - [`demo`] — `session-operator demo`: emulated cluster, operator, proxies, report;
//! - [`cli`] — the `session-operator` command line;
//! - [`telemetry`] — logging, metrics, health endpoints.

pub mod bench;
pub mod cache_repair;
pub mod cli;
pub mod controller;
pub mod demo;
pub mod leader;
pub mod operator;
pub mod policy;
pub mod store;
pub mod sweep;
pub mod telemetry;
