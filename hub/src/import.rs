//! `hub import`: brings the balances a site kept in per-user files — the seed's
//! `<user_id>.json`, holding `coins` (or `balance`) and perhaps `last_updated` — into the hub.
//!
//! Every file is read and checked first; a file that cannot be used is refused with its name
//! and the reason, and nothing of it is written. Each usable file then goes through the
//! domain's [`Domain::import_balance`], which sets only a balance that was never written: a
//! second run, or a run after the sites have moved a balance, changes nothing. The file's
//! `last_updated` is not kept: the hub stamps records with its own clock. Subfolders and files
//! not named `*.json` are left alone.

use std::path::Path;

use anyhow::Context;
use protocol::{DataType, UserId};
use serde_json::{Value, json};

use crate::domain::{Domain, DomainError};

/// A file that holds a balance the hub can take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    pub file: String,
    pub user: UserId,
    pub coins: i64,
}

/// A file that cannot be imported, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub file: String,
    pub reason: String,
}

/// What a folder holds, in file-name order.
#[derive(Debug, Default)]
pub struct Scan {
    pub balances: Vec<Balance>,
    pub refused: Vec<Refused>,
}

/// What became of one balance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Imported,
    /// The user already had a balance at this version; it stays as it was.
    AlreadyHad {
        version: u64,
        coins: i64,
    },
}

/// Reads every `*.json` file of `dir`.
pub fn scan(dir: &Path) -> anyhow::Result<Scan> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file() && name.ends_with(".json") {
            names.push(name);
        }
    }
    names.sort();
    let mut scan = Scan::default();
    for file in names {
        let read = std::fs::read(dir.join(&file)).map_err(|e| format!("cannot be read: {e}"));
        match read.and_then(|bytes| parse(&file, &bytes)) {
            Ok((user, coins)) => scan.balances.push(Balance { file, user, coins }),
            Err(reason) => scan.refused.push(Refused { file, reason }),
        }
    }
    Ok(scan)
}

/// The user and the coins of the balance file named `file` that holds `bytes`, or why they
/// cannot be had. `hub import` and `hub agent` read files alike through it.
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

/// What each balance would meet in the hub now, without writing anything.
pub async fn preview(domain: &Domain, balances: &[Balance]) -> anyhow::Result<Vec<Outcome>> {
    let mut outcomes = Vec::with_capacity(balances.len());
    for balance in balances {
        outcomes.push(match domain.balance_kept_by_import(&balance.user).await? {
            None => Outcome::Imported,
            Some(record) => Outcome::AlreadyHad { version: record.version, coins: coins_of(&record.data) },
        });
    }
    Ok(outcomes)
}

/// Writes each balance the hub does not have yet.
pub async fn apply(domain: &Domain, balances: &[Balance]) -> anyhow::Result<Vec<Outcome>> {
    let mut outcomes = Vec::with_capacity(balances.len());
    for balance in balances {
        outcomes.push(match domain.import_balance(balance.user.clone(), balance.coins).await {
            Ok(_) => Outcome::Imported,
            Err(DomainError::VersionConflict(record)) => {
                Outcome::AlreadyHad { version: record.version, coins: coins_of(&record.data) }
            }
            Err(e) => return Err(anyhow::anyhow!("importing {} failed: {e}", balance.file)),
        });
    }
    Ok(outcomes)
}

fn coins_of(data: &Value) -> i64 {
    data.get("coins").and_then(Value::as_i64).unwrap_or(0)
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
