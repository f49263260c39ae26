//! The client's copy of the user's records, and what is persisted between page loads,
//! with its storage format.

use alloc::{borrow::ToOwned, string::String, vec::Vec};

use protocol::DataType;
use protocol::wire::{self, RecordRef};

use crate::{Json, Op};

/// One record as the hub last confirmed it.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedRecord {
    pub data: Json,
    /// The hub's version of this data; a record is only ever replaced by a higher version.
    pub version: u64,
    pub last_updated: Option<String>,
    /// The `ETag` the hub gave this record in answer to a `get`, sent back as `If-None-Match`
    /// to have it answered `304` while the record is unchanged; none when a write's answer
    /// brought the record.
    pub etag: Option<String>,
}

impl CachedRecord {
    /// The record as storage and the other tabs keep it: a hub answer's shape, with its `etag`.
    pub fn to_json(&self) -> Json {
        let json = Json::object()
            .with(wire::field::DATA, self.data.clone())
            .with(wire::field::VERSION, self.version)
            .with(wire::field::LAST_UPDATED, self.last_updated.clone());
        match &self.etag {
            Some(etag) => json.with("etag", etag.as_str()),
            None => json,
        }
    }

    /// Reads a record from storage or from a hub answer.
    pub fn from_json(json: &Json) -> Option<CachedRecord> {
        let etag = json.get("etag").and_then(Json::as_str).map(str::to_owned);
        wire::record(json).map(|record| CachedRecord { etag, ..CachedRecord::from(record) })
    }
}

impl From<RecordRef<'_, Json>> for CachedRecord {
    fn from(record: RecordRef<'_, Json>) -> CachedRecord {
        CachedRecord {
            data: record.data.clone(),
            version: record.version,
            last_updated: record.last_updated.map(str::to_owned),
            etag: None,
        }
    }
}

/// One slot per data type: the five types are few enough that a map would only cost size.
#[derive(Debug, Clone, PartialEq)]
pub struct PerType<T>([Option<T>; DataType::ALL.len()]);

impl<T> Default for PerType<T> {
    fn default() -> Self {
        PerType([None, None, None, None, None])
    }
}

impl<T> PerType<T> {
    pub fn get(&self, t: DataType) -> Option<&T> {
        self.0[t.index()].as_ref()
    }

    pub fn insert(&mut self, t: DataType, value: T) {
        self.0[t.index()] = Some(value);
    }

    pub fn clear(&mut self) {
        *self = PerType::default();
    }

    /// Every type holding a value, in the protocol's order.
    pub fn iter(&self) -> impl Iterator<Item = (DataType, &T)> {
        DataType::ALL.into_iter().filter_map(|t| self.get(t).map(|v| (t, v)))
    }
}

/// Everything that survives a reload: the cache and the outbox.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Persisted {
    /// The hub database the cache came from; a different epoch invalidates the cache.
    pub epoch: Option<String>,
    pub records: PerType<CachedRecord>,
    /// Local writes not yet confirmed, oldest first.
    pub outbox: Vec<Op>,
    /// The hub's clock minus this device's, as the hub's last answer showed: the next page
    /// dates its op ids by the hub's clock before its first answer comes.
    pub clock_offset_ms: i64,
}

impl Persisted {
    /// The storage format: `{"epoch", "records": {type: record}, "outbox": [op], "offset"}`.
    pub fn to_json(&self) -> Json {
        let mut records = Json::object();
        for (t, record) in self.records.iter() {
            records.set(t.as_str(), record.to_json());
        }
        Json::object()
            .with("epoch", self.epoch.clone())
            .with("records", records)
            .with("outbox", Json::Array(self.outbox.iter().map(Op::to_json).collect()))
            .with("offset", self.clock_offset_ms)
    }

    /// Reads what [`Persisted::to_json`] wrote; unreadable parts are dropped, not fatal.
    pub fn from_json(json: &Json) -> Persisted {
        let mut records = PerType::default();
        if let Some(Json::Object(pairs)) = json.get("records") {
            for (name, record) in pairs {
                if let (Some(t), Some(record)) = (DataType::from_name(name), CachedRecord::from_json(record))
                {
                    records.insert(t, record);
                }
            }
        }
        let outbox = match json.get("outbox") {
            Some(Json::Array(ops)) => ops.iter().filter_map(Op::from_json).collect(),
            _ => Vec::new(),
        };
        Persisted {
            epoch: json.get("epoch").and_then(Json::as_str).map(str::to_owned),
            records,
            outbox,
            clock_offset_ms: json.get("offset").and_then(Json::as_i64).unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OpKind;

    #[test]
    fn persisted_state_round_trips_through_its_storage_format() {
        let mut records = PerType::default();
        records.insert(
            DataType::Balance,
            CachedRecord {
                data: Json::object().with("coins", 120i64),
                version: 7,
                last_updated: Some("t".into()),
                etag: Some("\"e1-7\"".into()),
            },
        );
        records.insert(
            DataType::Profile,
            CachedRecord { data: Json::object(), version: 2, last_updated: Some("u".into()), etag: None },
        );
        let state = Persisted {
            epoch: Some("e1".into()),
            records,
            outbox: vec![
                Op {
                    op_id: "a".into(),
                    data_type: DataType::Balance,
                    kind: OpKind::Delta { amount: -5, reason: Some("game".into()), grant: None },
                },
                Op {
                    op_id: "claim-1".into(),
                    data_type: DataType::Balance,
                    kind: OpKind::Delta { amount: 10, reason: None, grant: Some("h.p.s".into()) },
                },
                Op {
                    op_id: "b".into(),
                    data_type: DataType::Profile,
                    kind: OpKind::Push { patch: Json::object().with("bio", "hi") },
                },
            ],
            clock_offset_ms: -86_400_000,
        };
        let text = state.to_json().to_text();
        assert_eq!(Persisted::from_json(&Json::parse(&text).unwrap()), state);
    }

    #[test]
    fn an_outbox_stored_before_grants_existed_still_reads() {
        let text = r#"{"epoch":"e1","records":{},"outbox":[
            {"op_id":"a","data_type":"balance","delta":-5,"reason":"game"},
            {"op_id":"b","data_type":"points","delta":3,"reason":null}]}"#;
        let outbox = Persisted::from_json(&Json::parse(text).unwrap()).outbox;
        let kinds: Vec<OpKind> = outbox.into_iter().map(|op| op.kind).collect();
        assert_eq!(
            kinds,
            [
                OpKind::Delta { amount: -5, reason: Some("game".into()), grant: None },
                OpKind::Delta { amount: 3, reason: None, grant: None },
            ]
        );
    }
}
