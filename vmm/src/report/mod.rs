//! Reports.

pub mod summary;
