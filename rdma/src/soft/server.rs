//! The memory node's soft "NIC": applies one-sided operations arriving over TCP.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use super::frame::{
    decode_client_hello, decode_request_header, encode_error, encode_server_hello, FrameError,
    RequestHeader, ResponseHeader, CLIENT_HELLO_LEN, MAX_ERROR_PAYLOAD, REQUEST_HEADER_LEN,
    RESPONSE_HEADER_LEN, STATUS_OK,
};
use crate::access::AccessTable;
use crate::error::{OpError, TransportError};
use crate::op::{OpCode, RKey};
use crate::region::Region;

/// Size of each connection's input buffer.
const IN_BUF: usize = 64 * 1024;
/// Size of each connection's output buffer.
const OUT_BUF: usize = 128 * 1024;
/// Stack size of connection threads (their buffers live on the heap).
const CONN_STACK: usize = 256 * 1024;
/// Most time and bytes spent draining a connection closed for a protocol violation.
const LINGER_TIME: Duration = Duration::from_millis(100);
const LINGER_BYTES: usize = 1 << 20;
/// How long a new connection may take to send its preamble.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Configuration of a [`SoftServer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftServerConfig {
    /// Largest READ or WRITE accepted in one operation (announced to clients). Default
    /// 1 MiB.
    pub max_op_bytes: u32,
    /// Connections served at once; further connections are closed right after accept.
    /// Default 1024. Each connection costs 192 KiB of buffers plus a thread (256 KiB
    /// stack, mostly untouched): 64 connections stay around 12 MiB.
    pub max_connections: usize,
    /// How operations' keys are checked. Default [`GrantCheck::Keys`].
    pub grants: GrantCheck,
}

/// How a [`SoftServer`] checks the key an operation presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GrantCheck {
    /// The key must equal one of the block's keys ([`AccessTable::check`]): whoever
    /// holds a key holds it until the block's epoch changes.
    #[default]
    Keys,
    /// The key must be a capability MAC ([`crate::access::grant_mac`]) of one of the
    /// block's keys over the grant's expiry, and the grant must not have expired
    /// ([`AccessTable::check_grant`]). What farpool memory nodes use.
    Capabilities,
}

impl Default for SoftServerConfig {
    fn default() -> Self {
        Self {
            max_op_bytes: 1 << 20,
            max_connections: 1024,
            grants: GrantCheck::Keys,
        }
    }
}

/// A snapshot of a [`SoftServer`]'s counters.
///
/// Operation counters are folded in once per batch of requests read from a connection,
/// so they may lag by one batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SoftServerStats {
    /// Connections being served now.
    pub connections: u64,
    /// Connections accepted since start (including refused ones).
    pub accepted: u64,
    /// READ operations answered (successful or not).
    pub ops_read: u64,
    /// WRITE operations answered.
    pub ops_write: u64,
    /// Compare-and-swap operations answered.
    pub ops_cas: u64,
    /// Fetch-and-add operations answered.
    pub ops_faa: u64,
    /// Bytes returned by successful READs.
    pub bytes_read: u64,
    /// Bytes stored by successful WRITEs.
    pub bytes_written: u64,
    /// Operations answered with an error status.
    pub op_errors: u64,
    /// Connections closed for violating the protocol (bad preamble, malformed or
    /// truncated frames, oversized writes, unknown operations).
    pub protocol_errors: u64,
    /// Operations refused because their key matched no grant of the block (wrong,
    /// forged or guessed key; [`OpError::AccessDenied`]). Included in `op_errors`.
    pub refused_bad_key: u64,
    /// Operations refused because their grant names an older epoch of the block
    /// ([`OpError::StaleEpoch`]). Included in `op_errors`.
    pub refused_stale_epoch: u64,
    /// Operations refused because they reach outside the region or the granted block
    /// ([`OpError::OutOfBounds`]). Included in `op_errors`.
    pub refused_out_of_bounds: u64,
}

/// Per-connection counters, folded into the shared ones once per batch.
#[derive(Default)]
struct LocalStats {
    ops_read: u64,
    ops_write: u64,
    ops_cas: u64,
    ops_faa: u64,
    bytes_read: u64,
    bytes_written: u64,
    op_errors: u64,
    refused_bad_key: u64,
    refused_stale_epoch: u64,
    refused_out_of_bounds: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    accepted: AtomicU64,
    ops_read: AtomicU64,
    ops_write: AtomicU64,
    ops_cas: AtomicU64,
    ops_faa: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    op_errors: AtomicU64,
    protocol_errors: AtomicU64,
    refused_bad_key: AtomicU64,
    refused_stale_epoch: AtomicU64,
    refused_out_of_bounds: AtomicU64,
}

impl Counters {
    fn fold(&self, l: &mut LocalStats) {
        let add = |c: &AtomicU64, v: &mut u64| {
            if *v != 0 {
                c.fetch_add(*v, Ordering::Relaxed);
                *v = 0;
            }
        };
        add(&self.ops_read, &mut l.ops_read);
        add(&self.ops_write, &mut l.ops_write);
        add(&self.ops_cas, &mut l.ops_cas);
        add(&self.ops_faa, &mut l.ops_faa);
        add(&self.bytes_read, &mut l.bytes_read);
        add(&self.bytes_written, &mut l.bytes_written);
        add(&self.op_errors, &mut l.op_errors);
        add(&self.refused_bad_key, &mut l.refused_bad_key);
        add(&self.refused_stale_epoch, &mut l.refused_stale_epoch);
        add(&self.refused_out_of_bounds, &mut l.refused_out_of_bounds);
    }
}

/// A live connection, as seen by `shutdown`.
struct ConnEntry {
    stream: TcpStream,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    region: Arc<Region>,
    access: Arc<AccessTable>,
    config: SoftServerConfig,
    counters: Counters,
    stopping: AtomicBool,
    conns: Mutex<HashMap<u64, ConnEntry>>,
}

/// The memory node's TCP engine: serves one-sided operations on a [`Region`], checking
/// each against an [`AccessTable`].
///
/// One thread per connection with blocking sockets; every request read in one `read`
/// call is applied in order and all their responses go out in one `write`, so clients
/// can pipeline many operations per connection. Per-connection memory is bounded (a 64 KiB
/// input and a 128 KiB output buffer) whatever the operation sizes: large WRITE payloads are streamed into
/// the region, large READ replies streamed out of it. A misbehaving connection is closed
/// without affecting the others.
pub struct SoftServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

impl SoftServer {
    /// Binds `addr` (e.g. `"0.0.0.0:7070"`, or port 0 for any) and starts serving
    /// `region` under `access`.
    ///
    /// `access` must not cover more than `region`.
    pub fn bind(
        addr: &str,
        region: Arc<Region>,
        access: Arc<AccessTable>,
        config: SoftServerConfig,
    ) -> Result<SoftServer, TransportError> {
        if access.region_len() > region.len() {
            return Err(TransportError::Region(format!(
                "access table covers {} bytes but the region has only {}",
                access.region_len(),
                region.len()
            )));
        }
        if config.max_op_bytes == 0 || config.max_connections == 0 {
            return Err(TransportError::Region(
                "soft server max_op_bytes and max_connections must be nonzero".into(),
            ));
        }
        let listener = TcpListener::bind(addr).map_err(|source| TransportError::Connect {
            addr: addr.to_string(),
            source,
        })?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            region,
            access,
            config,
            counters: Counters::default(),
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("farpool-soft-accept".into())
                .spawn(move || accept_loop(listener, shared))?
        };
        tracing::info!(%local_addr, max_op_bytes = config.max_op_bytes, "soft transport server listening");
        Ok(SoftServer {
            local_addr,
            shared,
            acceptor: Mutex::new(Some(acceptor)),
        })
    }

    /// The address the server listens on (with the actual port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SoftServerStats {
        let c = &self.shared.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SoftServerStats {
            connections: g(&c.connections),
            accepted: g(&c.accepted),
            ops_read: g(&c.ops_read),
            ops_write: g(&c.ops_write),
            ops_cas: g(&c.ops_cas),
            ops_faa: g(&c.ops_faa),
            bytes_read: g(&c.bytes_read),
            bytes_written: g(&c.bytes_written),
            op_errors: g(&c.op_errors),
            protocol_errors: g(&c.protocol_errors),
            refused_bad_key: g(&c.refused_bad_key),
            refused_stale_epoch: g(&c.refused_stale_epoch),
            refused_out_of_bounds: g(&c.refused_out_of_bounds),
        }
    }

    /// Stops gracefully: stops accepting, stops reading new requests on every
    /// connection, lets each connection apply and answer the requests it already read,
    /// and waits up to `grace` for them; connections still busy then are closed as by
    /// [`SoftServer::shutdown`]. Every operation applied is therefore answered (unless
    /// its client stopped reading for longer than `grace`). After it returns no
    /// operation touches the region any more.
    pub fn drain(&self, grace: Duration) {
        if !self.stop_accepting() {
            return;
        }
        let conns: Vec<ConnEntry> = self.shared.conns.lock().drain().map(|(_, c)| c).collect();
        for c in &conns {
            let _ = c.stream.shutdown(Shutdown::Read);
        }
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline
            && conns
                .iter()
                .any(|c| c.thread.as_ref().is_some_and(|t| !t.is_finished()))
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut forced = 0usize;
        for c in &conns {
            if c.thread.as_ref().is_some_and(|t| !t.is_finished()) {
                forced += 1;
                let _ = c.stream.shutdown(Shutdown::Both);
            }
        }
        for c in conns {
            if let Some(t) = c.thread {
                let _ = t.join();
            }
        }
        tracing::info!(local_addr = %self.local_addr, forced, "soft transport server drained");
    }

    /// Sets the stopping flag and stops the acceptor; false if already stopping.
    fn stop_accepting(&self) -> bool {
        if self.shared.stopping.swap(true, Ordering::SeqCst) {
            return false;
        }
        // Wake the acceptor, blocked in accept(), with a throwaway connection.
        let wake = match self.local_addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.local_addr.port())
            }
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), self.local_addr.port())
            }
            _ => self.local_addr,
        };
        let woke = TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok();
        if let Some(acceptor) = self.acceptor.lock().take() {
            if woke {
                let _ = acceptor.join();
            } else {
                tracing::warn!("cannot wake the soft server's accept thread; leaving it detached");
            }
        }
        true
    }

    /// Stops accepting, closes every connection and waits for their threads. After it
    /// returns no operation touches the region any more. Idempotent; also run on drop.
    pub fn shutdown(&self) {
        if !self.stop_accepting() {
            return;
        }
        let conns: Vec<ConnEntry> = self.shared.conns.lock().drain().map(|(_, c)| c).collect();
        for c in &conns {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        for c in conns {
            if let Some(t) = c.thread {
                let _ = t.join();
            }
        }
        tracing::info!(local_addr = %self.local_addr, "soft transport server stopped");
    }
}

impl Drop for SoftServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for SoftServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftServer")
            .field("local_addr", &self.local_addr)
            .field("config", &self.shared.config)
            .finish()
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_id: u64 = 0;
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                if shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                // Typically EMFILE/ENFILE or a connection reset before accept: back off
                // briefly instead of spinning.
                tracing::warn!(error = %e, "soft server accept failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let current = shared.counters.connections.load(Ordering::Relaxed);
        if current >= shared.config.max_connections as u64 {
            tracing::warn!(%peer, limit = shared.config.max_connections,
                "refusing soft transport connection: connection limit reached");
            drop(stream);
            continue;
        }
        let control = match stream.try_clone() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot clone accepted socket; dropping it");
                continue;
            }
        };
        next_id += 1;
        let id = next_id;
        shared.counters.connections.fetch_add(1, Ordering::Relaxed);
        shared.conns.lock().insert(
            id,
            ConnEntry {
                stream: control,
                thread: None,
            },
        );
        let worker_shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("farpool-soft-{id}"))
            .stack_size(CONN_STACK)
            .spawn(move || {
                serve(&worker_shared, stream, peer);
                // Count the connection gone before leaving the table: `shutdown` joins
                // the threads it finds in the table, so once it returns the count is
                // final either way.
                worker_shared
                    .counters
                    .connections
                    .fetch_sub(1, Ordering::Relaxed);
                worker_shared.conns.lock().remove(&id);
            });
        match spawned {
            Ok(handle) => {
                if let Some(entry) = shared.conns.lock().get_mut(&id) {
                    entry.thread = Some(handle);
                }
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot spawn a connection thread; dropping connection");
                shared.conns.lock().remove(&id);
                shared.counters.connections.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// Why a connection ended.
enum End {
    /// The peer closed cleanly between frames, or the server is shutting down.
    Clean,
    /// The peer violated the protocol.
    Protocol(String),
    /// Socket error.
    Io(io::Error),
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        End::Io(e)
    }
}

fn serve(shared: &Shared, stream: TcpStream, peer: SocketAddr) {
    let mut conn = Conn {
        shared,
        stream,
        inb: vec![0u8; IN_BUF].into_boxed_slice(),
        start: 0,
        end: 0,
        out: vec![0u8; OUT_BUF].into_boxed_slice(),
        out_len: 0,
        stats: LocalStats::default(),
        now: 0,
    };
    let end = conn.run();
    shared.counters.fold(&mut conn.stats);
    match end {
        End::Clean => tracing::debug!(%peer, "soft connection closed"),
        End::Io(e) => {
            if !shared.stopping.load(Ordering::Relaxed) {
                tracing::debug!(%peer, error = %e, "soft connection failed");
            }
        }
        End::Protocol(why) => {
            tracing::warn!(%peer, reason = %why, "closing soft connection: protocol violation");
        }
    }
}

struct Conn<'a> {
    shared: &'a Shared,
    stream: TcpStream,
    inb: Box<[u8]>,
    start: usize,
    end: usize,
    out: Box<[u8]>,
    out_len: usize,
    stats: LocalStats,
    /// The clock grants are checked against, read once per batch of requests.
    now: u32,
}

impl Conn<'_> {
    fn run(&mut self) -> End {
        let end = match self.handshake() {
            Ok(()) => self.serve_frames(),
            Err(e) => e,
        };
        // Best effort: deliver replies queued before a protocol violation (e.g. the
        // TooLarge status of an oversized WRITE) before closing.
        if let End::Protocol(_) = end {
            self.shared
                .counters
                .protocol_errors
                .fetch_add(1, Ordering::Relaxed);
            if self.flush().is_ok() {
                self.linger();
            }
        }
        end
    }

    /// Before closing on a protocol violation: stop sending, then read and discard what
    /// the peer still sends for a short while, so the close does not turn into a reset
    /// that could destroy the final status before the peer reads it.
    fn linger(&mut self) {
        if self.stream.shutdown(Shutdown::Write).is_err()
            || self.stream.set_read_timeout(Some(LINGER_TIME)).is_err()
        {
            return;
        }
        let mut discarded = 0usize;
        while discarded < LINGER_BYTES {
            match read_some(&mut self.stream, &mut self.inb) {
                Ok(0) | Err(_) => return,
                Ok(n) => discarded += n,
            }
        }
    }

    fn handshake(&mut self) -> Result<(), End> {
        self.stream.set_nodelay(true)?;
        self.stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
        let mut hello = [0u8; CLIENT_HELLO_LEN];
        if let Err(e) = self.stream.read_exact(&mut hello) {
            return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
                End::Protocol("connection closed before the preamble".into())
            } else {
                End::Io(e)
            });
        }
        let reply = encode_server_hello(self.shared.config.max_op_bytes);
        match decode_client_hello(&hello) {
            Ok(_) => {}
            Err(e @ FrameError::Version(_)) => {
                // Tell the client which version we speak, then close.
                let _ = self.stream.write_all(&reply);
                return Err(End::Protocol(e.to_string()));
            }
            Err(e) => return Err(End::Protocol(e.to_string())),
        }
        self.stream.write_all(&reply)?;
        self.stream.set_read_timeout(None)?;
        Ok(())
    }

    fn serve_frames(&mut self) -> End {
        loop {
            if let Err(e) = self.process_buffered() {
                return e;
            }
            // Count before replying, so a client that saw its replies sees them counted.
            self.shared.counters.fold(&mut self.stats);
            if let Err(e) = self.flush() {
                return e.into();
            }
            // Move the partial frame (if any) to the front and read more.
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.start > 0 {
                self.inb.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match read_some(&mut self.stream, &mut self.inb[self.end..]) {
                Ok(0) => {
                    return if self.start == self.end {
                        End::Clean
                    } else {
                        End::Protocol(format!(
                            "connection closed inside a frame ({} bytes pending)",
                            self.end - self.start
                        ))
                    };
                }
                Ok(n) => self.end += n,
                Err(e) => {
                    return if self.shared.stopping.load(Ordering::Relaxed) {
                        End::Clean
                    } else {
                        End::Io(e)
                    }
                }
            }
        }
    }

    /// Checks one operation's range and key the way the server is configured to.
    #[inline]
    fn check(&self, addr: u64, len: u64, rkey: RKey, write: bool) -> Result<(), OpError> {
        match self.shared.config.grants {
            GrantCheck::Keys => self.shared.access.check(addr, len, rkey, write),
            GrantCheck::Capabilities => self
                .shared
                .access
                .check_grant(addr, len, rkey, write, self.now),
        }
    }

    /// Applies every complete request in the input buffer (streaming large WRITEs).
    fn process_buffered(&mut self) -> Result<(), End> {
        let max = self.shared.config.max_op_bytes;
        if self.shared.config.grants == GrantCheck::Capabilities {
            self.now = crate::access::unix_now_secs();
        }
        loop {
            let avail = self.end - self.start;
            let h = match decode_request_header(&self.inb[self.start..self.end]) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(()),
                Err(e) => return Err(End::Protocol(format!("malformed request: {e}"))),
            };
            let Some(code) = h.code() else {
                self.start += REQUEST_HEADER_LEN;
                self.stats.op_errors += 1;
                self.reply_err(h.id, &OpError::UnknownOp(h.op))?;
                // The frame's length is unknown, so the stream cannot be resynchronised.
                return Err(End::Protocol(format!("unknown operation code {}", h.op)));
            };
            match code {
                OpCode::Read => {
                    self.start += REQUEST_HEADER_LEN;
                    self.stats.ops_read += 1;
                    let res = if h.len > max {
                        Err(too_large(h.len, max))
                    } else {
                        self.check(h.addr, u64::from(h.len), h.rkey, false)
                    };
                    match res {
                        Ok(()) => self.reply_read(&h)?,
                        Err(e) => {
                            self.stats.op_errors += 1;
                            self.reply_err(h.id, &e)?;
                        }
                    }
                }
                OpCode::Write => {
                    self.stats.ops_write += 1;
                    if h.len > max {
                        self.start += REQUEST_HEADER_LEN;
                        self.stats.op_errors += 1;
                        self.reply_err(h.id, &too_large(h.len, max))?;
                        // Skipping up to 4 GiB of payload is not worth it: close.
                        return Err(End::Protocol(format!(
                            "WRITE of {} bytes exceeds max_op_bytes {max}",
                            h.len
                        )));
                    }
                    let len = h.len as usize;
                    if avail >= REQUEST_HEADER_LEN + len {
                        let body = self.start + REQUEST_HEADER_LEN;
                        let res =
                            self.check(h.addr, u64::from(h.len), h.rkey, true)
                                .and_then(|()| {
                                    self.shared
                                        .region
                                        .write(h.addr, &self.inb[body..body + len])
                                });
                        self.start = body + len;
                        self.finish_write(h.id, len, res)?;
                    } else if REQUEST_HEADER_LEN + len <= self.inb.len() {
                        // Fits the buffer once the rest arrives.
                        return Ok(());
                    } else {
                        self.start += REQUEST_HEADER_LEN;
                        self.stream_write(&h)?;
                    }
                }
                OpCode::CompareSwap | OpCode::FetchAdd => {
                    let payload = if code == OpCode::CompareSwap { 16 } else { 8 };
                    if avail < REQUEST_HEADER_LEN + payload {
                        return Ok(());
                    }
                    let p = self.start + REQUEST_HEADER_LEN;
                    let w0 = le_u64(&self.inb[p..p + 8]);
                    let region = &self.shared.region;
                    let checked = self.check(h.addr, 8, h.rkey, true);
                    let res = if code == OpCode::CompareSwap {
                        self.stats.ops_cas += 1;
                        let w1 = le_u64(&self.inb[p + 8..p + 16]);
                        checked.and_then(|()| region.compare_swap(h.addr, w0, w1))
                    } else {
                        self.stats.ops_faa += 1;
                        checked.and_then(|()| region.fetch_add(h.addr, w0))
                    };
                    self.start = p + payload;
                    match res {
                        Ok(old) => self.reply(h.id, STATUS_OK, &old.to_le_bytes())?,
                        Err(e) => {
                            self.stats.op_errors += 1;
                            self.reply_err(h.id, &e)?;
                        }
                    }
                }
            }
        }
    }

    fn finish_write(&mut self, id: u64, len: usize, res: Result<(), OpError>) -> Result<(), End> {
        match res {
            Ok(()) => {
                self.stats.bytes_written += len as u64;
                self.reply(id, STATUS_OK, &[])
            }
            Err(e) => {
                self.stats.op_errors += 1;
                self.reply_err(id, &e)
            }
        }
    }

    /// A WRITE too large for the input buffer: apply it chunk by chunk as it arrives.
    /// A refused WRITE's payload is read and discarded.
    fn stream_write(&mut self, h: &RequestHeader) -> Result<(), End> {
        let len = u64::from(h.len);
        let mut res = self.check(h.addr, len, h.rkey, true);
        let mut done: u64 = 0;
        loop {
            let take = ((self.end - self.start) as u64).min(len - done) as usize;
            if res.is_ok() {
                res = self
                    .shared
                    .region
                    .write(h.addr + done, &self.inb[self.start..self.start + take]);
            }
            self.start += take;
            done += take as u64;
            if done == len {
                break;
            }
            // Nothing else is buffered: send queued replies before blocking.
            self.flush()?;
            self.start = 0;
            self.end = 0;
            match read_some(&mut self.stream, &mut self.inb)? {
                0 => {
                    return Err(End::Protocol(format!(
                        "connection closed inside a {len}-byte WRITE payload"
                    )))
                }
                n => self.end = n,
            }
        }
        self.finish_write(h.id, len as usize, res)
    }

    /// Answers a checked READ, streaming replies larger than the output buffer.
    fn reply_read(&mut self, h: &RequestHeader) -> Result<(), End> {
        let len = h.len as usize;
        let need = RESPONSE_HEADER_LEN + len;
        if need > self.out.len() - self.out_len {
            self.flush()?;
        }
        let head = ResponseHeader {
            id: h.id,
            status: STATUS_OK,
            len: h.len,
        }
        .encode();
        let region = &self.shared.region;
        if need <= self.out.len() {
            let at = self.out_len + RESPONSE_HEADER_LEN;
            if let Err(e) = region.read(h.addr, &mut self.out[at..at + len]) {
                self.stats.op_errors += 1;
                return self.reply_err(h.id, &e);
            }
            self.out[self.out_len..at].copy_from_slice(&head);
            self.out_len = at + len;
        } else {
            // Larger than the buffer: header, then the data in buffer-sized pieces.
            self.out[..RESPONSE_HEADER_LEN].copy_from_slice(&head);
            self.out_len = RESPONSE_HEADER_LEN;
            let mut done = 0usize;
            while done < len {
                let take = (self.out.len() - self.out_len).min(len - done);
                let at = self.out_len;
                region
                    .read(h.addr + done as u64, &mut self.out[at..at + take])
                    .map_err(|e| End::Protocol(format!("region read failed mid-reply: {e}")))?;
                self.out_len += take;
                done += take;
                self.flush()?;
            }
        }
        self.stats.bytes_read += len as u64;
        Ok(())
    }

    fn reply_err(&mut self, id: u64, e: &OpError) -> Result<(), End> {
        match e {
            OpError::AccessDenied => self.stats.refused_bad_key += 1,
            OpError::StaleEpoch { .. } => self.stats.refused_stale_epoch += 1,
            OpError::OutOfBounds { .. } => self.stats.refused_out_of_bounds += 1,
            _ => {}
        }
        let mut p = [0u8; MAX_ERROR_PAYLOAD];
        let (status, n) = encode_error(e, &mut p);
        self.reply(id, status, &p[..n])
    }

    fn reply(&mut self, id: u64, status: u8, payload: &[u8]) -> Result<(), End> {
        let need = RESPONSE_HEADER_LEN + payload.len();
        if need > self.out.len() - self.out_len {
            self.flush()?;
        }
        let head = ResponseHeader {
            id,
            status,
            len: payload.len() as u32,
        }
        .encode();
        let at = self.out_len;
        self.out[at..at + RESPONSE_HEADER_LEN].copy_from_slice(&head);
        self.out[at + RESPONSE_HEADER_LEN..at + need].copy_from_slice(payload);
        self.out_len += need;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.out_len > 0 {
            let n = self.out_len;
            self.out_len = 0;
            self.stream.write_all(&self.out[..n])?;
        }
        Ok(())
    }
}

fn too_large(len: u32, max: u32) -> OpError {
    OpError::TooLarge {
        len: u64::from(len),
        max: u64::from(max),
    }
}

fn le_u64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(b);
    u64::from_le_bytes(w)
}

/// `read`, retried on EINTR.
fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}
