//! Builds the kernel for `x86_64-unknown-none` with a nested `cargo build` and exports its
//! path as `KERNEL_PATH`, so `cargo run` / `cargo test` always boot a kernel built from the
//! same sources. The nested build uses its own target directory under `OUT_DIR` (no lock
//! contention with the outer build) and a scrubbed environment (the outer build's flags and
//! wrappers must not leak into a different target).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest.parent().expect("hypervisor-shim lives inside the workspace").to_path_buf();
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for p in [
        "kernel/src",
        "kernel/Cargo.toml",
        "kernel/build.rs",
        "kernel/linker.ld",
        "hypercall-abi/src",
        "hypercall-abi/Cargo.toml",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo::rerun-if-changed={}", root.join(p).display());
    }

    // Clippy only checks the host crates; it needs the variable, not the kernel.
    let under_clippy = env::var("RUSTC_WORKSPACE_WRAPPER").is_ok_and(|w| w.contains("clippy-driver"));
    if under_clippy {
        println!("cargo::rustc-env=KERNEL_PATH={}", out.join("kernel-not-built-under-clippy").display());
        return;
    }

    let (profile, profile_dir) = match env::var("PROFILE").as_deref() {
        Ok("release") => ("release", "release"),
        _ => ("dev", "debug"),
    };
    let target_dir = out.join("kernel-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "-p", "kernel", "--target", "x86_64-unknown-none", "--profile", profile, "--target-dir"])
        .arg(&target_dir);
    if env::var_os("CARGO_NET_OFFLINE").is_some() {
        cmd.arg("--offline");
    }
    for (key, _) in env::vars_os() {
        let k = key.to_string_lossy();
        let keep = k == "CARGO_HOME" || k == "CARGO_NET_OFFLINE";
        if !keep && (k.starts_with("CARGO") || k.starts_with("RUST") && k != "RUSTUP_HOME" && k != "RUSTUP_TOOLCHAIN") {
            cmd.env_remove(&key);
        }
    }
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run the nested cargo build of the kernel: {e}"));
    if !status.success() {
        panic!(
            "building the kernel for x86_64-unknown-none failed ({status}); is the target installed? (rustup target add x86_64-unknown-none)"
        );
    }
    let kernel = target_dir.join("x86_64-unknown-none").join(profile_dir).join("kernel");
    assert!(Path::new(&kernel).exists(), "the kernel build succeeded but {} is missing", kernel.display());
    println!("cargo::rustc-env=KERNEL_PATH={}", kernel.display());
}
