//! The memory node's side: one memory region for the whole region, one RC queue pair per
//! client connection, connected over a TCP side channel.

use std::collections::HashMap;
use std::io::BufReader;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::AccessFlags;

use super::device::{io_of, random_psn, Device, DeviceConfig, DeviceInfo};
use super::wire::{self, Accept};
use crate::access::AccessTable;
use crate::error::{TransportError, VerbsError};
use crate::region::Region;

/// Configuration of a [`VerbsServer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerbsServerConfig {
    /// Device, port and GID to use.
    pub device: DeviceConfig,
    /// Largest READ or WRITE a client may issue in one operation (capped at the block
    /// size). Default 1 MiB.
    pub max_op_bytes: u64,
    /// Most client connections (queue pairs) at once. Default 256.
    pub max_connections: usize,
}

impl Default for VerbsServerConfig {
    fn default() -> Self {
        Self {
            device: DeviceConfig::default(),
            max_op_bytes: 1 << 20,
            max_connections: 256,
        }
    }
}

struct Shared {
    // Keeps the region registered. Field order matters: the memory region is
    // deregistered before the region it covers can be unmapped.
    _mr: Arc<MemoryRegion>,
    dev: Device,
    accept_template: Accept,
    _region: Arc<Region>,
    _access: Arc<AccessTable>,
    stop: AtomicBool,
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_id: AtomicU64,
    max_connections: usize,
}

/// A memory node's verbs endpoint: serves one-sided operations on a [`Region`] to
/// [`super::VerbsTransport`] clients. The RDMA device does the work; the endpoint only
/// connects queue pairs. Dropping it (or [`VerbsServer::shutdown`]) disconnects every
/// client and deregisters the region.
pub struct VerbsServer {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl VerbsServer {
    /// Opens the RDMA device, registers `region` as one memory region, and listens for
    /// queue-pair requests on `addr` (TCP).
    ///
    /// Fails with [`TransportError::Verbs`] when there is no usable device (the message
    /// says what to do) and [`TransportError::Io`] when the address cannot be bound.
    pub fn bind(
        addr: &str,
        region: Arc<Region>,
        access: Arc<AccessTable>,
        config: VerbsServerConfig,
    ) -> Result<VerbsServer, TransportError> {
        if access.region_len() != region.len() {
            return Err(TransportError::Region(format!(
                "access table covers {} bytes but the region has {}",
                access.region_len(),
                region.len()
            )));
        }
        let dev = Device::open(&config.device)?;
        let len = usize::try_from(region.len())
            .map_err(|_| TransportError::Region("region larger than the address space".into()))?;
        let base = region.base_ptr() as usize;
        // SAFETY: `base..base + len` is the region's mapping, which stays mapped while the
        // `Arc<Region>` kept in `Shared` lives; `Shared` declares `_mr` first, so the memory
        // region is deregistered before that `Arc` is released. Remote access only ever
        // reaches the region through the device, as the region's own contract allows.
        let mr = unsafe {
            dev.pd.reg_mr(
                base,
                len,
                AccessFlags::LocalWrite
                    | AccessFlags::RemoteWrite
                    | AccessFlags::RemoteRead
                    | AccessFlags::RemoteAtomic,
            )
        }
        .map_err(|e| VerbsError::Call {
            what: "registering the region (ibv_reg_mr)",
            source: io_of(e),
            hint: "; raise the locked-memory limit (ulimit -l unlimited, LimitMEMLOCK=infinity)",
        })?;
        let listener = TcpListener::bind(addr).map_err(|e| TransportError::Connect {
            addr: addr.to_string(),
            source: e,
        })?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        tracing::info!(
            device = %dev.info.name,
            port = dev.info.port,
            gid_index = dev.info.gid_index,
            gid = %dev.info.gid,
            mtu = dev.info.mtu,
            %local_addr,
            "verbs endpoint up; one memory region over the whole region; memory windows not \
             bound yet, clients use the region rkey (trusted mode)"
        );
        let accept_template = Accept {
            qp: Default::default(),
            rkey: mr.rkey(),
            base: base as u64,
            region_len: region.len(),
            block_size: access.block_size(),
            max_op_bytes: config.max_op_bytes.min(access.block_size()).max(1),
        };
        let shared = Arc::new(Shared {
            _mr: mr,
            dev,
            accept_template,
            _region: region,
            _access: access,
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            max_connections: config.max_connections.max(1),
        });
        let s = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("verbs-accept".into())
            .spawn(move || accept_loop(listener, s))?;
        Ok(VerbsServer {
            shared,
            local_addr,
            acceptor: Some(acceptor),
        })
    }

    /// The TCP address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The device in use.
    pub fn device(&self) -> &DeviceInfo {
        &self.shared.dev.info
    }

    /// Number of connected clients.
    pub fn connections(&self) -> usize {
        self.shared.conns.lock().len()
    }

    /// Stops accepting and disconnects every client (their queue pairs are destroyed).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        for (_, s) in self.shared.conns.lock().drain() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for VerbsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for VerbsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsServer")
            .field("local_addr", &self.local_addr)
            .field("device", &self.shared.dev.info)
            .finish()
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_nodelay(true);
                if shared.conns.lock().len() >= shared.max_connections {
                    let mut s = stream;
                    let _ = wire::write_refusal(
                        &mut s,
                        "too many connections; raise the memory node's verbs max_connections",
                    );
                    continue;
                }
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                match stream.try_clone() {
                    Ok(c) => {
                        shared.conns.lock().insert(id, c);
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "cannot track verbs connection");
                        continue;
                    }
                }
                let s = shared.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("verbs-conn".into())
                        .spawn(move || {
                            serve(stream, peer, &s);
                            s.conns.lock().remove(&id);
                        });
                if let Err(e) = spawned {
                    tracing::warn!(%peer, error = %e, "cannot start a verbs connection thread");
                    shared.conns.lock().remove(&id);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!(error = %e, "verbs accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Serves one side-channel connection: every request (re)creates the queue pair.
fn serve(stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut writer = stream;
    // The live queue pair and its completion queue; replaced on every request, destroyed
    // when the client goes away.
    let mut live = None;
    loop {
        let req = match wire::read_request(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "verbs side channel closed");
                break;
            }
        };
        live = None;
        let dev = &shared.dev;
        let result = (|| {
            let cq = dev.create_cq(4)?;
            let mut qp = dev.create_qp(&cq, 1, 0, true)?;
            let psn = random_psn();
            dev.connect_qp(&mut qp, psn, &req.qp)?;
            let info = dev.local_info(&qp, psn);
            Ok::<_, VerbsError>((cq, qp, info))
        })();
        match result {
            Ok((cq, qp, info)) => {
                let accept = Accept {
                    qp: info,
                    ..shared.accept_template
                };
                if wire::write_accept(&mut writer, &accept).is_err() {
                    break;
                }
                tracing::debug!(%peer, qpn = info.qpn, remote_qpn = req.qp.qpn, "verbs queue pair connected");
                live = Some((qp, cq));
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot set up a queue pair for a client");
                if wire::write_refusal(&mut writer, &e.to_string()).is_err() {
                    break;
                }
            }
        }
    }
    drop(live);
}
