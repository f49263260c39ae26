//! Wire types and validation rules of the unified-sync protocol, shared by the hub and the
//! client. Does no I/O, reads no clock and knows nothing of HTTP beyond the status class a
//! refusal belongs to; builds for native targets and for wasm32.

mod answer;
mod data_type;
mod error;
mod ids;
mod merge;
mod request;
mod scope;
mod text;
mod validate;

pub use answer::{
    DeltaAnswer, ErrorAnswer, GetAnswer, GetManyAnswer, PushAnswer, RecordState, Stamp, TimestampAnswer,
    TimestampsAnswer,
};
pub use data_type::{DataType, parse_data_types};
pub use error::{Refusal, RefusalKind};
pub use ids::{OpId, SiteId, UserId};
pub use merge::merge_patch;
pub use request::{DeltaRequest, GetQuery, PostRequest, PushRequest, QueryAction};
pub use scope::{Scope, Scopes};
pub use validate::{
    Limits, MAX_AMOUNT, amount_field, validate_delta, validate_push, validate_reason, validate_record,
};
