//! Refused tokens (401) and rate limits (429) in the hub's log at `info`, with the client's
//! address and the site, however many there are: the first of each kind — its status, the
//! hub's code and the site — in a minute is logged at once, and the others of that minute are
//! summed up in one line when it ends, with how many addresses sent them and one of them. A
//! flood thus writes at most two lines per kind per minute, and the kinds are few: two
//! statuses, the codes the hub answers with them, and the configured sites, each either a
//! verified token's or only claimed by an unverified one (or none). Counts in memory only;
//! refuses nothing.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;

/// How long refusals of one kind are summed up before their line is written.
const WINDOW_MS: i64 = 60_000;
/// The distinct addresses counted per kind and minute; beyond, the line says "at least".
const ADDRESSES_COUNTED: usize = 1024;

/// What makes two refusals the same kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Kind {
    status: u16,
    code: &'static str,
    site: Option<Site>,
}

/// The configured site a refusal is logged under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Site {
    /// A verified token's site (an expired token's too): the request came from its backend
    /// or one of its pages.
    Verified(String),
    /// The site an unverified token names as its issuer: anyone can write such a token, so a
    /// claim says nothing of the site itself.
    Claimed(String),
}

/// The refusals of one kind in this minute.
#[derive(Debug)]
struct Tally {
    count: u64,
    addresses: HashSet<IpAddr>,
    latest: IpAddr,
}

/// The refusals of the current minute, by kind.
#[derive(Debug, Default)]
pub(super) struct Refusals {
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    since_ms: i64,
    kinds: HashMap<Kind, Tally>,
}

impl Refusals {
    /// Whether `status` is one this log is about.
    pub(super) fn concerns(status: u16) -> bool {
        matches!(status, 401 | 429)
    }

    /// Notes a refusal: logged at once if it is the first of its kind this minute, summed up
    /// at the minute's end otherwise. `site` must be a configured site's.
    pub(super) fn note(
        &self,
        now_ms: i64,
        status: u16,
        code: &'static str,
        site: Option<Site>,
        client: IpAddr,
    ) {
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if now_ms - window.since_ms >= WINDOW_MS {
            window.sum_up();
            window.since_ms = now_ms;
        }
        let kind = Kind { status, code, site };
        match window.kinds.get_mut(&kind) {
            Some(tally) => {
                tally.count += 1;
                tally.latest = client;
                if tally.addresses.len() < ADDRESSES_COUNTED {
                    tally.addresses.insert(client);
                }
            }
            None => {
                tracing::info!(
                    "refused {status} {code} {} from {client}; more of these this minute are summed up when it ends",
                    Shown(kind.site.as_ref())
                );
                window
                    .kinds
                    .insert(kind, Tally { count: 1, addresses: HashSet::from([client]), latest: client });
            }
        }
    }

    /// Writes the summary lines of a minute that has ended; the hub calls it every few seconds.
    pub(super) fn sum_up_if_due(&self, now_ms: i64) {
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if now_ms - window.since_ms >= WINDOW_MS {
            window.sum_up();
        }
    }

    /// Writes the summary lines of the minute so far, as the hub stops.
    pub(super) fn sum_up(&self) {
        self.window.lock().unwrap_or_else(|e| e.into_inner()).sum_up();
    }
}

impl Window {
    fn sum_up(&mut self) {
        let mut kinds: Vec<_> = self.kinds.drain().filter(|(_, tally)| tally.count > 1).collect();
        kinds.sort_by_key(|(_, tally)| std::cmp::Reverse(tally.count));
        for (kind, tally) in kinds {
            let addresses = tally.addresses.len();
            tracing::info!(
                "refused {} more {} {} {} since the first, from {}{addresses} address{}, the latest {}",
                tally.count - 1,
                kind.status,
                kind.code,
                Shown(kind.site.as_ref()),
                if addresses >= ADDRESSES_COUNTED { "at least " } else { "" },
                if addresses == 1 { "" } else { "es" },
                tally.latest,
            );
        }
    }
}

/// `for site roflfaucet`, `claiming site roflfaucet`, or `with no site`.
struct Shown<'a>(Option<&'a Site>);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(Site::Verified(site)) => write!(f, "for site {site}"),
            Some(Site::Claimed(site)) => write!(f, "claiming site {site}"),
            None => f.write_str("with no site"),
        }
    }
}
