//! The guest images built from this workspace for `x86_64-unknown-none` by this crate's build
//! script (a nested `cargo build` of `kernel` and `examples/my-service`), so `cargo run` and
//! `cargo test` always boot images built from the same sources as the VMM.
//!
//! The default image is also embedded ([`KERNEL_IMAGE`]): a binary built with it carries its
//! kernel, and [`builtin::kernel_file`] gives that kernel a path outside the build's `target/`
//! directory, so a copied or installed binary keeps working after `cargo clean` or on another
//! machine. The paths ([`KERNEL`], [`EXAMPLE_SERVICE`]) are for tests, which run in the build
//! tree.

pub mod builtin;

/// Where the build put the default image: the kernel with the services of `kernel/src/apps`.
/// Valid only while the build's `target/` directory exists; a binary uses
/// [`builtin::kernel_file`].
pub const KERNEL: &str = env!("KERNEL_PATH");

/// The default image's bytes, embedded at build time (empty under clippy, which does not
/// build the kernel).
pub static KERNEL_IMAGE: &[u8] = include_bytes!(env!("KERNEL_PATH"));

/// The SHA-256 of [`KERNEL_IMAGE`], in lowercase hex.
pub const KERNEL_SHA256: &str = env!("KERNEL_SHA256");

/// The README's "write your own service" image (`examples/my-service`).
pub const EXAMPLE_SERVICE: &str = env!("EXAMPLE_SERVICE_PATH");
