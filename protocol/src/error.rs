//! Why a request is refused: a stable snake_case code for programs, a message for people.

use alloc::string::String;

use core::fmt;

/// Which family of HTTP status a refusal maps to. The protocol names the family; the hub
/// picks the status line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// The request is malformed or breaks a data rule (400).
    Invalid,
    /// The caller may not do this, however well-formed the request is (403).
    Forbidden,
    /// The action exists but belongs to the other HTTP method (405).
    WrongMethod,
}

/// A request the protocol's rules refuse before anything is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    /// Stable machine-readable code, e.g. `text_too_long`.
    pub code: &'static str,
    /// Human-readable explanation naming the offending field.
    pub message: String,
}

impl Refusal {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Refusal { kind: RefusalKind::Invalid, code, message: message.into() }
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Refusal { kind: RefusalKind::Forbidden, code, message: message.into() }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl core::error::Error for Refusal {}
