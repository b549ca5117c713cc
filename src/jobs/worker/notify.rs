//! NOTIFY to wake-up: a LISTEN connection of its own that reconnects
//! forever.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::jobs::queue::NOTIFY_CHANNEL;

/// Turns NOTIFYs into wake-ups. Runs on its own connection and reconnects
/// forever; after a reconnect it wakes the worker once, since notifications
/// sent while disconnected are lost (the poll covers the gap too).
pub(super) async fn forward_notifications(
    pool: PgPool,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut delays = reconnect_delays();
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            () = stop.cancelled() => return,
            r = connected => match r {
                Ok(l) => l,
                Err(e) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(30));
                    warn!(error = %e, retry_in = ?delay, "LISTEN connection failed");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            },
        };
        delays = reconnect_delays();
        wake.notify_one();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                r = listener.try_recv() => match r {
                    Ok(Some(_)) => wake.notify_one(),
                    Ok(None) => {
                        warn!("LISTEN connection lost; reconnecting");
                        wake.notify_one();
                    }
                    Err(e) => {
                        warn!(error = %e, "LISTEN connection failed; reconnecting");
                        break;
                    }
                },
            }
        }
    }
}

fn reconnect_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}
