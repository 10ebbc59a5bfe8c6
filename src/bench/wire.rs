//! Shared plumbing of the peer protocol clients: a buffered TCP connection and
//! CRLF-framed reads.
//!
//! The peer clients are deliberately minimal and hand-written: one TCP connection per
//! client thread, `TCP_NODELAY`, a whole batch written into a buffer and flushed once,
//! then the replies read in order. That is the same loop shape the farpool client runs,
//! so the comparison measures the servers rather than the client libraries.

use super::error::BenchError;
use std::io::{self, BufRead, BufReader, BufWriter, Read};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Longest reply line accepted (a memcached `VALUE` header or a RESP header is far
/// shorter; this only bounds memory on garbage input).
pub(crate) const MAX_LINE: usize = 64 * 1024;

/// Largest value accepted in a reply.
pub(crate) const MAX_VALUE: usize = 512 << 20;

/// How long to wait for a TCP connection to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long to wait for a reply before declaring the peer stuck.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Why reading a reply failed.
#[derive(Debug)]
pub(crate) enum ProtoError {
    /// The connection failed or closed.
    Io(io::Error),
    /// The bytes received are not a valid reply.
    Malformed(String),
}

impl From<io::Error> for ProtoError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl ProtoError {
    /// Converts into a [`BenchError`] naming the peer.
    pub(crate) fn into_bench(self, system: &'static str, addr: &str) -> BenchError {
        match self {
            Self::Io(source) => BenchError::PeerIo { system, source },
            Self::Malformed(detail) => BenchError::PeerProtocol {
                system,
                addr: addr.to_string(),
                detail,
            },
        }
    }
}

/// A buffered, Nagle-free TCP connection to a peer.
pub(crate) struct Wire {
    /// Buffered read half.
    pub reader: BufReader<TcpStream>,
    /// Buffered write half; flushed once per batch.
    pub writer: BufWriter<TcpStream>,
}

impl Wire {
    /// Connects to `addr` with a timeout and `TCP_NODELAY`.
    pub(crate) fn connect(system: &'static str, addr: &str) -> Result<Self, BenchError> {
        let err = |source: io::Error| BenchError::PeerConnect {
            system,
            addr: addr.to_string(),
            source,
        };
        let mut last = io::Error::new(io::ErrorKind::NotFound, "address resolved to nothing");
        let mut stream = None;
        for sa in addr.to_socket_addrs().map_err(err)? {
            match TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let stream = stream.ok_or_else(|| err(last))?;
        stream.set_nodelay(true).map_err(err)?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(err)?;
        stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(err)?;
        let read_half = stream.try_clone().map_err(err)?;
        Ok(Self {
            reader: BufReader::with_capacity(256 * 1024, read_half),
            writer: BufWriter::with_capacity(256 * 1024, stream),
        })
    }
}

/// Reads one CRLF-terminated line into `line` (without the CRLF).
pub(crate) fn read_line<R: BufRead>(r: &mut R, line: &mut Vec<u8>) -> Result<(), ProtoError> {
    line.clear();
    let n = r
        .by_ref()
        .take(MAX_LINE as u64 + 2)
        .read_until(b'\n', line)?;
    if n == 0 {
        return Err(ProtoError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed the connection",
        )));
    }
    if !line.ends_with(b"\r\n") {
        return Err(if line.len() > MAX_LINE {
            ProtoError::Malformed(format!("reply line longer than {MAX_LINE} bytes"))
        } else if line.ends_with(b"\n") {
            ProtoError::Malformed(format!(
                "reply line {:?} ends in LF without CR",
                String::from_utf8_lossy(line)
            ))
        } else {
            ProtoError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection mid-reply",
            ))
        });
    }
    line.truncate(line.len() - 2);
    Ok(())
}

/// Reads exactly `len` bytes followed by CRLF, using `buf` as storage, and returns the
/// `len` bytes. `buf` only ever grows, so steady-state reads do not re-initialise it.
pub(crate) fn read_block<'b, R: BufRead>(
    r: &mut R,
    len: usize,
    buf: &'b mut Vec<u8>,
) -> Result<&'b [u8], ProtoError> {
    if len > MAX_VALUE {
        return Err(ProtoError::Malformed(format!(
            "value of {len} bytes exceeds the {MAX_VALUE}-byte limit"
        )));
    }
    if buf.len() < len + 2 {
        buf.resize(len + 2, 0);
    }
    let block = &mut buf[..len + 2];
    r.read_exact(block)?;
    if !block.ends_with(b"\r\n") {
        return Err(ProtoError::Malformed(format!(
            "value of {len} bytes is not followed by CRLF"
        )));
    }
    Ok(&block[..len])
}

/// Parses an ASCII decimal (optionally negative) integer.
pub(crate) fn parse_int(bytes: &[u8]) -> Option<i64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_need_crlf() {
        let mut line = Vec::new();
        let mut r = &b"OK\r\nbad\nrest"[..];
        read_line(&mut r, &mut line).unwrap();
        assert_eq!(line, b"OK");
        assert!(matches!(
            read_line(&mut r, &mut line),
            Err(ProtoError::Malformed(_))
        ));
        assert!(matches!(
            read_line(&mut r, &mut line),
            Err(ProtoError::Io(_))
        ));
        assert!(matches!(
            read_line(&mut r, &mut line),
            Err(ProtoError::Io(_))
        ));
    }

    #[test]
    fn overlong_lines_are_refused() {
        let mut input = vec![b'a'; MAX_LINE + 10];
        input.extend_from_slice(b"\r\n");
        let mut line = Vec::new();
        assert!(matches!(
            read_line(&mut &input[..], &mut line),
            Err(ProtoError::Malformed(_))
        ));
    }

    #[test]
    fn blocks_need_trailing_crlf() {
        let mut buf = Vec::new();
        assert_eq!(
            read_block(&mut &b"abc\r\n"[..], 3, &mut buf).unwrap(),
            b"abc"
        );
        assert_eq!(read_block(&mut &b"z\r\n"[..], 1, &mut buf).unwrap(), b"z");
        assert!(matches!(
            read_block(&mut &b"abcd\r\n"[..], 3, &mut buf),
            Err(ProtoError::Malformed(_))
        ));
        assert!(matches!(
            read_block(&mut &b"ab"[..], 3, &mut buf),
            Err(ProtoError::Io(_))
        ));
    }
}
