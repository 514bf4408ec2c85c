//! An in-memory Kubernetes API server for tests.
//!
//! It speaks the Kubernetes REST protocol over plain HTTP/1.1 well enough for kube-rs
//! (client, watcher, reflector, Controller), kube-lease-manager and kubectl, without
//! etcd. Optional in-process [`controllers`] (deployment, replicaset, statefulset, gc,
//! scheduler, kubelet stages) make it a small simulated cluster. See the crate README
//! for what is and is not emulated.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let emulator = kube_emulator::Emulator::start().await?;
//! let client = emulator.client()?;
//! // ... use `client` with kube::Api ...
//! emulator.shutdown().await;
//!
//! // A simulated cluster: Deployments get ReplicaSets, pods get scheduled and started.
//! let cluster = kube_emulator::Emulator::builder()
//!     .controllers(kube_emulator::Controllers::all())
//!     .nodes(3)
//!     .start()
//!     .await?;
//! # cluster.shutdown().await;
//! # Ok(()) }
//! ```

mod admission;
mod audit;
pub mod controllers;
mod crd;
mod discovery;
pub mod error;
mod events;
mod patch;
mod protobuf;
mod request;
pub mod resources;
mod scale;
mod schema;
mod selector;
mod server;
pub mod store;
mod table;
mod testing;
mod util;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use audit::RequestRecord;
pub use controllers::Controllers;
pub use controllers::kubelet::{Crash, READY_DELAY_ANNOTATION, STALL_ANNOTATION};
pub use error::ApiError;
pub use store::StoreConfig;
pub use testing::{Control, EMULATED_NODE, Fault};

use request::AppState;
use store::Store;
use testing::ControlState;

/// Configures and starts an emulator.
#[derive(Debug, Clone)]
pub struct EmulatorBuilder {
    listen: SocketAddr,
    store: StoreConfig,
    bookmark_interval: Duration,
    controllers: Controllers,
    nodes: usize,
    pod_ready_delay: Duration,
    pod_ready_jitter: Duration,
    request_log_limit: usize,
    audit_log: Option<std::path::PathBuf>,
}

impl Default for EmulatorBuilder {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            store: StoreConfig::default(),
            bookmark_interval: Duration::from_secs(5),
            controllers: Controllers::none(),
            nodes: 1,
            pod_ready_delay: Duration::from_millis(200),
            pod_ready_jitter: Duration::ZERO,
            request_log_limit: 10_000,
            audit_log: None,
        }
    }
}

impl EmulatorBuilder {
    /// Address to listen on; port 0 picks a free port.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Number of events retained for resuming watches (older versions get 410 Gone).
    pub fn history_limit(mut self, events: usize) -> Self {
        self.store.history_limit = events;
        self
    }

    /// Capacity of the live watch fan-out; watchers further behind are disconnected.
    pub fn watch_buffer(mut self, events: usize) -> Self {
        self.store.watch_buffer = events;
        self
    }

    /// How often watches that allow bookmarks receive a BOOKMARK event.
    pub fn bookmark_interval(mut self, interval: Duration) -> Self {
        self.bookmark_interval = interval;
        self
    }

    /// Which simulated controllers run (default: [`Controllers::none`]).
    pub fn controllers(mut self, controllers: Controllers) -> Self {
        self.controllers = controllers;
        self
    }

    /// Number of emulated Node objects (`emulated-node`, `emulated-node-1`, …) created
    /// when the scheduler or kubelet runs; at least 1 (default 1).
    pub fn nodes(mut self, count: usize) -> Self {
        self.nodes = count.max(1);
        self
    }

    /// How long the emulated kubelet keeps a started pod NotReady (default 200 ms);
    /// a pod's [`READY_DELAY_ANNOTATION`] overrides it.
    pub fn pod_ready_delay(mut self, delay: Duration) -> Self {
        self.pod_ready_delay = delay;
        self
    }

    /// Spreads readiness like real probes do: each pod waits the ready delay plus a share of
    /// `jitter` of its own (picked by its uid; default zero, so pods started together become
    /// Ready together).
    pub fn pod_ready_jitter(mut self, jitter: Duration) -> Self {
        self.pod_ready_jitter = jitter;
        self
    }

    /// How many requests [`Control::requests`] keeps (oldest dropped first; default
    /// 10 000, 0 keeps none).
    pub fn request_log_limit(mut self, records: usize) -> Self {
        self.request_log_limit = records;
        self
    }

    /// Also writes every request record to `path` as a JSON line (created or truncated).
    pub fn audit_log(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.audit_log = Some(path.into());
        self
    }

    /// Binds the listener and serves in background tasks.
    pub async fn start(self) -> std::io::Result<Emulator> {
        let listener = TcpListener::bind(self.listen).await?;
        let addr = listener.local_addr()?;
        let store = Arc::new(Store::new(self.store));
        let mut audit = audit::AuditLog::new(self.request_log_limit);
        if let Some(path) = &self.audit_log {
            audit = audit.with_file(path)?;
        }
        let control = Arc::new(ControlState::new(audit));
        let hooks = control.kubelet.clone();
        let state = Arc::new(AppState {
            store: store.clone(),
            control: control.clone(),
            bookmark_interval: self.bookmark_interval,
            address: addr.to_string(),
        });
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let state = state.clone();
            async move { server::handle(state, req).await }
        });
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let shutdown = async {
                let _ = stop_rx.await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "kube-emulator server failed");
            }
        });
        // Emulates the kubelet finishing pod termination once grace periods end.
        let weak = Arc::downgrade(&store);
        let reaper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(store) => store.reap_terminated_pods(),
                    None => return,
                }
            }
        });
        let controllers = controllers::spawn(
            store.clone(),
            self.controllers,
            controllers::Settings {
                nodes: self.nodes,
                pod_ready_delay: self.pod_ready_delay,
                pod_ready_jitter: self.pod_ready_jitter,
            },
            hooks,
        );
        Ok(Emulator {
            addr,
            controllers,
            control: Control {
                store,
                state: control,
            },
            stop: Some(stop_tx),
            server,
            reaper,
        })
    }
}

/// A running emulator. Dropping it without [`Emulator::shutdown`] aborts its tasks.
pub struct Emulator {
    addr: SocketAddr,
    control: Control,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    reaper: JoinHandle<()>,
    controllers: Vec<JoinHandle<()>>,
}

impl Emulator {
    /// Starts an emulator on a free loopback port with default settings.
    pub async fn start() -> std::io::Result<Emulator> {
        EmulatorBuilder::default().start().await
    }

    pub fn builder() -> EmulatorBuilder {
        EmulatorBuilder::default()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, e.g. `http://127.0.0.1:34567`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube-rs config pointing at this emulator (namespace `default`).
    pub fn kube_config(&self) -> Result<kube::Config, http::uri::InvalidUri> {
        let uri: http::Uri = self.url().parse()?;
        Ok(kube::Config::new(uri))
    }

    /// A kube-rs client for this emulator. Must be called inside a tokio runtime.
    pub fn client(&self) -> anyhow::Result<kube::Client> {
        Ok(kube::Client::try_from(self.kube_config()?)?)
    }

    /// A kubeconfig document (YAML) for kubectl and other clients.
    pub fn kubeconfig(&self) -> String {
        kubeconfig_yaml(&self.url())
    }

    /// Test controls: pod status, grace periods, dropped watches, faults.
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// Closes open watches and stops serving; waits up to 5 seconds for connections.
    pub async fn shutdown(mut self) {
        for task in &self.controllers {
            task.abort();
        }
        self.control.drop_watches();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let server = &mut self.server;
        if tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .is_err()
        {
            self.server.abort();
        }
        self.reaper.abort();
        // Blocks briefly: the writer thread drains what is queued.
        self.control.state.audit.close();
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        for task in &self.controllers {
            task.abort();
        }
        self.server.abort();
        self.reaper.abort();
    }
}

/// A minimal kubeconfig for an emulator URL (no credentials).
pub fn kubeconfig_yaml(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-emulator\n  cluster:\n    server: {url}\ncontexts:\n- name: kube-emulator\n  context:\n    cluster: kube-emulator\n    namespace: default\n    user: kube-emulator\ncurrent-context: kube-emulator\nusers:\n- name: kube-emulator\n  user: {{}}\n"
    )
}
