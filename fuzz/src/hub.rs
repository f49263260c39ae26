//! The checks the hub applies to a parsed request (`hub/src/http` and `hub/src/domain.rs`),
//! each run even when an earlier one refused, so that one refusal does not hide the next.
//! Every refusal must be a well-formed 4xx and every accepted value must keep its rules.

use protocol::{
    DataType, DeltaRequest, GetQuery, Limits, MAX_AMOUNT, OpId, PostRequest, PushRequest, QueryAction,
    RefusalKind, SiteId, UserId, amount_field, merge_patch, parse_data_types, validate_delta, validate_push,
    validate_reason, validate_record,
};
use serde_json::{Map, Value};

use crate::check::{self, accepted};

/// A POST body the parser accepted, checked as a caller with and without an admin token
/// would send it.
pub fn post(request: &PostRequest) {
    match request {
        PostRequest::Push(p) => {
            push(p, false);
            push(p, true);
        }
        PostRequest::Delta(d) => delta(d, Limits::default()),
        PostRequest::Batch(b) => {
            assert!((1..=protocol::MAX_BATCH_OPS).contains(&b.ops.len()), "{b:?}");
            for op in &b.ops {
                assert!(!matches!(op, PostRequest::Batch(_)), "a batch nested in {b:?}");
                assert_eq!((op.user_id(), op.site_id()), (b.user_id.as_str(), b.site_id.as_str()));
                post(op);
            }
        }
    }
}

/// `action=push`: the ids, the data type, the data, the op id, and the record the patch makes
/// of a record that was never written.
pub fn push(p: &PushRequest, admin: bool) {
    accepted(UserId::parse(&p.user_id));
    let site = accepted(SiteId::parse(&p.site_id));
    let data_type = accepted(DataType::parse(&p.data_type));
    if let Some(op_id) = &p.op_id {
        accepted(OpId::parse(op_id));
    }
    let (Some(site), Some(t)) = (site, data_type) else { return };
    if let Some(patch) = patch(t, &p.data, &site, admin) {
        merged(t, &t.empty_data(), &patch, &site);
    }
}

/// The patch `validate_push` makes of `data`, checked: a refusal is a 400, or a 403 for
/// roles only; an accepted patch keeps the data rules and validates to itself.
pub fn patch(t: DataType, data: &Value, site: &SiteId, admin: bool) -> Option<Value> {
    match validate_push(t, data, site, admin) {
        Ok(patch) => {
            check::patch(t, data, &patch, site, admin);
            assert_eq!(validate_push(t, &patch, site, admin), Ok(patch.clone()), "normalizing twice differs");
            Some(patch)
        }
        Err(r) => {
            check::refusal(&r);
            assert_ne!(r.kind, RefusalKind::WrongMethod, "{r:?}");
            if r.kind == RefusalKind::Forbidden {
                assert_eq!(t, DataType::Roles, "{r:?}");
            }
            None
        }
    }
}

/// What the hub stores after an accepted patch: `record` with the patch merged in, or
/// `record` unchanged when the merged record is refused (settings over their size limit
/// only). Merging the same patch again changes nothing.
pub fn merged(t: DataType, record: &Value, patch: &Value, site: &SiteId) -> Value {
    let mut next = record.clone();
    merge_patch(&mut next, patch);
    let mut again = next.clone();
    merge_patch(&mut again, patch);
    assert_eq!(again, next, "merging a patch twice differs from merging it once");
    let kept = match validate_record(t, &next) {
        Ok(()) => next,
        Err(r) => {
            check::refusal(&r);
            assert_eq!(t, DataType::Settings, "{r:?}");
            assert!(next.to_string().len() > check::MAX_SETTINGS_BYTES, "{r:?}");
            record.clone()
        }
    };
    check::record(t, &kept, site);
    kept
}

/// `action=delta`: the ids, the data type, the amount, the op id and the reason.
pub fn delta(d: &DeltaRequest, limits: Limits) {
    accepted(UserId::parse(&d.user_id));
    accepted(SiteId::parse(&d.site_id));
    accepted(OpId::parse(&d.op_id));
    if let Some(reason) = &d.reason {
        self::reason(reason);
    }
    if let Some(t) = accepted(DataType::parse(&d.data_type)) {
        change(t, &d.delta, limits);
    }
}

/// The change `validate_delta` makes of a `delta` object, checked: refusals are 400s; an
/// accepted change is the one integer field of its type, non-zero and within both limits.
pub fn change(t: DataType, delta: &Map<String, Value>, limits: Limits) -> Option<i64> {
    match validate_delta(t, delta, limits) {
        Ok(change) => {
            let field = amount_field(t).unwrap_or_else(|| panic!("a delta on {t} was accepted"));
            assert!(delta.keys().eq([field]), "{delta:?}");
            assert_eq!(delta[field].as_i64(), Some(change));
            assert_ne!(change, 0);
            assert!(change.unsigned_abs() <= limits.max_delta.unsigned_abs(), "{change} over {limits:?}");
            assert!(change.unsigned_abs() <= MAX_AMOUNT.unsigned_abs(), "{change}");
            Some(change)
        }
        Err(r) => {
            check::refusal(&r);
            assert_eq!(r.kind, RefusalKind::Invalid, "{r:?}");
            None
        }
    }
}

/// A delta's reason: accepted only as normalized single-line text, which normalizes to itself.
pub fn reason(s: &str) {
    if let Some(reason) = accepted(validate_reason(s)) {
        check::text("reason", &reason, check::MAX_REASON_CHARS, false);
        assert_eq!(validate_reason(&reason), Ok(reason.clone()), "normalizing twice differs");
    }
}

/// A GET query the hub could read: the action, the user id and the data type list.
pub fn query(q: &GetQuery) {
    match q.action() {
        Ok(QueryAction::Timestamp) => assert_eq!(q.action.as_deref(), Some("timestamp")),
        Ok(QueryAction::Get) => assert_eq!(q.action.as_deref(), Some("get")),
        Err(r) => {
            check::refusal(&r);
            let post_action = matches!(q.action.as_deref(), Some("push" | "delta"));
            assert_eq!(r.kind == RefusalKind::WrongMethod, post_action, "{r:?}");
        }
    }
    for (name, value) in [("user_id", &q.user_id), ("data_type", &q.data_type), ("site_id", &q.site_id)] {
        match q.required(name, value) {
            Ok(v) => assert_eq!(Some(v), value.as_deref()),
            Err(r) => {
                check::refusal(&r);
                assert!(value.is_none(), "{r:?}");
            }
        }
    }
    if let Some(user_id) = &q.user_id {
        accepted(UserId::parse(user_id));
    }
    if let Some(list) = &q.data_type {
        data_types(list);
    }
}

/// A `data_type` list: accepted as the distinct types it names, in order, one per entry.
pub fn data_types(list: &str) {
    let Some(types) = accepted(parse_data_types(list)) else { return };
    let named: Vec<&str> = list.split(',').map(str::trim).collect();
    assert!(!types.is_empty(), "{list:?}");
    assert!(types.len() <= named.len(), "{list:?}");
    for (i, t) in types.iter().enumerate() {
        assert!(!types[..i].contains(t), "{t} twice from {list:?}");
    }
    assert!(named.iter().all(|name| types.iter().any(|t| t.as_str() == *name)), "{list:?} -> {types:?}");
}
