//! Host notices to the guest (reclaim requests, their end, stop requests): the notices posted
//! and not yet taken, and the notice page in guest memory that shows them with the VM's
//! holdings, which the guest reads without an exit.

use std::sync::{Mutex, MutexGuard};

use hypercall_abi::{NOTICE_ADDR, NoticePage};
use serde::{Deserialize, Serialize};

use crate::base::memory::GuestMemory;
use crate::base::persist::Persist;

/// Host notices posted to the guest and not yet acknowledged.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Notices {
    /// Pending [`hypercall_abi::notice`] bits.
    pub(crate) pending: u64,
    /// Incremented per posted notice.
    pub(crate) seq: u64,
    /// Latest vCPU reclaim target.
    pub(crate) vcpu_target: u64,
    /// Latest memory reclaim target.
    pub(crate) memory_target: u64,
    /// Latest reclaim grace period.
    pub(crate) grace_ns: u64,
}

/// What the VM holds, and its policy's max and burst now, as the notice page shows them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Holdings {
    pub(crate) vcpus: u32,
    pub(crate) memory: u64,
    /// vCPU (max, burst).
    pub(crate) vcpu_limits: (u64, u64),
    /// Memory (max, burst), bytes.
    pub(crate) memory_limits: (u64, u64),
}

/// The notices of one VM and its notice page.
#[derive(Debug, Default)]
pub(crate) struct NoticeBoard {
    notices: Mutex<Notices>,
}

impl NoticeBoard {
    fn lock(&self) -> MutexGuard<'_, Notices> {
        self.notices.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write_page(mem: &GuestMemory, n: &Notices, h: Holdings) {
        let page = NoticePage {
            seq: n.seq,
            pending: n.pending,
            vcpu_target: n.vcpu_target,
            memory_target: n.memory_target,
            grace_ns: n.grace_ns,
            online_vcpus: u64::from(h.vcpus),
            memory_bytes: h.memory,
            vcpu_max: h.vcpu_limits.0,
            vcpu_burst: h.vcpu_limits.1,
            memory_max: h.memory_limits.0,
            memory_burst: h.memory_limits.1,
            reserved: [0; 5],
        };
        // The page is inside boot memory, which exists for the VM's whole life.
        let _ = mem.write_obj(NOTICE_ADDR, &page);
    }

    /// Rewrites the page with the holdings `h` (after an up, down, grant, release).
    pub(crate) fn refresh(&self, mem: &GuestMemory, h: Holdings) {
        let n = self.lock();
        Self::write_page(mem, &n, h);
    }

    /// Posts notice `bits` (with `update` filling in targets) and rewrites the page.
    pub(crate) fn post(&self, mem: &GuestMemory, h: Holdings, bits: u64, update: impl FnOnce(&mut Notices)) {
        let mut n = self.lock();
        n.pending |= bits;
        n.seq += 1;
        update(&mut n);
        Self::write_page(mem, &n, h);
    }

    /// Returns the pending notices and clears them (EVENTS).
    pub(crate) fn take(&self, mem: &GuestMemory, h: Holdings) -> Notices {
        let mut n = self.lock();
        let taken = *n;
        n.pending = 0;
        Self::write_page(mem, &n, h);
        taken
    }
}

impl Persist for NoticeBoard {
    type State = Notices;
    type Args<'a> = ();
    type Error = std::convert::Infallible;

    fn save(&self) -> Result<Notices, Self::Error> {
        Ok(*self.lock())
    }

    fn restore((): (), state: &Notices) -> Result<NoticeBoard, Self::Error> {
        Ok(NoticeBoard { notices: Mutex::new(*state) })
    }
}
