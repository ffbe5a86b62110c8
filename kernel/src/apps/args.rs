//! Arguments the bundled services share.

use alloc::string::String;

use elastic_rt::{Env, usage_error};

/// The vsock port a network service listens on: its first argument, or `default` when it has
/// none. A bad port is a usage error (printed): `Err` holds the service's exit code.
pub fn port(env: &Env, name: &str, usage: &str, default: u32) -> Result<u32, u32> {
    match env.args.first().map(String::as_str) {
        None => Ok(default),
        Some(p) => match p.parse::<u32>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(usage_error(name, usage, format_args!("'{p}' is not a port number"))),
        },
    }
}
