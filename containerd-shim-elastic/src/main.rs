//! `containerd-shim-elastic-v1`: started by containerd for runtime `io.containerd.elastic.v1`.

use containerd_shim_elastic::service::{ElasticShim, RUNTIME_ID};

fn main() {
    // A panic ends the shim at once, after its message (the release profile unwinds so that
    // tests and binaries share one build; the shim aborted before, and still does).
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
    containerd_shim::run::<ElasticShim>(RUNTIME_ID, None);
}
