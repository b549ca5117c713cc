//! Reading a webhook's body before its signature is checked: every byte
//! held counts against one process-wide budget, and against its source's
//! share of it, so unsigned bodies cannot take the memory or the room
//! Telnyx's deliveries need.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::StatusCode;
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;

use super::{Reply, WebhookState, shed, too_large};

/// Reads the body, taking a permit of `state.body_budget` for each byte as
/// it arrives and holding them (the returned permit) until the request is
/// answered: what every connection may send before its signature is
/// checked is bounded as a whole, not only per request (issue #19: 1,024
/// connections × 1 MiB could be buffered). A body that would go over the
/// budget is answered 503 at once, so Telnyx retries; nothing waits for
/// room. One source holds at most its share of the budget (the review of
/// issue #19: 32 stalled 1 MiB bodies from one address took the whole
/// 32 MiB, and every Telnyx delivery was shed).
pub(super) async fn read_body(
    mut body: Incoming,
    state: &WebhookState,
    peer: SocketAddr,
) -> Result<(Bytes, (Option<OwnedSemaphorePermit>, ShareGuard)), Reply> {
    let mut read = BytesMut::new();
    let mut held: Option<OwnedSemaphorePermit> = None;
    let mut share = state.body_shares.guard(peer.ip());
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            Reply::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("reading the body failed: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: not part of what was signed
        };
        if read.len() + data.len() > state.max_body_bytes {
            return Err(too_large(state));
        }
        if !share.take(data.len()) {
            return Err(shed(
                "request bodies from this address held at its share of listener.body_budget_bytes",
            ));
        }
        let Some(more) = u32::try_from(data.len())
            .ok()
            .and_then(|n| state.body_budget.clone().try_acquire_many_owned(n).ok())
        else {
            return Err(shed(
                "request bodies held at the limit (listener.body_budget_bytes)",
            ));
        };
        match held.as_mut() {
            Some(permit) => permit.merge(more),
            None => held = Some(more),
        }
        read.extend_from_slice(&data);
    }
    Ok((read.freeze(), (held, share)))
}

/// Into how many shares the body budget is cut: one source holds at most
/// one (or one whole body, when bodies are larger).
pub(super) const BODY_SHARES: usize = 16;

/// Body bytes held per source.
pub(super) struct BodyShares {
    share: usize,
    held: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

/// The bytes one request holds of its source's share; given back on drop.
pub(super) struct ShareGuard {
    key: std::net::IpAddr,
    bytes: usize,
    share: usize,
    held: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

impl BodyShares {
    pub(super) fn new(share: usize) -> Self {
        Self {
            share,
            held: Arc::default(),
        }
    }

    fn guard(&self, ip: std::net::IpAddr) -> ShareGuard {
        ShareGuard {
            key: crate::server::source_key(ip),
            bytes: 0,
            share: self.share,
            held: self.held.clone(),
        }
    }
}

impl ShareGuard {
    /// Takes `n` more bytes of the source's share, or refuses.
    fn take(&mut self, n: usize) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let source = held.get(&self.key).copied().unwrap_or(0);
        if source + n > self.share {
            return false;
        }
        held.insert(self.key, source + n);
        self.bytes += n;
        true
    }
}

impl Drop for ShareGuard {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(source) = held.get_mut(&self.key) {
            *source -= self.bytes;
            if *source == 0 {
                held.remove(&self.key);
            }
        }
    }
}
