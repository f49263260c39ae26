//! The HTTP face of every failure: a status, a stable code and a message, as
//! `{"success":false,"code":…,"error":…}`. Internal details go to the log, never the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use protocol::{ErrorAnswer, Refusal, RefusalKind};

use super::logs::Code;
use super::{json, record_state};
use crate::auth::AuthError;
use crate::domain::DomainError;
use crate::limit::RetryAfter;
use crate::store::{Record, Rejection, StoreError};

/// A refused or failed request, ready to be answered.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The record as it stands, for conflicts.
    current: Option<Record>,
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), current: None, retry_after: None }
    }

    /// Tells the client to wait `secs` seconds before it sends again (`Retry-After`).
    pub(super) fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }

    fn with_current(mut self, record: Record) -> ApiError {
        self.current = Some(record);
        self
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        let status = match r.kind {
            RefusalKind::Invalid => StatusCode::BAD_REQUEST,
            RefusalKind::Forbidden => StatusCode::FORBIDDEN,
            RefusalKind::WrongMethod => StatusCode::METHOD_NOT_ALLOWED,
        };
        ApiError::new(status, r.code, r.message)
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, e.code(), e.to_string())
    }
}

impl From<RetryAfter> for ApiError {
    fn from(RetryAfter(secs): RetryAfter) -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many requests; retry in {secs} s"),
        )
        .retry_after(secs)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Malformed(_) => {
                tracing::error!(error = %e, "store failure");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the hub failed; nothing was changed",
                )
            }
            StoreError::Unavailable(_) | StoreError::Busy(_) | StoreError::Conflict(_) => {
                tracing::warn!(error = %e, "store unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the hub's storage is unavailable; retry later",
                )
                .retry_after(1)
            }
            StoreError::Database(_) | StoreError::Closed | StoreError::Open(_) => {
                tracing::error!(error = %e, "store unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the hub's storage is unavailable; retry later",
                )
            }
        }
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> ApiError {
        match e {
            DomainError::Rejected(r) => r.into(),
            DomainError::OpIdReused => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "op_id_reused", e.to_string())
            }
            DomainError::Store(s) => s.into(),
        }
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> ApiError {
        let message = r.to_string();
        match r {
            Rejection::Refused(r) => r.into(),
            Rejection::VersionConflict(current) => {
                ApiError::new(StatusCode::CONFLICT, "version_conflict", message).with_current(current)
            }
            Rejection::InsufficientFunds(current) => {
                ApiError::new(StatusCode::CONFLICT, "insufficient_funds", message).with_current(current)
            }
            Rejection::CreditLimit(current, _) => {
                ApiError::new(StatusCode::FORBIDDEN, "credit_limit", message).with_current(current)
            }
            Rejection::GrantExpired => ApiError::new(StatusCode::FORBIDDEN, "grant_expired", message),
            Rejection::OpExpired => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "op_expired", message),
        }
    }
}

impl ApiError {
    /// The answer's body, as JSON.
    pub(super) fn body(&self) -> serde_json::Value {
        serde_json::to_value(self.answer()).expect("answers serialize")
    }

    fn answer(&self) -> ErrorAnswer {
        ErrorAnswer {
            success: false,
            code: self.code.into(),
            error: self.message.clone(),
            current: self.current.as_ref().map(record_state),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = json(self.status, &self.answer());
        response.extensions_mut().insert(Code(self.code));
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, POST, OPTIONS"));
        }
        response
    }
}
