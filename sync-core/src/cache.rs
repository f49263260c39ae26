//! The client's copy of the user's records, and what is persisted between page loads.

use std::collections::BTreeMap;

use protocol::DataType;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Op;

/// One record as the hub last confirmed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedRecord {
    pub data: Value,
    /// The hub's version of this data; a record is only ever replaced by a higher version.
    pub version: u64,
    pub last_updated: Option<String>,
}

/// Everything that survives a reload: the cache and the outbox.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    /// The hub database the cache came from; a different epoch invalidates the cache.
    pub epoch: Option<String>,
    pub records: BTreeMap<DataType, CachedRecord>,
    /// Local writes not yet confirmed, oldest first.
    pub outbox: Vec<Op>,
}
