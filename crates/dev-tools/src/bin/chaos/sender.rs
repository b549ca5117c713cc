//! Sends the signed webhooks as Telnyx would: each delivery to one of the
//! daemons' listeners, retried with backoff (to another listener: Telnyx
//! fails over) after a non-2xx answer, a timeout or a connection error.
//! Records which events got a 2xx: those are what the relay promised.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::plan::{Call, Delivery, Kind, webhook_body};

#[derive(Default, Debug)]
pub(crate) struct SendStats {
    /// Calls whose recording's webhook (data.id) got at least one 2xx.
    pub acked: HashSet<usize>,
    /// Calls whose `call.initiated` got at least one 2xx.
    pub initiated_acked: HashSet<usize>,
    /// HTTP requests made, including retries.
    pub requests: usize,
    pub answers: BTreeMap<u16, usize>,
    pub timeouts: usize,
    pub connection_errors: usize,
    /// Deliveries that never got a 2xx within their tries.
    pub gave_up: Vec<usize>,
    pub deliveries: usize,
    pub redeliveries: usize,
    /// Of `deliveries`, those of a `call.initiated`.
    pub initiated_deliveries: usize,
}

pub(crate) struct Sender {
    pub key: SigningKey,
    pub listeners: Vec<SocketAddr>,
    pub timeout: Duration,
    pub tries: u32,
    pub in_flight: usize,
}

impl Sender {
    /// Sends every delivery at its time after `start`; returns when each has
    /// been acknowledged or given up.
    pub(crate) async fn run(
        self,
        calls: Arc<Vec<Call>>,
        deliveries: Vec<Delivery>,
        start: Instant,
        stats: Arc<Mutex<SendStats>>,
    ) {
        let client = reqwest::Client::builder()
            .timeout(self.timeout)
            .pool_idle_timeout(Duration::from_secs(5))
            .build()
            .expect("an HTTP client with default TLS settings builds");
        let this = Arc::new(self);
        let limit = Arc::new(Semaphore::new(this.in_flight));
        let mut tasks = JoinSet::new();
        for delivery in deliveries {
            tokio::time::sleep_until(start + delivery.at).await;
            let Ok(permit) = limit.clone().acquire_owned().await else {
                break;
            };
            let (this, client, calls, stats) =
                (this.clone(), client.clone(), calls.clone(), stats.clone());
            tasks.spawn(async move {
                this.deliver(&client, &calls[delivery.call], delivery, &stats)
                    .await;
                drop(permit);
            });
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn deliver(
        &self,
        client: &reqwest::Client,
        call: &Call,
        delivery: Delivery,
        stats: &Mutex<SendStats>,
    ) {
        let lock = || stats.lock().unwrap_or_else(PoisonError::into_inner);
        {
            let mut s = lock();
            s.deliveries += 1;
            s.redeliveries += usize::from(delivery.redelivery);
            s.initiated_deliveries += usize::from(delivery.kind == Kind::Initiated);
        }
        let listeners = self.listeners.len().max(1);
        // A redelivery goes to another listener than the first delivery, so
        // concurrent ones race across daemons; a call's two events go to
        // different listeners too.
        let mut listener = (delivery.call
            + usize::from(delivery.redelivery)
            + usize::from(delivery.kind == Kind::Initiated))
            % listeners;
        for attempt in 1..=self.tries {
            if attempt > 1 && listeners > 1 {
                // Fail over to another listener, as Telnyx does.
                listener = (listener + 1 + fastrand::usize(..listeners - 1)) % listeners;
            }
            let url = format!("http://{}/webhooks/telnyx", self.listeners[listener]);
            let body = webhook_body(call, delivery.kind, attempt, &url);
            let mut req = client.post(&url).header("content-type", "application/json");
            let ts = recording_relay_dev_tools::testing::unix_now();
            for (name, value) in
                recording_relay_dev_tools::testing::signature_headers(&self.key, ts, &body)
            {
                req = req.header(name, value);
            }
            let result = req.body(body).send().await;
            let ok = {
                let mut s = lock();
                s.requests += 1;
                match &result {
                    Ok(res) => {
                        *s.answers.entry(res.status().as_u16()).or_default() += 1;
                        res.status().is_success()
                    }
                    Err(e) if e.is_timeout() => {
                        s.timeouts += 1;
                        false
                    }
                    Err(_) => {
                        s.connection_errors += 1;
                        false
                    }
                }
            };
            if ok {
                let mut s = lock();
                match delivery.kind {
                    Kind::Recording => s.acked.insert(delivery.call),
                    Kind::Initiated => s.initiated_acked.insert(delivery.call),
                };
                return;
            }
            // Telnyx backs off between tries; ours are shorter so a run
            // takes minutes, but long enough in sum (about 30 s) to ride
            // out a PostgreSQL restart or a daemon's restart.
            let ceiling =
                Duration::from_millis(250 * (1 << attempt.min(5))).min(Duration::from_secs(5));
            tokio::time::sleep(ceiling.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
        }
        lock().gave_up.push(delivery.call);
    }
}
