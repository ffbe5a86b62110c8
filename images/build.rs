//! Builds the kernel for `x86_64-unknown-none` with a nested `cargo build` and exports its
//! path as `KERNEL_PATH` and its SHA-256 as `KERNEL_SHA256`, so `cargo run` / `cargo test`
//! always boot a kernel built from the same sources, and the library can embed it. The nested build uses its own target directory under `OUT_DIR` (no lock
//! contention with the outer build) and a scrubbed environment (the outer build's flags and
//! wrappers must not leak into a different target).
//!
//! A fresh machine may have the pinned toolchain without the `x86_64-unknown-none` target
//! (rustup installs a `rust-toolchain.toml`'s targets only when it installs the toolchain).
//! When the target is missing and rustup is present, this script installs it for the active
//! toolchain and says so in a cargo warning; without rustup it stops with one line saying what
//! to run. An environment problem is never a panic backtrace.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use sha2::{Digest, Sha256};

const TARGET: &str = "x86_64-unknown-none";

/// Stops the build with one line on stderr (cargo shows it under "failed to run custom build
/// command").
fn stop(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let (Some(manifest), Some(out)) = (env::var_os("CARGO_MANIFEST_DIR"), env::var_os("OUT_DIR")) else {
        return stop("CARGO_MANIFEST_DIR and OUT_DIR must be set: run this build through cargo");
    };
    let manifest = PathBuf::from(manifest);
    let out = PathBuf::from(out);
    let Some(root) = manifest.parent().map(Path::to_path_buf) else {
        return stop("elastic-images must live inside the workspace");
    };
    for p in [
        "kernel/src",
        "kernel/Cargo.toml",
        "kernel/build.rs",
        "runtime/src",
        "runtime/Cargo.toml",
        "runtime/build.rs",
        "runtime/linker.ld",
        "examples/my-service/src",
        "examples/my-service/Cargo.toml",
        "examples/my-service/build.rs",
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
        // `include_bytes!` needs a file: an empty one stands in for the kernel.
        let placeholder = out.join("kernel-not-built-under-clippy");
        if let Err(e) = std::fs::write(&placeholder, b"") {
            return stop(&format!("cannot write {}: {e}", placeholder.display()));
        }
        println!("cargo::rustc-env=KERNEL_PATH={}", placeholder.display());
        println!("cargo::rustc-env=KERNEL_SHA256=not-built-under-clippy");
        println!("cargo::rustc-env=EXAMPLE_SERVICE_PATH={}", out.join("example-not-built-under-clippy").display());
        return ExitCode::SUCCESS;
    }

    if let Err(message) = ensure_target() {
        return stop(&message);
    }

    let (profile, profile_dir) = match env::var("PROFILE").as_deref() {
        Ok("release") => ("release", "release"),
        _ => ("dev", "debug"),
    };
    let target_dir = out.join("kernel-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        // The default image, and the README's own-service example (tests boot it).
        .args(["build", "-p", "kernel", "-p", "my-service", "--target", TARGET, "--profile", profile, "--target-dir"])
        .arg(&target_dir);
    if env::var_os("CARGO_NET_OFFLINE").is_some() {
        cmd.arg("--offline");
    }
    scrub_environment(&mut cmd);
    let status = match cmd.status() {
        Ok(s) => s,
        Err(e) => return stop(&format!("cannot run the nested cargo build of the kernel: {e}")),
    };
    if !status.success() {
        return stop(&format!("building the kernel for {TARGET} failed ({status}); the compiler's messages are above"));
    }
    let kernel = target_dir.join(TARGET).join(profile_dir).join("kernel");
    if !kernel.exists() {
        return stop(&format!("the kernel build succeeded but {} is missing", kernel.display()));
    }
    // The binary embeds the image (`elastic_images::KERNEL_IMAGE`) and writes it out under a
    // name made of its digest, so different builds never share a file.
    let digest = match std::fs::read(&kernel) {
        Ok(bytes) => Sha256::digest(&bytes),
        Err(e) => return stop(&format!("cannot read the kernel just built at {}: {e}", kernel.display())),
    };
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    println!("cargo::rustc-env=KERNEL_PATH={}", kernel.display());
    println!("cargo::rustc-env=KERNEL_SHA256={hex}");
    let example = target_dir.join(TARGET).join(profile_dir).join("my-service");
    println!("cargo::rustc-env=EXAMPLE_SERVICE_PATH={}", example.display());
    ExitCode::SUCCESS
}

/// Removes the outer build's cargo and rustc variables (they describe the host build), keeping
/// the ones that select the toolchain and the registry.
fn scrub_environment(cmd: &mut Command) {
    for (key, _) in env::vars_os() {
        let k = key.to_string_lossy();
        let keep = matches!(k.as_ref(), "CARGO_HOME" | "CARGO_NET_OFFLINE" | "RUSTUP_HOME" | "RUSTUP_TOOLCHAIN");
        if !keep && (k.starts_with("CARGO") || k.starts_with("RUST")) {
            cmd.env_remove(&key);
        }
    }
}

/// Makes sure the active toolchain has the kernel's target, installing it with rustup when it
/// is missing. Returns one line saying what to do when that is not possible.
fn ensure_target() -> Result<(), String> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("cannot run {} to find its sysroot: {e}", Path::new(&rustc).display()))?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if sysroot.join("lib/rustlib").join(TARGET).join("lib").is_dir() {
        return Ok(());
    }
    let toolchain = env::var("RUSTUP_TOOLCHAIN").ok();
    let mut add = Command::new("rustup");
    add.args(["target", "add", TARGET]);
    if let Some(t) = &toolchain {
        add.args(["--toolchain", t]);
    }
    let for_toolchain = toolchain.as_deref().map(|t| format!(" for toolchain {t}")).unwrap_or_default();
    match add.output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "the Rust target {TARGET} is not installed and rustup is not available to install it: install it for the compiler at {} (with rustup: rustup target add {TARGET})",
            sysroot.display()
        )),
        Err(e) => Err(format!("cannot run rustup to install the target {TARGET}: {e}")),
        Ok(o) if !o.status.success() => {
            let why = String::from_utf8_lossy(&o.stderr);
            let why = why.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("no message").trim();
            Err(format!(
                "installing the Rust target {TARGET}{for_toolchain} with rustup failed ({why}); run: rustup target add {TARGET}"
            ))
        }
        Ok(_) => {
            println!(
                "cargo::warning=installed the Rust target {TARGET}{for_toolchain} with rustup (the kernel is built for it)"
            );
            Ok(())
        }
    }
}
