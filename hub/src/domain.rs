//! Every rule of the sync API: who may read and write which record, how each data type
//! merges, versions, deltas and their exactly-once guarantee. Sees storage only through
//! [`Store`]; knows nothing about HTTP.

use std::sync::Arc;

use protocol::{
    DataType, DeltaRequest, Limits, MAX_AMOUNT, OpId, PushRequest, Refusal, Scope, Scopes, SiteId, UserId,
    amount_field, merge_patch, validate_delta, validate_push, validate_record,
};
use serde_json::{Value, json};

use crate::config::IMPORT_SITE;
use crate::store::{
    Change, Credits, Current, FeedChange, FeedPosition, LedgerEntry, Mutation, OpKey, Record, Rejection,
    Stamp, Store, StoreError, Write, WriteOutcome,
};
use crate::time::rfc3339_ms;

/// Who is asking: taken from a verified token (or, with auth off, from the request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub site: SiteId,
    pub user: UserId,
    /// Admin tokens may write `global_roles`.
    pub admin: bool,
    /// What the token may do.
    pub scopes: Scopes,
    /// The token's site's credit ceilings: every credit its key signs counts against them.
    pub ceilings: Ceilings,
    /// When the token expires, in seconds since the Unix epoch; `None` with auth off.
    pub expires: Option<u64>,
}

/// How much a site's key may credit, so that even a stolen key cannot mint without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ceilings {
    /// Largest credit of one op (a positive delta, or a set's raise).
    pub per_op: i64,
    /// Most one user's amount may be credited by the site in one UTC day.
    pub per_user_per_day: i64,
}

impl Caller {
    /// The site whose backend this caller is, if it is one: a token with a scope beyond what
    /// a page's token holds, or an admin token. A page's writes are `None`.
    pub fn origin(&self) -> Option<SiteId> {
        (self.admin || !self.scopes.is_subset(Scopes::PAGE)).then(|| self.site.clone())
    }
}

impl Ceilings {
    /// No ceiling: for a hub without auth, where anyone may act as anyone anyway.
    pub const NONE: Ceilings = Ceilings { per_op: MAX_AMOUNT, per_user_per_day: MAX_AMOUNT };
}

/// A grant whose signature and claims its site's key vouches for: one credit the site's
/// backend allows. Whether it fits the op is [`Domain::delta`]'s check, and so is its
/// expiry, which matters only for an op the hub has not applied yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub site: SiteId,
    pub user: String,
    pub op_id: String,
    pub data_type: String,
    pub delta: serde_json::Map<String, Value>,
    /// The last second (since the Unix epoch) at which it still credits a new op.
    pub valid_until: u64,
}

/// Milliseconds in a day: credits are counted per UTC day.
const DAY_MS: i64 = 86_400_000;

/// Why the domain refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// Refused before or by the write: a rule, the record's state, a grant.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("this op_id was already used for a different request")]
    OpIdReused,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<Refusal> for DomainError {
    fn from(r: Refusal) -> Self {
        DomainError::Rejected(Rejection::Refused(r))
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
        site: Option<&str>,
        types: &[DataType],
    ) -> Result<Vec<Stamp>, DomainError> {
        authorize(caller, user, site)?;
        require(caller, Scope::SyncRead)?;
        Ok(self.store.stamps(user, types).await?)
    }

    /// Whether the caller may follow `user`'s changes as they happen (`/api/events`): as it
    /// may read them.
    pub fn may_follow(&self, caller: &Caller, user: &UserId) -> Result<(), DomainError> {
        authorize(caller, user, None)?;
        require(caller, Scope::SyncRead)?;
        Ok(())
    }

    /// Whether the caller may read its site's change feed (`/api/changes`): every user's
    /// changes, so only a token with `changes:read`, which a page's never has. `site` is the
    /// `site_id` the request names, if any.
    pub fn may_read_feed(&self, caller: &Caller, site: Option<&str>) -> Result<(), DomainError> {
        authorize_site(caller, site)?;
        require(caller, Scope::ChangesRead)?;
        Ok(())
    }

    /// Records' latest changes after `after`, of `types`, `limit` at most, for a caller
    /// [`Domain::may_read_feed`] let in.
    pub async fn feed(
        &self,
        after: FeedPosition,
        types: &[DataType],
        limit: usize,
    ) -> Result<Vec<FeedChange>, DomainError> {
        Ok(self.store.feed(after, types, limit).await?)
    }

    /// Where the change feed ends now: no reader's cursor is past it.
    pub async fn feed_end(&self) -> Result<FeedPosition, DomainError> {
        Ok(self.store.feed_end().await?)
    }

    /// The caller's records (`action=get`).
    pub async fn records(
        &self,
        caller: &Caller,
        user: &UserId,
        site: Option<&str>,
        types: &[DataType],
    ) -> Result<Vec<Record>, DomainError> {
        authorize(caller, user, site)?;
        require(caller, Scope::SyncRead)?;
        Ok(self.store.records(user, types).await?)
    }

    /// `action=push`: merge a patch into a record (profile, settings, roles) or set an
    /// amount (balance, points), optionally only if the record is still at `base_version`.
    /// A set that raises an amount counts as a credit of the difference.
    pub async fn push(&self, caller: &Caller, req: PushRequest) -> Result<Written, DomainError> {
        let (user, site) = authorize_write(caller, &req.user_id, &req.site_id)?;
        let data_type = DataType::parse(&req.data_type)?;
        // With an op id, told only to a push the hub has not seen (see `delta`).
        let authorized = require(caller, write_scope(data_type));
        if req.op_id.is_none() {
            authorized.clone()?;
        }
        let patch = validate_push(data_type, &req.data, &site, caller.admin)?;
        let op = req.op_id.as_deref().map(OpId::parse).transpose()?;
        let base_version = req.base_version;
        let op = op.map(|op_id| OpKey {
            op_id,
            fingerprint: json!(["push", data_type, site.as_str(), patch, base_version]).to_string(),
        });
        let ceilings = caller.ceilings;
        let credit_site = site.clone();
        let mutation: Mutation = Arc::new(move |current: Current<'_>| {
            authorized.clone()?;
            let record = current.record;
            if base_version.is_some_and(|base| base != record.version) {
                return Err(Rejection::VersionConflict(record.clone()));
            }
            let mut data = record.data.clone();
            merge_patch(&mut data, &patch);
            validate_record(data_type, &data)?;
            let Some(field) = amount_field(data_type) else {
                return Ok(Change { data, ledger: None, credits: None });
            };
            let (old, new) = (amount(&record.data, field), amount(&data, field));
            let credits = if new > old {
                Some(credit(&current, &credit_site, new.saturating_sub(old), ceilings)?)
            } else {
                None
            };
            let ledger = (old != new).then(|| LedgerEntry {
                delta: new.saturating_sub(old),
                result: new,
                reason: Some("push".into()),
            });
            Ok(Change { data, ledger, credits })
        });
        self.write(Write { user, data_type, site, origin: caller.origin(), op, mutation }).await
    }

    /// `action=delta`: add a signed amount to balance or points atomically, exactly once
    /// per `op_id`, never below zero. A credit needs `amounts:credit` or a grant of the
    /// caller's site for exactly this op; a spend needs `amounts:spend` (or such a grant).
    pub async fn delta(
        &self,
        caller: &Caller,
        req: DeltaRequest,
        grant: Option<Result<Grant, Refusal>>,
    ) -> Result<Written, DomainError> {
        let (user, site) = authorize_write(caller, &req.user_id, &req.site_id)?;
        let data_type = DataType::parse(&req.data_type)?;
        let change = validate_delta(data_type, &req.delta, self.limits)?;
        let op_id = OpId::parse(&req.op_id)?;
        let reason = req.reason.as_deref().map(protocol::validate_reason).transpose()?;
        let field = amount_field(data_type).expect("validate_delta accepts balance-like types only");
        // Decided now, told only to an op the hub has not seen: an applied op answers as it
        // did even after its grant's key is revoked or its site loses the scope.
        let authorized: Result<Option<u64>, Refusal> = match grant {
            Some(Ok(grant)) => {
                check_grant(&grant, &user, &site, &op_id, data_type, change, self.limits).map(Some)
            }
            Some(Err(refusal)) => Err(refusal),
            None if change > 0 => require_for(
                caller,
                Scope::AmountsCredit,
                "a credit needs a grant from the site's backend, or",
            )
            .map(|()| None),
            None => require(caller, Scope::AmountsSpend).map(|()| None),
        };
        let ceilings = caller.ceilings;
        let op = Some(OpKey {
            op_id,
            fingerprint: json!(["delta", data_type, site.as_str(), change, reason]).to_string(),
        });
        let credit_site = site.clone();
        let mutation: Mutation = Arc::new(move |current: Current<'_>| {
            if authorized.clone()?.is_some_and(|until| {
                current.now_ms.div_euclid(1000) > i64::try_from(until).unwrap_or(i64::MAX)
            }) {
                return Err(Rejection::GrantExpired);
            }
            let record = current.record;
            // Saturating: a record the database holds, however it got there, cannot overflow this.
            let result = amount(&record.data, field).saturating_add(change);
            if result < 0 {
                return Err(Rejection::InsufficientFunds(record.clone()));
            }
            if result > MAX_AMOUNT {
                return Err(Refusal::invalid(
                    "value_too_large",
                    format!("{field} would exceed {MAX_AMOUNT}"),
                )
                .into());
            }
            let credits =
                if change > 0 { Some(credit(&current, &credit_site, change, ceilings)?) } else { None };
            let mut data = record.data.clone();
            data[field] = Value::from(result);
            Ok(Change {
                data,
                ledger: Some(LedgerEntry { delta: change, result, reason: reason.clone() }),
                credits,
            })
        });
        self.write(Write { user, data_type, site, origin: caller.origin(), op, mutation }).await
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
        let mutation: Mutation = Arc::new(move |current: Current<'_>| {
            if current.record.version != 0 {
                return Err(Rejection::VersionConflict(current.record.clone()));
            }
            let ledger = Some(LedgerEntry { delta: coins, result: coins, reason: Some("import".into()) });
            Ok(Change { data: data.clone(), ledger, credits: None })
        });
        // Every site hears of an import, its own site's backend included.
        self.write(Write { user, data_type: DataType::Balance, site, origin: None, op: None, mutation }).await
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
            WriteOutcome::Rejected(e) => Err(e.into()),
        }
    }
}

/// A balance-like record's amount; records only ever hold integers here.
fn amount(data: &Value, field: &str) -> i64 {
    data.get(field).and_then(Value::as_i64).unwrap_or(0)
}

/// Checks a credit of `amount` by `site` against the site's ceilings and counts it: the
/// record's new count. Runs for new ops only: a replay answers as it did, whatever the
/// ceilings are now.
fn credit(
    current: &Current<'_>,
    site: &SiteId,
    amount: i64,
    ceilings: Ceilings,
) -> Result<Credits, Rejection> {
    if amount > ceilings.per_op {
        let why = format!("{site} credits at most {} per op (max_credit_per_op)", ceilings.per_op);
        return Err(Rejection::CreditLimit(current.record.clone(), why));
    }
    // A clock set back keeps the count of the day it had reached.
    let day = current.now_ms.div_euclid(DAY_MS).max(current.credits.day);
    let mut credits = if current.credits.day == day { current.credits.clone() } else { Credits::on(day) };
    let total = credits.by_site.entry(site.as_str().to_owned()).or_insert(0);
    let before = *total;
    *total = total.saturating_add(amount);
    if *total > ceilings.per_user_per_day {
        let why = format!(
            "{site} may credit this user {} more today (max_credits_per_user_per_day {})",
            ceilings.per_user_per_day.saturating_sub(before).max(0),
            ceilings.per_user_per_day
        );
        return Err(Rejection::CreditLimit(current.record.clone(), why));
    }
    Ok(credits)
}

/// The scope a push of `data_type` needs.
fn write_scope(data_type: DataType) -> Scope {
    match data_type {
        DataType::Balance | DataType::Points => Scope::AmountsSet,
        DataType::Profile => Scope::ProfileWrite,
        DataType::Settings => Scope::SettingsWrite,
        DataType::Roles => Scope::RolesWrite,
    }
}

fn require(caller: &Caller, scope: Scope) -> Result<(), Refusal> {
    require_for(caller, scope, "this needs")
}

fn require_for(caller: &Caller, scope: Scope, what: &str) -> Result<(), Refusal> {
    if caller.scopes.contains(scope) {
        Ok(())
    } else {
        Err(Refusal::forbidden(
            "insufficient_scope",
            format!("{what} a token with the {scope} scope, which this token does not have"),
        ))
    }
}

/// Checks that `grant` is for exactly this op: its user, site, op id, data type and amount.
/// Returns its `valid_until`, which only an op the hub has not applied yet must be within.
fn check_grant(
    grant: &Grant,
    user: &UserId,
    site: &SiteId,
    op_id: &OpId,
    data_type: DataType,
    change: i64,
    limits: Limits,
) -> Result<u64, Refusal> {
    let mismatch = |what: &str| {
        Refusal::forbidden("grant_invalid", format!("the grant is for another {what} than this op's"))
    };
    if &grant.site != site {
        return Err(mismatch("site"));
    }
    if grant.user != user.as_str() {
        return Err(mismatch("user"));
    }
    if grant.op_id != op_id.as_str() {
        return Err(mismatch("op_id"));
    }
    if grant.data_type != data_type.as_str() {
        return Err(mismatch("data_type"));
    }
    if validate_delta(data_type, &grant.delta, limits).ok() != Some(change) {
        return Err(mismatch("amount"));
    }
    Ok(grant.valid_until)
}

/// A caller reads and writes only its token's user, and names no site but its token's:
/// `site_id` in a body, or in a query as some seed scripts send it.
fn authorize(caller: &Caller, user: &UserId, site: Option<&str>) -> Result<(), Refusal> {
    if &caller.user != user {
        return Err(Refusal::forbidden("wrong_user", "the token does not speak for this user_id"));
    }
    authorize_site(caller, site)
}

/// A caller names no site but its token's.
fn authorize_site(caller: &Caller, site: Option<&str>) -> Result<(), Refusal> {
    if site.is_some_and(|site| site != caller.site.as_str()) {
        return Err(Refusal::forbidden("wrong_site", "site_id must be the site that issued the token"));
    }
    Ok(())
}

fn authorize_write(caller: &Caller, user_id: &str, site_id: &str) -> Result<(UserId, SiteId), Refusal> {
    let user = UserId::parse(user_id)?;
    let site = SiteId::parse(site_id)?;
    authorize(caller, &user, Some(site.as_str()))?;
    Ok((user, site))
}
