//! `mem-wave [WAVES] [PEAK_MB] [STEP_MB] [HOLD_MS] [DIRTY_PAGES_PER_S]`: builds a growing
//! working set of checksummed 1 MiB chunks up to PEAK_MB (the heap grows by grants from the
//! host as it goes), holds it, verifies every checksum, frees it and waits for the memory to
//! go back to min (the controller releases the wholly free extents); repeats WAVES times.
//! With DIRTY_PAGES_PER_S, the hold rewrites whole chunks in turn (new pattern, new
//! checksum) at that many 4 KiB pages a second: a writer for live migration to keep up with.

use alloc::vec::Vec;
use elastic_rt::prelude::*;
use elastic_rt::println;

use hypercall_abi::exit_code;

const NAME: &str = "mem-wave";
const USAGE: &str = "[WAVES] [PEAK_MB] [STEP_MB] [HOLD_MS] [DIRTY_PAGES_PER_S]";

/// The `mem-wave` service.
pub const SERVICE: Service = Service {
    name: NAME,
    usage: USAGE,
    about: "grow a checksummed working set, hold, verify, free; memory returns to min each wave",
    main: |env| boxed(main(env)),
};

const CHUNK: usize = 1 << 20;
/// 4 KiB pages in a chunk.
const CHUNK_PAGES: u64 = (CHUNK / 4096) as u64;
/// The rewriting hold's tick.
const DIRTY_TICK_MS: u64 = 5;
const MIB: u64 = 1 << 20;

/// Fills `buf` with a pseudo-random pattern seeded by `seed`; returns its checksum.
pub fn fill(buf: &mut [u8], seed: u64) -> u64 {
    let mut x = seed | 1;
    for word in buf.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
    checksum(buf)
}

/// FNV-1a over 64-bit words.
pub fn checksum(buf: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for word in buf.chunks_exact(8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        h ^= u64::from_le_bytes(w);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// For `hold_ms`, rewrites whole chunks in turn so that `rate` pages a second are written;
/// keeps `sums` up to date. Returns the pages written.
async fn rewrite(set: &mut [Vec<u8>], sums: &mut [u64], wave: u64, rate: u64, hold_ms: u64) -> u64 {
    let start = time::now_ns();
    let (mut written, mut next) = (0u64, 0usize);
    loop {
        let elapsed_ns = time::now_ns() - start;
        if elapsed_ns >= hold_ms.saturating_mul(1_000_000) {
            return written * CHUNK_PAGES;
        }
        // Chunks due by now.
        let due = (rate as u128 * elapsed_ns as u128 / 1_000_000_000 / CHUNK_PAGES as u128) as u64;
        while written < due {
            let seed = (wave << 32) ^ (written << 20) ^ next as u64 ^ 0x2545_f491_4f6c_dd1d;
            sums[next] = fill(&mut set[next], seed);
            next = (next + 1) % set.len();
            written += 1;
        }
        sleep_ms(DIRTY_TICK_MS).await;
    }
}

async fn main(env: Env) -> u32 {
    let min = memory::boot_ram();
    let default_peak =
        if memory::window_size() == 0 { 24 } else { 320.min((memory::window_size() / MIB) * 3 / 4).max(8) };
    let arg = |i: usize, d: u64| env.args.get(i).map_or(Some(d), |a| a.parse::<u64>().ok());
    let (Some(waves), Some(peak_mb), Some(step_mb), Some(hold_ms), Some(dirty)) =
        (arg(0, 3), arg(1, default_peak), arg(2, 32), arg(3, 200), arg(4, 0))
    else {
        return usage_error(NAME, USAGE, format_args!("arguments must be whole numbers"));
    };
    if waves == 0 || peak_mb == 0 || step_mb == 0 || step_mb > peak_mb {
        return usage_error(NAME, USAGE, format_args!("WAVES, PEAK_MB, STEP_MB must be >= 1 and STEP_MB <= PEAK_MB"));
    }
    println!(
        "mem-wave: {waves} waves up to {peak_mb} MiB in {step_mb} MiB steps, holding {hold_ms} ms (boot memory {} MiB, hot-plug window {} MiB)",
        min / MIB,
        memory::window_size() / MIB
    );
    let chunks = peak_mb as usize;
    let mut sums: Vec<u64> = Vec::with_capacity(chunks);
    let mut errors = 0u64;
    let mut peak_held = memory::held();
    let mut all_back = true;
    let started = time::now_ns();
    for wave in 0..waves {
        let wave_start = time::now_ns();
        let mut set: Vec<Vec<u8>> = Vec::with_capacity(chunks);
        sums.clear();
        while set.len() < chunks {
            for _ in 0..step_mb.min((chunks - set.len()) as u64) {
                let mut buf = alloc::vec![0u8; CHUNK];
                let seed = (wave << 32) ^ set.len() as u64 ^ 0x9e37_79b9_7f4a_7c15;
                sums.push(fill(&mut buf, seed));
                set.push(buf);
            }
            peak_held = peak_held.max(memory::held());
            report::set_user_figure(set.len() as u64);
            yield_now().await;
        }
        let grown_ms = (time::now_ns() - wave_start) / 1_000_000;
        if dirty == 0 {
            sleep_ms(hold_ms).await;
        } else {
            let pages = rewrite(&mut set, &mut sums, wave, dirty, hold_ms).await;
            println!("  wave {}/{waves}: rewrote {pages} pages in {hold_ms} ms", wave + 1);
        }
        let bad = set.iter().zip(&sums).filter(|(b, s)| checksum(b) != **s).count() as u64;
        errors += bad;
        let held_at_peak = memory::held();
        peak_held = peak_held.max(held_at_peak);
        drop(set);
        report::set_user_figure(0);
        let freed = time::now_ns();
        while memory::held() > min && time::now_ns() - freed < 5_000_000_000 {
            sleep_ms(5).await;
        }
        let back = memory::held() == min;
        all_back &= back;
        println!(
            "  wave {}/{waves}: {peak_mb} MiB in {grown_ms} ms, held {} MiB, checksums {}; {} {} ms after freeing",
            wave + 1,
            held_at_peak / MIB,
            if bad == 0 { "ok" } else { "BAD" },
            if back { "back at min" } else { "NOT back at min" },
            (time::now_ns() - freed) / 1_000_000
        );
    }
    let (grants, releases) = memory::counters();
    println!(
        "mem-wave: peak held {} MiB, {grants} grants, {releases} releases, {errors} checksum errors, {} ms",
        peak_held / MIB,
        (time::now_ns() - started) / 1_000_000
    );
    println!("VERIFY data_errors={errors}");
    let ok = errors == 0 && all_back;
    println!(
        "mem-wave: {} (memory {} at min: {} MiB)",
        if ok { "PASSED" } else { "FAILED" },
        if memory::held() == min { "back" } else { "NOT" },
        memory::held() / MIB
    );
    if ok { exit_code::SUCCESS } else { exit_code::FAILURE }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_detect_a_flipped_byte() {
        let mut buf = alloc::vec![0u8; 4096];
        let sum = fill(&mut buf, 7);
        assert_eq!(checksum(&buf), sum);
        buf[1000] ^= 1;
        assert_ne!(checksum(&buf), sum);
    }
}
