//! Type-2 memory windows: allocation, binding and local invalidation through a queue
//! pair (what sideway lacks, through `rdma-mummy-sys`).
//!
//! A type-2 window is allocated once per protection domain and then bound with a
//! `IBV_WR_BIND_MW` work request posted on a queue pair: it then covers exactly the
//! bound range, with the bound access rights, and remote requests may use it only
//! through that queue pair. `IBV_WR_LOCAL_INV` (or deallocation) revokes it; every bind
//! gives it a new rkey (the low 8 bits, `ibv_inc_rkey`), so an rkey of a revoked
//! binding no longer matches.

use std::io;
use std::ptr::{self, NonNull};
use std::time::{Duration, Instant};

use rdma_mummy_sys as sys;
use sideway::ibverbs::completion::{
    GenericCompletionQueue, PollCompletionQueueError, WorkCompletionStatus,
};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{GenericQueuePair, QueuePair};

/// How long a bind or invalidate may take to complete.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// A type-2 memory window, deallocated (and so invalidated) on drop.
///
/// The protection domain it was allocated in must outlive it: every owner keeps the
/// device (and its protection domain) alive for longer than its windows.
pub(crate) struct Window {
    mw: NonNull<sys::ibv_mw>,
}

// SAFETY: an `ibv_mw` is a plain handle that libibverbs lets any thread use; `Window`
// is only used through `&mut` (under the memory node's per-connection mutex).
unsafe impl Send for Window {}

impl Window {
    /// Allocates a type-2 window in `pd`.
    pub(crate) fn alloc(pd: &ProtectionDomain) -> io::Result<Window> {
        // SAFETY: `pd.pd()` is the live protection domain `pd` owns; `ibv_alloc_mw` only
        // reads it (and its context) and returns a new handle or null.
        let mw = unsafe { sys::ibv_alloc_mw(pd.pd().as_ptr(), sys::ibv_mw_type::IBV_MW_TYPE_2) };
        NonNull::new(mw)
            .ok_or_else(|| {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(0) {
                    io::Error::other("ibv_alloc_mw returned no window")
                } else {
                    e
                }
            })
            .map(|mw| Window { mw })
    }

    /// The window's current rkey.
    pub(crate) fn rkey(&self) -> u32 {
        // SAFETY: `mw` is the live window this value owns.
        unsafe { (*self.mw.as_ptr()).rkey }
    }

    /// Records the rkey of a completed bind (libibverbs leaves that to the caller for
    /// type-2 windows, and the next bind names the window by it).
    fn set_rkey(&mut self, rkey: u32) {
        // SAFETY: as for `rkey`; `&mut self` makes this the only access.
        unsafe { (*self.mw.as_ptr()).rkey = rkey }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: `mw` was returned by `ibv_alloc_mw` and is deallocated exactly once.
        let rc = unsafe { sys::ibv_dealloc_mw(self.mw.as_ptr()) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_dealloc_mw failed");
        }
    }
}

/// The next rkey for a window whose current rkey is `rkey` (the low 8 bits advance).
fn next_rkey(rkey: u32) -> u32 {
    (rkey & !0xff) | (rkey.wrapping_add(1) & 0xff)
}

fn post(qp: &GenericQueuePair, wr: &mut sys::ibv_send_wr) -> io::Result<()> {
    let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
    // SAFETY: `qp.qp()` is the live queue pair `qp` owns; `wr` is one fully initialised
    // work request (no list, no scatter/gather entries) that outlives the call, which
    // copies it into the send queue.
    let rc = unsafe { sys::ibv_post_send(qp.qp().as_ptr(), wr, &mut bad) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Waits for the completion of work request `wr_id` on `cq` (the only one outstanding).
fn wait(cq: &GenericCompletionQueue, wr_id: u64, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut spins = 0u32;
    loop {
        match cq.start_poll() {
            Ok(poller) => {
                for wc in poller {
                    if wc.wr_id() != wr_id {
                        continue;
                    }
                    let status = wc.status();
                    return if status == WorkCompletionStatus::Success as u32 {
                        Ok(())
                    } else {
                        Err(io::Error::other(format!(
                            "work completion status {status}{}",
                            if status == WorkCompletionStatus::MemoryWindowBindError as u32 {
                                " (memory window bind error)"
                            } else if status == WorkCompletionStatus::WorkRequestFlushedError as u32
                            {
                                " (flushed: the queue pair is in error)"
                            } else {
                                ""
                            }
                        )))
                    };
                }
            }
            Err(PollCompletionQueueError::CompletionQueueEmpty) => {}
            Err(e) => return Err(super::device::io_of(e)),
        }
        spins += 1;
        if spins < 1024 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
            if spins % 64 == 0 && Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no completion within {timeout:?}"),
                ));
            }
        }
    }
}

/// Binds `w` to `addr..addr + len` of `mr` through `qp` (read-only, or read, write and
/// atomics when `writable`) and waits for the bind to complete. Returns the new rkey.
/// The window must be free (never bound, or invalidated).
pub(crate) fn bind(
    qp: &GenericQueuePair,
    cq: &GenericCompletionQueue,
    w: &mut Window,
    mr: &MemoryRegion,
    (addr, len): (u64, u64),
    writable: bool,
    wr_id: u64,
) -> io::Result<u32> {
    let rkey = next_rkey(w.rkey());
    let mut access = sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
    if writable {
        access |= sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0
            | sys::ibv_access_flags::IBV_ACCESS_REMOTE_ATOMIC.0;
    }
    // SAFETY: an all-zero `ibv_send_wr` is a valid empty work request (null pointers,
    // zero counts); the fields the bind needs are set below.
    let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
    wr.wr_id = wr_id;
    wr.opcode = sys::ibv_wr_opcode::IBV_WR_BIND_MW;
    wr.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
    wr.bind_mw_tso_union.bind_mw = sys::bind_mw_t {
        mw: w.mw.as_ptr(),
        rkey,
        bind_info: sys::ibv_mw_bind_info {
            // SAFETY: the live memory region `mr` owns; the bind only names it.
            mr: unsafe { mr.mr().as_ptr() },
            addr,
            length: len,
            mw_access_flags: access,
        },
    };
    post(qp, &mut wr)?;
    wait(cq, wr_id, OP_TIMEOUT)?;
    w.set_rkey(rkey);
    Ok(rkey)
}

/// Invalidates the binding of `w` through `qp` (the queue pair it was bound through) and
/// waits for it; the window is free afterwards.
pub(crate) fn invalidate(
    qp: &GenericQueuePair,
    cq: &GenericCompletionQueue,
    w: &Window,
    wr_id: u64,
) -> io::Result<()> {
    // SAFETY: as in `bind`.
    let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
    wr.wr_id = wr_id;
    wr.opcode = sys::ibv_wr_opcode::IBV_WR_LOCAL_INV;
    wr.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
    wr.imm_data_invalidated_rkey_union.invalidated_rkey = w.rkey();
    post(qp, &mut wr)?;
    wait(cq, wr_id, OP_TIMEOUT)
}

#[cfg(test)]
mod tests {
    #[test]
    fn next_rkey_changes_only_the_key_byte() {
        assert_eq!(super::next_rkey(0x1234_56fe), 0x1234_56ff);
        assert_eq!(super::next_rkey(0x1234_56ff), 0x1234_5600);
    }
}
