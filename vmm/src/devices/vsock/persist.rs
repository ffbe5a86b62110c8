//! The vsock device's state in a snapshot or a migration: the transport's negotiation, the
//! live queues' positions, and the connections that were open (reset on restore: their
//! clients belonged to the old process).

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

use super::{Core, Held, Queues, Vsock};
use crate::base::memory::GuestMemory;
use crate::base::persist::Persist;
use crate::devices::{DeviceError, DeviceSetup};

/// One virtqueue's device-side state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct SavedQueue {
    /// Largest size the device accepts.
    max_size: u16,
    /// Next available-ring entry the device takes.
    next_avail: u16,
    /// Next used-ring entry the device fills.
    next_used: u16,
    /// EVENT_IDX negotiated.
    event_idx: bool,
    /// Size the driver chose.
    size: u16,
    /// Ready.
    ready: bool,
    /// Descriptor table address.
    desc_table: u64,
    /// Available ring address.
    avail_ring: u64,
    /// Used ring address.
    used_ring: u64,
}

impl SavedQueue {
    fn of(q: &Queue) -> SavedQueue {
        let s = q.state();
        SavedQueue {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }

    fn queue(&self, mem: &GuestMemory) -> Result<Queue, String> {
        let q = Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| format!("saved queue refused: {e:?}"))?;
        if self.ready && !virtio_queue::QueueT::is_valid(&q, &*mem.snapshot()) {
            return Err("saved queue lies outside guest memory".into());
        }
        Ok(q)
    }
}

/// The device's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct VsockState {
    /// Features the driver accepted.
    negotiated: u64,
    /// Device status.
    status: u32,
    /// RX and TX queues when the driver had set them up.
    queues: Option<[SavedQueue; 2]>,
    /// Why the device was broken, if it was.
    broken: Option<String>,
    /// Open connections: (guest port, host port).
    connections: Vec<(u32, u32)>,
    /// Next host port the device hands out.
    next_port: u32,
}

/// What a restored device needs besides its state: its page, the restored guest memory and
/// its setup.
pub(crate) struct RestoreArgs<'a> {
    pub(crate) page: u64,
    pub(crate) mem: &'a GuestMemory,
    pub(crate) setup: DeviceSetup,
}

impl Persist for Vsock {
    type State = VsockState;
    type Args<'a> = RestoreArgs<'a>;
    type Error = DeviceError;

    /// The state, with the I/O thread holding still (what it reported when it did).
    fn save(&self) -> Result<VsockState, DeviceError> {
        let held = self.held();
        let core = self.shared.core();
        Ok(VsockState {
            negotiated: core.pv.negotiated,
            status: core.pv.status,
            queues: core.queues.as_ref().map(|q| [SavedQueue::of(&q.rx), SavedQueue::of(&q.tx)]),
            broken: core.broken.clone(),
            connections: held.connections,
            next_port: held.next_port,
        })
    }

    /// The device of a restored VM: its page is already in guest memory (not rewritten), the
    /// negotiation and queues come from `state`; the connections it lists are reset when the
    /// I/O thread starts.
    fn restore(args: RestoreArgs<'_>, state: &VsockState) -> Result<Vsock, DeviceError> {
        let refused = |why: String| DeviceError::Restore { device: super::NAME, why };
        let mut core = Core { pv: Vsock::pv(args.page), queues: None, generation: 0, broken: None };
        core.pv.negotiated = state.negotiated;
        core.pv.status = state.status;
        core.broken = state.broken.clone();
        core.queues = match &state.queues {
            Some([rx, tx]) if state.broken.is_none() => {
                Some(Queues { rx: rx.queue(args.mem).map_err(refused)?, tx: tx.queue(args.mem).map_err(refused)? })
            }
            _ => None,
        };
        let resume = Held { connections: state.connections.clone(), next_port: state.next_port };
        Vsock::with_core(core, args.setup, Some(resume))
    }
}
