//! Local writes waiting for the hub: kept in order, each with an op id made before its
//! first send, so a resend after a lost answer is recognized by the hub and not applied twice.

use alloc::{borrow::ToOwned, string::String};

use protocol::DataType;
use protocol::wire::WriteRequest;

use crate::Json;

/// One local write.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    pub op_id: String,
    pub data_type: DataType,
    pub kind: OpKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OpKind {
    /// Add `amount` to balance or points.
    Delta {
        amount: i64,
        reason: Option<String>,
        /// The site backend's grant for a credit (a JWT naming this op's id), sent with every
        /// attempt: the hub applies a page's credit only with one. Replaced by a fresh one
        /// when the hub finds it expired before the op was ever applied.
        grant: Option<String>,
    },
    /// Merge `patch` into the record (or set the amount of balance or points).
    Push { patch: Json },
}

impl Op {
    /// Applies this write to `data`, as the hub will.
    pub fn apply(&self, data: &mut Json) {
        match &self.kind {
            OpKind::Delta { amount, .. } => {
                if let Some(field) = protocol::amount_field(self.data_type) {
                    let current = data.get(field).and_then(Json::as_i64).unwrap_or(0);
                    data.set(field, Json::from(current.saturating_add(*amount)));
                }
            }
            OpKind::Push { patch } => data.merge_patch(patch),
        }
    }

    /// The request body that sends this write to the hub.
    pub fn body(&self, user_id: &str, site_id: &str) -> Json {
        let request = WriteRequest { user_id, site_id, data_type: self.data_type, op_id: &self.op_id };
        match &self.kind {
            OpKind::Delta { amount, reason, grant } => {
                request.delta(*amount, reason.as_deref(), grant.as_deref())
            }
            OpKind::Push { patch } => request.push(patch.clone()),
        }
    }

    /// The storage format: `{"op_id", "data_type", "delta", "reason", "grant"}` or
    /// `{…, "patch"}`. Ops stored before grants existed have no `"grant"` and read as none.
    pub fn to_json(&self) -> Json {
        let base =
            Json::object().with("op_id", self.op_id.as_str()).with("data_type", self.data_type.as_str());
        match &self.kind {
            OpKind::Delta { amount, reason, grant } => {
                base.with("delta", *amount).with("reason", reason.clone()).with("grant", grant.clone())
            }
            OpKind::Push { patch } => base.with("patch", patch.clone()),
        }
    }

    pub fn from_json(json: &Json) -> Option<Op> {
        let op_id = json.get("op_id")?.as_str()?.to_owned();
        let data_type = DataType::from_name(json.get("data_type")?.as_str()?)?;
        let text = |key| json.get(key).and_then(Json::as_str).map(str::to_owned);
        let kind = match (json.get("delta"), json.get("patch")) {
            (Some(delta), None) => {
                OpKind::Delta { amount: delta.as_i64()?, reason: text("reason"), grant: text("grant") }
            }
            (None, Some(patch)) => OpKind::Push { patch: patch.clone() },
            _ => return None,
        };
        Some(Op { op_id, data_type, kind })
    }
}
