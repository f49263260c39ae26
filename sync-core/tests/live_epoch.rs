//! What a stream's events may do to the cache while a write of their type is on its way,
//! across a change of the hub's epoch: nothing of the old database outlives it.

mod support;

use serde_json::json;
use support::{Sim, Tab, action_of};
use sync_core::{DataType, Method, STREAM_GRACE_MS};

const SITE_A: &str = "roflfaucet";

fn one_live_tab() -> (Sim, Tab) {
    let sim = Sim::new();
    sim.hub_write(DataType::Balance, json!({ "coins": 100 }));
    let a = sim.open_live(SITE_A);
    assert!(a.login());
    assert!(a.live());
    (sim, a)
}

/// An event brought while the tab's own spend is on its way is put aside until the spend's
/// answer. If the hub's database is replaced meanwhile (a new epoch: the tab drops its cache
/// and checks), what was put aside belongs to the old database and must not be stored over
/// the new one's record when the spend is answered.
#[test]
fn an_event_put_aside_before_a_new_epoch_is_not_stored_after_it() {
    let (sim, a) = one_live_tab();
    // The tab's spend leaves, and is held on the way to the hub.
    sim.net().hold_when(|p| !p.is_reply() && p.request().method == Method::Post);
    a.apply_delta(-5).unwrap();
    sim.run_for(50);
    assert_eq!(a.pending().len(), 1);
    // Another site's writes reach the tab's stream while the spend is on its way: put aside.
    for coins in [5000, 6000, 7000] {
        sim.hub_write(DataType::Balance, json!({ "coins": coins }));
        sim.run_for(50);
    }
    assert_eq!(sim.net().held().len(), 1, "the spend is still on its way");
    // The hub's database is replaced; the tab's stream closes (hidden past the grace) and, on
    // its return, resumes on the new database: `resync`, a new epoch, the cache dropped, one
    // check, which finds the new database's balance.
    a.hide();
    sim.run_for(STREAM_GRACE_MS + 1);
    sim.hub().replace_database("epoch-2");
    sim.hub_write(DataType::Balance, json!({ "coins": 100 }));
    let mark = a.mark();
    a.show();
    sim.run_for(500);
    let asked: Vec<String> = a.requests_since(mark).iter().map(|(_, r)| action_of(r)).collect();
    assert!(asked.contains(&"timestamp".to_owned()), "the new epoch checks: {asked:?}");
    assert_eq!(a.persisted().epoch.as_deref(), Some("epoch-2"));
    assert_eq!(a.record(DataType::Balance).unwrap().version, 1, "the new database's record");
    // The spend arrives at the new database and is answered.
    sim.release();
    sim.drive();
    assert_eq!(sim.hub_coins(), 95);
    assert!(a.pending().is_empty());
    assert_eq!(
        a.coins(),
        95,
        "the tab shows a balance of the replaced database (put aside before the new epoch); \
         the hub has 95, record {:?}",
        a.record(DataType::Balance)
    );
}
