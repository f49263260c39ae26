//! `merge_patch` over any two JSON documents drawn from the fuzzer's bytes. Proves that it
//! agrees with RFC 7396's reference algorithm, written here as the RFC states it; that a
//! patch applied twice gives what it gives once; that applying a patch to a non-object is
//! the patch without its null members; and that `validate_record` judges any merged record
//! of any type without panicking, refusing only with a well-formed 4xx.

#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use protocol::{DataType, merge_patch, validate_record};
use protocol_fuzz::{check, input};
use serde_json::{Map, Value};

/// How deep the drawn documents nest.
const DEPTH: u32 = 5;

fuzz_target!(|bytes: &[u8]| {
    let mut u = Unstructured::new(bytes);
    let Ok((target, patch)) = documents(&mut u) else { return };

    let mut merged = target.clone();
    merge_patch(&mut merged, &patch);
    assert_eq!(merged, rfc_7396(target.clone(), &patch), "target {target}, patch {patch}");

    let mut twice = merged.clone();
    merge_patch(&mut twice, &patch);
    assert_eq!(twice, merged, "patch {patch} applied twice");

    if !target.is_object() {
        assert_eq!(merged, without_nulls(&patch), "patch {patch} on {target}");
    }
    for t in DataType::ALL {
        if let Err(r) = validate_record(t, &merged) {
            check::refusal(&r);
        }
    }
});

/// A target and a patch; the patch is usually an object, as the protocol's patches are.
fn documents(u: &mut Unstructured) -> arbitrary::Result<(Value, Value)> {
    let target = input::json(u, DEPTH)?;
    let patch =
        if u.ratio(3, 4)? { Value::Object(input::object(u, DEPTH - 1)?) } else { input::json(u, DEPTH)? };
    Ok((target, patch))
}

/// RFC 7396 section 2, `MergePatch(Target, Patch)`, step by step.
fn rfc_7396(target: Value, patch: &Value) -> Value {
    let Value::Object(patch) = patch else { return patch.clone() };
    let mut target = match target {
        Value::Object(target) => target,
        _ => Map::new(),
    };
    for (name, value) in patch {
        if value.is_null() {
            target.remove(name);
        } else {
            let old = target.remove(name).unwrap_or(Value::Null);
            target.insert(name.clone(), rfc_7396(old, value));
        }
    }
    Value::Object(target)
}

/// `value` with every null object member removed, at any depth; arrays are kept as they are.
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(members) => Value::Object(
            members
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}
