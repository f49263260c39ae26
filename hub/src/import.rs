//! `hub import`: brings the balances a site kept in per-user files — the seed's
//! `<user_id>.json`, holding `coins` (or `balance`) and perhaps `last_updated` — into the hub.
//!
//! Every file is read and checked first; a file that cannot be used is refused with its name
//! and the reason, and nothing of it is written. Each usable file then goes through the
//! domain's [`Domain::import_balance`], which sets only a balance that was never written: a
//! second run, or a run after the sites have moved a balance, changes nothing. A balance of 0
//! is written like any other (version 1, with its ledger row). An amount written as text of
//! digits (`"40"`, as PHP writes a number it read from a database, or `"40\n"`, one it read
//! from a file with `fgets`: spaces and line breaks around the digits are allowed) is taken
//! as that number and the report says so; other text (`"+40"`, `"4e1"`, `"40.0"`, `""`) is
//! refused. The file's `last_updated` is not kept: the hub stamps records with its own clock.
//! Subfolders and files not named `*.json` are left alone.
//!
//! An import opens the store and the domain over it ([`open`]) and nothing else of the hub:
//! no site, key, certificate or metrics token is read, so it runs from an operator's shell
//! that lacks the hub's secrets.

use std::path::Path;

use anyhow::Context;
use hub_agent::balance_file;
use protocol::UserId;
use serde_json::Value;

use crate::config::Config;
use crate::domain::{Domain, DomainError};
use crate::store::{Rejection, StoreMetrics};

/// A file that holds a balance the hub can take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    pub file: String,
    pub user: UserId,
    /// 0 too: a balance of 0 is written like any other, so that the user has a balance and a
    /// later import or agent keeps it.
    pub coins: i64,
    /// The amount as the file wrote it, when it was text of digits (`"40"`, `"40\n"`): taken
    /// as that number, and the report says so.
    pub text: Option<String>,
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

/// The domain over the store `config` names, for an import: the settings that decide how
/// records are kept are checked, and nothing else is read.
pub fn open(config: &Config) -> anyhow::Result<Domain> {
    config.validate_records()?;
    let store = crate::store::open(
        &config.store,
        &config.data_dir,
        config.limits.op_retention(),
        StoreMetrics::default(),
    )?;
    Ok(Domain::new(store, protocol::Limits { max_delta: config.limits.max_delta }))
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
        match read.and_then(|bytes| balance_file::parse(&file, &bytes)) {
            Ok(balance_file::Balance { user, coins, text }) => {
                scan.balances.push(Balance { file, user, coins, text });
            }
            Err(reason) => scan.refused.push(Refused { file, reason }),
        }
    }
    Ok(scan)
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
            Err(DomainError::Rejected(Rejection::VersionConflict(record))) => {
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
