//! The five kinds of record a user has.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Refusal;

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

    pub fn parse(s: &str) -> Result<Self, Refusal> {
        DataType::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| {
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

    /// The data a record holds before its first write.
    pub fn empty_data(self) -> serde_json::Value {
        match self {
            DataType::Balance => serde_json::json!({ "coins": 0 }),
            DataType::Points => serde_json::json!({ "points": 0 }),
            DataType::Roles => serde_json::json!({ "global_roles": [], "site_roles": {} }),
            DataType::Profile | DataType::Settings => serde_json::json!({}),
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
    fn unknown_types_are_refused_even_inside_a_list() {
        assert_eq!(parse_data_types("balance,coins").unwrap_err().code, "invalid_data_type");
        assert!(parse_data_types("").is_err());
        assert!(parse_data_types("Balance").is_err());
    }
}
