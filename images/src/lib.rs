//! The guest images built from this workspace for `x86_64-unknown-none` by this crate's build
//! script (a nested `cargo build` of `kernel` and `examples/my-service`), so `cargo run` and
//! `cargo test` always boot images built from the same sources as the VMM.

/// The default image: the kernel with the services of `kernel/src/apps`.
pub const KERNEL: &str = env!("KERNEL_PATH");

/// The README's "write your own service" image (`examples/my-service`).
pub const EXAMPLE_SERVICE: &str = env!("EXAMPLE_SERVICE_PATH");
