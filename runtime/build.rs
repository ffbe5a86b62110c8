//! Puts the runtime's linker script (`elastic.ld`) where the linker of any image that depends
//! on this crate finds it: the image's own build script then passes `-Telastic.ld` (see the
//! README, "Write your own service"). Cargo forwards this crate's link search path to every
//! crate that depends on it.

use std::path::PathBuf;

fn main() {
    println!("cargo::rerun-if-changed=linker.ld");
    println!("cargo::rerun-if-changed=build.rs");
    let (Some(out), Some(dir)) = (std::env::var_os("OUT_DIR"), std::env::var_os("CARGO_MANIFEST_DIR")) else {
        eprintln!("error: OUT_DIR and CARGO_MANIFEST_DIR must be set: run this build through cargo");
        std::process::exit(1);
    };
    let out = PathBuf::from(out);
    if let Err(e) = std::fs::copy(PathBuf::from(dir).join("linker.ld"), out.join("elastic.ld")) {
        eprintln!("error: cannot copy the linker script into {}: {e}", out.display());
        std::process::exit(1);
    }
    println!("cargo::rustc-link-search=native={}", out.display());
}
