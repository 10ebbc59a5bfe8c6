//! The client side: a [`Transport`] over one RC queue pair to a memory node.

use std::collections::HashMap;
use std::io::BufReader;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};
use sideway::ibverbs::completion::{
    GenericCompletionQueue, PollCompletionQueueError, WorkCompletionStatus,
};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::queue_pair::{
    GenericQueuePair, PostSendGuard, QueuePair, SetInlineData, SetScatterGatherEntry,
    WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;

use super::device::{io_of, random_psn, Device, DeviceConfig, DeviceInfo};
use super::wire::{self, Accept, Request, WindowReply, WindowRequest};
use crate::buf::LocalBuf;
use crate::error::{Error, OpError, TransportError, VerbsError};
use crate::op::{finish_batch, Op, OpKind, OpStatus, RKey, RemoteAddr};
use crate::transport::{Transport, TransportKind};

/// Configuration of a [`VerbsTransport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerbsClientConfig {
    /// Device, port and GID to use.
    pub device: DeviceConfig,
    /// Send-queue slots: most operations posted with one doorbell and outstanding at
    /// once (capped by the device). Default 256.
    pub send_queue: u32,
    /// WRITEs up to this many bytes are posted inline (copied into the work request, no
    /// local memory registration needed). 0 disables inline writes. Default 64.
    pub max_inline: u32,
    /// Size of the registered bounce buffer that carries operations on buffers not from
    /// [`Transport::alloc_buf`], and atomic results. Raised to at least the memory node's
    /// largest operation plus room for atomics. Default 4 MiB.
    pub bounce_bytes: usize,
    /// Queue pairs per transport (opened as concurrent batches need them): batches from
    /// several threads run on different queue pairs; more batches than queue pairs take
    /// turns. Default 4.
    pub queue_pairs: usize,
    /// Post through the extended `ibv_wr_*` API where the device offers it (else
    /// `ibv_post_send` with a linked list; both ring one doorbell per window). Default true.
    pub extended_api: bool,
    /// Timeout for the TCP side channel (connect and handshake). Default 5 s.
    pub connect_timeout: Duration,
    /// Longest wait for a window of operations to complete. When it passes, the queue
    /// pair is destroyed, the batch's unfinished operations complete as
    /// [`OpError::Aborted`] and the call fails with [`VerbsError::Timeout`]; the next
    /// call connects a new queue pair. Default 30 s.
    pub op_timeout: Duration,
}

impl Default for VerbsClientConfig {
    fn default() -> Self {
        Self {
            device: DeviceConfig::default(),
            send_queue: 256,
            max_inline: 64,
            bounce_bytes: 4 << 20,
            queue_pairs: 4,
            extended_api: true,
            connect_timeout: Duration::from_secs(5),
            op_timeout: Duration::from_secs(30),
        }
    }
}

/// A registered local buffer handed out by [`Transport::alloc_buf`].
struct Registered {
    start: usize,
    len: usize,
    lkey: u32,
    alive: Weak<MemoryRegion>,
}

/// A connected queue pair and what goes with it. Dropping it destroys the queue pair and
/// closes the side channel, which makes the memory node destroy its end.
struct Conn {
    // Drop order: queue pair before its completion queue; the bounce registration
    // before the bounce memory.
    qp: GenericQueuePair,
    cq: GenericCompletionQueue,
    bounce_mr: Arc<MemoryRegion>,
    bounce: LocalBuf,
    /// The side channel: closing it makes the memory node destroy its end; with memory
    /// windows it also carries window requests.
    side: TcpStream,
    remote: Accept,
    max_inline: u32,
    depth: usize,
    /// Whether grants are memory windows ([`wire::FLAG_MEMORY_WINDOWS`]).
    windows: bool,
    /// Windows bound for this queue pair: (block, epoch, key) to (rkey, writable).
    cache: HashMap<(u32, u32, u64), (u32, bool)>,
}

/// Most cached windows per queue pair; the cache starts over past it (the memory node
/// keeps the windows and hands them out again).
const MAX_CACHED_WINDOWS: usize = 4096;

/// Where an operation's local bytes live for the device.
#[derive(Clone, Copy)]
enum Local {
    /// Registered memory: lkey, address, length.
    Sge(u32, u64, u32),
    /// Bounce buffer at this offset.
    Bounce(usize),
    /// Inline WRITE data.
    Inline,
}

/// A client transport over RDMA verbs (RC queue pair) to one memory node.
///
/// Every batch is posted in windows of up to [`VerbsClientConfig::send_queue`]
/// operations, each window with one doorbell and one signaled completion. Concurrent
/// batches use up to [`VerbsClientConfig::queue_pairs`] queue pairs, each with its own
/// completion queue and bounce buffer. After an error completion the queue pair is
/// re-created and the batch's operations that had not executed yet are posted again.
pub struct VerbsTransport {
    addr: String,
    dev: Device,
    cfg: VerbsClientConfig,
    geometry: Accept,
    /// Queue-pair slots; `None` until needed, or after a failure.
    conns: Vec<Mutex<Option<Conn>>>,
    /// Where the next batch starts looking for a free slot.
    next_slot: AtomicUsize,
    regs: Mutex<Vec<Registered>>,
    /// Operations the device refused with a remote access error.
    access_errors: AtomicU64,
}

impl VerbsTransport {
    /// Opens the RDMA device and connects a queue pair to the memory node whose verbs
    /// side channel listens at `addr`.
    pub fn connect(addr: &str, cfg: VerbsClientConfig) -> Result<VerbsTransport, TransportError> {
        let dev = Device::open(&cfg.device)?;
        let conn = open_conn(addr, &dev, &cfg, None)?;
        Ok(VerbsTransport {
            addr: addr.to_string(),
            geometry: conn.remote,
            conns: {
                let mut first = Some(conn);
                (0..cfg.queue_pairs.max(1))
                    .map(|_| Mutex::new(first.take()))
                    .collect()
            },
            next_slot: AtomicUsize::new(0),
            regs: Mutex::new(Vec::new()),
            access_errors: AtomicU64::new(0),
            dev,
            cfg,
        })
    }

    /// Whether the memory node enforces grants with memory windows (else every block is
    /// reached with the region's rkey: trusted mode).
    pub fn memory_windows(&self) -> bool {
        self.geometry.flags & wire::FLAG_MEMORY_WINDOWS != 0
    }

    /// How many operations the RDMA device refused with a remote access error (a
    /// revoked, stale or wrong rkey) since the transport was created.
    pub fn device_access_errors(&self) -> u64 {
        self.access_errors.load(Ordering::Relaxed)
    }

    /// The rkey of the memory window the memory node bound for the grant `at` names
    /// (binding it if needed), on this transport's first queue pair; with the region
    /// rkey when the node does not use windows. For isolation checks together with
    /// [`VerbsTransport::read_with_rkey`]; build the transport with `queue_pairs: 1`, as
    /// a window is usable only through the queue pair it was bound for.
    pub fn window_rkey(&self, at: RemoteAddr, write: bool) -> Result<u32, Error> {
        let mut conn = self.conns[0].lock();
        if conn.is_none() {
            *conn = Some(open_conn(
                &self.addr,
                &self.dev,
                &self.cfg,
                Some(&self.geometry),
            )?);
        }
        let Some(c) = conn.as_mut() else {
            return Err(TransportError::Closed.into());
        };
        match c.rkey_for(at.addr, at.rkey, write)? {
            Ok(rkey) => Ok(rkey),
            Err(e) => Err(Error::Op(e)),
        }
    }

    /// READs `buf.len()` bytes at region offset `addr` with the raw `rkey`, bypassing
    /// grants (only the bounds of the region are checked locally), on the first queue
    /// pair: what a client that forged or kept an rkey could try. The device decides;
    /// a refusal is [`OpError::AccessDenied`].
    pub fn read_with_rkey(&self, rkey: u32, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
        let len = buf.len() as u64;
        if addr
            .checked_add(len)
            .map_or(true, |end| end > self.geometry.region_len)
            || len > self.geometry.max_op_bytes
        {
            return Err(Error::Op(OpError::OutOfBounds {
                addr,
                len,
                start: 0,
                end: self.geometry.region_len,
            }));
        }
        let mut ops = [Op::read(RemoteAddr::new(addr, RKey::default()), buf)];
        let mut conn = self.conns[0].lock();
        if conn.is_none() {
            *conn = Some(open_conn(
                &self.addr,
                &self.dev,
                &self.cfg,
                Some(&self.geometry),
            )?);
        }
        let Some(c) = conn.as_mut() else {
            return Err(TransportError::Closed.into());
        };
        match c.run(self, &mut ops, self.cfg.op_timeout, Some(rkey)) {
            Ok(false) => {}
            Ok(true) => *conn = None,
            Err(e) => {
                *conn = None;
                let _ = finish_batch(&mut ops);
                return Err(e.into());
            }
        }
        drop(conn);
        match finish_batch(&mut ops) {
            Ok(_) => Ok(()),
            Err(Error::Partial { error, .. }) => Err(Error::Op(error)),
            Err(e) => Err(e),
        }
    }

    /// The local device in use.
    pub fn device(&self) -> &DeviceInfo {
        &self.dev.info
    }

    /// Checks what can be checked locally: size, bounds of the one block, alignment.
    fn check(&self, op: &Op<'_>) -> Result<(), OpError> {
        let g = &self.geometry;
        let len = op.remote_len();
        let max = g.max_op_bytes;
        if len > max {
            return Err(OpError::TooLarge { len, max });
        }
        let addr = op.remote.addr;
        crate::access::block_bounds(addr, len, g.region_len, g.block_size)?;
        if matches!(
            op.kind,
            OpKind::CompareSwap { .. } | OpKind::FetchAdd { .. }
        ) && addr % 8 != 0
        {
            return Err(OpError::Misaligned { addr });
        }
        Ok(())
    }

    /// A queue-pair slot for one batch: a free open one, else a free empty one (the
    /// batch opens it), else the next one in turn, waiting for it.
    fn slot(&self) -> MutexGuard<'_, Option<Conn>> {
        let n = self.conns.len();
        let start = self.next_slot.fetch_add(1, Ordering::Relaxed);
        for want_open in [true, false] {
            for i in 0..n {
                if let Some(g) = self.conns[(start + i) % n].try_lock() {
                    if g.is_some() || !want_open {
                        return g;
                    }
                }
            }
        }
        self.conns[start % n].lock()
    }

    /// The registration covering `ptr..ptr+len`, if the bytes are from `alloc_buf`.
    fn lookup(&self, ptr: usize, len: usize) -> Option<u32> {
        let regs = self.regs.lock();
        regs.iter()
            .find(|r| ptr >= r.start && ptr + len <= r.start + r.len && r.alive.strong_count() > 0)
            .map(|r| r.lkey)
    }
}

fn open_conn(
    addr: &str,
    dev: &Device,
    cfg: &VerbsClientConfig,
    expect: Option<&Accept>,
) -> Result<Conn, TransportError> {
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| TransportError::Connect {
            addr: addr.to_string(),
            source: e,
        })?
        .next()
        .ok_or_else(|| TransportError::Connect {
            addr: addr.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        })?;
    let stream = TcpStream::connect_timeout(&sock, cfg.connect_timeout).map_err(|e| {
        TransportError::Connect {
            addr: addr.to_string(),
            source: e,
        }
    })?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(cfg.connect_timeout))?;
    stream.set_write_timeout(Some(cfg.connect_timeout))?;

    let depth = cfg.send_queue.clamp(1, dev.max_qp_wr);
    let cq = dev.create_cq(depth * 2)?;
    let mut inline = cfg.max_inline;
    let ext = cfg.extended_api;
    let mut qp = match dev.create_qp(&cq, depth, inline, ext) {
        Ok(qp) => qp,
        Err(_) if inline > 0 => {
            inline = 0;
            dev.create_qp(&cq, depth, 0, ext)?
        }
        Err(e) => return Err(e.into()),
    };
    let psn = random_psn();
    let mut w = stream.try_clone()?;
    wire::write_request(
        &mut w,
        &Request {
            qp: dev.local_info(&qp, psn),
        },
    )?;
    let handshake = |detail: String| VerbsError::Handshake {
        peer: addr.to_string(),
        detail,
    };
    let remote = wire::read_response(&mut BufReader::new(stream.try_clone()?))
        .map_err(|e| handshake(e.to_string()))?;
    if let Some(old) = expect {
        if (old.region_len, old.block_size, old.max_op_bytes, old.flags)
            != (
                remote.region_len,
                remote.block_size,
                remote.max_op_bytes,
                remote.flags,
            )
        {
            return Err(handshake("the memory node's region changed; reconnect".into()).into());
        }
    }
    dev.connect_qp(&mut qp, psn, &remote.qp)?;

    let bounce_len = cfg
        .bounce_bytes
        .max(remote.max_op_bytes as usize + 8 * depth as usize);
    let mut bounce = LocalBuf::new(bounce_len);
    let ptr = bounce.as_mut_ptr() as usize;
    // SAFETY: `ptr..ptr + bounce_len` is the heap memory of `bounce`, which `Conn` owns
    // and declares after `bounce_mr`, so the registration is dropped before the memory.
    let bounce_mr =
        unsafe { dev.pd.reg_mr(ptr, bounce_len, AccessFlags::LocalWrite) }.map_err(|e| {
            VerbsError::Call {
                what: "registering the bounce buffer",
                source: io_of(e),
                hint: "; raise the locked-memory limit (ulimit -l)",
            }
        })?;
    // Window requests are answered at once; a memory node that stops answering is gone.
    stream.set_read_timeout(Some(cfg.connect_timeout.max(Duration::from_secs(10))))?;
    Ok(Conn {
        qp,
        cq,
        bounce_mr,
        bounce,
        side: stream,
        windows: remote.flags & wire::FLAG_MEMORY_WINDOWS != 0,
        remote,
        max_inline: inline,
        depth: depth as usize,
        cache: HashMap::new(),
    })
}

/// How a window ended.
enum WindowEnd {
    /// Every posted operation completed.
    Done,
    /// The operation at this position of the window failed with this completion status;
    /// the queue pair is dead.
    Failed(usize, u32),
}

/// Maps an error completion status: `Ok` with the operation's own error when the
/// failure is the operation's (the responder or the local device refused it, and nothing
/// after it in the window executed), `Err` with a description when the queue pair or the
/// path failed and the effect of the operation and of those after it is unknown.
fn status_error(status: u32) -> Result<OpError, String> {
    use WorkCompletionStatus as S;
    if status == S::RemoteAccessError as u32 {
        return Ok(OpError::AccessDenied);
    }
    // Named without `WorkCompletionStatus::from`, which panics on codes it does not know.
    let op_level = [
        (S::LocalLengthError, "local length error"),
        (S::LocalQueuePairOperationError, "local QP operation error"),
        (
            S::LocalProtectionError,
            "local protection error (unregistered local buffer)",
        ),
        (S::LocalAccessError, "local access error"),
        (
            S::RemoteInvalidRequestError,
            "remote invalid request (length or opcode the responder rejects)",
        ),
        (S::RemoteOperationError, "remote operation error"),
    ];
    if let Some((_, name)) = op_level.iter().find(|(s, _)| *s as u32 == status) {
        return Ok(OpError::Device(format!(
            "{name} (work completion status {status})"
        )));
    }
    let connection_level = [
        (
            S::WorkRequestFlushedError,
            "flushed (the queue pair was in error)",
        ),
        (S::BadResponseError, "bad response"),
        (
            S::RetryCounterExceededError,
            "transport retry counter exceeded (the memory node or the path to it is gone)",
        ),
        (
            S::ResponderNotReadyRetryCounterExceededError,
            "RNR retry counter exceeded",
        ),
        (S::RemoteAbortedError, "remote aborted"),
        (S::FatalError, "fatal device error"),
        (S::ResponseTimeoutError, "response timeout"),
        (S::GeneralError, "general error"),
    ];
    let name = connection_level
        .iter()
        .find(|(s, _)| *s as u32 == status)
        .map_or("unknown status", |(_, n)| n);
    Err(format!("{name} (work completion status {status})"))
}

impl Conn {
    /// Asks the memory node for a window over `block` for the grant `(epoch, key)`, or
    /// only whether that grant is valid (`check_only`). The outer error is the side
    /// channel's; the inner one is the grant's.
    fn request_window(
        &mut self,
        block: u32,
        rkey: RKey,
        check_only: bool,
    ) -> Result<Result<(u32, bool), OpError>, TransportError> {
        let req = WindowRequest {
            block,
            epoch: rkey.epoch,
            key: rkey.key,
            flags: if check_only {
                wire::WINDOW_CHECK_ONLY
            } else {
                0
            },
        };
        wire::write_window_request(&mut self.side, &req)?;
        let reply = wire::read_window_reply(&mut self.side).map_err(|e| match e {
            wire::WireError::Io(io) => TransportError::Io(io),
            other => TransportError::Protocol(other.to_string()),
        })?;
        Ok(match reply {
            WindowReply::Bound { rkey, flags } => Ok((rkey, flags & wire::WINDOW_WRITABLE != 0)),
            WindowReply::Stale { current } => Err(OpError::StaleEpoch {
                granted: rkey.epoch,
                current,
            }),
            WindowReply::Denied => Err(OpError::AccessDenied),
            WindowReply::Failed(msg) => Err(OpError::Device(format!(
                "the memory node could not bind a memory window: {msg}"
            ))),
        })
    }

    /// The rkey for an operation at region offset `addr` under the grant `rkey`: the
    /// region's, or the grant's memory window (asked for on first use).
    fn rkey_for(
        &mut self,
        addr: u64,
        rkey: RKey,
        write: bool,
    ) -> Result<Result<u32, OpError>, TransportError> {
        if !self.windows {
            return Ok(Ok(self.remote.rkey));
        }
        let block = (addr / self.remote.block_size) as u32;
        let k = (block, rkey.epoch, rkey.key);
        let (window, writable) = match self.cache.get(&k) {
            Some(&v) => v,
            None => match self.request_window(block, rkey, false)? {
                Ok(v) => {
                    if self.cache.len() >= MAX_CACHED_WINDOWS {
                        self.cache.clear();
                    }
                    self.cache.insert(k, v);
                    v
                }
                Err(e) => return Ok(Err(e)),
            },
        };
        // The window has no remote write access: the device would refuse the operation
        // (and tear down the queue pair); say so without posting it.
        if write && !writable {
            return Ok(Err(OpError::ReadOnly));
        }
        Ok(Ok(window))
    }

    /// Why the device refused an operation with a remote access error: with memory
    /// windows, the memory node checks the grant again (stale epoch, wrong key);
    /// otherwise, or when the grant is still valid, [`OpError::AccessDenied`].
    fn explain(&mut self, op: &Op<'_>) -> Result<OpError, TransportError> {
        if !self.windows {
            return Ok(OpError::AccessDenied);
        }
        let block = (op.remote.addr / self.remote.block_size) as u32;
        let rkey = op.remote.rkey;
        self.cache.remove(&(block, rkey.epoch, rkey.key));
        Ok(match self.request_window(block, rkey, true)? {
            Ok(_) => OpError::AccessDenied,
            Err(e) => e,
        })
    }

    /// Posts `ops[..]` that are pending, window by window. Returns `Ok(true)` when the
    /// queue pair died on an error completion (the failed operation has its status; the
    /// rest stay pending for a new queue pair), `Ok(false)` when every operation is done.
    /// `raw_rkey` replaces every operation's grant (for isolation checks).
    fn run(
        &mut self,
        t: &VerbsTransport,
        ops: &mut [Op<'_>],
        timeout: Duration,
        raw_rkey: Option<u32>,
    ) -> Result<bool, TransportError> {
        let mut next = 0;
        let bounce_len = self.bounce.len();
        let mut window: Vec<(usize, Local, u32)> = Vec::with_capacity(self.depth);
        while next < ops.len() {
            // Plan a window: where each operation's local bytes live.
            window.clear();
            let mut used = 0usize;
            while next < ops.len() && window.len() < self.depth {
                if ops[next].status != OpStatus::Pending {
                    next += 1;
                    continue;
                }
                let rkey = match raw_rkey {
                    Some(k) => k,
                    None => {
                        let op = &ops[next];
                        let write = !matches!(op.kind, OpKind::Read(_));
                        match self.rkey_for(op.remote.addr, op.remote.rkey, write)? {
                            Ok(k) => k,
                            Err(e) => {
                                ops[next].status = OpStatus::Failed(e);
                                next += 1;
                                continue;
                            }
                        }
                    }
                };
                let op = &mut ops[next];
                let local = match &mut op.kind {
                    OpKind::Read([]) => None,
                    OpKind::Write([]) => None,
                    OpKind::Read(buf) => {
                        let (p, n) = (buf.as_mut_ptr() as usize, buf.len());
                        match t.lookup(p, n) {
                            Some(lkey) => Some(Local::Sge(lkey, p as u64, n as u32)),
                            None if used + n <= bounce_len => {
                                used += n;
                                Some(Local::Bounce(used - n))
                            }
                            None => break,
                        }
                    }
                    OpKind::Write(data) => {
                        let (p, n) = (data.as_ptr() as usize, data.len());
                        if n <= self.max_inline as usize {
                            Some(Local::Inline)
                        } else if let Some(lkey) = t.lookup(p, n) {
                            Some(Local::Sge(lkey, p as u64, n as u32))
                        } else if used + n <= bounce_len {
                            self.bounce[used..used + n].copy_from_slice(data);
                            used += n;
                            Some(Local::Bounce(used - n))
                        } else {
                            break;
                        }
                    }
                    OpKind::CompareSwap { .. } | OpKind::FetchAdd { .. } => {
                        let at = used.next_multiple_of(8);
                        if at + 8 > bounce_len {
                            break;
                        }
                        used = at + 8;
                        Some(Local::Bounce(at))
                    }
                };
                match local {
                    None => op.status = OpStatus::Done,
                    Some(l) => window.push((next, l, rkey)),
                }
                next += 1;
            }
            if window.is_empty() {
                continue;
            }
            match self.post_and_wait(ops, &window, timeout)? {
                WindowEnd::Done => self.finish(ops, &window),
                WindowEnd::Failed(pos, status) => {
                    // RC completes in order: everything before `pos` is done.
                    self.finish(ops, &window[..pos]);
                    match status_error(status) {
                        Ok(mut err) => {
                            if err == OpError::AccessDenied {
                                t.access_errors.fetch_add(1, Ordering::Relaxed);
                                if raw_rkey.is_none() {
                                    err = self.explain(&ops[window[pos].0])?;
                                }
                            }
                            // Only this operation failed; the rest stay pending and go
                            // out again on a new queue pair.
                            ops[window[pos].0].status = OpStatus::Failed(err);
                            return Ok(true);
                        }
                        // The effect of this operation and the later ones is unknown:
                        // they complete as aborted.
                        Err(what) => return Err(VerbsError::QueuePair(what).into()),
                    }
                }
            }
        }
        Ok(false)
    }

    /// Posts one window with one doorbell (only its last work request signaled) and
    /// polls until it completes or an operation fails.
    fn post_and_wait(
        &mut self,
        ops: &[Op<'_>],
        window: &[(usize, Local, u32)],
        timeout: Duration,
    ) -> Result<WindowEnd, TransportError> {
        let base = self.remote.base;
        let bounce_lkey = self.bounce_mr.lkey();
        let bounce_addr = self.bounce.as_ptr() as u64;
        let mut guard = self.qp.start_post_send();
        for (i, &(index, local, rkey)) in window.iter().enumerate() {
            let op = &ops[index];
            let mut flags = if i + 1 == window.len() {
                WorkRequestFlags::Signaled
            } else {
                WorkRequestFlags::none()
            };
            if matches!(local, Local::Inline) {
                flags |= WorkRequestFlags::Inline;
            }
            let (lkey, laddr, llen) = match local {
                Local::Sge(k, a, n) => (k, a, n),
                Local::Bounce(off) => (
                    bounce_lkey,
                    bounce_addr + off as u64,
                    op.remote_len() as u32,
                ),
                Local::Inline => (0, 0, 0),
            };
            let raddr = base + op.remote.addr;
            let wr = guard.construct_wr(index as u64, flags);
            match &op.kind {
                OpKind::Read(_) => {
                    // SAFETY: `laddr..laddr + llen` is either the caller's buffer, which
                    // `ops` borrows mutably until this call returns (the queue pair is
                    // destroyed before returning if the window does not complete), or
                    // the bounce buffer owned by `self`; both are registered under `lkey`.
                    unsafe { wr.setup_read(rkey, raddr).setup_sge(lkey, laddr, llen) }
                }
                OpKind::Write(data) => {
                    let h = wr.setup_write(rkey, raddr);
                    if matches!(local, Local::Inline) {
                        h.setup_inline_data(data);
                    } else {
                        // SAFETY: as for READ; the device only reads these bytes.
                        unsafe { h.setup_sge(lkey, laddr, llen) }
                    }
                }
                OpKind::CompareSwap { expected, new } => {
                    // SAFETY: 8 bytes of the bounce buffer owned by `self`, registered
                    // under `lkey` and 8-byte aligned.
                    unsafe {
                        wr.setup_atomic_compare_swap(rkey, raddr, *expected, *new)
                            .setup_sge(lkey, laddr, 8)
                    }
                }
                OpKind::FetchAdd { add } => {
                    // SAFETY: as for compare-and-swap.
                    unsafe {
                        wr.setup_atomic_fetch_add(rkey, raddr, *add)
                            .setup_sge(lkey, laddr, 8)
                    }
                }
            }
        }
        guard.post().map_err(|e| VerbsError::Call {
            what: "posting work requests",
            source: io_of(e),
            hint: "",
        })?;

        let last = window[window.len() - 1].0 as u64;
        // Busy-poll first, without reading the clock (on some hosts, VMs in particular,
        // a clock read is a slow system call); later yield now and then and check the
        // deadline, which counts from the first clock read.
        const BUSY_POLLS: u64 = 4096;
        const CLOCK_EVERY: u64 = 256;
        let mut deadline: Option<Instant> = None;
        let mut spins = 0u64;
        let mut seen = 0usize;
        loop {
            let mut failed = None;
            let mut done = false;
            match self.cq.start_poll() {
                Ok(poller) => {
                    for wc in poller {
                        let status = wc.status();
                        if status != WorkCompletionStatus::Success as u32 {
                            if failed.is_none() {
                                let pos = window
                                    .iter()
                                    .position(|&(i, _, _)| i as u64 == wc.wr_id())
                                    .unwrap_or(0);
                                failed = Some((pos, status));
                            }
                        } else if wc.wr_id() == last {
                            done = true;
                        } else {
                            seen += 1;
                        }
                    }
                }
                Err(PollCompletionQueueError::CompletionQueueEmpty) => {}
                Err(e) => {
                    return Err(VerbsError::Call {
                        what: "polling the completion queue",
                        source: io_of(e),
                        hint: "",
                    }
                    .into())
                }
            }
            if let Some((pos, err)) = failed {
                return Ok(WindowEnd::Failed(pos, err));
            }
            if done {
                return Ok(WindowEnd::Done);
            }
            spins += 1;
            if spins < BUSY_POLLS || spins % 16 != 0 {
                std::hint::spin_loop();
                continue;
            }
            std::thread::yield_now();
            if spins % CLOCK_EVERY == 0 {
                let now = Instant::now();
                if now > *deadline.get_or_insert(now + timeout) {
                    return Err(VerbsError::Timeout {
                        waited: timeout,
                        window: window.len(),
                        first: window[0].0,
                        last: window[window.len() - 1].0,
                        completions: seen,
                    }
                    .into());
                }
            }
        }
    }

    /// Marks the window's operations done, copying READ data and atomic results out of
    /// the bounce buffer.
    fn finish(&self, ops: &mut [Op<'_>], window: &[(usize, Local, u32)]) {
        for &(index, local, _) in window {
            let op = &mut ops[index];
            if let Local::Bounce(off) = local {
                match &mut op.kind {
                    OpKind::Read(buf) => {
                        let n = buf.len();
                        buf.copy_from_slice(&self.bounce[off..off + n]);
                    }
                    OpKind::CompareSwap { .. } | OpKind::FetchAdd { .. } => {
                        let mut w = [0u8; 8];
                        w.copy_from_slice(&self.bounce[off..off + 8]);
                        op.result = u64::from_ne_bytes(w);
                    }
                    OpKind::Write(_) => {}
                }
            }
            op.status = OpStatus::Done;
        }
    }
}

impl Transport for VerbsTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Verbs
    }

    fn execute(&self, ops: &mut [Op<'_>]) -> Result<(), Error> {
        for op in ops.iter_mut() {
            if let Err(e) = self.check(op) {
                op.status = OpStatus::Failed(e);
            }
        }
        let mut conn = self.slot();
        // Each round either completes every pending operation or fails one of them, so
        // this ends after at most `ops.len() + 1` rounds.
        loop {
            if !ops.iter().any(|o| o.status == OpStatus::Pending) {
                break;
            }
            if conn.is_none() {
                match open_conn(&self.addr, &self.dev, &self.cfg, Some(&self.geometry)) {
                    Ok(c) => *conn = Some(c),
                    Err(e) => {
                        let _ = finish_batch(ops);
                        return Err(e.into());
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            match c.run(self, ops, self.cfg.op_timeout, None) {
                Ok(false) => {}
                Ok(true) => {
                    tracing::debug!(addr = %self.addr, "error completion; re-creating the queue pair");
                    *conn = None;
                }
                Err(e) => {
                    // Destroy the queue pair before the caller's buffers go away.
                    *conn = None;
                    let _ = finish_batch(ops);
                    return Err(e.into());
                }
            }
        }
        drop(conn);
        finish_batch(ops)
    }

    fn max_op_bytes(&self) -> usize {
        self.geometry.max_op_bytes as usize
    }

    fn alloc_buf(&self, len: usize) -> Result<LocalBuf, TransportError> {
        let mut buf = LocalBuf::new(len);
        if len == 0 {
            return Ok(buf);
        }
        let ptr = buf.as_mut_ptr() as usize;
        // SAFETY: `ptr..ptr + len` is the heap memory of `buf`; the registration is
        // stored in `buf`, which drops it before freeing that memory, and the transport
        // only holds a weak reference that it checks before every use.
        let mr = unsafe { self.dev.pd.reg_mr(ptr, len, AccessFlags::LocalWrite) }.map_err(|e| {
            VerbsError::Call {
                what: "registering a local buffer",
                source: io_of(e),
                hint: "; raise the locked-memory limit (ulimit -l) or reuse buffers",
            }
        })?;
        let mut regs = self.regs.lock();
        regs.retain(|r| r.alive.strong_count() > 0);
        regs.push(Registered {
            start: ptr,
            len,
            lkey: mr.lkey(),
            alive: Arc::downgrade(&mr),
        });
        drop(regs);
        buf.set_registration(mr.lkey(), Box::new(mr));
        Ok(buf)
    }
}

impl std::fmt::Debug for VerbsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsTransport")
            .field("addr", &self.addr)
            .field("device", &self.dev.info)
            .finish()
    }
}
