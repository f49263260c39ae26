//! A GET query string, as raw bytes, read into a `GetQuery` the way the hub reads it
//! (serde_urlencoded), then its action, user id and data type list checked as the hub does.
//! Proves that no query makes the protocol panic, that every refusal is a well-formed 4xx
//! with a short message and a 405 exactly for a POST action, and that an accepted data type
//! list names each type once.

#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::GetQuery;
use protocol_fuzz::hub;

fuzz_target!(|query: &[u8]| {
    // A query serde_urlencoded cannot read is the hub's own 400 (`invalid_query`).
    if let Ok(q) = serde_urlencoded::from_bytes::<GetQuery>(query) {
        hub::query(&q);
    }
});
