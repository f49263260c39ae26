//! Identifiers that travel in requests, each checked once on the way in.

use alloc::{borrow::ToOwned, string::String};

use core::fmt;

use crate::Refusal;

/// Longest [`UserId`].
pub(crate) const MAX_USER_ID_CHARS: usize = 64;
/// Longest [`SiteId`].
pub(crate) const MAX_SITE_ID_CHARS: usize = 32;
/// Longest [`OpId`].
pub(crate) const MAX_OP_ID_CHARS: usize = 128;

/// A user's id, as the sites know it (`8-evans`): `[A-Za-z0-9._-]{1,64}`, never made of
/// dots alone, so it can never name a path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

/// A site's id (`roflfaucet`): `[a-z0-9_-]{1,32}`. It is the `iss` of the site's tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteId(String);

/// A client-made id for one write, so a retried write is applied once: 1–128 visible
/// ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OpId(String);

impl UserId {
    pub fn parse(s: &str) -> Result<Self, Refusal> {
        let ok = (1..=MAX_USER_ID_CHARS).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && !s.bytes().all(|b| b == b'.');
        if ok {
            Ok(UserId(s.to_owned()))
        } else {
            Err(Refusal::invalid(
                "invalid_user_id",
                "user_id must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-', and not only dots",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl SiteId {
    pub fn parse(s: &str) -> Result<Self, Refusal> {
        if is_name(s, MAX_SITE_ID_CHARS) {
            Ok(SiteId(s.to_owned()))
        } else {
            Err(Refusal::invalid(
                "invalid_site_id",
                "site_id must be 1-32 characters of a-z, 0-9, '_' or '-'",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl OpId {
    pub fn parse(s: &str) -> Result<Self, Refusal> {
        if (1..=MAX_OP_ID_CHARS).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(OpId(s.to_owned()))
        } else {
            Err(Refusal::invalid("invalid_op_id", "op_id must be 1-128 visible ASCII characters"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// When the op was made, in milliseconds since the Unix epoch, if its id is a UUIDv7
    /// (`xxxxxxxx-xxxx-7xxx-[89ab]xxx-xxxxxxxxxxxx`, lowercase): the first 48 bits. Ids of
    /// other shapes carry no date.
    pub fn dated_ms(&self) -> Option<i64> {
        uuid7_ms(&self.0)
    }
}

/// The time a UUIDv7 carries (see [`OpId::dated_ms`]).
pub fn uuid7_ms(id: &str) -> Option<i64> {
    let b = id.as_bytes();
    let shaped = b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        })
        && b[14] == b'7'
        && matches!(b[19], b'8' | b'9' | b'a' | b'b');
    if !shaped {
        return None;
    }
    let hex: String = id[..8].chars().chain(id[9..13].chars()).collect();
    i64::from_str_radix(&hex, 16).ok()
}

/// `[a-z0-9_-]{1,max}`: the alphabet of site ids and role names.
pub(crate) fn is_name(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    )*};
}
display_as_str!(UserId, SiteId, OpId);

#[cfg(test)]
mod tests {

    #[test]
    fn a_uuid7_op_id_is_dated_and_other_shapes_are_not() {
        let dated = |s: &str| OpId::parse(s).unwrap().dated_ms();
        // 0x019af0c1a2b3 ms after the epoch: 2025-12-…
        assert_eq!(dated("019af0c1-a2b3-7def-8123-456789abcdef"), Some(0x019a_f0c1_a2b3));
        assert_eq!(dated("019af0c1-a2b3-4def-8123-456789abcdef"), None, "a UUIDv4");
        assert_eq!(dated("019af0c1-a2b3-7def-c123-456789abcdef"), None, "another variant");
        assert_eq!(dated("019AF0C1-A2B3-7DEF-8123-456789ABCDEF"), None, "upper case");
        assert_eq!(dated("roflfaucet-0123456789abcdef0123456789abcdef"), None);
        assert_eq!(dated("019af0c1a2b37def8123456789abcdef"), None, "no dashes");
    }

    use super::*;

    #[test]
    fn seed_user_ids_are_accepted() {
        for id in ["8-evans", "a", "user.name_1", &"x".repeat(64)] {
            assert!(UserId::parse(id).is_ok(), "{id}");
        }
    }

    #[test]
    fn path_like_and_oversized_user_ids_are_refused() {
        for id in ["", ".", "..", "../etc/passwd", "a/b", "a\\b", "a b", "é", &"x".repeat(65), "a\0"] {
            assert_eq!(UserId::parse(id).unwrap_err().code, "invalid_user_id", "{id:?}");
        }
    }

    #[test]
    fn site_ids_are_lowercase_names() {
        assert!(SiteId::parse("roflfaucet").is_ok());
        assert!(SiteId::parse("click-for_charity2").is_ok());
        for id in ["", "ROFL", "a.b", &"x".repeat(33)] {
            assert!(SiteId::parse(id).is_err(), "{id:?}");
        }
    }

    #[test]
    fn op_ids_are_visible_ascii() {
        assert!(OpId::parse("4f0c2a9e-1b7d-4c52-9a0e-3c2d1b0a9f8e").is_ok());
        for id in ["", "a b", "\n", &"x".repeat(129), "ü"] {
            assert!(OpId::parse(id).is_err(), "{id:?}");
        }
    }
}
