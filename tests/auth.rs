//! Capabilities and authentication against real controller and memory-node processes
//! on 127.0.0.1: a cluster key shared by file and environment, memory nodes proving
//! they hold it, per-job client tokens, and soft-transport grants that are MAC'd,
//! expire, and die with their block's epoch.

mod common;

use common::{eventually, spawn, spawn_env, Proc};
use farpool::proto::{BlockGrant, ClusterKey, ControlError, Scope, Token};
use farpool::{Client, ClientConfig, ClientError};
use farpool_rdma::soft::SoftTransport;
use farpool_rdma::{OpError, RKey, RemoteAddr, Transport};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

const BS: u64 = 64 << 10;

/// A cluster: key file, controller (grants live `grant_ttl` seconds), one soft node.
struct Cluster {
    _dir: tempfile::TempDir,
    key: ClusterKey,
    key_file: PathBuf,
    ctl: Proc,
    _node: Proc,
}

fn cluster(grant_ttl: &str) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let key = ClusterKey::random();
    let key_file = dir.path().join("cluster.key");
    std::fs::write(&key_file, format!("{}\n", key.to_hex())).unwrap();
    let ctl = spawn(&[
        "controller",
        "--listen",
        "127.0.0.1:0",
        "--lease-secs",
        "30",
        "--heartbeat-ms",
        "100",
        "--grant-ttl-secs",
        grant_ttl,
        "--cluster-key-file",
        key_file.to_str().unwrap(),
    ]);
    // The node takes the key from the environment (the config layer's other source).
    let node = spawn_env(
        &memnode_args(&ctl.addr),
        &[("FARPOOL_CLUSTER_KEY", key.to_hex().as_str())],
    );
    Cluster {
        _dir: dir,
        key,
        key_file,
        ctl,
        _node: node,
    }
}

fn memnode_args(controller: &str) -> Vec<&str> {
    vec![
        "memnode",
        "--controller",
        controller,
        "--listen",
        "127.0.0.1:0",
        "--capacity",
        "1MiB",
        "--block-size",
        "64KiB",
        "--no-lock",
        "--no-hugepages",
    ]
}

impl Cluster {
    fn token(&self, scope: Scope, ttl_secs: i64) -> String {
        let now = farpool::proto::token::unix_now() as i64;
        Token::issue(&self.key, &scope, (now + ttl_secs).max(0) as u64).unwrap()
    }

    fn client(&self, token: Option<String>) -> Result<Client, ClientError> {
        let config = ClientConfig {
            token,
            reconnect_for: Duration::ZERO,
            ..ClientConfig::default()
        };
        Client::connect_with(&self.ctl.addr, config)
    }

    fn job(&self, job: &str) -> Client {
        self.client(Some(self.token(Scope::Job(job.into()), 3600)))
            .unwrap()
    }
}

fn op_error(e: &ClientError) -> Option<&OpError> {
    match e {
        ClientError::Transport(farpool_rdma::Error::Op(op)) => Some(op),
        ClientError::Transport(farpool_rdma::Error::Partial { error, .. }) => Some(error),
        _ => None,
    }
}

fn rkey(g: &BlockGrant) -> RKey {
    g.remote(0).rkey
}

fn raw_op(e: farpool_rdma::Error) -> OpError {
    match e {
        farpool_rdma::Error::Op(op) => op,
        other => panic!("expected an operation error, got {other}"),
    }
}

fn unauthenticated(r: Result<Client, ClientError>) -> String {
    match r {
        Err(ClientError::Control(ControlError::Unauthenticated(m))) => m,
        Err(e) => panic!("expected Unauthenticated, got {e}"),
        Ok(_) => panic!("expected Unauthenticated, got a connection"),
    }
}

#[test]
fn clients_need_a_valid_token_and_stay_inside_their_job() {
    let c = cluster("30");
    let admin = c.client(Some(c.token(Scope::Admin, 3600))).unwrap();
    assert!(eventually(Duration::from_secs(5), || admin
        .status()
        .is_ok_and(|s| s.nodes.iter().any(|n| n.alive))));

    // No token, a malformed one, a forged (bad MAC) one, an expired one, one issued
    // under another key: refused at the hello, each saying what to do.
    let m = unauthenticated(c.client(None));
    assert!(m.contains("FARPOOL_TOKEN"), "{m}");
    unauthenticated(c.client(Some("not-a-token".into())));
    let good = c.token(Scope::Job("a".into()), 3600);
    let (head, mac) = good.rsplit_once('.').unwrap();
    let flipped = format!(
        "{head}.{}{}",
        if mac.starts_with('0') { "1" } else { "0" },
        &mac[1..]
    );
    let m = unauthenticated(c.client(Some(flipped)));
    assert!(m.contains("MAC"), "{m}");
    let m = unauthenticated(c.client(Some(c.token(Scope::Job("a".into()), -10))));
    assert!(m.contains("expired"), "{m}");
    let other = Token::issue(
        &ClusterKey::random(),
        &Scope::Admin,
        farpool::proto::token::unix_now() + 3600,
    )
    .unwrap();
    unauthenticated(c.client(Some(other)));

    // `farpool token` issues what the controller accepts.
    let out = Command::new(common::bin())
        .args(["token", "--job", "a", "--ttl", "1h", "--cluster-key-file"])
        .arg(&c.key_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let issued = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let a = c.client(Some(issued)).unwrap();

    // Job a acts under /a only.
    let task = a.task("/a/s/t").unwrap();
    let blocks = task.alloc(BS).unwrap();
    blocks[0].write(0, b"mine").unwrap();
    let b = c.job("b");
    let tb = b.task("/b/s/t").unwrap();
    tb.alloc(BS).unwrap()[0].write(0, b"theirs").unwrap();
    let forbidden = |r: Result<(), ClientError>, what: &str| match r {
        Err(ClientError::Control(ControlError::Forbidden { path, job })) => {
            assert_eq!(job, "a", "{what}");
            assert!(path.as_str().starts_with("/b"), "{what}: {path}");
        }
        Err(e) => panic!("{what}: expected Forbidden, got {e}"),
        Ok(()) => panic!("{what}: job a acted under /b"),
    };
    forbidden(a.task("/b/s/x").map(drop), "open");
    forbidden(a.open_blocks("/b/s/t", false).map(drop), "lookup");
    forbidden(a.remove("/b").map(drop), "remove");
    forbidden(a.renew("/b").map(drop), "renew");
    forbidden(a.pin("/b/s/t", true), "pin");
    assert!(matches!(
        a.renew("/"),
        Err(ClientError::Control(ControlError::Forbidden { .. }))
    ));
    assert!(matches!(
        a.set_quota("/a", Some(1 << 20)),
        Err(ClientError::Control(ControlError::AdminOnly(_)))
    ));
    // Status shows a its own paths only; the admin sees everything.
    let st = a.status().unwrap();
    assert!(st.paths.iter().all(|p| p.path.as_str().starts_with("/a")));
    assert!(st.paths.iter().any(|p| p.path.as_str() == "/a/s/t"));
    assert!(admin
        .status()
        .unwrap()
        .paths
        .iter()
        .any(|p| p.path.as_str() == "/b/s/t"));
    admin.set_quota("/a", Some(1 << 20)).unwrap();
    // b's data is untouched, a's works.
    let mut buf = [0u8; 6];
    b.open_blocks("/b/s/t", false).unwrap()[0]
        .read(0, &mut buf)
        .unwrap();
    assert_eq!(&buf, b"theirs");
    let mut buf = [0u8; 4];
    blocks[0].read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"mine");
    assert!(a.remove("/a").is_ok());
}

#[test]
fn forged_replayed_expired_and_altered_grants_are_refused_and_data_is_unchanged() {
    let c = cluster("1");
    let b = c.job("b");
    assert!(eventually(Duration::from_secs(5), || b
        .status()
        .is_ok_and(|s| s.nodes.iter().any(|n| n.alive))));
    let a = c.job("a");

    // Job a allocates a block, keeps its grant, then frees it: b gets that memory.
    let ta = a.task("/a/s/t").unwrap();
    let old = ta.alloc(BS).unwrap().remove(0).grant();
    ta.close().unwrap();
    let tb = b.task("/b/s/t").unwrap();
    let victims = tb.alloc(16 * BS).unwrap();
    let victim = victims
        .iter()
        .find(|h| h.id() == old.block)
        .expect("the freed block is reallocated")
        .clone();
    let neighbour = victims
        .iter()
        .find(|h| h.id() != old.block)
        .unwrap()
        .clone();
    victim.write(0, b"victim data").unwrap();
    let ro = b.open_blocks("/b/s/t", false).unwrap();
    let ro_victim = ro.iter().find(|h| h.id() == old.block).unwrap().grant();
    let rw_victim = victim.grant();
    let raw = SoftTransport::connect(&rw_victim.endpoint.addr).unwrap();
    let at = |g: &BlockGrant, k: RKey| RemoteAddr::new(g.offset, k);
    let mut buf = [0u8; 11];

    // Replayed after free: a's old grant names the old epoch.
    let e = raw_op(raw.read(at(&old, rkey(&old)), &mut buf).unwrap_err());
    assert!(matches!(e, OpError::StaleEpoch { .. }), "{e}");
    let e = raw_op(raw.write(at(&old, rkey(&old)), b"pwned").unwrap_err());
    assert!(matches!(e, OpError::StaleEpoch { .. }), "{e}");
    // Forged: old grant's key moved to the current epoch, guessed keys, and the raw
    // block key derived under the wrong secret.
    for key in [rkey(&old).key, 1, u64::MAX, rw_victim.key ^ 1] {
        let k = RKey {
            key,
            ..rkey(&rw_victim)
        };
        let e = raw_op(raw.write(at(&rw_victim, k), b"pwned").unwrap_err());
        assert_eq!(e, OpError::AccessDenied, "key {key:#x}");
    }
    // Altered: rights upgraded ro -> rw (the MAC is the read-only one), expiry extended,
    // range widened to the neighbouring block, length past the block end.
    let e = raw_op(
        raw.write(at(&ro_victim, rkey(&ro_victim)), b"pwned")
            .unwrap_err(),
    );
    assert_eq!(e, OpError::ReadOnly);
    let longer = RKey {
        expiry: rkey(&rw_victim).expiry + 3600,
        ..rkey(&rw_victim)
    };
    let e = raw_op(raw.write(at(&rw_victim, longer), b"pwned").unwrap_err());
    assert_eq!(e, OpError::AccessDenied);
    let n = neighbour.grant();
    let e = raw_op(
        raw.write(RemoteAddr::new(n.offset, rkey(&rw_victim)), b"pwned")
            .unwrap_err(),
    );
    assert!(
        matches!(e, OpError::AccessDenied | OpError::StaleEpoch { .. }),
        "{e}"
    );
    let mut big = vec![0u8; BS as usize + 8];
    let e = raw_op(
        raw.read(at(&rw_victim, rkey(&rw_victim)), &mut big)
            .unwrap_err(),
    );
    assert!(matches!(e, OpError::OutOfBounds { .. }), "{e}");

    // Expired: the grant lives 1 s; after it, the node refuses it with a typed error.
    let expiry = rw_victim.expiry;
    assert!(expiry > 0, "soft grants expire");
    assert!(eventually(Duration::from_secs(5), || {
        farpool::proto::token::unix_now() > u64::from(expiry)
    }));
    let e = raw_op(
        raw.read(at(&rw_victim, rkey(&rw_victim)), &mut buf)
            .unwrap_err(),
    );
    assert!(matches!(e, OpError::GrantExpired { .. }), "{e}");
    let e = raw_op(
        raw.write(at(&rw_victim, rkey(&rw_victim)), b"pwned")
            .unwrap_err(),
    );
    assert!(matches!(e, OpError::GrantExpired { .. }), "{e}");

    // The data is unchanged, read through a valid grant: the handle re-fetches its
    // expired grant transparently.
    victim.read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"victim data");
    assert!(
        victim.grant().expiry > expiry,
        "the handle holds a fresh grant"
    );
    // Every operation keeps working across expiry: single ops, atomics, batches.
    std::thread::sleep(Duration::from_millis(2100));
    victim.write(16, b"more").unwrap();
    assert_eq!(victim.faa(32, 5).unwrap(), 0);
    assert_eq!(victim.cas(32, 5, 9).unwrap(), 5);
    std::thread::sleep(Duration::from_millis(2100));
    let mut b1 = [0u8; 4];
    let mut b2 = [0u8; 8];
    let mut ops = [
        victim.read_op(16, &mut b1).unwrap(),
        victim.read_op(32, &mut b2).unwrap(),
    ];
    victim.execute(&mut ops).unwrap();
    assert_eq!(&b1, b"more");
    assert_eq!(u64::from_le_bytes(b2), 9);
    // A read-only handle refreshes to a read-only grant.
    std::thread::sleep(Duration::from_millis(2100));
    let ro_h = ro.iter().find(|h| h.id() == old.block).unwrap();
    let mut back = [0u8; 11];
    ro_h.read(0, &mut back).unwrap();
    assert_eq!(&back, b"victim data");
    let e = ro_h.write(0, b"x").unwrap_err();
    assert!(matches!(op_error(&e), Some(OpError::ReadOnly)), "{e}");
}

#[test]
fn memory_nodes_without_the_cluster_key_cannot_register() {
    let c = cluster("30");
    let admin = c.client(Some(c.token(Scope::Admin, 3600))).unwrap();
    assert!(eventually(Duration::from_secs(5), || admin
        .status()
        .is_ok_and(|s| s.nodes.len() == 1)));
    let wrong = ClusterKey::random().to_hex();
    for (env, expect) in [
        (Some(wrong.as_str()), "same key"),
        (None, "requires the cluster key"),
    ] {
        let mut cmd = Command::new(common::bin());
        cmd.args(memnode_args(&c.ctl.addr))
            .env_remove("FARPOOL_CLUSTER_KEY")
            .env_remove("FARPOOL_CLUSTER_KEY_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(k) = env {
            cmd.env("FARPOOL_CLUSTER_KEY", k);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a node without the key registered");
        assert!(err.contains(expect), "{err}");
        assert!(err.contains("--cluster-key-file"), "{err}");
    }
    // Still exactly the one node with the key; a node given the key file by flag joins.
    assert_eq!(admin.status().unwrap().nodes.len(), 1);
    let mut args = memnode_args(&c.ctl.addr);
    let file = c.key_file.to_str().unwrap();
    args.extend(["--cluster-key-file", file]);
    let _second = spawn(&args);
    assert!(eventually(Duration::from_secs(5), || admin
        .status()
        .is_ok_and(|s| s.nodes.iter().filter(|n| n.alive).count() == 2)));
}
