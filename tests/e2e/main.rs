//! End-to-end tests: the real `session-operator run` binary against the API-server emulator,
//! with real Postgres and Redis.

#[path = "../common/mod.rs"]
mod common;
mod harness;

mod leadership;
mod migration;
mod policies;
