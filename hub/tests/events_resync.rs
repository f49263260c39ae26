//! Resuming event streams where the hub cannot resume: a `Last-Event-ID` older than the
//! changes the hub keeps, of an earlier run of a SQLite hub, or of a run before a restart gets
//! one `resync` and then `ready`, and nothing in between (the client's one timestamp check
//! covers every change it missed); a `Last-Event-ID` ahead of anything this run wrote never
//! makes the stream skip a later change.

mod support;

use serde_json::json;
use support::events::{
    Frame, Next, WAIT, accepted, assert_change, epoch_of, position, resume, stream_client, stream_request,
};
use support::{Deployment, TestHub};

const SITE: &str = "roflfaucet";
const USER: &str = "8-evans";

/// What a resumed stream sent between its retry hint and `ready`, unless it is one `resync`.
fn not_only_resync(case: &str, id: &str, between: &[Frame]) -> Option<String> {
    let kinds: Vec<&str> = between.iter().map(Frame::kind).collect();
    (kinds != ["resync"]).then(|| {
        let ids: Vec<&str> = between.iter().filter_map(|f| f.id.as_deref()).collect();
        format!("{case} (Last-Event-ID {id}): {kinds:?} before ready, ids {ids:?}")
    })
}

#[tokio::test]
async fn a_resync_comes_instead_of_the_missed_changes() {
    let deployment = Deployment::new(|c| c.events.resume_window = 4);
    let mut hub = deployment.start().await;
    let token = deployment.token(SITE, USER);
    let writer = deployment.backend(SITE, USER, WAIT);
    let request = || stream_request(&stream_client(), &deployment.url(), USER, "", Some(&token));
    let mut stream = accepted(request(), "a fresh stream").await;
    let old = stream.ready().await;
    drop(stream);
    for i in 0..10 {
        writer.delta("balance", 1, &format!("op-{i}")).await.assert_ok();
    }
    let mut wrong = Vec::new();

    // Ten changes later, with four kept.
    let (_stream, between, _ready) = resume(&deployment.url(), &token, USER, old.id()).await;
    wrong.extend(not_only_resync("an id older than the kept changes", old.id(), &between));

    // An id of the run before this one.
    let mut stream = accepted(request(), "a fresh stream").await;
    let latest = stream.ready().await;
    drop(stream);
    let (era, seq) = position(latest.id());
    let earlier = format!("{}.{}.{seq}", epoch_of(latest.id()), era - 1);
    let (_stream, between, _ready) = resume(&deployment.url(), &token, USER, &earlier).await;
    wrong.extend(not_only_resync("an id of the previous run", &earlier, &between));

    // The hub restarts, a change is written, then the page comes back.
    hub.kill().await.unwrap();
    let _hub = deployment.start().await;
    writer.push("profile", json!({"bio": "back"})).await.assert_ok();
    let (_stream, between, _ready) = resume(&deployment.url(), &token, USER, latest.id()).await;
    wrong.extend(not_only_resync("an id from before a restart", latest.id(), &between));

    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn a_last_event_id_ahead_of_the_hub_loses_no_later_change() {
    let hub = TestHub::start().await;
    let faucet = hub.site(SITE, USER);
    let token = hub.token(SITE, USER);
    let request = stream_request(&stream_client(), &hub.url, USER, "", Some(&token));
    let mut stream = accepted(request, "a fresh stream").await;
    stream.ready().await;
    faucet.delta("balance", 10, "credit-0").await.assert_ok();
    let seen = stream.event("a change").await;
    drop(stream);
    let epoch = epoch_of(seen.id()).to_owned();
    let (era, seq) = position(seen.id());
    // Ids this run never gave: one of a later run (a data dir copied back from before its
    // last runs keeps its epoch), one past its last change.
    let cases = [
        ("an id of a later run", format!("{epoch}.{}.{seq}", era + 1)),
        ("an id past the last change", format!("{epoch}.{era}.{}", seq + 1000)),
    ];
    let mut lost = Vec::new();
    for (i, (case, id)) in cases.iter().enumerate() {
        let (mut stream, between, _ready) = resume(&hub.url, &token, USER, id).await;
        let later = faucet.delta("balance", 1, &format!("credit-{}", i + 1)).await.assert_ok().clone();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match stream.next_within(deadline.saturating_duration_since(tokio::time::Instant::now())).await {
                Next::Frame(frame) if frame.is_heartbeat() => {}
                Next::Frame(frame) if frame.is_change() => {
                    assert_change(&frame.json(), "balance", &later);
                    break;
                }
                other => {
                    lost.push(format!("{case} ({id}, opened with {between:?}): {other:?} after a write"));
                    break;
                }
            }
        }
    }
    assert!(lost.is_empty(), "changes never sent:\n{}", lost.join("\n"));
}
