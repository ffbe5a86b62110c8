//! Links the kernel as a non-PIE executable at a fixed address when it is built for
//! `x86_64-unknown-none`. Host builds (clippy, `cargo check --workspace`) link normally.

fn main() {
    println!("cargo::rerun-if-changed=linker.ld");
    println!("cargo::rerun-if-changed=build.rs");
    let target = std::env::var("TARGET").unwrap_or_default();
    if target == "x86_64-unknown-none" {
        let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
        println!("cargo::rustc-link-arg=-T{dir}/linker.ld");
        println!("cargo::rustc-link-arg=--no-pie");
        println!("cargo::rustc-link-arg=-zmax-page-size=4096");
    }
}
