//! Background lease renewal.

use super::{Client, ClientInner};
use crate::proto::{PoolPath, Request};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Weak;
use std::time::Duration;

/// Renews every registered prefix every third of the lease period, from one thread per
/// client. The thread ends when the client is dropped.
pub(crate) struct Renewer {
    period: Duration,
    /// Prefix -> number of holders (tasks or guards).
    prefixes: Mutex<HashMap<PoolPath, usize>>,
    stop: Mutex<Option<mpsc::Sender<()>>>,
}

impl Renewer {
    pub(crate) fn new(lease: Duration) -> Self {
        Self {
            period: (lease / 3).max(Duration::from_millis(10)),
            prefixes: Mutex::new(HashMap::new()),
            stop: Mutex::new(None),
        }
    }

    pub(crate) fn start(&self, client: Weak<ClientInner>) {
        let (tx, rx) = mpsc::channel::<()>();
        *self.stop.lock() = Some(tx);
        let period = self.period;
        let spawned = std::thread::Builder::new()
            .name("farpool-lease".into())
            .stack_size(256 << 10)
            .spawn(move || loop {
                match rx.recv_timeout(period) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let Some(inner) = client.upgrade() else {
                    return;
                };
                let prefixes: Vec<PoolPath> =
                    inner.renewer.prefixes.lock().keys().cloned().collect();
                for prefix in prefixes {
                    if let Err(e) = inner.control.call(Request::Renew {
                        prefix: prefix.clone(),
                    }) {
                        tracing::warn!(%prefix, error = %e, "lease renewal failed");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the lease renewal thread; leases will expire");
        }
    }

    pub(crate) fn add(&self, p: &PoolPath) {
        *self.prefixes.lock().entry(p.clone()).or_insert(0) += 1;
    }

    pub(crate) fn remove(&self, p: &PoolPath) {
        let mut m = self.prefixes.lock();
        if let Some(n) = m.get_mut(p) {
            *n -= 1;
            if *n == 0 {
                m.remove(p);
            }
        }
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.stop.lock().take();
    }
}

/// Keeps a prefix's lease renewed while alive. From [`Client::lease`].
pub struct LeaseGuard {
    client: Client,
    path: PoolPath,
}

impl LeaseGuard {
    pub(crate) fn new(client: Client, path: PoolPath) -> Self {
        client.renewer().add(&path);
        Self { client, path }
    }

    /// The renewed prefix.
    pub fn path(&self) -> &PoolPath {
        &self.path
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.client.renewer().remove(&self.path);
    }
}
