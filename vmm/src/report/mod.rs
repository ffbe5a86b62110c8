//! Reports: the JSON summary of a run ([`summary`]) and the one JSON writer ([`json`]).

pub(crate) mod json;
pub(crate) mod summary;
