//! Base.

pub mod config;
pub mod exit;
pub mod layout;
pub mod memory;
pub mod timeline;
