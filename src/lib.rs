//! session-operator: keeps session-sticky routing tables consistent with worker pods.

pub mod store;
