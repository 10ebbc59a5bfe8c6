//! The controller: the pool's only metadata owner.
//!
//! It keeps the memory-node registry (one free list and one epoch per block), the
//! namespace tree of paths (`/job/stage/task`) with the blocks each owns, per-subtree
//! usage and quotas, and leases. Clients talk to it to open paths, allocate, free,
//! look up and renew; they never send data through it.
//!
//! # Structure
//! - `state`: [`ControllerState`], the pure state machine. Every operation takes the
//!   current time and returns its result plus [`Effect`]s for the I/O layer, so the
//!   protocol is testable without sockets.
//! - `registry`: memory nodes, block epochs and owners, free lists, liveness.
//! - `namespace`: the path tree, usage accounting, quotas and lease expiry.
//! - `server`: tokio networking around the state (one mutex, never held across an
//!   `.await`), a writer task per memory node, and a ticker for leases and heartbeats.
//! - `flusher`: threads that flush mapped paths to the persistent tier at lease
//!   expiry (see `state::flush` for the rules).
//! - `secret`: the cluster secret in the data directory.
//! - `journal`: the metadata log format (records, snapshots, framing); pure.
//! - `store`: the metadata log's files, generations and sync policy.
//!
//! # Guarantees
//! - Allocation is all or nothing: quotas (on the path and every ancestor) and free
//!   capacity are checked before any block is taken.
//! - A freed block gets a new epoch and returns to the free list only after its memory
//!   node confirmed that epoch, so a stale grant can never read the next owner's data.
//! - A `Free` or `Remove` is answered only once the memory nodes confirmed the new
//!   epochs (or were lost), so the freeing client's stale handles fail as soon as the
//!   call returns; the wait is bounded by [`ControllerConfig::revoke_wait`].
//! - A memory node that misses heartbeats for `dead_after`, or whose connection closes,
//!   is dead: it gets no new blocks, its blocks stay listed until freed (then it is
//!   dropped). Replicated blocks with a surviving copy are re-replicated onto another
//!   live node (`replicas`, `state/replication.rs`, `copier`); unreplicated ones are
//!   lost, and lookups of their paths fail with [`crate::proto::ControlError::DataLost`]
//!   rather than serving zeroes.
//!   Only the same node process (same incarnation) can bring it back, resumed with its
//!   blocks after its unowned blocks are revoked anew; a restarted node process
//!   registers afresh with a new id and an empty region.
//! - All memory nodes of a cluster must use the same block size.
//!
//! # Persistence
//! With a `data_dir`, the controller keeps the cluster secret in `data_dir/secret`, so
//! a restarted controller derives the same block keys, and logs every metadata change
//! (`journal` for the format, `store` for the files): after a crash it recovers the
//! namespace, quotas, memory nodes and block ownership with epochs; leases are
//! re-armed from the restart. Recovered memory nodes count as dead until they
//! re-register with the same incarnation, which resumes them with their blocks (see
//! [`ControllerState::join_node`]); clients reconnect by themselves.

mod auth;
mod copier;
mod fence;
mod flusher;
pub mod journal;
mod metrics;
mod namespace;
mod registry;
mod replicas;
mod secret;
mod server;
mod state;
mod store;

#[cfg(test)]
mod flush_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod replication_tests;
#[cfg(test)]
mod state_tests;

pub use registry::{INITIAL_EPOCH, MIN_BLOCK_SIZE};
pub use state::{
    ControllerState, Effect, Joined, Removal, StateConfig, MAX_BLOCKS_PER_ALLOC, MAX_FLUSH_BACKOFF,
};
pub use store::StoreError;

use crate::proto::{ClusterKey, ClusterStatus, Secret};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest lease, grace or heartbeat period accepted (one year).
const MAX_PERIOD: Duration = Duration::from_secs(365 * 86_400);

/// How to run a controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerConfig {
    /// Control-plane listen address (`host:port`; port 0 picks a free port).
    pub listen: String,
    /// Directory for the cluster secret and the metadata log (created if missing).
    /// `None`: a random secret per run and no recovery.
    pub data_dir: Option<PathBuf>,
    /// How often the metadata log is synced to disk: zero (the default) syncs before
    /// every answer, so even a machine crash loses nothing acknowledged; a positive
    /// interval syncs at most that often (a process crash still loses nothing).
    pub fsync_interval: Duration,
    /// Start a new metadata generation (snapshot plus empty log) after this many log
    /// records.
    pub snapshot_every: u64,
    /// Lease period granted by open, alloc and renew.
    pub lease: Duration,
    /// Extra time an expired path survives before it is reclaimed.
    pub grace: Duration,
    /// Heartbeat interval asked of memory nodes.
    pub heartbeat: Duration,
    /// A memory node silent for this long is declared dead.
    pub dead_after: Duration,
    /// Longest time a `Free` or `Remove` response waits for the memory nodes to
    /// confirm the revocations it caused. On timeout the response is sent anyway (with
    /// a warning in the log); zero answers at once without waiting.
    pub revoke_wait: Duration,
    /// Wait before retrying a failed flush of a mapped path (doubles with each further
    /// failure, up to [`MAX_FLUSH_BACKOFF`]).
    pub flush_retry: Duration,
    /// The cluster key ([`crate::proto::key`]). With one, block keys derive from it,
    /// memory nodes must prove they hold it, and clients need a token. `None` is the
    /// development mode: a generated secret (in `data_dir/secret`, or per run), sent to
    /// memory nodes at registration, and clients act anywhere unauthenticated.
    pub cluster_key: Option<ClusterKey>,
    /// Lifetime of soft-transport grants; `None`: the lease period.
    pub grant_ttl: Option<Duration>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7070".into(),
            data_dir: None,
            fsync_interval: Duration::ZERO,
            snapshot_every: 100_000,
            lease: Duration::from_secs(10),
            grace: Duration::from_secs(2),
            heartbeat: Duration::from_millis(500),
            dead_after: Duration::from_millis(1500),
            revoke_wait: Duration::from_secs(5),
            flush_retry: Duration::from_secs(1),
            cluster_key: None,
            grant_ttl: None,
        }
    }
}

impl ControllerConfig {
    /// Checks the periods for sanity.
    pub fn validate(&self) -> Result<(), ControllerError> {
        let check = |name: &str, d: Duration, min: Duration| {
            if d < min || d > MAX_PERIOD {
                Err(ControllerError::Config(format!(
                    "{name} of {d:?} is out of range; use between {min:?} and one year"
                )))
            } else {
                Ok(())
            }
        };
        check("lease", self.lease, Duration::from_millis(10))?;
        check("grace", self.grace, Duration::ZERO)?;
        check("heartbeat", self.heartbeat, Duration::from_millis(10))?;
        check("dead_after", self.dead_after, self.heartbeat)?;
        check("revoke_wait", self.revoke_wait, Duration::ZERO)?;
        check("fsync_interval", self.fsync_interval, Duration::ZERO)?;
        if self.flush_retry < Duration::from_millis(10) || self.flush_retry > MAX_FLUSH_BACKOFF {
            return Err(ControllerError::Config(format!(
                "flush_retry of {:?} is out of range; use between 10ms and {MAX_FLUSH_BACKOFF:?}",
                self.flush_retry
            )));
        }
        if let Some(ttl) = self.grant_ttl {
            check("grant_ttl", ttl, Duration::from_secs(1))?;
        }
        if self.snapshot_every == 0 {
            return Err(ControllerError::Config(
                "snapshot_every must be at least 1 record".into(),
            ));
        }
        Ok(())
    }

    /// The timing part used by the state machine.
    pub fn state_config(&self) -> StateConfig {
        StateConfig {
            lease: self.lease,
            grace: self.grace,
            dead_after: self.dead_after,
            flush_retry: self.flush_retry,
            grant_ttl: self.grant_ttl.unwrap_or(self.lease),
        }
    }
}

/// Why a controller could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The configuration is inconsistent.
    #[error("invalid controller configuration: {0}")]
    Config(String),
    /// The listen address could not be bound.
    #[error("cannot listen on '{addr}': {source}; choose another address or port (port 0 picks a free one), or stop the process using it")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The data directory could not be created or used.
    #[error("cannot use data directory '{}': {source}; check that the path is writable or pick another --data-dir", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The file-system error.
        #[source]
        source: std::io::Error,
    },
    /// The cluster secret file is unusable.
    #[error("cluster secret file '{}' is unusable: {reason}", path.display())]
    Secret {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The metadata in the data directory could not be read, recovered or written.
    #[error("controller metadata: {0}")]
    Metadata(#[from] StoreError),
    /// The async runtime or a signal handler could not be set up.
    #[error(
        "cannot run the controller's runtime: {0}; check the process's thread and file limits"
    )]
    Runtime(#[source] std::io::Error),
}

/// A running controller. Stops on [`Controller::shutdown`] or when dropped.
pub struct Controller {
    runtime: Option<tokio::runtime::Runtime>,
    shared: Arc<server::Shared>,
    local_addr: SocketAddr,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// Starts a controller on its own runtime (2 worker threads named `farpool-ctl`).
    /// The listener is bound before this returns, so [`Controller::local_addr`] is
    /// valid at once. May be called from inside another tokio runtime.
    pub fn start(config: ControllerConfig) -> Result<Controller, ControllerError> {
        config.validate()?;
        let secret = match (&config.cluster_key, &config.data_dir) {
            (Some(key), dir) => {
                if let Some(dir) = dir {
                    std::fs::create_dir_all(dir).map_err(|source| ControllerError::DataDir {
                        path: dir.clone(),
                        source,
                    })?;
                }
                key.block_secret()
            }
            (None, Some(dir)) => secret::load_or_create(dir)?,
            (None, None) => Secret::random(),
        };
        if config.cluster_key.is_none() {
            tracing::warn!("no cluster key configured: development mode (memory nodes get the block secret over the wire, clients are not authenticated); use --cluster-key-file in production");
        }
        let std_listener = std::net::TcpListener::bind(&config.listen).map_err(|source| {
            ControllerError::Bind {
                addr: config.listen.clone(),
                source,
            }
        })?;
        let bind_err = |source| ControllerError::Bind {
            addr: config.listen.clone(),
            source,
        };
        let local_addr = std_listener.local_addr().map_err(bind_err)?;
        std_listener.set_nonblocking(true).map_err(bind_err)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("farpool-ctl")
            .enable_io()
            .enable_time()
            .build()
            .map_err(ControllerError::Runtime)?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener).map_err(bind_err)?
        };
        let now = Instant::now();
        let (state, store) = match &config.data_dir {
            Some(dir) => {
                let (state, store) = recover(&config, dir, secret, now)?;
                (state, Some(store))
            }
            None => (
                ControllerState::new(config.state_config(), secret, now),
                None,
            ),
        };
        let mut shared = server::Shared::new(state, config.heartbeat, config.revoke_wait)
            .with_cluster_key(config.cluster_key.clone());
        if let Some(store) = store {
            shared = shared.with_store(store, config.snapshot_every);
        }
        let shared = Arc::new(shared);
        let _ = shared
            .flusher
            .set(flusher::Flusher::start(local_addr, Arc::downgrade(&shared)));
        let rx = shared.stop.subscribe();
        runtime.spawn(server::run(listener, shared.clone(), rx));
        tracing::info!(%local_addr, lease = ?config.lease, "controller listening");
        Ok(Controller {
            runtime: Some(runtime),
            shared,
            local_addr,
        })
    }

    /// The address the controller listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Cluster status, read directly from the in-process state.
    pub fn status(&self) -> ClusterStatus {
        self.shared.state.lock().status(Instant::now())
    }

    /// Serves Prometheus metrics at `http://addr/metrics` (port 0 picks a free port) on
    /// the controller's runtime until it stops; returns the bound address. Exported:
    /// requests and errors by kind with latency histograms, blocks allocated, freed and
    /// expired, capacity and usage in total and per memory node, node health, leases by
    /// state, and metadata log records and snapshots.
    pub fn serve_metrics(&self, addr: &str) -> Result<SocketAddr, ControllerError> {
        let bind_err = |source| ControllerError::Bind {
            addr: addr.to_string(),
            source,
        };
        let Some(runtime) = self.runtime.as_ref() else {
            return Err(ControllerError::Config("the controller is stopped".into()));
        };
        let listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener).map_err(bind_err)?
        };
        let shared = self.shared.clone();
        let render: crate::metrics::Render = Arc::new(move || {
            let status = shared.state.lock().status(Instant::now());
            shared.metrics.render(&status, shared.logging())
        });
        runtime.spawn(crate::metrics::serve(
            listener,
            render,
            self.shared.stop.subscribe(),
        ));
        tracing::info!(%local, "serving metrics at http://{local}/metrics");
        Ok(local)
    }

    /// Stops accepting, closes every connection and stops the runtime.
    pub fn shutdown(self) {
        drop(self);
    }

    /// Blocks until the process gets Ctrl-C (or SIGTERM on Unix), then shuts down.
    /// For the command-line tool; must not be called from inside an async runtime.
    /// Fails (after shutting down) if Ctrl-C cannot be listened for.
    pub fn wait(self) -> Result<(), ControllerError> {
        let Some(runtime) = self.runtime.as_ref() else {
            return Ok(());
        };
        let mut stop = self.shared.stop.subscribe();
        let result = runtime.block_on(async move {
            tokio::select! {
                r = tokio::signal::ctrl_c() => r.map_err(ControllerError::Runtime),
                () = terminated() => Ok(()),
                _ = stop.wait_for(|&s| s) => Ok(()),
            }
        });
        tracing::info!("controller shutting down");
        drop(self);
        result
    }
}

/// Resolves on SIGTERM; never if it cannot be listened for.
#[cfg(unix)]
async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            term.recv().await;
        }
        Err(e) => {
            tracing::warn!("cannot listen for SIGTERM: {e}");
            std::future::pending::<()>().await;
        }
    }
}

/// Never resolves: there is no SIGTERM here.
#[cfg(not(unix))]
async fn terminated() {
    std::future::pending::<()>().await;
}

/// Recovers the state from the metadata in `dir` and starts a new generation from it.
fn recover(
    config: &ControllerConfig,
    dir: &std::path::Path,
    secret: Secret,
    now: Instant,
) -> Result<(ControllerState, store::Store), ControllerError> {
    let found = store::read(dir)?;
    let mut state = ControllerState::recover(
        config.state_config(),
        secret,
        found.snapshot.as_ref(),
        &found.records,
        now,
    )
    .map_err(|reason| StoreError::Replay {
        dir: dir.to_path_buf(),
        reason,
    })?;
    state.finish_recovery(now);
    if found.snapshot.is_some() {
        let status = state.status(now);
        tracing::info!(
            generation = found.generation,
            records = found.records.len(),
            torn_bytes = found.torn_bytes,
            nodes = status.nodes.len(),
            paths = status.paths.len(),
            used_bytes = status.used_bytes,
            "recovered controller metadata; memory nodes count as dead until they re-register"
        );
    }
    let store = store::Store::start(
        dir,
        found.generation + 1,
        &state.snapshot(),
        config.fsync_interval,
    )?;
    state.enable_journal();
    Ok((state, store))
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
        if let Some(runtime) = self.runtime.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                // Blocking inside an async context is not allowed; let it wind down.
                runtime.shutdown_background();
            } else {
                runtime.shutdown_timeout(Duration::from_secs(2));
            }
        }
        self.shared.flush_log();
    }
}
