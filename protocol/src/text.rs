//! Plain-text normalization. Text is stored and shown as text, never as markup: the hub
//! refuses control characters, drops invisible direction overrides and trims; clients
//! render the result with `textContent`.

use alloc::{borrow::ToOwned, format, string::String};

use crate::Refusal;

/// Whether a field may hold line breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lines {
    Single,
    Multi,
}

/// Why [`walk`] refused a text; [`normalize`] says it in a refusal's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unclean {
    ControlCharacter(char),
    /// The text's length in characters, after normalization.
    TooLong(usize),
}

/// Normalizes user text: CRLF, CR and the Unicode line and paragraph separators become LF
/// (multi-line fields only; single-line fields refuse them), tabs become spaces, direction
/// marks and overrides and byte-order marks are dropped, surrounding whitespace is trimmed.
/// Other control characters are refused, as is text over `max_chars` characters.
pub(crate) fn normalize(field: &str, s: &str, max_chars: usize, lines: Lines) -> Result<String, Refusal> {
    let mut out = String::with_capacity(s.len());
    walk(s, max_chars, lines, |c| out.push(c)).map_err(|unclean| match unclean {
        Unclean::ControlCharacter(c) => Refusal::invalid(
            "control_characters",
            format!("{field} contains a control character (U+{:04X})", c as u32),
        ),
        Unclean::TooLong(count) => Refusal::invalid(
            "text_too_long",
            format!("{field} is {count} characters long; at most {max_chars} are allowed"),
        ),
    })?;
    let trimmed = out.trim();
    Ok(if trimmed.len() == out.len() { out } else { trimmed.to_owned() })
}

/// Whether [`normalize`] accepts `s`: its rule, without a message or the normalized text.
pub(crate) fn acceptable(s: &str, max_chars: usize, lines: Lines) -> bool {
    walk(s, max_chars, lines, |_| {}).is_ok()
}

/// Reads `s` as [`normalize`] rewrites it, handing each character it keeps to `keep` (before
/// the trim), and refuses what it refuses.
fn walk(s: &str, max_chars: usize, lines: Lines, mut keep: impl FnMut(char)) -> Result<(), Unclean> {
    // Characters kept so far, and the places (1-based) of the first and the last that are
    // not whitespace: between them lies what the trim leaves.
    let (mut kept, mut first, mut last) = (0, 0, 0);
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        let c = match c {
            '\t' => ' ',
            '\r' | '\n' | '\u{2028}' | '\u{2029}' if lines == Lines::Multi => {
                if c == '\r' && chars.peek() == Some(&'\n') {
                    chars.next();
                }
                '\n'
            }
            '\u{200E}'
            | '\u{200F}'
            | '\u{061C}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}' => continue,
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                return Err(Unclean::ControlCharacter(c));
            }
            c => c,
        };
        keep(c);
        kept += 1;
        if !c.is_whitespace() {
            if first == 0 {
                first = kept;
            }
            last = kept;
        }
    }
    let count = if first == 0 { 0 } else { last - first + 1 };
    if count > max_chars { Err(Unclean::TooLong(count)) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_and_keeps_plain_text_including_markup_characters() {
        assert_eq!(
            normalize("bio", "  <img src=x onerror=alert(1)>  ", 500, Lines::Multi).unwrap(),
            "<img src=x onerror=alert(1)>"
        );
    }

    #[test]
    fn line_breaks_are_normalized_in_multi_line_fields_only() {
        assert_eq!(normalize("bio", "a\r\nb\rc\n", 500, Lines::Multi).unwrap(), "a\nb\nc");
        assert_eq!(
            normalize("display_name", "a\nb", 64, Lines::Single).unwrap_err().code,
            "control_characters"
        );
    }

    #[test]
    fn control_characters_are_refused() {
        for s in ["a\u{0}b", "a\u{7}", "\u{1b}[31m", "a\u{7f}", "a\u{85}"] {
            assert_eq!(
                normalize("bio", s, 500, Lines::Multi).unwrap_err().code,
                "control_characters",
                "{s:?}"
            );
        }
    }

    #[test]
    fn direction_overrides_are_dropped_and_emoji_sequences_kept() {
        assert_eq!(normalize("display_name", "a\u{200F}b\u{202E}cd", 64, Lines::Single).unwrap(), "abcd");
        let family = "👨\u{200D}👩\u{200D}👧";
        assert_eq!(normalize("avatar", family, 16, Lines::Single).unwrap(), family);
    }

    #[test]
    fn what_is_acceptable_is_what_normalizes() {
        for (s, max) in [("  a\u{200E} ", 1), ("\u{200E} \t", 0), ("a\tb", 3), ("a\r\nb", 3), ("a\u{7}", 9)] {
            for lines in [Lines::Single, Lines::Multi] {
                assert_eq!(
                    acceptable(s, max, lines),
                    normalize("f", s, max, lines).is_ok(),
                    "{s:?} {lines:?}"
                );
            }
        }
        assert!(acceptable("  a\u{200E} ", 1, Lines::Single));
        assert!(!acceptable("a\tb", 2, Lines::Single));
    }

    #[test]
    fn length_is_counted_in_characters() {
        assert!(normalize("display_name", &"é".repeat(64), 64, Lines::Single).is_ok());
        assert_eq!(
            normalize("display_name", &"é".repeat(65), 64, Lines::Single).unwrap_err().code,
            "text_too_long"
        );
    }
}
