//! The service registry. A service is an async function from its [`Env`] to an exit code that
//! runs as a task on the SMP executor; adding one is a module with an [`App`] constant and a
//! line in [`APPS`].

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::future::Future;
use core::pin::Pin;

use hypercall_abi::{BootInfo, HelloArgs, exit_code};

use crate::platform::Platform;

mod cpu_burst;
mod faults;
mod hello;
mod hostile;
mod http;
mod idle;
mod load;
mod mem_bench;
mod mem_churn;
mod mem_wave;
mod spin;
mod vcpu_bench;
mod vcpu_churn;

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

/// A service's running body.
pub type AppFuture = Pin<Box<dyn Future<Output = u32> + Send + 'static>>;

/// A registered service.
#[derive(Debug, Clone, Copy)]
pub struct App {
    /// Name given with `--app`.
    pub name: &'static str,
    /// Argument synopsis, e.g. `"N"`.
    pub usage: &'static str,
    /// One line on what it does.
    pub about: &'static str,
    /// Entry point; its output is the exit code (`0..=63`).
    pub main: fn(Env) -> AppFuture,
}

/// Boxes an async service body.
pub fn boxed<F: Future<Output = u32> + Send + 'static>(body: F) -> AppFuture {
    Box::pin(body)
}

/// Runs a synchronous service body as a task.
pub fn run_sync(env: Env, body: fn(&Env) -> u32) -> AppFuture {
    Box::pin(async move { body(&env) })
}

/// Every service linked into this image.
pub const APPS: &[App] = &[
    hello::APP,
    spin::APP,
    cpu_burst::APP,
    vcpu_churn::APP,
    idle::APP,
    mem_wave::APP,
    mem_churn::APP,
    load::APP,
    vcpu_bench::APP,
    mem_bench::APP,
    hostile::APP,
    faults::PANIC,
    faults::FAULT,
    HELP,
];

/// The names of [`APPS`], in order (for the image's service-list note).
pub const NAMES: [&str; APPS.len()] = {
    let mut names = [""; APPS.len()];
    let mut i = 0;
    while i < APPS.len() {
        names[i] = APPS[i].name;
        i += 1;
    }
    names
};

hypercall_abi::declare_service_list!(&NAMES);

const HELP: App =
    App { name: "help", usage: "", about: "list the services in this image", main: |env| run_sync(env, help) };

fn help(_env: &Env) -> u32 {
    crate::println!("services in this image:");
    for app in APPS {
        crate::println!("  {:<12} {:<18} {}", app.name, app.usage, app.about);
    }
    exit_code::SUCCESS
}

/// The service called `name`.
pub fn find(name: &str) -> Option<&'static App> {
    APPS.iter().find(|a| a.name == name)
}

/// Prints a usage error for service `name` (argument synopsis `usage`) and returns the
/// bad-command-line code.
pub fn usage_error(name: &str, usage: &str, problem: core::fmt::Arguments<'_>) -> u32 {
    crate::println!("{name}: {problem}\nusage: --app {name} -- {usage}");
    exit_code::BAD_COMMAND_LINE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_findable() {
        for (i, a) in APPS.iter().enumerate() {
            assert!(APPS[i + 1..].iter().all(|b| b.name != a.name), "duplicate {}", a.name);
            assert_eq!(find(a.name).map(|f| f.name), Some(a.name));
        }
        assert!(find("no-such-app").is_none());
    }
}
