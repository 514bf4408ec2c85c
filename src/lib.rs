//! session-operator: keeps session-sticky routing tables consistent with worker pods.
//!
//! Modules:
//!
//! - [`store`] — the session-store library (memory, Postgres, Redis, layered);
//! - [`policy`] — the `SessionPolicy` custom resource;
//! - `controller` — pod watch, migration planner, reconciliation;
//! - `leader` — lease-based leadership with fencing;
//! - `sweep` — expiry and idle sweeps;
//! - `cache_repair` — re-applying cache writes that failed, once Redis answers;
//! - `operator` — the runtime wiring them together;
//! - `connect` — the store flags and the store they connect;
//! - [`cli`] — the `session-operator` command line;
//! - `telemetry` — logging, metrics, health endpoints;
//! - `lab` (feature `lab`, on by default) — `session-operator demo` and `bench`: an emulated
//!   cluster, simulated proxies, benchmarks. The image is built without it.

// The library's public API is what the binary, the integration tests and the benchmarks use:
// the store, the SessionPolicy type and the command line. Everything else is crate-private.
mod cache_repair;
pub mod cli;
mod connect;
mod controller;
#[cfg(feature = "lab")]
mod lab;
mod leader;
mod operator;
pub mod policy;
pub mod store;
mod sweep;
mod telemetry;
