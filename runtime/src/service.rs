//! Services: what an image offers (selected with `--app` on the shim), and what a service is
//! given when it starts.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::future::Future;
use core::pin::Pin;

use hypercall_abi::{BootInfo, HelloArgs, exit_code};

use crate::platform::Platform;

/// What a service is given.
#[derive(Debug, Clone)]
pub struct Env {
    /// Arguments after `--` on the command line.
    pub args: Vec<String>,
    /// The boot-info block.
    pub boot: BootInfo,
    /// The host's HELLO answer (`None` under QEMU).
    pub hello: Option<HelloArgs>,
    /// Where the kernel runs.
    pub platform: Platform,
}

/// A service's running body: its output is the exit code (`0..=63`).
pub type ServiceFuture = Pin<Box<dyn Future<Output = u32> + Send + 'static>>;

/// A service an image offers.
#[derive(Debug, Clone, Copy)]
pub struct Service {
    /// Name given with `--app` (letters, digits, `-`, `_`).
    pub name: &'static str,
    /// Argument synopsis, e.g. `"[PORT]"`.
    pub usage: &'static str,
    /// One line on what it does.
    pub about: &'static str,
    /// Entry point.
    pub main: fn(Env) -> ServiceFuture,
}

impl Service {
    /// A service called `name`.
    pub const fn new(
        name: &'static str,
        usage: &'static str,
        about: &'static str,
        main: fn(Env) -> ServiceFuture,
    ) -> Service {
        Service { name, usage, about, main }
    }
}

/// Boxes an async service body.
pub fn boxed<F: Future<Output = u32> + Send + 'static>(body: F) -> ServiceFuture {
    Box::pin(body)
}

/// Runs a synchronous service body as a task.
pub fn run_sync(env: Env, body: fn(&Env) -> u32) -> ServiceFuture {
    Box::pin(async move { body(&env) })
}

/// Prints a usage error for service `name` (argument synopsis `usage`) and returns the
/// bad-command-line exit code.
pub fn usage_error(name: &str, usage: &str, problem: core::fmt::Arguments<'_>) -> u32 {
    crate::println!("{name}: {problem}\nusage: --app {name} -- {usage}");
    exit_code::BAD_COMMAND_LINE
}

/// The names of `services`, in order (for the image's service-list note; used by
/// [`entry!`](crate::entry)).
pub const fn names<const N: usize>(services: &[Service]) -> [&'static str; N] {
    let mut names = [""; N];
    let mut i = 0;
    while i < N && i < services.len() {
        names[i] = services[i].name;
        i += 1;
    }
    names
}

#[cfg(target_os = "none")]
unsafe extern "Rust" {
    /// Defined by the image's [`entry!`](crate::entry).
    fn __elastic_rt_services() -> &'static [Service];
}

/// The services of this image.
pub fn services() -> &'static [Service] {
    #[cfg(target_os = "none")]
    {
        // SAFETY: `entry!` in the image defines this function with exactly this signature; it
        // only returns a reference to a constant.
        unsafe { __elastic_rt_services() }
    }
    #[cfg(not(target_os = "none"))]
    {
        &[]
    }
}

/// The service called `name`.
pub fn find(name: &str) -> Option<&'static Service> {
    services().iter().find(|s| s.name == name)
}
