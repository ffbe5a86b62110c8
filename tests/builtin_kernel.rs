//! The default kernel travels inside the `hypervisor-shim` binary: a copy of the binary boots
//! it from another directory without opening anything in the build's `target/` directory
//! (checked with `strace`), repairs a damaged cache file, and says in one line (exit 66) when
//! it has nowhere to write the image; `kernel` prints its path or copies it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Run, SHIM, kernel_image, require_kvm, temp_dir};

/// The build's target directory (`CARGO_TARGET_TMPDIR` is `target/tmp`).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("target/tmp has a parent").to_path_buf()
}

/// Runs `bin run --app hello` under `strace -f -e trace=%file` from `cwd`, with the cache in
/// `cache`; returns what it printed and the trace.
fn traced_hello(bin: &Path, cwd: &Path, cache: &Path, trace: &Path) -> (Run, String) {
    let out = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=%file", "-o"])
        .arg(trace)
        .arg(bin)
        .args(["run", "--app", "hello", "--timeout", "120"])
        .current_dir(cwd)
        // As a user's shell would run it: not cargo's LD_LIBRARY_PATH into target/.
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("XDG_CACHE_HOME", cache)
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("strace is not installed: apt-get install strace (cargo xtask test installs it)")
        }
        Err(e) => panic!("cannot run strace: {e}"),
    };
    let text = std::fs::read_to_string(trace).unwrap_or_else(|e| panic!("no strace log {}: {e}", trace.display()));
    (out.into(), text)
}

#[test]
fn a_copied_binary_boots_its_embedded_kernel_without_the_build_tree() {
    require_kvm();
    let dir = temp_dir("builtin-kernel");
    let bin = dir.join("hypervisor-shim");
    std::fs::copy(SHIM, &bin).expect("copy the shim binary");
    let (cwd, cache) = (dir.join("elsewhere"), dir.join("cache"));
    std::fs::create_dir(&cwd).expect("a working directory");
    let cached = cache.join("elastic-unikernel").join(format!("kernel-{}", &elastic_images::KERNEL_SHA256[..16]));
    let built = std::fs::read(kernel_image()).expect("the built kernel");
    let target = target_dir();
    let target = target.to_str().expect("UTF-8 target path");

    // First run: the image is written to the cache and booted from there; nothing under
    // target/ is even looked at.
    let (run, trace) = traced_hello(&bin, &cwd, &cache, &dir.join("trace-1"));
    run.expect_code(0);
    assert!(run.stdout.contains("Hello from the elastic unikernel"), "no banner:\n{}", run.stdout);
    let under_target: Vec<&str> = trace.lines().filter(|l| l.contains(target)).collect();
    assert!(under_target.is_empty(), "the copied binary touched the build tree {target}:\n{}", under_target.join("\n"));
    let cached_text = cached.to_str().expect("UTF-8 cache path");
    assert!(
        trace.lines().any(|l| l.contains("openat(") && l.contains(cached_text) && l.contains("O_NONBLOCK")),
        "the loader did not open {cached_text}:\n{trace}"
    );
    assert_eq!(std::fs::read(&cached).expect("the cached image"), built, "the cached image is the built kernel");

    // A damaged cache file is rewritten before it is booted.
    let mut damaged = built.clone();
    damaged.truncate(built.len() / 2);
    std::fs::write(&cached, &damaged).expect("damage the cache file");
    let (run, trace) = traced_hello(&bin, &cwd, &cache, &dir.join("trace-2"));
    run.expect_code(0);
    assert!(run.stdout.contains("Hello from the elastic unikernel"), "no banner:\n{}", run.stdout);
    assert!(!trace.contains(target), "the second run touched the build tree:\n{trace}");
    assert_eq!(std::fs::read(&cached).expect("the cached image"), built, "the damaged file was repaired");
}

#[test]
fn nowhere_to_write_the_embedded_kernel_is_one_line_and_exit_66() {
    require_kvm();
    let dir = temp_dir("builtin-kernel-nowhere");
    // A file where the cache and the temporary directory should be: neither can hold the
    // image's directory.
    let blocker = dir.join("a-file");
    std::fs::write(&blocker, b"not a directory").expect("write a file");
    let out = Command::new(SHIM)
        .args(["run", "--app", "hello"])
        .env("XDG_CACHE_HOME", &blocker)
        .env("TMPDIR", &blocker)
        .output()
        .expect("the shim runs");
    let run = Run::from(out);
    run.expect_code(66);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line:\n{}", run.stderr);
    assert!(lines[0].contains("built-in kernel image is unavailable"), "{}", lines[0]);
    assert!(lines[0].contains(blocker.to_str().expect("UTF-8")), "names the directory: {}", lines[0]);
    assert!(lines[0].contains("--kernel PATH"), "says what to do: {}", lines[0]);
    // An explicit --kernel needs no cache.
    let out = Command::new(SHIM)
        .args(["run", "--app", "hello", "--kernel"])
        .arg(kernel_image())
        .env("XDG_CACHE_HOME", &blocker)
        .env("TMPDIR", &blocker)
        .output()
        .expect("the shim runs");
    Run::from(out).expect_code(0);
}

#[test]
fn the_kernel_command_prints_the_cached_path_and_copies_the_image() {
    let dir = temp_dir("builtin-kernel-command");
    let cache = dir.join("cache");
    let built = std::fs::read(kernel_image()).expect("the built kernel");
    let out = Command::new(SHIM).arg("kernel").env("XDG_CACHE_HOME", &cache).output().expect("the shim runs");
    let run = Run::from(out);
    run.expect_code(0);
    let printed = PathBuf::from(run.stdout.trim_end());
    assert!(printed.starts_with(cache.join("elastic-unikernel")), "{}", printed.display());
    assert_eq!(std::fs::read(&printed).expect("the printed path"), built);
    // --output: a copy a containerd rootfs can hold, readable by others.
    let copy = dir.join("rootfs-kernel");
    let out = Command::new(SHIM).args(["kernel", "--output"]).arg(&copy).env("XDG_CACHE_HOME", &cache).output();
    Run::from(out.expect("the shim runs")).expect_code(0);
    assert_eq!(std::fs::read(&copy).expect("the copy"), built);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&copy).expect("the copy").permissions().mode() & 0o777, 0o644);
    // A file that cannot be written: one line naming it, exit 74.
    let bad = dir.join("no-such-dir").join("kernel");
    let out = Command::new(SHIM).args(["kernel", "-o"]).arg(&bad).env("XDG_CACHE_HOME", &cache).output();
    let run = Run::from(out.expect("the shim runs"));
    run.expect_code(74);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains(bad.to_str().expect("UTF-8")), "{}", run.stderr);
}
