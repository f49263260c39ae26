//! What `hub agent` asks the hub when one user's balance file shows a value, and what it
//! remembers afterwards. Does no I/O: the caller sends each polled request, retries it
//! through outages, and hands back the hub's answer.
//!
//! Call order: [`Reconcile::new`], then while [`Reconcile::poll_request`] gives a request,
//! send it and pass the answer to [`Reconcile::handle_reply`]; then [`Reconcile::finish`].
//!
//! The rule: the agent remembers where the file and the hub last agreed ([`Agreed`]). A
//! change of the file is pushed as the absolute balance the hub would then hold, only if
//! the hub is still at the remembered version; if another site wrote since, only the local
//! change is added, as a delta. Both carry op ids derived from what was remembered and the
//! file's value, so a resend, or a restarted agent sending again, is answered from the first
//! time and never applied twice. A user seen for the first time takes the hub's balance as
//! canonical, unless the hub has none.
//!
//! Both ways ([`file_step`]): once the file's own change has reached the hub, whatever the
//! hub has that the file does not show — another site's change, a merge, a refused local
//! change, the hub's balance kept at first sight — is written into the file, and that is
//! the new agreement. A local change the hub has not seen is always reconciled first, so it
//! is never overwritten.

use protocol::{SiteId, UserId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The last point where one user's file and the hub agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agreed {
    /// The file's coins then: a later change of the file is measured from it.
    pub file: i64,
    /// The hub's balance version then: the `base_version` of the next push.
    pub version: u64,
    /// The hub's coins at that version. It differs from `file` once another site's change was
    /// added or the hub's balance was kept at first sight; the next push then sets
    /// `hub + (new file − file)`, so that such a change is never undone.
    pub hub: i64,
}

/// A user's balance as one of the hub's answers shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubBalance {
    pub coins: i64,
    pub version: u64,
}

/// A request for the hub, about the reconciled user's balance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `action=get`.
    Get,
    /// `action=push` of an absolute balance, applied only if the hub is still at
    /// `base_version`.
    Push { coins: i64, base_version: u64, op_id: String },
    /// `action=delta` of the local change alone.
    Delta { coins: i64, op_id: String },
}

impl Request {
    /// Whether the request may change the hub: the caller records what it is about to send
    /// before sending it, so that a restart sends the same operation again.
    pub fn writes(&self) -> bool {
        !matches!(self, Request::Get)
    }
}

/// The hub's answer to a request. Failures worth retrying (no connection, 5xx, 429, a token
/// refused) never get here: the caller retries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The balance now: a get's answer, or an accepted (or replayed) push or delta.
    Balance(HubBalance),
    /// `version_conflict`: another site wrote since `base_version`.
    Conflict(HubBalance),
    /// `insufficient_funds`: the local change would take the balance below zero.
    InsufficientFunds(HubBalance),
    /// Any other refusal, with the hub's code and message.
    Refused { code: String, message: String },
}

/// How a reconciliation ended, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to send: the file did not change, or the hub already had its value.
    InStep,
    /// The file's change was pushed.
    Pushed,
    /// Another site changed the balance since the last agreement; the local change was added
    /// to it.
    Merged { change: i64 },
    /// The user's first reconciliation found a different balance in the hub; it is kept.
    HubKept,
    /// The hub refused the local change; its balance is kept.
    Refused { change: i64, code: String, message: String },
    /// The hub would not give the balance; nothing new is remembered, and the next change of
    /// the file tries again.
    Unread { code: String, message: String },
}

/// One user's reconciliation: the file shows `file` coins.
#[derive(Debug)]
pub struct Reconcile {
    site: SiteId,
    user: UserId,
    file: i64,
    from: Option<Agreed>,
    stage: Stage,
}

#[derive(Debug)]
enum Stage {
    /// Waiting for the answer to this request.
    Sent(Request),
    /// The local change was refused for this reason; reading the balance to start again
    /// from it.
    Rebaseline {
        code: String,
        message: String,
    },
    Done {
        agreed: Option<Agreed>,
        outcome: Outcome,
    },
}

impl Reconcile {
    /// Starts from what was remembered for the user (`None`: never reconciled).
    pub fn new(site: SiteId, user: UserId, from: Option<Agreed>, file: i64) -> Reconcile {
        let mut reconcile = Reconcile { site, user, file, from, stage: Stage::Sent(Request::Get) };
        reconcile.stage = match from {
            None => Stage::Sent(Request::Get),
            Some(agreed) if agreed.file == file => Stage::Done { agreed: from, outcome: Outcome::InStep },
            Some(agreed) => {
                let coins = agreed.hub + reconcile.change();
                // Below zero no push can be right; a delta still can, if another site added
                // enough meanwhile, and is otherwise refused with the hub's balance.
                if coins < 0 {
                    Stage::Sent(reconcile.delta())
                } else {
                    let op_id = reconcile.op_id("push", agreed.version);
                    Stage::Sent(Request::Push { coins, base_version: agreed.version, op_id })
                }
            }
        };
        reconcile
    }

    /// The next request to send, or `None` when done.
    pub fn poll_request(&self) -> Option<&Request> {
        match &self.stage {
            Stage::Sent(request) => Some(request),
            Stage::Rebaseline { .. } => Some(&Request::Get),
            Stage::Done { .. } => None,
        }
    }

    /// The hub's answer to the request last polled.
    pub fn handle_reply(&mut self, reply: Reply) {
        let stage = std::mem::replace(&mut self.stage, Stage::Sent(Request::Get));
        self.stage = match (stage, reply) {
            (done @ Stage::Done { .. }, _) => done,
            (Stage::Sent(Request::Get), Reply::Balance(hub)) if hub.version == 0 => {
                let op_id = self.op_id("push", 0);
                Stage::Sent(Request::Push { coins: self.file, base_version: 0, op_id })
            }
            (Stage::Sent(Request::Get), Reply::Balance(hub)) => self.first_sight(hub),
            (Stage::Sent(Request::Push { .. }), Reply::Balance(hub)) => self.done(hub, Outcome::Pushed),
            (Stage::Sent(Request::Push { .. }), Reply::Conflict(hub)) => match self.from {
                None => self.first_sight(hub),
                Some(_) => Stage::Sent(self.delta()),
            },
            (Stage::Sent(Request::Delta { .. }), Reply::Balance(hub)) => {
                self.done(hub, Outcome::Merged { change: self.change() })
            }
            (Stage::Sent(Request::Delta { .. }), Reply::InsufficientFunds(hub)) => {
                let outcome = Outcome::Refused {
                    change: self.change(),
                    code: "insufficient_funds".into(),
                    message: "the balance would go below zero".into(),
                };
                self.done(hub, outcome)
            }
            (Stage::Rebaseline { code, message }, Reply::Balance(hub)) => {
                self.done(hub, Outcome::Refused { change: self.change(), code, message })
            }
            (Stage::Sent(Request::Get) | Stage::Rebaseline { .. }, reply) => {
                let (code, message) = refusal(reply);
                Stage::Done { agreed: self.from, outcome: Outcome::Unread { code, message } }
            }
            (Stage::Sent(_), reply) => {
                let (code, message) = refusal(reply);
                Stage::Rebaseline { code, message }
            }
        };
    }

    /// What to remember for the user from now on, and how it ended; `None` if
    /// [`Reconcile::poll_request`] still has a request.
    pub fn finish(self) -> Option<(Option<Agreed>, Outcome)> {
        match self.stage {
            Stage::Done { agreed, outcome } => Some((agreed, outcome)),
            _ => None,
        }
    }

    /// The change of the file since the last agreement.
    fn change(&self) -> i64 {
        self.file - self.from.map_or(0, |agreed| agreed.file)
    }

    fn delta(&self) -> Request {
        let base = self.from.map_or(0, |agreed| agreed.version);
        Request::Delta { coins: self.change(), op_id: self.op_id("delta", base) }
    }

    fn first_sight(&self, hub: HubBalance) -> Stage {
        self.done(hub, if hub.coins == self.file { Outcome::InStep } else { Outcome::HubKept })
    }

    fn done(&self, hub: HubBalance, outcome: Outcome) -> Stage {
        let agreed = Agreed { file: self.file, version: hub.version, hub: hub.coins };
        Stage::Done { agreed: Some(agreed), outcome }
    }

    /// The op id of a write: a function of everything that decides it (site, user, the
    /// agreement it starts from, the file's value), so that sending it again, from this
    /// process or a restarted one, is recognised by the hub, while any other write gets
    /// another id.
    fn op_id(&self, kind: &str, base_version: u64) -> String {
        let from =
            self.from.map_or_else(|| "-".to_owned(), |agreed| format!("{}:{}", agreed.file, agreed.hub));
        let text = format!("{kind}\n{}\n{}\n{base_version}\n{from}\n{}", self.site, self.user, self.file);
        format!("agent-{kind}-{:x}", Sha256::digest(text.as_bytes()))
    }
}

/// What to do next about a file that shows `file` coins, given what was agreed and,
/// perhaps, a newer balance the hub reported (its change feed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileStep {
    /// The file changed since the agreement, or the user was never reconciled: bring the hub
    /// in step first ([`Reconcile`]), then ask again.
    Reconcile,
    /// The hub has `coins` that the file does not show: write them into the file, provided it
    /// still shows what was agreed when the write lands, and agree on `agreed` from then on.
    Write { coins: i64, agreed: Agreed },
    /// The file already shows the hub's newer balance: only the agreement moves.
    Agree(Agreed),
    /// The file and the hub are in step.
    InStep,
}

/// The next step for a file showing `file` coins, where `from` was agreed and `newer` is a
/// balance the hub reported since (ignored unless its version is past the agreement's).
pub fn file_step(from: Option<Agreed>, file: i64, newer: Option<HubBalance>) -> FileStep {
    let Some(from) = from.filter(|agreed| agreed.file == file) else {
        return FileStep::Reconcile;
    };
    let hub = newer
        .filter(|newer| newer.version > from.version)
        .unwrap_or(HubBalance { coins: from.hub, version: from.version });
    let agreed = Agreed { file: hub.coins, version: hub.version, hub: hub.coins };
    if hub.coins != file {
        FileStep::Write { coins: hub.coins, agreed }
    } else if hub.version != from.version {
        FileStep::Agree(agreed)
    } else {
        FileStep::InStep
    }
}

/// What was agreed after a write of the file that was under way when the agent stopped,
/// from `from` to `to`: its temporary file is renamed over the balance file in one step, so
/// a temporary file still there (`temp_left`) means the balance file was not replaced.
pub fn interrupted_write(from: Agreed, to: Agreed, temp_left: bool) -> Agreed {
    if temp_left { unwritten(from, to) } else { to }
}

/// What is agreed when the hub's balance `to` was not written into a file that still shows
/// what `from` agreed: the hub's side moves and the file's stays, so that a change of the
/// file is still measured from what it showed, and [`file_step`] writes the hub's balance
/// again at the user's next turn.
pub fn unwritten(from: Agreed, to: Agreed) -> Agreed {
    Agreed { file: from.file, version: to.version, hub: to.hub }
}

fn refusal(reply: Reply) -> (String, String) {
    match reply {
        Reply::Refused { code, message } => (code, message),
        Reply::Conflict(hub) => {
            ("version_conflict".into(), format!("the balance is at version {}", hub.version))
        }
        Reply::InsufficientFunds(_) => {
            ("insufficient_funds".into(), "the balance would go below zero".into())
        }
        Reply::Balance(hub) => {
            ("unexpected".into(), format!("an unexpected balance at version {}", hub.version))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> SiteId {
        SiteId::parse("roflfaucet").unwrap()
    }

    fn user() -> UserId {
        UserId::parse("8-evans").unwrap()
    }

    fn start(from: Option<Agreed>, file: i64) -> Reconcile {
        Reconcile::new(site(), user(), from, file)
    }

    fn agreed(file: i64, version: u64, hub: i64) -> Option<Agreed> {
        Some(Agreed { file, version, hub })
    }

    fn balance(coins: i64, version: u64) -> HubBalance {
        HubBalance { coins, version }
    }

    /// Sends every request to `answer` and returns what was sent and how it ended.
    fn drive(
        mut reconcile: Reconcile,
        mut answer: impl FnMut(&Request) -> Reply,
    ) -> (Vec<Request>, Option<Agreed>, Outcome) {
        let mut sent = Vec::new();
        while let Some(request) = reconcile.poll_request().cloned() {
            reconcile.handle_reply(answer(&request));
            sent.push(request);
            assert!(sent.len() < 10, "no end: {sent:?}");
        }
        let (agreed, outcome) = reconcile.finish().unwrap();
        (sent, agreed, outcome)
    }

    #[test]
    fn an_unchanged_file_sends_nothing() {
        let (sent, remembered, outcome) = drive(start(agreed(100, 3, 100), 100), |r| panic!("sent {r:?}"));
        assert_eq!((sent, remembered, outcome), (vec![], agreed(100, 3, 100), Outcome::InStep));
    }

    #[test]
    fn a_change_is_pushed_with_the_remembered_version() {
        let (sent, remembered, outcome) =
            drive(start(agreed(100, 3, 100), 90), |_| Reply::Balance(balance(90, 4)));
        assert!(matches!(sent[..], [Request::Push { coins: 90, base_version: 3, .. }]), "{sent:?}");
        assert_eq!((remembered, outcome), (agreed(90, 4, 90), Outcome::Pushed));
    }

    #[test]
    fn after_a_merge_a_change_is_pushed_on_top_of_the_hubs_balance() {
        let (sent, remembered, _) = drive(start(agreed(90, 5, 140), 80), |_| Reply::Balance(balance(130, 6)));
        assert!(matches!(sent[..], [Request::Push { coins: 130, base_version: 5, .. }]), "{sent:?}");
        assert_eq!(remembered, agreed(80, 6, 130));
    }

    #[test]
    fn a_conflict_adds_only_the_local_change() {
        let (sent, remembered, outcome) = drive(start(agreed(100, 3, 100), 90), |request| match request {
            Request::Push { .. } => Reply::Conflict(balance(150, 4)),
            _ => Reply::Balance(balance(140, 5)),
        });
        assert!(matches!(sent[..], [Request::Push { .. }, Request::Delta { coins: -10, .. }]), "{sent:?}");
        assert_eq!((remembered, outcome), (agreed(90, 5, 140), Outcome::Merged { change: -10 }));
    }

    #[test]
    fn a_refused_delta_keeps_the_hubs_balance() {
        let (_, remembered, outcome) = drive(start(agreed(100, 3, 100), 50), |request| match request {
            Request::Push { .. } => Reply::Conflict(balance(20, 4)),
            _ => Reply::InsufficientFunds(balance(20, 4)),
        });
        assert_eq!(remembered, agreed(50, 4, 20));
        assert!(matches!(outcome, Outcome::Refused { change: -50, .. }), "{outcome:?}");
    }

    #[test]
    fn a_change_below_what_the_hub_holds_goes_as_a_delta() {
        let (sent, _, _) = drive(start(agreed(100, 3, 20), 50), |_| Reply::InsufficientFunds(balance(20, 3)));
        assert!(matches!(sent[..], [Request::Delta { coins: -50, .. }]), "{sent:?}");
    }

    #[test]
    fn any_other_refusal_reads_the_balance_and_starts_from_it() {
        let (sent, remembered, outcome) = drive(start(agreed(100, 3, 100), 90), |request| match request {
            Request::Get => Reply::Balance(balance(100, 3)),
            _ => Reply::Refused { code: "value_too_large".into(), message: "too large".into() },
        });
        assert!(matches!(sent[..], [Request::Push { .. }, Request::Get]), "{sent:?}");
        assert_eq!(remembered, agreed(90, 3, 100));
        assert!(matches!(outcome, Outcome::Refused { change: -10, code, .. } if code == "value_too_large"));
    }

    #[test]
    fn at_first_sight_an_empty_hub_gets_the_file() {
        let (sent, remembered, outcome) = drive(start(None, 70), |request| match request {
            Request::Get => Reply::Balance(balance(0, 0)),
            _ => Reply::Balance(balance(70, 1)),
        });
        assert!(matches!(sent[..], [Request::Get, Request::Push { coins: 70, base_version: 0, .. }]));
        assert_eq!((remembered, outcome), (agreed(70, 1, 70), Outcome::Pushed));
    }

    #[test]
    fn at_first_sight_the_hubs_balance_is_kept() {
        let (sent, remembered, outcome) = drive(start(None, 70), |_| Reply::Balance(balance(500, 9)));
        assert_eq!(sent, vec![Request::Get]);
        assert_eq!((remembered, outcome), (agreed(70, 9, 500), Outcome::HubKept));
        let (_, remembered, outcome) = drive(start(None, 500), |_| Reply::Balance(balance(500, 9)));
        assert_eq!((remembered, outcome), (agreed(500, 9, 500), Outcome::InStep));
    }

    #[test]
    fn a_balance_written_between_first_read_and_push_is_kept() {
        let (_, remembered, outcome) = drive(start(None, 70), |request| match request {
            Request::Get => Reply::Balance(balance(0, 0)),
            _ => Reply::Conflict(balance(30, 1)),
        });
        assert_eq!((remembered, outcome), (agreed(70, 1, 30), Outcome::HubKept));
    }

    #[test]
    fn a_refused_read_remembers_nothing_new() {
        let refused = || Reply::Refused { code: "wrong_user".into(), message: "no".into() };
        let (_, remembered, outcome) = drive(start(None, 70), |_| refused());
        assert_eq!(remembered, None);
        assert!(matches!(outcome, Outcome::Unread { .. }));
    }

    #[test]
    fn a_file_changed_since_the_agreement_is_reconciled_before_anything_is_written() {
        let newer = Some(balance(150, 4));
        assert_eq!(file_step(agreed(100, 3, 100), 90, newer), FileStep::Reconcile);
        assert_eq!(file_step(None, 90, newer), FileStep::Reconcile);
        assert_eq!(file_step(None, 90, None), FileStep::Reconcile);
    }

    #[test]
    fn a_newer_hub_balance_is_written_into_an_unchanged_file() {
        assert_eq!(
            file_step(agreed(100, 3, 100), 100, Some(balance(150, 4))),
            FileStep::Write { coins: 150, agreed: agreed(150, 4, 150).unwrap() }
        );
    }

    #[test]
    fn a_hub_balance_the_file_does_not_show_after_a_reconciliation_is_written() {
        // A merge, a refusal or the hub's balance kept at first sight leave the hub ≠ file.
        assert_eq!(
            file_step(agreed(90, 5, 140), 90, None),
            FileStep::Write { coins: 140, agreed: agreed(140, 5, 140).unwrap() }
        );
    }

    #[test]
    fn an_older_or_same_hub_balance_changes_nothing() {
        for newer in [None, Some(balance(70, 3)), Some(balance(70, 2))] {
            assert_eq!(file_step(agreed(100, 3, 100), 100, newer), FileStep::InStep, "{newer:?}");
        }
        // Even one whose coins differ: the agreement is newer than it.
        assert_eq!(file_step(agreed(100, 5, 100), 100, Some(balance(20, 4))), FileStep::InStep);
    }

    #[test]
    fn a_newer_version_with_the_files_coins_moves_only_the_agreement() {
        assert_eq!(
            file_step(agreed(100, 3, 100), 100, Some(balance(100, 6))),
            FileStep::Agree(agreed(100, 6, 100).unwrap())
        );
    }

    #[test]
    fn an_interrupted_write_counts_only_if_its_temporary_file_is_gone() {
        let (from, to) = (agreed(100, 3, 100).unwrap(), agreed(150, 4, 150).unwrap());
        assert_eq!(interrupted_write(from, to, false), to);
        assert_eq!(interrupted_write(from, to, true), unwritten(from, to));
    }

    #[test]
    fn a_write_that_did_not_happen_is_tried_again_and_the_files_change_still_counts_from_what_it_showed() {
        let (from, to) = (agreed(100, 3, 100).unwrap(), agreed(150, 4, 150).unwrap());
        let left = unwritten(from, to);
        assert_eq!(file_step(Some(left), 100, None), FileStep::Write { coins: 150, agreed: to });
        // The site's change of the file meanwhile (+10) is added to the hub's balance.
        assert_eq!(file_step(Some(left), 110, None), FileStep::Reconcile);
        let (sent, remembered, _) =
            drive(Reconcile::new(site(), user(), Some(left), 110), |_| Reply::Balance(balance(160, 5)));
        assert!(matches!(sent[..], [Request::Push { coins: 160, base_version: 4, .. }]), "{sent:?}");
        assert_eq!(remembered, agreed(110, 5, 160));
    }

    #[test]
    fn op_ids_are_the_same_for_the_same_write_and_differ_otherwise() {
        let writes = |from, file| {
            drive(start(from, file), |request| match request {
                Request::Push { .. } => Reply::Conflict(balance(1000, 9)),
                _ => Reply::Balance(balance(1000, 10)),
            })
            .0
        };
        let op_ids = |sent: Vec<Request>| -> Vec<String> {
            sent.into_iter()
                .map(|request| match request {
                    Request::Push { op_id, .. } | Request::Delta { op_id, .. } => op_id,
                    Request::Get => panic!("no get expected"),
                })
                .collect()
        };
        let first = op_ids(writes(agreed(100, 3, 100), 90));
        assert_eq!(first, op_ids(writes(agreed(100, 3, 100), 90)));
        assert_ne!(first[0], first[1]);
        for other in [
            writes(agreed(100, 3, 100), 91),
            writes(agreed(100, 4, 100), 90),
            writes(agreed(101, 3, 100), 90),
            writes(agreed(100, 3, 101), 90),
        ] {
            let other = op_ids(other);
            assert!(other.iter().all(|id| !first.contains(id)), "{first:?} {other:?}");
        }
        for id in first {
            protocol::OpId::parse(&id).unwrap();
        }
    }
}
