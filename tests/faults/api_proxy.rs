//! A TCP proxy between one operator process and the API server, with the two ways a network
//! fails a client: **reset** (open connections get a TCP RST, new ones are refused: nothing
//! listens on the port) and **blackhole** (connections stay open, new ones are accepted, but
//! no byte passes in either direction, so requests and watches hang without an error), then
//! **restore** (a blackholed connection delivers what it held, as a healed network would
//! retransmit it; after a reset the port listens again).
//!
//! Each operator gets its own proxy and a kubeconfig naming it, so a scenario can cut one
//! replica off while the others and the test itself reach the API server directly.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};

use crate::common::unique;

/// What the proxy lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Open,
    /// Open connections reset, the port closed.
    Reset,
    /// Connections accepted and kept, no byte relayed.
    Blackhole,
}

pub(crate) struct ApiProxy {
    mode: watch::Sender<Mode>,
    /// Whether the port listens; follows `mode` once the supervisor has acted on it.
    listening: watch::Receiver<bool>,
    kubeconfig: PathBuf,
    supervisor: AbortHandle,
}

impl ApiProxy {
    /// A proxy in front of `target` (the API server's `host:port`) and a kubeconfig (plain
    /// HTTP, as the emulator serves) that names the proxy.
    pub(crate) async fn start(target: SocketAddr) -> Self {
        let listener = listen(None).await;
        let addr = listener.local_addr().expect("proxy address");
        let (mode, mode_rx) = watch::channel(Mode::Open);
        let (listening_tx, listening) = watch::channel(true);
        let supervisor =
            tokio::spawn(supervise(listener, addr, target, mode_rx, listening_tx)).abort_handle();
        let kubeconfig = std::env::temp_dir().join(format!("{}.kubeconfig", unique("api-proxy")));
        std::fs::write(
            &kubeconfig,
            kube_emulator::kubeconfig_yaml(&format!("http://{addr}")),
        )
        .expect("write the proxy's kubeconfig");
        Self {
            mode,
            listening,
            kubeconfig,
            supervisor,
        }
    }

    /// The kubeconfig an operator behind this proxy runs with.
    pub(crate) fn kubeconfig(&self) -> PathBuf {
        self.kubeconfig.clone()
    }

    /// Resets every open connection and closes the port; returns once it is closed.
    pub(crate) async fn reset(&self) {
        self.set(Mode::Reset, false).await;
    }

    /// Stops relaying bytes on every connection, open or new; returns at once.
    pub(crate) async fn blackhole(&self) {
        self.set(Mode::Blackhole, true).await;
    }

    /// Relays again (a blackholed connection delivers what it held); returns once the port
    /// listens.
    pub(crate) async fn restore(&self) {
        self.set(Mode::Open, true).await;
    }

    pub(crate) async fn cut(&self, mode: Mode) {
        match mode {
            Mode::Open => self.restore().await,
            Mode::Reset => self.reset().await,
            Mode::Blackhole => self.blackhole().await,
        }
    }

    async fn set(&self, mode: Mode, listening: bool) {
        self.mode.send_replace(mode);
        let mut state = self.listening.clone();
        tokio::time::timeout(Duration::from_secs(10), state.wait_for(|l| *l == listening))
            .await
            .expect("the API proxy follows its mode within 10 s")
            .expect("the API proxy's supervisor runs");
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        // Aborting the supervisor drops its JoinSet, which aborts every relay.
        self.supervisor.abort();
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// A listening socket on `addr` (a free port when `None`). `SO_REUSEADDR`: the port of a
/// reset is bound again although connections of it may linger in TIME_WAIT.
async fn listen(addr: Option<SocketAddr>) -> TcpListener {
    let addr = addr.unwrap_or_else(|| "127.0.0.1:0".parse().expect("address"));
    let socket = TcpSocket::new_v4().expect("a socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket
        .bind(addr)
        .unwrap_or_else(|e| panic!("bind the API proxy on {addr}: {e}"));
    socket.listen(1024).expect("listen")
}

/// Accepts while the mode is not `Reset`; during a reset nothing listens on the port.
async fn supervise(
    listener: TcpListener,
    addr: SocketAddr,
    target: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    listening: watch::Sender<bool>,
) {
    let relay_mode = mode.clone();
    let mut relays = JoinSet::new();
    let mut listener = Some(listener);
    loop {
        if let Some(l) = listener.take() {
            tokio::select! {
                accepted = l.accept() => {
                    if let Ok((client, _)) = accepted {
                        relays.spawn(relay(client, target, relay_mode.clone()));
                    }
                    listener = Some(l);
                }
                open = async { mode.wait_for(|m| *m == Mode::Reset).await.is_ok() } => {
                    if !open {
                        return;
                    }
                    drop(l);
                    listening.send_replace(false);
                }
            }
        } else {
            if mode.wait_for(|m| *m != Mode::Reset).await.is_err() {
                return;
            }
            listener = Some(listen(Some(addr)).await);
            listening.send_replace(true);
        }
        // Finished relays are collected so the set does not grow for the whole scenario.
        while relays.try_join_next().is_some() {}
    }
}

/// Relays one connection both ways until either side closes or the proxy resets it.
async fn relay(mut client: TcpStream, target: SocketAddr, mut mode: watch::Receiver<Mode>) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        abort_connection(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let reset = {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        let up = pump(&mut client_read, &mut server_write, mode.clone());
        let down = pump(&mut server_read, &mut client_write, mode.clone());
        let both = async move { tokio::try_join!(up, down) };
        tokio::select! {
            _ = both => false,
            _ = mode.wait_for(|m| *m == Mode::Reset) => true,
        }
    };
    if reset {
        abort_connection(client);
    }
}

/// Copies `from` to `to` while the mode is `Open`; what is read while blackholed waits.
async fn pump<R, W>(from: &mut R, to: &mut W, mut mode: watch::Receiver<Mode>) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        passing(&mut mode).await;
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        // A read that completed after the blackhole began is held, not delivered.
        passing(&mut mode).await;
        to.write_all(&buf[..n]).await?;
    }
}

/// Returns once bytes may pass (at once when open). A dropped proxy aborts the relays, so a
/// closed channel never lets bytes through unnoticed.
async fn passing(mode: &mut watch::Receiver<Mode>) {
    if mode.wait_for(|m| *m == Mode::Open).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Closes with a TCP RST (`SO_LINGER` 0) instead of an orderly FIN.
fn abort_connection(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
