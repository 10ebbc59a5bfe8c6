//! The memory node: maps a region, registers it with the controller, and serves
//! one-sided operations on it.
//!
//! The node never interprets data. It checks every operation against the region's
//! bounds and the block's current grant ([`farpool_rdma::AccessTable`]); keys are
//! derived from a secret shared with the controller (from the cluster key, or in
//! development mode handed over at registration), so the controller never ships
//! per-block keys. On the soft transport every operation must carry a capability (a MAC
//! of the block key over the grant's expiry) that has not expired. When the controller revokes a block (free, removal,
//! lease expiry) the node zeroes it, moves it to the new epoch, and confirms; only then
//! does the controller hand the block to another task, so a stale handle can neither
//! read nor overwrite the next owner's data.

mod link;
mod stats;

pub use stats::{process_rss_kib, region_rss_kib};

use crate::proto::{derive_key, Register, Secret, WireTransport};
use farpool_rdma::shm::ShmRegion;
use farpool_rdma::soft::{GrantCheck, SoftServer, SoftServerConfig};
use farpool_rdma::{AccessTable, Region, RegionOptions, TransportKind};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Memory node settings.
#[derive(Debug, Clone)]
pub struct MemNodeConfig {
    /// Controller address (`host:port`).
    pub controller: String,
    /// Data-plane listen address for the soft transport (`host:port`, port 0 = any).
    pub listen: String,
    /// Address advertised to clients; defaults to the bound listen address.
    pub advertise: Option<String>,
    /// Region size in bytes (rounded down to whole blocks).
    pub capacity: u64,
    /// Block size in bytes (a power of two, at least 4 KiB).
    pub block_size: u64,
    /// Data-plane transport.
    pub transport: TransportKind,
    /// Directory for the shm region file.
    pub shm_dir: PathBuf,
    /// Try huge pages for the region.
    pub hugepages: bool,
    /// Try to lock the region in memory.
    pub lock: bool,
    /// Largest single READ/WRITE served on the soft transport.
    pub max_op_bytes: u32,
    /// RDMA device for the verbs transport (`None`: the first one).
    pub rdma_device: Option<String>,
    /// GID index for the verbs transport (`None`: the first RoCE v2 IPv4 GID).
    pub gid_index: Option<u32>,
    /// Verbs: enforce grants with memory windows where the device has them (else, or
    /// when false, the region rkey: trusted mode).
    pub memory_windows: bool,
    /// The cluster key shared with the controller ([`crate::proto::key`]); `None`:
    /// development mode, the controller sends the block secret at registration.
    pub cluster_key: Option<crate::proto::ClusterKey>,
}

impl Default for MemNodeConfig {
    fn default() -> Self {
        Self {
            controller: "127.0.0.1:7070".into(),
            listen: "127.0.0.1:0".into(),
            advertise: None,
            capacity: 256 << 20,
            block_size: 1 << 20,
            transport: TransportKind::Soft,
            shm_dir: PathBuf::from("/dev/shm"),
            hugepages: true,
            lock: true,
            max_op_bytes: 1 << 20,
            rdma_device: None,
            gid_index: None,
            memory_windows: true,
            cluster_key: None,
        }
    }
}

/// Why a memory node could not start.
#[derive(Debug, thiserror::Error)]
pub enum MemNodeError {
    /// Invalid settings.
    #[error("invalid memory node configuration: {0}")]
    Config(String),
    /// The region or data plane could not be set up.
    #[error("data plane: {0}")]
    Transport(#[from] farpool_rdma::TransportError),
    /// Registration with the controller failed.
    #[error("controller link: {0}")]
    Link(String),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
}

/// The data-plane side of a node: the mapped region, its access table, and the server.
pub(crate) struct DataPlane {
    pub(crate) region: Arc<Region>,
    pub(crate) access: Arc<AccessTable>,
    pub(crate) soft: Option<SoftServer>,
    /// Keeps the shm file mapped (and removes it on drop).
    pub(crate) _shm: Option<ShmRegion>,
    /// The verbs endpoint (keeps the region registered with the RDMA device).
    #[cfg(feature = "verbs")]
    pub(crate) _verbs: Option<farpool_rdma::verbs::VerbsServer>,
    /// Whether the access table sees every write (soft, shm). The RDMA device writes
    /// without it, so on verbs a block is scrubbed whole when it changes owner.
    pub(crate) tracks_writes: bool,
    pub(crate) data_addr: String,
}

impl DataPlane {
    /// Installs the keys of `block` at `epoch`.
    pub(crate) fn install(&self, secret: &Secret, node: u32, block: u32, epoch: u32) {
        let rw = derive_key(secret, node, block, epoch, true);
        let ro = derive_key(secret, node, block, epoch, false);
        self.access.set(block, epoch, rw, ro);
    }

    /// Revokes every grant on every block (epoch 0, no keys).
    pub(crate) fn revoke_all(&self) {
        for b in 0..self.access.num_blocks() {
            self.access.set(b, 0, 0, 0);
        }
    }

    /// Zeroes what the block's previous owners wrote, so the next owner cannot read
    /// it. Only the written prefix (the access table's high-water mark) is scrubbed:
    /// blocks that were never written cost nothing to hand over.
    pub(crate) fn zero_block(&self, block: u32) {
        const CHUNK: usize = 64 << 10;
        static ZEROS: [u8; CHUNK] = [0; CHUNK];
        let bs = self.access.block_size();
        let written = self.access.take_written(block);
        let dirty = if self.tracks_writes {
            written.min(bs)
        } else {
            bs
        };
        let start = u64::from(block) * bs;
        let mut off = 0;
        while off < dirty {
            let n = (dirty - off).min(CHUNK as u64) as usize;
            if let Err(e) = self.region.write(start + off, &ZEROS[..n]) {
                tracing::error!(block, error = %e, "cannot zero block");
                return;
            }
            off += n as u64;
        }
    }

    pub(crate) fn stats(&self) -> crate::proto::NodeStats {
        let mut s = crate::proto::NodeStats {
            rss_kib: process_rss_kib().unwrap_or(0),
            ..Default::default()
        };
        if let Some(srv) = &self.soft {
            let st = srv.stats();
            s.connections = st.connections;
            s.ops_read = st.ops_read;
            s.ops_write = st.ops_write;
            s.ops_atomic = st.ops_cas + st.ops_faa;
            s.bytes_read = st.bytes_read;
            s.bytes_written = st.bytes_written;
            s.op_errors = st.op_errors;
            s.protocol_errors = st.protocol_errors;
        }
        #[cfg(feature = "verbs")]
        if let Some(v) = &self._verbs {
            let d = v.device();
            s.isolation = format!(
                "{} port {} GID index {} MTU {}: {}",
                d.name,
                d.port,
                d.gid_index,
                d.mtu,
                v.isolation()
            );
        }
        s
    }
}

/// Removes region files (`farpool-<pid>-<hex>`) in `dir` whose memory node process no
/// longer exists. A node killed without a chance to clean up (SIGKILL, a crash) leaves
/// its file behind, and files in `/dev/shm` hold memory until removed. A file whose pid
/// has been reused by another process is left alone.
fn reap_orphaned_regions(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("farpool-"))
            .and_then(|rest| rest.split_once('-'))
            .filter(|(_, hex)| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => {
                tracing::info!(file = %entry.path().display(), "removed the region file of a memory node that is gone")
            }
            Err(e) => {
                tracing::debug!(file = %entry.path().display(), error = %e, "cannot remove an orphaned region file")
            }
        }
    }
}

/// A running memory node.
pub struct MemNode {
    data: Arc<DataPlane>,
    stop: Arc<AtomicBool>,
    link: Option<JoinHandle<()>>,
    node_id: Arc<std::sync::atomic::AtomicU32>,
}

impl MemNode {
    /// Maps the region, starts the data plane, registers with the controller and
    /// starts heartbeating. Returns once registered.
    pub fn start(config: MemNodeConfig) -> Result<MemNode, MemNodeError> {
        let bs = config.block_size;
        if bs < 4096 || !bs.is_power_of_two() {
            return Err(MemNodeError::Config(format!(
                "block size {bs} must be a power of two of at least 4096 bytes"
            )));
        }
        let capacity = config.capacity / bs * bs;
        if capacity == 0 {
            return Err(MemNodeError::Config(format!(
                "capacity {} is smaller than one block of {bs} bytes",
                config.capacity
            )));
        }
        let data = Arc::new(Self::data_plane(&config, capacity)?);
        let register = Register {
            data_addr: data.data_addr.clone(),
            transport: WireTransport::from(config.transport),
            capacity,
            block_size: bs,
            hugepages: data.region.is_huge(),
            locked: data.region.is_locked(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let node_id = Arc::new(std::sync::atomic::AtomicU32::new(0));
        // Identifies this process to the controller, so a restarted controller (or a
        // broken connection) resumes the node with its blocks instead of a new one.
        let incarnation = rand::random::<u64>() | 1;
        let link = link::Link::connect(
            &config.controller,
            register,
            incarnation,
            config.cluster_key.clone(),
            data.clone(),
            false,
        )
        .map_err(|e| MemNodeError::Link(e.to_string()))?;
        node_id.store(link.node_id(), Ordering::Relaxed);
        tracing::info!(
            node = link.node_id(),
            data = %data.data_addr,
            transport = %config.transport,
            capacity,
            block_size = bs,
            hugepages = data.region.is_huge(),
            locked = data.region.is_locked(),
            "memory node registered"
        );
        let handle = link::spawn(
            link,
            config.controller.clone(),
            stop.clone(),
            node_id.clone(),
        )
        .map_err(|e| MemNodeError::Link(format!("cannot start the controller link thread: {e}")))?;
        Ok(MemNode {
            data,
            stop,
            link: Some(handle),
            node_id,
        })
    }

    fn data_plane(config: &MemNodeConfig, capacity: u64) -> Result<DataPlane, MemNodeError> {
        let opts = RegionOptions {
            hugepages: config.hugepages,
            lock: config.lock,
        };
        match config.transport {
            TransportKind::Soft => {
                let len = usize::try_from(capacity).map_err(|_| {
                    MemNodeError::Config("capacity exceeds the address space".into())
                })?;
                let region = Arc::new(Region::anonymous(len, opts)?);
                let access = Arc::new(AccessTable::new(capacity, config.block_size)?);
                let server = SoftServer::bind(
                    &config.listen,
                    region.clone(),
                    access.clone(),
                    SoftServerConfig {
                        max_op_bytes: config.max_op_bytes,
                        // The controller hands out capabilities for soft endpoints.
                        grants: GrantCheck::Capabilities,
                        ..SoftServerConfig::default()
                    },
                )?;
                let bound = server.local_addr();
                let data_addr = config
                    .advertise
                    .clone()
                    .unwrap_or_else(|| bound.to_string());
                Ok(DataPlane {
                    region,
                    access,
                    soft: Some(server),
                    _shm: None,
                    #[cfg(feature = "verbs")]
                    _verbs: None,
                    tracks_writes: true,
                    data_addr,
                })
            }
            TransportKind::Shm => {
                reap_orphaned_regions(&config.shm_dir);
                let name = format!(
                    "farpool-{}-{:016x}",
                    std::process::id(),
                    rand::random::<u64>()
                );
                let path = config.shm_dir.join(name);
                let shm = ShmRegion::create(&path, capacity, config.block_size)?;
                Ok(DataPlane {
                    region: shm.region(),
                    access: shm.access(),
                    soft: None,
                    data_addr: path.to_string_lossy().into_owned(),
                    _shm: Some(shm),
                    #[cfg(feature = "verbs")]
                    _verbs: None,
                    tracks_writes: true,
                })
            }
            TransportKind::Verbs => Self::verbs_plane(config, capacity, opts),
        }
    }

    #[cfg(not(feature = "verbs"))]
    fn verbs_plane(
        _config: &MemNodeConfig,
        _capacity: u64,
        _opts: RegionOptions,
    ) -> Result<DataPlane, MemNodeError> {
        Err(farpool_rdma::TransportError::Verbs(farpool_rdma::VerbsError::NotBuilt).into())
    }

    #[cfg(feature = "verbs")]
    fn verbs_plane(
        config: &MemNodeConfig,
        capacity: u64,
        opts: RegionOptions,
    ) -> Result<DataPlane, MemNodeError> {
        use farpool_rdma::verbs::{DeviceConfig, VerbsServer, VerbsServerConfig};
        let len = usize::try_from(capacity)
            .map_err(|_| MemNodeError::Config("capacity exceeds the address space".into()))?;
        let region = Arc::new(Region::anonymous(len, opts)?);
        let access = Arc::new(AccessTable::new(capacity, config.block_size)?);
        let server = VerbsServer::bind(
            &config.listen,
            region.clone(),
            access.clone(),
            VerbsServerConfig {
                device: DeviceConfig {
                    device: config.rdma_device.clone(),
                    port: 1,
                    gid_index: config.gid_index,
                },
                max_op_bytes: u64::from(config.max_op_bytes),
                memory_windows: config.memory_windows,
                ..VerbsServerConfig::default()
            },
        )?;
        tracing::info!(
            device = %server.device().name,
            isolation = %server.isolation(),
            "verbs data plane"
        );
        let data_addr = config
            .advertise
            .clone()
            .unwrap_or_else(|| server.local_addr().to_string());
        Ok(DataPlane {
            region,
            access,
            soft: None,
            _shm: None,
            _verbs: Some(server),
            tracks_writes: false,
            data_addr,
        })
    }

    /// The address (soft) or file path (shm) clients use to reach the data plane.
    pub fn data_addr(&self) -> &str {
        &self.data.data_addr
    }

    /// The soft data plane's bound socket address, if serving soft.
    pub fn soft_addr(&self) -> Option<SocketAddr> {
        self.data.soft.as_ref().map(|s| s.local_addr())
    }

    /// The node id the controller assigned (changes if the node re-registers).
    pub fn node_id(&self) -> u32 {
        self.node_id.load(Ordering::Relaxed)
    }

    /// Current data-plane statistics.
    pub fn stats(&self) -> crate::proto::NodeStats {
        self.data.stats()
    }

    /// Serves Prometheus metrics of this node at `http://addr/metrics` (port 0 picks a
    /// free port) until the returned handle is dropped: operations, bytes and grant
    /// refusals by kind, connections, region size and resident memory (the list is in
    /// `docs/OPERATIONS.md`, *Metrics*).
    pub fn serve_metrics(&self, addr: &str) -> Result<crate::metrics::MetricsThread, MemNodeError> {
        let data = self.data.clone();
        let node_id = self.node_id.clone();
        let render: crate::metrics::Render =
            Arc::new(move || render_metrics(&data, node_id.load(Ordering::Relaxed)));
        Ok(crate::metrics::MetricsThread::start(addr, render)?)
    }

    /// Turns the region's torn mode on or off (see
    /// [`farpool_rdma::Region::set_torn_mode`]): READ and WRITE are then copied in small
    /// pieces with yields in between, so torn reads show up. For tests of code built on
    /// one-sided operations; it slows the data plane down. It affects operations served
    /// by this node (the soft transport), not shm clients, which map the region
    /// themselves.
    pub fn set_torn_mode(&self, on: bool) {
        self.data.region.set_torn_mode(on);
    }

    /// Blocks until the node stops (its controller link thread ends).
    pub fn wait(mut self) {
        if let Some(h) = self.link.take() {
            let _ = h.join();
        }
    }

    /// Stops heartbeating, closes the data plane and unmaps the region.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    /// Stops gracefully: the data plane stops accepting connections and new requests
    /// and answers those already read (for at most `grace`, see
    /// [`SoftServer::drain`]), then the node deregisters from the controller and
    /// unmaps its region.
    pub fn drain(mut self, grace: std::time::Duration) {
        tracing::info!("draining the data plane");
        if let Some(s) = &self.data.soft {
            s.drain(grace);
        }
        self.stop_now();
        tracing::info!("memory node stopped");
    }

    /// Blocks until the process gets SIGTERM or Ctrl-C, then [`MemNode::drain`]s with
    /// `grace`. For the command-line tool; must not be called from inside an async
    /// runtime. Fails (after stopping the node) if the signals cannot be listened for.
    pub fn run_until_signal(self, grace: std::time::Duration) -> Result<(), MemNodeError> {
        let waited = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| MemNodeError::Link(format!("cannot wait for signals: {e}")))
            .and_then(|rt| {
                rt.block_on(async {
                    #[cfg(unix)]
                    {
                        use tokio::signal::unix::{signal, SignalKind};
                        let mut term = signal(SignalKind::terminate()).map_err(|e| {
                            MemNodeError::Link(format!("cannot listen for SIGTERM: {e}"))
                        })?;
                        tokio::select! {
                            r = tokio::signal::ctrl_c() => r.map_err(|e| MemNodeError::Link(format!("cannot listen for Ctrl-C: {e}"))),
                            _ = term.recv() => Ok(()),
                        }
                    }
                    #[cfg(not(unix))]
                    {
                        tokio::signal::ctrl_c()
                            .await
                            .map_err(|e| MemNodeError::Link(format!("cannot listen for Ctrl-C: {e}")))
                    }
                })
            });
        tracing::info!("shutdown requested");
        self.drain(grace);
        waited
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = &self.data.soft {
            s.shutdown();
        }
        if let Some(h) = self.link.take() {
            let _ = h.join();
        }
    }
}

impl Drop for MemNode {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Renders the node's metrics: data-plane operations, bytes and refusals by kind (from
/// the soft server's own counters; the shm and verbs data planes bypass the node, so
/// only the region figures are exported for them), connections, region size and the
/// process's resident memory.
fn render_metrics(data: &DataPlane, node_id: u32) -> String {
    use crate::metrics::{Exposition, MetricType::*};
    let mut e = Exposition::new();
    let bs = data.access.block_size();
    e.single(
        "farpool_memnode_node_id",
        Gauge,
        "Node id assigned by the controller (changes when the node registers anew).",
        f64::from(node_id),
    );
    e.single(
        "farpool_memnode_region_bytes",
        Gauge,
        "Size of the served region in bytes.",
        data.access.region_len() as f64,
    );
    e.single(
        "farpool_memnode_block_size_bytes",
        Gauge,
        "Block size in bytes.",
        bs as f64,
    );
    e.single(
        "farpool_memnode_blocks",
        Gauge,
        "Blocks in the region (the controller exports how many are in use per node).",
        f64::from(data.access.num_blocks()),
    );
    e.single(
        "farpool_memnode_resident_bytes",
        Gauge,
        "Resident memory of the memory node process in bytes.",
        (process_rss_kib().unwrap_or(0) * 1024) as f64,
    );
    if let Some(srv) = &data.soft {
        let st = srv.stats();
        e.family(
            "farpool_memnode_ops_total",
            Counter,
            "One-sided operations answered, by kind (successful or not).",
        );
        for (op, v) in [
            ("read", st.ops_read),
            ("write", st.ops_write),
            ("cas", st.ops_cas),
            ("faa", st.ops_faa),
        ] {
            e.sample("farpool_memnode_ops_total", &[("op", op)], v as f64);
        }
        e.family(
            "farpool_memnode_bytes_total",
            Counter,
            "Payload bytes moved by successful operations, by kind (atomics move 8 bytes each and are counted in ops only).",
        );
        e.sample(
            "farpool_memnode_bytes_total",
            &[("op", "read")],
            st.bytes_read as f64,
        );
        e.sample(
            "farpool_memnode_bytes_total",
            &[("op", "write")],
            st.bytes_written as f64,
        );
        e.single(
            "farpool_memnode_op_errors_total",
            Counter,
            "Operations answered with an error status (all reasons).",
            st.op_errors as f64,
        );
        e.family(
            "farpool_memnode_grants_refused_total",
            Counter,
            "Operations refused by grant checks, by reason.",
        );
        for (reason, v) in [
            ("bad_key", st.refused_bad_key),
            ("stale_epoch", st.refused_stale_epoch),
            ("out_of_bounds", st.refused_out_of_bounds),
        ] {
            e.sample(
                "farpool_memnode_grants_refused_total",
                &[("reason", reason)],
                v as f64,
            );
        }
        e.single(
            "farpool_memnode_protocol_errors_total",
            Counter,
            "Data-plane connections closed for protocol violations.",
            st.protocol_errors as f64,
        );
        e.single(
            "farpool_memnode_connections",
            Gauge,
            "Data-plane connections open now.",
            st.connections as f64,
        );
        e.single(
            "farpool_memnode_connections_accepted_total",
            Counter,
            "Data-plane connections accepted since start.",
            st.accepted as f64,
        );
    }
    e.finish()
}

#[cfg(test)]
mod tests {
    use super::reap_orphaned_regions;

    #[test]
    fn reaps_only_files_of_dead_processes() {
        let dir = tempfile::tempdir().unwrap();
        // 999999999 is above the kernel's pid limit; our own pid is alive.
        let dead = dir.path().join("farpool-999999999-00112233aabbccdd");
        let alive = dir
            .path()
            .join(format!("farpool-{}-00112233aabbccdd", std::process::id()));
        let other = dir.path().join("farpool-999999999-notahexsuffix");
        for p in [&dead, &alive, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        reap_orphaned_regions(dir.path());
        assert!(!dead.exists());
        assert!(alive.exists());
        assert!(other.exists());
    }
}
