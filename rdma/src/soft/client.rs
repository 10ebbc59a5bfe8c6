//! The client side of the soft transport: a small pool of pipelined TCP connections.

use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};

use super::frame::{
    decode_error, decode_response_header, decode_server_hello, encode_client_hello, FrameError,
    RequestHeader, MAX_ERROR_PAYLOAD, REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN, SERVER_HELLO_LEN,
    STATUS_OK,
};
use crate::error::{Error, OpError, TransportError};
use crate::op::{finish_batch, Op, OpCode, OpKind, OpStatus};
use crate::transport::{Transport, TransportKind};

/// Receive buffer per connection.
const RECV_BUF: usize = 128 * 1024;
/// Most request bytes outstanding (sent, not yet answered) on a connection, unless a
/// single operation is larger. Kept well under the socket buffers (client send plus
/// server receive), so the client can always finish writing a window even while the
/// server is blocked sending replies: the two sides cannot deadlock.
const WINDOW_REQUEST_BYTES: usize = 64 * 1024;
/// Most response bytes outstanding on a connection, unless a single operation is larger.
const WINDOW_RESPONSE_BYTES: usize = 256 * 1024;
/// WRITE payloads up to this size are copied next to their header (one iovec); larger
/// ones are sent from the caller's buffer.
const INLINE_PAYLOAD: usize = 512;
/// iovecs per `writev` call.
const IOV_MAX: usize = 64;

/// Configuration of a [`SoftTransport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftClientConfig {
    /// Most TCP connections to the memory node (opened lazily, one per concurrently
    /// executing batch). Default 8.
    pub max_connections: usize,
    /// Timeout for establishing a connection and exchanging the preamble. Default 5 s.
    pub connect_timeout: Duration,
    /// Longest a data-path read or write on an established connection may block
    /// without progress (socket read and write timeouts). When it passes, the
    /// connection is dropped from the pool, the batch's unanswered operations complete
    /// as [`OpError::Aborted`] and the call fails with [`TransportError::Io`] of kind
    /// [`io::ErrorKind::TimedOut`]. `None` waits forever on a memory node that hangs
    /// without closing. Must not be zero. Default 30 s.
    pub io_timeout: Option<Duration>,
}

impl Default for SoftClientConfig {
    fn default() -> Self {
        Self {
            max_connections: 8,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// One-sided operations on a remote memory node over TCP.
///
/// Each [`Transport::execute`] call takes one idle connection from a small pool (opening
/// another, up to `max_connections`, when all are busy) and pipelines the whole batch on
/// it: requests go out with vectored writes in windows, responses are matched to
/// operations by id. A connection that fails is dropped from the pool; the batch's
/// unanswered operations complete as [`OpError::Aborted`] and the call returns
/// [`Error::Transport`]; so does one whose memory node stops answering for
/// [`SoftClientConfig::io_timeout`]. The next call opens a fresh connection.
pub struct SoftTransport {
    addr: String,
    addrs: Vec<SocketAddr>,
    config: SoftClientConfig,
    max_op_bytes: u32,
    slots: Box<[Mutex<Option<Conn>>]>,
    next_wait: AtomicUsize,
}

impl SoftTransport {
    /// Connects to the memory node at `addr` (`host:port`) with the default
    /// configuration.
    pub fn connect(addr: &str) -> Result<SoftTransport, TransportError> {
        Self::connect_with(addr, SoftClientConfig::default())
    }

    /// Connects to the memory node at `addr`. One connection is opened (and its preamble
    /// checked) right away; the others lazily.
    pub fn connect_with(
        addr: &str,
        config: SoftClientConfig,
    ) -> Result<SoftTransport, TransportError> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|source| TransportError::Connect {
                addr: addr.to_string(),
                source,
            })?
            .collect();
        if addrs.is_empty() {
            return Err(TransportError::Connect {
                addr: addr.to_string(),
                source: io::Error::new(io::ErrorKind::NotFound, "address resolved to nothing"),
            });
        }
        let slots_n = config.max_connections.max(1);
        let (first, max_op_bytes) = Conn::open(addr, &addrs, &config)?;
        let slots: Box<[Mutex<Option<Conn>>]> = (0..slots_n).map(|_| Mutex::new(None)).collect();
        *slots[0].lock() = Some(first);
        Ok(SoftTransport {
            addr: addr.to_string(),
            addrs,
            config,
            max_op_bytes,
            slots,
            next_wait: AtomicUsize::new(0),
        })
    }

    /// The address this transport connects to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Connections currently open (idle or busy; busy ones are counted as open).
    pub fn open_connections(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.try_lock().map_or(true, |g| g.is_some()))
            .count()
    }

    /// A slot holding a connected connection, locked for this batch.
    fn acquire(&self) -> Result<MutexGuard<'_, Option<Conn>>, TransportError> {
        let mut empty: Option<MutexGuard<'_, Option<Conn>>> = None;
        for slot in self.slots.iter() {
            if let Some(g) = slot.try_lock() {
                if g.is_some() {
                    return Ok(g);
                }
                if empty.is_none() {
                    empty = Some(g);
                }
            }
        }
        let mut g = match empty {
            Some(g) => g,
            None => {
                let i = self.next_wait.fetch_add(1, Ordering::Relaxed) % self.slots.len();
                self.slots[i].lock()
            }
        };
        if g.is_none() {
            let (conn, _) = Conn::open(&self.addr, &self.addrs, &self.config)?;
            *g = Some(conn);
        }
        Ok(g)
    }
}

impl Transport for SoftTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Soft
    }

    fn execute(&self, ops: &mut [Op<'_>]) -> Result<(), Error> {
        let max = u64::from(self.max_op_bytes);
        let mut to_send = 0usize;
        for op in ops.iter_mut() {
            let len = op.remote_len();
            op.status = if len > max {
                OpStatus::Failed(OpError::TooLarge { len, max })
            } else {
                to_send += 1;
                OpStatus::Pending
            };
            op.result = 0;
        }
        if to_send == 0 {
            return finish_batch(ops);
        }
        let mut slot = match self.acquire() {
            Ok(s) => s,
            Err(e) => {
                let _ = finish_batch(ops);
                return Err(Error::Transport(e));
            }
        };
        let Some(conn) = slot.as_mut() else {
            // `acquire` always fills the slot; treat the impossible as a closed connection.
            let _ = finish_batch(ops);
            return Err(Error::Transport(TransportError::Closed));
        };
        match conn.run_batch(ops) {
            Ok(()) => {
                drop(slot);
                finish_batch(ops)
            }
            Err(e) => {
                *slot = None;
                drop(slot);
                tracing::debug!(addr = %self.addr, error = %e, "soft connection dropped");
                let _ = finish_batch(ops);
                Err(Error::Transport(e))
            }
        }
    }

    fn max_op_bytes(&self) -> usize {
        self.max_op_bytes as usize
    }
}

impl std::fmt::Debug for SoftTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftTransport")
            .field("addr", &self.addr)
            .field("config", &self.config)
            .field("max_op_bytes", &self.max_op_bytes)
            .finish()
    }
}

/// A piece of the outgoing byte stream.
#[derive(Clone, Copy)]
enum Seg {
    /// `wbuf[start..end]`: headers and inline payloads.
    Buf { start: usize, end: usize },
    /// The payload of the WRITE at this op index.
    Payload(usize),
}

/// Receive state: between frames, or inside a response's payload.
#[derive(Clone, Copy)]
enum Rx {
    Header,
    Payload {
        idx: usize,
        status: u8,
        len: usize,
        got: usize,
    },
}

/// One connection and its reusable buffers.
struct Conn {
    stream: TcpStream,
    /// The stream's read and write timeout, for error messages.
    io_timeout: Option<Duration>,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    wbuf: Vec<u8>,
    segs: Vec<Seg>,
    scratch: [u8; MAX_ERROR_PAYLOAD],
    rx: Rx,
}

/// Bytes the request for `op` occupies on the wire.
fn request_bytes(op: &Op<'_>) -> usize {
    REQUEST_HEADER_LEN
        + match &op.kind {
            OpKind::Read(_) => 0,
            OpKind::Write(d) => d.len(),
            OpKind::CompareSwap { .. } => 16,
            OpKind::FetchAdd { .. } => 8,
        }
}

/// Most bytes the response to `op` may occupy (success or error).
fn response_bytes(op: &Op<'_>) -> usize {
    let ok = match &op.kind {
        OpKind::Read(b) => b.len(),
        OpKind::Write(_) => 0,
        OpKind::CompareSwap { .. } | OpKind::FetchAdd { .. } => 8,
    };
    RESPONSE_HEADER_LEN + ok.max(MAX_ERROR_PAYLOAD)
}

fn protocol(e: impl std::fmt::Display) -> TransportError {
    TransportError::Protocol(e.to_string())
}

/// Converts a socket error on an established connection; a read or write timeout
/// (reported as `WouldBlock` on Unix, `TimedOut` elsewhere) becomes `TimedOut`.
fn io_error(e: io::Error, timeout: Option<Duration>) -> TransportError {
    match (e.kind(), timeout) {
        (io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut, Some(t)) => {
            TransportError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the memory node made no progress for {t:?} (io_timeout); connection dropped"
                ),
            ))
        }
        _ => TransportError::Io(e),
    }
}

impl Conn {
    /// Dials `addrs` in turn and exchanges preambles; returns the connection and the
    /// server's `max_op_bytes`.
    fn open(
        name: &str,
        addrs: &[SocketAddr],
        config: &SoftClientConfig,
    ) -> Result<(Conn, u32), TransportError> {
        let mut last: Option<io::Error> = None;
        for a in addrs {
            match TcpStream::connect_timeout(a, config.connect_timeout) {
                Ok(stream) => return Self::handshake(name, stream, config),
                Err(e) => last = Some(e),
            }
        }
        Err(TransportError::Connect {
            addr: name.to_string(),
            source: last.unwrap_or_else(|| io::Error::from(io::ErrorKind::NotFound)),
        })
    }

    fn handshake(
        name: &str,
        mut stream: TcpStream,
        config: &SoftClientConfig,
    ) -> Result<(Conn, u32), TransportError> {
        let timeout = config.connect_timeout;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(&encode_client_hello())?;
        let mut hello = [0u8; SERVER_HELLO_LEN];
        if let Err(e) = stream.read_exact(&mut hello) {
            return Err(match e.kind() {
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
                    TransportError::Protocol(format!(
                        "{name} closed the connection during the preamble: it refused the \
                         connection (connection limit?) or is not a farpool memory node"
                    ))
                }
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    TransportError::Protocol(format!(
                        "{name} sent no preamble within {timeout:?}: not a farpool memory node?"
                    ))
                }
                _ => TransportError::Io(e),
            });
        }
        let max_op_bytes = decode_server_hello(&hello)
            .map_err(|e| TransportError::Protocol(format!("{name}: {e}")))?;
        if max_op_bytes == 0 {
            return Err(TransportError::Protocol(format!(
                "{name} announced max_op_bytes 0"
            )));
        }
        stream.set_read_timeout(config.io_timeout)?;
        stream.set_write_timeout(config.io_timeout)?;
        Ok((
            Conn {
                stream,
                io_timeout: config.io_timeout,
                rbuf: vec![0u8; RECV_BUF].into_boxed_slice(),
                rstart: 0,
                rend: 0,
                wbuf: Vec::with_capacity(WINDOW_REQUEST_BYTES),
                segs: Vec::with_capacity(IOV_MAX),
                scratch: [0; MAX_ERROR_PAYLOAD],
                rx: Rx::Header,
            },
            max_op_bytes,
        ))
    }

    /// Sends every pending operation and receives every answer, in a sliding window.
    fn run_batch(&mut self, ops: &mut [Op<'_>]) -> Result<(), TransportError> {
        self.rstart = 0;
        self.rend = 0;
        self.rx = Rx::Header;
        let mut next = 0usize; // next op to consider sending
        let mut outstanding = 0usize; // sent, not answered
        let mut req_out = 0usize;
        let mut resp_out = 0usize;
        loop {
            // Fill the window.
            self.wbuf.clear();
            self.segs.clear();
            while next < ops.len() {
                let op = &ops[next];
                if op.status != OpStatus::Pending {
                    next += 1;
                    continue;
                }
                let (rq, rs) = (request_bytes(op), response_bytes(op));
                if outstanding > 0
                    && (req_out + rq > WINDOW_REQUEST_BYTES
                        || resp_out + rs > WINDOW_RESPONSE_BYTES)
                {
                    break;
                }
                self.push_request(next, op);
                outstanding += 1;
                req_out += rq;
                resp_out += rs;
                next += 1;
            }
            if !self.segs.is_empty() {
                self.send(ops)?;
            }
            if outstanding == 0 {
                return Ok(());
            }
            // Receive at least one chunk and complete whatever it answers.
            self.receive(ops, next)?;
            while let Some(idx) = self.complete_next(ops, next)? {
                let op = &ops[idx];
                outstanding -= 1;
                req_out -= request_bytes(op);
                resp_out -= response_bytes(op);
            }
        }
    }

    /// Appends op `idx`'s request to the outgoing segments.
    fn push_request(&mut self, idx: usize, op: &Op<'_>) {
        let start = self.wbuf.len();
        let head = RequestHeader {
            op: op.code() as u8,
            len: op.remote_len() as u32,
            id: idx as u64,
            addr: op.remote.addr,
            rkey: op.remote.rkey,
        };
        self.wbuf.extend_from_slice(&head.encode());
        let mut external = false;
        match &op.kind {
            OpKind::Read(_) => {}
            OpKind::Write(d) if d.len() <= INLINE_PAYLOAD => self.wbuf.extend_from_slice(d),
            OpKind::Write(_) => external = true,
            OpKind::CompareSwap { expected, new } => {
                self.wbuf.extend_from_slice(&expected.to_le_bytes());
                self.wbuf.extend_from_slice(&new.to_le_bytes());
            }
            OpKind::FetchAdd { add } => self.wbuf.extend_from_slice(&add.to_le_bytes()),
        }
        let end = self.wbuf.len();
        match self.segs.last_mut() {
            Some(Seg::Buf { end: last_end, .. }) if *last_end == start => *last_end = end,
            _ => self.segs.push(Seg::Buf { start, end }),
        }
        if external {
            self.segs.push(Seg::Payload(idx));
        }
    }

    /// Writes all segments with `writev`, resuming after partial writes.
    fn send(&mut self, ops: &[Op<'_>]) -> Result<(), TransportError> {
        let wbuf = &self.wbuf;
        let bytes = |s: &Seg| -> &[u8] {
            match *s {
                Seg::Buf { start, end } => &wbuf[start..end],
                Seg::Payload(i) => match &ops[i].kind {
                    OpKind::Write(d) => d,
                    _ => &[],
                },
            }
        };
        let mut seg = 0usize;
        let mut off = 0usize;
        while seg < self.segs.len() {
            let mut iov = [IoSlice::new(&[]); IOV_MAX];
            let mut n = 0;
            for (k, s) in self.segs[seg..].iter().take(IOV_MAX).enumerate() {
                let b = bytes(s);
                iov[k] = IoSlice::new(if k == 0 { &b[off..] } else { b });
                n = k + 1;
            }
            let mut written = match self.stream.write_vectored(&iov[..n]) {
                Ok(0) => return Err(TransportError::Closed),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error(e, self.io_timeout)),
            };
            while written > 0 && seg < self.segs.len() {
                let rest = bytes(&self.segs[seg]).len() - off;
                if written >= rest {
                    written -= rest;
                    seg += 1;
                    off = 0;
                } else {
                    off += written;
                    written = 0;
                }
            }
        }
        Ok(())
    }

    /// One blocking read: into the pending READ's buffer when a large payload is due and
    /// nothing is buffered, else into the receive buffer.
    fn receive(&mut self, ops: &mut [Op<'_>], sent: usize) -> Result<(), TransportError> {
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
            if let Rx::Payload {
                idx,
                status: STATUS_OK,
                len,
                got,
            } = self.rx
            {
                if len - got >= RECV_BUF / 2 && idx < sent {
                    if let OpKind::Read(buf) = &mut ops[idx].kind {
                        let n = read_some(&mut self.stream, &mut buf[got..len], self.io_timeout)?;
                        self.rx = Rx::Payload {
                            idx,
                            status: STATUS_OK,
                            len,
                            got: got + n,
                        };
                        return Ok(());
                    }
                }
            }
        } else if self.rstart > 0 {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        let n = read_some(
            &mut self.stream,
            &mut self.rbuf[self.rend..],
            self.io_timeout,
        )?;
        self.rend += n;
        Ok(())
    }

    /// Advances the receive state over buffered bytes; returns the index of the next
    /// operation whose response is now complete, `None` when more bytes are needed.
    fn complete_next(
        &mut self,
        ops: &mut [Op<'_>],
        sent: usize,
    ) -> Result<Option<usize>, TransportError> {
        loop {
            match self.rx {
                Rx::Header => {
                    let Some(h) = decode_response_header(&self.rbuf[self.rstart..self.rend])
                        .map_err(protocol)?
                    else {
                        return Ok(None);
                    };
                    self.rstart += RESPONSE_HEADER_LEN;
                    let idx = usize::try_from(h.id).unwrap_or(usize::MAX);
                    if idx >= sent || ops[idx].status != OpStatus::Pending {
                        return Err(protocol(format!(
                            "response for id {} which is not outstanding",
                            h.id
                        )));
                    }
                    let len = h.len as usize;
                    if h.status == STATUS_OK {
                        let expected = match &ops[idx].kind {
                            OpKind::Read(b) => b.len(),
                            OpKind::Write(_) => 0,
                            _ => 8,
                        };
                        if len != expected {
                            return Err(protocol(FrameError::PayloadLen {
                                status: STATUS_OK,
                                len: h.len,
                                expected: expected as u32,
                            }));
                        }
                    }
                    self.rx = Rx::Payload {
                        idx,
                        status: h.status,
                        len,
                        got: 0,
                    };
                }
                Rx::Payload {
                    idx,
                    status,
                    len,
                    got,
                } => {
                    let take = (self.rend - self.rstart).min(len - got);
                    let src = &self.rbuf[self.rstart..self.rstart + take];
                    let op = &mut ops[idx];
                    match (&mut op.kind, status) {
                        (OpKind::Read(buf), STATUS_OK) => buf[got..got + take].copy_from_slice(src),
                        _ => self.scratch[got..got + take].copy_from_slice(src),
                    }
                    self.rstart += take;
                    let got = got + take;
                    if got < len {
                        self.rx = Rx::Payload {
                            idx,
                            status,
                            len,
                            got,
                        };
                        return Ok(None);
                    }
                    self.rx = Rx::Header;
                    if status == STATUS_OK {
                        if matches!(op.code(), OpCode::CompareSwap | OpCode::FetchAdd) {
                            let mut w = [0u8; 8];
                            w.copy_from_slice(&self.scratch[..8]);
                            op.result = u64::from_le_bytes(w);
                        }
                        op.status = OpStatus::Done;
                    } else {
                        let e = decode_error(status, &self.scratch[..len]).map_err(protocol)?;
                        op.status = OpStatus::Failed(e);
                    }
                    return Ok(Some(idx));
                }
            }
        }
    }
}

/// `read` that retries on EINTR, reports EOF as [`TransportError::Closed`] and a
/// timeout (the stream's read timeout is `timeout`) as `TimedOut`.
fn read_some(
    stream: &mut TcpStream,
    buf: &mut [u8],
    timeout: Option<Duration>,
) -> Result<usize, TransportError> {
    loop {
        match stream.read(buf) {
            Ok(0) => return Err(TransportError::Closed),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(e, timeout)),
        }
    }
}
