//! A site's per-user balance file, as the seed's PHP sites keep them: `<user_id>.json`
//! holding `coins` (or `balance`, or both when they agree) and perhaps `last_updated`.
//! `hub agent` and `hub import` read files alike through [`parse`]. Reads bytes it is given:
//! opening files and deciding which to read is the caller's.

use protocol::{DataType, UserId};
use serde_json::{Value, json};

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
