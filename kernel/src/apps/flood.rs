//! `flood reports|grants N`: a guest that floods the host: N REPORTs, or N grant/release pairs
//! of one 2 MiB extent (bypassing the heap). The shim must answer every call and keep its own
//! memory flat (the summary's `host_rss_bytes` at boot and at the end show it).

use elastic_rt::prelude::*;
use elastic_rt::println;
use elastic_rt::raw::call;
use hypercall_abi::{Extent, MemGrantArgs, MemReleaseArgs, ReportArgs, Status, exit_code};

const NAME: &str = "flood";
const USAGE: &str = "reports|grants N";

/// The `flood` service.
pub const SERVICE: Service = Service {
    name: NAME,
    usage: USAGE,
    about: "N REPORTs or N 2 MiB grant/release pairs as fast as possible (shim memory must stay flat)",
    main: |env| run_sync(env, main),
};

fn main(env: &Env) -> u32 {
    let n = match env.args.get(1).map(|a| a.parse::<u64>()) {
        Some(Ok(v)) if v > 0 => v,
        _ => return usage_error(NAME, USAGE, format_args!("N must be a positive number")),
    };
    let start = time::now_ns();
    let mut bad = 0u64;
    match env.args.first().map(alloc::string::String::as_str) {
        Some("reports") => {
            for i in 0..n {
                let s = call(&mut ReportArgs { user: i, ..ReportArgs::default() });
                bad += u64::from(s != Status::OK);
            }
        }
        Some("grants") => {
            let mut ext = [Extent::default(); 1];
            for _ in 0..n {
                let mut g = MemGrantArgs::new(2 << 20, ext.as_mut_ptr() as u64, 1);
                if call(&mut g) != Status::OK || g.count != 1 {
                    bad += 1;
                    continue;
                }
                let mut r = MemReleaseArgs::new(ext.as_ptr() as u64, 1);
                bad += u64::from(call(&mut r) != Status::OK);
            }
        }
        _ => return usage_error(NAME, USAGE, format_args!("the first argument is reports or grants")),
    }
    let ms = (time::now_ns() - start) / 1_000_000;
    println!("flood: {n} {} in {ms} ms, {bad} not OK", env.args[0]);
    if bad == 0 { exit_code::SUCCESS } else { exit_code::FAILURE }
}
