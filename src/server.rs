//! The accept loop shared by the webhook, playback and metrics listeners:
//! a bound on connections in all and from one source, a header-read
//! timeout that is also the keep-alive idle timeout, a cap on a
//! connection's life, and a bounded graceful shutdown.
//!
//! Why each bound (issue #19: 1,100 keep-alive clients from one address
//! held every slot of the listener, and Telnyx's deliveries timed out):
//! - per source: one address (an IPv6 /64) may hold only so many
//!   connections; one more is closed at once, not queued, so a flood from
//!   one place cannot take the room Telnyx's few addresses need;
//! - in all: what the process can hold (file descriptors and memory, see
//!   [`fit_to_open_files`]), far above what Telnyx uses;
//! - idle: hyper (1.x) arms `header_read_timeout` whenever it waits for a
//!   request head, the next one on a kept-alive connection included, so a
//!   silent connection is closed after it;
//! - life: a client that asks again before the idle timeout would keep its
//!   connection for ever; past `max_connection_age` the connection finishes
//!   the request it is on and closes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::error::Error as StdError;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// How long open connections get to finish their requests at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// The largest request head (and read buffer) of a connection. hyper's
/// default is about 400 KiB, which times the connection bound is more
/// memory than the unit allows; Telnyx's heads are under 1 KiB, a playback
/// request's (a JWT) a few KiB. A larger head is answered 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Slowloris guard, and the idle timeout of a kept-alive connection.
    pub header_read_timeout: Duration,
    /// Connections in all; further ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Connections from one address (one /64 for IPv6); one more is closed
    /// at once.
    pub(crate) max_connections_per_source: usize,
    /// After this a connection finishes its request and closes.
    pub max_connection_age: Duration,
}

/// Serves `listener` until `shutdown` is cancelled; `service_for` builds the
/// service of one connection from its peer address.
pub(crate) async fn serve<F, S, B>(
    name: &'static str,
    listener: TcpListener,
    limits: Limits,
    shutdown: CancellationToken,
    service_for: F,
) where
    F: Fn(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let sources = Sources::new(limits.max_connections_per_source);
    let open = TaskTracker::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "{name} started");
    }
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = connections.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "{name}: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(source) = sources.admit(peer.ip()) else {
            // Closed before a byte is read; the slot goes to the next one.
            debug!(%peer, "{name}: connection over the per-source limit closed");
            crate::metrics::metrics().connection_refused(name, "per_source");
            continue;
        };
        let conn = http.serve_connection(TokioIo::new(stream), service_for(peer));
        let shutdown = shutdown.clone();
        open.spawn(async move {
            tokio::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => Some(ended),
                () = shutdown.cancelled() => None,
                () = tokio::time::sleep(limits.max_connection_age) => None,
            };
            let ended = match ended {
                Some(ended) => ended,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            // Errors here are the client's (reset, header timeout): not ours to log loudly.
            if let Err(e) = ended {
                debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(source);
            drop(permit);
        });
    }
    drop(listener);
    open.close();
    if tokio::time::timeout(DRAIN, open.wait()).await.is_err() {
        warn!("{name}: open connections did not close within {DRAIN:?}");
    }
    info!("{name} stopped");
}

/// Connections open per source address.
struct Sources {
    limit: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One admitted connection; gives its place back when dropped.
struct SourceGuard {
    key: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Sources {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            open: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn admit(&self, ip: IpAddr) -> Option<SourceGuard> {
        let key = source_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(SourceGuard {
            key,
            open: self.open.clone(),
        })
    }
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// An IPv4 address is a source; an IPv6 host usually has a whole /64 to
/// pick addresses from, so the /64 is.
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
    }
}

/// File descriptors kept for everything but the listener's connections:
/// database connections, the LISTEN connection, outbound HTTP, files.
pub(crate) const OTHER_OPEN_FILES: u64 = 256;

/// The listener's connection bound, fitted to RLIMIT_NOFILE: raises the
/// soft limit towards the hard one as far as `wanted + others` needs, and
/// if that is not enough, returns the bound the limit allows (at least
/// 64), so that accepting never fails on EMFILE while the bound says there
/// is room. `others` counts the descriptors everything else may hold.
pub(crate) fn fit_to_open_files(wanted: usize, others: u64) -> usize {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let needed = wanted as u64 + others;
    let limit = getrlimit(Resource::Nofile);
    let Some(soft) = limit.current else {
        return wanted;
    };
    if soft >= needed {
        return wanted;
    }
    let raised = limit.maximum.map_or(needed, |hard| hard.min(needed));
    let soft = if raised > soft
        && setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(raised),
                maximum: limit.maximum,
            },
        )
        .is_ok()
    {
        raised
    } else {
        soft
    };
    if soft >= needed {
        info!(
            open_files = soft,
            "raised RLIMIT_NOFILE for the listener's connections"
        );
        return wanted;
    }
    let fitted = usize::try_from(soft.saturating_sub(others))
        .unwrap_or(usize::MAX)
        .max(64);
    warn!(
        open_files = soft,
        wanted,
        fitted,
        "RLIMIT_NOFILE is too low for listener.max_connections; serving fewer connections (raise LimitNOFILE)"
    );
    fitted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_slash_64() {
        let cases = [
            ("192.0.2.7", "192.0.2.7"),
            ("::ffff:192.0.2.7", "192.0.2.7"),
            ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::"),
            ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::"),
        ];
        for (ip, key) in cases {
            assert_eq!(
                source_key(ip.parse().unwrap()),
                key.parse::<IpAddr>().unwrap(),
                "{ip}"
            );
        }
    }

    #[test]
    fn a_source_over_its_limit_is_refused_until_one_of_its_connections_closes() {
        let sources = Sources::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let first = sources.admit(a).unwrap();
        let _second = sources.admit(a).unwrap();
        assert!(sources.admit(a).is_none());
        assert!(sources.admit("192.0.2.2".parse().unwrap()).is_some());
        drop(first);
        assert!(sources.admit(a).is_some());
    }
}
