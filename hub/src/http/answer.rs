//! Every answer the sync API gives, shaped in one place from what the domain returns: the
//! protocol's answer types as JSON that no cache stores, with `ETag` (the epoch and the
//! version) and `304` for a `get`.
//! Decides nothing about the data.

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use protocol::{
    BatchAnswer, DataType, DeltaAnswer, ErrorAnswer, GetAnswer, GetManyAnswer, PushAnswer, RecordState,
    TimestampAnswer, TimestampsAnswer,
};
use serde::Serialize;
use serde_json::Value;

use crate::domain::Written;
use crate::store::{Record, Stamp};
use crate::time::rfc3339_ms;

/// A JSON answer that no cache stores.
pub(crate) fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let bytes = serde_json::to_vec(body).expect("answers serialize");
    let mut response = (status, Bytes::from(bytes)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

pub(crate) fn record_state(record: &Record) -> RecordState {
    RecordState {
        data: record.data.clone(),
        last_updated: record.updated_ms.map(rfc3339_ms),
        version: record.version,
    }
}

/// `action=timestamp`: flat for one data type (`single`), a `timestamps` map for a list.
pub(super) fn timestamps(types: &[DataType], stamps: Vec<Stamp>, single: bool, epoch: String) -> Response {
    if single {
        let stamp = stamps[0];
        return json(
            StatusCode::OK,
            &TimestampAnswer {
                success: true,
                data_type: types[0],
                last_updated: stamp.updated_ms.map(rfc3339_ms),
                version: stamp.version,
                epoch,
            },
        );
    }
    let timestamps = types
        .iter()
        .zip(stamps)
        .map(|(t, s)| {
            (*t, protocol::Stamp { last_updated: s.updated_ms.map(rfc3339_ms), version: s.version })
        })
        .collect();
    json(StatusCode::OK, &TimestampsAnswer { success: true, timestamps, epoch })
}

/// `action=get`: flat for one data type (`single`), with the epoch and its version as the
/// `ETag` and a `304` when `If-None-Match` names it; a `records` map for a list.
pub(super) fn records(
    types: &[DataType],
    records: Vec<Record>,
    single: bool,
    epoch: String,
    request: &HeaderMap,
) -> Response {
    if !single {
        let records = types.iter().copied().zip(records.iter().map(record_state)).collect();
        return json(StatusCode::OK, &GetManyAnswer { success: true, records, epoch });
    }
    let record = &records[0];
    // The hub makes its epochs of base64url; one edited into the database that is no header
    // value costs the answer its ETag, nothing more.
    let etag = HeaderValue::from_str(&protocol::wire::etag(&epoch, record.version)).ok();
    if let Some(etag) = etag.clone()
        && if_none_match(request, &etag)
    {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        let headers = response.headers_mut();
        headers.insert(header::ETAG, etag);
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return response;
    }
    let state = record_state(record);
    let mut response = json(
        StatusCode::OK,
        &GetAnswer {
            success: true,
            data_type: types[0],
            data: state.data,
            last_updated: state.last_updated,
            version: state.version,
            epoch,
        },
    );
    // Stored by no cache either (`json` says `no-store`), and its ETag names the epoch: a
    // browser revalidating a stored answer after a restore must not get 304 for a record of
    // another database at the same version. The client sends back the ETag it was given, in
    // an `If-None-Match` of its own, which no browser cache answers.
    if let Some(etag) = etag {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

/// Whether `If-None-Match` names `etag` (or `*`); weak tags compare equal too.
fn if_none_match(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let etag = etag.to_str().unwrap_or_default();
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag
        })
}

/// `action=push`: the record as the write left it (`timestamp` is the seed's name for
/// `last_updated`).
pub(super) fn pushed(written: Written) -> Response {
    json(StatusCode::OK, &pushed_answer(written))
}

/// [`pushed`]'s body, for a batch's result.
pub(super) fn pushed_body(written: Written) -> Value {
    serde_json::to_value(pushed_answer(written)).expect("answers serialize")
}

fn pushed_answer(written: Written) -> PushAnswer {
    let Written { data_type, record, replayed } = written;
    let state = record_state(&record);
    PushAnswer {
        success: true,
        data_type,
        timestamp: state.last_updated.clone(),
        last_updated: state.last_updated,
        version: state.version,
        data: state.data,
        replayed,
    }
}

/// `action=delta`: the amount as the write left it.
pub(super) fn delta(written: Written) -> Response {
    json(StatusCode::OK, &delta_answer(written))
}

/// [`delta`]'s body, for a batch's result.
pub(super) fn delta_body(written: Written) -> Value {
    serde_json::to_value(delta_answer(written)).expect("answers serialize")
}

fn delta_answer(written: Written) -> DeltaAnswer {
    let Written { data_type, record, replayed } = written;
    let state = record_state(&record);
    DeltaAnswer {
        success: true,
        data_type,
        version: state.version,
        data: state.data,
        last_updated: state.last_updated,
        replayed,
    }
}

/// One result of a batch: the body the op alone would have got, with its status and op id.
pub(super) fn batch_result(status: StatusCode, mut body: Value, op_id: &str) -> Value {
    if let Value::Object(fields) = &mut body {
        fields.insert("status".into(), Value::from(status.as_u16()));
        fields.insert("op_id".into(), Value::from(op_id));
    }
    body
}

/// The result of an op a batch did not reach: sent again later, it keeps its order.
pub(super) fn not_attempted(op_id: &str) -> Value {
    let body = serde_json::to_value(ErrorAnswer {
        success: false,
        code: "not_attempted".into(),
        error: "an earlier op of the batch failed for a reason worth retrying; send this one again after it"
            .into(),
        current: None,
    })
    .expect("answers serialize");
    batch_result(StatusCode::SERVICE_UNAVAILABLE, body, op_id)
}

/// `action=batch`: the results, in the order of the ops.
pub(super) fn batch(results: Vec<Value>) -> Response {
    json(StatusCode::OK, &BatchAnswer { success: true, results })
}
