//! `idle [MS]`: brings every vCPU the policy allows online, takes one down again (so there are
//! both parked and blocked vCPUs), then does nothing for MS milliseconds. The host's CPU time
//! across the idle window (REPORTs with user figure 1 and 2 bracket it in the timeline) shows
//! what an idle elastic guest costs: close to nothing.

use elastic_rt::prelude::*;
use elastic_rt::println;
use hypercall_abi::exit_code;

const NAME: &str = "idle";
const USAGE: &str = "[MS]";

/// The `idle` service.
pub const SERVICE: Service = Service {
    name: NAME,
    usage: USAGE,
    about: "hold parked and blocked vCPUs for MS ms (host CPU use should be ~0)",
    main: |env| boxed(main(env)),
};

async fn main(env: Env) -> u32 {
    let ms = match env.args.first().map(|a| a.parse::<u64>()) {
        None => 1000,
        Some(Ok(v)) if v > 0 => v,
        _ => return usage_error(NAME, USAGE, format_args!("MS must be a positive number of milliseconds")),
    };
    vcpus::set_auto(false);
    let (_, _, burst) = vcpus::limits();
    while vcpus::online() < burst {
        if vcpus::up().is_err() {
            break;
        }
    }
    let peak = vcpus::online();
    if peak > 1 {
        vcpus::request_down(1);
    }
    let wait = time::now_ns();
    while vcpus::host_online_vcpus() as usize >= peak && peak > 1 && time::now_ns() - wait < 2_000_000_000 {
        sleep_ms(1).await;
    }
    let online = vcpus::online();
    println!("idle: {online} vCPU(s) online and blocked, {} parked; idling {ms} ms", peak - online);
    report::set_user_figure(1);
    report::report();
    sleep_ms(ms).await;
    report::set_user_figure(2);
    report::report();
    println!("idle: done");
    exit_code::SUCCESS
}
