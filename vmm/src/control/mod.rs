//! Control.

pub mod api;
pub mod on_demand;
pub mod run;
