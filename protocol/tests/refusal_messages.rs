//! Regression tests found by fuzzing (`cargo xtask fuzz`, target `post_body`): a refusal's
//! message echoes hostile input only in short excerpts, however long the request.

use protocol::PostRequest;

/// The longest message the fuzz targets allow a refusal.
const MAX_MESSAGE_CHARS: usize = 512;

fn refusal(body: &str) -> (&'static str, String) {
    let r = PostRequest::parse(body.as_bytes()).expect_err("a malformed body");
    (r.code, r.message)
}

#[test]
fn a_long_unknown_field_is_not_echoed_whole() {
    let long = "\u{202e}".repeat(5000);
    let (code, message) = refusal(&format!(r#"{{"action":"push","{long}":1}}"#));
    assert_eq!(code, "invalid_request");
    assert!(message.starts_with("push: unknown field"), "{message}");
    assert!(message.chars().count() <= MAX_MESSAGE_CHARS, "{} characters", message.chars().count());
}

#[test]
fn a_long_value_of_the_wrong_type_is_not_echoed_whole() {
    let long = "A".repeat(5000);
    let body = format!(
        r#"{{"action":"delta","user_id":"u","site_id":"s","data_type":"balance","delta":"{long}","op_id":"o"}}"#
    );
    let (code, message) = refusal(&body);
    assert_eq!(code, "invalid_request");
    assert!(message.chars().count() <= MAX_MESSAGE_CHARS, "{} characters", message.chars().count());
    let push = format!(
        r#"{{"action":"push","user_id":"u","site_id":"s","data_type":"balance","data":{{}},"base_version":"{long}"}}"#
    );
    let (code, message) = refusal(&push);
    assert_eq!(code, "invalid_request");
    assert!(message.chars().count() <= MAX_MESSAGE_CHARS, "{} characters", message.chars().count());
}

#[test]
fn a_long_repeated_field_is_not_echoed_whole() {
    let long = "k".repeat(5000);
    let (code, message) = refusal(&format!(r#"{{"action":"push","{long}":1,"{long}":2}}"#));
    assert_eq!(code, "invalid_request");
    assert!(message.contains("twice"), "{message}");
    assert!(message.chars().count() <= MAX_MESSAGE_CHARS, "{} characters", message.chars().count());
}

#[test]
fn a_short_message_is_kept_whole() {
    let (code, message) =
        refusal(r#"{"action":"push","user_id":"u","site_id":"s","data_type":"balance","data":{},"extra":1}"#);
    assert_eq!(code, "invalid_request");
    assert!(message.starts_with("push: unknown field `extra`, expected one of"), "{message}");
    assert!(!message.contains('…'), "{message}");
}
