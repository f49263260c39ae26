//! Every rule of the sync API: who may read and write which record, how each data type
//! merges, versions, deltas and their exactly-once guarantee. Sees storage only through
//! [`Store`]; knows nothing about HTTP.

use std::sync::Arc;

use protocol::{
    DataType, DeltaRequest, Limits, MAX_AMOUNT, OpId, PushRequest, Refusal, SiteId, UserId, amount_field,
    merge_patch, validate_delta, validate_push, validate_record,
};
use serde_json::{Value, json};

use crate::store::{
    Change, LedgerEntry, Mutation, OpKey, Record, Stamp, Store, StoreError, Write, WriteOutcome,
};
use crate::time::rfc3339_ms;

/// Who is asking: taken from a verified token (or, with auth off, from the request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub site: SiteId,
    pub user: UserId,
    /// Admin tokens may write `global_roles`.
    pub admin: bool,
}

/// Why the domain refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("{0}")]
    Refused(Refusal),
    #[error("the record is at version {}, not the base_version given", .0.version)]
    VersionConflict(Record),
    #[error("the balance would go below zero")]
    InsufficientFunds(Record),
    #[error("this op_id was already used for a different request")]
    OpIdReused,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<Refusal> for DomainError {
    fn from(r: Refusal) -> Self {
        DomainError::Refused(r)
    }
}

/// The result of an accepted write.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub data_type: DataType,
    pub record: Record,
    /// True when the op id was seen before and this is the first answer again.
    pub replayed: bool,
}

/// The site id the ledger names for balances brought in by `hub import`.
pub const IMPORT_SITE: &str = "import";

/// The sync API's rules over a store.
#[derive(Clone)]
pub struct Domain {
    store: Arc<dyn Store>,
    limits: Limits,
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain").field("epoch", &self.store.epoch()).field("limits", &self.limits).finish()
    }
}

impl Domain {
    pub fn new(store: Arc<dyn Store>, limits: Limits) -> Domain {
        Domain { store, limits }
    }

    pub fn epoch(&self) -> &str {
        self.store.epoch()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Versions of the caller's records (`action=timestamp`).
    pub async fn stamps(
        &self,
        caller: &Caller,
        user: &UserId,
        types: &[DataType],
    ) -> Result<Vec<Stamp>, DomainError> {
        authorize_user(caller, user)?;
        Ok(self.store.stamps(user, types).await?)
    }

    /// The caller's records (`action=get`).
    pub async fn records(
        &self,
        caller: &Caller,
        user: &UserId,
        types: &[DataType],
    ) -> Result<Vec<Record>, DomainError> {
        authorize_user(caller, user)?;
        Ok(self.store.records(user, types).await?)
    }

    /// `action=push`: merge a patch into a record (profile, settings, roles) or set an
    /// amount (balance, points), optionally only if the record is still at `base_version`.
    pub async fn push(&self, caller: &Caller, req: PushRequest) -> Result<Written, DomainError> {
        let (user, site) = authorize_write(caller, &req.user_id, &req.site_id)?;
        let data_type = DataType::parse(&req.data_type)?;
        let patch = validate_push(data_type, &req.data, &site, caller.admin)?;
        let op = req.op_id.as_deref().map(OpId::parse).transpose()?;
        let base_version = req.base_version;
        let op = op.map(|op_id| OpKey {
            op_id,
            fingerprint: json!(["push", data_type, site.as_str(), patch, base_version]).to_string(),
        });
        let mutation: Mutation = Box::new(move |current: &Record| {
            if base_version.is_some_and(|base| base != current.version) {
                return Err(DomainError::VersionConflict(current.clone()));
            }
            let mut data = current.data.clone();
            merge_patch(&mut data, &patch);
            validate_record(data_type, &data)?;
            let ledger = amount_field(data_type).and_then(|field| {
                let (old, new) = (amount(&current.data, field), amount(&data, field));
                (old != new).then(|| LedgerEntry {
                    delta: new - old,
                    result: new,
                    reason: Some("push".into()),
                })
            });
            Ok(Change { data, ledger })
        });
        self.write(Write { user, data_type, site, op, mutation }).await
    }

    /// `action=delta`: add a signed amount to balance or points atomically, exactly once
    /// per `op_id`, never below zero.
    pub async fn delta(&self, caller: &Caller, req: DeltaRequest) -> Result<Written, DomainError> {
        let (user, site) = authorize_write(caller, &req.user_id, &req.site_id)?;
        let data_type = DataType::parse(&req.data_type)?;
        let change = validate_delta(data_type, &req.delta, self.limits)?;
        let op_id = OpId::parse(&req.op_id)?;
        let reason = req.reason.as_deref().map(protocol::validate_reason).transpose()?;
        let field = amount_field(data_type).expect("validate_delta accepts balance-like types only");
        let op = Some(OpKey {
            op_id,
            fingerprint: json!(["delta", data_type, site.as_str(), change, reason]).to_string(),
        });
        let mutation: Mutation = Box::new(move |current: &Record| {
            let result = amount(&current.data, field) + change;
            if result < 0 {
                return Err(DomainError::InsufficientFunds(current.clone()));
            }
            if result > MAX_AMOUNT {
                return Err(Refusal::invalid(
                    "value_too_large",
                    format!("{field} would exceed {MAX_AMOUNT}"),
                )
                .into());
            }
            let mut data = current.data.clone();
            data[field] = Value::from(result);
            Ok(Change { data, ledger: Some(LedgerEntry { delta: change, result, reason }) })
        });
        self.write(Write { user, data_type, site, op, mutation }).await
    }

    /// `hub import`: gives `user` the balance a site kept before the hub existed, written as
    /// site [`IMPORT_SITE`] with a ledger row. Only a balance that was never written is set:
    /// once the user has one (from an earlier import or from the sites), the import is
    /// refused with `VersionConflict`, so importing twice changes nothing and an import
    /// never overwrites what the sites have done since.
    pub async fn import_balance(&self, user: UserId, coins: i64) -> Result<Written, DomainError> {
        let data = json!({ "coins": coins });
        validate_record(DataType::Balance, &data)?;
        let site = SiteId::parse(IMPORT_SITE)?;
        let mutation: Mutation = Box::new(move |current: &Record| {
            if current.version != 0 {
                return Err(DomainError::VersionConflict(current.clone()));
            }
            let ledger = Some(LedgerEntry { delta: coins, result: coins, reason: Some("import".into()) });
            Ok(Change { data, ledger })
        });
        self.write(Write { user, data_type: DataType::Balance, site, op: None, mutation }).await
    }

    /// The balance `user` already has, which [`Domain::import_balance`] would keep; `None`
    /// when an import would set it.
    pub async fn balance_kept_by_import(&self, user: &UserId) -> Result<Option<Record>, DomainError> {
        let record = self.store.records(user, &[DataType::Balance]).await?.remove(0);
        Ok((record.version != 0).then_some(record))
    }

    async fn write(&self, write: Write) -> Result<Written, DomainError> {
        let (data_type, user, site) = (write.data_type, write.user.clone(), write.site.clone());
        match self.store.write(write).await? {
            WriteOutcome::Applied(record) => {
                if let Some(ms) = record.updated_ms {
                    tracing::info!(
                        "[SYNC] User {user}: {data_type} updated by {site} at {} (v{})",
                        rfc3339_ms(ms),
                        record.version
                    );
                }
                Ok(Written { data_type, record, replayed: false })
            }
            WriteOutcome::Replayed(record) => {
                tracing::info!(
                    "[SYNC] User {user}: {data_type} op replayed for {site} (v{})",
                    record.version
                );
                Ok(Written { data_type, record, replayed: true })
            }
            WriteOutcome::OpIdReused => Err(DomainError::OpIdReused),
            WriteOutcome::Rejected(e) => Err(e),
        }
    }
}

/// A balance-like record's amount; records only ever hold integers here.
fn amount(data: &Value, field: &str) -> i64 {
    data.get(field).and_then(Value::as_i64).unwrap_or(0)
}

fn authorize_user(caller: &Caller, user: &UserId) -> Result<(), Refusal> {
    if &caller.user == user {
        Ok(())
    } else {
        Err(Refusal::forbidden("wrong_user", "the token does not speak for this user_id"))
    }
}

fn authorize_write(caller: &Caller, user_id: &str, site_id: &str) -> Result<(UserId, SiteId), Refusal> {
    let user = UserId::parse(user_id)?;
    let site = SiteId::parse(site_id)?;
    authorize_user(caller, &user)?;
    if site != caller.site {
        return Err(Refusal::forbidden("wrong_site", "site_id must be the site that issued the token"));
    }
    Ok((user, site))
}
