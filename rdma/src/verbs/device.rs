//! Device discovery and selection, and the queue-pair plumbing both sides share.

use std::io;
use std::sync::Arc;

use sideway::ibverbs::address::{AddressHandleAttribute, Gid, GidType};
use sideway::ibverbs::completion::GenericCompletionQueue;
use sideway::ibverbs::device::{DeviceInfo as _, DeviceList};
use sideway::ibverbs::device_context::{DeviceCapabilityFlags, DeviceContext, Mtu, PortState};
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    GenericQueuePair, QueuePair, QueuePairAttribute, QueuePairState, SendOperationFlags,
};
use sideway::ibverbs::AccessFlags;

use super::wire::QpInfo;
use crate::error::VerbsError;

/// Which device, port and GID to use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Device name (`ibv_devices`), e.g. `rxe0` or `mlx5_0`. `None`: the first device.
    pub device: Option<String>,
    /// Port number, 1-based. 0 means port 1.
    pub port: u8,
    /// GID index. `None`: the first RoCE v2 GID holding an IPv4-mapped address, else the
    /// first RoCE v2 GID, else the first non-zero GID.
    pub gid_index: Option<u32>,
}

/// What was selected: for logs and `farpool status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device name.
    pub name: String,
    /// Port number.
    pub port: u8,
    /// GID index in use.
    pub gid_index: u32,
    /// The GID, formatted as an IPv6 address.
    pub gid: String,
    /// Active MTU of the port in bytes.
    pub mtu: u32,
    /// Most memory windows the device supports (0: none, so per-region rkeys are used).
    pub max_mw: u32,
    /// Whether the device reports type-2 (2A or 2B) memory windows.
    pub mw_type2: bool,
}

/// An opened device: context, protection domain and the selected port and GID.
pub(crate) struct Device {
    pub(crate) ctx: Arc<DeviceContext>,
    pub(crate) pd: Arc<ProtectionDomain>,
    pub(crate) port: u8,
    pub(crate) gid_index: u32,
    pub(crate) gid: Gid,
    pub(crate) lid: u16,
    pub(crate) mtu: Mtu,
    /// Most outstanding RDMA READ/atomic requests as initiator per QP.
    pub(crate) max_init_rd_atom: u8,
    /// Most outstanding RDMA READ/atomic requests as responder per QP.
    pub(crate) max_rd_atom: u8,
    pub(crate) max_qp_wr: u32,
    pub(crate) info: DeviceInfo,
}

// Compile-time check: the handles shared between threads are Send + Sync.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Arc<DeviceContext>>();
    assert_send_sync::<Arc<ProtectionDomain>>();
};

fn call(what: &'static str, hint: &'static str) -> impl FnOnce(io::Error) -> VerbsError {
    move |source| VerbsError::Call { what, source, hint }
}

/// Unwraps sideway's error wrappers down to the `io::Error` they carry (or the innermost
/// message: sideway's transparent error kinds hide the `io::Error` from `source()`).
pub(crate) fn io_of(e: impl std::error::Error + 'static) -> io::Error {
    let mut src: Option<&dyn std::error::Error> = Some(&e);
    let mut innermost = e.to_string();
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            if let Some(code) = io.raw_os_error() {
                return io::Error::from_raw_os_error(code);
            }
            return io::Error::new(io.kind(), io.to_string());
        }
        innermost = s.to_string();
        src = s.source();
    }
    io::Error::other(innermost)
}

pub(crate) fn mtu_bytes(m: Mtu) -> u32 {
    match m {
        Mtu::Mtu256 => 256,
        Mtu::Mtu512 => 512,
        Mtu::Mtu1024 => 1024,
        Mtu::Mtu2048 => 2048,
        Mtu::Mtu4096 => 4096,
    }
}

pub(crate) fn mtu_from_wire(v: u8) -> Option<Mtu> {
    Some(match v {
        1 => Mtu::Mtu256,
        2 => Mtu::Mtu512,
        3 => Mtu::Mtu1024,
        4 => Mtu::Mtu2048,
        5 => Mtu::Mtu4096,
        _ => return None,
    })
}

pub(crate) fn mtu_to_wire(m: Mtu) -> u8 {
    match m {
        Mtu::Mtu256 => 1,
        Mtu::Mtu512 => 2,
        Mtu::Mtu1024 => 3,
        Mtu::Mtu2048 => 4,
        Mtu::Mtu4096 => 5,
    }
}

fn is_ipv4_mapped(g: &Gid) -> bool {
    g.raw[..10].iter().all(|&b| b == 0) && g.raw[10] == 0xff && g.raw[11] == 0xff
}

impl Device {
    /// Opens the configured device and checks its port and GID.
    pub(crate) fn open(cfg: &DeviceConfig) -> Result<Device, VerbsError> {
        // libibverbs returns no list at all when the kernel has no RDMA support (ENOSYS):
        // for the user that is the same as an empty list.
        let list = DeviceList::new().map_err(|e| {
            tracing::debug!(error = %io_of(e), "ibv_get_device_list failed");
            VerbsError::NoDevice
        })?;
        if list.is_empty() {
            return Err(VerbsError::NoDevice);
        }
        let names: Vec<String> = list.iter().map(|d| d.name()).collect();
        let index =
            match &cfg.device {
                None => 0,
                Some(want) => names.iter().position(|n| n == want).ok_or_else(|| {
                    VerbsError::DeviceNotFound {
                        name: want.clone(),
                        available: names.join(", "),
                    }
                })?,
            };
        let name = names[index].clone();
        let dev = list.get(index).ok_or(VerbsError::NoDevice)?;
        let ctx = dev.open().map_err(|e| VerbsError::Call {
            what: "opening the device (ibv_open_device)",
            source: io_of(e),
            hint: "; check permissions on /dev/infiniband/uverbs*",
        })?;
        let port = if cfg.port == 0 { 1 } else { cfg.port };
        let dattr = ctx.query_device().map_err(|e| VerbsError::Call {
            what: "querying the device",
            source: io_of(e),
            hint: "",
        })?;
        let pattr = ctx.query_port(port).map_err(|e| VerbsError::Call {
            what: "querying the port",
            source: io_of(e),
            hint: "; does the device have that port? (--rdma-port)",
        })?;
        let state = pattr.port_state();
        if state != PortState::Active {
            return Err(VerbsError::PortDown {
                device: name,
                port,
                state: format!("{state:?}"),
            });
        }
        let (gid_index, gid) = pick_gid(&ctx, &name, port, cfg.gid_index)?;
        let mtu = pattr.active_mtu();
        let pd = ctx.alloc_pd().map_err(|e| VerbsError::Call {
            what: "allocating a protection domain",
            source: io_of(e),
            hint: "",
        })?;
        let clamp = |v: i32| v.clamp(1, 255) as u8;
        let info = DeviceInfo {
            name,
            port,
            gid_index,
            gid: std::net::Ipv6Addr::from(gid).to_string(),
            mtu: mtu_bytes(mtu),
            max_mw: dattr.max_mw().max(0) as u32,
            mw_type2: {
                let caps = dattr.device_cap_flags();
                caps.contains(DeviceCapabilityFlags::MemoryWindowType2A)
                    || caps.contains(DeviceCapabilityFlags::MemoryWindowType2B)
            },
        };
        Ok(Device {
            pd,
            port,
            gid_index,
            gid,
            lid: pattr.lid(),
            mtu,
            max_init_rd_atom: clamp(dattr.max_qp_init_rd_atom()),
            max_rd_atom: clamp(dattr.max_qp_rd_atom()),
            max_qp_wr: dattr.max_qp_wr().max(1) as u32,
            info,
            ctx,
        })
    }

    /// A completion queue with room for `cqe` entries, polled with `ibv_poll_cq`.
    ///
    /// Not the extended CQ (`ibv_start_poll`): under Soft-RoCE (rdma-core 44, kernel 6.1)
    /// an extended CQ kept handing back the same completion after `ibv_end_poll`, so the
    /// second window of a batch never saw its own completion.
    pub(crate) fn create_cq(&self, cqe: u32) -> Result<GenericCompletionQueue, VerbsError> {
        let mut b = self.ctx.create_cq_builder();
        b.setup_cqe(cqe);
        b.build()
            .map(GenericCompletionQueue::from)
            .map_err(|e| call("creating a completion queue", "")(io_of(e)))
    }

    /// A new RC queue pair in the RESET state with `send_wr` send-queue slots and up to
    /// `inline` bytes of inline data. With `extended`, prefers the `ibv_wr_*` API.
    pub(crate) fn create_qp(
        &self,
        cq: &GenericCompletionQueue,
        send_wr: u32,
        inline: u32,
        extended: bool,
    ) -> Result<GenericQueuePair, VerbsError> {
        let mut b = self.pd.create_qp_builder();
        b.setup_max_send_wr(send_wr)
            .setup_max_recv_wr(1)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .setup_max_inline_data(inline)
            .setup_send_cq(cq.clone())
            .setup_recv_cq(cq.clone())
            .setup_send_ops_flags(
                SendOperationFlags::Write
                    | SendOperationFlags::Read
                    | SendOperationFlags::AtomicCompareAndSwap
                    | SendOperationFlags::AtomicFetchAndAdd,
            );
        let ex = if extended { b.build_ex().ok() } else { None };
        match ex {
            Some(qp) => Ok(qp.into()),
            None => b.build().map(Into::into).map_err(|e| {
                call(
                    "creating a queue pair",
                    "; the device may be out of QPs or not support the requested inline size",
                )(io_of(e))
            }),
        }
    }

    /// This side's half of the connection information for `qp`.
    pub(crate) fn local_info(&self, qp: &GenericQueuePair, psn: u32) -> QpInfo {
        QpInfo {
            qpn: qp.qp_number(),
            psn,
            lid: self.lid,
            mtu: mtu_to_wire(self.mtu),
            rd_atomic: self.max_init_rd_atom.min(self.max_rd_atom),
            gid: self.gid.raw,
        }
    }

    /// Moves `qp` from RESET to RTS, connected to `remote`. `local_psn` is the PSN this
    /// side starts sending with (what it told the peer).
    pub(crate) fn connect_qp(
        &self,
        qp: &mut GenericQueuePair,
        local_psn: u32,
        remote: &QpInfo,
    ) -> Result<(), VerbsError> {
        let remote_mtu = mtu_from_wire(remote.mtu).ok_or_else(|| {
            VerbsError::QueuePair(format!("peer sent an invalid MTU code {}", remote.mtu))
        })?;
        let mtu = if mtu_bytes(remote_mtu) < mtu_bytes(self.mtu) {
            remote_mtu
        } else {
            self.mtu
        };
        let access = AccessFlags::LocalWrite
            | AccessFlags::RemoteWrite
            | AccessFlags::RemoteRead
            | AccessFlags::RemoteAtomic;
        let mut a = QueuePairAttribute::new();
        a.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(self.port)
            .setup_access_flags(access);
        qp.modify(&a)
            .map_err(|e| call("moving the queue pair to INIT", "")(io_of(e)))?;

        let mut a = QueuePairAttribute::new();
        a.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(mtu)
            .setup_dest_qp_num(remote.qpn)
            .setup_rq_psn(remote.psn)
            .setup_max_dest_read_atomic(self.max_rd_atom)
            .setup_min_rnr_timer(12);
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(remote.lid)
            .setup_port(self.port)
            .setup_service_level(0);
        let remote_gid = Gid { raw: remote.gid };
        if !remote_gid.is_zero() {
            ah.setup_grh_src_gid_index(self.gid_index.min(255) as u8)
                .setup_grh_dest_gid(&remote_gid)
                .setup_grh_hop_limit(64);
        }
        a.setup_address_vector(&ah);
        qp.modify(&a).map_err(|e| {
            call(
                "moving the queue pair to RTR",
                "; check the GID index (--gid-index) and that both sides can reach each other",
            )(io_of(e))
        })?;

        let mut a = QueuePairAttribute::new();
        a.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(local_psn)
            .setup_timeout(14)
            .setup_retry_cnt(7)
            .setup_rnr_retry(7)
            .setup_max_read_atomic(self.max_init_rd_atom.min(remote.rd_atomic.max(1)));
        qp.modify(&a)
            .map_err(|e| call("moving the queue pair to RTS", "")(io_of(e)))?;
        Ok(())
    }
}

fn pick_gid(
    ctx: &Arc<DeviceContext>,
    device: &str,
    port: u8,
    want: Option<u32>,
) -> Result<(u32, Gid), VerbsError> {
    if let Some(index) = want {
        let gid = ctx.query_gid(port, index).map_err(|e| VerbsError::NoGid {
            device: device.to_string(),
            port,
            detail: format!(" at index {index} ({})", io_of(e)),
        })?;
        if gid.is_zero() {
            return Err(VerbsError::NoGid {
                device: device.to_string(),
                port,
                detail: format!(" at index {index} (it is all zero)"),
            });
        }
        return Ok((index, gid));
    }
    let table = ctx.query_gid_table().map_err(|e| VerbsError::NoGid {
        device: device.to_string(),
        port,
        detail: format!(" (cannot read the GID table: {})", io_of(e)),
    })?;
    let usable: Vec<_> = table
        .iter()
        .filter(|e| e.port_num() == u32::from(port) && !e.gid().is_zero())
        .collect();
    let best = usable
        .iter()
        .find(|e| e.gid_type() == GidType::RoceV2 && is_ipv4_mapped(&e.gid()))
        .or_else(|| usable.iter().find(|e| e.gid_type() == GidType::RoceV2))
        .or_else(|| usable.first());
    match best {
        Some(e) => Ok((e.gid_index(), e.gid())),
        None => Err(VerbsError::NoGid {
            device: device.to_string(),
            port,
            detail: String::new(),
        }),
    }
}

/// A 24-bit initial packet sequence number, different per call.
pub(crate) fn random_psn() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() as u32) & 0x00FF_FFFF
}

/// Names of the RDMA devices libibverbs lists (empty when there are none, or when the
/// kernel has no RDMA support at all).
pub fn device_names() -> Vec<String> {
    match DeviceList::new() {
        Ok(list) => list.iter().map(|d| d.name()).collect(),
        Err(_) => Vec::new(),
    }
}
