//! Tools.

pub mod bench;
pub mod certs;
pub mod child;
pub mod demo;
pub mod loadgen;
pub mod plot;
pub mod qemu;
pub mod stress;
