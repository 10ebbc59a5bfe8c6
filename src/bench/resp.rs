//! A minimal pipelined Redis client (RESP2) for the peer comparison.
//!
//! READ is `GET key` (keys pre-populated with values of the benchmark size), WRITE is
//! `SET key value`, FAA is `INCRBY key 1`. A batch of `depth` commands is written and
//! flushed once, then the `depth` replies are read in order (Redis pipelining).
//!
//! The data-structure workloads use the comparable commands: kv `get`/`put` are
//! GET/SET; queue `enqueue` is a timed RPUSH followed by an untimed LPOP on one list
//! shared by all clients (`dequeue` the other way round); file `append` is APPEND to a
//! per-client string (deleted, untimed, once it holds `slots * size` bytes) and file
//! `read` is GETRANGE of a random `size` slice of a pre-written string.

use super::args::{BenchOp, Plan, Workload};
use super::error::BenchError;
use super::load::{BatchOutcome, Connection};
use super::wire::{parse_int, read_block, read_line, ProtoError, Wire};
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

const SYSTEM: &str = "redis";

/// Commands per pipelined round trip while pre-populating.
const POPULATE_CHUNK: usize = 128;

/// Deepest nesting of arrays accepted in a reply.
const MAX_NESTING: usize = 8;

/// A parsed RESP reply. Bulk payloads are left in the caller's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `+text`
    Simple(String),
    /// `-message`
    Error(String),
    /// `:n`
    Integer(i64),
    /// `$len` followed by `len` bytes, or `$-1` (nil).
    Bulk(Option<usize>),
    /// `*n` followed by `n` replies (discarded), or `*-1` (nil).
    Array(Option<usize>),
}

/// Reads one reply. `line` and `bulk` are scratch buffers; a bulk payload is left at
/// the start of `bulk` (which may be longer).
pub(crate) fn read_reply<R: BufRead>(
    r: &mut R,
    line: &mut Vec<u8>,
    bulk: &mut Vec<u8>,
) -> Result<Reply, ProtoError> {
    read_nested(r, line, bulk, 0)
}

fn read_nested<R: BufRead>(
    r: &mut R,
    line: &mut Vec<u8>,
    bulk: &mut Vec<u8>,
    nesting: usize,
) -> Result<Reply, ProtoError> {
    read_line(r, line)?;
    let Some((&kind, rest)) = line.split_first() else {
        return Err(ProtoError::Malformed("empty reply line".into()));
    };
    let length = |rest: &[u8]| -> Result<Option<usize>, ProtoError> {
        match parse_int(rest) {
            Some(-1) => Ok(None),
            Some(n) if n >= 0 => usize::try_from(n)
                .map(Some)
                .map_err(|_| ProtoError::Malformed(format!("length {n} is too large"))),
            _ => Err(ProtoError::Malformed(format!(
                "invalid length {:?}",
                String::from_utf8_lossy(rest)
            ))),
        }
    };
    match kind {
        b'+' => Ok(Reply::Simple(String::from_utf8_lossy(rest).into_owned())),
        b'-' => Ok(Reply::Error(String::from_utf8_lossy(rest).into_owned())),
        b':' => parse_int(rest).map(Reply::Integer).ok_or_else(|| {
            ProtoError::Malformed(format!(
                "invalid integer reply {:?}",
                String::from_utf8_lossy(rest)
            ))
        }),
        b'$' => {
            let len = length(rest)?;
            if let Some(n) = len {
                read_block(r, n, bulk)?;
            }
            Ok(Reply::Bulk(len))
        }
        b'*' => {
            let len = length(rest)?;
            if nesting >= MAX_NESTING {
                return Err(ProtoError::Malformed(format!(
                    "arrays nested deeper than {MAX_NESTING}"
                )));
            }
            for _ in 0..len.unwrap_or(0) {
                read_nested(r, line, bulk, nesting + 1)?;
            }
            Ok(Reply::Array(len))
        }
        other => Err(ProtoError::Malformed(format!(
            "unknown reply type byte {:?} in line {:?}",
            other as char,
            String::from_utf8_lossy(line)
        ))),
    }
}

/// Appends a RESP command (an array of bulk strings) to `out`.
pub(crate) fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    // Writing into a Vec cannot fail.
    let _ = write!(out, "*{}\r\n", args.len());
    for a in args {
        let _ = write!(out, "${}\r\n", a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Whether `reply` is the expected answer to `op`; `Err` holds the message to count.
///
/// For the queue and file operations it checks the reply to the timed command (RPUSH
/// and APPEND: an integer; LPOP and GETRANGE: `size` bytes).
pub(crate) fn check_reply(op: BenchOp, size: u64, reply: &Reply) -> Result<(), String> {
    match (op, reply) {
        (_, Reply::Error(msg)) => Err(format!("redis error: {msg}")),
        (BenchOp::Get | BenchOp::Dequeue, Reply::Bulk(Some(n))) if *n as u64 == size => Ok(()),
        (BenchOp::Get | BenchOp::Dequeue, Reply::Bulk(n)) => Err(format!(
            "{} returned {} instead of {size} bytes",
            if op == BenchOp::Get { "GET" } else { "LPOP" },
            n.map_or_else(|| "nil".to_string(), |n| format!("{n} bytes"))
        )),
        (BenchOp::Put, Reply::Simple(s)) if s == "OK" => Ok(()),
        (BenchOp::Enqueue | BenchOp::Append, Reply::Integer(n)) if *n > 0 => Ok(()),
        (BenchOp::Read, Reply::Bulk(Some(n))) if *n as u64 == size => Ok(()),
        (BenchOp::Read, Reply::Bulk(Some(n))) => Err(format!(
            "GET returned {n} bytes instead of {size}; another writer changed the key"
        )),
        (BenchOp::Read, Reply::Bulk(None)) => {
            Err("GET returned nil: the key is missing (evicted? check redis maxmemory)".into())
        }
        (BenchOp::Write, Reply::Simple(s)) if s == "OK" => Ok(()),
        (BenchOp::Faa, Reply::Integer(_)) => Ok(()),
        (op, other) => Err(format!("unexpected reply {other:?} to {op}")),
    }
}

/// One benchmark client's connection to Redis.
pub(crate) struct RedisConn {
    wire: Wire,
    addr: String,
    workload: Workload,
    op: BenchOp,
    size: u64,
    /// The list (queue) or string (file) key of the structure workloads.
    key: Vec<u8>,
    /// Length at which the file string is deleted and started again.
    limit: u64,
    /// Encoded command per slot for GET and INCRBY; the key per slot for SET.
    per_slot: Vec<Vec<u8>>,
    value: Vec<u8>,
    out: Vec<u8>,
    line: Vec<u8>,
    bulk: Vec<u8>,
}

impl RedisConn {
    /// Connects client `client` to `addr` and pre-populates its keys `bench:{client}:{slot}`.
    pub(crate) fn connect(addr: &str, client: usize, plan: &Plan) -> Result<Self, BenchError> {
        let wire = Wire::connect(SYSTEM, addr)?;
        let keys: Vec<Vec<u8>> = (0..plan.slots)
            .map(|s| format!("bench:{client}:{s}").into_bytes())
            .collect();
        let value = super::payload(plan.size);
        let key = match plan.workload {
            Workload::Queue => b"bench:queue".to_vec(),
            _ => format!("bench:file:{client}").into_bytes(),
        };
        let mut conn = Self {
            wire,
            addr: addr.to_string(),
            workload: plan.workload,
            op: plan.op,
            size: plan.size,
            key,
            limit: (plan.slots * plan.size).max(plan.size),
            per_slot: Vec::new(),
            value,
            out: Vec::new(),
            line: Vec::new(),
            bulk: Vec::new(),
        };
        match (plan.workload, plan.op) {
            (Workload::Queue, _) => return Ok(conn),
            (Workload::File, BenchOp::Append) => {
                conn.out.clear();
                encode_command(&mut conn.out, &[b"DEL", &conn.key]);
                conn.exchange()?;
                return Ok(conn);
            }
            (Workload::File, _) => {
                let whole = super::payload(conn.limit);
                let key = conn.key.clone();
                conn.populate(&[key], &whole)?;
                return Ok(conn);
            }
            _ => {}
        }
        let initial: Vec<u8> = if plan.op == BenchOp::Faa {
            b"0".to_vec()
        } else {
            conn.value.clone()
        };
        conn.populate(&keys, &initial)?;
        conn.per_slot = match plan.op {
            BenchOp::Read | BenchOp::Get => keys
                .iter()
                .map(|k| {
                    let mut c = Vec::new();
                    encode_command(&mut c, &[b"GET", k]);
                    c
                })
                .collect(),
            BenchOp::Faa => keys
                .iter()
                .map(|k| {
                    let mut c = Vec::new();
                    encode_command(&mut c, &[b"INCRBY", k, b"1"]);
                    c
                })
                .collect(),
            _ => keys,
        };
        Ok(conn)
    }

    fn proto(&self, e: ProtoError) -> BenchError {
        e.into_bench(SYSTEM, &self.addr)
    }

    fn send(&mut self) -> Result<(), BenchError> {
        let io = |source| BenchError::PeerIo {
            system: SYSTEM,
            source,
        };
        self.wire.writer.write_all(&self.out).map_err(io)?;
        self.wire.writer.flush().map_err(io)
    }

    /// Sends the command in `out` and reads its reply.
    fn exchange(&mut self) -> Result<Reply, BenchError> {
        self.send()?;
        read_reply(&mut self.wire.reader, &mut self.line, &mut self.bulk).map_err(|e| self.proto(e))
    }

    /// One queue or file operation on `slot`: the timed part's latency and whether its
    /// reply was the expected one.
    fn structure_op(&mut self, slot: usize) -> Result<(Duration, Result<(), String>), BenchError> {
        self.out.clear();
        match (self.workload, self.op) {
            (Workload::Queue, _) => {
                encode_command(&mut self.out, &[b"RPUSH", &self.key, &self.value]);
                let t0 = Instant::now();
                let pushed = self.exchange()?;
                let t1 = Instant::now();
                self.out.clear();
                encode_command(&mut self.out, &[b"LPOP", &self.key]);
                let popped = self.exchange()?;
                let (took, reply) = if self.op == BenchOp::Enqueue {
                    (t1 - t0, pushed)
                } else {
                    (t1.elapsed(), popped)
                };
                Ok((took, check_reply(self.op, self.size, &reply)))
            }
            (Workload::File, BenchOp::Append) => {
                encode_command(&mut self.out, &[b"APPEND", &self.key, &self.value]);
                let t0 = Instant::now();
                let reply = self.exchange()?;
                let took = t0.elapsed();
                if let Reply::Integer(len) = reply {
                    if u64::try_from(len).unwrap_or(0) >= self.limit {
                        self.out.clear();
                        encode_command(&mut self.out, &[b"DEL", &self.key]);
                        self.exchange()?;
                    }
                }
                Ok((took, check_reply(self.op, self.size, &reply)))
            }
            (Workload::File, _) => {
                let start = slot as u64 * self.size;
                let end = start + self.size - 1;
                encode_command(
                    &mut self.out,
                    &[
                        b"GETRANGE",
                        &self.key,
                        start.to_string().as_bytes(),
                        end.to_string().as_bytes(),
                    ],
                );
                let t0 = Instant::now();
                let reply = self.exchange()?;
                let took = t0.elapsed();
                Ok((took, check_reply(BenchOp::Get, self.size, &reply)))
            }
            (w, op) => Err(BenchError::Args(format!(
                "--op {op} of {w} has no Redis equivalent"
            ))),
        }
    }

    fn populate(&mut self, keys: &[Vec<u8>], value: &[u8]) -> Result<(), BenchError> {
        for chunk in keys.chunks(POPULATE_CHUNK) {
            self.out.clear();
            for k in chunk {
                encode_command(&mut self.out, &[b"SET", k, value]);
            }
            self.send()?;
            for k in chunk {
                let reply = read_reply(&mut self.wire.reader, &mut self.line, &mut self.bulk)
                    .map_err(|e| self.proto(e))?;
                if reply != Reply::Simple("OK".into()) {
                    return Err(BenchError::PeerPopulate {
                        system: SYSTEM,
                        key: String::from_utf8_lossy(k).into_owned(),
                        reply: format!("{reply:?}"),
                    });
                }
            }
        }
        Ok(())
    }
}

impl Connection for RedisConn {
    fn run_batch(&mut self, slots: &[usize]) -> Result<BatchOutcome, BenchError> {
        if matches!(self.workload, Workload::Queue | Workload::File) {
            let mut outcome = BatchOutcome::default();
            let mut timed = Duration::ZERO;
            for &s in slots {
                let (took, checked) = self.structure_op(s)?;
                timed += took;
                if let Err(msg) = checked {
                    outcome.fail(|| msg);
                }
            }
            outcome.latency = Some(timed);
            return Ok(outcome);
        }
        self.out.clear();
        for &s in slots {
            let Some(entry) = self.per_slot.get(s) else {
                return Err(BenchError::Args(format!("slot {s} is out of range")));
            };
            if matches!(self.op, BenchOp::Write | BenchOp::Put) {
                encode_command(&mut self.out, &[b"SET", entry, &self.value]);
            } else {
                self.out.extend_from_slice(entry);
            }
        }
        self.send()?;
        let mut outcome = BatchOutcome::default();
        for _ in slots {
            let reply = read_reply(&mut self.wire.reader, &mut self.line, &mut self.bulk)
                .map_err(|e| self.proto(e))?;
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

    fn parse_all(input: &[u8]) -> Vec<Result<Reply, String>> {
        let mut r = input;
        let (mut line, mut bulk) = (Vec::new(), Vec::new());
        let mut out = Vec::new();
        while !r.is_empty() {
            let res = read_reply(&mut r, &mut line, &mut bulk);
            let stop = res.is_err();
            out.push(res.map_err(|e| format!("{e:?}")));
            if stop {
                break;
            }
        }
        out
    }

    #[test]
    fn parses_every_reply_type() {
        let got = parse_all(b"+OK\r\n-ERR wrong type\r\n:42\r\n$5\r\nhello\r\n$-1\r\n*2\r\n$1\r\na\r\n:1\r\n*-1\r\n$0\r\n\r\n");
        let got: Vec<_> = got.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            got,
            vec![
                Reply::Simple("OK".into()),
                Reply::Error("ERR wrong type".into()),
                Reply::Integer(42),
                Reply::Bulk(Some(5)),
                Reply::Bulk(None),
                Reply::Array(Some(2)),
                Reply::Array(None),
                Reply::Bulk(Some(0)),
            ]
        );
    }

    #[test]
    fn bulk_payload_lands_in_the_buffer() {
        let (mut line, mut bulk) = (Vec::new(), Vec::new());
        let mut r = &b"$12\r\nhello\r\nworld\r\n"[..];
        assert_eq!(
            read_reply(&mut r, &mut line, &mut bulk).unwrap(),
            Reply::Bulk(Some(12))
        );
        assert_eq!(&bulk[..12], b"hello\r\nworld");
    }

    #[test]
    fn refuses_malformed_replies() {
        for bad in [
            &b"?what\r\n"[..],
            b"$abc\r\n",
            b"$-5\r\n",
            b":12x\r\n",
            b"$3\r\nabcd\r\n",
            b"+OK\n",
            b"\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            let res = read_reply(&mut &bad[..], &mut Vec::new(), &mut Vec::new());
            assert!(
                matches!(res, Err(ProtoError::Malformed(_))),
                "{bad:?} -> {res:?}"
            );
        }
        for truncated in [&b"$5\r\nhel"[..], b"+OK", b""] {
            let res = read_reply(&mut &truncated[..], &mut Vec::new(), &mut Vec::new());
            assert!(
                matches!(res, Err(ProtoError::Io(_))),
                "{truncated:?} -> {res:?}"
            );
        }
    }

    #[test]
    fn encodes_commands() {
        let mut out = Vec::new();
        encode_command(&mut out, &[b"SET", b"k", b"v\r\n"]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n");
    }

    #[test]
    fn checks_replies_per_op() {
        assert!(check_reply(BenchOp::Read, 4, &Reply::Bulk(Some(4))).is_ok());
        assert!(check_reply(BenchOp::Read, 4, &Reply::Bulk(Some(3))).is_err());
        assert!(check_reply(BenchOp::Read, 4, &Reply::Bulk(None)).is_err());
        assert!(check_reply(BenchOp::Write, 4, &Reply::Simple("OK".into())).is_ok());
        assert!(check_reply(BenchOp::Write, 4, &Reply::Simple("QUEUED".into())).is_err());
        assert!(check_reply(BenchOp::Faa, 8, &Reply::Integer(7)).is_ok());
        let e = check_reply(BenchOp::Faa, 8, &Reply::Error("ERR not an integer".into()));
        assert_eq!(e.unwrap_err(), "redis error: ERR not an integer");
    }

    #[test]
    fn checks_structure_replies() {
        assert!(check_reply(BenchOp::Get, 4, &Reply::Bulk(Some(4))).is_ok());
        assert!(check_reply(BenchOp::Dequeue, 4, &Reply::Bulk(Some(4))).is_ok());
        let e = check_reply(BenchOp::Dequeue, 4, &Reply::Bulk(None)).unwrap_err();
        assert_eq!(e, "LPOP returned nil instead of 4 bytes");
        let e = check_reply(BenchOp::Get, 4, &Reply::Bulk(Some(2))).unwrap_err();
        assert_eq!(e, "GET returned 2 bytes instead of 4 bytes");
        assert!(check_reply(BenchOp::Put, 4, &Reply::Simple("OK".into())).is_ok());
        assert!(check_reply(BenchOp::Enqueue, 4, &Reply::Integer(3)).is_ok());
        assert!(check_reply(BenchOp::Append, 4, &Reply::Integer(8)).is_ok());
        assert!(check_reply(BenchOp::Append, 4, &Reply::Integer(0)).is_err());
        assert!(check_reply(BenchOp::Enqueue, 4, &Reply::Simple("OK".into())).is_err());
        assert!(check_reply(BenchOp::Scan, 4, &Reply::Integer(1)).is_err());
    }
}
