//! Property tests of the request parser and the data rules: whatever arrives, the protocol
//! answers with a value that keeps its rules or with a well-formed refusal, and never panics.
//!
//! Each property runs proptest's default case count (256); raise it with `PROPTEST_CASES`,
//! e.g. `PROPTEST_CASES=20000 cargo test -p protocol --test properties`.

use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::TestCaseError;
use protocol::{
    DataType, GetQuery, Limits, MAX_AMOUNT, OpId, PostRequest, QueryAction, Refusal, RefusalKind, SiteId,
    UserId, merge_patch, validate_delta, validate_push, validate_reason, validate_record,
};
use serde_json::{Map, Value};

type Checked = Result<(), TestCaseError>;

/// The documented profile fields: name, longest text in characters, whether line breaks stay.
const PROFILE_FIELDS: [(&str, usize, bool); 5] = [
    ("display_name", 64, false),
    ("bio", 500, true),
    ("avatar", 16, false),
    ("location", 100, false),
    ("website", 200, false),
];
const MAX_SETTING_CHARS: usize = 1000;
const MAX_SETTINGS_BYTES: usize = 4096;
const MAX_ROLES: usize = 16;
const MAX_REASON_CHARS: usize = 100;

/// The site the pushes come from, unless a test draws another.
const SITE: &str = "roflfaucet";

const FIELD_NAMES: &[&str] = &[
    "action",
    "user_id",
    "site_id",
    "data_type",
    "data",
    "delta",
    "op_id",
    "reason",
    "token",
    "base_version",
    "coins",
    "points",
    "display_name",
    "bio",
    "avatar",
    "location",
    "website",
    "global_roles",
    "site_roles",
    SITE,
    "theme",
    "__proto__",
    "",
];
const ACTIONS: &[&str] = &["push", "delta", "get", "timestamp", "PUSH", "drop", ""];
const DATA_TYPES: &[&str] = &["balance", "points", "profile", "roles", "settings", "coins", "Balance"];

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

/// Characters of user text: mostly plain, with whitespace of every kind, the marks the
/// normalizer drops, a few control characters and now and then any character at all.
fn text_char() -> impl Strategy<Value = char> {
    prop_oneof![
        20 => proptest::char::range('a', 'z'),
        6 => proptest::char::range(' ', '~'),
        4 => select(&[
            ' ', '\t', '\r', '\n', '\u{2028}', '\u{2029}', '\u{a0}', '\u{3000}', '\u{200b}', '\u{200d}',
            '\u{feff}', '\u{200e}', '\u{200f}', '\u{061c}', '\u{202a}', '\u{202e}', '\u{2066}', '\u{2069}',
            'é', '👨', '🎉', 'ﷺ',
        ][..]),
        1 => select(&['\0', '\u{7}', '\u{b}', '\u{c}', '\u{1b}', '\u{7f}', '\u{85}', '\u{9f}'][..]),
        1 => any::<char>(),
    ]
}

fn text() -> BoxedStrategy<String> {
    prop_oneof![
        8 => prop::collection::vec(text_char(), 0..24).prop_map(String::from_iter),
        // Right at the length limits, with surrounding whitespace that trimming removes.
        2 => (
            "[ \t]{0,2}",
            select(&[15usize, 16, 17, 63, 64, 65, 99, 100, 101, 199, 200, 201, 499, 500, 501, 999, 1000, 1001][..]),
            select(&['x', 'é', '🎉', '\u{200e}'][..]),
            "[ \t]{0,2}",
        )
            .prop_map(|(a, n, c, b)| format!("{a}{}{b}", String::from_iter(std::iter::repeat_n(c, n)))),
        // Website-like.
        2 => (
            select(&["http://", "https://", "HTTPS://", "HtTp://", "javascript:", "//", "ftp://", ""][..]),
            "[a-z0-9.:\\[\\]-]{0,12}",
            prop::collection::vec(text_char(), 0..12).prop_map(String::from_iter),
        )
            .prop_map(|(s, h, r)| format!("{s}{h}{r}")),
        1 => select(FIELD_NAMES).prop_map(String::from),
    ]
    .boxed()
}

fn number() -> BoxedStrategy<Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0..=MAX_AMOUNT).prop_map(Value::from),
        (-20i64..20).prop_map(Value::from),
        select(
            &[
                0,
                1,
                -1,
                MAX_AMOUNT,
                MAX_AMOUNT + 1,
                -MAX_AMOUNT,
                -MAX_AMOUNT - 1,
                1_000_000_000,
                1_000_000_001,
                -1_000_000_000,
                -1_000_000_001,
                i64::MIN,
                i64::MAX
            ][..]
        )
        .prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        (-1e6..1e6f64).prop_map(Value::from),
        select(
            &[
                "1e300",
                "-1e300",
                "0.5",
                "10.0",
                "-0.0",
                "9007199254740991.0",
                "9007199254740992.0",
                "-9007199254740992",
                "1e20",
                "123456789012345678901234567890",
                "-123456789012345678901234567890",
                "5e-324",
            ][..]
        )
        .prop_map(|s| serde_json::from_str(s).expect("valid JSON number")),
    ]
    .boxed()
}

fn key() -> BoxedStrategy<String> {
    prop_oneof![
        4 => select(FIELD_NAMES).prop_map(String::from),
        2 => "[a-z0-9_]{1,41}",
        1 => text(),
    ]
    .boxed()
}

/// Any JSON value, nested a few levels, its object keys often the protocol's field names.
fn json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        number(),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
    .boxed()
}

fn object(entries: impl Strategy<Value = Vec<(String, Value)>>) -> impl Strategy<Value = Value> {
    entries.prop_map(|kv| Value::Object(kv.into_iter().collect()))
}

fn role_list() -> BoxedStrategy<Value> {
    let name = prop_oneof![
        6 => select(&["admin", "recipient", "verified", "mod", "a-b_1"][..]).prop_map(String::from),
        4 => "[a-z0-9_-]{1,32}",
        1 => "[a-z0-9_-]{33}",
        1 => text(),
    ];
    prop_oneof![
        6 => prop::collection::vec(
            prop_oneof![8 => name.prop_map(Value::from), 1 => json()],
            0..20,
        )
        .prop_map(Value::Array),
        1 => Just(Value::Null),
        1 => json(),
    ]
    .boxed()
}

/// The `data` of a push shaped like a record of type `t`, with now and then a wrong field,
/// a wrong type or an out-of-range value.
fn shaped_data(t: DataType) -> BoxedStrategy<Value> {
    match t {
        DataType::Balance | DataType::Points => {
            let own = if t == DataType::Balance { "coins" } else { "points" };
            let field = prop_oneof![
                8 => Just(own.to_owned()),
                1 => select(&["coins", "points"][..]).prop_map(String::from),
                1 => key(),
            ];
            let amount = prop_oneof![2 => (0..=MAX_AMOUNT).prop_map(Value::from), 3 => number(), 1 => json()];
            prop_oneof![
                4 => (field.clone(), amount.clone()).prop_map(|(k, v)| Value::Object(Map::from_iter([(k, v)]))),
                1 => object(prop::collection::vec((field, amount), 0..3)),
            ]
            .boxed()
        }
        DataType::Profile => {
            let name = prop_oneof![8 => select(PROFILE_FIELDS.map(|f| f.0).to_vec()).prop_map(String::from), 1 => key()];
            let value = prop_oneof![8 => text().prop_map(Value::from), 1 => Just(Value::Null), 1 => json()];
            object(prop::collection::vec((name, value), 0..4)).boxed()
        }
        DataType::Settings => {
            let name = prop_oneof![8 => "[a-z0-9_]{1,40}", 1 => "[a-z0-9_]{41}", 1 => key()];
            let value = prop_oneof![
                4 => text().prop_map(Value::from),
                2 => number(),
                1 => any::<bool>().prop_map(Value::from),
                1 => Just(Value::Null),
                1 => json(),
            ];
            object(prop::collection::vec((name, value), 0..6)).boxed()
        }
        DataType::Roles => {
            let site_key = prop_oneof![6 => Just(SITE.to_owned()), 1 => "[a-z0-9_-]{1,8}", 1 => key()];
            let site_roles = prop_oneof![
                6 => object(prop::collection::vec((site_key, role_list()), 0..3)),
                1 => json(),
            ];
            (
                prop::option::weighted(0.5, role_list()),
                prop::option::weighted(0.7, site_roles),
                prop::option::weighted(0.1, (key(), json())),
            )
                .prop_map(|(global, site, extra)| {
                    let mut m = Map::new();
                    if let Some(g) = global {
                        m.insert("global_roles".into(), g);
                    }
                    if let Some(s) = site {
                        m.insert("site_roles".into(), s);
                    }
                    if let Some((k, v)) = extra {
                        m.insert(k, v);
                    }
                    Value::Object(m)
                })
                .boxed()
        }
    }
}

/// The `data` of a push: shaped like any of the record types, or anything at all.
fn push_data() -> BoxedStrategy<Value> {
    prop_oneof![
        6 => data_type().prop_flat_map(shaped_data),
        1 => json(),
    ]
    .boxed()
}

/// A data type with push data usually shaped for it, sometimes for another type.
fn typed_push() -> impl Strategy<Value = (DataType, Value)> {
    data_type().prop_flat_map(|t| (Just(t), prop_oneof![4 => shaped_data(t), 1 => push_data()]))
}

/// The `delta` object of a delta request.
fn delta_map() -> BoxedStrategy<Map<String, Value>> {
    let field = || prop_oneof![8 => select(&["coins", "points"][..]).prop_map(String::from), 1 => key()];
    let value = || {
        prop_oneof![
            3 => (-1_000_000_000i64..=1_000_000_000).prop_map(Value::from),
            4 => number(),
            1 => json(),
        ]
    };
    prop_oneof![
        4 => (field(), value()).prop_map(|(k, v)| Map::from_iter([(k, v)])),
        1 => prop::collection::vec((field(), value()), 0..3).prop_map(Map::from_iter),
    ]
    .boxed()
}

fn data_type() -> impl Strategy<Value = DataType> {
    select(&DataType::ALL[..])
}

fn site() -> impl Strategy<Value = SiteId> {
    prop_oneof![
        4 => Just(SITE.to_owned()),
        1 => "[a-z0-9_-]{1,32}",
    ]
    .prop_map(|s| SiteId::parse(&s).expect("generated from the site id alphabet"))
}

fn limits() -> impl Strategy<Value = Limits> {
    prop_oneof![
        3 => Just(Limits::default()),
        1 => any::<i64>().prop_map(|max_delta| Limits { max_delta }),
        1 => (-5i64..5).prop_map(|max_delta| Limits { max_delta }),
    ]
}

/// A field value: usually of the right type, sometimes anything; present with `p`.
fn field(p: f64, plausible: BoxedStrategy<Value>) -> BoxedStrategy<Option<Value>> {
    prop::option::weighted(p, prop_oneof![12 => plausible, 1 => json()]).boxed()
}

/// A POST body as a JSON value: an object holding the real field names with values of the
/// right type or any other, mostly the fields of its action, now and then those of the
/// other action or an unknown one; sometimes not an object at all.
fn request_value() -> BoxedStrategy<Value> {
    let action = prop::option::weighted(
        0.95,
        prop_oneof![
            6 => select(&["push", "delta"][..]).prop_map(Value::from),
            3 => select(ACTIONS).prop_map(Value::from),
            1 => json(),
        ],
    );
    let object = action.prop_flat_map(|action| {
        let is = |a: &str| action.as_ref().and_then(Value::as_str) == Some(a);
        // Presence of the fields only a push, only a delta, or both may hold.
        let (push, delta, both) = if is("push") {
            (0.9, 0.05, 0.5)
        } else if is("delta") {
            (0.05, 0.9, 0.5)
        } else {
            (0.5, 0.5, 0.5)
        };
        let fields = (
            field(0.95, "[A-Za-z0-9._-]{1,10}".prop_map(Value::from).boxed()),
            field(0.95, "[a-z0-9_-]{1,10}".prop_map(Value::from).boxed()),
            field(0.95, select(DATA_TYPES).prop_map(Value::from).boxed()),
            field(push, push_data()),
            field(delta, delta_map().prop_map(Value::Object).boxed()),
            field(if is("delta") { 0.95 } else { both }, "[!-~]{1,20}".prop_map(Value::from).boxed()),
            field(delta, prop_oneof![text().prop_map(Value::from), Just(Value::Null)].boxed()),
            field(both, prop_oneof![text().prop_map(Value::from), Just(Value::Null)].boxed()),
            field(push / 3.0, prop_oneof![number(), Just(Value::Null)].boxed()),
        );
        (Just(action), fields, prop::option::weighted(0.05, (key(), json())))
    });
    let names =
        ["user_id", "site_id", "data_type", "data", "delta", "op_id", "reason", "token", "base_version"];
    let object = object.prop_map(move |(action, (u, s, t, data, delta, op, reason, token, base), extra)| {
        let mut m = Map::new();
        if let Some(a) = action {
            m.insert("action".into(), a);
        }
        for (name, value) in names.iter().zip([u, s, t, data, delta, op, reason, token, base]) {
            if let Some(v) = value {
                m.insert((*name).into(), v);
            }
        }
        if let Some((k, v)) = extra {
            m.insert(k, v);
        }
        Value::Object(m)
    });
    prop_oneof![12 => object, 1 => json()].boxed()
}

/// Bytes that are, or are close to, a POST body.
fn body_bytes() -> BoxedStrategy<Vec<u8>> {
    let mangled = (request_value(), prop::collection::vec((any::<Index>(), any::<u8>(), 0u8..3), 0..4))
        .prop_map(|(v, edits)| {
            let mut b = v.to_string().into_bytes();
            for (at, byte, how) in edits {
                if b.is_empty() {
                    break;
                }
                let i = at.index(b.len());
                match how {
                    0 => b[i] = byte,
                    1 => b.insert(i, byte),
                    _ => b.truncate(i),
                }
            }
            b
        });
    let deep =
        (1usize..300, select(&[("[", "]"), ("{\"data\":", "}")][..])).prop_map(|(n, (open, close))| {
            format!(
                r#"{{"action":"push","user_id":"u","site_id":"s","data_type":"settings","data":{}1{}}}"#,
                open.repeat(n),
                close.repeat(n)
            )
            .into_bytes()
        });
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..256),
        4 => mangled,
        1 => deep,
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// Requests compare through their JSON; with serde_json's `float_roundtrip` feature even a
/// 17-digit float survives the round trip exactly.
fn same_request(a: &PostRequest, b: &PostRequest) -> bool {
    a.to_json() == b.to_json()
}

/// The HTTP status the hub answers a refusal with.
fn status(kind: RefusalKind) -> u16 {
    match kind {
        RefusalKind::Invalid => 400,
        RefusalKind::Forbidden => 403,
        RefusalKind::WrongMethod => 405,
    }
}

fn check_refusal(r: &Refusal) -> Checked {
    let code = r.code;
    prop_assert!(!code.is_empty(), "empty code: {r:?}");
    prop_assert!(
        code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            && !code.starts_with('_')
            && !code.ends_with('_')
            && !code.contains("__"),
        "code is not snake_case: {r:?}"
    );
    prop_assert!(!r.message.trim().is_empty(), "empty message: {r:?}");
    prop_assert!((400..500).contains(&status(r.kind)));
    Ok(())
}

fn is_dropped_mark(c: char) -> bool {
    matches!(c, '\u{200E}' | '\u{200F}' | '\u{061C}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// Text as the normalizer leaves it.
fn check_text(field: &str, s: &str, max_chars: usize, multi_line: bool) -> Checked {
    prop_assert!(
        s.chars().all(|c| !c.is_control() || (multi_line && c == '\n')),
        "{field} keeps a control character: {s:?}"
    );
    prop_assert!(
        !s.contains(['\r', '\t', '\u{2028}', '\u{2029}']),
        "{field} keeps a raw line break or tab: {s:?}"
    );
    prop_assert!(!s.chars().any(is_dropped_mark), "{field} keeps a direction mark: {s:?}");
    prop_assert_eq!(s.trim(), s, "{} is not trimmed", field);
    prop_assert!(s.chars().count() <= max_chars, "{field} is over {max_chars} characters: {s:?}");
    Ok(())
}

fn is_setting_key(k: &str) -> bool {
    (1..=40).contains(&k.len())
        && k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn is_role_name(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
}

fn check_role_list(v: &Value) -> Checked {
    let Value::Array(items) = v else {
        return Err(TestCaseError::fail(format!("a role list that is not a list: {v}")));
    };
    prop_assert!(items.len() <= MAX_ROLES, "{} roles", items.len());
    for (i, item) in items.iter().enumerate() {
        prop_assert!(item.as_str().is_some_and(is_role_name), "not a role name: {item}");
        prop_assert!(!items[..i].contains(item), "duplicate role {item}");
    }
    Ok(())
}

/// An amount as stored: an integer in [0, MAX_AMOUNT].
fn check_amount(v: &Value) -> Checked {
    prop_assert!(v.as_i64().is_some_and(|n| (0..=MAX_AMOUNT).contains(&n)), "not an amount: {v}");
    Ok(())
}

/// The rules an accepted push patch keeps, beyond being an object of the keys that were sent.
fn check_patch(t: DataType, data: &Value, patch: &Value, site: &SiteId, admin: bool) -> Checked {
    let (Some(data), Some(patch)) = (data.as_object(), patch.as_object()) else {
        return Err(TestCaseError::fail("accepted data or patch is not an object"));
    };
    prop_assert!(!patch.is_empty(), "empty patch accepted");
    prop_assert!(data.keys().eq(patch.keys()), "the patch does not hold exactly the fields sent");
    for (key, value) in patch {
        match t {
            DataType::Balance | DataType::Points => {
                let field = if t == DataType::Balance { "coins" } else { "points" };
                prop_assert_eq!(key.as_str(), field);
                check_amount(value)?;
                prop_assert_eq!(value, &data[key], "an amount is not stored as sent");
            }
            DataType::Profile => {
                let Some(&(_, max, multi)) = PROFILE_FIELDS.iter().find(|f| f.0 == key) else {
                    return Err(TestCaseError::fail(format!("profile patch holds unknown field {key:?}")));
                };
                match value {
                    Value::Null => {}
                    Value::String(s) => {
                        check_text(key, s, max, multi)?;
                        if key == "website" && !s.is_empty() {
                            prop_assert!(
                                s.starts_with("http://") || s.starts_with("https://"),
                                "website {s:?}"
                            );
                            prop_assert!(
                                !s.chars().any(|c| c.is_whitespace() || "\"'<>\\`".contains(c)),
                                "website {s:?}"
                            );
                        }
                    }
                    other => return Err(TestCaseError::fail(format!("profile.{key} = {other}"))),
                }
            }
            DataType::Settings => {
                prop_assert!(is_setting_key(key), "setting key {key:?}");
                match value {
                    Value::String(s) => check_text(key, s, MAX_SETTING_CHARS, false)?,
                    Value::Null | Value::Bool(_) | Value::Number(_) => prop_assert_eq!(value, &data[key]),
                    other => return Err(TestCaseError::fail(format!("setting {key} = {other}"))),
                }
            }
            DataType::Roles => match key.as_str() {
                "global_roles" => {
                    prop_assert!(admin, "global_roles accepted without admin");
                    check_role_list(value)?;
                }
                "site_roles" => {
                    let Value::Object(sites) = value else {
                        return Err(TestCaseError::fail(format!("site_roles = {value}")));
                    };
                    for (s, roles) in sites {
                        prop_assert_eq!(s.as_str(), site.as_str(), "another site's roles accepted");
                        check_role_list(roles)?;
                    }
                }
                other => return Err(TestCaseError::fail(format!("roles patch holds {other:?}"))),
            },
        }
    }
    Ok(())
}

/// The rules a stored record keeps when it was built only from accepted patches.
fn check_record(t: DataType, record: &Value, site: &SiteId) -> Checked {
    let Some(fields) = record.as_object() else {
        return Err(TestCaseError::fail(format!("record is not an object: {record}")));
    };
    match t {
        DataType::Balance | DataType::Points => {
            let field = if t == DataType::Balance { "coins" } else { "points" };
            prop_assert!(fields.keys().eq([field]), "{t} record {record}");
            check_amount(&fields[field])?;
        }
        DataType::Profile => {
            for (key, value) in fields {
                let Some(&(_, max, multi)) = PROFILE_FIELDS.iter().find(|f| f.0 == key) else {
                    return Err(TestCaseError::fail(format!("profile record holds {key:?}")));
                };
                let Some(s) = value.as_str() else {
                    return Err(TestCaseError::fail(format!("profile.{key} = {value}")));
                };
                check_text(key, s, max, multi)?;
            }
        }
        DataType::Settings => {
            for (key, value) in fields {
                prop_assert!(
                    is_setting_key(key) && !value.is_null() && !value.is_array() && !value.is_object()
                );
                if let Some(s) = value.as_str() {
                    check_text(key, s, MAX_SETTING_CHARS, false)?;
                }
            }
            prop_assert!(
                record.to_string().len() <= MAX_SETTINGS_BYTES,
                "settings of {} bytes",
                record.to_string().len()
            );
        }
        DataType::Roles => {
            prop_assert!(fields.keys().eq(["global_roles", "site_roles"]), "roles record {record}");
            check_role_list(&fields["global_roles"])?;
            let Some(sites) = fields["site_roles"].as_object() else {
                return Err(TestCaseError::fail(format!("site_roles = {}", fields["site_roles"])));
            };
            for (s, roles) in sites {
                prop_assert_eq!(s.as_str(), site.as_str());
                check_role_list(roles)?;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    // ---- PostRequest::parse ----

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(body in body_bytes()) {
        match PostRequest::parse(&body) {
            Ok(req) => {
                // What is accepted serializes back to the same request.
                let again = PostRequest::parse(req.to_json().to_string().as_bytes());
                prop_assert!(again.as_ref().is_ok_and(|again| same_request(again, &req)), "{again:?} != {req:?}");
            }
            Err(r) => {
                check_refusal(&r)?;
                prop_assert_ne!(r.kind, RefusalKind::Forbidden);
            }
        }
    }

    #[test]
    fn parse_refuses_request_shaped_json_only_with_well_formed_refusals(value in request_value()) {
        let body = value.to_string();
        let action = value.get("action").and_then(Value::as_str);
        match PostRequest::parse(body.as_bytes()) {
            Ok(req) => {
                match (&req, action) {
                    (PostRequest::Push(p), Some("push")) => {
                        prop_assert!(value.get("data").is_some_and(|data| *data == p.data));
                    }
                    (PostRequest::Delta(d), Some("delta")) => {
                        let delta = Value::Object(d.delta.clone());
                        prop_assert!(value.get("delta").is_some_and(|sent| *sent == delta));
                    }
                    _ => return Err(TestCaseError::fail(format!("action {action:?} parsed as {req:?}"))),
                }
                // A token travels in the Authorization header only: a body naming one is refused.
                prop_assert!(value.get("token").is_none(), "a body with a token parsed: {req:?}");
                let again = PostRequest::parse(req.to_json().to_string().as_bytes());
                prop_assert!(again.as_ref().is_ok_and(|again| same_request(again, &req)), "{again:?} != {req:?}");
            }
            Err(r) => {
                check_refusal(&r)?;
                // Only a GET action sent by POST is a 405; parsing never decides a 403.
                let get_action = matches!(action, Some("get" | "timestamp"));
                prop_assert_eq!(r.kind == RefusalKind::WrongMethod, get_action, "{:?}", r);
                prop_assert_ne!(r.kind, RefusalKind::Forbidden);
            }
        }
    }

    #[test]
    fn parse_refuses_a_body_repeating_a_top_level_field(
        value in request_value(),
        which in any::<Index>(),
        at in any::<Index>(),
        other in json(),
        same in any::<bool>(),
    ) {
        let Value::Object(fields) = value else { return Ok(()) };
        let mut entries: Vec<String> =
            fields.iter().map(|(k, v)| format!("{}:{v}", Value::from(k.as_str()))).collect();
        let Some((key, first)) = fields.iter().nth(which.index(fields.len().max(1))) else { return Ok(()) };
        let second = if same { first.clone() } else { other };
        entries.insert(at.index(entries.len() + 1), format!("{}:{second}", Value::from(key.as_str())));
        let body = format!("{{{}}}", entries.join(","));
        let r = PostRequest::parse(body.as_bytes()).expect_err("a repeated field is ambiguous");
        check_refusal(&r)?;
        prop_assert_eq!(r.code, "invalid_request", "{:?}", r);
    }

    // ---- GetQuery ----

    #[test]
    fn get_query_never_panics_and_refuses_with_well_formed_refusals(
        pairs in prop::collection::vec(
            (
                prop_oneof![
                    4 => select(&["action", "user_id", "data_type", "site_id", "_", "cb"][..]).prop_map(String::from),
                    1 => text(),
                ],
                prop_oneof![3 => select(ACTIONS).prop_map(String::from), 3 => text(), 1 => "[a-z,]{0,30}"],
            ),
            0..6,
        ),
        raw in prop_oneof![Just(None), "\\PC{0,40}".prop_map(Some), ".{0,40}".prop_map(Some)],
    ) {
        let query = match raw {
            Some(raw) => raw,
            None => serde_urlencoded::to_string(&pairs).expect("pairs of strings encode"),
        };
        let Ok(q) = serde_urlencoded::from_str::<GetQuery>(&query) else { return Ok(()) };
        match q.action() {
            Ok(QueryAction::Timestamp) => prop_assert_eq!(q.action.as_deref(), Some("timestamp")),
            Ok(QueryAction::Get) => prop_assert_eq!(q.action.as_deref(), Some("get")),
            Err(r) => {
                check_refusal(&r)?;
                prop_assert_eq!(
                    r.kind == RefusalKind::WrongMethod,
                    matches!(q.action.as_deref(), Some("push" | "delta"))
                );
                prop_assert_ne!(r.kind, RefusalKind::Forbidden);
            }
        }
        for (name, value) in [("user_id", &q.user_id), ("data_type", &q.data_type), ("site_id", &q.site_id)] {
            match q.required(name, value) {
                Ok(v) => prop_assert_eq!(Some(v), value.as_deref()),
                Err(r) => {
                    check_refusal(&r)?;
                    prop_assert!(value.is_none());
                }
            }
        }
    }

    // ---- validate_push / validate_delta ----

    #[test]
    fn validate_push_accepts_only_patches_that_keep_the_data_rules(
        (t, data) in typed_push(),
        site in site(),
        admin in any::<bool>(),
    ) {
        match validate_push(t, &data, &site, admin) {
            Ok(patch) => check_patch(t, &data, &patch, &site, admin)?,
            Err(r) => {
                check_refusal(&r)?;
                prop_assert_ne!(r.kind, RefusalKind::WrongMethod);
                if r.kind == RefusalKind::Forbidden {
                    prop_assert_eq!(t, DataType::Roles);
                }
            }
        }
    }

    #[test]
    fn validate_delta_accepts_only_bounded_non_zero_integers(
        t in data_type(),
        delta in delta_map(),
        limits in limits(),
    ) {
        match validate_delta(t, &delta, limits) {
            Ok(change) => {
                let field = match t {
                    DataType::Balance => "coins",
                    DataType::Points => "points",
                    other => return Err(TestCaseError::fail(format!("a delta on {other} was accepted"))),
                };
                prop_assert!(delta.keys().eq([field]));
                prop_assert_eq!(delta[field].as_i64(), Some(change));
                prop_assert_ne!(change, 0);
                prop_assert!(change.unsigned_abs() <= limits.max_delta.unsigned_abs());
                prop_assert!(change.unsigned_abs() <= MAX_AMOUNT.unsigned_abs());
            }
            Err(r) => {
                check_refusal(&r)?;
                prop_assert_eq!(r.kind, RefusalKind::Invalid);
            }
        }
    }

    #[test]
    fn amounts_are_accepted_exactly_within_their_range(n in any::<i64>(), small in -1_000_000_000i64..=1_000_000_000) {
        for t in [DataType::Balance, DataType::Points] {
            let field = if t == DataType::Balance { "coins" } else { "points" };
            let data = Value::Object(Map::from_iter([(field.to_owned(), Value::from(n))]));
            let site = SiteId::parse(SITE).unwrap();
            let pushed = validate_push(t, &data, &site, false);
            if (0..=MAX_AMOUNT).contains(&n) {
                prop_assert_eq!(pushed, Ok(data.clone()));
            } else {
                let code = pushed.expect_err("out of range").code;
                prop_assert!(code == "negative_value" || code == "value_too_large", "{code}");
            }
            let delta = Map::from_iter([(field.to_owned(), Value::from(small))]);
            let applied = validate_delta(t, &delta, Limits::default());
            if small == 0 {
                prop_assert_eq!(applied.expect_err("zero").code, "zero_delta");
            } else {
                prop_assert_eq!(applied, Ok(small));
            }
        }
    }

    // ---- normalization ----

    #[test]
    fn normalizing_accepted_text_again_changes_nothing(s in text(), which in 0usize..7) {
        if which == 0 {
            if let Ok(t) = validate_reason(&s) {
                check_text("reason", &t, MAX_REASON_CHARS, false)?;
                prop_assert_eq!(validate_reason(&t), Ok(t.clone()));
            }
            return Ok(());
        }
        let (t, field) = match which {
            1..=5 => (DataType::Profile, PROFILE_FIELDS[which - 1].0),
            _ => (DataType::Settings, "theme"),
        };
        let site = SiteId::parse(SITE).unwrap();
        let data = Value::Object(Map::from_iter([(field.to_owned(), Value::from(s))]));
        if let Ok(patch) = validate_push(t, &data, &site, false) {
            check_patch(t, &data, &patch, &site, false)?;
            prop_assert_eq!(validate_push(t, &patch, &site, false), Ok(patch.clone()));
        }
    }

    #[test]
    fn an_accepted_patch_validates_to_itself(
        (t, data) in typed_push(),
        site in site(),
        admin in any::<bool>(),
    ) {
        if let Ok(patch) = validate_push(t, &data, &site, admin) {
            prop_assert_eq!(validate_push(t, &patch, &site, admin), Ok(patch.clone()));
        }
    }

    // ---- merge_patch / validate_record ----

    #[test]
    fn merging_an_accepted_patch_twice_equals_merging_it_once(
        (t, data) in typed_push(),
        site in site(),
        admin in any::<bool>(),
        start in prop_oneof![Just(None), json().prop_map(Some)],
    ) {
        let Ok(patch) = validate_push(t, &data, &site, admin) else { return Ok(()) };
        let mut once = start.unwrap_or_else(|| t.empty_data());
        merge_patch(&mut once, &patch);
        if let Err(r) = validate_record(t, &once) {
            check_refusal(&r)?;
        }
        let mut twice = once.clone();
        merge_patch(&mut twice, &patch);
        prop_assert_eq!(twice, once);
    }

    #[test]
    fn a_record_built_from_accepted_patches_keeps_the_data_rules(
        (t, pushes) in data_type().prop_flat_map(|t| {
            (Just(t), prop::collection::vec(prop_oneof![6 => shaped_data(t), 1 => push_data()], 0..8))
        }),
        site in site(),
        admin in any::<bool>(),
    ) {
        let mut record = t.empty_data();
        check_record(t, &record, &site)?;
        for data in &pushes {
            let Ok(patch) = validate_push(t, data, &site, admin) else { continue };
            // As the hub does: merge, check the whole record, keep the old one if refused.
            let mut next = record.clone();
            merge_patch(&mut next, &patch);
            match validate_record(t, &next) {
                Ok(()) => record = next,
                Err(r) => {
                    check_refusal(&r)?;
                    prop_assert_eq!(t, DataType::Settings);
                    prop_assert!(next.to_string().len() > MAX_SETTINGS_BYTES);
                }
            }
            check_record(t, &record, &site)?;
        }
    }

    #[test]
    fn merge_patch_is_idempotent_and_validate_record_total_for_any_json(
        target in json(),
        patch in json(),
        t in data_type(),
    ) {
        let mut once = target;
        merge_patch(&mut once, &patch);
        let mut twice = once.clone();
        merge_patch(&mut twice, &patch);
        prop_assert_eq!(&twice, &once);
        if let Err(r) = validate_record(t, &once) {
            check_refusal(&r)?;
        }
    }

    // ---- identifiers ----

    #[test]
    fn user_id_accepts_its_alphabet(s in "[A-Za-z0-9._-]{1,64}") {
        if s.bytes().all(|b| b == b'.') {
            prop_assert_eq!(UserId::parse(&s).expect_err("only dots").code, "invalid_user_id");
        } else {
            prop_assert_eq!(UserId::parse(&s).map(|id| id.as_str().to_owned()), Ok(s));
        }
    }

    #[test]
    fn user_id_refuses_a_char_outside_its_alphabet(
        s in "[A-Za-z0-9._-]{0,40}",
        at in any::<Index>(),
        c in any::<char>().prop_filter("outside the alphabet", |c| !is_user_id_char(*c)),
    ) {
        let r = UserId::parse(&insert(&s, at, c)).expect_err("a char outside the alphabet");
        check_refusal(&r)?;
        prop_assert_eq!(r.code, "invalid_user_id");
    }

    #[test]
    fn site_id_accepts_its_alphabet(s in "[a-z0-9_-]{1,32}") {
        prop_assert_eq!(SiteId::parse(&s).map(|id| id.as_str().to_owned()), Ok(s));
    }

    #[test]
    fn site_id_refuses_a_char_outside_its_alphabet(
        s in "[a-z0-9_-]{0,20}",
        at in any::<Index>(),
        c in any::<char>().prop_filter("outside the alphabet", |c| !is_site_id_char(*c)),
    ) {
        let r = SiteId::parse(&insert(&s, at, c)).expect_err("a char outside the alphabet");
        check_refusal(&r)?;
        prop_assert_eq!(r.code, "invalid_site_id");
    }

    #[test]
    fn op_id_accepts_its_alphabet(s in "[!-~]{1,128}") {
        prop_assert_eq!(OpId::parse(&s).map(|id| id.as_str().to_owned()), Ok(s));
    }

    #[test]
    fn op_id_refuses_a_char_outside_its_alphabet(
        s in "[!-~]{0,100}",
        at in any::<Index>(),
        c in any::<char>().prop_filter("outside the alphabet", |c| !('!'..='~').contains(c)),
    ) {
        let r = OpId::parse(&insert(&s, at, c)).expect_err("a char outside the alphabet");
        check_refusal(&r)?;
        prop_assert_eq!(r.code, "invalid_op_id");
    }

    #[test]
    fn id_parsers_accept_exactly_their_documented_language(
        s in prop_oneof![
            "[A-Za-z0-9._-]{0,70}",
            "[!-~]{0,130}",
            "\\.{1,4}",
            ".{0,20}",
        ],
    ) {
        let chars = s.chars().count();
        let user = (1..=64).contains(&chars) && s.chars().all(is_user_id_char) && !s.chars().all(|c| c == '.');
        let site = (1..=32).contains(&chars) && s.chars().all(is_site_id_char);
        let op = (1..=128).contains(&chars) && s.chars().all(|c| ('!'..='~').contains(&c));
        prop_assert_eq!(UserId::parse(&s).is_ok(), user, "user_id {:?}", s);
        prop_assert_eq!(SiteId::parse(&s).is_ok(), site, "site_id {:?}", s);
        prop_assert_eq!(OpId::parse(&s).is_ok(), op, "op_id {:?}", s);
        for r in [UserId::parse(&s).err(), SiteId::parse(&s).err(), OpId::parse(&s).err()].iter().flatten() {
            check_refusal(r)?;
        }
    }
}

fn is_user_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

fn is_site_id_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-')
}

/// `s` with `c` inserted before the character `at` picks.
fn insert(s: &str, at: Index, c: char) -> String {
    let mut chars: Vec<char> = s.chars().collect();
    chars.insert(at.index(chars.len() + 1), c);
    chars.into_iter().collect()
}

/// The generators are not vacuous: each kind of push, the deltas, the parser and the reason
/// are accepted often enough for the properties above to check accepted values at all.
#[test]
fn generators_reach_acceptance() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let site = SiteId::parse(SITE).unwrap();
    let draws = 400;
    let mut sample = |s: &BoxedStrategy<Value>| s.new_tree(&mut runner).expect("a value").current();
    for t in DataType::ALL {
        let data = shaped_data(t);
        let accepted = (0..draws).filter(|_| validate_push(t, &sample(&data), &site, true).is_ok()).count();
        eprintln!("{t}: {accepted} of {draws} pushes accepted");
        assert!(accepted >= draws / 50, "{t}: only {accepted} of {draws} pushes accepted");
    }
    let requests = request_value();
    let parsed =
        (0..draws).filter(|_| PostRequest::parse(sample(&requests).to_string().as_bytes()).is_ok()).count();
    eprintln!("{parsed} of {draws} requests parsed");
    assert!(parsed >= draws / 20, "only {parsed} of {draws} requests parsed");

    let mut runner = TestRunner::deterministic();
    let deltas = delta_map();
    let accepted = (0..draws)
        .filter(|_| {
            validate_delta(
                DataType::Balance,
                &deltas.new_tree(&mut runner).unwrap().current(),
                Limits::default(),
            )
            .is_ok()
        })
        .count();
    eprintln!("{accepted} of {draws} deltas accepted");
    assert!(accepted >= draws / 50, "only {accepted} of {draws} deltas accepted");
    let texts = text();
    let accepted = (0..draws)
        .filter(|_| validate_reason(&texts.new_tree(&mut runner).unwrap().current()).is_ok())
        .count();
    eprintln!("{accepted} of {draws} reasons accepted");
    assert!(accepted >= draws / 10, "only {accepted} of {draws} reasons accepted");
}
