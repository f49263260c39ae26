//! The five kinds of record a user has.

use alloc::{format, string::String, vec::Vec};

use core::fmt;

use serde::{Deserialize, Serialize};

use crate::Refusal;
use crate::wire::JsonWrite;

/// One kind of user record; each `(user, data_type)` pair is one versioned record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    Balance,
    Points,
    Profile,
    Roles,
    Settings,
}

impl DataType {
    pub const ALL: [DataType; 5] =
        [DataType::Balance, DataType::Points, DataType::Profile, DataType::Roles, DataType::Settings];

    /// The type called `name`, if there is one. Builds no message, unlike [`DataType::parse`]:
    /// the browser build carries no formatting machinery for one.
    pub fn from_name(name: &str) -> Option<Self> {
        DataType::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// The type called `s`, or a refusal naming the valid ones.
    pub fn parse(s: &str) -> Result<Self, Refusal> {
        DataType::from_name(s).ok_or_else(|| {
            Refusal::invalid(
                "invalid_data_type",
                format!(
                    "unknown data_type \"{}\"; expected one of balance, points, profile, roles, settings",
                    truncate(s)
                ),
            )
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Balance => "balance",
            DataType::Points => "points",
            DataType::Profile => "profile",
            DataType::Roles => "roles",
            DataType::Settings => "settings",
        }
    }

    /// This type's position in [`DataType::ALL`]: the one way to keep something per type in
    /// an array.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The data a record holds before its first write.
    pub fn empty_data(self) -> serde_json::Value {
        self.empty()
    }

    /// [`DataType::empty_data`] in any JSON value type.
    pub fn empty<J: JsonWrite>(self) -> J {
        match (crate::amount_field(self), self) {
            (Some(amount), _) => J::object().with(amount, J::integer(0)),
            (None, DataType::Roles) => {
                J::object().with("global_roles", J::array()).with("site_roles", J::object())
            }
            (None, _) => J::object(),
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses `balance` or a comma list `balance,profile,roles` (duplicates dropped, order kept).
pub fn parse_data_types(s: &str) -> Result<Vec<DataType>, Refusal> {
    let mut types = Vec::new();
    for part in s.split(',') {
        let t = DataType::parse(part.trim())?;
        if !types.contains(&t) {
            types.push(t);
        }
    }
    Ok(types)
}

/// Echoing hostile input back in an error message is kept short.
pub(crate) fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comma_lists_keep_order_and_drop_duplicates() {
        assert_eq!(
            parse_data_types("roles,balance, roles").unwrap(),
            vec![DataType::Roles, DataType::Balance]
        );
    }

    #[test]
    fn every_type_is_found_by_its_name_and_indexed_by_its_place() {
        for (i, t) in DataType::ALL.into_iter().enumerate() {
            assert_eq!(DataType::from_name(t.as_str()), Some(t));
            assert_eq!(t.index(), i);
        }
        assert_eq!(DataType::from_name("Balance"), None);
        assert_eq!(DataType::Roles.empty_data(), serde_json::json!({"global_roles": [], "site_roles": {}}));
    }

    #[test]
    fn unknown_types_are_refused_even_inside_a_list() {
        assert_eq!(parse_data_types("balance,coins").unwrap_err().code, "invalid_data_type");
        assert!(parse_data_types("").is_err());
        assert!(parse_data_types("Balance").is_err());
    }
}
