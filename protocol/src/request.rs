//! Requests as they arrive: a POST body (`push`, `delta`) or a GET query (`timestamp`,
//! `get`). Fields stay strings here so each can be refused with its own code.

use alloc::{
    format,
    string::{String, ToString},
    vec::Vec,
};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::data_type::truncate;
use crate::{MAX_BATCH_OPS, Refusal};

/// `{"action":"push", …}`: write `data` into one record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushRequest {
    pub user_id: String,
    pub site_id: String,
    pub data_type: String,
    pub data: Value,
    /// When set, the push only applies if the record is still at this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<u64>,
    /// When set, a repeated push with the same id is answered from the first, not reapplied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_id: Option<String>,
}

/// `{"action":"delta", …}`: add a signed amount to balance or points, exactly once per `op_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaRequest {
    pub user_id: String,
    pub site_id: String,
    pub data_type: String,
    pub delta: Map<String, Value>,
    pub op_id: String,
    /// Why the amount changed ("game", "claim"), kept in the audit ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A credit's permission: a JWT from the site's backend naming this op exactly (its
    /// `op_id`, data type and amounts). Not part of what makes a retry the same op.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
}

/// A POST body.
#[derive(Debug, Clone, PartialEq)]
pub enum PostRequest {
    Push(PushRequest),
    Delta(DeltaRequest),
    Batch(BatchRequest),
}

/// `{"action":"batch", …}`: pushes and deltas of one user and site, applied in the order
/// given, each as if sent alone.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRequest {
    pub user_id: String,
    pub site_id: String,
    /// 1 to [`MAX_BATCH_OPS`] pushes and deltas, each with an `op_id`, each naming the
    /// batch's user and site.
    pub ops: Vec<PostRequest>,
}

/// A batch as it arrives: each op an object whose keys are all different.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    #[serde(rename = "action")]
    _action: String,
    user_id: String,
    site_id: String,
    ops: Vec<UniqueObject>,
}

impl PostRequest {
    /// Parses a POST body, naming what is wrong with it when it cannot be used.
    pub fn parse(body: &[u8]) -> Result<Self, Refusal> {
        let body_bytes = body;
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| Refusal::invalid("invalid_json", format!("the body is not valid JSON: {e}")))?;
        if value.is_object() {
            // Readers disagree on which of two equal keys wins; such a body is ambiguous.
            serde_json::from_slice::<UniqueKeys>(body)
                .map_err(|e| Refusal::invalid("invalid_request", e.to_string()))?;
        }
        let Value::Object(mut fields) = value else {
            return Err(Refusal::invalid("invalid_request", "the body must be a JSON object"));
        };
        let action = match fields.remove("action") {
            Some(Value::String(action)) => action,
            Some(_) => return Err(Refusal::invalid("invalid_request", "action must be a string")),
            None => return Err(Refusal::invalid("missing_field", "the body has no action")),
        };
        let body = Value::Object(fields);
        let shape = |e: serde_json::Error| {
            let message = e.to_string();
            let code = if message.starts_with("missing field") { "missing_field" } else { "invalid_request" };
            Refusal::invalid(code, format!("{action}: {}", shortened(message)))
        };
        match action.as_str() {
            "push" => Ok(PostRequest::Push(serde_json::from_value(body).map_err(shape)?)),
            "delta" => Ok(PostRequest::Delta(serde_json::from_value(body).map_err(shape)?)),
            "batch" => Ok(PostRequest::Batch(BatchRequest::parse(body_bytes)?)),
            "timestamp" | "get" => Err(wrong_method(&action, "GET")),
            other => Err(unknown_action(other)),
        }
    }

    /// The `user_id` the request names.
    pub fn user_id(&self) -> &str {
        match self {
            PostRequest::Push(p) => &p.user_id,
            PostRequest::Delta(d) => &d.user_id,
            PostRequest::Batch(b) => &b.user_id,
        }
    }

    /// The `site_id` the request names.
    pub fn site_id(&self) -> &str {
        match self {
            PostRequest::Push(p) => &p.site_id,
            PostRequest::Delta(d) => &d.site_id,
            PostRequest::Batch(b) => &b.site_id,
        }
    }

    /// The `data_type` of a push or delta (a batch names one per op).
    pub fn data_type(&self) -> &str {
        match self {
            PostRequest::Push(p) => &p.data_type,
            PostRequest::Delta(d) => &d.data_type,
            PostRequest::Batch(_) => "",
        }
    }

    /// The `op_id` of a push or delta.
    pub fn op_id(&self) -> Option<&str> {
        match self {
            PostRequest::Push(p) => p.op_id.as_deref(),
            PostRequest::Delta(d) => Some(&d.op_id),
            PostRequest::Batch(_) => None,
        }
    }

    /// The body as the hub expects it, `action` included.
    pub fn to_json(&self) -> Value {
        let (action, body) = match self {
            PostRequest::Push(p) => ("push", serde_json::to_value(p)),
            PostRequest::Delta(d) => ("delta", serde_json::to_value(d)),
            PostRequest::Batch(b) => {
                let ops: Vec<Value> = b.ops.iter().map(PostRequest::to_json).collect();
                ("batch", Ok(serde_json::json!({"user_id": b.user_id, "site_id": b.site_id, "ops": ops})))
            }
        };
        let mut body = body.expect("request types serialize");
        if let Value::Object(fields) = &mut body {
            fields.insert("action".into(), Value::from(action));
        }
        body
    }
}

impl BatchRequest {
    /// Reads a batch from the whole body (already known to be a JSON object with unique keys
    /// and `"action":"batch"`).
    fn parse(body: &[u8]) -> Result<BatchRequest, Refusal> {
        let batch: BatchBody = serde_json::from_slice(body).map_err(|e| {
            let message = e.to_string();
            let code = if message.starts_with("missing field") { "missing_field" } else { "invalid_request" };
            Refusal::invalid(code, format!("batch: {}", shortened(message)))
        })?;
        if batch.ops.is_empty() || batch.ops.len() > MAX_BATCH_OPS {
            return Err(Refusal::invalid(
                "invalid_batch",
                format!("a batch holds 1 to {MAX_BATCH_OPS} ops, not {}", batch.ops.len()),
            ));
        }
        let ops = batch
            .ops
            .into_iter()
            .enumerate()
            .map(|(i, UniqueObject(mut op))| {
                let refuse = |code, why: String| Refusal::invalid(code, format!("ops[{i}]: {why}"));
                match op.get("action").and_then(Value::as_str) {
                    Some("push" | "delta") => {}
                    Some("batch") => return Err(refuse("invalid_batch", "batches do not nest".into())),
                    _ => return Err(refuse("invalid_batch", "an op of a batch is a push or a delta".into())),
                }
                for (key, outer) in [("user_id", &batch.user_id), ("site_id", &batch.site_id)] {
                    match op.get(key) {
                        None => {
                            op.insert(key.into(), Value::from(outer.as_str()));
                        }
                        Some(Value::String(inner)) if inner == outer => {}
                        Some(_) => {
                            return Err(refuse("invalid_batch", format!("{key} differs from the batch's")));
                        }
                    }
                }
                if !op.contains_key("op_id") {
                    return Err(refuse("missing_field", "every op of a batch needs an op_id".into()));
                }
                let bytes = serde_json::to_vec(&op).expect("a map serializes");
                PostRequest::parse(&bytes)
                    .map_err(|r| Refusal { message: format!("ops[{i}]: {}", r.message), ..r })
            })
            .collect::<Result<Vec<PostRequest>, Refusal>>()?;
        Ok(BatchRequest { user_id: batch.user_id, site_id: batch.site_id, ops })
    }
}

/// A JSON object whose keys are all different.
struct UniqueObject(Map<String, Value>);

impl<'de> Deserialize<'de> for UniqueObject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UniqueObject;

            fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<UniqueObject, A::Error> {
                let mut fields = Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value::<Value>()?;
                    if fields.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!(
                            "an op has the field {:?} twice",
                            truncate(&key)
                        )));
                    }
                    fields.insert(key, value);
                }
                Ok(UniqueObject(fields))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// Reads a JSON object's top-level keys, failing on the second occurrence of any key.
struct UniqueKeys;

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UniqueKeys;

            fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
                let mut seen = alloc::collections::BTreeSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    if seen.contains(&key) {
                        return Err(serde::de::Error::custom(format!(
                            "the body has the field {:?} twice",
                            truncate(&key)
                        )));
                    }
                    seen.insert(key);
                }
                Ok(UniqueKeys)
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// A GET query string; parameters other than these are ignored (cache busters).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GetQuery {
    pub action: Option<String>,
    pub user_id: Option<String>,
    pub data_type: Option<String>,
    /// Sent by some seed scripts; when present it must name the calling site.
    pub site_id: Option<String>,
}

/// What a GET asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryAction {
    Timestamp,
    Get,
}

impl GetQuery {
    pub fn action(&self) -> Result<QueryAction, Refusal> {
        match self.action.as_deref() {
            Some("timestamp") => Ok(QueryAction::Timestamp),
            Some("get") => Ok(QueryAction::Get),
            Some(a @ ("push" | "delta")) => Err(wrong_method(a, "POST")),
            Some(other) => Err(unknown_action(other)),
            None => Err(Refusal::invalid("missing_field", "the query has no action")),
        }
    }

    /// A required parameter, or a refusal naming it.
    pub fn required<'a>(&self, name: &str, value: &'a Option<String>) -> Result<&'a str, Refusal> {
        value.as_deref().ok_or_else(|| Refusal::invalid("missing_field", format!("the query has no {name}")))
    }
}

/// serde's messages quote an offending field name or value whole; a refusal keeps only the
/// start of a long one, so that a request cannot fill its own refusal.
fn shortened(message: String) -> String {
    const MAX_CHARS: usize = 200;
    if message.chars().count() <= MAX_CHARS {
        return message;
    }
    let mut short: String = message.chars().take(MAX_CHARS).collect();
    short.push('…');
    short
}

fn wrong_method(action: &str, method: &str) -> Refusal {
    Refusal {
        kind: crate::RefusalKind::WrongMethod,
        code: "method_not_allowed",
        message: format!("action {action} is sent with {method}"),
    }
}

fn unknown_action(action: &str) -> Refusal {
    Refusal::invalid(
        "unknown_action",
        format!("unknown action {:?}; expected timestamp, get, push, delta or batch", truncate(action)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_push_body_parses() {
        let body = br#"{"action":"push","user_id":"8-evans","site_id":"roflfaucet","data_type":"profile","data":{"display_name":"New Name","bio":"Updated bio"}}"#;
        let PostRequest::Push(push) = PostRequest::parse(body).unwrap() else { panic!("not a push") };
        assert_eq!(push.user_id, "8-evans");
        assert_eq!(push.base_version, None);
    }

    #[test]
    fn a_request_serializes_back_to_what_parses() {
        let body = br#"{"action":"delta","user_id":"u","site_id":"s","data_type":"balance","delta":{"coins":10},"op_id":"o1","reason":"game"}"#;
        let parsed = PostRequest::parse(body).unwrap();
        let again = PostRequest::parse(parsed.to_json().to_string().as_bytes()).unwrap();
        assert_eq!(parsed, again);
    }

    #[test]
    fn malformed_bodies_are_refused_with_their_own_codes() {
        let code = |b: &[u8]| PostRequest::parse(b).unwrap_err().code;
        assert_eq!(code(b"{"), "invalid_json");
        assert_eq!(code(b"[]"), "invalid_request");
        assert_eq!(code(br#"{"user_id":"u"}"#), "missing_field");
        assert_eq!(code(br#"{"action":"drop"}"#), "unknown_action");
        assert_eq!(code(br#"{"action":"get"}"#), "method_not_allowed");
        assert_eq!(
            code(
                br#"{"action":"push","user_id":"u","site_id":"s","data_type":"balance","data":{},"extra":1}"#
            ),
            "invalid_request"
        );
        assert_eq!(
            code(br#"{"action":"delta","user_id":"u","site_id":"s","data_type":"balance","delta":{"coins":1}}"#),
            "missing_field"
        );
        assert_eq!(
            code(br#"{"action":"push","user_id":"victim","user_id":"u","site_id":"s","data_type":"balance","data":{}}"#),
            "invalid_request"
        );
    }
}
