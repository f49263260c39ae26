//! Every action and data type over real HTTP against a real hub and SQLite file.

mod support;

use serde_json::json;
use support::TestHub;

#[tokio::test]
async fn a_delta_then_a_timestamp_check_reports_the_new_version() {
    let hub = TestHub::start().await;
    let faucet = hub.site("roflfaucet", "8-evans");
    faucet.delta("balance", 10, "op-1").await.assert_ok();
    let stamp = faucet.timestamp("balance").await;
    assert_eq!(stamp.assert_ok()["version"], 1);
    assert_eq!(faucet.coins().await, 10);
    faucet.push("profile", json!({"bio": "Kenya reforestation"})).await.assert_ok();
    hub.stop().await;
}
