//! Push data and deltas shaped like each record type, drawn from the fuzzer's bytes, through
//! `validate_push`, `merge_patch`, `validate_record` and `validate_delta` as the hub applies
//! them. Proves that every refusal is a well-formed 4xx (a 403 only for roles), that an
//! accepted patch keeps the data rules and validates to itself, that a record built from a
//! series of accepted patches keeps its type's rules, and that an accepted delta is a
//! non-zero integer within both limits.

#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use protocol::DataType;
use protocol_fuzz::{hub, input};

/// Pushes merged into one record per input.
const PUSHES: usize = 8;

fuzz_target!(|bytes: &[u8]| {
    // Drawing fails only when the bytes end early; everything drawn before was checked.
    let _ = run(&mut Unstructured::new(bytes));
});

/// One case: a delta, then a series of pushes into one record of type `t`.
fn run(u: &mut Unstructured) -> arbitrary::Result<()> {
    let t = input::data_type(u)?;
    let site = input::site(u)?;
    let admin = u.arbitrary()?;
    let limits = input::limits(u)?;
    let delta_type = if u.ratio(4, 5)? { *u.choose(&[DataType::Balance, DataType::Points])? } else { t };
    hub::change(delta_type, &input::delta(u, delta_type)?, limits);
    let mut record = t.empty_data();
    for _ in 0..PUSHES {
        let data = input::push_data(u, t)?;
        if let Some(patch) = hub::patch(t, &data, &site, admin) {
            record = hub::merged(t, &record, &patch, &site);
        }
    }
    Ok(())
}
