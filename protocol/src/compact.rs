//! Building strings in the browser build: `core::fmt` and `[..].concat()` (whose copy loops
//! are specialized for every separator length) would cost the client's package more than all
//! that it formats. These do the little it needs, and nothing else.

use alloc::string::String;

/// `parts` one after another.
pub fn concat(parts: &[&str]) -> String {
    let mut out = String::new();
    for part in parts {
        out.push_str(part);
    }
    out
}

/// The decimal digits of `n`.
pub fn decimal(n: u64) -> String {
    let mut out = String::new();
    let mut unit = 1;
    while n / unit >= 10 {
        unit *= 10;
    }
    while unit > 0 {
        out.push(char::from(b'0' + (n / unit % 10) as u8));
        unit /= 10;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_in_decimal_and_parts_in_order() {
        for n in [0, 7, 10, 99, 1_000_000, u64::MAX] {
            assert_eq!(decimal(n), n.to_string());
        }
        assert_eq!(concat(&["a", "", "bc"]), "abc");
        assert_eq!(concat(&[]), "");
    }
}
