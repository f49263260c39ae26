//! A site's per-user balance file, as the seed's PHP sites keep them: `<user_id>.json`
//! holding `coins` (or `balance`, or both when they agree) and perhaps `last_updated`.
//! `hub agent` and `hub import` read files alike through [`parse`]. Reads bytes it is given:
//! opening files and deciding which to read is the caller's.

use protocol::{DataType, UserId};
use serde_json::{Value, json};

/// The user and the coins of the balance file named `file` that holds `bytes`, or why they
/// cannot be had. `last_updated` is checked for its type and otherwise not kept: the hub
/// stamps records with its own clock.
pub fn parse(file: &str, bytes: &[u8]) -> Result<(UserId, i64), String> {
    let stem = file.strip_suffix(".json").unwrap_or(file);
    let user = UserId::parse(stem).map_err(|e| format!("the file name is not a user id: {}", e.message))?;
    let value: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let object = value.as_object().ok_or("not a JSON object")?;
    let amount = |key: &str| object.get(key).map(|v| whole_number(key, v)).transpose();
    let coins = match (amount("coins")?, amount("balance")?) {
        (Some(coins), Some(balance)) if coins != balance => {
            return Err(format!("coins ({coins}) and balance ({balance}) disagree"));
        }
        (Some(coins), _) | (None, Some(coins)) => coins,
        (None, None) => return Err("holds neither coins nor balance".into()),
    };
    match object.get("last_updated") {
        None | Some(Value::Null | Value::String(_) | Value::Number(_)) => {}
        Some(_) => return Err("last_updated is neither a time text nor a number".into()),
    }
    protocol::validate_record(DataType::Balance, &json!({ "coins": coins })).map_err(|e| e.message)?;
    Ok((user, coins))
}

/// A whole number of at least 0, written as a JSON number or as text (PHP often writes
/// numbers as text).
fn whole_number(key: &str, value: &Value) -> Result<i64, String> {
    let number = match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    number.filter(|n| *n >= 0).ok_or_else(|| format!("{key} is not a whole number of at least 0: {value}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_shapes_are_read() {
        let user = |s: &str| UserId::parse(s).unwrap();
        assert_eq!(parse("8-evans.json", br#"{"coins": 150}"#), Ok((user("8-evans"), 150)));
        assert_eq!(
            parse("a.json", br#"{"balance": "40", "last_updated": "2025-11-09 18:45:30"}"#),
            Ok((user("a"), 40))
        );
        assert_eq!(
            parse("b.json", br#"{"coins": 7, "balance": 7, "last_updated": 1762713930}"#),
            Ok((user("b"), 7))
        );
    }

    #[test]
    fn unusable_files_are_refused_with_a_reason() {
        for (file, body, reason) in [
            ("bad name.json", r#"{"coins": 1}"#, "not a user id"),
            ("u.json", "{coins: 1}", "not JSON"),
            ("u.json", "[1]", "not a JSON object"),
            ("u.json", r#"{"coins": -5}"#, "at least 0"),
            ("u.json", r#"{"coins": 1.5}"#, "whole number"),
            ("u.json", r#"{"coins": 1, "balance": 2}"#, "disagree"),
            ("u.json", r#"{"last_updated": "today"}"#, "neither coins nor balance"),
            ("u.json", r#"{"coins": 1, "last_updated": {}}"#, "last_updated"),
        ] {
            let refused = parse(file, body.as_bytes()).unwrap_err();
            assert!(refused.contains(reason), "{file} {body}: {refused}");
        }
    }
}
