//! Hostile kernel images under the real shim binary: malformed ELF notes and segments, a FIFO,
//! a directory, an oversized file are refused quickly with one line (exit 65); a kernel with a
//! 1 GiB sparse tail boots without the tail ever being read into memory.

mod common;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{SHIM, TempDir, kernel_image, require_kvm, run_traced, temp_dir};

/// How long a refusal may take (the shim refuses before creating any VM).
const REFUSAL_DEADLINE: Duration = Duration::from_secs(1);

/// What a run under a deadline produced.
#[derive(Debug)]
struct Bounded {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs the shim with `args`; kills it and fails the test if it is still running after
/// `deadline` (a regression fails instead of hanging the suite).
fn shim_within(args: &[&str], deadline: Duration) -> Bounded {
    require_kvm();
    let started = Instant::now();
    let mut child = Command::new(SHIM)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the shim binary runs");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the shim") {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hypervisor-shim {args:?} still running after {deadline:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = started.elapsed();
    let (mut stdout, mut stderr) = (String::new(), String::new());
    // The shim has exited: the pipes hold everything it wrote and are at end of file.
    child.stdout.take().expect("stdout").read_to_string(&mut stdout).expect("read stdout");
    child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("read stderr");
    Bounded { code: status.code(), stdout, stderr, took }
}

/// Asserts that `run --kernel kernel` is refused with exit 65, one stderr line containing
/// `needle`, nothing from a guest, within [`REFUSAL_DEADLINE`].
fn assert_refused(kernel: &Path, needle: &str) {
    let r = shim_within(&["run", "--kernel", path_str(kernel), "--timeout", "30"], REFUSAL_DEADLINE);
    assert_eq!(r.code, Some(65), "exit code for {needle:?}\n--- stderr\n{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "one-line reason: {}", r.stderr);
    assert!(r.stderr.contains(needle), "expected {needle:?} in: {}", r.stderr);
    assert!(r.stdout.is_empty(), "no guest ran: {}", r.stdout);
    assert!(r.took < REFUSAL_DEADLINE, "took {:?}", r.took);
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// The real kernel's bytes.
fn kernel_bytes() -> Vec<u8> {
    std::fs::read(kernel_image()).expect("kernel image")
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// File offset of the kernel's first program header of type `p_type` (1 = PT_LOAD, 4 = PT_NOTE).
fn phdr(bytes: &[u8], p_type: u32) -> usize {
    let (phoff, phnum) = (u64_at(bytes, 32) as usize, usize::from(u16_at(bytes, 56)));
    (0..phnum).map(|i| phoff + i * 56).find(|&at| u32_at(bytes, at) == p_type).expect("program header")
}

/// File offset of the ELASTIC ABI note's `Elf64_Nhdr`.
fn abi_note(bytes: &[u8]) -> usize {
    bytes.windows(8).position(|w| w == b"ELASTIC\0").expect("the kernel carries the ABI note") - 12
}

/// Writes the kernel with `edit` applied into a fresh directory.
fn patched_kernel(name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> (TempDir, PathBuf) {
    let mut bytes = kernel_bytes();
    edit(&mut bytes);
    let dir = temp_dir(name);
    let path = dir.join("kernel");
    std::fs::write(&path, bytes).expect("write the patched kernel");
    (dir, path)
}

#[test]
fn note_with_a_huge_name_size_is_refused_at_once() {
    let (_d, k) = patched_kernel("namesz", |b| {
        let at = abi_note(b);
        b[at..at + 4].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
    });
    assert_refused(&k, "declares a 4294967280-byte name");
}

#[test]
fn note_with_a_huge_descriptor_size_is_refused_at_once() {
    let (_d, k) = patched_kernel("descsz", |b| {
        let at = abi_note(b);
        b[at + 4..at + 8].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
    });
    assert_refused(&k, "4294967280-byte descriptor");
}

#[test]
fn note_segment_beyond_the_file_is_refused() {
    let (_d, k) = patched_kernel("note-offset", |b| {
        let at = phdr(b, 4);
        b[at + 8..at + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    });
    assert_refused(&k, "malformed note segment");
}

#[test]
fn abi_note_with_a_four_byte_descriptor_is_refused() {
    let (_d, k) = patched_kernel("descsz4", |b| {
        let at = abi_note(b);
        b[at + 4..at + 8].copy_from_slice(&4u32.to_le_bytes());
    });
    assert_refused(&k, "descriptor is 4 bytes, expected 8");
}

/// A `PT_LOAD` program header.
fn load_phdr(paddr: u64, offset: u64, filesz: u64, memsz: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(56);
    h.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    h.extend_from_slice(&4u32.to_le_bytes()); // PF_R
    for v in [offset, paddr, paddr, filesz, memsz, 0x1000] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h
}

/// Moves the program header table to the end of the file and appends `extra` to it.
fn add_phdr(b: &mut Vec<u8>, extra: &[u8]) {
    let (phoff, phnum) = (u64_at(b, 32) as usize, u16_at(b, 56));
    let table = b.len() as u64;
    b.extend_from_within(phoff..phoff + usize::from(phnum) * 56);
    b.extend_from_slice(extra);
    b[32..40].copy_from_slice(&table.to_le_bytes());
    b[56..58].copy_from_slice(&(phnum + 1).to_le_bytes());
}

#[test]
fn load_segment_with_an_absurd_file_size_is_refused() {
    let (_d, k) = patched_kernel("filesz", |b| {
        let at = phdr(b, 1);
        // Memory size to match, so only the file range is wrong.
        b[at + 32..at + 40].copy_from_slice(&(1u64 << 36).to_le_bytes());
        b[at + 40..at + 48].copy_from_slice(&(1u64 << 36).to_le_bytes());
    });
    assert_refused(&k, "past the end of the");
    let (_d, k) = patched_kernel("filesz-memsz", |b| {
        let at = phdr(b, 1);
        b[at + 32..at + 40].copy_from_slice(&u64::MAX.to_le_bytes());
    });
    assert_refused(&k, "bytes in memory");
    // An extra segment with no memory size but an absurd file size (once skipped unchecked).
    let (_d, k) = patched_kernel("filesz-empty", |b| add_phdr(b, &load_phdr(0x3000_0000, 0, 1 << 60, 0)));
    assert_refused(&k, "takes 0x1000000000000000 bytes from the file but is only 0x0 bytes in memory");
}

#[test]
fn a_fifo_is_refused_without_waiting_for_a_writer() {
    let dir = temp_dir("fifo");
    let fifo = dir.join("kernel.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo runs");
    assert!(made.success(), "mkfifo {}", fifo.display());
    assert_refused(&fifo, "is a FIFO (named pipe), not a regular file");
}

#[test]
fn a_directory_and_a_device_are_refused() {
    let dir = temp_dir("dir");
    assert_refused(&dir, "is a directory, not a regular file");
    assert_refused(Path::new("/dev/zero"), "is a character device, not a regular file");
}

#[test]
fn an_empty_or_oversized_file_is_refused() {
    let dir = temp_dir("sizes");
    let empty = dir.join("empty");
    File::create(&empty).expect("create");
    assert_refused(&empty, "is empty");
    // Sparse: no disk space is used.
    let huge = dir.join("huge");
    File::create(&huge).expect("create").set_len(5 << 30).expect("set_len");
    assert_refused(&huge, "may be at most 4294967296 bytes");
}

#[test]
fn a_kernel_with_a_sparse_gigabyte_tail_boots_without_reading_it() {
    let (_d, k) = patched_kernel("sparse-tail", |_| {});
    let len = std::fs::metadata(&k).expect("kernel copy").len();
    File::options().write(true).open(&k).expect("open").set_len(len + (1 << 30)).expect("grow");
    let t = run_traced("sparse-tail-run", &["--kernel", path_str(&k), "--app", "hello"]);
    t.run.expect_code(0);
    let peak = t.summary()["host_rss_bytes"]["peak"].as_u64().expect("host_rss_bytes.peak");
    assert!(peak > 0, "the summary measured the RSS");
    assert!(peak < 128 << 20, "peak RSS {peak} bytes: the 1 GiB tail was read into memory");
}
