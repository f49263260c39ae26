//! Requests as they arrive: a POST body (`push`, `delta`) or a GET query (`timestamp`,
//! `get`). Fields stay strings here so each can be refused with its own code.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Refusal;
use crate::data_type::truncate;

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
}

impl PostRequest {
    /// Parses a POST body, naming what is wrong with it when it cannot be used.
    pub fn parse(body: &[u8]) -> Result<Self, Refusal> {
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
            "timestamp" | "get" => Err(wrong_method(&action, "GET")),
            other => Err(unknown_action(other)),
        }
    }

    /// The body as the hub expects it, `action` included.
    pub fn to_json(&self) -> Value {
        let (action, body) = match self {
            PostRequest::Push(p) => ("push", serde_json::to_value(p)),
            PostRequest::Delta(d) => ("delta", serde_json::to_value(d)),
        };
        let mut body = body.expect("request types serialize");
        if let Value::Object(fields) = &mut body {
            fields.insert("action".into(), Value::from(action));
        }
        body
    }
}

/// Reads a JSON object's top-level keys, failing on the second occurrence of any key.
struct UniqueKeys;

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UniqueKeys;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
                let mut seen = std::collections::BTreeSet::new();
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
        format!("unknown action {:?}; expected timestamp, get, push or delta", truncate(action)),
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
