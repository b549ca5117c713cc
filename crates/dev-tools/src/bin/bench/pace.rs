//! A loopback TCP proxy that holds every connection to a fixed bandwidth in
//! each direction: the stand-ins are served through it, so the relay and
//! its floor see a provider link of realistic speed (`bench playable`)
//! instead of loopback's gigabytes per second.
//!
//! Pacing is by debt, not by sleeping per chunk: each chunk moves the
//! connection's `next_free` instant on by its bytes ÷ rate, and the copy
//! sleeps only once it is more than a timer tick ahead. Tokio's timer has
//! millisecond ticks; a sleep per 16 KiB chunk (0.4 ms at 40 MB/s) would
//! round every one up and pace at a third of the rate. Credit for idle
//! time is capped at `BURST`, so a kept-alive connection that sat idle does
//! not then send at loopback speed.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// Idle credit a connection may spend at once.
const BURST: Duration = Duration::from_millis(5);
/// Sleep only when this far ahead of the rate (one timer tick, and some).
const SLACK: Duration = Duration::from_millis(2);

/// A bound, not yet serving proxy: its address goes into the stand-in's
/// public origin before the stand-in (its upstream) exists.
pub(super) struct PacedListener {
    listener: TcpListener,
    pub(super) addr: SocketAddr,
}

/// A serving proxy; stops when dropped.
pub(super) struct Paced {
    _stop: tokio_util::sync::DropGuard,
}

impl PacedListener {
    pub(super) async fn bind() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        Ok(Self { listener, addr })
    }

    /// Forwards every connection to `upstream`, each direction at
    /// `bytes_per_second`.
    pub(super) fn serve(self, upstream: SocketAddr, bytes_per_second: u64) -> Paced {
        // A zero rate would be an infinite debt per byte.
        let bytes_per_second = bytes_per_second.max(1);
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = token.cancelled() => return,
                    a = self.listener.accept() => a,
                };
                let Ok((client, _)) = accepted else {
                    // Out of descriptors, say: wait rather than spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let token = token.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        () = token.cancelled() => {}
                        _ = async {
                            tokio::join!(
                                pipe(cr, sw, bytes_per_second),
                                pipe(sr, cw, bytes_per_second),
                            )
                        } => {}
                    }
                });
            }
        });
        Paced {
            _stop: stop.drop_guard(),
        }
    }
}

/// Copies `from` into `to` at `rate` bytes per second; closes `to`'s write
/// side when `from` ends, so HTTP sees the same end of stream.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    rate: u64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    // A new connection starts with the same credit as a kept-alive idle
    // one: otherwise whoever reuses connections (or not) gains or loses
    // BURST per request, which is a bench artefact, not the link.
    let mut next_free = tokio::time::Instant::now() - BURST;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let now = tokio::time::Instant::now();
        next_free = next_free.max(now - BURST) + Duration::from_secs_f64(n as f64 / rate as f64);
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        if next_free > now + SLACK {
            tokio::time::sleep_until(next_free).await;
        }
    }
    let _ = to.shutdown().await;
}
