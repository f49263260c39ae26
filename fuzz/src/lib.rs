//! What the protocol's fuzz targets share: the assertions every answer must pass
//! ([`check`]), the hub's checks of a parsed request in the order it applies them ([`hub`]),
//! and builders of structured input from fuzzer bytes ([`input`]).
//!
//! The assertions restate the documented rules independently of `protocol`'s own code, as
//! `protocol/tests/properties.rs` does for proptest: a target fails when the protocol
//! panics, refuses with anything but a well-formed 4xx refusal, or accepts a value that
//! breaks a data rule.

pub mod check;
pub mod hub;
pub mod input;
