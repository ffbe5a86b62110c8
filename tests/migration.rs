//! Live migration, again and again, of a VM whose memory moves while it moves: a kv service
//! migrates 20 times in a row (each time to a new receiving shim process) while a client
//! stores and deletes megabyte values (so the guest is granted and releases extents during
//! the pre-copy rounds) and writes small keys. Every hop runs with `--verify` (no page the
//! dirty log missed) and every acknowledged write is read back after each hop.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{ShimProcess, ctl_in, free_port, json_of, require_kvm, resp, temp_dir, wait_for_api, wait_for_path};

/// Hops the VM makes.
const HOPS: usize = 20;
/// Size of the values that make the guest grant and release extents.
const BIG: usize = 1 << 20;
/// Big values stored before they are all deleted again.
const BIG_PER_CYCLE: usize = 12;

/// Sends one command and reads a reply of exactly `want.len()` bytes; true when it is `want`.
fn exchange(conn: &mut TcpStream, args: &[&[u8]], want: &[u8]) -> bool {
    let mut reply = vec![0u8; want.len()];
    conn.write_all(&resp(args)).is_ok() && conn.read_exact(&mut reply).is_ok() && reply == want
}

/// The client: cycles of storing `BIG_PER_CYCLE` big values and deleting them, with a small
/// write between two big ones. A write counts as acknowledged only when its own reply arrived
/// (a connection reset at the switch makes it reconnect).
fn client(port: u16, stop: Arc<AtomicBool>, acked: Arc<Mutex<Vec<String>>>) -> (u64, u64) {
    let big = vec![b'x'; BIG];
    let (mut n, mut cycles, mut resets) = (0u64, 0u64, 0u64);
    while !stop.load(Ordering::Acquire) {
        let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        'cycles: while !stop.load(Ordering::Acquire) {
            for j in 0..BIG_PER_CYCLE {
                let key = format!("big:{j}");
                if !exchange(&mut conn, &[b"SET", key.as_bytes(), &big], b"+OK\r\n") {
                    break 'cycles;
                }
                let (k, v) = (format!("w{n}"), format!("v{n}"));
                if !exchange(&mut conn, &[b"SET", k.as_bytes(), v.as_bytes()], b"+OK\r\n") {
                    break 'cycles;
                }
                acked.lock().expect("acked").push(k);
                n += 1;
            }
            for j in 0..BIG_PER_CYCLE {
                let key = format!("big:{j}");
                if !exchange(&mut conn, &[b"DEL", key.as_bytes()], b":1\r\n") {
                    break 'cycles;
                }
            }
            cycles += 1;
            // Free memory stays high a while: the guest gives the extents back.
            std::thread::sleep(Duration::from_millis(100));
        }
        resets += 1;
    }
    (cycles, resets)
}

/// Reads back every acknowledged small write (pipelined GETs on a fresh connection).
fn check_acked(port: u16, acked: &[String], hop: usize) {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect to kv");
    conn.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let mut want = Vec::new();
    for chunk in acked.chunks(500) {
        let mut out = Vec::new();
        want.clear();
        for k in chunk {
            out.extend(resp(&[b"GET", k.as_bytes()]));
            let v = k.replacen('w', "v", 1);
            want.extend(format!("${}\r\n{v}\r\n", v.len()).into_bytes());
        }
        conn.write_all(&out).expect("send GETs");
        let mut got = vec![0u8; want.len()];
        conn.read_exact(&mut got).unwrap_or_else(|e| panic!("after hop {hop}: reading back failed: {e}"));
        assert!(got == want, "after hop {hop}: an acknowledged write is missing or different");
    }
}

#[test]
fn kv_migrates_twenty_times_while_its_memory_grows_and_shrinks_and_a_client_writes() {
    require_kvm();
    let dir = temp_dir("migrate-20");
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:6379");
    // Low watermarks and 4 MiB grants: the client's cycles make the guest grant and release
    // often.
    let vm_args = [
        "--vcpus",
        "1:2:2",
        "--memory",
        "32M:512M:512M",
        "--guest-opt",
        "mem.high_mb=8",
        "--guest-opt",
        "mem.low_mb=2",
        "--guest-opt",
        "mem.chunk_mb=4",
        "--timeout",
        "600",
    ];
    let mut args = vec!["run", "--app", "kv", "--publish", &publish, "--api-sock", "vm0.sock"];
    args.extend(vm_args);
    let mut here = ShimProcess::start(&dir, &args);
    let mut sock = "vm0.sock".to_string();
    wait_for_api(&dir, &sock);
    let first_up = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (stop, acked) = (Arc::clone(&stop), Arc::clone(&acked));
        std::thread::spawn(move || client(port, stop, acked))
    };
    let (mut grants, mut releases) = (0, 0);
    for hop in 1..=HOPS {
        let next_sock = format!("vm{hop}.sock");
        let listen = format!("mig{hop}.sock");
        let target = format!("unix:{listen}");
        let there =
            ShimProcess::start(&dir, &["receive", "--listen", &target, "--api-sock", &next_sock, "--timeout", "600"]);
        wait_for_path(&dir.join(&listen), Duration::from_secs(20), &format!("hop {hop}: the receiver never listened"));
        // Let the client store and delete a while on this host.
        std::thread::sleep(Duration::from_millis(500));
        let before = json_of(&ctl_in(&dir, &sock, &["get", "vm0"]));
        grants += before["memory_bytes"]["grants"].as_u64().unwrap_or(0);
        releases += before["memory_bytes"]["releases"].as_u64().unwrap_or(0);
        let m = json_of(&ctl_in(&dir, &sock, &["migrate", "vm0", "--to", &target, "--verify"]));
        assert_eq!(m["missed_by_log"], 0, "hop {hop}: the dirty log missed pages: {m}");
        assert_eq!(here.wait(Duration::from_secs(30)).0, Some(0), "hop {hop}: the source ends once the target runs");
        here = there;
        sock = next_sock;
        wait_for_api(&dir, &sock);
        let so_far = acked.lock().expect("acked").clone();
        check_acked(port, &so_far, hop);
    }
    stop.store(true, Ordering::Release);
    let (cycles, resets) = writer.join().expect("the client");
    let all = acked.lock().expect("acked").clone();
    eprintln!(
        "{HOPS} hops: {} acknowledged writes, {cycles} grow/shrink cycles, {resets} reconnects, \
         {grants} grants and {releases} releases seen on the sources",
        all.len()
    );
    check_acked(port, &all, HOPS);
    // The VM's uptime goes on across the hops (it does not restart at each target, which
    // would leave it near the last hop's age, under a second). `lived` is taken before the
    // query; the hops' downtimes (a few ms each) are not counted, hence the 1 s allowance.
    let lived = first_up.elapsed();
    let uptime_us = json_of(&ctl_in(&dir, &sock, &["list"]))[0]["uptime_us"].as_u64().unwrap_or(0);
    assert!(
        uptime_us + 1_000_000 >= lived.as_micros() as u64,
        "uptime {uptime_us} µs after {HOPS} hops over {lived:?}"
    );
    assert!(all.len() >= 200, "the client got only {} writes acknowledged", all.len());
    assert!(grants >= HOPS as u64 && releases >= HOPS as u64, "grants {grants}, releases {releases}");
    ctl_in(&dir, &sock, &["stop", "vm0"]).expect_code(0);
    assert_eq!(here.wait(Duration::from_secs(30)).0, Some(5), "the last target stops cleanly");
}
