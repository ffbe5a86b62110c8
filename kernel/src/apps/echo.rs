//! `echo [PORT]`: a network service that sends back every byte it receives, one task per
//! connection (publish it with `--publish HOST_PORT:PORT`). Ends when the host asks the VM to
//! stop.

use elastic_rt::net::Stream;
use elastic_rt::prelude::*;
use elastic_rt::println;
use hypercall_abi::exit_code;

use super::args;

const NAME: &str = "echo";
const USAGE: &str = "[PORT]";

/// The `echo` service.
pub const SERVICE: Service = Service::new(NAME, USAGE, "echo every byte back on vsock PORT (default 7)", |env| {
    boxed(async move {
        let port = match args::port(&env, NAME, USAGE, 7) {
            Ok(p) => p,
            Err(code) => return code,
        };
        let server = match net::serve(port, echo) {
            Ok(s) => s,
            Err(e) => {
                println!("echo: {e}");
                return exit_code::FAILURE;
            }
        };
        println!("echo: listening on vsock port {port}");
        server.await;
        exit_code::FAILURE
    })
});

/// One connection: every byte read is written back, until the client closes or resets it.
async fn echo(mut stream: Stream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}
