//! What a store tells the hub's event streams: each committed change of a record, at a
//! position of the store's, published once the change is durable.

use std::sync::Mutex;

use protocol::{DataType, UserId};
use tokio::sync::{mpsc, watch};

/// A record's data is sent with its change when its JSON is at most this long; a larger one
/// is fetched by the client.
pub const INLINE_DATA_BYTES: usize = 2048;

/// Where a change stands in the store's order of changes: `(era, seq)`, compared in that
/// order. What an era is belongs to the backend (SQLite: one run of the hub; PostgreSQL: the
/// writing transaction's id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub era: u64,
    pub seq: u64,
}

/// One committed change of a record.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    pub position: Position,
    pub user: UserId,
    pub data_type: DataType,
    pub version: u64,
    pub updated_ms: i64,
    /// The record's data as JSON text, when at most [`INLINE_DATA_BYTES`] long.
    pub data: Option<String>,
}

impl ChangeEvent {
    /// The data to send with a change: `json` when small enough.
    pub fn inline(json: String) -> Option<String> {
        (json.len() <= INLINE_DATA_BYTES).then_some(json)
    }
}

/// A store's committed changes, as its reader receives them: every change after `start`
/// arrives on `batches`, in position order, a committed batch at a time, unless `lost` moves
/// on: the store could not publish some changes (its reader was away longer than the store
/// keeps them), and changes before the next batch may be missing.
#[derive(Debug)]
pub struct Changes {
    pub start: Position,
    pub batches: mpsc::UnboundedReceiver<Vec<ChangeEvent>>,
    /// How many times changes were lost.
    pub lost: watch::Receiver<u64>,
}

/// A store's side of [`Changes`]: nothing is kept until a reader takes them.
#[derive(Debug, Default)]
pub(crate) struct Publisher {
    sender: Mutex<Option<mpsc::UnboundedSender<Vec<ChangeEvent>>>>,
    lost: Mutex<Option<watch::Sender<u64>>>,
    taken: std::sync::atomic::AtomicBool,
}

impl Publisher {
    /// The changes after `start`, once; `None` when taken already.
    pub(crate) fn take(&self, start: Position) -> Option<Changes> {
        if self.taken.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        let (sender, batches) = mpsc::unbounded_channel();
        let (lost_sender, lost) = watch::channel(0);
        *self.sender.lock().expect("the change publisher") = Some(sender);
        *self.lost.lock().expect("the change publisher") = Some(lost_sender);
        Some(Changes { start, batches, lost })
    }

    /// Whether a reader took the changes: until then, none need to be made.
    pub(crate) fn wanted(&self) -> bool {
        self.taken.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Tells the reader that changes before the next batch may be missing: told before that
    /// batch is published.
    pub(crate) fn lost(&self) {
        if let Some(lost) = self.lost.lock().expect("the change publisher").as_ref() {
            lost.send_modify(|times| *times += 1);
        }
    }

    /// Hands a committed batch's changes to the reader, if one took them and still reads.
    pub(crate) fn publish(&self, batch: Vec<ChangeEvent>) {
        if batch.is_empty() {
            return;
        }
        let mut sender = self.sender.lock().expect("the change publisher");
        if sender.as_ref().is_some_and(|s| s.send(batch).is_err()) {
            *sender = None;
        }
    }
}
