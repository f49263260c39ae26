//! The wire as both sides spell it, without serde: the field names, the requests a client
//! sends (single writes and batches of them, and the op ids it makes) and the answers it
//! reads. Requests are written and answers read through two small traits that any JSON value
//! can implement — `serde_json::Value` here, the client's own small value in `sync-core` — so
//! that the browser build of the client carries no JSON library. Builds and reads only:
//! validates nothing (the `validate_*` rules do, on the hub), formats no message, and
//! allocates only what it returns.
//!
//! Only the hub's own body says anything: a success is `"success": true`, a refusal
//! `"success": false` with a `code` and a message ([`refusal`]). A proxy's error page, a
//! firewall's JSON or an empty 200 read as neither, and a client treats them as no answer.

use alloc::{borrow::ToOwned, string::String, vec::Vec};

use crate::DataType;
use crate::compact::{concat, decimal};

/// The names of the fields of requests and answers, as the hub's serde types spell them.
pub mod field {
    pub const ACTION: &str = "action";
    pub const USER_ID: &str = "user_id";
    pub const SITE_ID: &str = "site_id";
    pub const DATA_TYPE: &str = "data_type";
    pub const OP_ID: &str = "op_id";
    /// A push's merge patch; a record's data in an answer.
    pub const DATA: &str = "data";
    pub const DELTA: &str = "delta";
    pub const REASON: &str = "reason";
    pub const GRANT: &str = "grant";
    pub const EPOCH: &str = "epoch";
    pub const VERSION: &str = "version";
    pub const LAST_UPDATED: &str = "last_updated";
    /// A timestamp answer's versions per type, for a comma list of types.
    pub const TIMESTAMPS: &str = "timestamps";
    pub const REPLAYED: &str = "replayed";
    /// A refusal's stable code, its message, and the record as it stands.
    pub const CODE: &str = "code";
    pub const ERROR: &str = "error";
    pub const CURRENT: &str = "current";
    /// True in every answer the hub gives to a request it served, false in its refusals.
    pub const SUCCESS: &str = "success";
    /// A batch's writes, in the order they are to be applied.
    pub const OPS: &str = "ops";
    /// A batch answer's result per write, in order; each carries `op_id` and `status`.
    pub const RESULTS: &str = "results";
    /// In a batch result: the HTTP status the write alone would have had.
    pub const STATUS: &str = "status";
}

/// The refusal codes a client acts on by name.
pub mod code {
    /// In a batch answer: the hub stopped before this write (the one before it failed for a
    /// reason worth retrying) and applied nothing of it; it stays pending, in order.
    pub const NOT_ATTEMPTED: &str = "not_attempted";
    /// The hub does not remember this op and its id is dated before what the hub keeps: it may
    /// have been applied long ago. Never applied now; the client drops it and refetches.
    pub const OP_EXPIRED: &str = "op_expired";
    /// The credit's grant expired before the hub ever applied the op; a fresh grant for the
    /// same op id makes the next attempt a retry.
    pub const GRANT_EXPIRED: &str = "grant_expired";
    /// 401: the token is the site's own, for this hub, but past its expiry. The client asks its
    /// page for a fresh one at once and sends again; the hub counted the request against the
    /// token's user, not against the client's address.
    pub const TOKEN_EXPIRED: &str = "token_expired";
}

/// The most writes one `batch` request carries. The client also fills a batch only up to
/// [`MAX_BODY_BYTES`], so that a batch of large pushes is split, not refused.
pub const MAX_BATCH_OPS: usize = 32;

/// The largest request body the hub reads (413 beyond), and what a browser lets all of a
/// page's `keepalive` requests carry at once: what a leaving page sends fits in it.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A JSON value requests can be written into.
pub trait JsonWrite: Sized {
    /// An empty object.
    fn object() -> Self;
    /// An empty array.
    fn array() -> Self;
    fn text(value: &str) -> Self;
    fn integer(value: i64) -> Self;
    /// This object with `key` set to `value`.
    fn with(self, key: &str, value: Self) -> Self;
    /// An array of `items`.
    fn array_of(items: Vec<Self>) -> Self;
}

/// A JSON value answers can be read from.
pub trait JsonRead {
    /// The value under `key`, if this is an object holding it.
    fn get(&self, key: &str) -> Option<&Self>;
    fn as_str(&self) -> Option<&str>;
    /// A non-negative integer.
    fn as_u64(&self) -> Option<u64>;
    fn as_bool(&self) -> Option<bool>;
    fn is_object(&self) -> bool;
    /// The items of an array; none for anything else.
    fn items(&self) -> &[Self]
    where
        Self: Sized;
}

/// The query string (without `?`) of `action=timestamp` for `data_types`: one request per
/// check. A valid user id needs no escaping in a URL.
pub fn timestamp_query(user_id: &str, data_types: &[DataType]) -> String {
    let mut query = query("timestamp", user_id);
    for (i, data_type) in data_types.iter().enumerate() {
        if i > 0 {
            query.push(',');
        }
        query.push_str(data_type.as_str());
    }
    query
}

/// The query string (without `?`) of `action=get` for one data type.
pub fn get_query(user_id: &str, data_type: DataType) -> String {
    let mut query = query("get", user_id);
    query.push_str(data_type.as_str());
    query
}

/// A query string up to its data types.
fn query(action: &str, user_id: &str) -> String {
    concat(&["action=", action, "&user_id=", user_id, "&data_type="])
}

/// The entity tag of a record of the database `epoch` at `version` (`"3kq9Xw0b7TfZpQ1e-7"`):
/// what `If-None-Match` names to be answered `304 Not Modified` while the record stays at that
/// version of that database; a restored database, at the same version, has another. The hub
/// makes it; a client sends back the tag it was given.
pub fn etag(epoch: &str, version: u64) -> String {
    concat(&["\"", epoch, "-", &decimal(version), "\""])
}

/// What every write request carries: who writes, from which site, which record, and the op
/// id that makes a resend the same write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteRequest<'a> {
    pub user_id: &'a str,
    pub site_id: &'a str,
    pub data_type: DataType,
    pub op_id: &'a str,
}

impl WriteRequest<'_> {
    /// The body of `action=delta`: add `amount` to the record's amount field, with the reason
    /// and the grant when there are some.
    pub fn delta<J: JsonWrite>(&self, amount: i64, reason: Option<&str>, grant: Option<&str>) -> J {
        let field = crate::amount_field(self.data_type).unwrap_or("coins");
        let mut body =
            self.body::<J>("delta").with(field::DELTA, J::object().with(field, J::integer(amount)));
        for (key, value) in [(field::REASON, reason), (field::GRANT, grant)] {
            if let Some(value) = value {
                body = body.with(key, J::text(value));
            }
        }
        body
    }

    /// The body of `action=push`: merge `patch` into the record.
    pub fn push<J: JsonWrite>(&self, patch: J) -> J {
        self.body::<J>("push").with(field::DATA, patch)
    }

    fn body<J: JsonWrite>(&self, action: &str) -> J {
        let mut body = J::object();
        for (key, value) in [
            (field::ACTION, action),
            (field::USER_ID, self.user_id),
            (field::SITE_ID, self.site_id),
            (field::DATA_TYPE, self.data_type.as_str()),
            (field::OP_ID, self.op_id),
        ] {
            body = body.with(key, J::text(value));
        }
        body
    }
}

/// The body of `action=batch`: `ops` (bodies of [`WriteRequest::delta`] and
/// [`WriteRequest::push`], each with its op id) for one user from one site, applied by the
/// hub in this order, each as if sent alone.
pub fn batch<J: JsonWrite>(user_id: &str, site_id: &str, ops: Vec<J>) -> J {
    J::object()
        .with(field::ACTION, J::text("batch"))
        .with(field::USER_ID, J::text(user_id))
        .with(field::SITE_ID, J::text(site_id))
        .with(field::OPS, J::array_of(ops))
}

/// An op id dated `unix_ms` that the hub can date back: a UUIDv7 (RFC 9562), lowercase
/// `xxxxxxxx-xxxx-7xxx-[89ab]xxx-xxxxxxxxxxxx`, whose first 48 bits are the time, then the
/// version, 12 random bits (the low ones of `random_a`), the variant and 62 random bits (the
/// high ones of `random_b`). A client dates it by the hub's clock, not its own.
pub fn uuid7(unix_ms: u64, random_a: u64, random_b: u64) -> String {
    // Each word and how many of its low bits are spelled, 4 to a digit; no 128-bit arithmetic,
    // which the browser build would pay for.
    let words = [(unix_ms, 12), (0x7000 | random_a & 0xfff, 4), (1 << 63 | random_b >> 2, 16)];
    let mut id = String::with_capacity(36);
    for (word, digits) in words {
        for digit in (0..digits).rev() {
            if matches!(id.len(), 8 | 13 | 18 | 23) {
                id.push('-');
            }
            id.push(char::from(b"0123456789abcdef"[(word >> (digit * 4) & 0xf) as usize]));
        }
    }
    id
}

/// The version a timestamp answer gives for `data_type`: from its `timestamps` when it
/// answers a comma list, else from the answer itself when it names that type.
pub fn stamp_version<J: JsonRead>(answer: &J, data_type: DataType) -> Option<u64> {
    match answer.get(field::TIMESTAMPS) {
        Some(list) => list.get(data_type.as_str())?.get(field::VERSION)?.as_u64(),
        None if answer.get(field::DATA_TYPE)?.as_str() == Some(data_type.as_str()) => {
            answer.get(field::VERSION)?.as_u64()
        }
        None => None,
    }
}

/// The id of the hub's database an answer names; a client that sees it change drops its cache.
pub fn epoch<J: JsonRead>(answer: &J) -> Option<&str> {
    answer.get(field::EPOCH)?.as_str()
}

/// A record as an answer carries it.
#[derive(Debug, PartialEq)]
pub struct RecordRef<'a, J> {
    /// Always an object.
    pub data: &'a J,
    pub version: u64,
    pub last_updated: Option<&'a str>,
}

/// The record a `get`, `push` or `delta` answer carries (a refusal's is its `current`).
pub fn record<J: JsonRead>(answer: &J) -> Option<RecordRef<'_, J>> {
    Some(RecordRef {
        data: answer.get(field::DATA).filter(|data| data.is_object())?,
        version: answer.get(field::VERSION)?.as_u64()?,
        last_updated: answer.get(field::LAST_UPDATED).and_then(J::as_str),
    })
}

/// Whether a write's answer repeats the first answer to its op id (nothing applied again).
pub fn replayed<J: JsonRead>(answer: &J) -> bool {
    answer.get(field::REPLAYED).and_then(J::as_bool).unwrap_or(false)
}

/// Whether an answer is the hub's body for a request it served (`"success": true`): nothing
/// else confirms a write or carries data.
pub fn succeeded<J: JsonRead>(answer: &J) -> bool {
    answer.get(field::SUCCESS).and_then(J::as_bool) == Some(true)
}

/// What a refusal (`{"success":false,"code","error"}`) says.
#[derive(Debug, PartialEq)]
pub struct RefusalRef<'a, J> {
    pub code: &'a str,
    pub message: &'a str,
    /// The record as it stands, for refusals caused by its state.
    pub current: Option<RecordRef<'a, J>>,
}

/// The hub's refusal, if `answer` is one: `"success": false` with a code and a message. An
/// error body of any other shape (a proxy's, a firewall's) is not the hub's word.
pub fn refusal<J: JsonRead>(answer: &J) -> Option<RefusalRef<'_, J>> {
    if answer.get(field::SUCCESS)?.as_bool()? {
        return None;
    }
    Some(RefusalRef {
        code: answer.get(field::CODE)?.as_str()?,
        message: answer.get(field::ERROR)?.as_str()?,
        current: answer.get(field::CURRENT).and_then(record),
    })
}

/// What a hub's `batch` answer says of the write `op_id`: the status that write alone would
/// have had, and its own answer (a success or a refusal, with `op_id` and `status` added).
/// `None` unless the answer is the hub's success and holds a result echoing that op id.
pub fn batch_result<'a, J: JsonRead>(answer: &'a J, op_id: &str) -> Option<(u16, &'a J)> {
    if !succeeded(answer) {
        return None;
    }
    let result = answer
        .get(field::RESULTS)?
        .items()
        .iter()
        .find(|result| result.get(field::OP_ID).and_then(J::as_str) == Some(op_id))?;
    let status = u16::try_from(result.get(field::STATUS)?.as_u64()?).ok()?;
    Some((status, result))
}

impl JsonWrite for serde_json::Value {
    fn object() -> Self {
        serde_json::Value::Object(serde_json::Map::new())
    }

    fn array() -> Self {
        serde_json::Value::Array(Vec::new())
    }

    fn text(value: &str) -> Self {
        serde_json::Value::from(value)
    }

    fn integer(value: i64) -> Self {
        serde_json::Value::from(value)
    }

    fn with(mut self, key: &str, value: Self) -> Self {
        if let serde_json::Value::Object(fields) = &mut self {
            fields.insert(key.to_owned(), value);
        }
        self
    }

    fn array_of(items: Vec<Self>) -> Self {
        serde_json::Value::Array(items)
    }
}

impl JsonRead for serde_json::Value {
    fn get(&self, key: &str) -> Option<&Self> {
        serde_json::Value::get(self, key)
    }

    fn as_str(&self) -> Option<&str> {
        serde_json::Value::as_str(self)
    }

    fn as_u64(&self) -> Option<u64> {
        serde_json::Value::as_u64(self)
    }

    fn as_bool(&self) -> Option<bool> {
        serde_json::Value::as_bool(self)
    }

    fn is_object(&self) -> bool {
        serde_json::Value::is_object(self)
    }

    fn items(&self) -> &[Self] {
        self.as_array().map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::{
        DeltaAnswer, ErrorAnswer, GetAnswer, OpId, PostRequest, PushAnswer, RecordState, Stamp,
        TimestampAnswer, TimestampsAnswer,
    };

    const WRITE: WriteRequest<'static> = WriteRequest {
        user_id: "8-evans",
        site_id: "roflfaucet",
        data_type: DataType::Balance,
        op_id: "op-1",
    };

    #[test]
    fn written_requests_parse_as_the_hub_reads_them() {
        let delta: Value = WRITE.delta(-5, Some("game"), Some("h.p.s"));
        let PostRequest::Delta(parsed) = PostRequest::parse(delta.to_string().as_bytes()).unwrap() else {
            panic!("not a delta: {delta}")
        };
        assert_eq!(
            (
                parsed.user_id.as_str(),
                parsed.site_id.as_str(),
                parsed.data_type.as_str(),
                parsed.op_id.as_str()
            ),
            ("8-evans", "roflfaucet", "balance", "op-1")
        );
        assert_eq!(Value::Object(parsed.delta), json!({"coins": -5}));
        assert_eq!((parsed.reason.as_deref(), parsed.grant.as_deref()), (Some("game"), Some("h.p.s")));

        let points = WriteRequest { data_type: DataType::Points, ..WRITE };
        let bare: Value = points.delta(3, None, None);
        assert_eq!(
            bare,
            json!({"action": "delta", "user_id": "8-evans", "site_id": "roflfaucet",
            "data_type": "points", "op_id": "op-1", "delta": {"points": 3}})
        );

        let profile = WriteRequest { data_type: DataType::Profile, ..WRITE };
        let push: Value = profile.push(json!({"bio": "hi"}));
        let PostRequest::Push(parsed) = PostRequest::parse(push.to_string().as_bytes()).unwrap() else {
            panic!("not a push: {push}")
        };
        assert_eq!((parsed.data, parsed.op_id.as_deref()), (json!({"bio": "hi"}), Some("op-1")));
    }

    #[test]
    fn queries_name_the_action_the_user_and_the_types() {
        assert_eq!(
            timestamp_query("8-evans", &[DataType::Balance, DataType::Roles]),
            "action=timestamp&user_id=8-evans&data_type=balance,roles"
        );
        assert_eq!(get_query("8-evans", DataType::Profile), "action=get&user_id=8-evans&data_type=profile");
        for version in [0, 7, 1_000_000, u64::MAX] {
            assert_eq!(etag("3kq9Xw0b7TfZpQ1e", version), format!("\"3kq9Xw0b7TfZpQ1e-{version}\""));
        }
    }

    #[test]
    fn answers_the_hub_writes_read_back() {
        let stamp = |version| Stamp { last_updated: None, version };
        let list = serde_json::to_value(TimestampsAnswer {
            success: true,
            timestamps: [(DataType::Balance, stamp(7)), (DataType::Profile, stamp(0))].into(),
            epoch: "e1".into(),
        })
        .unwrap();
        assert_eq!(stamp_version(&list, DataType::Balance), Some(7));
        assert_eq!(stamp_version(&list, DataType::Profile), Some(0));
        assert_eq!(stamp_version(&list, DataType::Roles), None);
        assert_eq!(epoch(&list), Some("e1"));
        let one = serde_json::to_value(TimestampAnswer {
            success: true,
            data_type: DataType::Points,
            last_updated: None,
            version: 3,
            epoch: "e1".into(),
        })
        .unwrap();
        assert_eq!(
            (stamp_version(&one, DataType::Points), stamp_version(&one, DataType::Balance)),
            (Some(3), None)
        );

        let data = json!({"coins": 12});
        let get = serde_json::to_value(GetAnswer {
            success: true,
            data_type: DataType::Balance,
            data: data.clone(),
            last_updated: Some("t".into()),
            version: 4,
            epoch: "e1".into(),
        })
        .unwrap();
        assert_eq!(record(&get), Some(RecordRef { data: &data, version: 4, last_updated: Some("t") }));
        let delta = serde_json::to_value(DeltaAnswer {
            success: true,
            data_type: DataType::Balance,
            version: 5,
            data: data.clone(),
            last_updated: None,
            replayed: true,
        })
        .unwrap();
        assert!(replayed(&delta));
        assert_eq!(record(&delta).map(|r| r.version), Some(5));
        let push = serde_json::to_value(PushAnswer {
            success: true,
            data_type: DataType::Balance,
            timestamp: None,
            last_updated: None,
            version: 6,
            data: data.clone(),
            replayed: false,
        })
        .unwrap();
        assert!(!replayed(&push));
        assert_eq!(record(&push).map(|r| r.version), Some(6));

        let refused = serde_json::to_value(ErrorAnswer {
            success: false,
            code: "insufficient_funds".into(),
            error: "coins would go below zero".into(),
            current: Some(RecordState { data: data.clone(), last_updated: None, version: 5 }),
        })
        .unwrap();
        let refusal = refusal(&refused).expect("the hub's refusal");
        assert_eq!(
            (refusal.code, refusal.message, refusal.current.map(|r| r.version)),
            ("insufficient_funds", "coins would go below zero", Some(5))
        );
        assert!(!succeeded(&refused));
        assert!(succeeded(&get) && succeeded(&list) && succeeded(&delta));
    }

    #[test]
    fn only_the_hubs_own_bodies_succeed_or_refuse() {
        for foreign in [
            json!(null),
            json!("<html>403 Forbidden</html>"),
            json!({"error": "blocked by policy"}),
            json!({"code": "forbidden", "error": "blocked"}),
            json!({"success": "false", "code": "x", "error": "y"}),
            json!({"success": false, "code": 403, "error": "y"}),
            json!({"success": false, "code": "x"}),
            json!({"success": true, "code": "x", "error": "y"}),
        ] {
            assert_eq!(refusal(&foreign), None, "{foreign}");
            assert!(!succeeded(&foreign) || foreign["success"] == json!(true), "{foreign}");
        }
        assert!(!succeeded(&json!({"data": {"coins": 1}, "version": 1})), "a record without the hub's word");
    }

    #[test]
    fn a_batch_carries_its_writes_in_order_and_its_results_are_found_by_op_id() {
        let second = WriteRequest { op_id: "op-2", ..WRITE };
        let profile = WriteRequest { data_type: DataType::Profile, op_id: "op-3", ..WRITE };
        let ops: [Value; 3] = [
            WRITE.delta(10, Some("claim"), Some("h.p.s")),
            second.delta(-15, None, None),
            profile.push(json!({"bio": "hi"})),
        ];
        let body: Value = batch("8-evans", "roflfaucet", ops.to_vec());
        assert_eq!(
            body,
            json!({"action": "batch", "user_id": "8-evans", "site_id": "roflfaucet", "ops": ops})
        );

        let applied = serde_json::to_value(DeltaAnswer {
            success: true,
            data_type: DataType::Balance,
            version: 5,
            data: json!({"coins": 15}),
            last_updated: None,
            replayed: false,
        })
        .unwrap();
        let with = |mut result: Value, op_id: &str, status: u16| {
            result["op_id"] = json!(op_id);
            result["status"] = json!(status);
            result
        };
        let refused = json!({"success": false, "code": "insufficient_funds", "error": "no", "current": {
            "data": {"coins": 0}, "version": 4, "last_updated": null}});
        let answer = json!({"success": true, "results": [
            with(applied.clone(), "op-1", 200),
            with(refused.clone(), "op-2", 409),
            with(json!({"success": false, "code": code::NOT_ATTEMPTED, "error": "later"}), "op-3", 503),
        ]});
        let (status, result) = batch_result(&answer, "op-1").unwrap();
        assert_eq!((status, record(result).map(|r| r.version), succeeded(result)), (200, Some(5), true));
        let (status, result) = batch_result(&answer, "op-2").unwrap();
        assert_eq!((status, refusal(result).map(|r| r.code)), (409, Some("insufficient_funds")));
        let (status, result) = batch_result(&answer, "op-3").unwrap();
        assert_eq!((status, refusal(result).map(|r| r.code)), (503, Some(code::NOT_ATTEMPTED)));
        assert_eq!(batch_result(&answer, "op-4"), None, "no result names it");
        let foreign = json!({"results": [with(applied, "op-1", 200)]});
        assert_eq!(batch_result(&foreign, "op-1"), None, "not the hub's success");
    }

    #[test]
    fn op_ids_are_uuid7_dated_with_the_time_given() {
        let ms = 0x019a_f0c1_a2b3;
        for (a, b) in [(0, 0), (u64::MAX, u64::MAX), (0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210)] {
            let id = uuid7(ms, a, b);
            assert_eq!(id.len(), 36, "{id}");
            let dashes: Vec<usize> = id.match_indices('-').map(|(i, _)| i).collect();
            assert_eq!(dashes, [8, 13, 18, 23], "{id}");
            assert!(
                id.bytes().all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{id}"
            );
            let bits = u128::from_str_radix(&id.replace('-', ""), 16).unwrap();
            assert_eq!((bits >> 80) as u64, ms, "{id}");
            assert_eq!((bits >> 76 & 0xf, bits >> 62 & 0b11), (7, 0b10), "{id}");
            assert!(OpId::parse(&id).is_ok());
        }
        assert_ne!(uuid7(ms, 0, 1 << 2), uuid7(ms, 0, 2 << 2), "rand_b");
        assert_ne!(uuid7(ms, 1, 0), uuid7(ms, 0, 0), "rand_a");
    }

    #[test]
    fn a_record_without_object_data_is_no_record() {
        assert_eq!(record(&json!({"data": 5, "version": 1})), None);
        assert_eq!(record(&json!({"data": {}})), None);
    }
}
