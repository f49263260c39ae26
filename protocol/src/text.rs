//! Plain-text normalization. Text is stored and shown as text, never as markup: the hub
//! refuses control characters, drops invisible direction overrides and trims; clients
//! render the result with `textContent`.

use crate::Refusal;

/// Whether a field may hold line breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lines {
    Single,
    Multi,
}

/// Why [`clean`] refused a text; [`normalize`] says it in a refusal's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unclean {
    ControlCharacter(char),
    /// The text's length in characters, after normalization.
    TooLong(usize),
}

/// Normalizes user text: CRLF, CR and the Unicode line and paragraph separators become LF
/// (multi-line fields only; single-line fields refuse them), tabs become spaces, direction
/// marks and overrides and byte-order marks are dropped, surrounding whitespace is trimmed.
/// Other control characters are refused, as is text over `max_chars` characters.
pub(crate) fn normalize(field: &str, s: &str, max_chars: usize, lines: Lines) -> Result<String, Refusal> {
    clean(s, max_chars, lines).map_err(|unclean| match unclean {
        Unclean::ControlCharacter(c) => Refusal::invalid(
            "control_characters",
            format!("{field} contains a control character (U+{:04X})", c as u32),
        ),
        Unclean::TooLong(count) => Refusal::invalid(
            "text_too_long",
            format!("{field} is {count} characters long; at most {max_chars} are allowed"),
        ),
    })
}

/// [`normalize`]'s rule, without the message.
pub(crate) fn clean(s: &str, max_chars: usize, lines: Lines) -> Result<String, Unclean> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\t' => out.push(' '),
            '\r' | '\n' | '\u{2028}' | '\u{2029}' if lines == Lines::Multi => {
                if c == '\r' && chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push('\n');
            }
            '\u{200E}'
            | '\u{200F}'
            | '\u{061C}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}' => {}
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                return Err(Unclean::ControlCharacter(c));
            }
            c => out.push(c),
        }
    }
    let trimmed = out.trim();
    let count = trimmed.chars().count();
    if count > max_chars {
        return Err(Unclean::TooLong(count));
    }
    Ok(if trimmed.len() == out.len() { out } else { trimmed.to_owned() })
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
    fn length_is_counted_in_characters() {
        assert!(normalize("display_name", &"é".repeat(64), 64, Lines::Single).is_ok());
        assert_eq!(
            normalize("display_name", &"é".repeat(65), 64, Lines::Single).unwrap_err().code,
            "text_too_long"
        );
    }
}
