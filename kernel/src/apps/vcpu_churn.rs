//! `vcpu-churn N`: N rapid vCPU up/down cycles driven from several tasks (so from several
//! vCPUs) at once, while small marker tasks run on whatever vCPUs are online. Checks that
//! every marker task ran exactly once and that the vCPUs come back to min.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use elastic_rt::prelude::*;
use elastic_rt::println;
use elastic_rt::vcpus::UpError;

use hypercall_abi::{Status, exit_code};
use spin::Mutex;

const NAME: &str = "vcpu-churn";
const USAGE: &str = "[N] [DRIVERS]";

/// The `vcpu-churn` service.
pub const SERVICE: Service = Service {
    name: NAME,
    usage: USAGE,
    about: "N rapid vCPU up/down cycles from several vCPUs; every task must run exactly once",
    main: |env| boxed(main(env)),
};

/// Marker tasks spawned per cycle.
const TASKS_PER_CYCLE: usize = 2;

struct Shared {
    cycles: usize,
    next_cycle: AtomicUsize,
    next_task: AtomicUsize,
    ran: Vec<AtomicU8>,
    markers: Mutex<Vec<JoinHandle<()>>>,
    denied: AtomicU64,
    ups: AtomicU64,
}

async fn driver(s: Arc<Shared>) -> Result<(), UpError> {
    while s.next_cycle.fetch_add(1, Ordering::AcqRel) < s.cycles {
        loop {
            match vcpus::up() {
                Ok(_) => break,
                Err(UpError::Refused(Status::DENIED | Status::EXHAUSTED | Status::AGAIN)) => {
                    s.denied.fetch_add(1, Ordering::Relaxed);
                    // At the ceiling: step aside so idle vCPUs can honour the pending downs.
                    sleep_ns(100_000).await;
                }
                Err(e) => return Err(e),
            }
        }
        s.ups.fetch_add(1, Ordering::Relaxed);
        for _ in 0..TASKS_PER_CYCLE {
            let idx = s.next_task.fetch_add(1, Ordering::AcqRel);
            let s2 = s.clone();
            let h = spawn(async move {
                if let Some(slot) = s2.ran.get(idx) {
                    slot.fetch_add(1, Ordering::AcqRel);
                }
            });
            s.markers.lock().push(h);
        }
        vcpus::request_down(1);
        yield_now().await;
    }
    Ok(())
}

async fn main(env: Env) -> u32 {
    let arg = |i: usize, default: usize| env.args.get(i).map_or(Some(default), |a| a.parse::<usize>().ok());
    let (Some(cycles), Some(drivers)) = (arg(0, 1000), arg(1, 3)) else {
        return usage_error(NAME, USAGE, format_args!("N and DRIVERS must be whole numbers"));
    };
    if cycles == 0 || !(1..=16).contains(&drivers) {
        return usage_error(NAME, USAGE, format_args!("N must be >= 1 and DRIVERS within 1..=16"));
    }
    let (min, _, burst) = vcpus::limits();
    vcpus::set_auto(false);
    let started = time::now_ns();
    let shared = Arc::new(Shared {
        cycles,
        next_cycle: AtomicUsize::new(0),
        next_task: AtomicUsize::new(0),
        ran: (0..cycles * TASKS_PER_CYCLE).map(|_| AtomicU8::new(0)).collect(),
        markers: Mutex::new(Vec::new()),
        denied: AtomicU64::new(0),
        ups: AtomicU64::new(0),
    });
    let handles: Vec<_> = (0..drivers).map(|_| spawn(driver(shared.clone()))).collect();
    let mut failed = None;
    for h in handles {
        if let Err(e) = h.await {
            failed = Some(e);
        }
    }
    let markers: Vec<_> = core::mem::take(&mut *shared.markers.lock());
    for m in markers {
        m.await;
    }
    let churn_ms = (time::now_ns() - started) / 1_000_000;
    // Bring the VM back to min: cancel leftover requests, then ask exactly for the excess.
    vcpus::cancel_down_requests();
    vcpus::request_down(vcpus::online().saturating_sub(min));
    let wait = time::now_ns();
    while (vcpus::online() > min || vcpus::host_online_vcpus() > min as u64) && time::now_ns() - wait < 5_000_000_000 {
        sleep_ms(2).await;
    }
    vcpus::set_auto(true);
    let ran_once = shared.ran.iter().filter(|r| r.load(Ordering::Acquire) == 1).count();
    let total = shared.ran.len();
    let ok = failed.is_none() && ran_once == total && vcpus::online() == min;
    println!(
        "vcpu-churn: {cycles} up/down cycles from {drivers} drivers in {churn_ms} ms: {} ups, {} DENIED at the ceiling (burst {burst})",
        shared.ups.load(Ordering::Relaxed),
        shared.denied.load(Ordering::Relaxed)
    );
    println!(
        "vcpu-churn: {ran_once}/{total} tasks ran exactly once; vCPUs online at the end: {} (host says {}, min {min})",
        vcpus::online(),
        vcpus::host_online_vcpus()
    );
    if vcpus::online() != min {
        for (i, slot) in raw::CPUS.iter().enumerate().filter(|(_, s)| s.state() != raw::cpu_state::OFFLINE) {
            println!(
                "vcpu-churn:   slot {i}: vCPU {} state {} down_requested {}",
                slot.vcpu_id.load(Ordering::Relaxed),
                slot.state(),
                slot.down_requested.load(Ordering::Relaxed)
            );
        }
        println!("vcpu-churn:   idle count {}, runnable {}", vcpus::idle(), task::runnable());
    }
    if let Some(e) = failed {
        println!("vcpu-churn: a driver failed: {e:?}");
    }
    println!("VERIFY data_errors={}", total - ran_once);
    println!("vcpu-churn: {}", if ok { "PASSED" } else { "FAILED" });
    if ok { exit_code::SUCCESS } else { exit_code::FAILURE }
}
