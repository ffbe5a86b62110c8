//! Policy.

pub(crate) mod admission;
pub(crate) mod pool;
pub(crate) mod resource;
