//! The controller's network side: accept loop, client sessions, memory-node sessions
//! and the periodic ticker, all around one [`ControllerState`] behind a mutex.
//!
//! The state lock is only ever held for one synchronous state operation, never across
//! an `.await`. Effects of an operation are dispatched after the lock is released, to
//! per-node writer tasks through unbounded channels (revocations are small and a node
//! drains them as fast as it confirms them).

use super::registry::INITIAL_EPOCH;
use super::state::{ControllerState, Effect};
use crate::proto::frame::{encode, read_msg_async, write_msg_async, FrameError};
use crate::proto::{
    ControlError, ControllerMsg, Envelope, Hello, NodeMsg, Register, Request, Response, Role,
    Welcome, PROTOCOL_VERSION,
};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// How long a new connection may take to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket buffer sizes of a session.
const IO_BUF: usize = 64 * 1024;

type Reader = BufReader<OwnedReadHalf>;
type Writer = BufWriter<OwnedWriteHalf>;

/// State shared by every task of a running controller.
pub(crate) struct Shared {
    /// The state machine.
    pub state: Mutex<ControllerState>,
    /// Outgoing message queues of connected memory nodes.
    links: Mutex<HashMap<u32, mpsc::UnboundedSender<ControllerMsg>>>,
    /// Heartbeat interval told to memory nodes.
    heartbeat: Duration,
}

impl Shared {
    /// Wraps `state`; memory nodes are told to heartbeat every `heartbeat`.
    pub fn new(state: ControllerState, heartbeat: Duration) -> Self {
        Self {
            state: Mutex::new(state),
            links: Mutex::new(HashMap::new()),
            heartbeat,
        }
    }

    /// Carries out effects of a state operation.
    fn dispatch(&self, effects: Vec<Effect>) {
        if effects.is_empty() {
            return;
        }
        let mut links = self.links.lock();
        for effect in effects {
            match effect {
                Effect::Revoke { node, blocks } => match links.get(&node) {
                    Some(tx) => {
                        if tx.send(ControllerMsg::Revoke(blocks)).is_err() {
                            tracing::debug!(node, "memory node writer gone; revocation dropped");
                        }
                    }
                    None => {
                        tracing::debug!(node, "no connection to memory node; revocation dropped")
                    }
                },
                Effect::NodeDead { node } => {
                    // Dropping the sender makes the writer say goodbye and close.
                    links.remove(&node);
                }
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
                let effects = shared.state.lock().tick(Instant::now());
                shared.dispatch(effects);
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
            Role::MemNode(_) => write_msg_async(&mut wr, &ControllerMsg::Error(err)).await,
        };
        close(wr, sent).await;
        return;
    }
    match hello.role {
        Role::Client { name } => client_session(rd, wr, peer, name, &shared).await,
        Role::MemNode(reg) => node_session(rd, wr, peer, reg, &shared).await,
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
        let (response, effects) = {
            let mut state = shared.state.lock();
            state.handle(req.body, Instant::now())
        };
        // Revocations go out before the response: the sooner old epochs die the better.
        shared.dispatch(effects);
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
    shared: &Shared,
) {
    let registered = {
        let mut state = shared.state.lock();
        state.register_node(&reg, Instant::now()).map(|id| {
            // Link the queue while the state is locked, so no revocation for this node
            // can be dispatched before the queue exists.
            let (tx, rx) = mpsc::unbounded_channel();
            shared.links.lock().insert(id, tx);
            (id, state.secret(), rx)
        })
    };
    let (node, secret, rx) = match registered {
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
        "memory node registered"
    );
    let welcome = ControllerMsg::Registered {
        node_id: node,
        secret,
        heartbeat_ms: u64::try_from(shared.heartbeat.as_millis()).unwrap_or(u64::MAX),
        initial_epoch: INITIAL_EPOCH,
    };
    let sent = match write_msg_async(&mut wr, &welcome).await {
        Ok(()) => wr.flush().await.map_err(FrameError::from),
        Err(e) => Err(e),
    };
    if let Err(e) = sent {
        tracing::debug!(%peer, node, "memory node connection failed: {e}");
    } else {
        let writer = tokio::spawn(node_writer(wr, rx, node));
        loop {
            let msg: NodeMsg = match read_msg_async(&mut rd).await {
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
                NodeMsg::Revoked(blocks) => {
                    shared.state.lock().revoked(node, &blocks);
                }
            }
        }
        // The writer ends once its queue is unlinked below.
        drop(writer);
    }
    shared.state.lock().node_lost(node);
    shared.links.lock().remove(&node);
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
