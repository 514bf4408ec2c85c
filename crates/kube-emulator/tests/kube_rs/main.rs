//! Integration tests driving the emulator with real kube-rs clients.
//!
//! Scenarios that need no emulator hook run on every [`Backend`]: the emulator, and — when
//! `DIFF_KUBECONFIG` names an admin kubeconfig of a real kube-apiserver (`scripts/test-real.sh`
//! sets it) — that server too, each in a fresh namespace of its own. They assert the same
//! Kubernetes behaviour on both, so a pass on the real server shows that what the emulator
//! is held to is what Kubernetes does. Scenarios that need a hook (fault injection, seeding,
//! compaction, dropped watches, the `Control` pod helpers) stay emulator-only and say why.

mod backend;
mod controller;
mod crud;
mod edge_cases;
mod errors;
mod fidelity;
mod helpers;
mod lease;
mod races;
mod watch;

use std::future::Future;
use std::time::Duration;

use kube::Client;
use kube_emulator::Emulator;

pub use backend::{Backend, IDLE_NODE, backends, backends_with, install_crd, on_each};

/// Starts an emulator and a client for it.
pub async fn start() -> (Emulator, Client) {
    let emulator = Emulator::start().await.expect("emulator starts");
    let client = emulator.client().expect("client");
    (emulator, client)
}

/// Polls `check` until it returns true, failing the test after a generous timeout.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small namespaced CRD used by several tests.
pub fn widget_crd() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {
                            "type": "object",
                            "required": ["size"],
                            "properties": {
                                "size": {"type": "integer", "minimum": 1, "maximum": 10},
                                "color": {"type": "string", "enum": ["red", "blue"]},
                                "owner": {"type": "string", "pattern": "^[a-z]+$"}
                            }
                        },
                        "status": {
                            "type": "object",
                            "properties": {"observed": {"type": "integer"}, "message": {"type": "string"}}
                        }
                    }
                }}
            }]
        }
    })
}
