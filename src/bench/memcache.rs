//! A minimal pipelined memcached client (text protocol) for the peer comparison.
//!
//! READ is `get key` (keys pre-populated with values of the benchmark size), WRITE is
//! `set key 0 0 size`, FAA is `incr key 1`. A batch of `depth` commands is written and
//! flushed once, then the `depth` replies are read in order.

use super::args::{BenchOp, Plan};
use super::error::BenchError;
use super::load::{BatchOutcome, Connection};
use super::wire::{read_block, read_line, ProtoError, Wire};
use std::io::{BufRead, Write};

const SYSTEM: &str = "memcached";

/// Commands per pipelined round trip while pre-populating.
const POPULATE_CHUNK: usize = 128;

/// A parsed memcached reply to one of the commands the benchmark sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum McReply {
    /// `get` hit: the value's length (the bytes are left in the caller's buffer).
    Value(usize),
    /// `get` miss (`END` without a `VALUE`).
    Miss,
    /// `STORED`
    Stored,
    /// `NOT_STORED`
    NotStored,
    /// `incr` result.
    Number(u64),
    /// `NOT_FOUND`
    NotFound,
    /// `ERROR`, `CLIENT_ERROR msg` or `SERVER_ERROR msg`.
    Error(String),
}

/// Reads the reply to one command of kind `op` (`get` for read, `set` for write, `incr`
/// for faa). A value is left at the start of `value` (which may be longer).
pub(crate) fn read_reply<R: BufRead>(
    r: &mut R,
    op: BenchOp,
    line: &mut Vec<u8>,
    value: &mut Vec<u8>,
) -> Result<McReply, ProtoError> {
    read_line(r, line)?;
    if let Some(e) = error_line(line) {
        return Ok(e);
    }
    let text = std::str::from_utf8(line)
        .map_err(|_| ProtoError::Malformed("reply line is not UTF-8".into()))?;
    let unexpected =
        || ProtoError::Malformed(format!("unexpected reply {text:?} to {}", command_name(op)));
    match op {
        BenchOp::Read => {
            if text == "END" {
                return Ok(McReply::Miss);
            }
            // VALUE <key> <flags> <bytes> [<cas unique>]
            let mut fields = text.split(' ');
            if fields.next() != Some("VALUE") {
                return Err(unexpected());
            }
            let (_key, _flags, bytes) = (fields.next(), fields.next(), fields.next());
            let len: usize = bytes
                .and_then(|b| b.parse().ok())
                .ok_or_else(|| ProtoError::Malformed(format!("invalid VALUE header {text:?}")))?;
            read_block(r, len, value)?;
            read_line(r, line)?;
            if line.as_slice() != b"END" {
                return Err(ProtoError::Malformed(format!(
                    "expected END after the value, got {:?}",
                    String::from_utf8_lossy(line)
                )));
            }
            Ok(McReply::Value(len))
        }
        BenchOp::Write => match text {
            "STORED" => Ok(McReply::Stored),
            "NOT_STORED" => Ok(McReply::NotStored),
            _ => Err(unexpected()),
        },
        BenchOp::Faa => match text {
            "NOT_FOUND" => Ok(McReply::NotFound),
            _ => text.parse().map(McReply::Number).map_err(|_| unexpected()),
        },
        BenchOp::Cas
        | BenchOp::Alloc
        | BenchOp::Get
        | BenchOp::Put
        | BenchOp::Enqueue
        | BenchOp::Dequeue
        | BenchOp::Append
        | BenchOp::Scan => Err(ProtoError::Malformed(format!(
            "{op} is not a memcached benchmark operation"
        ))),
    }
}

fn error_line(line: &[u8]) -> Option<McReply> {
    let text = String::from_utf8_lossy(line);
    if text == "ERROR" || text.starts_with("CLIENT_ERROR") || text.starts_with("SERVER_ERROR") {
        Some(McReply::Error(text.into_owned()))
    } else {
        None
    }
}

fn command_name(op: BenchOp) -> &'static str {
    match op {
        BenchOp::Read => "get",
        BenchOp::Write => "set",
        BenchOp::Faa => "incr",
        BenchOp::Cas
        | BenchOp::Alloc
        | BenchOp::Get
        | BenchOp::Put
        | BenchOp::Enqueue
        | BenchOp::Dequeue
        | BenchOp::Append
        | BenchOp::Scan => "an unsupported command",
    }
}

/// Whether `reply` is the expected answer to `op`; `Err` holds the message to count.
pub(crate) fn check_reply(op: BenchOp, size: u64, reply: &McReply) -> Result<(), String> {
    match (op, reply) {
        (BenchOp::Read, McReply::Value(n)) if *n as u64 == size => Ok(()),
        (BenchOp::Read, McReply::Value(n)) => Err(format!(
            "get returned {n} bytes instead of {size}; another writer changed the key"
        )),
        (BenchOp::Read, McReply::Miss) => {
            Err("get missed: the key was evicted; give memcached more memory (-m)".into())
        }
        (BenchOp::Write, McReply::Stored) => Ok(()),
        (BenchOp::Faa, McReply::Number(_)) => Ok(()),
        (BenchOp::Faa, McReply::NotFound) => {
            Err("incr: NOT_FOUND, the key was evicted; give memcached more memory (-m)".into())
        }
        (_, McReply::Error(msg)) => Err(format!("memcached error: {msg}")),
        (op, other) => Err(format!("unexpected reply {other:?} to {op}")),
    }
}

/// One benchmark client's connection to memcached.
pub(crate) struct MemcachedConn {
    wire: Wire,
    addr: String,
    op: BenchOp,
    size: u64,
    keys: Vec<String>,
    value: Vec<u8>,
    out: Vec<u8>,
    line: Vec<u8>,
    scratch: Vec<u8>,
}

impl MemcachedConn {
    /// Connects client `client` to `addr` and pre-populates its keys `bench:{client}:{slot}`.
    pub(crate) fn connect(addr: &str, client: usize, plan: &Plan) -> Result<Self, BenchError> {
        let wire = Wire::connect(SYSTEM, addr)?;
        let mut conn = Self {
            wire,
            addr: addr.to_string(),
            op: plan.op,
            size: plan.size,
            keys: (0..plan.slots)
                .map(|s| format!("bench:{client}:{s}"))
                .collect(),
            value: super::payload(plan.size),
            out: Vec::new(),
            line: Vec::new(),
            scratch: Vec::new(),
        };
        conn.populate(plan.op == BenchOp::Faa)?;
        Ok(conn)
    }

    fn encode_set(out: &mut Vec<u8>, key: &str, value: &[u8]) {
        // Writing into a Vec cannot fail.
        let _ = write!(out, "set {key} 0 0 {}\r\n", value.len());
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }

    fn send(&mut self) -> Result<(), BenchError> {
        let io = |source| BenchError::PeerIo {
            system: SYSTEM,
            source,
        };
        self.wire.writer.write_all(&self.out).map_err(io)?;
        self.wire.writer.flush().map_err(io)
    }

    fn read(&mut self, op: BenchOp) -> Result<McReply, BenchError> {
        read_reply(&mut self.wire.reader, op, &mut self.line, &mut self.scratch)
            .map_err(|e| e.into_bench(SYSTEM, &self.addr))
    }

    fn populate(&mut self, counters: bool) -> Result<(), BenchError> {
        let value = if counters {
            b"0".to_vec()
        } else {
            self.value.clone()
        };
        for start in (0..self.keys.len()).step_by(POPULATE_CHUNK) {
            let end = (start + POPULATE_CHUNK).min(self.keys.len());
            self.out.clear();
            for key in &self.keys[start..end] {
                Self::encode_set(&mut self.out, key, &value);
            }
            self.send()?;
            for i in start..end {
                let reply = self.read(BenchOp::Write)?;
                if reply != McReply::Stored {
                    return Err(BenchError::PeerPopulate {
                        system: SYSTEM,
                        key: self.keys[i].clone(),
                        reply: format!("{reply:?}"),
                    });
                }
            }
        }
        Ok(())
    }
}

impl Connection for MemcachedConn {
    fn run_batch(&mut self, slots: &[usize]) -> Result<BatchOutcome, BenchError> {
        self.out.clear();
        for &s in slots {
            let Some(key) = self.keys.get(s) else {
                return Err(BenchError::Args(format!("slot {s} is out of range")));
            };
            match self.op {
                BenchOp::Read => {
                    let _ = write!(self.out, "get {key}\r\n");
                }
                BenchOp::Faa => {
                    let _ = write!(self.out, "incr {key} 1\r\n");
                }
                _ => Self::encode_set(&mut self.out, key, &self.value),
            }
        }
        self.send()?;
        let mut outcome = BatchOutcome::default();
        for _ in slots {
            let reply = self.read(self.op)?;
            if let Err(msg) = check_reply(self.op, self.size, &reply) {
                outcome.fail(|| msg);
            }
        }
        Ok(outcome)
    }

    fn finish(self) -> Result<(), BenchError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(input: &[u8], op: BenchOp) -> Result<(McReply, Vec<u8>), ProtoError> {
        let mut value = Vec::new();
        let reply = read_reply(&mut &input[..], op, &mut Vec::new(), &mut value)?;
        Ok((reply, value))
    }

    #[test]
    fn parses_get_hits_and_misses() {
        let (r, v) = one(b"VALUE bench:0:1 0 5\r\nab\r\nc\r\nEND\r\n", BenchOp::Read).unwrap();
        assert_eq!(r, McReply::Value(5));
        assert_eq!(&v[..5], b"ab\r\nc");
        let (r, _) = one(b"VALUE k 0 2 99\r\nxy\r\nEND\r\n", BenchOp::Read).unwrap();
        assert_eq!(r, McReply::Value(2));
        assert_eq!(one(b"END\r\n", BenchOp::Read).unwrap().0, McReply::Miss);
    }

    #[test]
    fn parses_store_incr_and_errors() {
        assert_eq!(
            one(b"STORED\r\n", BenchOp::Write).unwrap().0,
            McReply::Stored
        );
        assert_eq!(
            one(b"NOT_STORED\r\n", BenchOp::Write).unwrap().0,
            McReply::NotStored
        );
        assert_eq!(one(b"17\r\n", BenchOp::Faa).unwrap().0, McReply::Number(17));
        assert_eq!(
            one(b"NOT_FOUND\r\n", BenchOp::Faa).unwrap().0,
            McReply::NotFound
        );
        assert_eq!(
            one(
                b"SERVER_ERROR out of memory storing object\r\n",
                BenchOp::Write
            )
            .unwrap()
            .0,
            McReply::Error("SERVER_ERROR out of memory storing object".into())
        );
        assert_eq!(
            one(b"ERROR\r\n", BenchOp::Read).unwrap().0,
            McReply::Error("ERROR".into())
        );
    }

    #[test]
    fn refuses_malformed_replies() {
        for (bad, op) in [
            (&b"VALUE k 0 abc\r\n"[..], BenchOp::Read),
            (b"VALUE k 0\r\n", BenchOp::Read),
            (b"VALUE k 0 2\r\nxyz\r\nEND\r\n", BenchOp::Read),
            (b"VALUE k 0 2\r\nxy\r\nVALUE\r\n", BenchOp::Read),
            (b"HELLO\r\n", BenchOp::Read),
            (b"YES\r\n", BenchOp::Write),
            (b"-3\r\n", BenchOp::Faa),
            (b"STORED\n", BenchOp::Write),
            (b"\xff\xfe\r\n", BenchOp::Write),
        ] {
            let res = one(bad, op);
            assert!(
                matches!(res, Err(ProtoError::Malformed(_))),
                "{bad:?} -> {res:?}"
            );
        }
        for truncated in [&b"VALUE k 0 5\r\nab"[..], b"STO", b""] {
            let res = one(truncated, BenchOp::Read);
            assert!(
                matches!(res, Err(ProtoError::Io(_))),
                "{truncated:?} -> {res:?}"
            );
        }
    }

    #[test]
    fn checks_replies_per_op() {
        assert!(check_reply(BenchOp::Read, 4, &McReply::Value(4)).is_ok());
        assert!(check_reply(BenchOp::Read, 4, &McReply::Value(5)).is_err());
        assert!(check_reply(BenchOp::Read, 4, &McReply::Miss).is_err());
        assert!(check_reply(BenchOp::Write, 4, &McReply::Stored).is_ok());
        assert!(check_reply(BenchOp::Write, 4, &McReply::NotStored).is_err());
        assert!(check_reply(BenchOp::Faa, 8, &McReply::Number(3)).is_ok());
        assert!(check_reply(BenchOp::Faa, 8, &McReply::NotFound).is_err());
        let e = check_reply(
            BenchOp::Write,
            4,
            &McReply::Error("SERVER_ERROR oom".into()),
        );
        assert_eq!(e.unwrap_err(), "memcached error: SERVER_ERROR oom");
    }
}
