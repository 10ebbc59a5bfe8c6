//! The blocking control connection to the controller.

use super::{ClientConfig, ClientError};
use crate::proto::frame::{read_msg, write_msg};
use crate::proto::{Envelope, Hello, Request, Response, Role, Welcome, PROTOCOL_VERSION};
use parking_lot::Mutex;
use std::io::BufReader;
use std::net::{TcpStream, ToSocketAddrs};

/// One request at a time over a TCP connection; callers on several threads take turns.
pub(crate) struct ControlConn {
    addr: String,
    lease_ms: u64,
    inner: Mutex<Conn>,
}

struct Conn {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    next_id: u64,
}

impl ControlConn {
    pub(crate) fn connect(addr: &str, config: &ClientConfig) -> Result<Self, ClientError> {
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
                },
            },
        )?;
        // The controller answers a client hello with a Welcome, or with an error
        // envelope (id 0) before closing.
        let welcome: Result<Welcome, _> = read_msg(&mut reader);
        let welcome = match welcome {
            Ok(w) => w,
            Err(crate::proto::frame::FrameError::Decode(_)) => {
                return Err(ClientError::Protocol(
                    "the controller refused the connection (protocol version mismatch?)".into(),
                ))
            }
            Err(e) => return Err(e.into()),
        };
        if welcome.version != PROTOCOL_VERSION {
            return Err(crate::proto::ControlError::VersionMismatch {
                controller: welcome.version,
                peer: PROTOCOL_VERSION,
            }
            .into());
        }
        Ok(Self {
            addr: addr.to_string(),
            lease_ms: welcome.lease_ms,
            inner: Mutex::new(Conn {
                writer,
                reader,
                next_id: 1,
            }),
        })
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    pub(crate) fn lease_ms(&self) -> u64 {
        self.lease_ms
    }

    /// Sends `req` and waits for its response.
    pub(crate) fn call(&self, req: Request) -> Result<Response, ClientError> {
        let mut c = self.inner.lock();
        let id = c.next_id;
        c.next_id += 1;
        write_msg(&mut c.writer, &Envelope { id, body: req })?;
        let resp: Envelope<Response> = read_msg(&mut c.reader)?;
        if resp.id != id {
            return Err(ClientError::Protocol(format!(
                "response id {} does not match request id {id}",
                resp.id
            )));
        }
        Ok(resp.body)
    }
}
