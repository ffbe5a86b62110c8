//! What every online vCPU runs: the loop that serves the shared run queue.
//!
//! There are no interrupts, so everything a vCPU notices happens at a *task boundary*, between
//! two tasks: it reads host notices ([`notices`]), runs the request channel's pump ([`net`];
//! only vCPU 0 pumps), lets the elastic controller decide ([`elastic`]) and fires timers
//! ([`timer`]). Then it runs the next task ([`executor`]). A vCPU that finds no work either
//! goes down (the controller's decision, carried out by [`smp`]) or BLOCKs, costing the host
//! nothing, until a kick, a host notice or its next timer.
//!
//! vCPU 0 enters the loop from `kernel_main`; every other vCPU from `secondary_main` below,
//! which the entry stub in `crate::arch` calls.

use core::sync::atomic::Ordering;

use crate::percpu::{self, PerCpu, state};
use crate::{elastic, executor, net, notices, smp, timer};

/// Serves the run queue on the calling vCPU until `until()` returns true (checked at every
/// task boundary). Secondary vCPUs pass `|| false` and leave only by going down.
pub(crate) fn run(slot: &'static PerCpu, until: &dyn Fn() -> bool) {
    loop {
        notices::poll();
        net::poll();
        executor::kick_if_waiting();
        if until() {
            net::flush_deferred();
            return;
        }
        if elastic::should_drain(slot) {
            net::flush_deferred();
            drain(slot);
        }
        elastic::on_boundary(slot);
        timer::fire_expired();
        if let Some(task) = executor::pop() {
            smp::set_busy(slot);
            slot.in_task.store(true, Ordering::Relaxed);
            task.run();
            slot.in_task.store(false, Ordering::Relaxed);
            continue;
        }
        smp::set_idle(slot);
        if executor::runnable() > 0 {
            continue;
        }
        match elastic::idle_action(slot) {
            elastic::IdleAction::GoDown { token } => {
                net::flush_deferred();
                go_down(slot, token)
            }
            elastic::IdleAction::Block(timeout_ns) => {
                // A notify the pump deferred rides on this BLOCK (one exit for both).
                let notify = net::take_deferred();
                smp::idle_block(slot, timeout_ns, notify, &|| executor::runnable() > 0 || net::pending());
            }
        }
    }
}

/// Takes the calling busy vCPU down for the host's reclaim target. Returns if it did not go
/// (another vCPU got there first and the VM is already at the target, or it is vCPU 0).
fn drain(slot: &'static PerCpu) {
    let Some(target) = elastic::vcpu_target() else { return };
    let Some(going) = smp::begin_drain(slot, target) else { return };
    elastic::note_down();
    // Queued work must not wait for this vCPU.
    if executor::runnable() > 0 {
        smp::kick_one_idle();
    }
    going.finish()
}

/// Takes the calling idle vCPU down if it may still go: not when work arrived, and only if
/// the `token` that justifies it (an explicit down request, the controller's shed) is still
/// there, which it then consumes. Returns if it did not go.
fn go_down(slot: &'static PerCpu, token: elastic::DownToken) {
    let may_go = || {
        executor::runnable() == 0
            && match token {
                elastic::DownToken::None => true,
                elastic::DownToken::Request => elastic::take_down_request(),
                elastic::DownToken::Shed => elastic::take_shed(),
            }
    };
    if let Some(going) = smp::begin_idle_down(slot, &may_go) {
        elastic::note_down();
        going.finish()
    }
}

/// Rust side of the secondary vCPUs' entry stub (`secondary_entry` in `crate::arch`): installs
/// the slot and serves the run queue until the vCPU goes down.
#[unsafe(no_mangle)]
extern "C" fn secondary_main(slot: &'static PerCpu, vcpu_id: u64) -> ! {
    percpu::set_current(slot);
    slot.vcpu_id.store(vcpu_id as u32, Ordering::Release);
    slot.state.store(state::BUSY, Ordering::Release);
    run(slot, &|| false);
    unreachable!("a secondary worker leaves its loop only by going down")
}
