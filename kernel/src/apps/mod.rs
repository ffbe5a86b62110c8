//! The bundled services. Each is a module with a [`Service`] constant (built only from the
//! `elastic-rt` API) and a line in [`SERVICES`].

use elastic_rt::{Env, Service, run_sync};
use hypercall_abi::exit_code;

mod args;
mod cpu_burst;
mod echo;
mod faults;
mod flood;
mod hello;
mod hostile;
mod http;
mod idle;
mod kv;
mod load;
mod mem_bench;
mod mem_churn;
mod mem_wave;
mod spin;
mod vcpu_bench;
mod vcpu_churn;

/// Every service in the default image.
pub const SERVICES: &[Service] = &[
    hello::SERVICE,
    echo::SERVICE,
    kv::SERVICE,
    http::SERVICE,
    spin::SERVICE,
    cpu_burst::SERVICE,
    vcpu_churn::SERVICE,
    idle::SERVICE,
    mem_wave::SERVICE,
    mem_churn::SERVICE,
    load::SERVICE,
    vcpu_bench::SERVICE,
    mem_bench::SERVICE,
    hostile::SERVICE,
    flood::SERVICE,
    faults::PANIC,
    faults::FAULT,
    HELP,
];

const HELP: Service = Service::new("help", "", "list the services in this image", |env| run_sync(env, help));

fn help(_env: &Env) -> u32 {
    elastic_rt::println!("services in this image:");
    for s in elastic_rt::services() {
        elastic_rt::println!("  {:<12} {:<18} {}", s.name, s.usage, s.about);
    }
    exit_code::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        for (i, a) in SERVICES.iter().enumerate() {
            assert!(SERVICES[i + 1..].iter().all(|b| b.name != a.name), "duplicate {}", a.name);
        }
    }
}
