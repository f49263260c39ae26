//! What a token may do: the scope names of the `scope` claim (space-separated, as in
//! RFC 9068), fixed so that every site's backend can rely on them, and the sets the hub
//! starts from. Says nothing about who may sign which scope: that is the hub's
//! configuration.

use alloc::{borrow::ToOwned, string::String};

use core::fmt;

/// One permission a token can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `timestamp` and `get` of the token's own user.
    SyncRead,
    /// Merge patches into `profile`.
    ProfileWrite,
    /// Merge patches into `settings`.
    SettingsWrite,
    /// Negative deltas on balance and points.
    AmountsSpend,
    /// Positive deltas on balance and points (a page needs a grant instead).
    AmountsCredit,
    /// Absolute pushes of balance and points.
    AmountsSet,
    /// The token's own site's `site_roles`.
    RolesWrite,
    /// A site-wide feed of changes, for the site's backend.
    ChangesRead,
}

impl Scope {
    pub const ALL: [Scope; 8] = [
        Scope::SyncRead,
        Scope::ProfileWrite,
        Scope::SettingsWrite,
        Scope::AmountsSpend,
        Scope::AmountsCredit,
        Scope::AmountsSet,
        Scope::RolesWrite,
        Scope::ChangesRead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::SyncRead => "sync:read",
            Scope::ProfileWrite => "profile:write",
            Scope::SettingsWrite => "settings:write",
            Scope::AmountsSpend => "amounts:spend",
            Scope::AmountsCredit => "amounts:credit",
            Scope::AmountsSet => "amounts:set",
            Scope::RolesWrite => "roles:write",
            Scope::ChangesRead => "changes:read",
        }
    }

    /// The scope called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == name)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of scopes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Scopes(u8);

impl Scopes {
    /// What a browser page's token holds, and what a token without `scope` gets: read, edit
    /// the profile and settings, spend. Credits come with a grant from the site's backend.
    pub const PAGE: Scopes =
        Scopes::of(&[Scope::SyncRead, Scope::ProfileWrite, Scope::SettingsWrite, Scope::AmountsSpend]);

    /// What a site's key may sign unless its configuration says otherwise: the page set,
    /// credits, its own roles and the feed of changes — not absolute amounts.
    pub const SITE_DEFAULT: Scopes = Scopes::of(&[
        Scope::SyncRead,
        Scope::ProfileWrite,
        Scope::SettingsWrite,
        Scope::AmountsSpend,
        Scope::AmountsCredit,
        Scope::RolesWrite,
        Scope::ChangesRead,
    ]);

    /// Every scope.
    pub const ALL: Scopes = Scopes::of(&Scope::ALL);

    pub const fn of(scopes: &[Scope]) -> Scopes {
        let mut bits = 0;
        let mut i = 0;
        while i < scopes.len() {
            bits |= 1 << scopes[i] as u8;
            i += 1;
        }
        Scopes(bits)
    }

    /// Reads a `scope` claim: names separated by spaces. Fails with the first name that is no
    /// scope.
    pub fn parse(claim: &str) -> Result<Scopes, String> {
        let mut scopes = Scopes::default();
        for name in claim.split(' ').filter(|n| !n.is_empty()) {
            let scope = Scope::from_name(name).ok_or_else(|| name.to_owned())?;
            scopes.0 |= scope.bit();
        }
        Ok(scopes)
    }

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// Whether every scope of `self` is in `other`.
    pub fn is_subset(self, other: Scopes) -> bool {
        self.0 & !other.0 == 0
    }

    /// The scopes of `self` that are not in `other`.
    pub fn without(self, other: Scopes) -> Scopes {
        Scopes(self.0 & !other.0)
    }

    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.contains(*s))
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Scopes {
        Scopes(iter.into_iter().fold(0, |bits, s| bits | s.bit()))
    }
}

/// The claim's form: names separated by single spaces, in a fixed order.
impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, scope) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(scope.as_str())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scopes({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_reads_back_as_written() {
        let scopes = Scopes::parse("amounts:set  sync:read").unwrap();
        assert!(scopes.contains(Scope::AmountsSet) && scopes.contains(Scope::SyncRead));
        assert!(!scopes.contains(Scope::AmountsCredit));
        assert_eq!(scopes.to_string(), "sync:read amounts:set");
        assert_eq!(Scopes::parse(&Scopes::ALL.to_string()), Ok(Scopes::ALL));
    }

    #[test]
    fn an_unknown_name_is_named() {
        assert_eq!(Scopes::parse("sync:read coins:mint"), Err("coins:mint".to_owned()));
        assert_eq!(Scopes::parse("SYNC:READ"), Err("SYNC:READ".to_owned()));
    }

    #[test]
    fn the_page_set_spends_but_neither_credits_nor_sets() {
        assert!(Scopes::PAGE.contains(Scope::AmountsSpend));
        assert!(!Scopes::PAGE.contains(Scope::AmountsCredit));
        assert!(!Scopes::PAGE.contains(Scope::AmountsSet));
        assert!(!Scopes::PAGE.contains(Scope::RolesWrite));
        assert!(Scopes::PAGE.is_subset(Scopes::SITE_DEFAULT));
        assert!(!Scopes::SITE_DEFAULT.contains(Scope::AmountsSet));
        assert_eq!(Scopes::ALL.without(Scopes::SITE_DEFAULT).to_string(), "amounts:set");
    }
}
