//! The soft server against misbehaving peers (raw sockets), and the soft client against
//! misbehaving servers. Every bad peer must get a clear error or a closed connection,
//! while a well-behaved client keeps its data and keeps being served.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use farpool_rdma::soft::frame::{
    decode_error, decode_response_header, encode_client_hello, RequestHeader, ResponseHeader,
    CLIENT_HELLO_LEN, MAGIC, REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN, SERVER_HELLO_LEN, STATUS_OK,
};
use farpool_rdma::soft::{SoftClientConfig, SoftServer, SoftServerConfig, SoftTransport};
use farpool_rdma::{
    AccessTable, Error, Op, OpError, OpStatus, RKey, Region, RegionOptions, RemoteAddr, Transport,
    TransportError,
};

const BLOCK: u64 = 256 * 1024;
const REGION: u64 = 8 * BLOCK;
const MAX_OP: u32 = 128 * 1024;

const GOOD: RKey = RKey {
    key: 0x600D_600D,
    epoch: 3,
    expiry: 0,
};
const OTHER: RKey = RKey {
    key: 0xBAD_BAD,
    epoch: 1,
    expiry: 0,
};
/// Block 1's key presented with block 0's epoch, so that the key check (not the epoch
/// check) refuses it.
const OTHER_AT_GOOD_EPOCH: RKey = RKey {
    key: OTHER.key,
    epoch: GOOD.epoch,
    expiry: 0,
};
const NO_KEY: RKey = RKey {
    key: 0,
    epoch: GOOD.epoch,
    expiry: 0,
};
/// Block 2, a scratch block a misbehaving client may legitimately write.
const SCRATCH: RKey = RKey {
    key: 0x05C2_A7C4,
    epoch: 0,
    expiry: 0,
};

struct Node {
    server: SoftServer,
    region: Arc<Region>,
    access: Arc<AccessTable>,
    good: SoftTransport,
    expected: Vec<u8>,
}

impl Node {
    fn start() -> Node {
        Self::start_with(SoftServerConfig {
            max_op_bytes: MAX_OP,
            max_connections: 64,
            ..SoftServerConfig::default()
        })
    }

    fn start_with(config: SoftServerConfig) -> Node {
        let opts = RegionOptions {
            hugepages: false,
            lock: false,
        };
        let region = Arc::new(Region::anonymous(REGION as usize, opts).unwrap());
        let access = Arc::new(AccessTable::new(REGION, BLOCK).unwrap());
        access.set(0, GOOD.epoch, GOOD.key, 0);
        access.set(1, OTHER.epoch, OTHER.key, 0);
        access.set(2, SCRATCH.epoch, SCRATCH.key, 0);
        let server =
            SoftServer::bind("127.0.0.1:0", region.clone(), access.clone(), config).unwrap();
        let good = SoftTransport::connect(&server.local_addr().to_string()).unwrap();
        let expected: Vec<u8> = (0..BLOCK).map(|i| (i * 7 % 251) as u8).collect();
        let at = RemoteAddr::new(0, GOOD);
        for (i, chunk) in expected.chunks(MAX_OP as usize).enumerate() {
            good.write(at.offset(i as u64 * u64::from(MAX_OP)), chunk)
                .unwrap();
        }
        Node {
            server,
            region,
            access,
            good,
            expected,
        }
    }

    /// The well-behaved client still sees its data and is still served.
    fn assert_good_client_ok(&self) {
        let mut back = vec![0u8; MAX_OP as usize];
        for i in 0..(BLOCK / u64::from(MAX_OP)) {
            let off = i * u64::from(MAX_OP);
            self.good
                .read(RemoteAddr::new(off, GOOD), &mut back)
                .unwrap();
            assert!(
                back[..] == self.expected[off as usize..off as usize + back.len()],
                "good client's data was modified"
            );
        }
        let v = self
            .good
            .fetch_add(RemoteAddr::new(BLOCK - 8, GOOD), 0)
            .unwrap();
        assert_eq!(v.to_le_bytes()[..], self.expected[BLOCK as usize - 8..]);
    }

    fn raw(&self) -> TcpStream {
        let mut s = TcpStream::connect(self.server.local_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&encode_client_hello()).unwrap();
        let mut hello = [0u8; SERVER_HELLO_LEN];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(hello[..8], MAGIC);
        assert_eq!(
            u32::from_le_bytes(hello[12..16].try_into().unwrap()),
            MAX_OP
        );
        s
    }
}

fn req(op: u8, len: u32, id: u64, addr: u64, rkey: RKey) -> Vec<u8> {
    RequestHeader {
        op,
        len,
        id,
        addr,
        rkey,
    }
    .encode()
    .to_vec()
}

/// Reads one response: header and payload.
fn response(s: &mut TcpStream) -> (ResponseHeader, Vec<u8>) {
    let mut h = [0u8; RESPONSE_HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let h = decode_response_header(&h).unwrap().unwrap();
    let mut payload = vec![0u8; h.len as usize];
    s.read_exact(&mut payload).unwrap();
    (h, payload)
}

fn error_response(s: &mut TcpStream, id: u64) -> OpError {
    let (h, p) = response(s);
    assert_eq!(h.id, id);
    assert_ne!(h.status, STATUS_OK, "expected an error status");
    decode_error(h.status, &p).unwrap()
}

/// The server closed the connection (EOF or reset), within the read timeout.
fn assert_closed(s: &mut TcpStream) {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return,
            Ok(_) => continue, // drain anything sent before the close
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
            Err(e) => panic!("connection not closed: {e}"),
        }
    }
}

#[test]
fn op_errors_keep_the_connection() {
    let node = Node::start();
    let mut s = node.raw();
    // Out of range, past a block, misaligned, no key, wrong key, stale, read-only
    // semantics are covered by the conformance suite; here each arrives over a raw
    // socket, pipelined in one write, and the connection keeps going.
    let mut batch = Vec::new();
    batch.extend(req(1, 8, 1, REGION + 8, GOOD)); // past the region
    batch.extend(req(1, 16, 2, BLOCK - 8, GOOD)); // across the block end
    batch.extend(req(4, 8, 3, 3, GOOD)); // misaligned FAA
    batch.extend(1u64.to_le_bytes());
    batch.extend(req(1, 8, 4, 0, NO_KEY)); // missing key
    batch.extend(req(2, 4, 5, 0, OTHER_AT_GOOD_EPOCH)); // another block's key
    batch.extend(b"evil");
    batch.extend(req(
        3,
        8,
        6,
        0,
        RKey {
            key: GOOD.key,
            epoch: 2,
            expiry: 0,
        },
    )); // stale CAS
    batch.extend(0u64.to_le_bytes());
    batch.extend(1u64.to_le_bytes());
    batch.extend(req(1, MAX_OP + 1, 7, 0, GOOD)); // oversized READ
    batch.extend(req(1, 4, 8, 0, GOOD)); // and a good one after all that
    s.write_all(&batch).unwrap();

    assert_eq!(
        error_response(&mut s, 1),
        OpError::OutOfBounds {
            addr: REGION + 8,
            len: 8,
            start: 0,
            end: REGION
        }
    );
    assert_eq!(
        error_response(&mut s, 2),
        OpError::OutOfBounds {
            addr: BLOCK - 8,
            len: 16,
            start: 0,
            end: BLOCK
        }
    );
    assert_eq!(error_response(&mut s, 3), OpError::Misaligned { addr: 3 });
    assert_eq!(error_response(&mut s, 4), OpError::AccessDenied);
    assert_eq!(error_response(&mut s, 5), OpError::AccessDenied);
    assert_eq!(
        error_response(&mut s, 6),
        OpError::StaleEpoch {
            granted: 2,
            current: 3
        }
    );
    assert_eq!(
        error_response(&mut s, 7),
        OpError::TooLarge {
            len: u64::from(MAX_OP) + 1,
            max: u64::from(MAX_OP)
        }
    );
    let (h, p) = response(&mut s);
    assert_eq!((h.id, h.status), (8, STATUS_OK));
    assert_eq!(p, node.expected[..4]);
    node.assert_good_client_ok();
    assert!(node.server.stats().op_errors >= 7);
    assert_eq!(node.server.stats().protocol_errors, 0);
}

#[test]
fn refused_writes_skip_their_payload() {
    let node = Node::start();
    let mut s = node.raw();
    // A small and a streamed (larger than the server's 64 KiB input buffer) WRITE, both
    // under the wrong key: refused, payload consumed, the stream stays in sync.
    let big = vec![0xAAu8; MAX_OP as usize];
    let mut batch = req(2, 16, 1, 0, OTHER_AT_GOOD_EPOCH);
    batch.extend([0xAA; 16]);
    batch.extend(req(2, MAX_OP, 2, 0, OTHER_AT_GOOD_EPOCH));
    batch.extend(&big);
    batch.extend(req(
        2,
        MAX_OP,
        3,
        2 * BLOCK,
        RKey {
            key: 0,
            epoch: 0,
            expiry: 0,
        },
    ));
    batch.extend(&big);
    batch.extend(req(1, 8, 4, 0, GOOD));
    s.write_all(&batch).unwrap();
    assert_eq!(error_response(&mut s, 1), OpError::AccessDenied);
    assert_eq!(error_response(&mut s, 2), OpError::AccessDenied);
    assert_eq!(error_response(&mut s, 3), OpError::AccessDenied);
    let (h, p) = response(&mut s);
    assert_eq!((h.id, h.status), (4, STATUS_OK));
    assert_eq!(p, node.expected[..8]);
    // The refused payloads went nowhere.
    let mut b = vec![0u8; MAX_OP as usize];
    node.region.read(2 * BLOCK, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    node.assert_good_client_ok();
}

#[test]
fn malformed_header_closes_only_that_connection() {
    let node = Node::start();
    for (what, mut frame) in [
        ("flags", {
            let mut f = req(1, 8, 1, 0, GOOD);
            f[1] = 0x80;
            f
        }),
        ("reserved", {
            let mut f = req(1, 8, 1, 0, GOOD);
            f[2] = 1;
            f
        }),
        ("atomic length", req(4, 16, 1, 0, GOOD)),
    ] {
        let mut s = node.raw();
        frame.extend([0u8; 16]);
        s.write_all(&frame).unwrap();
        let mut b = [0u8; 16];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("{what}: expected close, got {other:?}"),
        }
        node.assert_good_client_ok();
    }
    assert!(node.server.stats().protocol_errors >= 3);
}

#[test]
fn truncated_frames_at_eof() {
    let node = Node::start();
    // Half a header, then EOF.
    let mut s = node.raw();
    s.write_all(&req(1, 8, 1, 0, GOOD)[..20]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_closed(&mut s);
    // A WRITE header with only part of its payload (small and streamed), then EOF. (A
    // streamed WRITE may land partially, as an RDMA WRITE cut off by a failure: that is
    // why it targets the scratch block.)
    for len in [64u32, MAX_OP] {
        let mut s = node.raw();
        let mut f = req(2, len, 1, 2 * BLOCK, SCRATCH);
        f.extend(vec![0x55u8; len as usize / 2]);
        s.write_all(&f).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        assert_closed(&mut s);
    }
    node.assert_good_client_ok();
    // Waiting for the server threads to notice is not needed: the counter is bumped
    // before the close is visible to the peer.
    assert!(node.server.stats().protocol_errors >= 3);
}

#[test]
fn oversized_write_gets_too_large_then_close() {
    let node = Node::start();
    let mut s = node.raw();
    s.write_all(&req(2, u32::MAX, 9, 0, GOOD)).unwrap();
    // Some payload that must never reach the region.
    let _ = s.write_all(&[0xCC; 4096]);
    assert_eq!(
        error_response(&mut s, 9),
        OpError::TooLarge {
            len: u64::from(u32::MAX),
            max: u64::from(MAX_OP)
        }
    );
    assert_closed(&mut s);
    node.assert_good_client_ok();
}

#[test]
fn unknown_op_gets_status_then_close() {
    let node = Node::start();
    let mut s = node.raw();
    s.write_all(&req(0x77, 8, 5, 0, GOOD)).unwrap();
    assert_eq!(error_response(&mut s, 5), OpError::UnknownOp(0x77));
    assert_closed(&mut s);
    let mut s = node.raw();
    s.write_all(&req(0, 0, 6, 0, GOOD)).unwrap();
    assert_eq!(error_response(&mut s, 6), OpError::UnknownOp(0));
    assert_closed(&mut s);
    node.assert_good_client_ok();
}

#[test]
fn bad_preambles() {
    let node = Node::start();
    let addr = node.server.local_addr();
    // Wrong magic: closed without an answer.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_closed(&mut s);
    // Wrong version: the server says which version it speaks, then closes.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = encode_client_hello();
    hello[8..12].copy_from_slice(&99u32.to_le_bytes());
    s.write_all(&hello).unwrap();
    let mut reply = [0u8; SERVER_HELLO_LEN];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply[..8], MAGIC);
    assert_eq!(u32::from_le_bytes(reply[8..12].try_into().unwrap()), 1);
    assert_closed(&mut s);
    // Short preamble then EOF.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&encode_client_hello()[..CLIENT_HELLO_LEN - 1])
        .unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_closed(&mut s);
    node.assert_good_client_ok();
    assert!(node.server.stats().protocol_errors >= 3);
}

#[test]
fn garbage_never_hurts_the_node() {
    let node = Node::start();
    let mut x: u64 = 0x1234_5678_9ABC_DEF1;
    for round in 0..40 {
        let mut s = node.raw();
        let len = 1 + (round * 97) % 3000;
        let garbage: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = s.write_all(&garbage);
        let _ = s.shutdown(Shutdown::Write);
        // Whatever the server made of it, it answers or closes; it never hangs.
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    node.assert_good_client_ok();
}

#[test]
fn revocation_while_connected() {
    let node = Node::start();
    let mut s = node.raw();
    node.access.set(0, GOOD.epoch + 1, 0, 0);
    let mut f = req(2, 4, 1, 0, GOOD);
    f.extend(b"late");
    s.write_all(&f).unwrap();
    assert_eq!(
        error_response(&mut s, 1),
        OpError::StaleEpoch {
            granted: GOOD.epoch,
            current: GOOD.epoch + 1
        }
    );
    assert!(matches!(
        node.good.write(RemoteAddr::new(0, GOOD), b"late"),
        Err(Error::Op(OpError::StaleEpoch { .. }))
    ));
    let mut b = [0u8; 4];
    node.region.read(0, &mut b).unwrap();
    assert_eq!(b, node.expected[..4]);
}

#[test]
fn connection_limit() {
    let node = Node::start_with(SoftServerConfig {
        max_op_bytes: MAX_OP,
        max_connections: 1,
        ..SoftServerConfig::default()
    });
    // The good client holds the only connection.
    let e = SoftTransport::connect(&node.server.local_addr().to_string()).unwrap_err();
    assert!(
        matches!(e, TransportError::Protocol(ref m) if m.contains("refused")),
        "{e}"
    );
    node.assert_good_client_ok();
}

#[test]
fn shutdown_closes_clients() {
    let node = Node::start();
    node.assert_good_client_ok();
    node.server.shutdown();
    let mut b = [0u8; 8];
    let r = node.good.read(RemoteAddr::new(0, GOOD), &mut b);
    assert!(matches!(r, Err(Error::Transport(_))), "{r:?}");
    assert_eq!(node.server.stats().connections, 0);
    node.server.shutdown(); // idempotent
}

/// A fake memory node: answers the preamble, then runs `script` on the connection.
fn fake_server(script: fn(TcpStream)) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let mut hello = [0u8; CLIENT_HELLO_LEN];
            if s.read_exact(&mut hello).is_err() {
                continue;
            }
            let mut reply = [0u8; SERVER_HELLO_LEN];
            reply[..8].copy_from_slice(&MAGIC);
            reply[8..12].copy_from_slice(&1u32.to_le_bytes());
            reply[12..16].copy_from_slice(&4096u32.to_le_bytes());
            let _ = s.write_all(&reply);
            script(s);
        }
    });
    addr
}

fn read_requests(s: &mut TcpStream, n: usize) {
    let mut h = [0u8; REQUEST_HEADER_LEN];
    for _ in 0..n {
        s.read_exact(&mut h).unwrap();
    }
}

#[test]
fn client_aborts_unanswered_ops_when_the_node_dies() {
    let addr = fake_server(|mut s| {
        read_requests(&mut s, 3);
        let ok = ResponseHeader {
            id: 1,
            status: STATUS_OK,
            len: 4,
        };
        let _ = s.write_all(&ok.encode());
        let _ = s.write_all(b"data");
        // Then die with two requests unanswered.
    });
    let t = SoftTransport::connect_with(
        &addr,
        SoftClientConfig {
            max_connections: 1,
            connect_timeout: Duration::from_secs(5),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(t.max_op_bytes(), 4096);
    let (mut a, mut b, mut c) = ([0u8; 4], [0u8; 4], [0u8; 4]);
    let at = RemoteAddr::new(0, GOOD);
    let mut ops = [
        Op::read(at, &mut a),
        Op::read(at, &mut b),
        Op::read(at, &mut c),
    ];
    let r = t.execute(&mut ops);
    assert!(
        matches!(r, Err(Error::Transport(TransportError::Closed))),
        "{r:?}"
    );
    assert_eq!(ops[1].status, OpStatus::Done);
    assert_eq!(ops[0].outcome(), Err(OpError::Aborted));
    assert_eq!(ops[2].outcome(), Err(OpError::Aborted));
    drop(ops);
    assert_eq!(&b, b"data");
    // Oversized ops never reach the wire.
    let mut big = vec![0u8; 4097];
    assert!(matches!(
        t.read(at, &mut big),
        Err(Error::Op(OpError::TooLarge {
            len: 4097,
            max: 4096
        }))
    ));
}

#[test]
fn client_times_out_on_a_node_that_stops_answering() {
    // Accepts the preamble, swallows requests and never answers nor closes.
    let addr = fake_server(|mut s| {
        let mut sink = [0u8; 4096];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    });
    let timeout = Duration::from_millis(200);
    let t = SoftTransport::connect_with(
        &addr,
        SoftClientConfig {
            max_connections: 1,
            io_timeout: Some(timeout),
            ..Default::default()
        },
    )
    .unwrap();
    let at = RemoteAddr::new(0, GOOD);
    for _ in 0..2 {
        let mut a = [0u8; 4];
        let mut ops = [Op::read(at, &mut a), Op::write(at, b"abcd")];
        let started = std::time::Instant::now();
        let r = t.execute(&mut ops);
        let took = started.elapsed();
        assert!(
            matches!(&r, Err(Error::Transport(TransportError::Io(e))) if e.kind() == ErrorKind::TimedOut),
            "{r:?}"
        );
        assert!(
            took >= timeout && took < Duration::from_secs(10),
            "{took:?}"
        );
        assert_eq!(ops[0].outcome(), Err(OpError::Aborted));
        assert_eq!(ops[1].outcome(), Err(OpError::Aborted));
        // The hung connection left the pool; the next call dials afresh.
        assert_eq!(t.open_connections(), 0);
    }
}

#[test]
fn client_rejects_bogus_responses() {
    // A response for an id that was never sent.
    let addr = fake_server(|mut s| {
        read_requests(&mut s, 1);
        let bogus = ResponseHeader {
            id: 42,
            status: STATUS_OK,
            len: 0,
        };
        let _ = s.write_all(&bogus.encode());
        let mut sink = [0u8; 64];
        let _ = s.read(&mut sink);
    });
    let t = SoftTransport::connect(&addr).unwrap();
    let r = t.write(RemoteAddr::new(0, GOOD), b"x");
    assert!(
        matches!(r, Err(Error::Transport(TransportError::Protocol(ref m))) if m.contains("42")),
        "{r:?}"
    );
    // A success response of the wrong length for a READ.
    let addr = fake_server(|mut s| {
        read_requests(&mut s, 1);
        let bogus = ResponseHeader {
            id: 0,
            status: STATUS_OK,
            len: 3,
        };
        let _ = s.write_all(&bogus.encode());
        let _ = s.write_all(b"abc");
        let mut sink = [0u8; 64];
        let _ = s.read(&mut sink);
    });
    let t = SoftTransport::connect(&addr).unwrap();
    let mut b = [0u8; 8];
    let r = t.read(RemoteAddr::new(0, GOOD), &mut b);
    assert!(
        matches!(r, Err(Error::Transport(TransportError::Protocol(_)))),
        "{r:?}"
    );
}

#[test]
fn client_rejects_non_farpool_servers() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n");
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let e = SoftTransport::connect(&addr).unwrap_err();
    assert!(e.to_string().contains("not a farpool"), "{e}");
    // Nothing listening.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let e = SoftTransport::connect(&dead_addr).unwrap_err();
    assert!(matches!(e, TransportError::Connect { .. }), "{e}");
    assert!(SoftTransport::connect("not an address").is_err());
}
