//! Answers the hub sends, in the shapes the seed design documented plus the fields that
//! make sync exact (`version`, `epoch`).

use alloc::{collections::BTreeMap, string::String, vec::Vec};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::DataType;

/// A record's version and write time, as a timestamp check reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// RFC 3339 UTC with milliseconds, or `null` if never written. For people and logs;
    /// clients compare `version`.
    pub last_updated: Option<String>,
    /// 0 = never written; +1 on every change.
    pub version: u64,
}

/// A whole record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordState {
    pub data: Value,
    pub last_updated: Option<String>,
    pub version: u64,
}

/// `action=timestamp` for one data type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimestampAnswer {
    pub success: bool,
    pub data_type: DataType,
    pub last_updated: Option<String>,
    pub version: u64,
    /// Id of the hub's database; a client that sees it change drops its cache.
    pub epoch: String,
}

/// `action=timestamp` for a comma list: one request per tab return.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimestampsAnswer {
    pub success: bool,
    pub timestamps: BTreeMap<DataType, Stamp>,
    pub epoch: String,
}

/// `action=get` for one data type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GetAnswer {
    pub success: bool,
    pub data_type: DataType,
    pub data: Value,
    pub last_updated: Option<String>,
    pub version: u64,
    pub epoch: String,
}

/// `action=get` for a comma list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GetManyAnswer {
    pub success: bool,
    pub records: BTreeMap<DataType, RecordState>,
    pub epoch: String,
}

/// An accepted push.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushAnswer {
    pub success: bool,
    pub data_type: DataType,
    /// The seed's name for `last_updated`, kept for its scripts.
    pub timestamp: Option<String>,
    pub last_updated: Option<String>,
    pub version: u64,
    /// The record after the merge, so the pushing client needs no extra `get`.
    pub data: Value,
    /// True when this answers a repeated `op_id` and nothing was applied again.
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub replayed: bool,
}

/// An applied (or replayed) delta.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaAnswer {
    pub success: bool,
    pub data_type: DataType,
    pub version: u64,
    pub data: Value,
    pub last_updated: Option<String>,
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub replayed: bool,
}

/// `action=batch`: one result per op, in order — each the body that op alone would have got,
/// with its `status` and `op_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchAnswer {
    pub success: bool,
    pub results: Vec<serde_json::Value>,
}

/// Every refusal: `{"success":false,"code":…,"error":…}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorAnswer {
    pub success: bool,
    pub code: String,
    pub error: String,
    /// The record as it stands, for `version_conflict` and `insufficient_funds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<RecordState>,
}
