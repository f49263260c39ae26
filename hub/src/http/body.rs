//! Request bodies: what is checked before a body's first byte is read (its type, its declared
//! size, room among the bytes in flight), how long its client has to send it, and what
//! becomes of a body the hub answered without reading. The handler checks the token and the
//! rate limits before any of this; parsing what was read is the handler's too.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{HeaderMap, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{ApiError, App, MAX_BODY};
use crate::config::Limits;

/// What a client refused for the bytes in flight is told to wait, in seconds.
const BUSY_RETRY_AFTER_SECS: u64 = 1;

/// The bytes of request bodies the hub holds at once, over all connections
/// (`limits.max_body_bytes_in_flight`).
#[derive(Debug)]
pub(super) struct Budget {
    bytes: Arc<Semaphore>,
    /// `/metrics`' view of the bytes held.
    held: Gauge,
}

/// Room for one body, held from before its first byte is read until it is answered.
#[derive(Debug)]
pub(super) struct Held {
    /// Gives the room back when dropped.
    _permit: OwnedSemaphorePermit,
    bytes: i64,
    gauge: Gauge,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge.dec_by(self.bytes);
    }
}

impl Budget {
    pub(super) fn new(max_bytes: usize, held: Gauge) -> Budget {
        Budget { bytes: Arc::new(Semaphore::new(max_bytes.min(Semaphore::MAX_PERMITS))), held }
    }

    /// Room for a body of `declared` bytes (the largest body when it declares none), or
    /// `503 busy` at once: a body never waits for room, and memory never grows with the
    /// uploads in flight.
    pub(super) fn hold(&self, declared: Option<u64>) -> Result<Held, ApiError> {
        let bytes = declared.map_or(MAX_BODY, |n| usize::try_from(n).unwrap_or(MAX_BODY).min(MAX_BODY));
        let permit = u32::try_from(bytes)
            .ok()
            .and_then(|n| self.bytes.clone().try_acquire_many_owned(n).ok())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "busy",
                    format!("the hub is reading too many bodies at once; retry in {BUSY_RETRY_AFTER_SECS} s"),
                )
                .retry_after(BUSY_RETRY_AFTER_SECS)
            })?;
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        self.held.inc_by(bytes);
        Ok(Held { _permit: permit, bytes, gauge: self.held.clone() })
    }
}

/// Everything a POST's headers say of its body, checked before a byte of it is read: JSON
/// only (415), at most [`MAX_BODY`] bytes declared (413), and room for it among the bytes in
/// flight (503). The room is held until the returned [`Held`] is dropped.
pub(super) fn admit(app: &App, headers: &HeaderMap) -> Result<Held, ApiError> {
    let is_json = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        let mime = v.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
    });
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as Content-Type: application/json",
        ));
    }
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    app.hold_body(declared)
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the body is larger than {} KiB", MAX_BODY / 1024),
    )
}

/// Why a body could not be read.
#[derive(Debug)]
pub(super) enum Unread {
    /// More than [`MAX_BODY`] bytes came: 413. What is left of the body may still be
    /// [`discard`]ed.
    TooLarge(Body),
    /// Not all of it came within the body timeout: 408.
    TimedOut,
    /// The connection failed, or the body broke its own framing: 400.
    Broken,
}

impl Unread {
    pub(super) fn error(&self, timeout: Duration) -> ApiError {
        match self {
            Unread::TooLarge(_) => too_large(),
            Unread::TimedOut => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the body did not arrive within {} s (at least {} KiB per {} s)",
                    timeout.as_secs(),
                    MAX_BODY / 1024,
                    timeout.as_secs()
                ),
            ),
            Unread::Broken => {
                ApiError::new(StatusCode::BAD_REQUEST, "body_unreadable", "the body could not be read")
            }
        }
    }
}

/// Reads a whole body of at most [`MAX_BODY`] bytes, all of which must arrive within
/// `timeout`: a body that stalls or trickles is cut there, whatever its size.
pub(super) async fn read(mut body: Body, timeout: Duration) -> Result<Bytes, Unread> {
    let declared = usize::try_from(body.size_hint().lower()).unwrap_or(MAX_BODY).min(MAX_BODY);
    let mut bytes = Vec::with_capacity(declared);
    let whole = tokio::time::timeout(timeout, async {
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map_err(|_| Cut::Broken)?.into_data() else { continue };
            if bytes.len() + data.len() > MAX_BODY {
                return Err(Cut::TooLarge);
            }
            bytes.extend_from_slice(&data);
        }
        Ok(())
    })
    .await;
    match whole {
        Ok(Ok(())) => Ok(bytes.into()),
        Ok(Err(Cut::TooLarge)) => Err(Unread::TooLarge(body)),
        Ok(Err(Cut::Broken)) => Err(Unread::Broken),
        Err(_) => Err(Unread::TimedOut),
    }
}

/// Why [`read`] stopped before the end of a body that came in time.
enum Cut {
    TooLarge,
    Broken,
}

/// Reads what is left of a body the hub has answered without it, and throws it away, for at
/// most the body timeout and `limits.max_discarded_body_bytes`; then lets the body go. A
/// client that sends its whole body before it reads the answer (most HTTP/1.1 clients), or
/// that fails a stream reset while it is still sending (curl over HTTP/2), then reads the
/// answer cleanly: the connection is not closed, nor the stream reset, under its upload.
/// Nothing is kept, so the bytes in flight do not count it. A client that asked `Expect:
/// 100-continue` is not told to go on: it has sent nothing, and sends nothing.
pub(super) fn discard(body: Body, headers: &HeaderMap, limits: &Limits) {
    let max = limits.max_discarded_body_bytes;
    let waits =
        headers.get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if waits || body.is_end_stream() || body.size_hint().lower() > max {
        return;
    }
    let timeout = limits.body_timeout();
    tokio::spawn(async move {
        let mut body = Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX));
        let _ = tokio::time::timeout(timeout, async { while let Some(Ok(_)) = body.frame().await {} }).await;
    });
}
