//! `GET /api/events`: one user's changes as Server-Sent Events, for as long as the client
//! reads and its token lasts. Admitted as any read is (its token, its page's origin, the rate
//! limit), then handed to the [`Broker`](crate::events::Broker).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::body::Frame;
use protocol::{DataType, Refusal, UserId, parse_data_types};
use tokio::sync::mpsc;
use tokio::time::Sleep;

use super::{ApiError, App, ClientAddr, seen, timed};
use crate::events::{REAUTH, Refused, Subscription};
use crate::metrics::{Action, Seen, TypeSet};
use crate::time::now_ms;

/// How long a client refused for too many streams waits before it tries again.
const FULL_RETRY_AFTER_SECS: u64 = 30;

#[derive(serde::Deserialize)]
struct EventsQuery {
    user_id: Option<String>,
    data_type: Option<String>,
}

pub(super) async fn events(
    State(app): State<App>,
    client: ClientAddr,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let mut saw = Seen { action: Action::Events, ..Seen::default() };
    if !app.config().events.enabled {
        return seen(super::not_found().await.into_response(), saw);
    }
    let response = timed(&app, async {
        let (user, types) =
            parse(query.as_deref().unwrap_or("")).map_err(|e| app.refuse_unauthenticated(client.ip(), e))?;
        saw.types = TypeSet::of(&types);
        let caller = app.admit(&headers, client.ip(), &user, None, &mut saw).await?;
        if app.logs().keeps_access() {
            saw.who.get_or_insert_with(|| (caller.site.clone(), caller.user.clone()));
        }
        app.domain().may_follow(&caller, &user)?;
        let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
        let broker = app.events();
        let expires_ms =
            caller.expires.map(|exp| i64::try_from(exp).unwrap_or(i64::MAX).saturating_mul(1000));
        let mut subscription =
            broker.subscribe(&user, &types, last_event_id, client.ip(), expires_ms).map_err(refused)?;
        broker.catch_up(app.domain().store().as_ref(), &mut subscription, &types).await;
        let first = std::mem::take(&mut subscription.first);
        Ok(stream(first, subscription, expires_ms))
    })
    .await;
    seen(response, saw)
}

/// A Server-Sent Events answer: `first`, then what `source` gives, until the token expires at
/// `expires_ms` (then `event: reauth`), the source ends or the client goes.
pub(super) fn stream(first: Vec<Bytes>, source: impl Source, expires_ms: Option<i64>) -> Response {
    let expires = expires_ms.map(|exp| {
        let left = exp.saturating_sub(now_ms());
        Box::pin(tokio::time::sleep(Duration::from_millis(u64::try_from(left).unwrap_or(0))))
    });
    let body = EventBody { first: first.into(), source, expires, ended: false };
    let mut response = Body::new(body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // nginx passes each event on at once, whatever its buffering for other answers.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Where a stream's frames come from after its first ones.
pub(super) trait Source: Send + Unpin + 'static {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>>;

    /// The token expired: nothing more is sent but `event: reauth`.
    fn expired(&mut self) {}
}

/// A user's stream, fed by the broker.
impl Source for Subscription {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        self.frames.poll_recv(cx)
    }

    fn expired(&mut self) {
        self.ended("expired");
    }
}

/// Frames a task makes, which stops once the receiver is dropped.
impl Source for mpsc::Receiver<Bytes> {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        self.poll_recv(cx)
    }
}

fn parse(raw: &str) -> Result<(UserId, Vec<DataType>), ApiError> {
    let query: EventsQuery = serde_urlencoded::from_str(raw)
        .map_err(|e| Refusal::invalid("invalid_query", format!("the query string is malformed: {e}")))?;
    let user = query
        .user_id
        .ok_or_else(|| Refusal::invalid("missing_field", "user_id is required"))
        .and_then(|u| UserId::parse(&u))?;
    let types = match query.data_type {
        Some(list) => parse_data_types(&list)?,
        None => DataType::ALL.to_vec(),
    };
    Ok((user, types))
}

fn refused(why: Refused) -> ApiError {
    match why {
        Refused::PerUser => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_streams",
            "this user holds as many event streams as the hub allows; close one, or check for changes instead",
        )
        .retry_after(FULL_RETRY_AFTER_SECS),
        Refused::PerAddress => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_streams",
            "this address holds as many event streams as the hub allows",
        )
        .retry_after(FULL_RETRY_AFTER_SECS),
        Refused::Stopping => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "stopping", "the hub is stopping; reconnect").retry_after(1)
        }
    }
}

/// A stream's answer body: its first frames, then its source's, until the token expires, the
/// source ends or the client goes.
struct EventBody<S> {
    first: VecDeque<Bytes>,
    source: S,
    expires: Option<Pin<Box<Sleep>>>,
    ended: bool,
}

impl<S: Source> hyper::body::Body for EventBody<S> {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some(frame) = this.first.pop_front() {
            if this.first.is_empty() {
                this.first = VecDeque::new();
            }
            return Poll::Ready(Some(Ok(Frame::data(frame))));
        }
        if let Some(expires) = &mut this.expires
            && expires.as_mut().poll(cx).is_ready()
        {
            this.ended = true;
            this.source.expired();
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(REAUTH)))));
        }
        this.source.poll_frame(cx).map(|frame| frame.map(|f| Ok(Frame::data(f))))
    }
}
