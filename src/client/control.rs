//! The blocking control connection to the controller.

use super::{ClientConfig, ClientError};
use crate::proto::frame::{decode, read_msg, write_msg, FrameError};
use crate::proto::{
    ControlError, Envelope, Hello, Request, Response, Role, Welcome, PROTOCOL_VERSION,
};
use parking_lot::Mutex;
use std::io::BufReader;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// One request at a time over a TCP connection; callers on several threads take turns.
///
/// When the connection fails (the controller restarted, or the network broke), a call
/// reconnects with backoff for up to [`ClientConfig::reconnect_for`] and sends its
/// request again, so a controller restart needs no user code. The controller may have
/// carried out the lost request before it failed, so a resent `Free` that finds its
/// blocks no longer owned, or a resent `Remove` that finds its path gone, counts as
/// done; a resent `Alloc` may leave the first attempt's blocks owned by the path
/// (reclaimed when the path is removed or its lease lapses).
pub(crate) struct ControlConn {
    addr: String,
    lease_ms: u64,
    config: ClientConfig,
    inner: Mutex<Option<Conn>>,
}

struct Conn {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    next_id: u64,
}

/// Shortest and longest pause between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Whether `e` means the connection is gone (rather than a refused request).
/// Reads one frame's body (blocking).
fn read_frame(r: &mut impl std::io::Read) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > crate::proto::MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(body)
}

fn connection_lost(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Connect { .. } | ClientError::Frame(FrameError::Io(_) | FrameError::Closed)
    )
}

impl Conn {
    fn open(addr: &str, config: &ClientConfig) -> Result<(Conn, u64), ClientError> {
        let connect_err = |source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        };
        let sock = addr
            .to_socket_addrs()
            .map_err(connect_err)?
            .next()
            .ok_or_else(|| {
                connect_err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "address resolved to nothing",
                ))
            })?;
        let stream =
            TcpStream::connect_timeout(&sock, config.connect_timeout).map_err(connect_err)?;
        stream.set_nodelay(true).map_err(connect_err)?;
        stream
            .set_read_timeout(Some(config.request_timeout))
            .map_err(connect_err)?;
        let mut writer = stream.try_clone().map_err(connect_err)?;
        let mut reader = BufReader::new(stream);
        write_msg(
            &mut writer,
            &Hello {
                version: PROTOCOL_VERSION,
                role: Role::Client {
                    name: config.name.clone(),
                    token: config.token.clone(),
                },
            },
        )?;
        // The controller answers a client hello with a Welcome, or with an error
        // envelope (id 0) before closing.
        let frame = read_frame(&mut reader)?;
        let welcome = match decode::<Welcome>(&frame) {
            Ok(w) => w,
            Err(_) => {
                return Err(match decode::<Envelope<Response>>(&frame) {
                    Ok(Envelope {
                        body: Response::Error(e),
                        ..
                    }) => ClientError::Control(e),
                    _ => ClientError::Protocol(
                        "the controller refused the connection (protocol version mismatch?)".into(),
                    ),
                })
            }
        };
        if welcome.version != PROTOCOL_VERSION {
            return Err(crate::proto::ControlError::VersionMismatch {
                controller: welcome.version,
                peer: PROTOCOL_VERSION,
            }
            .into());
        }
        Ok((
            Conn {
                writer,
                reader,
                next_id: 1,
            },
            welcome.lease_ms,
        ))
    }

    fn exchange(&mut self, req: Request) -> Result<Response, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        write_msg(&mut self.writer, &Envelope { id, body: req })?;
        let resp: Envelope<Response> = read_msg(&mut self.reader)?;
        if resp.id != id {
            return Err(ClientError::Protocol(format!(
                "response id {} does not match request id {id}",
                resp.id
            )));
        }
        Ok(resp.body)
    }
}

impl ControlConn {
    pub(crate) fn connect(addr: &str, config: &ClientConfig) -> Result<Self, ClientError> {
        let (conn, lease_ms) = Conn::open(addr, config)?;
        Ok(Self {
            addr: addr.to_string(),
            lease_ms,
            config: config.clone(),
            inner: Mutex::new(Some(conn)),
        })
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    pub(crate) fn lease_ms(&self) -> u64 {
        self.lease_ms
    }

    /// Sends `req` and waits for its response, reconnecting if the connection is lost
    /// for up to [`ClientConfig::reconnect_for`].
    pub(crate) fn call(&self, req: Request) -> Result<Response, ClientError> {
        self.call_within(req, self.config.reconnect_for)
    }

    /// Sends `req`; if the connection is lost, reconnects at most once, at once (for
    /// best-effort calls such as freeing on drop, which must not hang).
    pub(crate) fn call_once(&self, req: Request) -> Result<Response, ClientError> {
        self.call_within(req, Duration::ZERO)
    }

    fn call_within(&self, req: Request, patience: Duration) -> Result<Response, ClientError> {
        let mut c = self.inner.lock();
        let err = match c.as_mut() {
            Some(conn) => match conn.exchange(req.clone()) {
                Err(e) if connection_lost(&e) => e,
                done => return done,
            },
            None => ClientError::Frame(FrameError::Closed),
        };
        *c = None;
        tracing::warn!(controller = %self.addr, "control connection lost ({err}); reconnecting");
        drop(err);
        let deadline = Instant::now() + patience;
        let mut backoff = BACKOFF_MIN;
        loop {
            let last = match Conn::open(&self.addr, &self.config) {
                Ok((mut conn, _)) => match conn.exchange(req.clone()) {
                    Ok(resp) => {
                        tracing::info!(controller = %self.addr, "reconnected to the controller");
                        *c = Some(conn);
                        return Ok(resent(&req, resp));
                    }
                    Err(e) if connection_lost(&e) => e,
                    Err(e) => return Err(e),
                },
                Err(e) if connection_lost(&e) => e,
                Err(e) => return Err(e),
            };
            if Instant::now() + backoff >= deadline {
                return Err(last);
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// Interprets the response to a request sent again after a lost connection: the
/// first attempt may already have freed the blocks or removed the path.
fn resent(req: &Request, resp: Response) -> Response {
    match (req, resp) {
        (Request::Free { .. }, Response::Error(ControlError::NotOwner { .. })) => Response::Ok,
        (Request::Remove { .. }, Response::Error(ControlError::NotFound(_))) => Response::Removed {
            blocks: 0,
            paths: 0,
        },
        (_, resp) => resp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{BlockId, PoolPath};

    #[test]
    fn a_resent_free_or_remove_that_already_took_effect_counts_as_done() {
        let path = PoolPath::parse("/j/t").unwrap();
        let block = BlockId { node: 1, index: 2 };
        let free = Request::Free {
            path: path.clone(),
            blocks: vec![block],
        };
        let not_owner = Response::Error(ControlError::NotOwner {
            block,
            path: path.clone(),
        });
        assert!(matches!(resent(&free, not_owner.clone()), Response::Ok));
        let remove = Request::Remove { path: path.clone() };
        let gone = Response::Error(ControlError::NotFound(path.clone()));
        assert!(matches!(
            resent(&remove, gone.clone()),
            Response::Removed {
                blocks: 0,
                paths: 0
            }
        ));
        // Anything else passes through unchanged.
        let open = Request::Open { path };
        assert!(matches!(
            resent(&open, gone),
            Response::Error(ControlError::NotFound(_))
        ));
        assert!(matches!(
            resent(&remove, not_owner),
            Response::Error(ControlError::NotOwner { .. })
        ));
        assert!(connection_lost(&ClientError::Frame(FrameError::Closed)));
        assert!(!connection_lost(&ClientError::Frame(FrameError::Decode(
            "x".into()
        ))));
    }
}
