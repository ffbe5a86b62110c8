//! Policy.

pub mod admission;
pub mod pool;
pub mod resource;
