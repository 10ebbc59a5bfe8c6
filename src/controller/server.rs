//! The controller's network side: accept loop, client sessions, memory-node sessions
//! and the periodic ticker, all around one [`ControllerState`] behind a mutex.
//!
//! The state lock is only ever held for one synchronous state operation, never across
//! an `.await`. Effects of an operation are dispatched after the lock is released, to
//! per-node writer tasks through unbounded channels (revocations are small and a node
//! drains them as fast as it confirms them).
//!
//! # Synchronous revocation
//! A client's `Free` or `Remove` is answered only after every memory node involved
//! confirmed the new epochs with `Revoked`, or was lost (declared dead or
//! disconnected: its blocks are gone anyway). Dispatching such a request's revocations
//! registers one waiter per `(block, new epoch)` on the node's [`NodeLink`]; the node's
//! session completes it when the confirmation arrives, and unlinking the node drops
//! (and so releases) all of its waiters. The client session awaits its waiters with no
//! lock held, bounded by `revoke_wait`, so other sessions carry on meanwhile and the
//! session's own responses stay in request order. Lease-expiry revocations from the
//! ticker have no waiters.

use super::auth::{self, Access};
use super::registry::INITIAL_EPOCH;
use super::state::{ControllerState, Effect, Joined};
use super::store::Store;
use crate::proto::frame::{encode, read_msg_async, write_msg_async, FrameError};
use crate::proto::{
    node_identity, ClusterKey, ControlError, ControllerMsg, Envelope, Hello, NodeMsg, PoolPath,
    Register, Request, Response, Role, Welcome, PROTOCOL_VERSION,
};
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

/// How long a new connection may take to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket buffer sizes of a session.
const IO_BUF: usize = 64 * 1024;

type Reader = BufReader<OwnedReadHalf>;
type Writer = BufWriter<OwnedWriteHalf>;

/// A connected memory node as seen by the dispatcher.
struct NodeLink {
    /// The node writer's queue.
    tx: mpsc::UnboundedSender<ControllerMsg>,
    /// Which session linked it (a resumed node's old session must not unlink the new).
    session: u64,
    /// Clients waiting for revocations, keyed by `(block index, new epoch)`. Epochs
    /// only grow and node ids are never reused, so a key is revoked at most once.
    waiters: HashMap<(u32, u32), oneshot::Sender<()>>,
}

/// A revocation a client waits for. Resolves with `Ok` when the node confirmed it and
/// with `Err` when the node was unlinked first.
pub(super) struct Pending {
    node: u32,
    rx: oneshot::Receiver<()>,
}

/// State shared by every task of a running controller.
pub(crate) struct Shared {
    /// The state machine.
    pub state: Mutex<ControllerState>,
    /// Connected memory nodes. Lock order: `state` before `links`.
    links: Mutex<HashMap<u32, NodeLink>>,
    /// Heartbeat interval told to memory nodes.
    heartbeat: Duration,
    /// Longest wait of a `Free`/`Remove` response for its revocations.
    revoke_wait: Duration,
    /// The metadata log, when the controller has a data directory. Lock order: `state`
    /// before `store`.
    store: Option<Mutex<Store>>,
    /// Start a new log generation after this many records.
    snapshot_every: u64,
    /// Set to stop the controller (also when the metadata log fails).
    pub stop: watch::Sender<bool>,
    /// Numbers memory-node sessions.
    sessions: AtomicU64,
    /// Request counters and latencies for `--metrics`.
    pub metrics: super::metrics::ServerMetrics,
    /// Re-replication copies to run (see [`super::copier`]).
    copy_tx: mpsc::UnboundedSender<super::copier::CopyJob>,
    /// The receiving end, taken by [`run`].
    copy_rx: Mutex<Option<mpsc::UnboundedReceiver<super::copier::CopyJob>>>,
    /// Runs flushes of mapped paths; set once the controller's address is known.
    pub flusher: std::sync::OnceLock<super::flusher::Flusher>,
    /// The cluster key; `None` in development mode.
    pub(crate) cluster_key: Option<ClusterKey>,
}

impl Shared {
    /// Wraps `state`; memory nodes are told to heartbeat every `heartbeat`, and client
    /// frees wait at most `revoke_wait` for their revocations.
    pub fn new(state: ControllerState, heartbeat: Duration, revoke_wait: Duration) -> Self {
        let (copy_tx, copy_rx) = mpsc::unbounded_channel();
        Self {
            copy_tx,
            copy_rx: Mutex::new(Some(copy_rx)),
            state: Mutex::new(state),
            links: Mutex::new(HashMap::new()),
            heartbeat,
            revoke_wait,
            store: None,
            snapshot_every: u64::MAX,
            stop: watch::channel(false).0,
            sessions: AtomicU64::new(1),
            metrics: Default::default(),
            flusher: std::sync::OnceLock::new(),
            cluster_key: None,
        }
    }

    /// Authenticates memory nodes and clients with `key` (`None`: development mode).
    pub fn with_cluster_key(mut self, key: Option<ClusterKey>) -> Self {
        self.cluster_key = key;
        self
    }

    /// Logs every metadata change to `store`, starting a new generation every
    /// `snapshot_every` records.
    pub fn with_store(mut self, store: Store, snapshot_every: u64) -> Self {
        self.store = Some(Mutex::new(store));
        // The store starts with a snapshot.
        self.metrics.log_snapshots.store(1, Ordering::Relaxed);
        self.snapshot_every = snapshot_every.max(1);
        self
    }

    /// Appends the metadata changes journaled in `state` (locked by the caller, so log
    /// order is state order) to the log. Returns false, and stops the controller, if
    /// the log cannot be written: the change is then not durable and must not be
    /// acknowledged.
    pub(super) fn persist(&self, state: &mut ControllerState) -> bool {
        let Some(store) = &self.store else {
            return true;
        };
        let records = state.take_journal();
        if records.is_empty() {
            return true;
        }
        match store.lock().append(&records) {
            Ok(()) => {
                self.metrics
                    .log_records
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::error!("metadata log write failed, stopping the controller: {e}");
                self.stop.send_replace(true);
                false
            }
        }
    }

    /// Periodic log upkeep with the state locked: sync when due, and start a new
    /// generation (snapshot) when the log has grown long.
    fn maintain_log(&self, state: &ControllerState) {
        let Some(store) = &self.store else {
            return;
        };
        let mut store = store.lock();
        let r = if store.records() >= self.snapshot_every {
            let snap = state.snapshot();
            let r = store.rotate(&snap);
            if r.is_ok() {
                self.metrics.log_snapshots.fetch_add(1, Ordering::Relaxed);
            }
            r
        } else {
            store.sync_if_due(Instant::now())
        };
        if let Err(e) = r {
            tracing::error!("metadata log upkeep failed, stopping the controller: {e}");
            self.stop.send_replace(true);
        }
    }

    /// Whether a metadata log is kept.
    pub fn logging(&self) -> bool {
        self.store.is_some()
    }

    /// Syncs the metadata log (on shutdown).
    pub fn flush_log(&self) {
        if let Some(store) = &self.store {
            let _state = self.state.lock();
            match store.lock().sync() {
                Ok(()) => tracing::info!("metadata log flushed"),
                Err(e) => tracing::error!("cannot flush the metadata log: {e}"),
            }
        }
    }

    /// Carries out effects of a state operation. With `waiters`, a waiter is
    /// registered for every revocation sent (before it is sent, so a confirmation
    /// cannot overtake it) and pushed there.
    pub(super) fn dispatch(&self, effects: Vec<Effect>, mut waiters: Option<&mut Vec<Pending>>) {
        if effects.is_empty() {
            return;
        }
        let mut flushes = Vec::new();
        let mut links = self.links.lock();
        for effect in effects {
            match effect {
                Effect::Revoke { node, blocks } => match links.get_mut(&node) {
                    Some(link) => {
                        if let Some(w) = waiters.as_deref_mut() {
                            for &key in &blocks {
                                let (tx, rx) = oneshot::channel();
                                // A replaced sender is dropped, releasing its waiter.
                                link.waiters.insert(key, tx);
                                w.push(Pending { node, rx });
                            }
                        }
                        // If the writer is gone, the node's session is ending and will
                        // unlink it, releasing the waiters.
                        if link.tx.send(ControllerMsg::Revoke(blocks)).is_err() {
                            tracing::debug!(node, "memory node writer gone; revocation dropped");
                        }
                    }
                    None => {
                        tracing::debug!(node, "no connection to memory node; revocation dropped")
                    }
                },
                Effect::NodeDead { node } => {
                    // Dropping the sender makes the writer say goodbye and close;
                    // dropping the waiters releases them.
                    links.remove(&node);
                }
                Effect::Copy {
                    group,
                    source,
                    target,
                } => {
                    let job = super::copier::CopyJob {
                        group,
                        source,
                        target,
                    };
                    if self.copy_tx.send(job).is_err() {
                        tracing::debug!(group, "copier stopped; re-replication dropped");
                    }
                }
                Effect::Flush {
                    path,
                    backing,
                    token,
                    has_children,
                } => flushes.push(super::flusher::FlushJob {
                    path,
                    backing,
                    token,
                    has_children,
                }),
            }
        }
        drop(links);
        for job in flushes {
            match self.flusher.get() {
                Some(f) => f.submit(job, self),
                None => self.flush_result(
                    &job.path,
                    job.token,
                    Err("the controller's flusher is not running".into()),
                ),
            }
        }
    }

    /// Reports the outcome of a flush attempt to the state machine (from a flush
    /// thread) and carries out the revocations of a successful one.
    pub fn flush_result(&self, path: &PoolPath, token: u64, result: Result<u64, String>) {
        let effects = {
            let mut state = self.state.lock();
            let effects = state.flush_done(path, token, result, Instant::now());
            if !self.persist(&mut state) {
                return;
            }
            effects
        };
        self.dispatch(effects, None);
    }

    /// Completes the waiters of revocations `node` confirmed.
    fn confirmed(&self, node: u32, blocks: &[(u32, u32)]) {
        let mut links = self.links.lock();
        let Some(link) = links.get_mut(&node) else {
            return;
        };
        if link.waiters.is_empty() {
            return;
        }
        for key in blocks {
            if let Some(tx) = link.waiters.remove(key) {
                // The client may have stopped waiting (timeout, disconnect).
                let _ = tx.send(());
            }
        }
    }

    /// Waits until every revocation in `pending` is confirmed or its node lost, for at
    /// most `revoke_wait`. On timeout it logs a warning and returns all the same.
    async fn await_revocations(&self, pending: Vec<Pending>, peer: SocketAddr) {
        if pending.is_empty() {
            return;
        }
        let deadline = tokio::time::Instant::now() + self.revoke_wait;
        let mut pending = pending.into_iter();
        while let Some(p) = pending.next() {
            if tokio::time::timeout_at(deadline, p.rx).await.is_err() {
                let mut nodes = BTreeSet::from([p.node]);
                let mut unconfirmed = 1usize;
                for mut p in pending {
                    if matches!(p.rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)) {
                        nodes.insert(p.node);
                        unconfirmed += 1;
                    }
                }
                tracing::warn!(
                    %peer,
                    unconfirmed,
                    ?nodes,
                    "memory nodes did not confirm revocations within {:?}; answering the client anyway (its stale grants may still work briefly)",
                    self.revoke_wait
                );
                return;
            }
        }
    }
}

/// Resolves once `shutdown` says so (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // An error means the controller handle is gone: stop as well.
    let _ = shutdown.wait_for(|&stop| stop).await;
}

/// Accepts connections until shutdown; also runs the ticker.
pub(crate) async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::spawn(ticker(shared.clone(), shutdown.clone()));
    if let Some(rx) = shared.copy_rx.lock().take() {
        tokio::spawn(super::copier::run(shared.clone(), rx, shutdown.clone()));
    }
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) => {
                    if let Err(e) = sock.set_nodelay(true) {
                        tracing::debug!(%peer, "cannot set TCP_NODELAY: {e}");
                    }
                    tokio::spawn(connection(sock, peer, shared.clone()));
                }
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!("accepting a control connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    tracing::debug!("controller accept loop stopped");
}

/// Expires leases and detects dead nodes every half heartbeat.
async fn ticker(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let period = (shared.heartbeat / 2).max(Duration::from_millis(5));
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            _ = interval.tick() => {
                let effects = {
                    let mut state = shared.state.lock();
                    let effects = state.tick(Instant::now());
                    shared.persist(&mut state);
                    shared.maintain_log(&state);
                    effects
                };
                shared.dispatch(effects, None);
            }
        }
    }
}

/// Runs one control connection from `Hello` to close.
async fn connection(sock: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let (rd, wr) = sock.into_split();
    let mut rd = BufReader::with_capacity(IO_BUF, rd);
    let mut wr = BufWriter::with_capacity(IO_BUF, wr);
    let hello: Hello = match tokio::time::timeout(HELLO_TIMEOUT, read_msg_async(&mut rd)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "connection closed before a valid hello: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "no hello within {HELLO_TIMEOUT:?}; closing");
            return;
        }
    };
    if hello.version != PROTOCOL_VERSION {
        tracing::warn!(%peer, version = hello.version, "protocol version mismatch; closing");
        let err = ControlError::VersionMismatch {
            controller: PROTOCOL_VERSION,
            peer: hello.version,
        };
        let sent = match hello.role {
            Role::Client { .. } => {
                let msg = Envelope {
                    id: 0,
                    body: Response::Error(err),
                };
                write_msg_async(&mut wr, &msg).await
            }
            Role::MemNode(_) | Role::MemNodeResumable { .. } => {
                write_msg_async(&mut wr, &ControllerMsg::Error(err)).await
            }
        };
        close(wr, sent).await;
        return;
    }
    let key = shared.cluster_key.as_ref();
    match hello.role {
        Role::Client { name, token } => {
            let now = crate::proto::token::unix_now();
            match auth::client_access(key, token.as_deref(), now) {
                Ok(access) => client_session(rd, wr, peer, name, access, &shared).await,
                Err(e) => {
                    tracing::warn!(%peer, client = %name, "client refused: {e}");
                    shared.metrics.auth_refused.fetch_add(1, Ordering::Relaxed);
                    let msg = Envelope {
                        id: 0,
                        body: Response::Error(e),
                    };
                    let sent = write_msg_async(&mut wr, &msg).await;
                    close(wr, sent).await;
                }
            }
        }
        Role::MemNode(reg) => {
            if key.is_some() {
                let e = ControlError::Unauthenticated(
                    "this controller has a cluster key: register with a resumable hello carrying a nonce (run the same farpool version as the controller)".into(),
                );
                let sent = write_msg_async(&mut wr, &ControllerMsg::Error(e)).await;
                close(wr, sent).await;
                return;
            }
            node_session(rd, wr, peer, reg, 0, &shared).await
        }
        Role::MemNodeResumable {
            register,
            incarnation,
            nonce,
        } => {
            if let Some(key) = key {
                let identity = node_identity(&register, incarnation);
                if let Err(e) = auth::challenge_node(&mut rd, &mut wr, key, nonce, &identity).await
                {
                    tracing::warn!(%peer, data_addr = %register.data_addr, "memory node refused: {e}");
                    shared.metrics.auth_refused.fetch_add(1, Ordering::Relaxed);
                    close(wr, Ok(())).await;
                    return;
                }
            }
            node_session(rd, wr, peer, register, incarnation, &shared).await
        }
    }
}

/// Flushes and shuts down a writer after a final message (best effort).
async fn close(mut wr: Writer, sent: Result<(), FrameError>) {
    if sent.is_ok() {
        let _ = wr.flush().await;
    }
    let _ = wr.shutdown().await;
}

/// Logs why reading from a peer stopped.
fn log_read_end(peer: SocketAddr, what: &str, e: &FrameError) {
    match e {
        FrameError::Closed => tracing::debug!(%peer, "{what} disconnected"),
        FrameError::Decode(_) | FrameError::TooLarge(_) => {
            tracing::warn!(%peer, "malformed frame from {what}: {e}; closing its connection")
        }
        FrameError::Io(_) | FrameError::Encode(_) => {
            tracing::debug!(%peer, "{what} connection failed: {e}")
        }
    }
}

/// Whether `buf` starts with a complete frame (so more responses will follow at once
/// and flushing can wait).
fn frame_buffered(buf: &[u8]) -> bool {
    match buf.get(..4) {
        Some(len) => {
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            buf.len() - 4 >= len
        }
        None => false,
    }
}

/// Serves a client: one response per request, in order, flushed in batches.
async fn client_session(
    mut rd: Reader,
    mut wr: Writer,
    peer: SocketAddr,
    name: String,
    access: Access,
    shared: &Shared,
) {
    let lease_ms = shared.state.lock().lease_ms();
    let welcome = Welcome {
        version: PROTOCOL_VERSION,
        lease_ms,
    };
    if write_msg_async(&mut wr, &welcome).await.is_err() || wr.flush().await.is_err() {
        return;
    }
    tracing::debug!(%peer, client = %name, "client connected");
    loop {
        let req: Envelope<Request> = match read_msg_async(&mut rd).await {
            Ok(req) => req,
            Err(e) => {
                log_read_end(peer, "client", &e);
                return;
            }
        };
        let started = Instant::now();
        let kind = super::metrics::kind_of(&req.body);
        let allowed = access.check(&req.body, crate::proto::token::unix_now());
        let (response, effects) = if let Err(e) = allowed {
            tracing::debug!(%peer, client = %name, "request refused: {e}");
            shared.metrics.auth_refused.fetch_add(1, Ordering::Relaxed);
            (Response::Error(e), Vec::new())
        } else {
            let mut state = shared.state.lock();
            let (mut response, effects) = state.handle(req.body, started);
            if let Response::Status(s) = &mut response {
                access.filter_status(s);
            }
            if shared.persist(&mut state) {
                (response, effects)
            } else {
                let e = ControlError::BadRequest(
                    "the controller cannot write its metadata log and is stopping; retry once it has been restarted".into(),
                );
                (Response::Error(e), Vec::new())
            }
        };
        // The response waits until the revocations it caused took effect on the memory
        // nodes, so the client's stale grants fail as soon as it has the answer.
        let mut pending = Vec::new();
        let wait = !shared.revoke_wait.is_zero();
        shared.dispatch(effects, wait.then_some(&mut pending));
        if !pending.is_empty() {
            // Earlier responses held back for batching must not wait as well.
            if !wr.buffer().is_empty() {
                if let Err(e) = wr.flush().await {
                    tracing::debug!(%peer, "client connection failed: {e}");
                    return;
                }
            }
            shared.await_revocations(pending, peer).await;
        }
        shared.metrics.request(kind, &response, started.elapsed());
        let bytes = encode(&Envelope {
            id: req.id,
            body: response,
        })
        .or_else(|e| {
            tracing::warn!(%peer, "response to request {} cannot be sent: {e}", req.id);
            encode(&Envelope {
                id: req.id,
                body: Response::Error(ControlError::BadRequest(format!(
                    "the response cannot be sent ({e}); ask for less at once"
                ))),
            })
        });
        let Ok(bytes) = bytes else {
            return;
        };
        if let Err(e) = wr.write_all(&bytes).await {
            tracing::debug!(%peer, "client connection failed: {e}");
            return;
        }
        if !frame_buffered(rd.buffer()) {
            if let Err(e) = wr.flush().await {
                tracing::debug!(%peer, "client connection failed: {e}");
                return;
            }
        }
    }
}

/// Serves a memory node: registration, then heartbeats and revocation confirmations
/// in, revocations out.
async fn node_session(
    mut rd: Reader,
    mut wr: Writer,
    peer: SocketAddr,
    reg: Register,
    incarnation: u64,
    shared: &Shared,
) {
    let session = shared.sessions.fetch_add(1, Ordering::Relaxed);
    let registered = {
        let mut state = shared.state.lock();
        let joined = state.join_node(&reg, incarnation, Instant::now());
        if !shared.persist(&mut state) {
            return;
        }
        joined.map(|joined| {
            // Link the queue while the state is locked, so no revocation for this node
            // can be dispatched before the queue exists.
            let (tx, rx) = mpsc::unbounded_channel();
            let link = NodeLink {
                tx,
                session,
                waiters: HashMap::new(),
            };
            shared.links.lock().insert(joined.id, link);
            (joined, state.secret(), rx)
        })
    };
    let (
        Joined {
            id: node,
            resumed,
            effects,
        },
        secret,
        rx,
    ) = match registered {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%peer, "memory node registration refused: {e}");
            let sent = write_msg_async(&mut wr, &ControllerMsg::Error(e)).await;
            close(wr, sent).await;
            return;
        }
    };
    tracing::info!(
        %peer,
        node,
        capacity = reg.capacity,
        block_size = reg.block_size,
        data_addr = %reg.data_addr,
        resumed,
        "memory node registered"
    );
    let heartbeat_ms = u64::try_from(shared.heartbeat.as_millis()).unwrap_or(u64::MAX);
    // With a cluster key the node derives the secret itself: it never crosses the wire.
    let secret = shared.cluster_key.is_none().then_some(secret);
    let welcome = if resumed {
        ControllerMsg::Resumed {
            node_id: node,
            secret,
            heartbeat_ms,
        }
    } else {
        ControllerMsg::Registered {
            node_id: node,
            secret,
            heartbeat_ms,
            initial_epoch: INITIAL_EPOCH,
        }
    };
    // Queued now, written by the node's writer after the welcome.
    shared.dispatch(effects, None);
    let sent = match write_msg_async(&mut wr, &welcome).await {
        Ok(()) => wr.flush().await.map_err(FrameError::from),
        Err(e) => Err(e),
    };
    if let Err(e) = sent {
        tracing::debug!(%peer, node, "memory node connection failed: {e}");
    } else {
        let mut writer = tokio::spawn(node_writer(wr, rx, node));
        loop {
            let read = tokio::select! {
                read = read_msg_async::<NodeMsg>(&mut rd) => read,
                // The writer ends when the socket fails or the node was declared dead
                // (after telling it so): stop reading as well, which closes the socket.
                _ = &mut writer => break,
            };
            let msg = match read {
                Ok(msg) => msg,
                Err(e) => {
                    log_read_end(peer, "memory node", &e);
                    break;
                }
            };
            match msg {
                NodeMsg::Heartbeat(stats) => {
                    let r = shared.state.lock().heartbeat(node, stats, Instant::now());
                    if r.is_err() {
                        tracing::info!(node, "heartbeat from a node declared dead; closing");
                        break;
                    }
                }
                NodeMsg::Proof(_) => {
                    tracing::debug!(node, "stray registration proof after registration; ignored");
                }
                NodeMsg::Leaving => {
                    tracing::info!(node, "memory node is shutting down; deregistered");
                    break;
                }
                NodeMsg::Revoked(blocks) => {
                    {
                        let mut state = shared.state.lock();
                        state.revoked(node, &blocks);
                        shared.persist(&mut state);
                    }
                    shared.confirmed(node, &blocks);
                }
            }
        }
        // If still running, the writer ends once its queue is unlinked below.
    }
    let effects = {
        let mut state = shared.state.lock();
        let mut links = shared.links.lock();
        // A node that came back on a newer session (resumed) belongs to that session now.
        let replaced = links.get(&node).is_some_and(|l| l.session != session);
        if replaced {
            return;
        }
        let effects = state.node_lost(node);
        shared.persist(&mut state);
        // Unlinking also releases every client still waiting for this node.
        links.remove(&node);
        effects
    };
    shared.dispatch(effects, None);
}

/// Drains a memory node's queue onto its socket, flushing when the queue runs dry.
/// When the queue is unlinked (node dead or gone) it says goodbye and closes.
async fn node_writer(mut wr: Writer, mut rx: mpsc::UnboundedReceiver<ControllerMsg>, node: u32) {
    while let Some(msg) = rx.recv().await {
        let mut next = Some(msg);
        while let Some(msg) = next {
            if let Err(e) = write_msg_async(&mut wr, &msg).await {
                tracing::debug!(node, "memory node connection failed: {e}");
                return;
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = wr.flush().await {
            tracing::debug!(node, "memory node connection failed: {e}");
            return;
        }
    }
    let sent = write_msg_async(
        &mut wr,
        &ControllerMsg::Error(ControlError::NoSuchNode(node)),
    )
    .await;
    close(wr, sent).await;
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
