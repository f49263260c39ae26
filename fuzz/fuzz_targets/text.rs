//! Any text, from the fuzzer's bytes read as UTF-8 (invalid sequences replaced), through
//! every parser of a single field: the three ids, data types and their lists, a delta's
//! reason, each profile field and a setting. Proves that each id parser accepts exactly its
//! documented alphabet and length, that normalized text keeps the text rules (no control
//! characters, no direction marks, trimmed, bounded) and normalizes to itself, that a
//! website is an http(s) URL, and that every refusal is a well-formed 4xx.

#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::{DataType, OpId, SiteId, UserId};
use protocol_fuzz::check::{self, PROFILE_FIELDS, accepted};
use protocol_fuzz::{hub, input};
use serde_json::{Map, Value};

fuzz_target!(|bytes: &[u8]| {
    let s = String::from_utf8_lossy(bytes);
    ids(&s);
    if let Some(t) = accepted(DataType::parse(&s)) {
        assert_eq!(t.as_str(), s, "data type");
    }
    hub::data_types(&s);
    hub::reason(&s);

    let site = SiteId::parse(input::SITE).expect("a site id");
    for (t, field) in
        PROFILE_FIELDS.iter().map(|f| (DataType::Profile, f.0)).chain([(DataType::Settings, "theme")])
    {
        let data = Value::Object(Map::from_iter([(field.to_owned(), Value::from(s.as_ref()))]));
        hub::patch(t, &data, &site, false);
    }
});

/// Each id parser accepts exactly its documented language, and keeps the id as sent.
fn ids(s: &str) {
    let len = s.chars().count();
    let user = (1..=64).contains(&len)
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !s.chars().all(|c| c == '.');
    let site = check::is_name(s, 32);
    let op = (1..=128).contains(&len) && s.chars().all(|c| ('!'..='~').contains(&c));
    assert_eq!(accepted(UserId::parse(s)).map(|id| id.as_str().to_owned()), user.then(|| s.to_owned()));
    assert_eq!(accepted(SiteId::parse(s)).map(|id| id.as_str().to_owned()), site.then(|| s.to_owned()));
    assert_eq!(accepted(OpId::parse(s)).map(|id| id.as_str().to_owned()), op.then(|| s.to_owned()));
}
