//! `GET /api/changes`: a site's change feed, for its backend. Every record of the data types
//! the site subscribes to (`webhook_data_types`), once, at its latest change, after a cursor:
//! a reader that fell behind reads each record changed since once, however often it changed.
//! Answered as a page — waiting up to `wait` seconds when nothing is after the cursor — or, to
//! `Accept: text/event-stream`, as Server-Sent Events for as long as the token lasts. Keeps
//! nothing of a reader between requests: its cursor is its place.
//!
//! A cursor reads `<epoch>.<xid>.<seq>` (the store's feed position), but readers are told it is
//! opaque: one of another epoch (a restored database) is refused with `410 cursor_reset`, and so
//! is one past the feed's end (a data dir copied back by hand, until new writes pass it), so
//! that the reader starts again from the feed's start rather than missing what the database
//! holds.

use std::future::pending;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use protocol::{DataType, Refusal, SiteId, UserId, parse_data_types};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Sleep};

use super::app::FeedReader;
use super::{ApiError, App, ClientAddr, events, seen, timed_beyond};
use crate::domain::Caller;
use crate::events::{HEARTBEAT, REAUTH};
use crate::metrics::{Action, Seen, TypeSet};
use crate::store::{FeedChange, FeedPosition};
use crate::time::rfc3339_ms;

/// Changes in one answer by default, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// Longest `wait` for a change, in seconds: well within the read timeout of a proxy in front
/// (nginx: 60 s) and the hub's own idle timeout.
const MAX_WAIT_SECS: u64 = 25;

/// How long before its connection would count as stalled a long poll answers at the latest.
const WAIT_MARGIN: Duration = Duration::from_secs(2);

/// How often a reader waiting for a change reads the feed again untold: with events off the
/// broker tells of no change, and on PostgreSQL a change it tells of may not be readable yet
/// (an older transaction is still open; see [`Store::feed`](crate::store::Store::feed)).
const REREAD: Duration = Duration::from_secs(1);

/// When a site refused a reader for holding too many may try again, in seconds.
const FULL_RETRY_AFTER_SECS: u64 = 5;

/// Frames a stream's reader makes before its client reads them: beyond, it waits.
const QUEUE: usize = 16;

#[derive(serde::Deserialize)]
struct ChangesQuery {
    cursor: Option<String>,
    limit: Option<String>,
    data_type: Option<String>,
    wait: Option<String>,
    /// The site whose feed a request reads with auth off (development); with auth on, only
    /// the token's site may be named.
    site_id: Option<String>,
}

/// What a request asks of the feed, read from its query and headers.
struct Asked {
    /// Where to read from; `None` from the feed's start.
    cursor: Option<Cursor>,
    limit: usize,
    /// The data types named; `None` for all the site subscribes to.
    types: Option<Vec<DataType>>,
    wait: Duration,
    /// Answered as Server-Sent Events.
    stream: bool,
    site: Option<SiteId>,
}

/// A cursor as a reader sent it: the epoch it was made in, and its place in that epoch's feed.
#[derive(Debug, PartialEq, Eq)]
struct Cursor {
    epoch: String,
    position: FeedPosition,
}

impl Cursor {
    fn parse(text: &str) -> Result<Cursor, ApiError> {
        let bad = || {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_cursor",
                "the cursor is not one the feed gave; send one as it came, or none to read from the start",
            )
        };
        let number = |part: Option<&str>| {
            part.filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<i64>().ok())
        };
        let mut parts = text.trim().rsplitn(3, '.');
        let seq = number(parts.next()).ok_or_else(bad)?;
        let xid = number(parts.next()).ok_or_else(bad)?;
        let epoch = parts.next().filter(|e| !e.is_empty()).ok_or_else(bad)?;
        Ok(Cursor { epoch: epoch.to_owned(), position: FeedPosition { xid, seq } })
    }
}

/// The text of the cursor at `position` of `epoch`'s feed.
fn cursor_text(epoch: &str, position: FeedPosition) -> String {
    format!("{epoch}.{}.{}", position.xid, position.seq)
}

/// Why a cursor no longer reads this feed.
fn reset() -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        "cursor_reset",
        "the cursor is of another database (a restore), or past the feed's end; read the feed again from the start, without a cursor",
    )
}

pub(super) async fn changes(
    State(app): State<App>,
    client: ClientAddr,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let mut saw = Seen { action: Action::Changes, ..Seen::default() };
    let asked = match parse(query.as_deref().unwrap_or(""), &headers) {
        Ok(asked) => asked,
        Err(e) => return seen(app.refuse_unauthenticated(client.ip(), e).into_response(), saw),
    };
    // The hub drops a connection whose answer has not moved for its request and idle timeouts
    // together: a long poll answers, empty if need be, a little before that.
    let limits = &app.config().limits;
    let wait = asked.wait.min((limits.request_timeout() + limits.idle_timeout()).saturating_sub(WAIT_MARGIN));
    let response = timed_beyond(&app, wait, async {
        let caller = admit(&app, &headers, client.ip(), asked.site.as_ref(), &mut saw).await?;
        if app.logs().keeps_access() {
            saw.who.get_or_insert_with(|| (caller.site.clone(), caller.user.clone()));
        }
        app.domain().may_read_feed(&caller, asked.site.as_ref().map(SiteId::as_str))?;
        let types = subscribed(&app, &caller, asked.types)?;
        saw.types = TypeSet::of(&types);
        let epoch = app.domain().epoch();
        let after = match asked.cursor {
            Some(cursor) if cursor.epoch != epoch => return Err(reset()),
            Some(cursor) => cursor.position,
            None => FeedPosition::default(),
        };
        let counted = app.feed_reader(&caller.site).ok_or_else(|| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                "this site holds as many change feed readers (waiting polls and streams) as the hub allows; close one",
            )
            .retry_after(FULL_RETRY_AFTER_SECS)
        })?;
        let reader =
            Reader { app: app.clone(), site: caller.site.clone(), types, limit: asked.limit, _counted: counted };
        if asked.stream {
            reader.stream(after, caller.expires).await
        } else {
            reader.page(after, wait).await
        }
    })
    .await;
    seen(response, saw)
}

fn parse(raw: &str, headers: &HeaderMap) -> Result<Asked, ApiError> {
    let query: ChangesQuery = serde_urlencoded::from_str(raw)
        .map_err(|e| Refusal::invalid("invalid_query", format!("the query string is malformed: {e}")))?;
    let stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/event-stream"));
    // A stream that reconnects resumes after the last event it had.
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok()).filter(|_| stream);
    let cursor = last_event_id.or(query.cursor.as_deref()).map(Cursor::parse).transpose()?;
    let limit = number(query.limit.as_deref(), "limit", 1, MAX_LIMIT as u64)?
        .map_or(DEFAULT_LIMIT, |n| usize::try_from(n).unwrap_or(MAX_LIMIT));
    let wait = Duration::from_secs(number(query.wait.as_deref(), "wait", 0, MAX_WAIT_SECS)?.unwrap_or(0));
    let types = query.data_type.as_deref().map(parse_data_types).transpose()?;
    let site = query.site_id.as_deref().map(SiteId::parse).transpose()?;
    Ok(Asked { cursor, limit, types, wait: if stream { Duration::ZERO } else { wait }, stream, site })
}

/// A whole number parameter within `min..=max`, if given.
fn number(value: Option<&str>, name: &str, min: u64, max: u64) -> Result<Option<u64>, Refusal> {
    let Some(value) = value else { return Ok(None) };
    match value.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
        _ => Err(Refusal::invalid(
            "invalid_query",
            format!("{name} must be a whole number from {min} to {max}"),
        )),
    }
}

/// Who reads the feed: the site backend its token speaks for, its request counted against the
/// token's user; with auth off (development), the site the request names (`dev` when none),
/// counted against a user named after it.
async fn admit(
    app: &App,
    headers: &HeaderMap,
    ip: IpAddr,
    site: Option<&SiteId>,
    saw: &mut Seen,
) -> Result<Caller, ApiError> {
    if let Some(caller) = app.admit_token(headers, ip, saw).await? {
        return Ok(caller);
    }
    let site = site.map_or("dev", SiteId::as_str);
    app.admit_named(&UserId::parse(site)?, Some(site), 1).await
}

/// The data types read: those asked for, each of which the caller's site must subscribe to, or
/// every one it subscribes to. A type it does not subscribe to is refused rather than left out:
/// a reader waiting for it would otherwise wait forever, none the wiser.
fn subscribed(app: &App, caller: &Caller, asked: Option<Vec<DataType>>) -> Result<Vec<DataType>, Refusal> {
    let sites = app.sites();
    let subscribed = sites.subscribed(caller.site.as_str());
    let Some(asked) = asked else { return Ok(subscribed.to_vec()) };
    if let Some(other) = asked.iter().find(|t| !subscribed.contains(t)) {
        let carried: Vec<&str> = subscribed.iter().map(|t| t.as_str()).collect();
        return Err(Refusal::invalid(
            "invalid_data_type",
            format!(
                "{}'s change feed carries {} only (its webhook_data_types), not {other}",
                caller.site,
                carried.join(", ")
            ),
        ));
    }
    Ok(asked)
}

/// What one read of the feed got.
struct Read {
    /// `limit` and one more at most.
    changes: Vec<FeedChange>,
    /// Where the next read starts.
    next: FeedPosition,
}

/// One reader of the feed: a site, the types it reads, how many changes at once.
struct Reader {
    app: App,
    site: SiteId,
    types: Vec<DataType>,
    limit: usize,
    /// Counts the reader among its site's until its answer ends.
    _counted: FeedReader,
}

impl Reader {
    /// The changes after `after`, `limit` and one more at most (to tell whether more follow),
    /// and where the next read starts. An empty read of a cursor past the feed's end is
    /// refused: that cursor is of another run of the database.
    ///
    /// A read that gets no more than `limit` read every change of its types up to where the
    /// feed ended before it began: the next one starts from there, so that a reader of one
    /// type does not step again over the other types' changes after its last one.
    async fn read(&self, after: FeedPosition, check_end: bool) -> Result<Read, ApiError> {
        let domain = self.app.domain();
        let end = domain.feed_end().await?;
        let changes = domain.feed(after, &self.types, self.limit + 1).await?;
        if changes.is_empty() && check_end && after > end {
            return Err(reset());
        }
        let next = if changes.len() > self.limit {
            changes[self.limit - 1].position
        } else {
            changes.last().map_or(after, |c| c.position).max(end)
        };
        Ok(Read { changes, next })
    }

    /// One page: what follows `after`, or, when nothing does, what comes within `wait` (the
    /// first changes to come, or none).
    async fn page(&self, after: FeedPosition, wait: Duration) -> Result<Response, ApiError> {
        let deadline = Instant::now() + wait;
        let events = self.app.events();
        // Taken before the first read, so that no change committed after it goes untold.
        let (mut committed, mut stopping) = (events.committed(), events.stopping());
        let mut read = self.read(after, true).await?;
        while read.changes.is_empty() && Instant::now() < deadline && !*stopping.borrow() {
            tokio::select! {
                _ = committed.changed() => {}
                _ = stopping.changed() => {}
                () = tokio::time::sleep_until(deadline.min(Instant::now() + REREAD)) => {}
            }
            read = self.read(read.next, false).await?;
        }
        let Read { mut changes, next } = read;
        let more = changes.len() > self.limit;
        changes.truncate(self.limit);
        let epoch = self.app.domain().epoch();
        let cursor = cursor_text(epoch, next);
        let mut body = String::with_capacity(64 + changes.len() * 160);
        body.push_str("{\"success\":true,\"epoch\":\"");
        body.push_str(epoch);
        body.push_str("\",\"changes\":[");
        for (i, change) in changes.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            self.change(&mut body, change);
        }
        body.push_str("],\"cursor\":\"");
        body.push_str(&cursor);
        body.push_str(if more { "\",\"more\":true}" } else { "\",\"more\":false}" });
        let mut response = (StatusCode::OK, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(response)
    }

    /// The stream: the changes after `after` now, then each as it comes, until the token
    /// expires (`expires`, seconds since the Unix epoch), the hub stops or the client goes.
    async fn stream(self, after: FeedPosition, expires: Option<u64>) -> Result<Response, ApiError> {
        let Read { mut changes, next: after } = self.read(after, true).await?;
        changes.truncate(self.limit);
        let retry = format!("retry: {}\n\n", self.app.config().events.retry_ms);
        let mut first = vec![Bytes::from(retry)];
        for change in &changes {
            first.push(self.frame(change));
        }
        let (frames, receiver) = mpsc::channel(QUEUE);
        let expires = expires.map(|exp| {
            let at = std::time::UNIX_EPOCH + Duration::from_secs(exp);
            let left = at.duration_since(std::time::SystemTime::now()).unwrap_or_default();
            Box::pin(tokio::time::sleep(left))
        });
        let events = self.app.events();
        let follower = Follower {
            committed: events.committed(),
            stopping: events.stopping(),
            reader: self,
            after,
            frames,
            expires,
        };
        tokio::spawn(follower.run());
        // The follower ends the stream at the token's expiry, with `event: reauth`.
        Ok(events::stream(first, receiver, None))
    }

    /// A change as the feed shows it: `{"user_id","data_type","version","last_updated",
    /// "data" (when small),"own"}`, written into `out`.
    fn change(&self, out: &mut String, change: &FeedChange) {
        out.push_str("{\"user_id\":\"");
        out.push_str(change.user.as_str());
        out.push_str("\",\"data_type\":\"");
        out.push_str(change.data_type.as_str());
        out.push_str("\",\"version\":");
        out.push_str(&change.version.to_string());
        out.push_str(",\"last_updated\":\"");
        out.push_str(&rfc3339_ms(change.updated_ms));
        out.push('"');
        if let Some(data) = &change.data {
            out.push_str(",\"data\":");
            out.push_str(data);
        }
        out.push_str(if change.origin.as_ref() == Some(&self.site) {
            ",\"own\":true}"
        } else {
            ",\"own\":false}"
        });
    }

    /// A change as a stream sends it: `event: change`, its id the cursor right after it.
    fn frame(&self, change: &FeedChange) -> Bytes {
        let mut frame = String::from("event: change\nid: ");
        frame.push_str(&cursor_text(self.app.domain().epoch(), change.position));
        frame.push_str("\ndata: ");
        self.change(&mut frame, change);
        frame.push_str("\n\n");
        frame.into()
    }
}

/// A stream's reader, once its answer has begun: reads the feed whenever a change is told
/// (and every [`REREAD`]), and hands each change to the answer's body as a frame.
struct Follower {
    reader: Reader,
    after: FeedPosition,
    frames: mpsc::Sender<Bytes>,
    committed: watch::Receiver<u64>,
    stopping: watch::Receiver<bool>,
    /// The token's expiry; `None` with auth off.
    expires: Option<Pin<Box<Sleep>>>,
}

/// Why a stream's reader stops.
enum Stop {
    /// The client went, or the hub stops: the answer ends as it is.
    Gone,
    /// The token expired.
    Expired,
}

impl Follower {
    async fn run(mut self) {
        if let Stop::Expired = self.follow().await {
            // Sent however long the client takes to read it, unless it goes or the hub stops.
            tokio::select! {
                _ = self.frames.send(Bytes::from_static(REAUTH)) => {}
                _ = self.stopping.wait_for(|stopping| *stopping) => {}
            }
        }
    }

    async fn follow(&mut self) -> Stop {
        let every = self.reader.app.config().events.heartbeat();
        let mut heartbeat = tokio::time::interval_at(Instant::now() + every, every);
        let mut reread = tokio::time::interval_at(Instant::now() + REREAD, REREAD);
        let timeout = self.reader.app.config().limits.request_timeout();
        loop {
            loop {
                let Read { changes, next } =
                    match tokio::time::timeout(timeout, self.reader.read(self.after, false)).await {
                        Ok(Ok(read)) => read,
                        failed => {
                            // The client reconnects with the last id it had, and reads on from there.
                            if let Ok(Err(e)) = failed {
                                tracing::warn!(
                                    code = e.code,
                                    "a change feed stream could not read the feed; it ends"
                                );
                            }
                            return Stop::Gone;
                        }
                    };
                let full = changes.len() > self.reader.limit;
                for change in changes.iter().take(self.reader.limit) {
                    let frame = self.reader.frame(change);
                    if let Some(stop) = self.send(frame).await {
                        return stop;
                    }
                }
                self.after = next;
                if !full {
                    break;
                }
            }
            let beat = tokio::select! {
                biased;
                _ = self.stopping.wait_for(|stopping| *stopping) => return Stop::Gone,
                () = expiry(&mut self.expires) => return Stop::Expired,
                () = self.frames.closed() => return Stop::Gone,
                _ = self.committed.changed() => false,
                _ = reread.tick() => false,
                _ = heartbeat.tick() => true,
            };
            if beat && let Some(stop) = self.send(Bytes::from_static(HEARTBEAT)).await {
                return stop;
            }
        }
    }

    /// Hands `frame` to the answer's body, waiting while its client reads slowly; why the
    /// stream stops instead, if it does.
    async fn send(&mut self, frame: Bytes) -> Option<Stop> {
        tokio::select! {
            biased;
            _ = self.stopping.wait_for(|stopping| *stopping) => Some(Stop::Gone),
            () = expiry(&mut self.expires) => Some(Stop::Expired),
            sent = self.frames.send(frame) => sent.is_err().then_some(Stop::Gone),
        }
    }
}

/// Completes when the token expires; never without one.
async fn expiry(expires: &mut Option<Pin<Box<Sleep>>>) {
    match expires {
        Some(sleep) => sleep.as_mut().await,
        None => pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_as_it_was_written_and_nothing_else_reads() {
        let position = FeedPosition { xid: 7, seq: 42 };
        let text = cursor_text("Ab_-9", position);
        assert_eq!(Cursor::parse(&text).unwrap(), Cursor { epoch: "Ab_-9".into(), position });
        for bad in
            ["", "E", "E.1", ".1.2", "E.1.", "E..2", "E.-1.2", "E.1.+2", "E.1.x", "E.1.99999999999999999999"]
        {
            assert_eq!(Cursor::parse(bad).err().map(|e| e.code), Some("bad_cursor"), "{bad:?}");
        }
    }

    #[test]
    fn limit_and_wait_are_refused_outside_their_range() {
        let asked = |query: &str| parse(query, &HeaderMap::new());
        assert_eq!(asked("").unwrap().limit, DEFAULT_LIMIT);
        assert_eq!(asked("limit=1000&wait=25").unwrap().wait, Duration::from_secs(25));
        for query in ["limit=0", "limit=1001", "limit=-1", "limit=x", "wait=26", "wait=-1", "wait=1.5"] {
            assert_eq!(asked(query).err().map(|e| e.code), Some("invalid_query"), "{query}");
        }
    }
}
