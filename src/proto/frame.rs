//! Length-delimited bincode frames, blocking and async.
//!
//! A frame is a `u32` little-endian body length followed by the body, a `bincode`
//! (fixed-int, little-endian) encoding of a message. Frames over [`MAX_FRAME`] are
//! refused before anything is allocated.

use super::MAX_FRAME;
use bincode::Options;
use serde::{de::DeserializeOwned, Serialize};
use std::io::{self, Read, Write};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Errors of the control-plane framing.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed.
    #[error("control connection I/O error: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection.
    #[error("control connection closed by peer")]
    Closed,
    /// A frame announced more than [`MAX_FRAME`] bytes.
    #[error("control frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The body did not decode as the expected message.
    #[error("malformed control message: {0}")]
    Decode(String),
    /// A message could not be encoded.
    #[error("cannot encode control message: {0}")]
    Encode(String),
}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(MAX_FRAME as u64)
}

/// Encodes `msg` as one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body_len = options()
        .serialized_size(msg)
        .map_err(|e| FrameError::Encode(e.to_string()))? as usize;
    if body_len > MAX_FRAME {
        return Err(FrameError::TooLarge(body_len));
    }
    let mut out = Vec::with_capacity(4 + body_len);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    options()
        .serialize_into(&mut out, msg)
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    Ok(out)
}

/// Decodes one frame body (without its length prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    options()
        .deserialize(body)
        .map_err(|e| FrameError::Decode(e.to_string()))
}

fn check_len(len_bytes: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Writes one message as a frame (blocking).
pub fn write_msg<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), FrameError> {
    let buf = encode(msg)?;
    w.write_all(&buf)?;
    Ok(())
}

/// Reads one frame and decodes it (blocking). A clean EOF before the frame is
/// [`FrameError::Closed`].
pub fn read_msg<T: DeserializeOwned>(r: &mut impl Read) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = check_len(len)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    decode(&body)
}

/// Writes one message as a frame (async).
pub async fn write_msg_async<T: Serialize>(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    msg: &T,
) -> Result<(), FrameError> {
    let buf = encode(msg)?;
    w.write_all(&buf).await?;
    Ok(())
}

/// Reads one frame and decodes it (async).
pub async fn read_msg_async<T: DeserializeOwned>(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = check_len(len)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    decode(&body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Envelope, Request};

    #[test]
    fn round_trip() {
        let msg = Envelope {
            id: 7,
            body: Request::Renew {
                prefix: crate::proto::PoolPath::parse("/job").unwrap(),
            },
        };
        let bytes = encode(&msg).unwrap();
        let back: Envelope<Request> = read_msg(&mut &bytes[..]).unwrap();
        assert_eq!(back.id, 7);
    }

    #[test]
    fn oversized_frame_refused_before_allocation() {
        let bytes = (u32::MAX).to_le_bytes();
        let r: Result<Envelope<Request>, _> = read_msg(&mut &bytes[..]);
        assert!(matches!(r, Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn truncated_and_garbage_frames_are_errors() {
        let r: Result<Envelope<Request>, _> = read_msg(&mut &[5u8, 0, 0, 0, 1][..]);
        assert!(r.is_err());
        let r: Result<Envelope<Request>, _> = read_msg(&mut &[3u8, 0, 0, 0, 0xff, 0xff, 0xff][..]);
        assert!(matches!(r, Err(FrameError::Decode(_))));
        let r: Result<Envelope<Request>, _> = read_msg(&mut &[][..]);
        assert!(matches!(r, Err(FrameError::Closed)));
    }

    /// The committed fuzz seed corpus must stay decodable as the protocol evolves.
    /// `FARPOOL_WRITE_CORPUS=1 cargo test -p farpool seed_corpus` regenerates it.
    #[test]
    fn seed_corpus_decodes() {
        use crate::proto::{Hello, NodeMsg, Placement, PoolPath, Role};
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/control_frame");
        let path = PoolPath::parse("/job/stage/task").unwrap();
        let seeds: Vec<(&str, Vec<u8>)> = vec![
            (
                "hello-client",
                encode(&Hello {
                    version: 1,
                    role: Role::Client {
                        name: "t".into(),
                        token: None,
                    },
                })
                .unwrap(),
            ),
            (
                "alloc",
                encode(&Envelope {
                    id: 1,
                    body: Request::Alloc {
                        path: path.clone(),
                        bytes: 4096,
                        placement: Placement::Spread,
                    },
                })
                .unwrap(),
            ),
            (
                "lookup",
                encode(&Envelope {
                    id: 2,
                    body: Request::Lookup {
                        path: path.clone(),
                        writable: false,
                    },
                })
                .unwrap(),
            ),
            (
                "alloc-replicated",
                encode(&Envelope {
                    id: 4,
                    body: Request::AllocReplicated {
                        path: path.clone(),
                        bytes: 8192,
                        placement: Placement::LeastLoaded,
                        copies: 2,
                    },
                })
                .unwrap(),
            ),
            (
                "refresh",
                encode(&Envelope {
                    id: 5,
                    body: Request::Refresh {
                        path: path.clone(),
                        group: 7,
                        block: crate::proto::BlockId { node: 1, index: 2 },
                        writable: true,
                    },
                })
                .unwrap(),
            ),
            (
                "renew",
                encode(&Envelope {
                    id: 3,
                    body: Request::Renew { prefix: path },
                })
                .unwrap(),
            ),
            (
                "map",
                encode(&Envelope {
                    id: 4,
                    body: Request::Map {
                        path: PoolPath::parse("/job/kv").unwrap(),
                        backing: Some(crate::proto::Backing {
                            url: "/var/lib/farpool/tier".into(),
                            key: "job/kv".into(),
                        }),
                    },
                })
                .unwrap(),
            ),
            (
                "revoked",
                encode(&NodeMsg::Revoked(vec![(1, 2), (3, 4)])).unwrap(),
            ),
            (
                "hello-client-token",
                encode(&Hello {
                    version: 2,
                    role: Role::Client {
                        name: "t".into(),
                        token: Some("fpt1.01000000000000000000016a.00".into()),
                    },
                })
                .unwrap(),
            ),
            ("proof", encode(&NodeMsg::Proof([7; 16])).unwrap()),
            (
                "challenge",
                encode(&crate::proto::ControllerMsg::Challenge {
                    nonce: [1; 16],
                    proof: [2; 16],
                })
                .unwrap(),
            ),
        ];
        if std::env::var_os("FARPOOL_WRITE_CORPUS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in &seeds {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
        for (name, bytes) in &seeds {
            let on_disk = std::fs::read(dir.join(name)).unwrap();
            assert_eq!(
                &on_disk, bytes,
                "seed {name} is stale; regenerate the corpus"
            );
        }
    }
}
