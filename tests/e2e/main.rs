//! End-to-end tests: the real `session-operator run` binary against the API-server emulator
//! (or, with `E2E_BACKEND=real`, a real control plane: see `backend.rs`), with real Postgres
//! and Redis.

mod backend;
#[path = "../common/mod.rs"]
mod common;
mod harness;

mod fencing;
mod leadership;
mod migration;
mod overlap;
mod policies;
mod prefix;
mod readiness;
mod records;
mod status_truth;
mod ties;
mod workloads;
