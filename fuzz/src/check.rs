//! Assertions about what the protocol answers: refusals, normalized text, accepted patches
//! and the records built from them. Each panics, naming the rule, when it does not hold.

use protocol::{DataType, MAX_AMOUNT, Refusal, RefusalKind, SiteId};
use serde_json::Value;

/// The documented profile fields: name, longest text in characters, whether line breaks stay.
pub const PROFILE_FIELDS: [(&str, usize, bool); 5] = [
    ("display_name", 64, false),
    ("bio", 500, true),
    ("avatar", 16, false),
    ("location", 100, false),
    ("website", 200, false),
];
pub const MAX_SETTING_CHARS: usize = 1000;
pub const MAX_SETTINGS_BYTES: usize = 4096;
pub const MAX_ROLES: usize = 16;
pub const MAX_REASON_CHARS: usize = 100;

/// Longest message a refusal carries, however long the request: hostile input is echoed
/// back only in short excerpts (40 characters, each at most 10 once escaped).
pub const MAX_MESSAGE_CHARS: usize = 512;

/// The HTTP status the hub answers a refusal with (`hub/src/http/error.rs`). A new kind
/// stops this crate compiling until its status is decided here too.
pub fn status(kind: RefusalKind) -> u16 {
    match kind {
        RefusalKind::Invalid => 400,
        RefusalKind::Forbidden => 403,
        RefusalKind::WrongMethod => 405,
    }
}

/// A refusal answers with a 4xx status, a snake_case code and a short, non-empty message.
pub fn refusal(r: &Refusal) {
    let code = r.code;
    assert!(
        !code.is_empty()
            && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            && !code.starts_with('_')
            && !code.ends_with('_')
            && !code.contains("__"),
        "code is not snake_case: {r:?}"
    );
    assert!(!r.message.trim().is_empty(), "empty message: {r:?}");
    let chars = r.message.chars().count();
    assert!(chars <= MAX_MESSAGE_CHARS, "a message of {chars} characters: {r:?}");
    assert!((400..500).contains(&status(r.kind)), "{r:?}");
}

/// The value of an accepted result; a refusal is checked and becomes `None`.
pub fn accepted<T>(result: Result<T, Refusal>) -> Option<T> {
    result.map_err(|r| refusal(&r)).ok()
}

/// The invisible direction marks and byte-order marks the normalizer drops.
pub fn is_dropped_mark(c: char) -> bool {
    matches!(c, '\u{200E}' | '\u{200F}' | '\u{061C}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// Text as the normalizer leaves it: no control character but LF in multi-line fields, no
/// tab, CR or Unicode line separator, no direction mark, trimmed, at most `max_chars`.
pub fn text(field: &str, s: &str, max_chars: usize, multi_line: bool) {
    assert!(
        s.chars().all(|c| !c.is_control() || (multi_line && c == '\n')),
        "{field} keeps a control character: {s:?}"
    );
    assert!(
        !s.contains(['\r', '\t', '\u{2028}', '\u{2029}']),
        "{field} keeps a raw line break or tab: {s:?}"
    );
    assert!(!s.chars().any(is_dropped_mark), "{field} keeps a direction mark: {s:?}");
    assert_eq!(s.trim(), s, "{field} is not trimmed");
    assert!(s.chars().count() <= max_chars, "{field} is over {max_chars} characters: {s:?}");
}

pub fn is_setting_key(k: &str) -> bool {
    (1..=40).contains(&k.len())
        && k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// `[a-z0-9_-]{1,max}`: site ids and role names.
pub fn is_name(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
}

/// A role list as stored: distinct role names, at most [`MAX_ROLES`].
fn role_list(v: &Value) {
    let Value::Array(items) = v else { panic!("a role list that is not a list: {v}") };
    assert!(items.len() <= MAX_ROLES, "{} roles", items.len());
    for (i, item) in items.iter().enumerate() {
        assert!(item.as_str().is_some_and(|s| is_name(s, 32)), "not a role name: {item}");
        assert!(!items[..i].contains(item), "duplicate role {item}");
    }
}

/// An amount as stored: an integer in [0, MAX_AMOUNT].
fn amount(v: &Value) {
    assert!(v.as_i64().is_some_and(|n| (0..=MAX_AMOUNT).contains(&n)), "not an amount: {v}");
}

fn amount_name(t: DataType) -> &'static str {
    if t == DataType::Balance { "coins" } else { "points" }
}

/// An accepted push patch: an object of exactly the fields sent, each keeping its type's
/// rules.
pub fn patch(t: DataType, data: &Value, patch: &Value, site: &SiteId, admin: bool) {
    let (Some(data), Some(patch)) = (data.as_object(), patch.as_object()) else {
        panic!("accepted data or patch is not an object: {data} -> {patch}");
    };
    assert!(!patch.is_empty(), "empty patch accepted");
    assert!(data.keys().eq(patch.keys()), "the patch does not hold exactly the fields sent");
    for (key, value) in patch {
        match t {
            DataType::Balance | DataType::Points => {
                assert_eq!(key, amount_name(t));
                amount(value);
                assert_eq!(value, &data[key], "an amount is not kept as sent");
            }
            DataType::Profile => {
                let Some(&(_, max, multi)) = PROFILE_FIELDS.iter().find(|f| f.0 == key) else {
                    panic!("profile patch holds unknown field {key:?}");
                };
                match value {
                    Value::Null => {}
                    Value::String(s) => {
                        text(key, s, max, multi);
                        if key == "website" {
                            website(s);
                        }
                    }
                    other => panic!("profile.{key} = {other}"),
                }
            }
            DataType::Settings => {
                assert!(is_setting_key(key), "setting key {key:?}");
                match value {
                    Value::String(s) => text(key, s, MAX_SETTING_CHARS, false),
                    Value::Null | Value::Bool(_) | Value::Number(_) => assert_eq!(value, &data[key]),
                    other => panic!("setting {key} = {other}"),
                }
            }
            DataType::Roles => match key.as_str() {
                "global_roles" => {
                    assert!(admin, "global_roles accepted without admin");
                    role_list(value);
                }
                "site_roles" => {
                    let Value::Object(sites) = value else { panic!("site_roles = {value}") };
                    for (s, roles) in sites {
                        assert_eq!(s, site.as_str(), "another site's roles accepted");
                        role_list(roles);
                    }
                }
                other => panic!("roles patch holds {other:?}"),
            },
        }
    }
}

/// A stored website: empty, or an http(s) URL that cannot break out of an attribute.
fn website(s: &str) {
    if s.is_empty() {
        return;
    }
    assert!(s.starts_with("http://") || s.starts_with("https://"), "website {s:?}");
    assert!(!s.chars().any(|c| c.is_whitespace() || "\"'<>\\`".contains(c)), "website {s:?}");
}

/// A record built only from accepted patches keeps its type's rules.
pub fn record(t: DataType, record: &Value, site: &SiteId) {
    let Some(fields) = record.as_object() else { panic!("record is not an object: {record}") };
    match t {
        DataType::Balance | DataType::Points => {
            assert!(fields.keys().eq([amount_name(t)]), "{t} record {record}");
            amount(&fields[amount_name(t)]);
        }
        DataType::Profile => {
            for (key, value) in fields {
                let Some(&(_, max, multi)) = PROFILE_FIELDS.iter().find(|f| f.0 == key) else {
                    panic!("profile record holds {key:?}");
                };
                let Some(s) = value.as_str() else { panic!("profile.{key} = {value}") };
                text(key, s, max, multi);
            }
        }
        DataType::Settings => {
            for (key, value) in fields {
                assert!(is_setting_key(key), "setting key {key:?}");
                assert!(
                    !value.is_null() && !value.is_array() && !value.is_object(),
                    "setting {key} = {value}"
                );
                if let Some(s) = value.as_str() {
                    text(key, s, MAX_SETTING_CHARS, false);
                }
            }
            let size = record.to_string().len();
            assert!(size <= MAX_SETTINGS_BYTES, "settings of {size} bytes");
        }
        DataType::Roles => {
            assert!(fields.keys().eq(["global_roles", "site_roles"]), "roles record {record}");
            role_list(&fields["global_roles"]);
            let Some(sites) = fields["site_roles"].as_object() else {
                panic!("site_roles = {}", fields["site_roles"]);
            };
            for (s, roles) in sites {
                assert_eq!(s, site.as_str(), "another site's roles in the record");
                role_list(roles);
            }
        }
    }
}
