//! The JSON values the engine reads and writes. Deliberately small — objects are ordered
//! pairs, numbers are `f64` (exact for integers up to 2^53, the hub's limit for amounts) —
//! so that the browser build carries no JSON library: the wasm shell converts to and from
//! the page's own JSON objects, and native callers convert from `serde_json`.

use alloc::{
    borrow::ToOwned,
    string::{String, ToString},
    vec::Vec,
};

/// A JSON value. Objects compare equal whatever the order of their keys.
#[derive(Debug, Clone, Default)]
pub enum Json {
    #[default]
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Array(Vec<Json>),
    /// Keys in the order they arrived; a key appears at most once.
    Object(Vec<(String, Json)>),
}

impl PartialEq for Json {
    fn eq(&self, other: &Json) -> bool {
        match (self, other) {
            (Json::Null, Json::Null) => true,
            (Json::Bool(a), Json::Bool(b)) => a == b,
            (Json::Number(a), Json::Number(b)) => a == b,
            (Json::String(a), Json::String(b)) => a == b,
            (Json::Array(a), Json::Array(b)) => a == b,
            (Json::Object(a), Json::Object(b)) => {
                a.len() == b.len() && a.iter().all(|(k, v)| other.get(k) == Some(v))
            }
            _ => false,
        }
    }
}

impl Json {
    pub fn object() -> Json {
        Json::Object(Vec::new())
    }

    /// The value under `key`, if this is an object holding it.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(pairs) => pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Sets `key` (replacing its value) on an object; turns anything else into one first.
    pub fn set(&mut self, key: &str, value: Json) {
        if !matches!(self, Json::Object(_)) {
            *self = Json::object();
        }
        if let Json::Object(pairs) = self {
            match pairs.iter_mut().find(|(k, _)| k == key) {
                Some((_, v)) => *v = value,
                None => pairs.push((key.to_owned(), value)),
            }
        }
    }

    /// Builder form of [`Json::set`].
    pub fn with(mut self, key: &str, value: impl Into<Json>) -> Json {
        self.set(key, value.into());
        self
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// An integer within ±2^53; `None` for fractions and anything else.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            // Whole when it survives the round trip through i64 (`f64::fract` is std's).
            Json::Number(n) if n.abs() <= protocol::MAX_AMOUNT as f64 && *n == (*n as i64) as f64 => {
                Some(*n as i64)
            }
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        self.as_i64().and_then(|n| u64::try_from(n).ok())
    }

    pub fn is_object(&self) -> bool {
        matches!(self, Json::Object(_))
    }

    /// How many bytes this value takes as JSON text, written as the browser's `JSON.stringify`
    /// writes it and sent as UTF-8, or a few more (a fraction counts its longest form): what a
    /// request body weighs before it is written, so that batches are filled to what fits.
    pub fn text_len(&self) -> usize {
        // Non-ASCII characters are written as they are, in as many bytes as in the string.
        fn text(s: &str) -> usize {
            let mut len = 2;
            for b in s.bytes() {
                len += match b {
                    b'"' | b'\\' => 2,
                    0..=0x1f => 6,
                    _ => 1,
                };
            }
            len
        }
        let mut len = 2;
        match self {
            Json::Null | Json::Bool(true) => return 4,
            Json::Bool(false) => return 5,
            Json::Number(n) => {
                return match self.as_i64() {
                    Some(i) => usize::from(i < 0) + protocol::compact::decimal(i.unsigned_abs()).len(),
                    None => 24 + usize::from(n.is_sign_negative()),
                };
            }
            Json::String(s) => return text(s),
            Json::Array(items) => {
                for item in items {
                    len += item.text_len() + 1;
                }
            }
            Json::Object(pairs) => {
                for (key, value) in pairs {
                    len += text(key) + value.text_len() + 2;
                }
            }
        }
        len
    }

    /// JSON merge patch (RFC 7396), as the hub applies a push: objects merge key by key,
    /// `null` removes a key, anything else replaces.
    pub fn merge_patch(&mut self, patch: &Json) {
        let Json::Object(patch) = patch else {
            *self = patch.clone();
            return;
        };
        if !self.is_object() {
            *self = Json::object();
        }
        let Json::Object(pairs) = self else { return };
        for (key, value) in patch {
            let existing = pairs.iter().position(|(k, _)| k == key);
            match (value, existing) {
                (Json::Null, Some(i)) => {
                    pairs.remove(i);
                }
                (Json::Null, None) => {}
                (value, Some(i)) => pairs[i].1.merge_patch(value),
                (value, None) => {
                    let mut fresh = Json::Null;
                    fresh.merge_patch(value);
                    pairs.push((key.clone(), fresh));
                }
            }
        }
    }
}

impl protocol::wire::JsonWrite for Json {
    fn object() -> Json {
        Json::object()
    }

    fn array() -> Json {
        Json::Array(Vec::new())
    }

    fn text(value: &str) -> Json {
        Json::from(value)
    }

    fn integer(value: i64) -> Json {
        Json::from(value)
    }

    fn with(self, key: &str, value: Json) -> Json {
        Json::with(self, key, value)
    }

    fn array_of(items: Vec<Json>) -> Json {
        Json::Array(items)
    }
}

impl protocol::wire::JsonRead for Json {
    fn get(&self, key: &str) -> Option<&Json> {
        Json::get(self, key)
    }

    fn as_str(&self) -> Option<&str> {
        Json::as_str(self)
    }

    fn as_u64(&self) -> Option<u64> {
        Json::as_u64(self)
    }

    fn as_bool(&self) -> Option<bool> {
        Json::as_bool(self)
    }

    fn is_object(&self) -> bool {
        Json::is_object(self)
    }

    fn items(&self) -> &[Json] {
        match self {
            Json::Array(items) => items,
            _ => &[],
        }
    }
}

impl From<&str> for Json {
    fn from(s: &str) -> Json {
        Json::String(s.to_owned())
    }
}

impl From<String> for Json {
    fn from(s: String) -> Json {
        Json::String(s)
    }
}

impl From<i64> for Json {
    fn from(n: i64) -> Json {
        Json::Number(n as f64)
    }
}

impl From<u64> for Json {
    fn from(n: u64) -> Json {
        Json::Number(n as f64)
    }
}

impl From<bool> for Json {
    fn from(b: bool) -> Json {
        Json::Bool(b)
    }
}

impl<T: Into<Json>> From<Option<T>> for Json {
    fn from(v: Option<T>) -> Json {
        v.map_or(Json::Null, Into::into)
    }
}

impl From<&serde_json::Value> for Json {
    fn from(value: &serde_json::Value) -> Json {
        use serde_json::Value;
        match value {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Number(n) => Json::Number(n.as_f64().unwrap_or(0.0)),
            Value::String(s) => Json::String(s.clone()),
            Value::Array(items) => Json::Array(items.iter().map(Json::from).collect()),
            Value::Object(map) => Json::Object(map.iter().map(|(k, v)| (k.clone(), Json::from(v))).collect()),
        }
    }
}

impl From<&Json> for serde_json::Value {
    fn from(json: &Json) -> serde_json::Value {
        use serde_json::Value;
        match json {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => match json.as_i64() {
                Some(i) => Value::from(i),
                None => serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number),
            },
            Json::String(s) => Value::String(s.clone()),
            Json::Array(items) => Value::Array(items.iter().map(Value::from).collect()),
            Json::Object(pairs) => {
                Value::Object(pairs.iter().map(|(k, v)| (k.clone(), Value::from(v))).collect())
            }
        }
    }
}

impl Json {
    /// Parses JSON text (for native callers; the browser shell converts the page's objects).
    pub fn parse(text: &str) -> Option<Json> {
        serde_json::from_str::<serde_json::Value>(text).ok().map(|v| Json::from(&v))
    }

    /// JSON text (for native callers).
    pub fn to_text(&self) -> String {
        serde_json::Value::from(self).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(text: &str) -> Json {
        Json::parse(text).unwrap()
    }

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let cases = [
            (r#"{"a":"b"}"#, r#"{"a":"c"}"#, r#"{"a":"c"}"#),
            (r#"{"a":"b"}"#, r#"{"a":null}"#, r#"{}"#),
            (r#"{"a":{"b":"c"}}"#, r#"{"a":{"b":"d","c":null}}"#, r#"{"a":{"b":"d"}}"#),
            (r#"{"a":[{"b":"c"}]}"#, r#"{"a":[1]}"#, r#"{"a":[1]}"#),
            (r#"["a","b"]"#, r#"{"a":"b","c":null}"#, r#"{"a":"b"}"#),
            (r#"{}"#, r#"{"a":{"bb":{"ccc":null}}}"#, r#"{"a":{"bb":{}}}"#),
            (r#"{"e":null}"#, r#"{"a":1}"#, r#"{"e":null,"a":1}"#),
        ];
        for (target, patch, expected) in cases {
            let mut value = j(target);
            value.merge_patch(&j(patch));
            assert_eq!(value, j(expected), "{target} + {patch}");
        }
    }

    #[test]
    fn text_len_is_never_short_of_the_written_text() {
        let values = [
            r#"null"#,
            r#"[true,false,[],{}]"#,
            r#"{"coins":-9007199254740991,"n":0,"f":-0.1,"g":1.7976931348623157e308,"h":5e-324}"#,
            r#"{"bio":"quote \" backslash \\ tab \t nul \u0000 é € 😀","a":{"b":["c",1,null]}}"#,
        ];
        for text in values {
            let value = j(text);
            let written = value.to_text().len();
            assert!(value.text_len() >= written, "{text}: {} < {written}", value.text_len());
            assert!(value.text_len() <= written + 64, "{text}: {} ≫ {written}", value.text_len());
        }
        let exact = j(r#"{"action":"delta","delta":{"coins":-5},"op_id":"x","reason":"a \"b\""}"#);
        assert_eq!(exact.text_len(), exact.to_text().len() + 2, "one separator's slack per object");
    }

    #[test]
    fn integers_round_trip_exactly_up_to_2_pow_53() {
        let big = j("9007199254740991");
        assert_eq!(big.as_i64(), Some(9_007_199_254_740_991));
        assert_eq!(big.to_text(), "9007199254740991");
        assert_eq!(j("1.5").as_i64(), None);
    }
}
