//! Tests of the controller's TCP server: handshakes, node liveness, frees and
//! revocations over real sockets, malformed frames.

use super::super::{Controller, ControllerConfig};
use super::frame_buffered;
use crate::proto::frame::{read_msg, write_msg, FrameError};
use crate::proto::grant::WireTransport;
use crate::proto::{
    ClusterStatus, ControlError, ControllerMsg, Envelope, Hello, NodeMsg, NodeStats, Placement,
    PoolPath, Register, Request, Response, Role, Welcome, PROTOCOL_VERSION,
};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const BS: u64 = 4096;

fn config(dead_after: Duration) -> ControllerConfig {
    ControllerConfig {
        listen: "127.0.0.1:0".into(),
        heartbeat: Duration::from_millis(50),
        dead_after,
        ..ControllerConfig::default()
    }
}

fn connect(addr: SocketAddr, role: Role) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write_msg(
        &mut s,
        &Hello {
            version: PROTOCOL_VERSION,
            role,
        },
    )
    .unwrap();
    s
}

fn register(blocks: u64) -> Register {
    Register {
        data_addr: "127.0.0.1:1".into(),
        transport: WireTransport::Soft,
        capacity: blocks * BS,
        block_size: BS,
        hugepages: false,
        locked: false,
    }
}

fn node(addr: SocketAddr, blocks: u64) -> (TcpStream, u32) {
    let mut s = connect(addr, Role::MemNode(register(blocks)));
    match read_msg(&mut s).unwrap() {
        ControllerMsg::Registered {
            node_id,
            heartbeat_ms,
            initial_epoch,
            ..
        } => {
            assert_eq!(heartbeat_ms, 50);
            assert_eq!(initial_epoch, 1);
            (s, node_id)
        }
        other => panic!("{other:?}"),
    }
}

fn client(addr: SocketAddr) -> TcpStream {
    let mut s = connect(
        addr,
        Role::Client {
            name: "test".into(),
            token: None,
        },
    );
    let welcome: Welcome = read_msg(&mut s).unwrap();
    assert_eq!(welcome.version, PROTOCOL_VERSION);
    assert_eq!(welcome.lease_ms, 10_000);
    s
}

fn send(s: &mut TcpStream, id: u64, body: Request) {
    write_msg(s, &Envelope { id, body }).unwrap();
}

fn call(s: &mut TcpStream, id: u64, body: Request) -> Response {
    send(s, id, body);
    let resp: Envelope<Response> = read_msg(s).unwrap();
    assert_eq!(resp.id, id);
    resp.body
}

/// Asserts that nothing arrives on `s` for `d`.
fn assert_silent(s: &TcpStream, d: Duration) {
    s.set_read_timeout(Some(d)).unwrap();
    let mut b = [0u8; 1];
    let r = s.peek(&mut b);
    assert!(
        matches!(&r, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "{r:?}"
    );
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
}

/// Allocates a block to `path` and frees it without waiting for the
/// answer; returns the revocation the node received.
fn alloc_and_free(cl: &mut TcpStream, mem: &mut TcpStream, path: &PoolPath) -> Vec<(u32, u32)> {
    let resp = call(
        cl,
        1,
        Request::Alloc {
            path: path.clone(),
            bytes: BS,
            placement: Placement::LeastLoaded,
        },
    );
    let Response::Blocks(grants) = resp else {
        panic!("{resp:?}")
    };
    send(
        cl,
        2,
        Request::Free {
            path: path.clone(),
            blocks: vec![grants[0].block],
        },
    );
    match read_msg::<ControllerMsg>(mem).unwrap() {
        ControllerMsg::Revoke(blocks) => blocks,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_node_lost_before_confirming_releases_the_free() {
    let mut cfg = config(Duration::from_secs(30));
    cfg.revoke_wait = Duration::from_secs(60);
    let ctl = Controller::start(cfg).unwrap();
    let addr = ctl.local_addr();
    let (mut mem, _) = node(addr, 4);
    let mut cl = client(addr);
    let path = PoolPath::parse("/j/s/t").unwrap();
    let started = Instant::now();
    alloc_and_free(&mut cl, &mut mem, &path);
    assert_silent(&cl, Duration::from_millis(100));
    // The node disconnects without confirming: its blocks are lost anyway, so the
    // free is answered at once rather than after `revoke_wait`.
    drop(mem);
    let r: Envelope<Response> = read_msg(&mut cl).unwrap();
    assert_eq!(r.id, 2);
    assert!(matches!(r.body, Response::Ok), "{:?}", r.body);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!ctl.status().nodes.iter().any(|n| n.alive));
}

#[test]
fn an_unconfirmed_free_is_answered_after_revoke_wait() {
    let mut cfg = config(Duration::from_secs(30));
    cfg.revoke_wait = Duration::from_millis(200);
    let ctl = Controller::start(cfg).unwrap();
    let addr = ctl.local_addr();
    let (mut mem, _) = node(addr, 4);
    let mut cl = client(addr);
    let path = PoolPath::parse("/j/s/t").unwrap();
    let started = Instant::now();
    let blocks = alloc_and_free(&mut cl, &mut mem, &path);
    let r: Envelope<Response> = read_msg(&mut cl).unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(r.id, 2);
    assert!(matches!(r.body, Response::Ok), "{:?}", r.body);
    // The block still waits for its confirmation; a late one is accepted.
    assert_eq!(ctl.status().nodes[0].blocks_revoking, 1);
    write_msg(&mut mem, &NodeMsg::Revoked(blocks)).unwrap();
    eventually(&ctl, "late confirmation", |s| {
        s.nodes[0].blocks_revoking == 0
    });
    assert!(matches!(
        call(&mut cl, 3, Request::Status),
        Response::Status(_)
    ));
}

fn eventually(c: &Controller, what: &str, f: impl Fn(&ClusterStatus) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f(&c.status()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn alloc_free_revoke_over_tcp() {
    let ctl = Controller::start(config(Duration::from_secs(30))).unwrap();
    let addr = ctl.local_addr();
    let (mut mem, node_id) = node(addr, 4);
    let mut cl = client(addr);
    let path = PoolPath::parse("/job/stage/task").unwrap();

    // Pipelined: both requests before reading either response.
    write_msg(
        &mut cl,
        &Envelope {
            id: 1,
            body: Request::Alloc {
                path: path.clone(),
                bytes: 2 * BS,
                placement: Placement::LeastLoaded,
            },
        },
    )
    .unwrap();
    write_msg(
        &mut cl,
        &Envelope {
            id: 2,
            body: Request::Lookup {
                path: path.clone(),
                writable: false,
            },
        },
    )
    .unwrap();
    let r1: Envelope<Response> = read_msg(&mut cl).unwrap();
    let r2: Envelope<Response> = read_msg(&mut cl).unwrap();
    assert_eq!((r1.id, r2.id), (1, 2));
    let Response::Blocks(grants) = r1.body else {
        panic!("{:?}", r1.body)
    };
    assert_eq!(grants.len(), 2);
    assert!(grants
        .iter()
        .all(|g| g.block.node == node_id && g.epoch == 1));
    assert!(matches!(r2.body, Response::Blocks(ref ro) if ro.len() == 2 && !ro[0].writable));

    // Free, with a status request pipelined behind it: neither is answered before
    // the node confirmed the revocation, and then both in order.
    let freed = grants[0].block;
    let sent_at = Instant::now();
    send(
        &mut cl,
        3,
        Request::Free {
            path: path.clone(),
            blocks: vec![freed],
        },
    );
    send(&mut cl, 4, Request::Status);
    let msg: ControllerMsg = read_msg(&mut mem).unwrap();
    let ControllerMsg::Revoke(blocks) = msg else {
        panic!("{msg:?}")
    };
    assert_eq!(blocks, vec![(freed.index, 2)]);
    let st = ctl.status();
    assert_eq!(st.nodes[0].blocks_revoking, 1);
    assert_eq!(st.nodes[0].blocks_free, 2);
    // Other clients are served while the free waits.
    let mut other = client(addr);
    let resp = call(&mut other, 1, Request::Open { path: path.clone() });
    assert!(matches!(resp, Response::Ok), "{resp:?}");
    assert_silent(&cl, Duration::from_millis(100));

    // The node confirms late.
    std::thread::sleep(Duration::from_millis(300).saturating_sub(sent_at.elapsed()));
    write_msg(&mut mem, &NodeMsg::Heartbeat(NodeStats::default())).unwrap();
    write_msg(&mut mem, &NodeMsg::Revoked(blocks)).unwrap();
    let r3: Envelope<Response> = read_msg(&mut cl).unwrap();
    assert!(sent_at.elapsed() >= Duration::from_millis(300));
    assert_eq!(r3.id, 3);
    assert!(matches!(r3.body, Response::Ok), "{:?}", r3.body);
    // Confirmed in the state before the client heard back.
    let st = ctl.status();
    assert_eq!(st.nodes[0].blocks_revoking, 0);
    assert_eq!(st.nodes[0].blocks_free, 3);
    let r4: Envelope<Response> = read_msg(&mut cl).unwrap();
    assert_eq!(r4.id, 4);
    let Response::Status(st) = r4.body else {
        panic!("{:?}", r4.body)
    };
    assert_eq!(st.used_bytes, BS);
    assert_eq!(st.blocks_freed_total, 1);
    assert_eq!(st.paths.len(), 3);

    // Errors travel as responses and keep the session open.
    let resp = call(
        &mut cl,
        5,
        Request::Free {
            path: PoolPath::parse("/job").unwrap(),
            blocks: vec![grants[1].block],
        },
    );
    assert!(matches!(
        resp,
        Response::Error(ControlError::NotOwner { .. })
    ));

    // A dropped node connection marks the node dead; its block stays listed.
    drop(mem);
    eventually(&ctl, "node marked dead", |s| !s.nodes[0].alive);
    assert_eq!(ctl.status().used_bytes, BS);
    let resp = call(
        &mut cl,
        6,
        Request::Remove {
            path: PoolPath::parse("/job").unwrap(),
        },
    );
    assert!(matches!(
        resp,
        Response::Removed {
            blocks: 1,
            paths: 3
        }
    ));
    eventually(&ctl, "empty dead node dropped", |s| s.nodes.is_empty());
    ctl.shutdown();
    // The listener is closed after shutdown.
    assert!(TcpStream::connect(addr).is_err());
}

#[test]
fn a_malformed_frame_closes_only_its_own_connection() {
    let ctl = Controller::start(config(Duration::from_secs(30))).unwrap();
    let addr = ctl.local_addr();
    let mut good = client(addr);
    let mut bad = client(addr);
    bad.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).unwrap();
    let r: Result<Envelope<Response>, _> = read_msg(&mut bad);
    assert!(
        matches!(r, Err(FrameError::Closed) | Err(FrameError::Io(_))),
        "{r:?}"
    );
    let mut huge = client(addr);
    huge.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let r: Result<Envelope<Response>, _> = read_msg(&mut huge);
    assert!(r.is_err());

    let path = PoolPath::parse("/j").unwrap();
    assert!(matches!(
        call(&mut good, 1, Request::Open { path: path.clone() }),
        Response::Ok
    ));
    assert!(matches!(
        call(&mut good, 2, Request::Renew { prefix: path }),
        Response::Renewed { lease_ms: 10_000 }
    ));
}

#[test]
fn handshake_errors_are_reported() {
    let ctl = Controller::start(config(Duration::from_secs(30))).unwrap();
    let addr = ctl.local_addr();
    // Client with another version.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write_msg(
        &mut s,
        &Hello {
            version: PROTOCOL_VERSION + 1,
            role: Role::Client {
                name: "old".into(),
                token: None,
            },
        },
    )
    .unwrap();
    let r: Envelope<Response> = read_msg(&mut s).unwrap();
    assert_eq!(r.id, 0);
    assert!(matches!(
        r.body,
        Response::Error(ControlError::VersionMismatch { peer, .. }) if peer == PROTOCOL_VERSION + 1
    ));
    // Memory node with a bad region.
    let mut reg = register(4);
    reg.block_size = 1000;
    let mut s = connect(addr, Role::MemNode(reg));
    let r: ControllerMsg = read_msg(&mut s).unwrap();
    assert!(matches!(
        r,
        ControllerMsg::Error(ControlError::BadRegistration(_))
    ));
    assert!(ctl.status().nodes.is_empty());
}

#[test]
fn a_silent_node_is_declared_dead_and_told_so() {
    let ctl = Controller::start(config(Duration::from_millis(200))).unwrap();
    let (mut mem, node_id) = node(ctl.local_addr(), 4);
    // No heartbeats: the controller says goodbye and closes.
    let r: ControllerMsg = read_msg(&mut mem).unwrap();
    assert!(matches!(r, ControllerMsg::Error(ControlError::NoSuchNode(n)) if n == node_id));
    let r: Result<ControllerMsg, _> = read_msg(&mut mem);
    assert!(matches!(r, Err(FrameError::Closed)), "{r:?}");
    eventually(&ctl, "node dropped", |s| s.nodes.is_empty());
}

#[test]
fn heartbeats_keep_a_node_alive() {
    let ctl = Controller::start(config(Duration::from_millis(300))).unwrap();
    let (mut mem, _) = node(ctl.local_addr(), 4);
    for _ in 0..10 {
        write_msg(&mut mem, &NodeMsg::Heartbeat(NodeStats::default())).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = ctl.status();
    assert_eq!(st.nodes.len(), 1);
    assert!(st.nodes[0].alive);
    assert_eq!(st.capacity_bytes, 4 * BS);
}

#[test]
fn bad_configs_and_addresses_are_refused() {
    let mut c = config(Duration::from_secs(1));
    c.heartbeat = Duration::ZERO;
    assert!(Controller::start(c).is_err());
    let mut c = config(Duration::from_millis(10));
    c.heartbeat = Duration::from_millis(100);
    assert!(Controller::start(c).is_err(), "dead_after below heartbeat");
    for retry in [Duration::ZERO, super::super::MAX_FLUSH_BACKOFF * 2] {
        let mut c = config(Duration::from_secs(1));
        c.flush_retry = retry;
        let err = Controller::start(c).unwrap_err();
        assert!(err.to_string().contains("flush_retry"), "{err}");
    }
    let ctl = Controller::start(config(Duration::from_secs(1))).unwrap();
    let mut c = config(Duration::from_secs(1));
    c.listen = ctl.local_addr().to_string();
    let err = Controller::start(c).unwrap_err();
    assert!(err.to_string().contains("cannot listen"), "{err}");
}

#[tokio::test]
async fn start_and_drop_inside_an_async_context() {
    let ctl = Controller::start(config(Duration::from_secs(1))).unwrap();
    assert_ne!(ctl.local_addr().port(), 0);
    drop(ctl);
}

#[test]
fn frame_buffered_detects_complete_frames() {
    assert!(!frame_buffered(&[]));
    assert!(!frame_buffered(&[2, 0, 0]));
    assert!(!frame_buffered(&[2, 0, 0, 0, 1]));
    assert!(frame_buffered(&[2, 0, 0, 0, 1, 2]));
    assert!(frame_buffered(&[0, 0, 0, 0]));
}
