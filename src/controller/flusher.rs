//! Runs the flushes of mapped paths ([`Effect::Flush`](super::Effect)) off the
//! controller's event loop.
//!
//! A few dedicated threads take flush jobs from a channel. Each job reads the object
//! through an in-process farpool [`Client`] connected to the controller's own control
//! port (lookups only: it renews nothing, so it cannot keep the object alive), writes
//! it to the tier with the object kind's `sync` ([`crate::ds::sync_any`]), and reports
//! the outcome to the state machine ([`super::ControllerState::flush_done`]), which
//! frees the object only if its lease is still expired. Tiers are opened once per URL
//! and kept; a tier that cannot be opened is a failed attempt, retried later.

use super::server::Shared;
use crate::client::{Client, ClientConfig};
use crate::proto::{Backing, PoolPath, Scope, Token};
use crate::tier::Tier;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Flushes running at once.
const THREADS: usize = 2;
/// How long the flush client keeps one self-minted admin token (valid twice as long)
/// before it reconnects with a fresh one (with a cluster key only).
const TOKEN_REFRESH: Duration = Duration::from_secs(3600);

/// One flush attempt.
#[derive(Debug)]
pub(crate) struct FlushJob {
    /// The mapped path.
    pub path: PoolPath,
    /// Where to write it.
    pub backing: Backing,
    /// The attempt's token for `flush_done`.
    pub token: u64,
    /// Whether paths below own blocks.
    pub has_children: bool,
}

/// What the flush threads share.
struct Worker {
    addr: SocketAddr,
    shared: Weak<Shared>,
    /// The connected client and when its token (if any) stops being used.
    client: Mutex<Option<(Client, Instant)>>,
    tiers: Mutex<HashMap<String, Arc<Tier>>>,
    jobs: Mutex<mpsc::Receiver<FlushJob>>,
}

/// The sending side: hands jobs to the flush threads, which stop when it is dropped.
pub(crate) struct Flusher {
    tx: Mutex<mpsc::Sender<FlushJob>>,
}

impl Flusher {
    /// Starts the flush threads for the controller listening on `addr`.
    pub fn start(addr: SocketAddr, shared: Weak<Shared>) -> Flusher {
        let (tx, rx) = mpsc::channel();
        let worker = Arc::new(Worker {
            addr,
            shared,
            client: Mutex::new(None),
            tiers: Mutex::new(HashMap::new()),
            jobs: Mutex::new(rx),
        });
        for i in 0..THREADS {
            let w = worker.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("farpool-flush-{i}"))
                .spawn(move || w.run());
            if let Err(e) = spawned {
                tracing::error!(
                    "cannot start a flush thread: {e}; flushes of mapped paths wait for the others"
                );
            }
        }
        Flusher { tx: Mutex::new(tx) }
    }

    /// Queues `job`. If no thread is left, the attempt is reported failed.
    pub fn submit(&self, job: FlushJob, shared: &Shared) {
        if let Err(mpsc::SendError(job)) = self.tx.lock().send(job) {
            shared.flush_result(
                &job.path,
                job.token,
                Err("no flush thread is running".into()),
            );
        }
    }
}

impl Worker {
    fn run(&self) {
        loop {
            let job = match self.jobs.lock().recv() {
                Ok(job) => job,
                Err(_) => return,
            };
            let Some(shared) = self.shared.upgrade() else {
                return;
            };
            if *shared.stop.borrow() {
                return;
            }
            let started = Instant::now();
            let result = self.flush(&job).map_err(|e| e.to_string());
            tracing::debug!(path = %job.path, elapsed = ?started.elapsed(), ok = result.is_ok(), "flush attempt finished");
            shared.flush_result(&job.path, job.token, result.map(|(_, n)| n));
        }
    }

    fn flush(&self, job: &FlushJob) -> Result<(crate::ds::ObjectKind, u64), FlushError> {
        let client = self.client()?;
        let tier = self.tier(&job.backing.url)?;
        let r = crate::ds::sync_any(
            &client,
            job.path.as_str(),
            &tier,
            &job.backing.key,
            job.has_children,
        );
        if let Err(crate::ds::DsError::Client(_)) = &r {
            // The connection may be broken: connect afresh next time.
            *self.client.lock() = None;
        }
        Ok(r?)
    }

    fn client(&self) -> Result<Client, FlushError> {
        let mut c = self.client.lock();
        if let Some((client, renew_at)) = c.as_ref() {
            if Instant::now() < *renew_at {
                return Ok(client.clone());
            }
        }
        // With a cluster key the controller wants a token from its own clients too: an
        // admin token minted here, replaced well before it expires.
        let token = match self.shared.upgrade().and_then(|s| s.cluster_key.clone()) {
            Some(key) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                let token = Token::issue(&key, &Scope::Admin, now + 2 * TOKEN_REFRESH.as_secs())
                    .map_err(|e| FlushError::Token(e.to_string()))?;
                Some(token)
            }
            None => None,
        };
        let config = ClientConfig {
            name: "controller-flusher".into(),
            reconnect_for: Duration::from_secs(5),
            token,
            ..ClientConfig::default()
        };
        let client = Client::connect_with(&self.addr.to_string(), config)?;
        *c = Some((client.clone(), Instant::now() + TOKEN_REFRESH));
        Ok(client)
    }

    fn tier(&self, url: &str) -> Result<Arc<Tier>, FlushError> {
        if let Some(t) = self.tiers.lock().get(url) {
            return Ok(t.clone());
        }
        // Opened without the lock held: opening may touch the file system or network.
        let tier = Arc::new(Tier::open(url)?);
        self.tiers.lock().insert(url.to_string(), tier.clone());
        Ok(tier)
    }
}

/// Why a flush attempt failed.
#[derive(Debug, thiserror::Error)]
enum FlushError {
    /// The controller's own control port could not be reached.
    #[error("cannot connect to the controller's own control port: {0}")]
    Connect(#[from] crate::client::ClientError),
    /// The tier could not be opened.
    #[error(transparent)]
    Tier(#[from] crate::tier::TierError),
    /// Reading the object or writing it failed.
    #[error(transparent)]
    Object(#[from] crate::ds::DsError),
    /// No admin token could be minted with the cluster key.
    #[error("cannot mint the flusher's admin token: {0}")]
    Token(String),
}
