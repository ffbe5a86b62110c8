//! `echo [PORT]`: a network service that sends back every byte it receives, one task per
//! connection (publish it with `--publish HOST_PORT:PORT`). Ends when the host asks the VM to
//! stop.

use alloc::string::String;

use elastic_rt::prelude::*;
use elastic_rt::println;
use hypercall_abi::exit_code;

const NAME: &str = "echo";
const USAGE: &str = "[PORT]";

/// The `echo` service.
pub const SERVICE: Service = Service::new(NAME, USAGE, "echo every byte back on vsock PORT (default 7)", |env| {
    boxed(async move {
        let port = match env.args.first().map(String::as_str) {
            None => 7,
            Some(p) => match p.parse::<u32>() {
                Ok(p) if p > 0 => p,
                _ => return usage_error(NAME, USAGE, format_args!("'{p}' is not a port number")),
            },
        };
        let listener = match net::listen(port) {
            Ok(l) => l,
            Err(e) => {
                println!("echo: {e}");
                return exit_code::FAILURE;
            }
        };
        println!("echo: listening on vsock port {port}");
        while let Ok(mut stream) = listener.accept().await {
            spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
        exit_code::FAILURE
    })
});
