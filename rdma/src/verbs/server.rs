//! The memory node's side: one memory region for the whole region, one RC queue pair per
//! client connection, connected over a TCP side channel.

use std::collections::HashMap;
use std::io::BufReader;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use sideway::ibverbs::completion::GenericCompletionQueue;
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::queue_pair::GenericQueuePair;
use sideway::ibverbs::AccessFlags;

use super::device::{io_of, random_psn, Device, DeviceConfig, DeviceInfo};
use super::window::{self, Window};
use super::wire::{self, Accept, Message, WindowReply, WindowRequest};
use crate::access::{AccessTable, ListenerId};
use crate::error::{OpError, TransportError, VerbsError};
use crate::op::RKey;
use crate::region::Region;

/// Configuration of a [`VerbsServer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerbsServerConfig {
    /// Device, port and GID to use.
    pub device: DeviceConfig,
    /// Largest READ or WRITE a client may issue in one operation (capped at the block
    /// size). Default 1 MiB.
    pub max_op_bytes: u64,
    /// Most client connections (queue pairs) at once. Default 256.
    pub max_connections: usize,
    /// Enforce grants with type-2 memory windows where the device has them (default
    /// true). False, or a device without them, serves the whole region with one rkey
    /// (trusted mode); [`VerbsServer::isolation`] says which.
    pub memory_windows: bool,
}

/// How a verbs memory node enforces grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// Each grant is a type-2 memory window bound to exactly its block, per client
    /// queue pair, and invalidated when the block's grant changes (free, lease expiry):
    /// the device refuses a stale or guessed rkey with a remote access error.
    MemoryWindows,
    /// One rkey for the whole region: grants are checked by the client library only
    /// (trusted mode, like shm).
    RegionKey {
        /// Why memory windows are not used.
        reason: String,
    },
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Isolation::MemoryWindows => f.write_str("memory windows (type 2, per grant)"),
            Isolation::RegionKey { reason } => {
                write!(f, "region rkey, trusted mode ({reason})")
            }
        }
    }
}

impl Default for VerbsServerConfig {
    fn default() -> Self {
        Self {
            device: DeviceConfig::default(),
            max_op_bytes: 1 << 20,
            max_connections: 256,
            memory_windows: true,
        }
    }
}

/// One client connection's queue pair and the memory windows bound through it.
#[derive(Default)]
struct ConnState {
    // Field order is drop order: windows before the queue pair they are bound through,
    // the queue pair before its completion queue.
    /// Bound windows by block.
    bound: HashMap<u32, Vec<Bound>>,
    /// Invalidated windows, ready to be bound again.
    free: Vec<Window>,
    qp: Option<GenericQueuePair>,
    cq: Option<GenericCompletionQueue>,
    next_wr: u64,
}

/// A window bound to one block for one grant.
struct Bound {
    window: Window,
    epoch: u32,
    key: u64,
    writable: bool,
}

impl ConnState {
    /// Drops the windows, then the queue pair and its completion queue.
    fn reset(&mut self) {
        self.bound.clear();
        self.free.clear();
        self.qp = None;
        self.cq = None;
    }

    /// Revokes the windows of `block` whose grant `access` no longer allows.
    fn revoke(&mut self, block: u32, access: &AccessTable) {
        let Some(list) = self.bound.remove(&block) else {
            return;
        };
        let start = u64::from(block) * access.block_size();
        let (keep, stale): (Vec<Bound>, Vec<Bound>) = list.into_iter().partition(|b| {
            let rkey = RKey {
                key: b.key,
                epoch: b.epoch,
                expiry: 0,
            };
            access.check(start, 0, rkey, b.writable).is_ok()
        });
        if !keep.is_empty() {
            self.bound.insert(block, keep);
        }
        for Bound { window: w, .. } in stale {
            self.next_wr += 1;
            let done = match (&self.qp, &self.cq) {
                (Some(qp), Some(cq)) => window::invalidate(qp, cq, &w, self.next_wr),
                _ => Err(std::io::Error::other("no queue pair")),
            };
            match done {
                Ok(()) => self.free.push(w),
                // Deallocating invalidates too (dropping `w` does it).
                Err(e) => {
                    tracing::debug!(block, error = %e, "local invalidate failed; deallocating the window")
                }
            }
        }
    }
}

struct Shared {
    /// Per connection: queue pair and windows. Declared first: windows must go before
    /// the memory region they are bound to can be deregistered.
    windows: Mutex<HashMap<u64, Arc<Mutex<ConnState>>>>,
    // Keeps the region registered. Field order matters: the memory region is
    // deregistered before the region it covers can be unmapped.
    mr: Arc<MemoryRegion>,
    dev: Device,
    accept_template: Accept,
    _region: Arc<Region>,
    access: Arc<AccessTable>,
    isolation: Isolation,
    stop: AtomicBool,
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_id: AtomicU64,
    max_connections: usize,
}

impl Shared {
    /// Revokes, on every connection, the windows of `block` that its grant no longer
    /// allows. Called by the access table after every update.
    fn revoke(&self, block: u32) {
        let states: Vec<_> = self.windows.lock().values().cloned().collect();
        for st in states {
            st.lock().revoke(block, &self.access);
        }
    }

    /// Answers a window request on the connection whose state is `st`.
    fn window(&self, st: &Mutex<ConnState>, req: &WindowRequest) -> WindowReply {
        if req.block >= self.access.num_blocks() {
            return WindowReply::Denied;
        }
        let start = u64::from(req.block) * self.access.block_size();
        let rkey = RKey {
            key: req.key,
            epoch: req.epoch,
            expiry: 0,
        };
        // Hold the connection's lock from the check until the window is recorded, so a
        // revocation that lands in between finds the window and invalidates it.
        let mut st = st.lock();
        let writable = match self.access.check(start, 0, rkey, true) {
            Ok(()) => true,
            Err(OpError::ReadOnly) => false,
            Err(OpError::StaleEpoch { current, .. }) => return WindowReply::Stale { current },
            Err(_) => return WindowReply::Denied,
        };
        let flags = if writable { wire::WINDOW_WRITABLE } else { 0 };
        if req.flags & wire::WINDOW_CHECK_ONLY != 0 {
            return WindowReply::Bound { rkey: 0, flags };
        }
        if self.isolation != Isolation::MemoryWindows {
            return WindowReply::Failed(
                "this memory node does not use memory windows; use the region rkey".into(),
            );
        }
        if let Some(b) = st.bound.get(&req.block).and_then(|v| {
            v.iter()
                .find(|b| b.epoch == req.epoch && b.key == req.key && b.writable == writable)
        }) {
            return WindowReply::Bound {
                rkey: b.window.rkey(),
                flags,
            };
        }
        let mut w = match st.free.pop() {
            Some(w) => w,
            None => match Window::alloc(&self.dev.pd) {
                Ok(w) => w,
                Err(e) => {
                    return WindowReply::Failed(format!(
                        "cannot allocate a memory window ({e}; the device allows {}); \
                         use larger blocks or fewer client queue pairs",
                        self.dev.info.max_mw
                    ))
                }
            },
        };
        st.next_wr += 1;
        let wr_id = st.next_wr;
        let (Some(qp), Some(cq)) = (&st.qp, &st.cq) else {
            return WindowReply::Failed("no queue pair on this connection yet".into());
        };
        let bs = self.access.block_size();
        let addr = self.accept_template.base + start;
        match window::bind(qp, cq, &mut w, &self.mr, (addr, bs), writable, wr_id) {
            Ok(rkey) => {
                st.bound.entry(req.block).or_default().push(Bound {
                    window: w,
                    epoch: req.epoch,
                    key: req.key,
                    writable,
                });
                WindowReply::Bound { rkey, flags }
            }
            Err(e) => {
                tracing::warn!(block = req.block, error = %e, "binding a memory window failed");
                WindowReply::Failed(format!("binding a memory window failed: {e}"))
            }
        }
    }
}

/// A memory node's verbs endpoint: serves one-sided operations on a [`Region`] to
/// [`super::VerbsTransport`] clients. The RDMA device does the work; the endpoint only
/// connects queue pairs. Dropping it (or [`VerbsServer::shutdown`]) disconnects every
/// client and deregisters the region.
pub struct VerbsServer {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
    listener: Option<ListenerId>,
}

impl VerbsServer {
    /// Opens the RDMA device, registers `region` as one memory region, and listens for
    /// queue-pair requests on `addr` (TCP).
    ///
    /// Fails with [`TransportError::Verbs`] when there is no usable device (the message
    /// says what to do) and [`TransportError::Io`] when the address cannot be bound.
    pub fn bind(
        addr: &str,
        region: Arc<Region>,
        access: Arc<AccessTable>,
        config: VerbsServerConfig,
    ) -> Result<VerbsServer, TransportError> {
        if access.region_len() != region.len() {
            return Err(TransportError::Region(format!(
                "access table covers {} bytes but the region has {}",
                access.region_len(),
                region.len()
            )));
        }
        let dev = Device::open(&config.device)?;
        let len = usize::try_from(region.len())
            .map_err(|_| TransportError::Region("region larger than the address space".into()))?;
        let base = region.base_ptr() as usize;
        let isolation = choose_isolation(&dev, config.memory_windows);
        // With memory windows the region itself allows no remote access: only windows,
        // bound per grant, reach it.
        let access_flags = match isolation {
            Isolation::MemoryWindows => AccessFlags::LocalWrite | AccessFlags::MemoryWindowBind,
            Isolation::RegionKey { .. } => {
                AccessFlags::LocalWrite
                    | AccessFlags::RemoteWrite
                    | AccessFlags::RemoteRead
                    | AccessFlags::RemoteAtomic
            }
        };
        // SAFETY: `base..base + len` is the region's mapping, which stays mapped while the
        // `Arc<Region>` kept in `Shared` lives; `Shared` declares `mr` before it, so the
        // memory region is deregistered before that `Arc` is released. Remote access only
        // ever reaches the region through the device, as the region's own contract allows.
        let mr =
            unsafe { dev.pd.reg_mr(base, len, access_flags) }.map_err(|e| VerbsError::Call {
                what: "registering the region (ibv_reg_mr)",
                source: io_of(e),
                hint:
                    "; raise the locked-memory limit (ulimit -l unlimited, LimitMEMLOCK=infinity)",
            })?;
        let listener = TcpListener::bind(addr).map_err(|e| TransportError::Connect {
            addr: addr.to_string(),
            source: e,
        })?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        match &isolation {
            Isolation::MemoryWindows if dev.info.name.starts_with("rxe") => tracing::warn!(
                device = %dev.info.name,
                max_mw = dev.info.max_mw,
                %local_addr,
                "verbs endpoint up with type-2 memory windows per grant; note: Soft-RoCE (rxe) \
                 enforces a window's validity, key, queue pair and access rights but not its \
                 bounds (it checks the address against the whole region), so block bounds \
                 are checked by the client library on rxe"
            ),
            Isolation::MemoryWindows => tracing::info!(
                device = %dev.info.name,
                port = dev.info.port,
                gid_index = dev.info.gid_index,
                gid = %dev.info.gid,
                mtu = dev.info.mtu,
                max_mw = dev.info.max_mw,
                %local_addr,
                "verbs endpoint up; one memory region over the whole region, no remote access \
                 through it; each grant is a type-2 memory window bound to its block"
            ),
            Isolation::RegionKey { reason } => tracing::warn!(
                device = %dev.info.name,
                port = dev.info.port,
                gid_index = dev.info.gid_index,
                gid = %dev.info.gid,
                mtu = dev.info.mtu,
                %local_addr,
                %reason,
                "verbs endpoint up WITHOUT memory windows: clients use the region's rkey, so \
                 grants are checked by the client library only (trusted mode, like shm)"
            ),
        }
        let windows = isolation == Isolation::MemoryWindows;
        let accept_template = Accept {
            qp: Default::default(),
            rkey: if windows { 0 } else { mr.rkey() },
            flags: if windows {
                wire::FLAG_MEMORY_WINDOWS
            } else {
                0
            },
            base: base as u64,
            region_len: region.len(),
            block_size: access.block_size(),
            max_op_bytes: config.max_op_bytes.min(access.block_size()).max(1),
        };
        let shared = Arc::new(Shared {
            windows: Mutex::new(HashMap::new()),
            mr,
            dev,
            accept_template,
            _region: region,
            access: access.clone(),
            isolation,
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            max_connections: config.max_connections.max(1),
        });
        let listener_id = windows.then(|| {
            let weak = Arc::downgrade(&shared);
            access.subscribe(Arc::new(move |block| {
                if let Some(s) = weak.upgrade() {
                    s.revoke(block);
                }
            }))
        });
        let s = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("verbs-accept".into())
            .spawn(move || accept_loop(listener, s));
        let acceptor = match acceptor {
            Ok(a) => a,
            Err(e) => {
                if let Some(id) = listener_id {
                    access.unsubscribe(id);
                }
                return Err(e.into());
            }
        };
        Ok(VerbsServer {
            shared,
            local_addr,
            acceptor: Some(acceptor),
            listener: listener_id,
        })
    }

    /// How this endpoint enforces grants (for logs and `farpool status`).
    pub fn isolation(&self) -> &Isolation {
        &self.shared.isolation
    }

    /// The TCP address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The device in use.
    pub fn device(&self) -> &DeviceInfo {
        &self.shared.dev.info
    }

    /// Number of connected clients.
    pub fn connections(&self) -> usize {
        self.shared.conns.lock().len()
    }

    /// Stops accepting and disconnects every client (their queue pairs are destroyed).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(id) = self.listener.take() {
            self.shared.access.unsubscribe(id);
        }
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        for (_, s) in self.shared.conns.lock().drain() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        // Each connection thread destroys its windows and queue pair, then leaves the
        // map: wait for that (bounded), so that no client is served once this returns.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !self.shared.windows.lock().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for VerbsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for VerbsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsServer")
            .field("local_addr", &self.local_addr)
            .field("device", &self.shared.dev.info)
            .field("isolation", &self.shared.isolation)
            .finish()
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_nodelay(true);
                if shared.conns.lock().len() >= shared.max_connections {
                    let mut s = stream;
                    let _ = wire::write_refusal(
                        &mut s,
                        "too many connections; raise the memory node's verbs max_connections",
                    );
                    continue;
                }
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                match stream.try_clone() {
                    Ok(c) => {
                        shared.conns.lock().insert(id, c);
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "cannot track verbs connection");
                        continue;
                    }
                }
                let state = Arc::new(Mutex::new(ConnState::default()));
                shared.windows.lock().insert(id, state.clone());
                let s = shared.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("verbs-conn".into())
                        .spawn(move || {
                            serve(stream, peer, &s, &state);
                            state.lock().reset();
                            s.windows.lock().remove(&id);
                            s.conns.lock().remove(&id);
                        });
                if let Err(e) = spawned {
                    tracing::warn!(%peer, error = %e, "cannot start a verbs connection thread");
                    shared.windows.lock().remove(&id);
                    shared.conns.lock().remove(&id);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!(error = %e, "verbs accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Picks memory windows when they are wanted and the device has type-2 ones (one can be
/// allocated), else the region rkey, saying why.
fn choose_isolation(dev: &Device, wanted: bool) -> Isolation {
    if !wanted {
        return Isolation::RegionKey {
            reason: "memory windows turned off in the configuration".into(),
        };
    }
    if dev.info.max_mw == 0 || !dev.info.mw_type2 {
        return Isolation::RegionKey {
            reason: format!(
                "device {} has no type-2 memory windows (max_mw {}, type 2A/2B capability {})",
                dev.info.name, dev.info.max_mw, dev.info.mw_type2
            ),
        };
    }
    match Window::alloc(&dev.pd) {
        Ok(_probe) => Isolation::MemoryWindows,
        Err(e) => Isolation::RegionKey {
            reason: format!(
                "device {} reports memory windows but allocating one failed: {e}",
                dev.info.name
            ),
        },
    }
}

/// Serves one side-channel connection: a connect request (re)creates the queue pair, a
/// window request binds (or checks) a memory window through it.
fn serve(stream: TcpStream, peer: SocketAddr, shared: &Shared, state: &Mutex<ConnState>) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut writer = stream;
    // `state` holds the live queue pair, its completion queue and windows; replaced on
    // every connect request, destroyed (by the caller) when the client goes away.
    loop {
        let req = match wire::read_message(&mut reader) {
            Ok(Some(Message::Connect(r))) => r,
            Ok(Some(Message::Window(w))) => {
                let reply = shared.window(state, &w);
                if wire::write_window_reply(&mut writer, &reply).is_err() {
                    break;
                }
                continue;
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "verbs side channel closed");
                break;
            }
        };
        let mut st = state.lock();
        st.reset();
        let dev = &shared.dev;
        let result = (|| {
            // Room for the memory node's own work requests (window binds and
            // invalidations, one at a time).
            let cq = dev.create_cq(16)?;
            let mut qp = dev.create_qp(&cq, 8, 0, false)?;
            let psn = random_psn();
            dev.connect_qp(&mut qp, psn, &req.qp)?;
            let info = dev.local_info(&qp, psn);
            Ok::<_, VerbsError>((cq, qp, info))
        })();
        match result {
            Ok((cq, qp, info)) => {
                st.qp = Some(qp);
                st.cq = Some(cq);
                drop(st);
                let accept = Accept {
                    qp: info,
                    ..shared.accept_template
                };
                if wire::write_accept(&mut writer, &accept).is_err() {
                    break;
                }
                tracing::debug!(%peer, qpn = info.qpn, remote_qpn = req.qp.qpn, "verbs queue pair connected");
            }
            Err(e) => {
                drop(st);
                tracing::warn!(%peer, error = %e, "cannot set up a queue pair for a client");
                if wire::write_refusal(&mut writer, &e.to_string()).is_err() {
                    break;
                }
            }
        }
    }
}
