//! A site's per-user balance file, as the seed's PHP sites keep them: `<user_id>.json`
//! holding `coins` (or `balance`, or both when they agree) and perhaps `last_updated`.
//! `hub agent` and `hub import` read files alike through [`parse`]; `hub agent` makes a
//! file's new content with [`rewrite`]. Reads bytes it is given and returns bytes: opening,
//! writing and deciding which files to touch is the caller's.

use protocol::{DataType, UserId};
use serde::Serialize;
use serde_json::ser::PrettyFormatter;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

/// What a balance file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    pub user: UserId,
    pub coins: i64,
    /// The amount as the file wrote it, when it wrote it as text (`"40"`, or `"40\n"`), as PHP
    /// writes a number it read from a database or a file: read as that number, and noted so
    /// that `hub import` says so.
    pub text: Option<String>,
}

/// The user and the coins of the balance file named `file` that holds `bytes`, or why they
/// cannot be had. `last_updated` is checked for its type and otherwise not kept: the hub
/// stamps records with its own clock.
pub fn parse(file: &str, bytes: &[u8]) -> Result<Balance, String> {
    let stem = file.strip_suffix(".json").unwrap_or(file);
    let user = UserId::parse(stem).map_err(|e| format!("the file name is not a user id: {}", e.message))?;
    let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let object = value.as_object().ok_or("not a JSON object")?;
    let amount = |key: &str| object.get(key).map(|v| whole_number(key, v)).transpose();
    let (coins, text) = match (amount("coins")?, amount("balance")?) {
        (Some((coins, _)), Some((balance, _))) if coins != balance => {
            return Err(format!("coins ({coins}) and balance ({balance}) disagree"));
        }
        (Some((coins, text)), balance) => (coins, text.or(balance.and_then(|(_, text)| text))),
        (None, Some(balance)) => balance,
        (None, None) => return Err("holds neither coins nor balance".into()),
    };
    match object.get("last_updated") {
        None | Some(Value::Null | Value::String(_) | Value::Number(_)) => {}
        Some(_) => return Err("last_updated is neither a time text nor a number".into()),
    }
    protocol::validate_record(DataType::Balance, &json!({ "coins": coins })).map_err(|e| e.message)?;
    Ok(Balance { user, coins, text })
}

/// The content of a balance file that held `bytes` (a balance [`parse`] accepts) once it
/// shows `coins`, written at `now`: every other key is kept; `coins` and `balance` are both
/// set where the file has them, each as a number or as text as the file wrote it;
/// `last_updated` is set to `now` as the file wrote it — unix seconds when it was a number,
/// RFC 3339 when it was such a text, and otherwise, or when the file had none, as the seed's
/// PHP writes it (`date('Y-m-d H:i:s')`, in UTC). A file written on several lines is
/// written on several lines, indented as PHP's `JSON_PRETTY_PRINT` indents; a final line
/// break is kept. The keys come out in alphabetical order.
pub fn rewrite(bytes: &[u8], coins: i64, now: OffsetDateTime) -> Result<Vec<u8>, String> {
    let mut value: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let object = value.as_object_mut().ok_or("not a JSON object")?;
    if !object.contains_key("coins") && !object.contains_key("balance") {
        return Err("holds neither coins nor balance".into());
    }
    for key in ["coins", "balance"] {
        if let Some(amount) = object.get_mut(key) {
            *amount = match amount {
                Value::String(_) => Value::String(coins.to_string()),
                _ => Value::from(coins),
            };
        }
    }
    let now = now.to_offset(time::UtcOffset::UTC);
    let stamp = match object.get("last_updated") {
        Some(Value::Number(_)) => Value::from(now.unix_timestamp()),
        Some(Value::String(text)) if OffsetDateTime::parse(text, &Rfc3339).is_ok() => {
            let rfc3339 =
                format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
            Value::String(now.format(rfc3339).map_err(|e| e.to_string())?)
        }
        _ => {
            let php = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
            Value::String(now.format(php).map_err(|e| e.to_string())?)
        }
    };
    object.insert("last_updated".to_owned(), stamp);
    let text = String::from_utf8_lossy(bytes);
    let mut out = Vec::with_capacity(bytes.len() + 32);
    if text.trim_end().contains('\n') {
        let mut serializer =
            serde_json::Serializer::with_formatter(&mut out, PrettyFormatter::with_indent(b"    "));
        value.serialize(&mut serializer).map_err(|e| e.to_string())?;
    } else {
        serde_json::to_writer(&mut out, &value).map_err(|e| e.to_string())?;
    }
    if text.ends_with('\n') {
        out.push(b'\n');
    }
    Ok(out)
}

/// A whole number of at least 0, written as a JSON number, or as text of decimal digits with
/// nothing but ASCII whitespace around them (PHP writes a number it read from a database as
/// text, and one read from a file with `fgets` keeps its line break): the number, and the
/// text it was written as. Text that is anything else (`"1e3"`, `"+5"`, `"5.0"`, `""`) is
/// refused rather than guessed at.
fn whole_number(key: &str, value: &Value) -> Result<(i64, Option<String>), String> {
    match value {
        Value::Number(n) => n
            .as_i64()
            .filter(|n| *n >= 0)
            .map(|n| (n, None))
            .ok_or_else(|| format!("{key} is not a whole number of at least 0: {value}")),
        Value::String(text) => match text.trim_ascii() {
            digits if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => digits
                .parse::<i64>()
                .map(|n| (n, Some(text.clone())))
                .map_err(|_| format!("{key} is the text {value}, a number too large")),
            _ => Err(format!(
                "{key} is the text {value}, which is not a whole number written in digits only (spaces \
                 or line breaks around them aside); write it as a JSON number"
            )),
        },
        _ => Err(format!("{key} is not a whole number of at least 0: {value}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_shapes_are_read() {
        let balance = |user: &str, coins: i64, text: Option<&str>| {
            Ok(Balance { user: UserId::parse(user).unwrap(), coins, text: text.map(str::to_owned) })
        };
        assert_eq!(parse("8-evans.json", br#"{"coins": 150}"#), balance("8-evans", 150, None));
        assert_eq!(
            parse("a.json", br#"{"balance": "40", "last_updated": "2025-11-09 18:45:30"}"#),
            balance("a", 40, Some("40"))
        );
        assert_eq!(
            parse("b.json", br#"{"coins": 7, "balance": 7, "last_updated": 1762713930}"#),
            balance("b", 7, None)
        );
        assert_eq!(parse("c.json", br#"{"coins": 7, "balance": "007"}"#), balance("c", 7, Some("007")));
        // As PHP writes an amount it read from a file with fgets, line break and all.
        assert_eq!(parse("d.json", br#"{"coins": "100\n"}"#), balance("d", 100, Some("100\n")));
        assert_eq!(parse("e.json", br#"{"balance": " 100 "}"#), balance("e", 100, Some(" 100 ")));
        assert_eq!(parse("f.json", br#"{"coins": "\t7\r\n"}"#), balance("f", 7, Some("\t7\r\n")));
        assert_eq!(parse("z.json", br#"{"coins": 0}"#), balance("z", 0, None));
    }

    fn at(unix: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(unix).unwrap() + time::Duration::milliseconds(250)
    }

    fn rewritten(before: &str, coins: i64) -> String {
        String::from_utf8(rewrite(before.as_bytes(), coins, at(1_762_713_930)).unwrap()).unwrap()
    }

    #[test]
    fn a_rewrite_sets_the_amounts_and_the_time_and_keeps_every_other_key() {
        assert_eq!(
            rewritten(r#"{"coins": 150, "last_updated": "2025-11-09 18:45:30", "streak": [1, 2]}"#, 40),
            r#"{"coins":40,"last_updated":"2025-11-09 18:45:30","streak":[1,2]}"#
        );
        assert_eq!(
            rewritten(r#"{"balance": "40", "coins": 40, "name": "Evans"}"#, 7),
            r#"{"balance":"7","coins":7,"last_updated":"2025-11-09 18:45:30","name":"Evans"}"#
        );
        assert_eq!(
            rewritten(r#"{"coins": "100\n", "last_updated": 5}"#, 8),
            r#"{"coins":"8","last_updated":1762713930}"#
        );
        assert_eq!(
            rewritten(r#"{"coins": 1, "last_updated": "2025-11-09T18:45:30Z"}"#, 2),
            r#"{"coins":2,"last_updated":"2025-11-09T18:45:30.250Z"}"#
        );
        let after = rewritten("{\n    \"coins\": 1\n}\n", 3);
        assert_eq!(after, "{\n    \"coins\": 3,\n    \"last_updated\": \"2025-11-09 18:45:30\"\n}\n");
        assert_eq!(parse("u.json", after.as_bytes()).unwrap().coins, 3);
    }

    #[test]
    fn a_file_that_is_no_balance_is_not_rewritten() {
        for body in ["{coins", "[1]", r#"{"name": "x"}"#] {
            assert!(rewrite(body.as_bytes(), 1, at(0)).is_err(), "{body}");
        }
    }

    #[test]
    fn unusable_files_are_refused_with_a_reason() {
        for (file, body, reason) in [
            ("bad name.json", r#"{"coins": 1}"#, "not a user id"),
            ("u.json", "{coins: 1}", "not JSON"),
            ("u.json", "[1]", "not a JSON object"),
            ("u.json", r#"{"coins": -5}"#, "at least 0"),
            ("u.json", r#"{"coins": 1.5}"#, "whole number"),
            ("u.json", r#"{"coins": "1e3"}"#, "not a whole number written in digits only"),
            ("u.json", r#"{"coins": "+5"}"#, "not a whole number written in digits only"),
            ("u.json", r#"{"coins": "-5"}"#, "not a whole number written in digits only"),
            ("u.json", r#"{"coins": ""}"#, "not a whole number written in digits only"),
            ("u.json", r#"{"coins": " \n"}"#, "not a whole number written in digits only"),
            ("u.json", r#"{"coins": "10.5"}"#, "not a whole number written in digits only"),
            ("u.json", r#"{"coins": "1 000"}"#, "not a whole number written in digits only"),
            ("u.json", r#"{"coins": " +5\n"}"#, "not a whole number written in digits only"),
            ("u.json", "{\"coins\": \"\u{a0}5\"}", "not a whole number written in digits only"),
            ("u.json", r#"{"coins": "99999999999999999999"}"#, "too large"),
            ("u.json", r#"{"coins": "9007199254740992"}"#, "beyond"),
            ("u.json", r#"{"coins": true}"#, "whole number"),
            ("u.json", r#"{"coins": 1, "balance": 2}"#, "disagree"),
            ("u.json", r#"{"last_updated": "today"}"#, "neither coins nor balance"),
            ("u.json", r#"{"coins": 1, "last_updated": {}}"#, "last_updated"),
        ] {
            let refused = parse(file, body.as_bytes()).unwrap_err();
            assert!(refused.contains(reason), "{file} {body}: {refused}");
        }
    }
}
