//! A POST body, as raw bytes, through `PostRequest::parse` and then every check the hub
//! applies to a push or a delta. Proves that no body makes the protocol panic; that every
//! refusal is a well-formed 4xx with a short message, a 405 only for a GET action and never
//! a 403 from the parser; that an accepted request serializes back to itself; and that what
//! the hub's checks accept keeps the data rules.

#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::{PostRequest, RefusalKind};
use protocol_fuzz::{check, hub};
use serde_json::Value;

fuzz_target!(|body: &[u8]| {
    match PostRequest::parse(body) {
        Ok(request) => {
            let again = PostRequest::parse(request.to_json().to_string().as_bytes());
            assert!(
                again.as_ref().is_ok_and(|again| again.to_json() == request.to_json()),
                "{request:?} serializes to what parses as {again:?}"
            );
            hub::post(&request);
        }
        Err(r) => {
            check::refusal(&r);
            assert_ne!(r.kind, RefusalKind::Forbidden, "{r:?}");
            let value = serde_json::from_slice::<Value>(body);
            if r.kind == RefusalKind::WrongMethod {
                let action = value.as_ref().ok().and_then(|v| v.get("action")).and_then(Value::as_str);
                assert!(matches!(action, Some("get" | "timestamp")), "{r:?}");
            }
            assert_eq!(r.code == "invalid_json", value.is_err(), "{r:?}");
        }
    }
});
