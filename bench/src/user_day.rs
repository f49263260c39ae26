//! `bench user-day`: a simulated day of one user for `cargo xtask bench`. The real
//! `sync_core::Engine`, driven natively ([`Engine::drive`]) the way the browser shell drives
//! it, against a real hub over HTTP, with two sites of the seed design open in two tabs of one
//! browser. Counts every request the engines send, per hour of the day, with the body bytes
//! both ways, to set against the seed's 10-second polling ([`POLLING_PER_HOUR`]) and its own
//! estimate for typical use ([`SEED_ESTIMATE_PER_HOUR`]).
//!
//! The day follows the seed's "typical usage" story (see `HOUR`): a user on a faucet who
//! claims every 15 minutes, plays a dice game, switches to the charity site to click for a
//! cause and donate, and spends the rest of the time on other websites. Before every
//! balance-changing operation the page pulls (`ensureFresh`), as the specification asks.
//! The two tabs belong to different sites, hence different origins: they share no
//! `BroadcastChannel` and no storage, so a tab learns of the other's changes only when it
//! checks the hub.
//!
//! Time is virtual: the clock jumps from one thing the user does to the next, the engines'
//! timers (the 5-minute inactivity check of a visible tab) fire when `poll_timeout` says, and
//! every request is answered before the clock moves on. What it measures is therefore
//! counts, never durations. It models a fault-free network (`sync-core/tests/simulation.rs`
//! covers faults) and sends no `Origin` header, as a native client would not. The whole day
//! takes a second or two of real time, so the hub must let one user make a few hundred
//! requests a minute (`limits.requests_per_minute`); any answer but 200 or 304 ends the day
//! with an error instead of a report. Prints the report on stderr and the figures xtask
//! reports ([`Summary`]) as one JSON line on stdout.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::Path;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hub::auth::Keys;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, DATE, ETAG, HOST, HeaderValue, IF_NONE_MATCH};
use serde::Serialize;
use sync_core::{
    Answer, Config, DataType, Engine, Event, Grant, Host, Json, Method, Persisted, Reply, Request, Trigger,
};

/// The seed's old system: a check every 10 seconds while a page is open.
pub const POLLING_PER_HOUR: u64 = 360;
/// The seed's own estimate of its event-driven design for typical use.
pub const SEED_ESTIMATE_PER_HOUR: RangeInclusive<u64> = 20..=50;
/// The user of the day (the seed's example id).
pub const USER: &str = "8-evans";
/// What both sites keep in step, as the demo sites do.
const DATA_TYPES: [DataType; 3] = [DataType::Balance, DataType::Profile, DataType::Roles];
/// The hub's sync endpoint.
const ENDPOINT: &str = "/api/sync";

const SECOND: u64 = 1000;
const MINUTE: u64 = 60 * SECOND;
const HOUR_MS: u64 = 60 * MINUTE;
/// Midnight (UTC) that starts the virtual day, 2025-11-10; the hub stamps records with its
/// own clock, and the engines never compare clocks, so only the distances matter.
const MIDNIGHT: u64 = 1_762_732_800_000;
/// The browser opens both sites at 09:00 and is closed at 18:00.
const OPEN_AT: u64 = 9;
const CLOSE_AT: u64 = 18;
/// At 13:00 the user goes to lunch and leaves the browser open with both tabs hidden; the
/// hour shows that hidden tabs send nothing.
const LUNCH_AT: u64 = 13;
/// How many times the clock may be advanced to an engine's timer in one stretch of the day:
/// far more than a 5-minute fallback can ask for in an hour.
const TIMER_STEPS: u32 = 10_000;

/// `bench user-day`: runs the day against the hub at `addr`, whose config file's site keys
/// sign what the sites' backends give their pages.
pub fn run(addr: SocketAddr, config: &Path) -> anyhow::Result<()> {
    let keys = Keys::from_config(&hub::config::Config::load(Some(config))?)?;
    let report = simulate(addr, &keys)?;
    eprintln!("{report}");
    println!("{}", serde_json::to_string(&Summary::of(&report))?);
    Ok(())
}

/// One of the two sites the user has open, each in its own tab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Site {
    /// ROFLFaucet: claims every 15 minutes and a dice game.
    Faucet,
    /// Click for Charity: clicks earn a coin each; coins are donated.
    Charity,
}

impl Site {
    const ALL: [Site; 2] = [Site::Faucet, Site::Charity];

    fn id(self) -> &'static str {
        match self {
            Site::Faucet => "roflfaucet",
            Site::Charity => "clickforcharity",
        }
    }

    fn index(self) -> usize {
        match self {
            Site::Faucet => 0,
            Site::Charity => 1,
        }
    }

    fn other(self) -> Site {
        match self {
            Site::Faucet => Site::Charity,
            Site::Charity => Site::Faucet,
        }
    }
}

/// One thing the user does.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// The user switches to this site's tab: the other tab is hidden, this one visible again.
    Show(Site),
    /// Another page of the site loads in its tab (a link within the site): the engine starts
    /// from the site's storage and signs in, as every page of the demo sites does.
    Navigate(Site),
    /// `ensureFresh("balance")`, then `applyDelta("balance", {coins: amount}, reason)`.
    Operation(Site, i64, &'static str),
    /// The user goes to another website: both tabs are hidden.
    Away,
}

/// An active hour, at (minute, second) within the hour. The faucet's claim has a 15-minute
/// cooldown; between claims the user is mostly elsewhere. Per hour: 4 claims and a dice
/// roll on the faucet, 3 clicks and a donation on the charity site, 6 tab returns, one page
/// navigation, and 12 minutes reading the charity site (the inactivity fallback fires there).
const HOUR: &[(u64, u64, Step)] = &[
    (1, 0, Step::Show(Site::Faucet)),
    (1, 10, Step::Operation(Site::Faucet, 25, "claim")),
    (2, 0, Step::Away),
    (16, 0, Step::Show(Site::Faucet)),
    (16, 10, Step::Operation(Site::Faucet, 25, "claim")),
    (17, 0, Step::Away),
    (21, 0, Step::Show(Site::Charity)),
    (21, 30, Step::Operation(Site::Charity, 1, "click")),
    (22, 0, Step::Operation(Site::Charity, 1, "click")),
    (22, 30, Step::Operation(Site::Charity, 1, "click")),
    (23, 0, Step::Away),
    (31, 0, Step::Show(Site::Faucet)),
    (31, 10, Step::Operation(Site::Faucet, 25, "claim")),
    (32, 0, Step::Navigate(Site::Faucet)),
    (32, 20, Step::Operation(Site::Faucet, -10, "game")),
    (33, 0, Step::Away),
    (46, 0, Step::Show(Site::Faucet)),
    (46, 10, Step::Operation(Site::Faucet, 25, "claim")),
    (47, 0, Step::Show(Site::Charity)),
    (47, 30, Step::Operation(Site::Charity, -50, "donation")),
    (59, 0, Step::Away),
];

/// What tab returns cost, in requests and response body bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Returns {
    pub count: u64,
    pub requests: u64,
    /// The most requests one return sent.
    pub max_requests: u64,
    /// The largest response body of one return (all its answers together).
    pub max_response_bytes: u64,
}

impl Returns {
    fn add(&mut self, requests: u64, response_bytes: u64) {
        self.count += 1;
        self.requests += requests;
        self.max_requests = self.max_requests.max(requests);
        self.max_response_bytes = self.max_response_bytes.max(response_bytes);
    }
}

/// What the day cost and where it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct DayReport {
    /// Requests sent in each hour of the day (0–23), both tabs together.
    pub requests_by_hour: [u64; 24],
    /// Body bytes in each hour, request bodies and response bodies (headers not counted).
    pub bytes_by_hour: [u64; 24],
    /// The hours the user was at the browser.
    pub active_hours: Vec<usize>,
    /// Requests over the day by action (`timestamp`, `get`, `delta`).
    pub by_action: BTreeMap<String, u64>,
    /// Balance-changing operations the user made.
    pub operations: u64,
    /// Tab returns when the hub had nothing the tab had not seen.
    pub unchanged_returns: Returns,
    /// Tab returns after the other site had changed something.
    pub changed_returns: Returns,
    /// The balance at the hub at the end of the day, and as each tab showed it last.
    pub hub_coins: i64,
    pub faucet_coins: i64,
    pub charity_coins: i64,
}

impl DayReport {
    pub fn total_requests(&self) -> u64 {
        self.requests_by_hour.iter().sum()
    }

    /// Mean requests per active hour.
    pub fn requests_per_active_hour(&self) -> f64 {
        self.per_active_hour(&self.requests_by_hour)
    }

    /// Mean body bytes per active hour.
    pub fn bytes_per_active_hour(&self) -> f64 {
        self.per_active_hour(&self.bytes_by_hour)
    }

    /// The busiest hour's requests.
    pub fn peak_hour_requests(&self) -> u64 {
        self.requests_by_hour.iter().copied().max().unwrap_or(0)
    }

    fn per_active_hour(&self, by_hour: &[u64; 24]) -> f64 {
        let total: u64 = self.active_hours.iter().map(|&h| by_hour[h]).sum();
        total as f64 / self.active_hours.len().max(1) as f64
    }
}

impl fmt::Display for DayReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hours = self.active_hours.len();
        writeln!(f, "A day of one user: faucet and charity in two tabs, {hours} active hours")?;
        writeln!(
            f,
            "  requests per active hour: {:.1} (busiest hour {}); the seed's 10-second polling: {}; \
             the seed's estimate: {}–{}",
            self.requests_per_active_hour(),
            self.peak_hour_requests(),
            POLLING_PER_HOUR,
            SEED_ESTIMATE_PER_HOUR.start(),
            SEED_ESTIMATE_PER_HOUR.end()
        )?;
        writeln!(f, "  body bytes per active hour: {:.0}", self.bytes_per_active_hour())?;
        let actions: Vec<String> = self.by_action.iter().map(|(a, n)| format!("{n} {a}")).collect();
        writeln!(
            f,
            "  the day: {} requests ({}) for {} operations",
            self.total_requests(),
            actions.join(", "),
            self.operations
        )?;
        let by_hour: Vec<String> =
            (OPEN_AT..CLOSE_AT).map(|h| format!("{h:02}h {}", self.requests_by_hour[h as usize])).collect();
        let elsewhere = self.total_requests()
            - (OPEN_AT..CLOSE_AT).map(|h| self.requests_by_hour[h as usize]).sum::<u64>();
        writeln!(
            f,
            "  by hour: {} ({LUNCH_AT}h: lunch, both tabs hidden); all other hours (browser closed): {elsewhere}",
            by_hour.join(", ")
        )?;
        for (what, returns) in [
            ("nothing changed", self.unchanged_returns),
            ("the other site changed coins", self.changed_returns),
        ] {
            writeln!(
                f,
                "  tab returns when {what}: {} returns, {} requests (at most {} each, response bodies ≤ {} bytes)",
                returns.count, returns.requests, returns.max_requests, returns.max_response_bytes
            )?;
        }
        write!(
            f,
            "  coins at the end: hub {}, faucet tab {}, charity tab {}",
            self.hub_coins, self.faucet_coins, self.charity_coins
        )
    }
}

/// The figures `cargo xtask bench` puts in BENCHMARKS.md.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub requests_per_active_hour: f64,
    pub peak_hour_requests: u64,
    pub polling_per_hour: u64,
    pub seed_estimate_per_hour: (u64, u64),
    pub unchanged_returns: Returns,
}

impl Summary {
    fn of(report: &DayReport) -> Summary {
        Summary {
            requests_per_active_hour: report.requests_per_active_hour(),
            peak_hour_requests: report.peak_hour_requests(),
            polling_per_hour: POLLING_PER_HOUR,
            seed_estimate_per_hour: (*SEED_ESTIMATE_PER_HOUR.start(), *SEED_ESTIMATE_PER_HOUR.end()),
            unchanged_returns: report.unchanged_returns,
        }
    }
}

/// Runs the day against the hub at `addr`. `keys` sign what the sites' backends give their
/// pages: tokens, and a grant for each credit.
pub fn simulate(addr: SocketAddr, keys: &Keys) -> anyhow::Result<DayReport> {
    let mut day = Day::new(addr, keys)?;
    day.advance_to(MIDNIGHT + OPEN_AT * HOUR_MS)?;
    day.open_browser()?;
    for hour in OPEN_AT..CLOSE_AT {
        if hour == LUNCH_AT {
            continue;
        }
        for &(minute, second, step) in HOUR {
            day.advance_to(MIDNIGHT + hour * HOUR_MS + minute * MINUTE + second * SECOND)?;
            day.step(step)?;
        }
    }
    // Before closing the browser, the user looks at both tabs once more.
    let last = MIDNIGHT + CLOSE_AT * HOUR_MS - 30 * SECOND;
    day.advance_to(last)?;
    day.step(Step::Show(Site::Charity))?;
    day.advance_to(last + 10 * SECOND)?;
    day.step(Step::Show(Site::Faucet))?;
    day.advance_to(MIDNIGHT + CLOSE_AT * HOUR_MS)?;
    day.close_browser()?;
    day.advance_to(MIDNIGHT + 24 * HOUR_MS - 1)?;
    day.report()
}

/// A page's token of `site`, as its backend mints it.
fn page_token(keys: &Keys, site: Site) -> String {
    keys.mint(site.id(), USER, 3600).expect("the day's sites are configured")
}

/// A tab: the site's engine while a page of it is open.
struct Tab {
    engine: Option<Engine>,
    /// `CheckDone`s not yet looked at, as (ticket, fresh).
    checks_done: Vec<(u64, bool)>,
    /// The balance the tab showed when the browser closed.
    last_coins: Option<i64>,
}

/// The browser's tabs, and the world around them.
struct Day<'k> {
    tabs: [Tab; 2],
    world: World<'k>,
}

/// Everything but the engines: the network, the sites' backends, storage, the clock and the
/// counters.
struct World<'k> {
    http: Http,
    /// The sites' keys, as their backends hold them.
    keys: &'k Keys,
    now: u64,
    /// localStorage per site (origin): the engine's storage format as text.
    storage: BTreeMap<&'static str, String>,
    /// Seeds every page load's engine from fresh randomness, as the shell does, so that op
    /// ids never repeat when the day runs again against the same hub.
    random: RandomState,
    page_loads: u64,
    requests: u64,
    response_bytes: u64,
    requests_by_hour: [u64; 24],
    bytes_by_hour: [u64; 24],
    by_action: BTreeMap<String, u64>,
    operations: u64,
    unchanged_returns: Returns,
    changed_returns: Returns,
}

impl<'k> Day<'k> {
    fn new(addr: SocketAddr, keys: &'k Keys) -> anyhow::Result<Day<'k>> {
        let world = World {
            http: Http::new(addr)?,
            keys,
            now: MIDNIGHT,
            storage: BTreeMap::new(),
            random: RandomState::new(),
            page_loads: 0,
            requests: 0,
            response_bytes: 0,
            requests_by_hour: [0; 24],
            bytes_by_hour: [0; 24],
            by_action: BTreeMap::new(),
            operations: 0,
            unchanged_returns: Returns::default(),
            changed_returns: Returns::default(),
        };
        let tabs = Site::ALL.map(|_| Tab { engine: None, checks_done: Vec::new(), last_coins: None });
        Ok(Day { tabs, world })
    }

    fn step(&mut self, step: Step) -> anyhow::Result<()> {
        match step {
            Step::Show(site) => self.show(site),
            Step::Navigate(site) => self.load_page(site),
            Step::Operation(site, amount, reason) => self.operation(site, amount, reason),
            Step::Away => {
                for site in Site::ALL {
                    self.input(site, |engine, now| engine.handle_hidden(now))?;
                }
                Ok(())
            }
        }
    }

    /// The faucet loads in the first tab, then the charity site in a second tab, in front.
    fn open_browser(&mut self) -> anyhow::Result<()> {
        self.load_page(Site::Faucet)?;
        self.load_page(Site::Charity)?;
        self.input(Site::Faucet, |engine, now| engine.handle_hidden(now))
    }

    /// `pagehide` in both tabs (which sends any write still pending), then the engines are
    /// gone; what each tab showed last is kept for the report.
    fn close_browser(&mut self) -> anyhow::Result<()> {
        for site in Site::ALL {
            self.input(site, |engine, now| engine.handle_unload(now))?;
            let tab = &mut self.tabs[site.index()];
            let view = tab.engine.take().and_then(|engine| engine.view(DataType::Balance));
            tab.last_coins = view.and_then(|v| v.get("coins").and_then(Json::as_i64));
        }
        Ok(())
    }

    /// A page of `site` loads: its engine starts from the site's storage and signs in.
    fn load_page(&mut self, site: Site) -> anyhow::Result<()> {
        let world = &mut self.world;
        let mut config = Config::new(site.id(), USER, DATA_TYPES.to_vec());
        world.page_loads += 1;
        config.seed = world.random.hash_one(world.page_loads);
        let stored = world
            .storage
            .get(site.id())
            .map(|text| Persisted::from_json(&Json::parse(text).unwrap_or_default()));
        self.tabs[site.index()].engine = Some(Engine::new(config, stored, world.now));
        self.drain(site)?;
        self.check(site, Trigger::Login)
    }

    /// The user switches to `site`'s tab. Records what the return cost, sorted by whether the
    /// hub held anything the tab had not seen (asked of the hub beforehand, not counted).
    fn show(&mut self, site: Site) -> anyhow::Result<()> {
        self.input(site.other(), |engine, now| engine.handle_hidden(now))?;
        let unchanged = self.world.hub_versions(site)? == self.cached_versions(site);
        let (requests, response_bytes) = (self.world.requests, self.world.response_bytes);
        self.check(site, Trigger::TabVisible)?;
        let world = &mut self.world;
        let cost = (world.requests - requests, world.response_bytes - response_bytes);
        let returns = if unchanged { &mut world.unchanged_returns } else { &mut world.changed_returns };
        returns.add(cost.0, cost.1);
        Ok(())
    }

    /// A balance-changing operation: a pull first, then the delta — a credit with a grant
    /// from the site's backend, as a page's must.
    fn operation(&mut self, site: Site, amount: i64, reason: &str) -> anyhow::Result<()> {
        self.check(site, Trigger::EnsureFresh)?;
        let reason = reason.to_owned();
        let grant = (amount > 0).then(|| self.world.grant(site, amount)).transpose()?;
        self.input(site, |engine, now| match grant {
            Some(grant) => engine.apply_delta_with_grant(now, DataType::Balance, amount, Some(reason), grant),
            None => engine.apply_delta(now, DataType::Balance, amount, Some(reason)),
        })?
        .map_err(|refusal| anyhow::anyhow!("{}: the engine refused {amount:+}: {refusal}", site.id()))?;
        self.world.operations += 1;
        Ok(())
    }

    /// Triggers a check and makes sure it ended with the hub's answer.
    fn check(&mut self, site: Site, trigger: Trigger) -> anyhow::Result<()> {
        let ticket = self.input(site, |engine, now| engine.handle_trigger(now, trigger))?;
        let done = std::mem::take(&mut self.tabs[site.index()].checks_done);
        if !done.contains(&(ticket, true)) {
            bail!("{}: the {trigger:?} check did not end fresh ({done:?})", site.id());
        }
        Ok(())
    }

    /// Feeds one input to `site`'s engine at the current time, then drains it.
    fn input<R>(&mut self, site: Site, f: impl FnOnce(&mut Engine, u64) -> R) -> anyhow::Result<R> {
        let now = self.world.now;
        let engine =
            self.tabs[site.index()].engine.as_mut().with_context(|| format!("{} is not open", site.id()))?;
        let result = f(engine, now);
        self.drain(site)?;
        Ok(result)
    }

    /// Drives `site`'s engine until it has nothing more to say; each request is answered
    /// before the next output is looked at.
    fn drain(&mut self, site: Site) -> anyhow::Result<()> {
        let tab = &mut self.tabs[site.index()];
        let Some(engine) = tab.engine.as_mut() else { return Ok(()) };
        let now = self.world.now;
        engine
            .drive(now, &mut TabHost { site, checks_done: &mut tab.checks_done, world: &mut self.world })?;
        Ok(())
    }

    /// Runs every engine timer due up to `at`, then sets the clock to `at`.
    fn advance_to(&mut self, at: u64) -> anyhow::Result<()> {
        for _ in 0..TIMER_STEPS {
            let due = Site::ALL
                .into_iter()
                .filter_map(|site| {
                    let timer = self.tabs[site.index()].engine.as_ref()?.poll_timeout()?;
                    Some((timer, site.index()))
                })
                .filter(|(timer, _)| *timer <= at)
                .min();
            let Some((timer, index)) = due else {
                self.world.now = self.world.now.max(at);
                return Ok(());
            };
            self.world.now = self.world.now.max(timer);
            self.input(Site::ALL[index], |engine, now| engine.handle_timeout(now))?;
        }
        bail!("the engines' timers did not settle before {at}")
    }

    /// The versions `site`'s engine has cached, per data type.
    fn cached_versions(&self, site: Site) -> Vec<Option<u64>> {
        let engine = self.tabs[site.index()].engine.as_ref();
        DATA_TYPES.iter().map(|&t| engine.and_then(|e| e.record(t)).map(|r| r.version)).collect()
    }

    fn report(&mut self) -> anyhow::Result<DayReport> {
        let query = format!("action=get&user_id={USER}&data_type=balance");
        let answer = self.world.reference_read(Site::Faucet, &query)?;
        let hub_coins = answer["data"]["coins"].as_i64().context("the hub's balance has no coins")?;
        let coins = |site: Site| {
            self.tabs[site.index()].last_coins.with_context(|| format!("{} showed no balance", site.id()))
        };
        let active_hours = (OPEN_AT..CLOSE_AT).filter(|&h| h != LUNCH_AT).map(|h| h as usize).collect();
        let world = &self.world;
        Ok(DayReport {
            requests_by_hour: world.requests_by_hour,
            bytes_by_hour: world.bytes_by_hour,
            active_hours,
            by_action: world.by_action.clone(),
            operations: world.operations,
            unchanged_returns: world.unchanged_returns,
            changed_returns: world.changed_returns,
            hub_coins,
            faucet_coins: coins(Site::Faucet)?,
            charity_coins: coins(Site::Charity)?,
        })
    }
}

/// The page of one tab while its engine is driven: stores in the site's storage, answers
/// tokens from the site's backend, and sends each request over HTTP at once.
struct TabHost<'a, 'k> {
    site: Site,
    checks_done: &'a mut Vec<(u64, bool)>,
    world: &'a mut World<'k>,
}

impl Host for TabHost<'_, '_> {
    type Error = anyhow::Error;

    fn event(&mut self, event: &Event) -> anyhow::Result<()> {
        match event {
            Event::CheckDone { ticket, fresh } => self.checks_done.push((*ticket, *fresh)),
            Event::Refused { code, message, .. } => {
                bail!("{}: the hub refused a write: {code}: {message}", self.site.id())
            }
            _ => {}
        }
        Ok(())
    }

    fn persist(&mut self, persisted: Persisted) -> anyhow::Result<()> {
        self.world.storage.insert(self.site.id(), persisted.to_json().to_text());
        Ok(())
    }

    fn token(&mut self) -> Answer<Option<String>> {
        Answer::Now(Some(page_token(self.world.keys, self.site)))
    }

    /// Never asked: the day's pages give no `getGrant` (`Config::asks_for_grants` is off), and
    /// every credit reaches the hub within its grant's ten minutes.
    fn grant(&mut self, _op_id: &str, _data_type: DataType, _amount: i64) -> Answer<Option<String>> {
        Answer::Now(None)
    }

    fn send(&mut self, request: Request) -> anyhow::Result<Answer<Reply>> {
        self.world.send(&request).map(Answer::Now)
    }
}

impl World<'_> {
    /// The grant `site`'s backend gives a credit of `amount` coins, under an op id it makes.
    fn grant(&self, site: Site, amount: i64) -> anyhow::Result<Grant> {
        let op_id = format!("{}-grant-{:016x}", site.id(), self.random.hash_one((self.now, amount)));
        let delta = serde_json::Map::from_iter([("coins".to_owned(), serde_json::Value::from(amount))]);
        let jwt = self.keys.mint_grant(site.id(), USER, &op_id, "balance", delta, 600)?;
        Ok(Grant::new(jwt, op_id))
    }

    /// Sends one of the engines' requests as the shell's `fetch` does, and counts it.
    fn send(&mut self, request: &Request) -> anyhow::Result<Reply> {
        let body = request.body.as_ref().map(Json::to_text);
        let builder = match (&request.method, &request.query) {
            (Method::Get, Some(query)) => hyper::Request::get(format!("{ENDPOINT}?{query}")),
            _ => hyper::Request::post(ENDPOINT),
        };
        let mut builder = builder.header(HOST, self.http.host.clone());
        if let Some(token) = &request.token {
            builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(tag) = &request.if_none_match {
            builder = builder.header(IF_NONE_MATCH, tag);
        }
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let http_request = builder.body(Full::new(Bytes::from(body.clone().unwrap_or_default())))?;
        let action = action_of(request);
        let (status, date, etag, text) =
            self.http.send(http_request).with_context(|| format!("a {action} request"))?;

        let hour = ((self.now - MIDNIGHT) / HOUR_MS) as usize;
        let bytes = (body.map_or(0, |b| b.len()) + text.len()) as u64;
        self.requests += 1;
        self.response_bytes += text.len() as u64;
        self.requests_by_hour[hour] += 1;
        self.bytes_by_hour[hour] += bytes;
        *self.by_action.entry(action.clone()).or_default() += 1;

        match status {
            200 | 304 => Ok(Reply::Answer {
                status,
                body: Json::parse(&text).unwrap_or_default(),
                retry_after: None,
                date,
                etag,
            }),
            429 => bail!(
                "the hub rate-limited the day's {action} request: let one user make a few hundred \
                 requests a minute (limits.requests_per_minute)"
            ),
            _ => bail!("the hub answered {status} to a {action} request: {text}"),
        }
    }

    /// The hub's versions, asked with `site`'s token outside the day's count.
    fn hub_versions(&mut self, site: Site) -> anyhow::Result<Vec<Option<u64>>> {
        let types: Vec<&str> = DATA_TYPES.iter().map(|t| t.as_str()).collect();
        let query = format!("action=timestamp&user_id={USER}&data_type={}", types.join(","));
        let answer = self.reference_read(site, &query)?;
        Ok(DATA_TYPES.iter().map(|t| answer["timestamps"][t.as_str()]["version"].as_u64()).collect())
    }

    /// A GET outside the day's count: what the hub holds, to check the engines against.
    fn reference_read(&mut self, site: Site, query: &str) -> anyhow::Result<serde_json::Value> {
        let token = page_token(self.keys, site);
        let request = hyper::Request::get(format!("{ENDPOINT}?{query}"))
            .header(HOST, self.http.host.clone())
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))?;
        let (status, _, _, text) = self.http.send(request)?;
        if status != 200 {
            bail!("the hub answered {status} to {query}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("the answer to {query}"))
    }
}

/// One keep-alive HTTP/1.1 connection to the hub, reopened when the hub closed it, driven by
/// a runtime of its own so that the day itself stays plain, blocking code.
struct Http {
    runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
    host: HeaderValue,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Http {
    fn new(addr: SocketAddr) -> anyhow::Result<Http> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(Http { runtime, addr, host: HeaderValue::from_str(&addr.to_string())?, sender: None })
    }

    /// The answer's status, its `Date` in milliseconds since the epoch (the engines date their
    /// op ids by it), its `ETag` (which they send back) and its body text.
    fn send(
        &mut self,
        request: hyper::Request<Full<Bytes>>,
    ) -> anyhow::Result<(u16, Option<u64>, Option<String>, String)> {
        let (addr, sender) = (self.addr, &mut self.sender);
        self.runtime.block_on(async {
            let mut open = match sender.take() {
                Some(open) if !open.is_closed() => open,
                _ => crate::load::connect(addr)
                    .await
                    .with_context(|| format!("cannot reach the hub at {addr}"))?,
            };
            open.ready().await?;
            let response = open.send_request(request).await?;
            let status = response.status().as_u16();
            let date = response
                .headers()
                .get(DATE)
                .and_then(|value| httpdate::parse_http_date(value.to_str().ok()?).ok())
                .and_then(|date| date.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|since| since.as_millis() as u64);
            let etag = response.headers().get(ETAG).and_then(|value| value.to_str().ok()).map(str::to_owned);
            let body = response.into_body().collect().await?.to_bytes();
            *sender = Some(open);
            Ok((status, date, etag, String::from_utf8(body.to_vec())?))
        })
    }
}

/// The `action` a request carries: in its query (GET) or its body (POST).
fn action_of(request: &Request) -> String {
    let from_query = request
        .query
        .as_deref()
        .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("action=")).map(str::to_owned));
    let from_body = || request.body.as_ref()?.get("action")?.as_str().map(str::to_owned);
    from_query.or_else(from_body).unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real hub on `127.0.0.1:0` over SQLite in a temporary directory, with the
    /// development sites and a rate limit the day's burst fits in; runs the day against it.
    fn a_day_against_a_real_hub() -> DayReport {
        let dir = tempfile::tempdir().unwrap();
        let config = hub::config::Config {
            hub_id: "day-hub".into(),
            data_dir: dir.path().to_path_buf(),
            limits: hub::config::Limits { requests_per_minute: 100_000, ..Default::default() },
            ..Default::default()
        };
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (app, listener) = runtime.block_on(async {
            let app = hub::App::open(config.with_dev_sites().unwrap()).unwrap();
            (app, tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
        });
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = runtime.spawn(hub::serve(listener, app.clone(), async {
            let _ = stopped.await;
        }));
        let sites = app.sites();
        let report = simulate(addr, sites.keys().expect("auth is on"));
        let _ = stop.send(());
        runtime.block_on(server).unwrap().unwrap();
        report.unwrap()
    }

    #[test]
    fn a_typical_day_costs_less_than_polling_and_no_more_than_the_seed_estimates() {
        let report = a_day_against_a_real_hub();
        assert_eq!(report.active_hours.len(), 8);
        assert!(report.requests_per_active_hour() < POLLING_PER_HOUR as f64, "{report}");
        assert!(report.peak_hour_requests() <= *SEED_ESTIMATE_PER_HOUR.end(), "{report}");
        for (hour, requests) in report.requests_by_hour.iter().enumerate() {
            if !report.active_hours.contains(&hour) {
                assert_eq!(*requests, 0, "{hour}h: hidden tabs and a closed browser send nothing\n{report}");
            }
        }
        // Every operation is one pull and one delta, sent once: no retry, no other write.
        assert_eq!(report.by_action.get("delta"), Some(&report.operations), "{report}");
        let actions: Vec<&str> = report.by_action.keys().map(String::as_str).collect();
        assert_eq!(actions, ["delta", "get", "timestamp"], "{report}");

        let unchanged = report.unchanged_returns;
        assert!(unchanged.count > 0, "{report}");
        assert_eq!((unchanged.requests, unchanged.max_requests), (unchanged.count, 1), "{report}");
        assert!(unchanged.max_response_bytes <= 300, "{report}");
        // After the other site changed coins, a return checks and fetches the balance alone.
        let changed = report.changed_returns;
        assert!(changed.count > 0, "{report}");
        assert_eq!((changed.requests, changed.max_requests), (2 * changed.count, 2), "{report}");

        assert_eq!(
            (report.faucet_coins, report.charity_coins),
            (report.hub_coins, report.hub_coins),
            "{report}"
        );
    }
}
