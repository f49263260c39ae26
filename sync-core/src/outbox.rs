//! Local writes waiting for the hub: kept in order, each with an op id made before its
//! first send, so a resend after a lost answer is recognized by the hub and not applied twice.

use protocol::DataType;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One local write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    pub op_id: String,
    pub data_type: DataType,
    pub kind: OpKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// Add `amount` to balance or points.
    Delta { amount: i64, reason: Option<String> },
    /// Merge `patch` into the record (or set the amount of balance or points).
    Push { patch: Value },
}

impl Op {
    /// Applies this write to `data`, as the hub will.
    pub fn apply(&self, data: &mut Value) {
        match &self.kind {
            OpKind::Delta { amount, .. } => {
                if let Some(field) = protocol::amount_field(self.data_type) {
                    let current = data.get(field).and_then(Value::as_i64).unwrap_or(0);
                    data[field] = Value::from(current.saturating_add(*amount));
                }
            }
            OpKind::Push { patch } => protocol::merge_patch(data, patch),
        }
    }
}

/// Exponential backoff with full jitter: the delay before retry `attempt` (1-based), at
/// least `retry_after_ms` when the hub asked for it.
pub(crate) fn backoff_ms(
    attempt: u32,
    base_ms: u64,
    max_ms: u64,
    retry_after_ms: u64,
    rng: &mut fastrand::Rng,
) -> u64 {
    let exponential = base_ms.saturating_mul(1u64 << attempt.saturating_sub(1).min(20)).min(max_ms);
    let jittered = exponential / 2 + rng.u64(0..=exponential / 2);
    jittered.max(retry_after_ms)
}
