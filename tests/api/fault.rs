//! A fault harness: a TCP relay a test puts between a client and a service (PostgreSQL,
//! RabbitMQ, Redis, anything over TCP), to break the link at a chosen moment.
//!
//! ```ignore
//! let relay = Relay::start("127.0.0.1:5432").await;
//! let url = relay.through("postgres://postgres@127.0.0.1:5432/db"); // host:port → the relay's
//! // … connect the client to `url` …
//! relay.stall();   // blackhole: sockets stay open, nothing is forwarded either way
//! relay.restore(); // forward again, what was held included
//! relay.cut();     // close every connection (RST) and refuse new ones until `restore`
//! relay.delay(50); // hold every chunk 50 ms before forwarding it
//! ```
//!
//! - **stall** models a half-open link or a silent peer: the client's writes succeed (the
//!   relay's socket buffers them), no byte reaches the other side, and no FIN or RST is sent.
//!   Only a client-side timeout notices. New connections are accepted and stalled too.
//! - **cut** models a crashed service or a reset link: every relayed connection is reset on
//!   both sides at once; new ones are accepted and reset at once (the listener stays bound, so
//!   `restore` gets the same address back).
//! - **delay** adds latency per chunk and per direction, from the moment it is set.
//!
//! Plain tokio, bounded: at most [`CONNECTIONS_MAX`] relayed connections (more are reset at
//! once), one 16 KiB buffer per direction. Dropping the relay stops it and closes everything.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

/// Most connections relayed at once; a client past it is reset at once. Tests open a few
/// pools' worth, never thousands.
pub(crate) const CONNECTIONS_MAX: usize = 64;
/// Bytes read per chunk and per direction.
const CHUNK_BYTES: usize = 16 * 1024;
/// Longest wait for the target to accept a relayed connection.
const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the relay does with the bytes and the connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    Stall,
    Cut,
}

/// State shared by the handle, the accept loop and the connection tasks.
struct Shared {
    /// The current mode; connection tasks wait on its changes.
    mode: watch::Sender<Mode>,
    /// Latency added to each chunk before it is forwarded, in ms.
    delay_ms: AtomicU64,
    /// One permit per relayed connection ([`CONNECTIONS_MAX`]).
    slots: Arc<Semaphore>,
}

/// A running relay; stops, closing every connection, when dropped.
pub(crate) struct Relay {
    /// Where the relay listens: what clients connect to instead of the target.
    address: SocketAddr,
    shared: Arc<Shared>,
    /// The accept loop; it owns the connection tasks, so aborting it ends them all.
    accept: JoinHandle<()>,
}

impl Relay {
    /// Listens on 127.0.0.1:0 and forwards every connection to `target` (`host:port`).
    pub(crate) async fn start(target: &str) -> Relay {
        let target = tokio::net::lookup_host(target)
            .await
            .expect("the relay's target resolves")
            .next()
            .expect("the relay's target has an address");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the relay");
        let address = listener.local_addr().expect("the relay's address");
        let (mode, _) = watch::channel(Mode::Forward);
        let shared =
            Arc::new(Shared { mode, delay_ms: AtomicU64::new(0), slots: Arc::new(Semaphore::new(CONNECTIONS_MAX)) });
        let accept = tokio::spawn(accept_loop(listener, target, shared.clone()));
        Relay { address, shared, accept }
    }

    /// The address clients connect to instead of the target.
    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }

    /// `url` with its host and port replaced by the relay's (any scheme with a host).
    pub(crate) fn through(&self, url: &str) -> String {
        let mut url = url::Url::parse(url).expect("a URL");
        url.set_host(Some(&self.address.ip().to_string())).expect("a URL with a host");
        url.set_port(Some(self.address.port())).expect("a URL with a port");
        url.to_string()
    }

    /// Resets every relayed connection and every new one, until [`Relay::restore`].
    pub(crate) fn cut(&self) {
        self.shared.mode.send_replace(Mode::Cut);
    }

    /// Forwards nothing, either way, and keeps every socket open, until [`Relay::restore`].
    pub(crate) fn stall(&self) {
        self.shared.mode.send_replace(Mode::Stall);
    }

    /// Forwards again (what a stall held back included); accepts new connections again.
    pub(crate) fn restore(&self) {
        self.shared.mode.send_replace(Mode::Forward);
    }

    /// Holds every chunk `ms` milliseconds before forwarding it (0: no delay).
    pub(crate) fn delay(&self, ms: u64) {
        self.shared.delay_ms.store(ms, Ordering::Relaxed);
    }

    /// Connections relayed right now.
    pub(crate) fn connections(&self) -> usize {
        CONNECTIONS_MAX - self.shared.slots.available_permits()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let slot = shared.slots.clone().try_acquire_owned();
        match slot {
            Ok(slot) if *shared.mode.borrow() != Mode::Cut => {
                let shared = shared.clone();
                connections.spawn(async move {
                    relay_connection(client, target, &shared).await;
                    drop(slot);
                });
            }
            _ => reset(&client),
        }
    }
}

/// Connects to the target and pipes both ways until both sides are done or the relay cuts.
async fn relay_connection(client: TcpStream, target: SocketAddr, shared: &Shared) {
    let server = match tokio::time::timeout(TARGET_CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(server)) => server,
        _ => return reset(&client),
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(pipe(client_read, server_write, shared), pipe(server_read, client_write, shared));
}

/// Forwards one direction: reads a chunk while forwarding, holds it while stalled, waits the
/// delay, writes it. Ends at end of stream or an error (shutting its write side down), or at
/// a cut (resetting both sockets).
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, shared: &Shared) {
    let mut mode = shared.mode.subscribe();
    let mut chunk = vec![0u8; CHUNK_BYTES];
    loop {
        if !forwarding(&mut mode).await {
            break;
        }
        let read = tokio::select! {
            read = from.read(&mut chunk) => read,
            // The mode changed while waiting for bytes: look at it again.
            _ = mode.changed() => continue,
        };
        let n = match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if !forwarding(&mut mode).await {
            break;
        }
        let delay = Duration::from_millis(shared.delay_ms.load(Ordering::Relaxed));
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if !forwarding(&mut mode).await || to.write_all(&chunk[..n]).await.is_err() {
            break;
        }
    }
    reset(from.as_ref());
    reset(to.as_ref());
}

/// Waits while the relay stalls; true once it forwards, false when it cuts (or is gone).
async fn forwarding(mode: &mut watch::Receiver<Mode>) -> bool {
    match mode.wait_for(|m| *m != Mode::Stall).await {
        Ok(current) => *current == Mode::Forward,
        Err(_) => false,
    }
}

/// Makes the socket's close an RST rather than a FIN (SO_LINGER 0): a reset link.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Longest wait for anything the relay should let through.
    const WITHIN: Duration = Duration::from_secs(5);
    /// How long "nothing arrives" is watched for.
    const QUIET: Duration = Duration::from_millis(300);

    /// An echo server on 127.0.0.1:0; it stops with the test's runtime.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        address
    }

    async fn round_trip(stream: &mut TcpStream, text: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(text).await?;
        let mut reply = vec![0u8; text.len()];
        stream.read_exact(&mut reply).await?;
        Ok(reply)
    }

    #[tokio::test]
    async fn the_relay_forwards_stalls_delays_cuts_and_restores() {
        let relay = Relay::start(&echo_server().await.to_string()).await;
        let mut stream = TcpStream::connect(relay.address()).await.expect("connect");
        assert_eq!(round_trip(&mut stream, b"ping").await.expect("echo"), b"ping");
        assert_eq!(relay.connections(), 1);
        let url = relay.through("postgres://postgres@db.example:5432/walletq?sslmode=disable");
        assert_eq!(url, format!("postgres://postgres@{}/walletq?sslmode=disable", relay.address()));

        // Stall: the write succeeds, nothing comes back, the socket stays open.
        relay.stall();
        stream.write_all(b"held").await.expect("a stalled link still takes writes");
        let mut reply = [0u8; 4];
        assert!(tokio::time::timeout(QUIET, stream.read_exact(&mut reply)).await.is_err(), "nothing while stalled");
        relay.restore();
        tokio::time::timeout(WITHIN, stream.read_exact(&mut reply)).await.expect("in time").expect("held bytes");
        assert_eq!(&reply, b"held");

        // Delay: both directions wait.
        relay.delay(100);
        let start = tokio::time::Instant::now();
        assert_eq!(round_trip(&mut stream, b"slow").await.expect("echo"), b"slow");
        assert!(start.elapsed() >= Duration::from_millis(200), "{:?}", start.elapsed());
        relay.delay(0);

        // Cut: the open connection is reset, new ones too, until restore.
        relay.cut();
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(WITHIN, stream.read_to_end(&mut rest)).await.expect("the cut is seen");
        assert!(ended.is_err() || rest.is_empty(), "{ended:?}");
        let mut refused = TcpStream::connect(relay.address()).await.expect("the listener stays bound");
        let refused = tokio::time::timeout(WITHIN, round_trip(&mut refused, b"nope")).await.expect("in time");
        assert!(refused.is_err(), "a new connection is reset while cut");
        relay.restore();
        let mut again = TcpStream::connect(relay.address()).await.expect("connect after restore");
        assert_eq!(round_trip(&mut again, b"back").await.expect("echo"), b"back");

        // Dropped: the listener is closed.
        let address = relay.address();
        drop(relay);
        let closed = tokio::time::timeout(WITHIN, async {
            loop {
                if TcpStream::connect(address).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(closed.is_ok(), "the relay stops listening once dropped");
    }
}
