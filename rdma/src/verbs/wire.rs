//! The TCP side channel that connects queue pairs: fixed little-endian messages.
//!
//! The client opens a TCP connection to the memory node's verbs port and sends a
//! [`Request`] (36 bytes): magic `FPV1`, then its [`QpInfo`]. The memory node creates a
//! queue pair, connects it, and answers (see [`read_response`]): magic `FPV1`, a u32 status
//! (0: success), then either the [`Accept`] fields (72 bytes) or a u32 length and a UTF-8
//! error message. The client may send further requests on the same connection (to
//! re-create a queue pair after an error); each one replaces the previous queue pair.
//! Closing the TCP connection destroys the memory node's queue pair.
//!
//! When the accept's flags say [`FLAG_MEMORY_WINDOWS`], the region's memory region has
//! no remote access and its rkey is 0: the client asks for a memory window per block
//! with a [`WindowRequest`] (24 bytes: magic `FPW1`, block, epoch, key, flags) and gets a
//! [`WindowReply`] (magic `FPW1`, a u32 status, then 8 bytes: the window's rkey and
//! flags, or the block's current epoch; status 3 carries a u32 length and a message).

use std::io::{self, Read, Write};

/// Magic at the start of every queue-pair message.
pub const MAGIC: [u8; 4] = *b"FPV1";
/// Magic at the start of every memory-window message.
pub const WINDOW_MAGIC: [u8; 4] = *b"FPW1";
/// Encoded length of a [`WindowRequest`], magic included.
pub const WINDOW_REQUEST_LEN: usize = 24;
/// [`Accept::flags`] bit: grants are type-2 memory windows bound per block (ask with a
/// [`WindowRequest`]); without it, every block is reached with [`Accept::rkey`].
pub const FLAG_MEMORY_WINDOWS: u32 = 1;
/// [`WindowRequest::flags`] bit: only check the grant, bind nothing (to explain an
/// access error the device reported).
pub const WINDOW_CHECK_ONLY: u32 = 1;
/// [`WindowReply::Bound`] flags bit: the window allows remote writes and atomics.
pub const WINDOW_WRITABLE: u32 = 1;
/// Encoded length of a [`QpInfo`].
pub const QP_INFO_LEN: usize = 32;
/// Encoded length of a [`Request`].
pub const REQUEST_LEN: usize = 4 + QP_INFO_LEN;
/// Encoded length of an accepting response after magic and status.
pub const ACCEPT_LEN: usize = QP_INFO_LEN + 40;
/// Longest error message a response may carry.
pub const MAX_ERROR_LEN: usize = 4096;

/// One side's queue-pair connection information.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QpInfo {
    /// Queue pair number.
    pub qpn: u32,
    /// Initial packet sequence number (24 bits).
    pub psn: u32,
    /// Port LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Active MTU as the `ibv_mtu` code (1 = 256 ... 5 = 4096).
    pub mtu: u8,
    /// Most outstanding READ/atomic requests this side can handle.
    pub rd_atomic: u8,
    /// GID (RoCE: the IP address in IPv6 form).
    pub gid: [u8; 16],
}

impl QpInfo {
    /// Encodes into exactly [`QP_INFO_LEN`] bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.qpn.to_le_bytes());
        out.extend_from_slice(&self.psn.to_le_bytes());
        out.extend_from_slice(&self.lid.to_le_bytes());
        out.push(self.mtu);
        out.push(self.rd_atomic);
        out.extend_from_slice(&self.gid);
        out.extend_from_slice(&[0; 4]);
    }

    /// Decodes from the first [`QP_INFO_LEN`] bytes of `b`.
    pub fn decode(b: &[u8; QP_INFO_LEN]) -> QpInfo {
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[12..28]);
        QpInfo {
            qpn: u32_at(b, 0),
            psn: u32_at(b, 4),
            lid: u16::from_le_bytes([b[8], b[9]]),
            mtu: b[10],
            rd_atomic: b[11],
            gid,
        }
    }
}

/// A client's request for a connected queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The client's queue pair.
    pub qp: QpInfo,
}

/// The memory node's answer to a successful [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accept {
    /// The memory node's queue pair.
    pub qp: QpInfo,
    /// rkey of the region's memory region (0 when [`FLAG_MEMORY_WINDOWS`] is set).
    pub rkey: u32,
    /// [`FLAG_MEMORY_WINDOWS`] or 0.
    pub flags: u32,
    /// Virtual address of region offset 0 on the memory node.
    pub base: u64,
    /// Region length in bytes.
    pub region_len: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// Largest READ or WRITE the memory node accepts in one operation.
    pub max_op_bytes: u64,
}

/// Why a side-channel message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed or closed.
    #[error("side channel I/O: {0}")]
    Io(#[from] io::Error),
    /// The peer does not speak this protocol.
    #[error("bad magic {0:02x?}: the peer is not a farpool verbs endpoint (wrong port?)")]
    BadMagic([u8; 4]),
    /// The peer refused the request.
    #[error("memory node refused the queue pair: {0}")]
    Refused(String),
    /// A field is out of range.
    #[error("malformed message: {0}")]
    Malformed(String),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn read_magic(r: &mut impl Read) -> Result<(), WireError> {
    let mut m = [0u8; 4];
    r.read_exact(&mut m)?;
    if m != MAGIC {
        return Err(WireError::BadMagic(m));
    }
    Ok(())
}

/// Writes a request.
pub fn write_request(w: &mut impl Write, req: &Request) -> io::Result<()> {
    let mut out = Vec::with_capacity(REQUEST_LEN);
    out.extend_from_slice(&MAGIC);
    req.qp.encode(&mut out);
    w.write_all(&out)?;
    w.flush()
}

/// A message from a client on the side channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// Connect (or re-create) the queue pair.
    Connect(Request),
    /// Bind (or check) a memory window for one block.
    Window(WindowRequest),
}

/// A client's request for a memory window over one block, for one grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowRequest {
    /// Block index.
    pub block: u32,
    /// Epoch the grant names.
    pub epoch: u32,
    /// The grant's key.
    pub key: u64,
    /// [`WINDOW_CHECK_ONLY`] or 0.
    pub flags: u32,
}

/// The memory node's answer to a [`WindowRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowReply {
    /// The grant is valid; a window is bound to exactly the block (rkey 0 for a check).
    Bound {
        /// The window's rkey.
        rkey: u32,
        /// [`WINDOW_WRITABLE`] or 0.
        flags: u32,
    },
    /// The grant names an older epoch; the block is at `current` now.
    Stale {
        /// The block's current epoch.
        current: u32,
    },
    /// The key matches no grant of the block.
    Denied,
    /// The memory node could not bind a window (the message says why).
    Failed(String),
}

/// Fills `b`; `Ok(false)` on a clean EOF before the first byte.
fn read_full(r: &mut impl Read, b: &mut [u8]) -> Result<bool, WireError> {
    let mut got = 0;
    while got < b.len() {
        match r.read(&mut b[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Reads a client message. `Ok(None)` on a clean EOF before the first byte.
pub fn read_message(r: &mut impl Read) -> Result<Option<Message>, WireError> {
    let mut m = [0u8; 4];
    if !read_full(r, &mut m)? {
        return Ok(None);
    }
    if m == MAGIC {
        let mut q = [0u8; QP_INFO_LEN];
        r.read_exact(&mut q)?;
        return Ok(Some(Message::Connect(Request {
            qp: QpInfo::decode(&q),
        })));
    }
    if m == WINDOW_MAGIC {
        let mut b = [0u8; WINDOW_REQUEST_LEN - 4];
        r.read_exact(&mut b)?;
        return Ok(Some(Message::Window(WindowRequest {
            block: u32_at(&b, 0),
            epoch: u32_at(&b, 4),
            key: u64_at(&b, 8),
            flags: u32_at(&b, 16),
        })));
    }
    Err(WireError::BadMagic(m))
}

/// Writes a window request.
pub fn write_window_request(w: &mut impl Write, req: &WindowRequest) -> io::Result<()> {
    let mut out = Vec::with_capacity(WINDOW_REQUEST_LEN);
    out.extend_from_slice(&WINDOW_MAGIC);
    out.extend_from_slice(&req.block.to_le_bytes());
    out.extend_from_slice(&req.epoch.to_le_bytes());
    out.extend_from_slice(&req.key.to_le_bytes());
    out.extend_from_slice(&req.flags.to_le_bytes());
    w.write_all(&out)?;
    w.flush()
}

/// Writes a window reply (a [`WindowReply::Failed`] message is truncated to
/// [`MAX_ERROR_LEN`] bytes).
pub fn write_window_reply(w: &mut impl Write, reply: &WindowReply) -> io::Result<()> {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&WINDOW_MAGIC);
    let (status, a, b) = match reply {
        WindowReply::Bound { rkey, flags } => (0u32, *rkey, *flags),
        WindowReply::Stale { current } => (1, *current, 0),
        WindowReply::Denied => (2, 0, 0),
        WindowReply::Failed(msg) => {
            let mut end = msg.len().min(MAX_ERROR_LEN);
            while !msg.is_char_boundary(end) {
                end -= 1;
            }
            out.extend_from_slice(&3u32.to_le_bytes());
            out.extend_from_slice(&(end as u32).to_le_bytes());
            out.extend_from_slice(&msg.as_bytes()[..end]);
            w.write_all(&out)?;
            return w.flush();
        }
    };
    out.extend_from_slice(&status.to_le_bytes());
    out.extend_from_slice(&a.to_le_bytes());
    out.extend_from_slice(&b.to_le_bytes());
    w.write_all(&out)?;
    w.flush()
}

/// Reads a window reply.
pub fn read_window_reply(r: &mut impl Read) -> Result<WindowReply, WireError> {
    read_window_magic(r)?;
    let mut b = [0u8; 8];
    r.read_exact(&mut b[..4])?;
    let status = u32_at(&b, 0);
    if status == 3 {
        r.read_exact(&mut b[..4])?;
        let len = u32_at(&b, 0) as usize;
        if len > MAX_ERROR_LEN {
            return Err(WireError::Malformed(format!(
                "error message of {len} bytes (at most {MAX_ERROR_LEN})"
            )));
        }
        let mut msg = vec![0u8; len];
        r.read_exact(&mut msg)?;
        return Ok(WindowReply::Failed(
            String::from_utf8_lossy(&msg).into_owned(),
        ));
    }
    r.read_exact(&mut b)?;
    let (a, c) = (u32_at(&b, 0), u32_at(&b, 4));
    match status {
        0 => Ok(WindowReply::Bound { rkey: a, flags: c }),
        1 => Ok(WindowReply::Stale { current: a }),
        2 => Ok(WindowReply::Denied),
        s => Err(WireError::Malformed(format!("window reply status {s}"))),
    }
}

fn read_window_magic(r: &mut impl Read) -> Result<(), WireError> {
    let mut m = [0u8; 4];
    r.read_exact(&mut m)?;
    if m != WINDOW_MAGIC {
        return Err(WireError::BadMagic(m));
    }
    Ok(())
}

/// Writes a successful response.
pub fn write_accept(w: &mut impl Write, a: &Accept) -> io::Result<()> {
    let mut out = Vec::with_capacity(8 + ACCEPT_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&0u32.to_le_bytes());
    a.qp.encode(&mut out);
    out.extend_from_slice(&a.rkey.to_le_bytes());
    out.extend_from_slice(&a.flags.to_le_bytes());
    out.extend_from_slice(&a.base.to_le_bytes());
    out.extend_from_slice(&a.region_len.to_le_bytes());
    out.extend_from_slice(&a.block_size.to_le_bytes());
    out.extend_from_slice(&a.max_op_bytes.to_le_bytes());
    w.write_all(&out)?;
    w.flush()
}

/// Writes a refusal carrying `msg` (truncated to [`MAX_ERROR_LEN`] bytes).
pub fn write_refusal(w: &mut impl Write, msg: &str) -> io::Result<()> {
    let mut end = msg.len().min(MAX_ERROR_LEN);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = Vec::with_capacity(12 + end);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(end as u32).to_le_bytes());
    out.extend_from_slice(&msg.as_bytes()[..end]);
    w.write_all(&out)?;
    w.flush()
}

/// Reads a response: the [`Accept`], or [`WireError::Refused`] with the peer's message.
pub fn read_response(r: &mut impl Read) -> Result<Accept, WireError> {
    read_magic(r)?;
    let mut s = [0u8; 4];
    r.read_exact(&mut s)?;
    if u32::from_le_bytes(s) != 0 {
        r.read_exact(&mut s)?;
        let len = u32::from_le_bytes(s) as usize;
        if len > MAX_ERROR_LEN {
            return Err(WireError::Malformed(format!(
                "error message of {len} bytes (at most {MAX_ERROR_LEN})"
            )));
        }
        let mut msg = vec![0u8; len];
        r.read_exact(&mut msg)?;
        return Err(WireError::Refused(
            String::from_utf8_lossy(&msg).into_owned(),
        ));
    }
    let mut b = [0u8; ACCEPT_LEN];
    r.read_exact(&mut b)?;
    let mut q = [0u8; QP_INFO_LEN];
    q.copy_from_slice(&b[..QP_INFO_LEN]);
    let a = Accept {
        qp: QpInfo::decode(&q),
        rkey: u32_at(&b, QP_INFO_LEN),
        flags: u32_at(&b, QP_INFO_LEN + 4),
        base: u64_at(&b, QP_INFO_LEN + 8),
        region_len: u64_at(&b, QP_INFO_LEN + 16),
        block_size: u64_at(&b, QP_INFO_LEN + 24),
        max_op_bytes: u64_at(&b, QP_INFO_LEN + 32),
    };
    if a.block_size == 0 || a.region_len == 0 || a.region_len % a.block_size != 0 {
        return Err(WireError::Malformed(format!(
            "region of {} bytes with blocks of {}",
            a.region_len, a.block_size
        )));
    }
    if a.max_op_bytes == 0 {
        return Err(WireError::Malformed("max_op_bytes is 0".into()));
    }
    a.base.checked_add(a.region_len).ok_or_else(|| {
        WireError::Malformed(format!("region {:#x}+{} wraps", a.base, a.region_len))
    })?;
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> QpInfo {
        QpInfo {
            qpn: 0x11,
            psn: 0xABCDEF,
            lid: 7,
            mtu: 3,
            rd_atomic: 16,
            gid: [9; 16],
        }
    }

    #[test]
    fn request_round_trip() {
        let mut buf = Vec::new();
        write_request(&mut buf, &Request { qp: info() }).unwrap();
        assert_eq!(buf.len(), REQUEST_LEN);
        let got = read_message(&mut &buf[..]).unwrap().unwrap();
        assert_eq!(got, Message::Connect(Request { qp: info() }));
        assert!(read_message(&mut &[][..]).unwrap().is_none());
        assert!(read_message(&mut &buf[..10]).is_err());
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert!(matches!(
            read_message(&mut &bad[..]),
            Err(WireError::BadMagic(_))
        ));
    }

    #[test]
    fn accept_and_refusal_round_trip() {
        let a = Accept {
            qp: info(),
            rkey: 0x1234,
            flags: FLAG_MEMORY_WINDOWS,
            base: 0x7f00_0000_0000,
            region_len: 32 << 20,
            block_size: 1 << 20,
            max_op_bytes: 1 << 20,
        };
        let mut buf = Vec::new();
        write_accept(&mut buf, &a).unwrap();
        assert_eq!(buf.len(), 8 + ACCEPT_LEN);
        assert_eq!(read_response(&mut &buf[..]).unwrap(), a);
        let mut buf = Vec::new();
        write_refusal(&mut buf, "no more queue pairs").unwrap();
        match read_response(&mut &buf[..]) {
            Err(WireError::Refused(m)) => assert_eq!(m, "no more queue pairs"),
            other => panic!("{other:?}"),
        }
        // Geometry that makes no sense is rejected.
        let mut buf = Vec::new();
        write_accept(&mut buf, &Accept { block_size: 3, ..a }).unwrap();
        assert!(matches!(
            read_response(&mut &buf[..]),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn window_messages_round_trip() {
        let req = WindowRequest {
            block: 7,
            epoch: 3,
            key: 0xDEAD_BEEF_0000_0001,
            flags: WINDOW_CHECK_ONLY,
        };
        let mut buf = Vec::new();
        write_window_request(&mut buf, &req).unwrap();
        assert_eq!(buf.len(), WINDOW_REQUEST_LEN);
        assert_eq!(
            read_message(&mut &buf[..]).unwrap(),
            Some(Message::Window(req))
        );
        for reply in [
            WindowReply::Bound {
                rkey: 0x0102_0304,
                flags: WINDOW_WRITABLE,
            },
            WindowReply::Stale { current: 9 },
            WindowReply::Denied,
            WindowReply::Failed("out of memory windows".into()),
        ] {
            let mut buf = Vec::new();
            write_window_reply(&mut buf, &reply).unwrap();
            assert_eq!(read_window_reply(&mut &buf[..]).unwrap(), reply);
        }
        let mut buf = Vec::new();
        write_window_reply(&mut buf, &WindowReply::Denied).unwrap();
        buf[4] = 9;
        assert!(matches!(
            read_window_reply(&mut &buf[..]),
            Err(WireError::Malformed(_))
        ));
    }
}
