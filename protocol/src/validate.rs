//! The data rules of each record type, applied to a push or delta before anything is
//! stored. A valid push becomes a normalized JSON merge patch; a valid delta becomes a
//! signed integer.

use alloc::{borrow::ToOwned, format, string::String, vec::Vec};

use serde_json::{Map, Value};

use crate::data_type::truncate;
use crate::ids::is_name;
use crate::text::{Lines, acceptable, normalize};
use crate::{DataType, Refusal, SiteId};

/// The largest balance or points value: 2^53 - 1, the largest integer a JavaScript number
/// holds exactly, so every client shows the hub's value to the last coin.
pub const MAX_AMOUNT: i64 = 9_007_199_254_740_991;

/// Most role names one list may hold (global, or one site's).
pub(crate) const MAX_ROLES: usize = 16;
/// Longest role name; role names share the alphabet of site ids (`[a-z0-9_-]`).
pub(crate) const MAX_ROLE_NAME_CHARS: usize = 32;
/// Longest reason of a delta, in characters.
pub(crate) const MAX_REASON_CHARS: usize = 100;
/// Serialized size limit of a settings record.
pub(crate) const MAX_SETTINGS_BYTES: usize = 4096;
/// Longest setting name (`[a-z0-9_]`).
pub(crate) const MAX_SETTING_KEY_CHARS: usize = 40;
/// Longest string value inside settings.
pub(crate) const MAX_SETTING_CHARS: usize = 1000;

/// Rules an operator may tune.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest absolute value one delta may carry; bigger ones are refused as likely bugs.
    pub max_delta: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_delta: 1_000_000_000 }
    }
}

impl Limits {
    /// The rule for a delta's amount, without the message: the code it is refused with
    /// (`zero_delta`, `delta_too_large`), if it is.
    pub fn check_amount(self, change: i64) -> Result<(), &'static str> {
        if change == 0 {
            Err("zero_delta")
        } else if change.unsigned_abs() > self.max_delta.unsigned_abs() {
            Err("delta_too_large")
        } else {
            Ok(())
        }
    }
}

/// Checks the optional `reason` of a delta, kept in the audit ledger.
pub fn validate_reason(reason: &str) -> Result<String, Refusal> {
    normalize("reason", reason, MAX_REASON_CHARS, Lines::Single)
}

/// Whether the hub accepts `reason`: [`validate_reason`]'s rule, without a message (the
/// browser build carries no formatting machinery) or the normalized text (the hub normalizes).
pub fn is_valid_reason(reason: &str) -> bool {
    acceptable(reason, MAX_REASON_CHARS, Lines::Single)
}

/// The one field of a balance-like record: `coins` for balance, `points` for points.
pub fn amount_field(data_type: DataType) -> Option<&'static str> {
    match data_type {
        DataType::Balance => Some("coins"),
        DataType::Points => Some("points"),
        _ => None,
    }
}

/// A field of the profile record: plain text, or `null` to remove it.
pub(crate) struct ProfileField {
    pub(crate) name: &'static str,
    pub(crate) max_chars: usize,
    pub(crate) lines: Lines,
    /// The text must also be an http(s) address, or empty.
    pub(crate) url: bool,
}

pub(crate) const PROFILE_FIELDS: [ProfileField; 5] = [
    ProfileField { name: "display_name", max_chars: 64, lines: Lines::Single, url: false },
    ProfileField { name: "bio", max_chars: 500, lines: Lines::Multi, url: false },
    ProfileField { name: "avatar", max_chars: 16, lines: Lines::Single, url: false },
    ProfileField { name: "location", max_chars: 100, lines: Lines::Single, url: false },
    ProfileField { name: "website", max_chars: 200, lines: Lines::Single, url: true },
];

/// Checks the `data` of a push by `site` and returns the merge patch to apply. `admin` says
/// whether the caller's token carries `adm: true`.
pub fn validate_push(
    data_type: DataType,
    data: &Value,
    site: &SiteId,
    admin: bool,
) -> Result<Value, Refusal> {
    let Value::Object(data) = data else {
        return Err(Refusal::invalid("invalid_data", "data must be a JSON object"));
    };
    if data.is_empty() {
        return Err(Refusal::invalid("invalid_data", "data must set at least one field"));
    }
    let patch = match data_type {
        DataType::Balance | DataType::Points => amount_patch(data_type, data)?,
        DataType::Profile => profile_patch(data)?,
        DataType::Settings => settings_patch(data)?,
        DataType::Roles => roles_patch(data, site, admin)?,
    };
    Ok(Value::Object(patch))
}

/// Checks a whole record after a patch was merged into it: the rules that depend on more
/// than the patch itself.
pub fn validate_record(data_type: DataType, data: &Value) -> Result<(), Refusal> {
    if let Some(field) = amount_field(data_type) {
        // However it came — pushed, imported, summed — an amount stays one every client
        // shows exactly.
        match data.get(field) {
            Some(value) if value.as_i64().is_some_and(|a| a < 0) => {
                return Err(Refusal::invalid("negative_value", format!("{field} cannot be negative")));
            }
            Some(value) if value.as_i64().is_some_and(|a| a <= MAX_AMOUNT) => {}
            Some(value) if value.is_i64() || value.is_u64() => return Err(too_large(field)),
            _ => return Err(Refusal::invalid("invalid_data", format!("{field} must be a whole number"))),
        }
    }
    if data_type == DataType::Settings {
        let size = serde_json::to_string(data).map_or(usize::MAX, |s| s.len());
        if size > MAX_SETTINGS_BYTES {
            return Err(Refusal::invalid(
                "settings_too_large",
                format!("settings would take {size} bytes; at most {MAX_SETTINGS_BYTES} are allowed"),
            ));
        }
    }
    Ok(())
}

/// Checks the `delta` object of a delta request and returns the signed change.
pub fn validate_delta(
    data_type: DataType,
    delta: &Map<String, Value>,
    limits: Limits,
) -> Result<i64, Refusal> {
    let Some(field) = amount_field(data_type) else {
        return Err(Refusal::invalid(
            "invalid_data_type",
            format!("delta applies to balance and points, not {data_type}"),
        ));
    };
    let Some(value) = delta.get(field) else {
        return Err(Refusal::invalid("invalid_data", format!("delta must hold the field {field:?}")));
    };
    if let Some(other) = delta.keys().find(|k| *k != field) {
        return Err(unknown_field(data_type, other));
    }
    let change = integer(field, value)?;
    match limits.check_amount(change) {
        Ok(()) => Ok(change),
        Err(code @ "zero_delta") => Err(Refusal::invalid(code, "a delta of 0 changes nothing")),
        Err(code) => {
            Err(Refusal::invalid(code, format!("|{field}| is at most {} per delta", limits.max_delta)))
        }
    }
}

fn amount_patch(data_type: DataType, data: &Map<String, Value>) -> Result<Map<String, Value>, Refusal> {
    let field = amount_field(data_type).expect("called for balance-like types only");
    if let Some(other) = data.keys().find(|k| *k != field) {
        return Err(unknown_field(data_type, other));
    }
    let amount = integer(field, &data[field])?;
    if amount < 0 {
        return Err(Refusal::invalid("negative_value", format!("{field} cannot be negative")));
    }
    let mut patch = Map::new();
    patch.insert(field.to_owned(), Value::from(amount));
    Ok(patch)
}

/// An integer within ±MAX_AMOUNT; floats (even `10.0`) and bigger numbers are refused.
fn integer(field: &str, value: &Value) -> Result<i64, Refusal> {
    let Value::Number(n) = value else {
        return Err(Refusal::invalid("not_an_integer", format!("{field} must be an integer")));
    };
    match n.as_i64() {
        Some(i) if i.unsigned_abs() <= MAX_AMOUNT.unsigned_abs() => Ok(i),
        Some(_) => Err(too_large(field)),
        None if n.is_u64() => Err(too_large(field)),
        // Integers beyond u64 arrive as floats, all of them whole beyond 2^53.
        None if n.as_f64().is_some_and(|f| f.is_finite() && f.abs() > MAX_AMOUNT as f64) => {
            Err(too_large(field))
        }
        None => Err(Refusal::invalid("not_an_integer", format!("{field} must be an integer, not {n}"))),
    }
}

fn too_large(field: &str) -> Refusal {
    Refusal::invalid("value_too_large", format!("{field} is beyond ±{MAX_AMOUNT}"))
}

fn unknown_field(data_type: DataType, field: &str) -> Refusal {
    Refusal::invalid("unknown_field", format!("{data_type} has no field {:?}", truncate(field)))
}

fn profile_patch(data: &Map<String, Value>) -> Result<Map<String, Value>, Refusal> {
    let mut patch = Map::new();
    for (key, value) in data {
        let Some(field) = PROFILE_FIELDS.iter().find(|f| f.name == key) else {
            return Err(unknown_field(DataType::Profile, key));
        };
        let normalized = match value {
            Value::Null => Value::Null,
            Value::String(s) => {
                let text = normalize(field.name, s, field.max_chars, field.lines)?;
                if field.url { Value::String(website(text)?) } else { Value::String(text) }
            }
            _ => {
                return Err(Refusal::invalid(
                    "invalid_type",
                    format!("profile.{key} must be a string or null"),
                ));
            }
        };
        patch.insert(key.clone(), normalized);
    }
    Ok(patch)
}

/// An empty string, or an absolute http(s) URL with a host and no characters that could
/// break out of an attribute.
fn website(url: String) -> Result<String, Refusal> {
    if url.is_empty() {
        return Ok(url);
    }
    let refuse = || Refusal::invalid("invalid_url", "website must be an http:// or https:// address");
    let lower = url.to_ascii_lowercase();
    let scheme_len = if lower.starts_with("https://") {
        8
    } else if lower.starts_with("http://") {
        7
    } else {
        return Err(refuse());
    };
    let rest = &url[scheme_len..];
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_ok = !host.is_empty()
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    let rest_ok =
        !rest.chars().any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '\\' | '`'));
    if host_ok && rest_ok { Ok(format!("{}{rest}", &lower[..scheme_len])) } else { Err(refuse()) }
}

fn settings_patch(data: &Map<String, Value>) -> Result<Map<String, Value>, Refusal> {
    let mut patch = Map::new();
    for (key, value) in data {
        let key_ok = (1..=MAX_SETTING_KEY_CHARS).contains(&key.len())
            && key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !key_ok {
            return Err(Refusal::invalid(
                "invalid_setting_key",
                format!(
                    "setting name {:?} must be 1-{MAX_SETTING_KEY_CHARS} characters of a-z, 0-9 or '_'",
                    truncate(key)
                ),
            ));
        }
        let normalized = match value {
            Value::String(s) => Value::String(normalize(key, s, MAX_SETTING_CHARS, Lines::Single)?),
            Value::Null | Value::Bool(_) | Value::Number(_) => value.clone(),
            Value::Array(_) | Value::Object(_) => {
                return Err(Refusal::invalid(
                    "invalid_type",
                    format!("setting {key} must be a string, number, boolean or null"),
                ));
            }
        };
        patch.insert(key.clone(), normalized);
    }
    Ok(patch)
}

fn roles_patch(data: &Map<String, Value>, site: &SiteId, admin: bool) -> Result<Map<String, Value>, Refusal> {
    let mut patch = Map::new();
    for (key, value) in data {
        match key.as_str() {
            "global_roles" => {
                if !admin {
                    return Err(Refusal::forbidden(
                        "admin_required",
                        "global_roles can only be written with an admin token",
                    ));
                }
                patch.insert(key.clone(), role_list("global_roles", value)?);
            }
            "site_roles" => {
                let Value::Object(sites) = value else {
                    return Err(Refusal::invalid("invalid_type", "site_roles must be an object"));
                };
                let mut own = Map::new();
                for (site_key, roles) in sites {
                    if site_key != site.as_str() {
                        return Err(Refusal::forbidden(
                            "foreign_site_roles",
                            format!("site {site} may only write site_roles.{site}"),
                        ));
                    }
                    own.insert(site_key.clone(), role_list("site_roles", roles)?);
                }
                patch.insert(key.clone(), Value::Object(own));
            }
            other => return Err(unknown_field(DataType::Roles, other)),
        }
    }
    Ok(patch)
}

/// A list of role names with duplicates dropped, or `null` to clear it.
fn role_list(field: &str, value: &Value) -> Result<Value, Refusal> {
    let Value::Array(items) = value else {
        return if value.is_null() {
            Ok(Value::Array(Vec::new()))
        } else {
            Err(Refusal::invalid("invalid_type", format!("{field} must be a list of role names")))
        };
    };
    let mut roles: Vec<Value> = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Value::String(name) if is_name(name, MAX_ROLE_NAME_CHARS) => {
                if !roles.iter().any(|r| r == item) {
                    roles.push(Value::String(name.clone()));
                }
            }
            _ => {
                return Err(Refusal::invalid(
                    "invalid_role",
                    format!(
                        "{field} holds a role name that is not 1-{MAX_ROLE_NAME_CHARS} characters of a-z, 0-9, '_' or '-'"
                    ),
                ));
            }
        }
    }
    if roles.len() > MAX_ROLES {
        return Err(Refusal::invalid(
            "too_many_roles",
            format!("{field} holds {} roles; at most {MAX_ROLES} are allowed", roles.len()),
        ));
    }
    Ok(Value::Array(roles))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn site() -> SiteId {
        SiteId::parse("roflfaucet").unwrap()
    }

    fn push(t: DataType, data: Value) -> Result<Value, Refusal> {
        validate_push(t, &data, &site(), false)
    }

    fn code(r: Result<Value, Refusal>) -> &'static str {
        r.unwrap_err().code
    }

    #[test]
    fn balance_accepts_non_negative_integers_only() {
        assert_eq!(push(DataType::Balance, json!({"coins": 120})).unwrap(), json!({"coins": 120}));
        assert_eq!(code(push(DataType::Balance, json!({"coins": -1}))), "negative_value");
        assert_eq!(code(push(DataType::Balance, json!({"coins": 1.5}))), "not_an_integer");
        assert_eq!(code(push(DataType::Balance, json!({"coins": 10.0}))), "not_an_integer");
        assert_eq!(code(push(DataType::Balance, json!({"coins": "5"}))), "not_an_integer");
        assert_eq!(code(push(DataType::Balance, json!({"coins": u64::MAX}))), "value_too_large");
        assert_eq!(code(push(DataType::Balance, json!({"coins": MAX_AMOUNT + 1}))), "value_too_large");
        let huge: Value = serde_json::from_str(r#"{"coins": 18446744073709551616}"#).unwrap();
        assert_eq!(code(push(DataType::Balance, huge)), "value_too_large");
        assert_eq!(code(push(DataType::Balance, json!({"coins": 1, "points": 2}))), "unknown_field");
        assert_eq!(code(push(DataType::Points, json!({"coins": 1}))), "unknown_field");
        assert_eq!(code(push(DataType::Balance, json!([1]))), "invalid_data");
    }

    #[test]
    fn profile_fields_are_normalized_and_bounded() {
        let patch = push(
            DataType::Profile,
            json!({"display_name": " Evans ", "bio": null, "website": "HTTPS://example.org/x"}),
        )
        .unwrap();
        assert_eq!(patch, json!({"display_name": "Evans", "bio": null, "website": "https://example.org/x"}));
        assert_eq!(code(push(DataType::Profile, json!({"email": "x@y"}))), "unknown_field");
        assert_eq!(code(push(DataType::Profile, json!({"bio": 5}))), "invalid_type");
        assert_eq!(code(push(DataType::Profile, json!({"avatar": "x".repeat(17)}))), "text_too_long");
    }

    #[test]
    fn websites_must_be_http_urls() {
        for bad in [
            "javascript:alert(1)",
            "JaVaScRiPt:alert(1)",
            "data:text/html,x",
            "http://",
            "https://a b",
            "//x.org",
            "http://x.org/\"onmouseover=\"",
        ] {
            assert_eq!(code(push(DataType::Profile, json!({"website": bad}))), "invalid_url", "{bad}");
        }
        assert!(push(DataType::Profile, json!({"website": ""})).is_ok());
        assert!(push(DataType::Profile, json!({"website": "http://[::1]:8080/a?b#c"})).is_ok());
    }

    #[test]
    fn settings_are_flat_scalars_with_named_keys() {
        assert!(
            push(DataType::Settings, json!({"theme": "dark", "sound": false, "volume": 0.5, "old": null}))
                .is_ok()
        );
        assert_eq!(code(push(DataType::Settings, json!({"Theme": 1}))), "invalid_setting_key");
        assert_eq!(code(push(DataType::Settings, json!({"nested": {"a": 1}}))), "invalid_type");
        let big = json!({"a": "x".repeat(1000), "b": "x".repeat(1000), "c": "x".repeat(1000), "d": "x".repeat(1000), "e": "x".repeat(200)});
        assert_eq!(validate_record(DataType::Settings, &big).unwrap_err().code, "settings_too_large");
    }

    #[test]
    fn a_site_writes_only_its_own_site_roles() {
        assert_eq!(
            push(DataType::Roles, json!({"site_roles": {"roflfaucet": ["recipient", "recipient"]}})).unwrap(),
            json!({"site_roles": {"roflfaucet": ["recipient"]}})
        );
        let other = push(DataType::Roles, json!({"site_roles": {"wrc": ["admin"]}})).unwrap_err();
        assert_eq!((other.kind, other.code), (crate::RefusalKind::Forbidden, "foreign_site_roles"));
        let global = push(DataType::Roles, json!({"global_roles": ["verified"]})).unwrap_err();
        assert_eq!((global.kind, global.code), (crate::RefusalKind::Forbidden, "admin_required"));
        assert!(
            validate_push(DataType::Roles, &json!({"global_roles": ["verified"]}), &site(), true).is_ok()
        );
        assert_eq!(
            code(push(DataType::Roles, json!({"site_roles": {"roflfaucet": ["Admin"]}}))),
            "invalid_role"
        );
        let many: Vec<String> = (0..17).map(|i| format!("r{i}")).collect();
        assert_eq!(
            code(push(DataType::Roles, json!({"site_roles": {"roflfaucet": many}}))),
            "too_many_roles"
        );
    }

    #[test]
    fn deltas_are_bounded_non_zero_integers_on_balance_like_types() {
        let limits = Limits::default();
        let delta = |t, v: Value| validate_delta(t, v.as_object().unwrap(), limits);
        assert_eq!(delta(DataType::Balance, json!({"coins": -10})).unwrap(), -10);
        assert_eq!(delta(DataType::Points, json!({"points": 3})).unwrap(), 3);
        assert_eq!(delta(DataType::Balance, json!({"coins": 0})).unwrap_err().code, "zero_delta");
        assert_eq!(delta(DataType::Balance, json!({"coins": 0.5})).unwrap_err().code, "not_an_integer");
        assert_eq!(
            delta(DataType::Balance, json!({"coins": 2_000_000_000})).unwrap_err().code,
            "delta_too_large"
        );
        assert_eq!(delta(DataType::Balance, json!({"points": 1})).unwrap_err().code, "invalid_data");
        assert_eq!(delta(DataType::Profile, json!({"coins": 1})).unwrap_err().code, "invalid_data_type");
    }

    #[test]
    fn a_reason_is_judged_by_one_rule_with_or_without_a_message() {
        for reason in
            ["game", " claim\t", "a\u{202E}b", "", &"é".repeat(100), &format!(" {} ", "x".repeat(100))]
        {
            assert!(is_valid_reason(reason), "{reason:?}");
            assert!(validate_reason(reason).is_ok(), "{reason:?}");
        }
        for reason in ["a\nb", "\u{7}", &"x".repeat(101)] {
            assert!(!is_valid_reason(reason), "{reason:?}");
            assert!(validate_reason(reason).is_err(), "{reason:?}");
        }
    }
}
