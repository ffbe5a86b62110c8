//! `shout`: answers every line a client sends with the line in upper case and a count.
#![cfg_attr(target_os = "none", no_std, no_main)]

extern crate alloc;
use alloc::format;
use elastic_rt::prelude::*;

const SHOUT: Service = Service::new("shout", "[PORT]", "upper-case every line (vsock PORT, default 7000)", |env| {
    boxed(async move {
        let port = env.args.first().and_then(|p| p.parse().ok()).unwrap_or(7000);
        let Ok(server) = net::serve(port, shout) else { return 1 };
        elastic_rt::println!("shout: listening on vsock port {port}");
        server.await; // one task per connection; returns only if the listener stops accepting
        0
    })
});

/// One client: each read is answered with the lines seen so far and the bytes in upper case.
async fn shout(mut stream: net::Stream) {
    let (mut buf, mut lines) = ([0u8; 1024], 0u64);
    while let Ok(n @ 1..) = stream.read(&mut buf).await {
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        let reply = format!("{lines} {}", core::str::from_utf8(&buf[..n]).unwrap_or("?\n"));
        if stream.write_all(reply.to_uppercase().as_bytes()).await.is_err() {
            break;
        }
    }
}

elastic_rt::entry!(&[SHOUT]);

#[cfg(not(target_os = "none"))]
fn main() {}
