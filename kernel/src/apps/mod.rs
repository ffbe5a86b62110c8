//! The service registry. A service is a function from its [`Env`] to an exit code; adding one
//! is a module with an [`App`] constant and a line in [`APPS`].

use hypercall_abi::{BootInfo, HelloArgs, exit_code};

use crate::platform::Platform;

mod faults;
mod hello;
mod spin;

/// What a service is given.
#[derive(Debug)]
pub struct Env<'a> {
    /// Arguments after `--` on the command line.
    pub args: &'a [&'a str],
    /// The boot-info block.
    pub boot: &'a BootInfo,
    /// The host's HELLO answer (`None` under QEMU).
    pub hello: Option<&'a HelloArgs>,
    /// Where the kernel runs.
    pub platform: Platform,
}

/// A registered service.
#[derive(Debug, Clone, Copy)]
pub struct App {
    /// Name given with `--app`.
    pub name: &'static str,
    /// Argument synopsis, e.g. `"N"`.
    pub usage: &'static str,
    /// One line on what it does.
    pub about: &'static str,
    /// Entry point; returns the exit code (`0..=63`).
    pub main: fn(&Env<'_>) -> u32,
}

/// Every service linked into this image.
pub const APPS: &[App] = &[hello::APP, spin::APP, faults::PANIC, faults::FAULT, HELP];

const HELP: App = App { name: "help", usage: "", about: "list the services in this image", main: help };

fn help(_env: &Env<'_>) -> u32 {
    crate::println!("services in this image:");
    for app in APPS {
        crate::println!("  {:<12} {:<10} {}", app.name, app.usage, app.about);
    }
    exit_code::SUCCESS
}

/// The service called `name`.
pub fn find(name: &str) -> Option<&'static App> {
    APPS.iter().find(|a| a.name == name)
}

/// Prints a usage error for `app` and returns the bad-command-line code.
pub fn usage_error(app: &App, problem: core::fmt::Arguments<'_>) -> u32 {
    crate::println!("{}: {}\nusage: --app {} -- {}", app.name, problem, app.name, app.usage);
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
