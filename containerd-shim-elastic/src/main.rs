//! `containerd-shim-elastic-v1`: started by containerd for runtime `io.containerd.elastic.v1`.

use containerd_shim_elastic::service::{ElasticShim, RUNTIME_ID};

fn main() {
    containerd_shim::run::<ElasticShim>(RUNTIME_ID, None);
}
