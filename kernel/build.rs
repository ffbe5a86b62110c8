//! Links the image as a non-PIE executable at the fixed address the shim and QEMU load kernels
//! at, with the runtime's linker script (`elastic.ld`, put on the link path by `elastic-rt`).
//! Host builds (clippy, unit tests) link normally.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-none") {
        println!("cargo::rustc-link-arg=-Telastic.ld");
        println!("cargo::rustc-link-arg=--no-pie");
        println!("cargo::rustc-link-arg=-zmax-page-size=4096");
    }
}
