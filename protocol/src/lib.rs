//! Wire types and validation rules of the unified-sync protocol, shared by the hub and the
//! client. Does no I/O, reads no clock and knows nothing of HTTP beyond the status class a
//! refusal belongs to and the query strings and entity tags of its requests; builds for
//! native targets and for wasm32. The hub reads and writes the serde types; the client writes
//! and reads through [`wire`], which needs no JSON library. Needs no `std` (only `alloc`), so
//! that the browser build can leave out std's panic and formatting machinery.

#![cfg_attr(not(test), no_std)]

extern crate alloc;

mod answer;
pub mod compact;
mod data_type;
mod error;
mod ids;
mod merge;
#[cfg(test)]
mod records_doc;
mod request;
mod scope;
mod text;
mod validate;
pub mod wire;

pub use answer::{
    BatchAnswer, DeltaAnswer, ErrorAnswer, GetAnswer, GetManyAnswer, PushAnswer, RecordState, Stamp,
    TimestampAnswer, TimestampsAnswer,
};
pub use data_type::{DataType, parse_data_types};
pub use error::{Refusal, RefusalKind};
pub use ids::{OpId, SiteId, UserId, uuid7_ms};
pub use merge::merge_patch;
pub use request::{BatchRequest, DeltaRequest, GetQuery, PostRequest, PushRequest, QueryAction};
pub use scope::{Scope, Scopes};
pub use validate::{
    Limits, MAX_AMOUNT, amount_field, is_valid_reason, validate_delta, validate_push, validate_reason,
    validate_record,
};
pub use wire::MAX_BATCH_OPS;
