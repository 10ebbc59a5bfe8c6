//! Wire frames of the soft transport: fixed-size little-endian headers.
//!
//! Everything here is pure (no I/O), so the decoders can be unit-tested and fuzzed. See
//! `docs/PROTOCOL.md` ("Data plane: soft transport frames") for the full specification.

use crate::error::OpError;
use crate::op::{OpCode, RKey};

/// Magic bytes opening both sides' preamble.
pub const MAGIC: [u8; 8] = *b"FARPSOFT";
/// Protocol version spoken by this build.
pub const VERSION: u32 = 1;
/// Length of the client's preamble: magic, version.
pub const CLIENT_HELLO_LEN: usize = 12;
/// Length of the server's preamble: magic, version, max_op_bytes, reserved.
pub const SERVER_HELLO_LEN: usize = 20;
/// Length of a request header.
pub const REQUEST_HEADER_LEN: usize = 40;
/// Length of a response header.
pub const RESPONSE_HEADER_LEN: usize = 16;
/// Largest error payload of a response.
pub const MAX_ERROR_PAYLOAD: usize = 32;

/// Response status: success.
pub const STATUS_OK: u8 = 0;
/// Response status: [`OpError::OutOfBounds`]; payload addr, len, start, end (4 x u64).
pub const STATUS_OUT_OF_BOUNDS: u8 = 1;
/// Response status: [`OpError::Misaligned`]; payload addr (u64).
pub const STATUS_MISALIGNED: u8 = 2;
/// Response status: [`OpError::AccessDenied`]; no payload.
pub const STATUS_ACCESS_DENIED: u8 = 3;
/// Response status: [`OpError::StaleEpoch`]; payload granted, current (2 x u32).
pub const STATUS_STALE_EPOCH: u8 = 4;
/// Response status: [`OpError::ReadOnly`]; no payload.
pub const STATUS_READ_ONLY: u8 = 5;
/// Response status: [`OpError::TooLarge`]; payload len, max (2 x u64).
pub const STATUS_TOO_LARGE: u8 = 6;
/// Response status: [`OpError::UnknownOp`]; payload the op code (u8) and 7 zero bytes.
pub const STATUS_UNKNOWN_OP: u8 = 7;
/// Response status: the operation was not carried out (server-internal failure); maps to
/// [`OpError::Aborted`]. Never sent by a v1 server; reserved. No payload.
pub const STATUS_ABORTED: u8 = 8;
/// Response status: [`OpError::GrantExpired`]; payload expiry, now (2 x u32, seconds
/// since the Unix epoch).
pub const STATUS_GRANT_EXPIRED: u8 = 9;

/// A frame that violates the protocol. The connection it arrived on cannot be trusted to
/// stay in sync and is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A reserved or flags field that must be zero is not.
    #[error("reserved field {field} is {value:#x}, must be 0")]
    Reserved {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// An atomic operation whose length field is not 8.
    #[error("atomic operation with length {0}, must be 8")]
    AtomicLen(u32),
    /// A response status code this build does not know.
    #[error("unknown response status {0}")]
    UnknownStatus(u8),
    /// A response payload of the wrong size for its status.
    #[error("response with status {status} carries {len} payload bytes, expected {expected}")]
    PayloadLen {
        /// Response status.
        status: u8,
        /// Length found.
        len: u32,
        /// Length the status requires.
        expected: u32,
    },
    /// A preamble with the wrong magic bytes.
    #[error("bad preamble magic {0:02x?}; the peer is not a farpool soft transport endpoint")]
    BadMagic([u8; 8]),
    /// A preamble with a different protocol version.
    #[error("peer speaks soft protocol version {0}, this build speaks version {VERSION}; run matching farpool versions")]
    Version(u32),
}

#[inline]
fn u32_at(b: &[u8], i: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[i..i + 4]);
    u32::from_le_bytes(w)
}

#[inline]
fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(w)
}

/// Checks the magic and version that open both preambles.
fn check_preamble(b: &[u8]) -> Result<(), FrameError> {
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&b[..8]);
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let v = u32_at(b, 8);
    if v != VERSION {
        return Err(FrameError::Version(v));
    }
    Ok(())
}

/// The client's preamble.
pub fn encode_client_hello() -> [u8; CLIENT_HELLO_LEN] {
    let mut b = [0u8; CLIENT_HELLO_LEN];
    b[..8].copy_from_slice(&MAGIC);
    b[8..].copy_from_slice(&VERSION.to_le_bytes());
    b
}

/// Validates a client preamble; returns the version it names.
pub fn decode_client_hello(b: &[u8; CLIENT_HELLO_LEN]) -> Result<u32, FrameError> {
    check_preamble(b)?;
    Ok(VERSION)
}

/// The server's preamble, announcing the largest READ/WRITE it accepts.
pub fn encode_server_hello(max_op_bytes: u32) -> [u8; SERVER_HELLO_LEN] {
    let mut b = [0u8; SERVER_HELLO_LEN];
    b[..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&max_op_bytes.to_le_bytes());
    b
}

/// Validates a server preamble; returns the server's `max_op_bytes`.
pub fn decode_server_hello(b: &[u8; SERVER_HELLO_LEN]) -> Result<u32, FrameError> {
    check_preamble(b)?;
    Ok(u32_at(b, 12))
}

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Operation code (see [`OpCode`]); unknown codes decode and are answered with
    /// [`OpError::UnknownOp`].
    pub op: u8,
    /// Remote length: bytes to read or write, 8 for atomics.
    pub len: u32,
    /// Request id, echoed in the response.
    pub id: u64,
    /// Region offset.
    pub addr: u64,
    /// Key presented for the access check.
    pub rkey: RKey,
}

impl RequestHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0] = self.op;
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.id.to_le_bytes());
        b[16..24].copy_from_slice(&self.addr.to_le_bytes());
        b[24..32].copy_from_slice(&self.rkey.key.to_le_bytes());
        b[32..36].copy_from_slice(&self.rkey.epoch.to_le_bytes());
        b[36..40].copy_from_slice(&self.rkey.expiry.to_le_bytes());
        b
    }

    /// The operation, if known.
    pub fn code(&self) -> Option<OpCode> {
        OpCode::from_u8(self.op)
    }

    /// Bytes of payload following the header: `len` for WRITE, 16 for CAS (expected,
    /// new), 8 for FAA (add), 0 for READ. `None` for unknown operations.
    pub fn payload_len(&self) -> Option<u64> {
        Some(match self.code()? {
            OpCode::Read => 0,
            OpCode::Write => u64::from(self.len),
            OpCode::CompareSwap => 16,
            OpCode::FetchAdd => 8,
        })
    }
}

/// Decodes a request header from the front of `buf`.
///
/// `Ok(None)` when fewer than [`REQUEST_HEADER_LEN`] bytes are available. Unknown
/// operation codes decode (so the server can answer them); nonzero flags or reserved
/// fields, and atomics whose length is not 8, are errors.
pub fn decode_request_header(buf: &[u8]) -> Result<Option<RequestHeader>, FrameError> {
    let Some(b) = buf.get(..REQUEST_HEADER_LEN) else {
        return Ok(None);
    };
    if b[1] != 0 {
        return Err(FrameError::Reserved {
            field: "flags",
            value: u64::from(b[1]),
        });
    }
    let r16 = u16::from_le_bytes([b[2], b[3]]);
    if r16 != 0 {
        return Err(FrameError::Reserved {
            field: "reserved16",
            value: u64::from(r16),
        });
    }
    let h = RequestHeader {
        op: b[0],
        len: u32_at(b, 4),
        id: u64_at(b, 8),
        addr: u64_at(b, 16),
        rkey: RKey {
            key: u64_at(b, 24),
            epoch: u32_at(b, 32),
            expiry: u32_at(b, 36),
        },
    };
    if matches!(h.code(), Some(OpCode::CompareSwap | OpCode::FetchAdd)) && h.len != 8 {
        return Err(FrameError::AtomicLen(h.len));
    }
    Ok(Some(h))
}

/// Decodes a whole request frame from the front of `buf`.
///
/// Returns the header and the frame's total length (header plus payload) once all of it
/// is in `buf`, `Ok(None)` while more bytes are needed. An unknown operation's frame is
/// taken to be the header alone.
pub fn decode_request(buf: &[u8]) -> Result<Option<(RequestHeader, usize)>, FrameError> {
    let Some(h) = decode_request_header(buf)? else {
        return Ok(None);
    };
    let total = REQUEST_HEADER_LEN as u64 + h.payload_len().unwrap_or(0);
    if (buf.len() as u64) < total {
        return Ok(None);
    }
    Ok(Some((h, total as usize)))
}

/// A decoded response header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    /// Id of the request answered.
    pub id: u64,
    /// Status code (`STATUS_*`).
    pub status: u8,
    /// Payload bytes following the header.
    pub len: u32,
}

impl ResponseHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; RESPONSE_HEADER_LEN] {
        let mut b = [0u8; RESPONSE_HEADER_LEN];
        b[..8].copy_from_slice(&self.id.to_le_bytes());
        b[8] = self.status;
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b
    }
}

/// Decodes a response header from the front of `buf`; `Ok(None)` when fewer than
/// [`RESPONSE_HEADER_LEN`] bytes are available.
///
/// Checks that the status is known and, for error statuses, that the payload length is
/// the one the status defines. (Success payload lengths depend on the request; the
/// client checks them.)
pub fn decode_response_header(buf: &[u8]) -> Result<Option<ResponseHeader>, FrameError> {
    let Some(b) = buf.get(..RESPONSE_HEADER_LEN) else {
        return Ok(None);
    };
    if b[9..12] != [0, 0, 0] {
        return Err(FrameError::Reserved {
            field: "reserved24",
            value: u64::from(u32_at(b, 8) >> 8),
        });
    }
    let h = ResponseHeader {
        id: u64_at(b, 0),
        status: b[8],
        len: u32_at(b, 12),
    };
    if h.status != STATUS_OK {
        let expected = error_payload_len(h.status)?;
        if h.len != expected {
            return Err(FrameError::PayloadLen {
                status: h.status,
                len: h.len,
                expected,
            });
        }
    }
    Ok(Some(h))
}

/// Decodes a whole response frame from the front of `buf`: the header and the frame's
/// total length once all of it is in `buf`, `Ok(None)` while more bytes are needed.
pub fn decode_response(buf: &[u8]) -> Result<Option<(ResponseHeader, usize)>, FrameError> {
    let Some(h) = decode_response_header(buf)? else {
        return Ok(None);
    };
    let total = RESPONSE_HEADER_LEN + h.len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((h, total)))
}

/// Payload length an error status carries.
pub fn error_payload_len(status: u8) -> Result<u32, FrameError> {
    Ok(match status {
        STATUS_OUT_OF_BOUNDS => 32,
        STATUS_MISALIGNED | STATUS_STALE_EPOCH | STATUS_UNKNOWN_OP | STATUS_GRANT_EXPIRED => 8,
        STATUS_TOO_LARGE => 16,
        STATUS_ACCESS_DENIED | STATUS_READ_ONLY | STATUS_ABORTED => 0,
        other => return Err(FrameError::UnknownStatus(other)),
    })
}

/// Encodes `err` as a status code and its payload into `out`; returns the status and the
/// payload length.
pub fn encode_error(err: &OpError, out: &mut [u8; MAX_ERROR_PAYLOAD]) -> (u8, usize) {
    *out = [0; MAX_ERROR_PAYLOAD];
    match *err {
        OpError::OutOfBounds {
            addr,
            len,
            start,
            end,
        } => {
            out[0..8].copy_from_slice(&addr.to_le_bytes());
            out[8..16].copy_from_slice(&len.to_le_bytes());
            out[16..24].copy_from_slice(&start.to_le_bytes());
            out[24..32].copy_from_slice(&end.to_le_bytes());
            (STATUS_OUT_OF_BOUNDS, 32)
        }
        OpError::Misaligned { addr } => {
            out[0..8].copy_from_slice(&addr.to_le_bytes());
            (STATUS_MISALIGNED, 8)
        }
        OpError::AccessDenied => (STATUS_ACCESS_DENIED, 0),
        OpError::StaleEpoch { granted, current } => {
            out[0..4].copy_from_slice(&granted.to_le_bytes());
            out[4..8].copy_from_slice(&current.to_le_bytes());
            (STATUS_STALE_EPOCH, 8)
        }
        OpError::ReadOnly => (STATUS_READ_ONLY, 0),
        OpError::GrantExpired { expiry, now } => {
            out[0..4].copy_from_slice(&expiry.to_le_bytes());
            out[4..8].copy_from_slice(&now.to_le_bytes());
            (STATUS_GRANT_EXPIRED, 8)
        }
        OpError::TooLarge { len, max } => {
            out[0..8].copy_from_slice(&len.to_le_bytes());
            out[8..16].copy_from_slice(&max.to_le_bytes());
            (STATUS_TOO_LARGE, 16)
        }
        OpError::UnknownOp(op) => {
            out[0] = op;
            (STATUS_UNKNOWN_OP, 8)
        }
        // The soft server never produces device errors; if one is passed here it goes
        // out as "aborted" (effect unknown), like a batch-level rejection.
        OpError::Aborted | OpError::NotExecuted(_) | OpError::Device(_) => (STATUS_ABORTED, 0),
    }
}

/// Decodes an error status and its payload back into the [`OpError`] the server saw.
pub fn decode_error(status: u8, payload: &[u8]) -> Result<OpError, FrameError> {
    let expected = error_payload_len(status)?;
    if payload.len() != expected as usize {
        return Err(FrameError::PayloadLen {
            status,
            len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
            expected,
        });
    }
    let p = payload;
    Ok(match status {
        STATUS_OUT_OF_BOUNDS => OpError::OutOfBounds {
            addr: u64_at(p, 0),
            len: u64_at(p, 8),
            start: u64_at(p, 16),
            end: u64_at(p, 24),
        },
        STATUS_MISALIGNED => OpError::Misaligned { addr: u64_at(p, 0) },
        STATUS_ACCESS_DENIED => OpError::AccessDenied,
        STATUS_STALE_EPOCH => OpError::StaleEpoch {
            granted: u32_at(p, 0),
            current: u32_at(p, 4),
        },
        STATUS_READ_ONLY => OpError::ReadOnly,
        STATUS_GRANT_EXPIRED => OpError::GrantExpired {
            expiry: u32_at(p, 0),
            now: u32_at(p, 4),
        },
        STATUS_TOO_LARGE => OpError::TooLarge {
            len: u64_at(p, 0),
            max: u64_at(p, 8),
        },
        STATUS_UNKNOWN_OP => OpError::UnknownOp(p[0]),
        STATUS_ABORTED => OpError::Aborted,
        other => return Err(FrameError::UnknownStatus(other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(op: u8, len: u32) -> RequestHeader {
        RequestHeader {
            op,
            len,
            id: 0x0102_0304_0506_0708,
            addr: 0x1122_3344_5566_7788,
            rkey: RKey {
                key: 0xdead_beef_cafe_f00d,
                epoch: 77,
                expiry: 0x6000_0000,
            },
        }
    }

    #[test]
    fn request_layout_is_fixed() {
        let b = req(2, 4096).encode();
        assert_eq!(b[0], 2);
        assert_eq!(&b[4..8], &4096u32.to_le_bytes());
        assert_eq!(&b[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[32..36], &77u32.to_le_bytes());
        assert_eq!(&b[36..40], &0x6000_0000u32.to_le_bytes());
    }

    #[test]
    fn request_round_trip_and_partial() {
        for h in [req(1, 4096), req(2, 3), req(3, 8), req(4, 8), req(99, 5)] {
            let mut bytes = h.encode().to_vec();
            let payload = h.payload_len().unwrap_or(0) as usize;
            bytes.extend(std::iter::repeat(0xAB).take(payload));
            for cut in 0..bytes.len() {
                assert_eq!(decode_request(&bytes[..cut]), Ok(None), "cut {cut}");
            }
            assert_eq!(decode_request(&bytes), Ok(Some((h, 40 + payload))));
            assert_eq!(decode_request_header(&bytes), Ok(Some(h)));
        }
    }

    #[test]
    fn request_rejects_reserved_and_bad_atomics() {
        let mut b = req(1, 8).encode();
        b[1] = 1;
        assert!(matches!(
            decode_request_header(&b),
            Err(FrameError::Reserved { field: "flags", .. })
        ));
        let mut b = req(1, 8).encode();
        b[3] = 1;
        assert!(decode_request_header(&b).is_err());
        assert_eq!(
            decode_request_header(&req(3, 16).encode()),
            Err(FrameError::AtomicLen(16))
        );
        assert_eq!(
            decode_request_header(&req(4, 0).encode()),
            Err(FrameError::AtomicLen(0))
        );
    }

    #[test]
    fn response_round_trip() {
        let h = ResponseHeader {
            id: 9,
            status: STATUS_OK,
            len: 4096,
        };
        let mut bytes = h.encode().to_vec();
        assert_eq!(decode_response(&bytes), Ok(None));
        bytes.resize(16 + 4096, 1);
        assert_eq!(decode_response(&bytes), Ok(Some((h, 16 + 4096))));
        let bad = ResponseHeader {
            id: 9,
            status: STATUS_READ_ONLY,
            len: 4,
        };
        assert!(matches!(
            decode_response_header(&bad.encode()),
            Err(FrameError::PayloadLen { .. })
        ));
        let unknown = ResponseHeader {
            id: 9,
            status: 200,
            len: 0,
        };
        assert_eq!(
            decode_response_header(&unknown.encode()),
            Err(FrameError::UnknownStatus(200))
        );
        let mut b = h.encode();
        b[10] = 1;
        assert!(decode_response_header(&b).is_err());
    }

    #[test]
    fn errors_round_trip() {
        let all = [
            OpError::OutOfBounds {
                addr: 1,
                len: 2,
                start: 3,
                end: 4,
            },
            OpError::Misaligned { addr: 13 },
            OpError::AccessDenied,
            OpError::StaleEpoch {
                granted: 5,
                current: 6,
            },
            OpError::ReadOnly,
            OpError::GrantExpired { expiry: 9, now: 10 },
            OpError::TooLarge { len: 7, max: 8 },
            OpError::UnknownOp(42),
            OpError::Aborted,
        ];
        for e in all {
            let mut p = [0u8; MAX_ERROR_PAYLOAD];
            let (status, n) = encode_error(&e, &mut p);
            assert_ne!(status, STATUS_OK);
            assert_eq!(error_payload_len(status), Ok(n as u32));
            assert_eq!(decode_error(status, &p[..n]), Ok(e.clone()));
            let h = ResponseHeader {
                id: 1,
                status,
                len: n as u32,
            };
            assert_eq!(decode_response_header(&h.encode()), Ok(Some(h)));
        }
        assert!(decode_error(STATUS_MISALIGNED, &[0; 4]).is_err());
        assert!(decode_error(77, &[]).is_err());
    }

    #[test]
    fn hellos() {
        assert_eq!(decode_client_hello(&encode_client_hello()), Ok(VERSION));
        assert_eq!(
            decode_server_hello(&encode_server_hello(1 << 20)),
            Ok(1 << 20)
        );
        let mut c = encode_client_hello();
        c[8] = 9;
        assert_eq!(decode_client_hello(&c), Err(FrameError::Version(9)));
        let mut s = encode_server_hello(5);
        s[0] = b'X';
        assert!(matches!(
            decode_server_hello(&s),
            Err(FrameError::BadMagic(_))
        ));
        // The version error tells the operator what to do.
        assert!(FrameError::Version(2).to_string().contains("matching"));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_request(&bytes);
            let _ = decode_request_header(&bytes);
            let _ = decode_response(&bytes);
            let _ = decode_response_header(&bytes);
            if bytes.len() >= 32 {
                for status in 0..10u8 {
                    let _ = decode_error(status, &bytes[..(status as usize * 4) % 33]);
                }
            }
        }

        #[test]
        fn request_round_trips(op in 1u8..=4, len in any::<u32>(), id in any::<u64>(),
                               addr in any::<u64>(), key in any::<u64>(), epoch in any::<u32>(),
                               expiry in any::<u32>()) {
            let len = if op >= 3 { 8 } else { len };
            let h = RequestHeader { op, len, id, addr, rkey: RKey { key, epoch, expiry } };
            prop_assert_eq!(decode_request_header(&h.encode()), Ok(Some(h)));
        }

        #[test]
        fn response_round_trips(id in any::<u64>(), len in any::<u32>()) {
            let h = ResponseHeader { id, status: STATUS_OK, len };
            prop_assert_eq!(decode_response_header(&h.encode()), Ok(Some(h)));
        }
    }
}
