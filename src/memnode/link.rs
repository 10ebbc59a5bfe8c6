//! The memory node's link to the controller: registration, heartbeats, revocations.

use super::DataPlane;
use crate::proto::frame::{read_msg, write_msg, FrameError};
use crate::proto::key::{macs_equal, Challenge};
use crate::proto::{
    node_identity, ClusterKey, ControllerMsg, Hello, NodeMsg, Register, Role, Secret,
    PROTOCOL_VERSION,
};
use parking_lot::Mutex;
use std::io::{BufRead, BufReader, ErrorKind};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the reader waits before checking whether the node is stopping.
const POLL: Duration = Duration::from_millis(200);
/// Longest pause between two attempts to reach the controller again.
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait for the rest of a frame once its first byte arrived.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the link failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    #[error("cannot connect to controller {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("controller refused registration: {0}")]
    Refused(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A registered session with the controller.
pub(crate) struct Link {
    writer: Arc<Mutex<TcpStream>>,
    reader: BufReader<TcpStream>,
    node_id: u32,
    secret: Secret,
    heartbeat: Duration,
    register: Register,
    incarnation: u64,
    key: Option<ClusterKey>,
    data: Arc<DataPlane>,
}

impl Link {
    /// Connects and registers as process `incarnation`.
    ///
    /// If the controller resumes the node (it knows the incarnation: the controller or
    /// the connection restarted while this process kept running), the region, its
    /// grants and epochs stay as they are and the controller revokes what it must. If
    /// it registers the node afresh, every block is scrubbed when `scrub` is set (a
    /// re-registration: the region may hold an earlier life's data) and gets the keys
    /// of the initial epoch under the new id.
    ///
    /// With a cluster `key`, the node expects the controller to prove it holds the same
    /// key (a challenge over both connections' nonces), answers with its own proof, and
    /// derives the block secret itself; it refuses a controller in development mode.
    pub(crate) fn connect(
        addr: &str,
        register: Register,
        incarnation: u64,
        key: Option<ClusterKey>,
        data: Arc<DataPlane>,
        scrub: bool,
    ) -> Result<Link, LinkError> {
        let stream = TcpStream::connect(addr).map_err(|source| LinkError::Connect {
            addr: addr.to_string(),
            source,
        })?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(FRAME_TIMEOUT))?;
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let nonce: [u8; 16] = rand::random();
        write_msg(
            &mut writer,
            &Hello {
                version: PROTOCOL_VERSION,
                role: Role::MemNodeResumable {
                    register: register.clone(),
                    incarnation,
                    nonce,
                },
            },
        )?;
        let mut first = read_msg::<ControllerMsg>(&mut reader)?;
        if let ControllerMsg::Challenge {
            nonce: controller_nonce,
            proof,
        } = first
        {
            let Some(key) = &key else {
                return Err(LinkError::Refused(
                    "the controller requires the cluster key; start the memory node with --cluster-key-file PATH or FARPOOL_CLUSTER_KEY (the controller's key)".into(),
                ));
            };
            let challenge = Challenge {
                node_nonce: nonce,
                controller_nonce,
            };
            let identity = node_identity(&register, incarnation);
            if !macs_equal(&proof, &key.controller_proof(&challenge, &identity)) {
                return Err(LinkError::Refused(
                    "the controller's proof does not match this node's cluster key; give the node the same key (--cluster-key-file or FARPOOL_CLUSTER_KEY) as the controller".into(),
                ));
            }
            write_msg(
                &mut writer,
                &NodeMsg::Proof(key.node_proof(&challenge, &identity)),
            )?;
            first = read_msg::<ControllerMsg>(&mut reader)?;
        }
        let (node_id, sent_secret, heartbeat_ms, epoch) = match first {
            ControllerMsg::Registered {
                node_id,
                secret,
                heartbeat_ms,
                initial_epoch,
            } => (node_id, secret, heartbeat_ms, Some(initial_epoch)),
            ControllerMsg::Resumed {
                node_id,
                secret,
                heartbeat_ms,
            } => (node_id, secret, heartbeat_ms, None),
            ControllerMsg::Error(e) => return Err(LinkError::Refused(e.to_string())),
            other => {
                return Err(LinkError::Refused(format!(
                    "unexpected first message {other:?}"
                )))
            }
        };
        let secret = match (&key, sent_secret) {
            (Some(key), None) => key.block_secret(),
            (None, Some(secret)) => secret,
            (Some(_), Some(_)) => {
                return Err(LinkError::Refused(
                    "this node has a cluster key but the controller runs in development mode (it sent the block secret over the wire); give the controller the same --cluster-key-file, or start the node without one".into(),
                ))
            }
            (None, None) => {
                return Err(LinkError::Refused(
                    "the controller sent no block secret and no challenge; run the same farpool version as the controller".into(),
                ))
            }
        };
        match epoch {
            Some(epoch) => {
                if scrub {
                    data.revoke_all();
                }
                for b in 0..data.access.num_blocks() {
                    if scrub {
                        data.zero_block(b);
                    }
                    data.install(&secret, node_id, b, epoch);
                }
            }
            None => tracing::info!(node = node_id, "resumed with the controller; region kept"),
        }
        Ok(Link {
            writer: Arc::new(Mutex::new(writer)),
            reader,
            node_id,
            secret,
            heartbeat: Duration::from_millis(heartbeat_ms.max(10)),
            register,
            incarnation,
            key,
            data,
        })
    }

    pub(crate) fn node_id(&self) -> u32 {
        self.node_id
    }

    fn send(&self, msg: &NodeMsg) -> Result<(), FrameError> {
        write_msg(&mut *self.writer.lock(), msg)
    }

    /// Moves blocks to new epochs (zeroing them) and confirms.
    fn revoke(&self, blocks: Vec<(u32, u32)>) -> Result<(), FrameError> {
        let n = self.data.access.num_blocks();
        let mut done = Vec::with_capacity(blocks.len());
        for (block, epoch) in blocks {
            if block >= n {
                tracing::warn!(
                    block,
                    "controller revoked a block outside the region; ignored"
                );
                continue;
            }
            // Kill old grants first, then scrub, then publish the new epoch's keys.
            self.data.access.set(block, epoch, 0, 0);
            self.data.zero_block(block);
            self.data.install(&self.secret, self.node_id, block, epoch);
            done.push((block, epoch));
        }
        self.send(&NodeMsg::Revoked(done))
    }

    /// Serves the session until the connection fails or `stop` is set.
    fn serve(mut self, stop: &AtomicBool) -> Result<(), LinkError> {
        let hb_stop = Arc::new(AtomicBool::new(false));
        let hb = {
            let writer = self.writer.clone();
            let data = self.data.clone();
            let period = self.heartbeat;
            let hb_stop = hb_stop.clone();
            std::thread::Builder::new()
                .name("farpool-heartbeat".into())
                .stack_size(256 << 10)
                .spawn(move || {
                    while !hb_stop.load(Ordering::Relaxed) {
                        let msg = NodeMsg::Heartbeat(data.stats());
                        if let Err(e) = write_msg(&mut *writer.lock(), &msg) {
                            tracing::warn!(error = %e, "heartbeat failed");
                            return;
                        }
                        std::thread::sleep(period);
                    }
                })?
        };
        self.reader.get_ref().set_read_timeout(Some(POLL))?;
        let result = loop {
            if stop.load(Ordering::Relaxed) {
                // A clean stop deregisters; the controller drops the node at once
                // instead of waiting for missed heartbeats.
                if let Err(e) = self.send(&NodeMsg::Leaving) {
                    tracing::debug!(error = %e, "cannot tell the controller we are leaving");
                }
                break Ok(());
            }
            match self.reader.fill_buf() {
                Ok([]) => break Err(LinkError::Frame(FrameError::Closed)),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue
                }
                Err(e) => break Err(e.into()),
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(FRAME_TIMEOUT))?;
            let msg = read_msg::<ControllerMsg>(&mut self.reader);
            self.reader.get_ref().set_read_timeout(Some(POLL))?;
            match msg {
                Ok(ControllerMsg::Revoke(blocks)) => {
                    if let Err(e) = self.revoke(blocks) {
                        break Err(e.into());
                    }
                }
                Ok(ControllerMsg::Error(e)) => break Err(LinkError::Refused(e.to_string())),
                Ok(other) => tracing::warn!(?other, "unexpected controller message ignored"),
                Err(e) => break Err(e.into()),
            }
        };
        hb_stop.store(true, Ordering::Relaxed);
        let _ = self.writer.lock().shutdown(std::net::Shutdown::Both);
        let _ = hb.join();
        result
    }
}

/// Runs the link in a thread: serve, and on failure re-register with the same
/// incarnation (with backoff) until `stop` is set. The data plane keeps serving
/// meanwhile: a controller restart does not interrupt clients' reads and writes. If
/// the controller no longer knows the node, it comes back empty (see
/// [`Link::connect`]).
pub(crate) fn spawn(
    link: Link,
    addr: String,
    stop: Arc<AtomicBool>,
    node_id: Arc<AtomicU32>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("farpool-link".into())
        .spawn(move || {
            let mut link = Some(link);
            let mut backoff = Duration::from_millis(100);
            while !stop.load(Ordering::Relaxed) {
                let Some(l) = link.take() else {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                };
                let data = l.data.clone();
                let register = l.register.clone();
                let incarnation = l.incarnation;
                let key = l.key.clone();
                match l.serve(&stop) {
                    Ok(()) => return,
                    Err(e) => tracing::error!(error = %e, "lost the controller; re-registering"),
                }
                backoff = Duration::from_millis(50);
                while !stop.load(Ordering::Relaxed) {
                    match Link::connect(
                        &addr,
                        register.clone(),
                        incarnation,
                        key.clone(),
                        data.clone(),
                        true,
                    ) {
                        Ok(l) => {
                            tracing::info!(node = l.node_id(), "re-registered with the controller");
                            node_id.store(l.node_id(), Ordering::Relaxed);
                            link = Some(l);
                            backoff = Duration::from_millis(100);
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "re-registration failed; retrying");
                            std::thread::sleep(backoff);
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                    }
                }
            }
        })
}
