//! The durable feed of records' latest changes, and the webhook queues fed from it.
//!
//! Every write of a record stamps it with a [`FeedPosition`] taken in commit order, and with
//! the site whose backend made it ([`Write::origin`](super::Write::origin)). Reading the
//! records after a position, in position order, is the feed: each record appears once, at
//! its latest change, so a reader that fell behind reads every record changed since once,
//! however often it changed. It is kept as long as the records are: a cursor never expires
//! within one database (epoch).
//!
//! Each site with a webhook has a cursor in the feed and a queue of notifications to send,
//! one per user and data type at most: moving changes from the feed into the queue
//! ([`Store::webhook_transfer`](super::Store::webhook_transfer)) replaces an undelivered
//! older version by the newer one. Instances of the hub share both, and take queued
//! notifications under a lease, so that each is sent by one instance at a time.

use protocol::{DataType, SiteId, UserId};

/// A place in the feed, compared as `(xid, seq)`. What `xid` is belongs to the backend
/// (SQLite: always 0; PostgreSQL: the writing transaction's id); `seq` is drawn when the
/// record is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FeedPosition {
    pub xid: i64,
    pub seq: i64,
}

/// A record's latest change, as the feed holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedChange {
    pub position: FeedPosition,
    pub user: UserId,
    pub data_type: DataType,
    pub version: u64,
    pub updated_ms: i64,
    /// The site whose backend wrote this version; `None` for a page's write.
    pub origin: Option<SiteId>,
    /// The record's data as JSON text, when at most
    /// [`INLINE_DATA_BYTES`](super::INLINE_DATA_BYTES) long.
    pub data: Option<String>,
}

/// A notification waiting in a site's webhook queue: the newest version of one record the
/// site has not been told of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub user: UserId,
    pub data_type: DataType,
    pub version: u64,
    /// Failed attempts to send it (or an older version of the same record) so far.
    pub attempts: u32,
    /// When this version was queued for the site, in milliseconds since the Unix epoch: it
    /// is retried until `retry_for_secs` after this.
    pub queued_ms: i64,
}

/// How an attempt to send a notification ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// The site acknowledged it: it leaves the queue, unless a newer version replaced it
    /// meanwhile (that one is then due at once).
    Delivered,
    /// It failed: it is tried again at this time (milliseconds since the Unix epoch), with
    /// one more attempt counted.
    Retry { at_ms: i64 },
    /// It is given up (retried too long, or no longer worth sending): it leaves the queue,
    /// unless a newer version replaced it meanwhile.
    Dropped,
}

/// One settled notification: the record, the version that was sent, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub user: UserId,
    pub data_type: DataType,
    pub version: u64,
    pub settle: Settle,
}

/// A site's webhook queue, for `/metrics` and the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStats {
    pub site: SiteId,
    /// Notifications waiting.
    pub queued: u64,
    /// When the longest-waiting one was queued (milliseconds since the Unix epoch).
    pub oldest_queued_ms: Option<i64>,
}
