// Link the image where the shim loads kernels (the linker script comes with elastic-rt).
fn main() {
    if std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-none") {
        for arg in ["-Telastic.ld", "--no-pie", "-zmax-page-size=4096"] {
            println!("cargo::rustc-link-arg={arg}");
        }
    }
}
