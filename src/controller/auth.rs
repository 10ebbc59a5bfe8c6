//! Who may do what: client tokens and scopes, and the memory-node registration
//! challenge.
//!
//! Without a cluster key (development mode) every client may act everywhere and memory
//! nodes register without proof. With one, a client's hello must carry a token
//! ([`crate::proto::token`]) signed with the key; a job token confines every request to
//! `/JOB` and below, and memory nodes answer a challenge ([`challenge_node`]).

use crate::proto::frame::{read_msg_async, write_msg_async};
use crate::proto::key::{macs_equal, Challenge};
use crate::proto::{
    ClusterKey, ClusterStatus, ControlError, ControllerMsg, NodeMsg, PoolPath, Request, Scope,
    Token,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// How long a memory node may take to answer the challenge.
const PROOF_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What one client connection may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Access {
    /// Development mode: everything.
    Open,
    /// Authenticated with a token: its scope, until its expiry (seconds since the Unix
    /// epoch).
    Token {
        /// What the token allows.
        scope: Scope,
        /// When it stops being honoured.
        expiry: u64,
    },
}

/// The access a client hello earns: `Open` without a cluster key, else the verified
/// token's scope.
pub(crate) fn client_access(
    key: Option<&ClusterKey>,
    token: Option<&str>,
    now: u64,
) -> Result<Access, ControlError> {
    let Some(key) = key else {
        return Ok(Access::Open);
    };
    let Some(text) = token else {
        return Err(ControlError::Unauthenticated(
            "this controller requires a client token; set FARPOOL_TOKEN (or --token) to one issued by `farpool token --job NAME` with the cluster key".into(),
        ));
    };
    let token = Token::decode(text).map_err(|e| ControlError::Unauthenticated(e.to_string()))?;
    let scope = token
        .verify(key, now)
        .map_err(|e| ControlError::Unauthenticated(e.to_string()))?;
    Ok(Access::Token {
        scope,
        expiry: token.expiry,
    })
}

/// The path a request acts on, if any.
fn request_path(req: &Request) -> Option<&PoolPath> {
    match req {
        Request::Open { path }
        | Request::Alloc { path, .. }
        | Request::Free { path, .. }
        | Request::Lookup { path, .. }
        | Request::Remove { path }
        | Request::SetQuota { path, .. }
        | Request::Pin { path, .. }
        | Request::AllocReplicated { path, .. }
        | Request::Refresh { path, .. }
        | Request::Map { path, .. }
        | Request::FenceAcquire { path, .. }
        | Request::FenceRenew { path, .. }
        | Request::FenceRelease { path, .. } => Some(path),
        Request::Renew { prefix } => Some(prefix),
        Request::Status => None,
    }
}

/// Whether `path` is `/job` or below it.
fn under_job(path: &PoolPath, job: &str) -> bool {
    path.components().next() == Some(job)
}

impl Access {
    /// Checks `req` against this access at `now` (seconds since the Unix epoch).
    pub(crate) fn check(&self, req: &Request, now: u64) -> Result<(), ControlError> {
        let Access::Token { scope, expiry } = self else {
            return Ok(());
        };
        if now >= *expiry {
            return Err(ControlError::Unauthenticated(format!(
                "the client token expired at {expiry} (now {now}); issue a new one with `farpool token` and reconnect"
            )));
        }
        let Scope::Job(job) = scope else {
            return Ok(());
        };
        if let Request::SetQuota { .. } = req {
            return Err(ControlError::AdminOnly("setting a quota".into()));
        }
        // The controller writes a mapped object to its backing URL with its own rights,
        // so only an admin may name one; a job may still unmap its own paths.
        if let Request::Map {
            backing: Some(_), ..
        } = req
        {
            return Err(ControlError::AdminOnly(
                "mapping a path to a backing URL (the controller writes there with its own rights)"
                    .into(),
            ));
        }
        match request_path(req) {
            Some(path) if !under_job(path, job) => Err(ControlError::Forbidden {
                path: path.clone(),
                job: job.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Hides from `status` the paths a job token may not see (nodes and totals stay).
    pub(crate) fn filter_status(&self, status: &mut ClusterStatus) {
        if let Access::Token {
            scope: Scope::Job(job),
            ..
        } = self
        {
            status.paths.retain(|u| under_job(&u.path, job));
        }
    }
}

/// Runs the registration challenge with a memory node that sent `node_nonce` and
/// claims `identity`: sends the controller's nonce and proof, then checks the node's
/// proof. On failure the node is told why (naming the fix) and the error is returned.
pub(crate) async fn challenge_node<R, W>(
    rd: &mut R,
    wr: &mut W,
    key: &ClusterKey,
    node_nonce: [u8; 16],
    identity: &[u8],
) -> Result<(), ControlError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let challenge = Challenge {
        node_nonce,
        controller_nonce: rand::random(),
    };
    let msg = ControllerMsg::Challenge {
        nonce: challenge.controller_nonce,
        proof: key.controller_proof(&challenge, identity),
    };
    let io = |e: String| ControlError::Unauthenticated(format!("challenge failed: {e}"));
    write_msg_async(wr, &msg)
        .await
        .map_err(|e| io(e.to_string()))?;
    wr.flush().await.map_err(|e| io(e.to_string()))?;
    let answer = tokio::time::timeout(PROOF_TIMEOUT, read_msg_async::<NodeMsg>(rd))
        .await
        .map_err(|_| io("no proof within 10 s".into()))?
        .map_err(|e| io(e.to_string()))?;
    let ok = matches!(answer, NodeMsg::Proof(p) if macs_equal(&p, &key.node_proof(&challenge, identity)));
    if ok {
        return Ok(());
    }
    let e = ControlError::Unauthenticated(
        "the memory node's proof does not match the controller's cluster key; give the node the same key (--cluster-key-file or FARPOOL_CLUSTER_KEY) as the controller".into(),
    );
    let _ = write_msg_async(wr, &ControllerMsg::Error(e.clone())).await;
    let _ = wr.flush().await;
    Err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ClusterKey {
        ClusterKey::from_bytes([5; 16])
    }

    fn path(s: &str) -> PoolPath {
        PoolPath::parse(s).unwrap()
    }

    /// A node answering the challenge with a wrong proof is refused by the controller;
    /// with the right proof it registers, and the secret is not sent.
    #[test]
    fn controller_checks_node_proofs_and_never_sends_the_secret() {
        use crate::controller::{Controller, ControllerConfig};
        use crate::proto::frame::{read_msg, write_msg};
        use crate::proto::{node_identity, Hello, Register, Role, WireTransport, PROTOCOL_VERSION};
        use std::net::TcpStream;
        let ctl = Controller::start(ControllerConfig {
            listen: "127.0.0.1:0".into(),
            cluster_key: Some(key()),
            ..ControllerConfig::default()
        })
        .unwrap();
        let register = Register {
            data_addr: "127.0.0.1:1".into(),
            transport: WireTransport::Soft,
            capacity: 4 << 16,
            block_size: 1 << 16,
            hugepages: false,
            locked: false,
        };
        let hello = |s: &mut TcpStream, nonce: [u8; 16]| {
            write_msg(
                s,
                &Hello {
                    version: PROTOCOL_VERSION,
                    role: Role::MemNodeResumable {
                        register: register.clone(),
                        incarnation: 7,
                        nonce,
                    },
                },
            )
            .unwrap();
            match read_msg::<ControllerMsg>(s).unwrap() {
                ControllerMsg::Challenge { nonce, proof } => (nonce, proof),
                other => panic!("expected a challenge, got {other:?}"),
            }
        };
        let identity = node_identity(&register, 7);
        let open = || {
            let s = TcpStream::connect(ctl.local_addr()).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            s
        };
        // Wrong proof (made with another key): refused, naming the fix.
        let mut s = open();
        let (cn, proof) = hello(&mut s, [1; 16]);
        let challenge = Challenge {
            node_nonce: [1; 16],
            controller_nonce: cn,
        };
        assert_eq!(proof, key().controller_proof(&challenge, &identity));
        let wrong = ClusterKey::from_bytes([6; 16]).node_proof(&challenge, &identity);
        write_msg(&mut s, &NodeMsg::Proof(wrong)).unwrap();
        match read_msg::<ControllerMsg>(&mut s).unwrap() {
            ControllerMsg::Error(ControlError::Unauthenticated(m)) => {
                assert!(m.contains("--cluster-key-file"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        // A proof replayed on a new connection fails too (fresh controller nonce).
        let good = key().node_proof(&challenge, &identity);
        let mut s = open();
        let (cn2, _) = hello(&mut s, [1; 16]);
        assert_ne!(cn2, cn);
        write_msg(&mut s, &NodeMsg::Proof(good)).unwrap();
        assert!(matches!(
            read_msg::<ControllerMsg>(&mut s).unwrap(),
            ControllerMsg::Error(ControlError::Unauthenticated(_))
        ));
        assert!(ctl.status().nodes.is_empty());
        // The right proof registers; no secret crosses the wire.
        let mut s = open();
        let (cn3, _) = hello(&mut s, [2; 16]);
        let c3 = Challenge {
            node_nonce: [2; 16],
            controller_nonce: cn3,
        };
        write_msg(&mut s, &NodeMsg::Proof(key().node_proof(&c3, &identity))).unwrap();
        match read_msg::<ControllerMsg>(&mut s).unwrap() {
            ControllerMsg::Registered { secret, .. } => assert_eq!(secret, None),
            other => panic!("{other:?}"),
        }
        assert_eq!(ctl.status().nodes.len(), 1);
    }

    #[test]
    fn development_mode_allows_everything() {
        let a = client_access(None, None, 10).unwrap();
        assert_eq!(a, Access::Open);
        assert!(a
            .check(
                &Request::SetQuota {
                    path: path("/x"),
                    bytes: None
                },
                10
            )
            .is_ok());
    }

    #[test]
    fn tokens_are_required_verified_and_scoped() {
        let k = key();
        assert!(matches!(
            client_access(Some(&k), None, 10),
            Err(ControlError::Unauthenticated(_))
        ));
        assert!(matches!(
            client_access(Some(&k), Some("junk"), 10),
            Err(ControlError::Unauthenticated(_))
        ));
        let t = Token::issue(&k, &Scope::Job("a".into()), 100).unwrap();
        let other = ClusterKey::from_bytes([6; 16]);
        assert!(client_access(Some(&other), Some(&t), 10).is_err());
        assert!(client_access(Some(&k), Some(&t), 100).is_err(), "expired");
        let a = client_access(Some(&k), Some(&t), 10).unwrap();
        assert!(a
            .check(
                &Request::Open {
                    path: path("/a/s/t")
                },
                10
            )
            .is_ok());
        assert!(a.check(&Request::Remove { path: path("/a") }, 10).is_ok());
        assert!(a.check(&Request::Status, 10).is_ok());
        for req in [
            Request::Open { path: path("/b/x") },
            Request::Alloc {
                path: path("/b/x"),
                bytes: 1,
                placement: Default::default(),
            },
            Request::Free {
                path: path("/b/x"),
                blocks: Vec::new(),
            },
            Request::Lookup {
                path: path("/ab"),
                writable: false,
            },
            Request::Remove { path: path("/") },
            Request::Renew { prefix: path("/") },
            Request::Pin {
                path: path("/b"),
                pinned: true,
            },
            Request::AllocReplicated {
                path: path("/b/x"),
                bytes: 1,
                placement: Default::default(),
                copies: 2,
            },
            Request::Refresh {
                path: path("/b/x"),
                group: 1,
                block: crate::proto::BlockId { node: 1, index: 0 },
                writable: false,
            },
            Request::Map {
                path: path("/b/x"),
                backing: None,
            },
            Request::FenceAcquire {
                path: path("/b/kv"),
                ttl_ms: 100,
            },
            Request::FenceRenew {
                path: path("/b/kv"),
                token: 1,
                ttl_ms: 100,
            },
            Request::FenceRelease {
                path: path("/b/kv"),
                token: 1,
            },
        ] {
            assert!(
                matches!(a.check(&req, 10), Err(ControlError::Forbidden { ref job, .. }) if job == "a"),
                "{req:?}"
            );
        }
        assert!(matches!(
            a.check(
                &Request::SetQuota {
                    path: path("/a"),
                    bytes: None
                },
                10
            ),
            Err(ControlError::AdminOnly(_))
        ));
        // Naming a backing URL is an admin's decision; unmapping its own path is not.
        let backing = crate::proto::Backing {
            url: "/tmp/tier".into(),
            key: "k".into(),
        };
        assert!(matches!(
            a.check(
                &Request::Map {
                    path: path("/a/kv"),
                    backing: Some(backing.clone()),
                },
                10
            ),
            Err(ControlError::AdminOnly(_))
        ));
        assert!(a
            .check(
                &Request::Map {
                    path: path("/a/kv"),
                    backing: None,
                },
                10
            )
            .is_ok());
        let admin = Token::issue(&k, &Scope::Admin, 100).unwrap();
        let admin = client_access(Some(&k), Some(&admin), 10).unwrap();
        assert!(admin
            .check(
                &Request::Map {
                    path: path("/b/kv"),
                    backing: Some(backing),
                },
                10
            )
            .is_ok());
        // The token's expiry is checked on every request of a live connection.
        assert!(matches!(
            a.check(&Request::Status, 100),
            Err(ControlError::Unauthenticated(_))
        ));
        let admin = Token::issue(&k, &Scope::Admin, 100).unwrap();
        let a = client_access(Some(&k), Some(&admin), 10).unwrap();
        assert!(a.check(&Request::Remove { path: path("/b") }, 10).is_ok());
    }
}
