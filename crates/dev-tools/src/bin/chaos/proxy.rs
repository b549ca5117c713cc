//! A fault-injecting TCP proxy on loopback (issue #22): the daemons reach
//! PostgreSQL, the Storage stand-in or the Telnyx stand-in through one, and
//! the run cuts the link, heals it, or points it at another server.
//!
//! Two kinds of cut, as real networks have them:
//! - `Frozen`, a partition: no byte crosses in either direction, on open
//!   connections and on new ones (which are accepted and then hang), as
//!   when a route is gone and TCP keeps retransmitting. On heal every
//!   connection resumes where it stopped: a statement sent before the cut
//!   reaches the server after it, lease or no lease.
//! - `Refused`, a server that is down: open connections are reset, new
//!   ones are reset as soon as they are accepted.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Open,
    Frozen,
    Refused,
}

struct Shared {
    upstream: Mutex<SocketAddr>,
    mode: watch::Sender<Mode>,
    /// Bumped to reset every open connection (a failover, a refusal).
    resets: watch::Sender<u64>,
}

/// One proxy: listens on `addr`, forwards to its upstream. Stops when
/// dropped.
pub(crate) struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: tokio_util::sync::DropGuard,
}

impl Proxy {
    pub(crate) async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a proxy")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            mode: watch::Sender::new(Mode::Open),
            resets: watch::Sender::new(0),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), stop.clone()));
        Ok(Self {
            addr,
            shared,
            _stop: stop.drop_guard(),
        })
    }

    pub(crate) fn set_mode(&self, mode: Mode) {
        if mode == Mode::Refused {
            self.reset_all();
        }
        self.shared.mode.send_replace(mode);
    }

    /// Points new connections at `upstream` and resets the open ones (they
    /// belong to the old server).
    pub(crate) fn switch_to(&self, upstream: SocketAddr) {
        *self
            .shared
            .upstream
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = upstream;
        self.reset_all();
    }

    fn reset_all(&self) {
        self.shared.resets.send_modify(|n| *n += 1);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((client, _)) = accepted else { continue };
        if *shared.mode.borrow() == Mode::Refused {
            reset(client);
            continue;
        }
        tokio::spawn(connection(client, shared.clone(), stop.clone()));
    }
}

/// Closes with RST, as a refused or broken connection ends.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Waits until the link is open; false when it was refused or reset.
async fn until_open(mode: &mut watch::Receiver<Mode>) -> bool {
    matches!(
        mode.wait_for(|m| *m != Mode::Frozen).await.as_deref(),
        Ok(Mode::Open)
    )
}

async fn connection(client: TcpStream, shared: Arc<Shared>, stop: CancellationToken) {
    let mut resets = shared.resets.subscribe();
    resets.mark_unchanged();
    let mut mode = shared.mode.subscribe();
    let piped = async {
        if !until_open(&mut mode).await {
            return None;
        }
        let upstream = *shared
            .upstream
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let server = TcpStream::connect(upstream).await.ok()?;
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        tokio::join!(
            pipe(cr, sw, shared.mode.subscribe()),
            pipe(sr, cw, shared.mode.subscribe())
        );
        Some(())
    };
    // A reset or the end of the run drops both sockets mid-copy.
    tokio::select! {
        _ = piped => {}
        _ = resets.changed() => {}
        () = stop.cancelled() => {}
    }
}

/// Copies one direction, holding every byte while the link is frozen.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !until_open(&mut mode).await {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if !until_open(&mut mode).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn echo(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await?;
        Ok(back)
    }

    #[tokio::test]
    async fn a_frozen_link_holds_bytes_until_it_heals_and_a_refused_one_resets() {
        let proxy = Proxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(echo(&mut s, b"one").await.unwrap(), b"one");
        proxy.set_mode(Mode::Frozen);
        let held = tokio::time::timeout(Duration::from_millis(300), echo(&mut s, b"two")).await;
        assert!(held.is_err(), "bytes crossed a frozen link");
        proxy.set_mode(Mode::Open);
        let mut back = [0u8; 3];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"two");
        proxy.set_mode(Mode::Refused);
        let mut fresh = TcpStream::connect(proxy.addr).await.unwrap();
        assert!(echo(&mut fresh, b"x").await.is_err());
        assert!(echo(&mut s, b"y").await.is_err());
        proxy.set_mode(Mode::Open);
        let mut healed = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(echo(&mut healed, b"three").await.unwrap(), b"three");
    }

    #[tokio::test]
    async fn a_switch_resets_open_connections_and_sends_new_ones_to_the_new_server() {
        let proxy = Proxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(echo(&mut s, b"one").await.unwrap(), b"one");
        proxy.switch_to(echo_server().await);
        assert!(echo(&mut s, b"two").await.is_err());
        let mut fresh = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(echo(&mut fresh, b"three").await.unwrap(), b"three");
    }
}
