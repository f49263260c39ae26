//! One helper per boundary for the engine's native tests (quinn's `Pair` + `drive()`): a
//! [`Sim`] holds a fake clock, a [`FakeHub`], a faulty [`Network`] and browser tabs, each
//! a [`Tab`] wrapping an [`Engine`] the way the wasm shell does. Scenarios read like the
//! seed's story:
//!
//! ```ignore
//! let sim = Sim::new();
//! let (site_a, site_b) = (sim.open("roflfaucet"), sim.open("clickforcharity"));
//! site_a.login();
//! site_b.login();
//! site_a.delta(10);
//! site_b.tab_returns();
//! assert_eq!(site_b.coins(), 10);
//! ```
//!
//! A tab follows the call order of the crate docs after every input: it drains events
//! (storing [`Engine::persisted`] on `Persist` into its site's "localStorage", answering
//! `NeedToken` with a token the hub minted or a scripted bad one, `NeedGrant` with a grant the
//! site's backend minted again for the same op or with none, passing `Share` and the storage
//! change on to the site's other tabs), then sends the polled requests through the
//! network, then arms the timer [`Engine::poll_timeout`] asks for. Nothing happens between
//! inputs: time passes only in [`Sim::drive`], [`Sim::run_for`] and the story helpers that
//! call them. A tab's credit carries a grant its site's backend minted, as a page's must; its
//! pages give `getGrant` ([`Config::asks_for_grants`]) unless a test turns it off. Messages
//! between tabs of one site (`BroadcastChannel`, and storage changes) arrive at the same
//! instant, before anything else happens. A tab stores as the browser shell does: it reads
//! the writes stored in its site's storage and adopts the ones it does not know, then stores
//! its own. [`Sim::set_storage_events`] turns off the instant word of another tab's storage,
//! as in a browser, where a tab learns of another's writes only when it next stores or loads;
//! [`Sim::set_storage_refuses`] makes a site's storage refuse (full), which the tabs learn
//! through [`Engine::handle_persisted`].
//!
//! A tab with [`Config::live`] plays the shell's part for the event stream too: its site has
//! one stream lock (a Web Lock: granted to one page at a time, in the order asked, let go of
//! when the page goes), a stream it opens travels to the hub as a packet, and what the hub sends
//! on it comes back in order; the tab holding a stream forwards each event, and whether it is
//! live, to the site's other tabs, and answers a tab that starts waiting for the lock when it
//! is live. The hub ends the streams when it goes down or its database is replaced, and a
//! stream whose token expired with `reauth`; a lost packet breaks its stream.

// Each test binary uses a part of this module.
#![allow(dead_code)]

pub mod hub;
pub mod net;

use std::cell::{RefCell, RefMut};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::rc::Rc;

use protocol::Refusal;
use serde_json::Value;
use sync_core::{
    Answer, CachedRecord, Config, DataType, Engine, Event, Grant, Host, Json, Method, Op, OpKind, Persisted,
    Reason, Reply, Request, Shared, Status, StreamEvent, StreamInput, StreamRequest, Trigger,
};

pub use hub::{FakeHub, HubRecord};
pub use net::{Network, Packet, Page, StreamPacket};

/// A configuration keeping the hub's event stream, however long it is quiet (the fake hub
/// sends no heartbeats).
pub fn live(config: &mut Config) {
    config.live = true;
    config.stream_silence_ms = u64::MAX;
}

/// The type and version of the change an event of a stream announces.
fn change_of(input: &StreamInput) -> Option<(DataType, u64)> {
    let (StreamInput::Event(event) | StreamInput::Shared(event)) = input else { return None };
    let data_type = DataType::from_name(event.data.get("data_type")?.as_str()?)?;
    Some((data_type, event.data.get("version")?.as_u64()?))
}

/// The user every tab signs in as.
pub const USER: &str = "8-evans";
/// The fake clock starts at 2025-11-09T18:45:30.123Z.
pub const START_MS: u64 = 1_762_713_930_123;
/// [`Sim::drive`] stops once nothing is due sooner than this: short of the 5-minute
/// inactivity check, beyond any retry delay.
pub const QUIET_MS: u64 = 4 * 60 * 1000;
/// How much fake time [`Sim::drive`] may spend before it gives up as not quiescent.
pub const DRIVE_LIMIT_MS: u64 = 60 * 60 * 1000;
/// The data types a tab keeps in step unless told otherwise.
pub const DATA_TYPES: [DataType; 3] = [DataType::Balance, DataType::Points, DataType::Profile];
const MAX_STEPS: usize = 100_000;

/// What a tab's page answers to [`Event::NeedToken`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenAnswer {
    /// A token the hub accepts, freshly minted by the site's backend.
    Valid,
    /// A token the hub refuses (forged, or for another hub).
    Bad,
    /// A token the site's backend minted long ago, which the hub says has expired.
    Expired,
    /// The page could not get a token (`handle_token(None)`).
    Unavailable,
}

/// What a tab's page answers to [`Event::NeedGrant`] (its `getGrant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantAnswer {
    /// The site's backend grants the same op again.
    Valid,
    /// The site's backend declines (`getGrant` returns null).
    Declined,
    /// The site's backend has not answered yet: [`Tab::answer_grant`] answers later.
    Later,
}

/// An event as a tab saw it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub at: u64,
    /// Which page load of the tab saw it (0 for the first, +1 per reload).
    pub generation: u32,
    pub event: Event,
}

/// Positions in a tab's logs, to ask what happened after it (the default: from the start).
#[derive(Debug, Clone, Copy, Default)]
pub struct Mark {
    events: usize,
    requests: usize,
}

struct TabState {
    name: String,
    site: String,
    /// The configuration each page load starts with (the seed is redrawn per load).
    config: Config,
    engine: Engine,
    generation: u32,
    open: bool,
    /// When to call `handle_timeout` next, as `poll_timeout` last said.
    timer: Option<u64>,
    tokens: VecDeque<TokenAnswer>,
    grants: VecDeque<GrantAnswer>,
    events: Vec<Logged>,
    requests: Vec<(u64, Request)>,
    /// Op ids this tab's engines made.
    ops: Vec<String>,
    /// Times `poll_timeout` asked for a wake-up no later than the `handle_timeout` just made:
    /// a shell would spin on a zero-delay timer.
    stale_wakeups: u32,
    /// The highest version cached per type in this page load, and how often a cached record
    /// was replaced by an older one.
    versions: BTreeMap<DataType, u64>,
    version_regressions: Vec<String>,
    /// The shell's number of its current stream: anything of an older one is dropped.
    stream: u64,
    /// The shell's word: this page's stream is live (its `ready` came, no end since).
    stream_live: bool,
    /// Every stream this tab opened, all page loads, with when.
    streams: Vec<(u64, StreamRequest)>,
    /// The changes (type and version) its engines took from event streams, its own or shared.
    streamed: Vec<(DataType, u64)>,
}

enum Local {
    StoredOps(Vec<Op>),
    Shared(Shared),
    Stream(StreamInput),
    /// What the page asked of the shell: the stream lock, a stream opened or closed.
    Lock(bool),
    Open(Option<StreamRequest>),
}

/// A site's stream lock: the page holding it, and those waiting, in the order they asked.
#[derive(Debug, Default)]
struct SiteLock {
    holder: Option<Page>,
    waiting: VecDeque<Page>,
}

/// An event stream open at the hub.
#[derive(Debug)]
struct Subscription {
    page: Page,
    stream: u64,
    user: String,
    token: Option<String>,
    epoch: String,
    /// The last change sent on it.
    position: u64,
    /// When its last packet arrives: the next may not overtake it.
    last_at: u64,
}

struct World {
    now: u64,
    rng: fastrand::Rng,
    hub: FakeHub,
    net: Network,
    tabs: Vec<TabState>,
    /// localStorage per site (origin): what the last tab to persist stored.
    storage: BTreeMap<String, Persisted>,
    /// Every op id and grant ever stored per site, to tell whether a write (and the grant it
    /// carries) was stored before it was sent.
    ever_stored: BTreeMap<String, BTreeSet<String>>,
    /// Writes sent before they were ever stored.
    unstored_sends: Vec<String>,
    /// Messages between tabs of one site, delivered before anything else happens.
    local: VecDeque<(Page, Local)>,
    /// Credits the sites' backends granted so far (their op ids count them).
    granted: u64,
    debug: bool,
    /// A tab hears at once when another tab of its site stores (else only when it next stores
    /// or loads).
    storage_events: bool,
    /// Sites whose storage refuses every store (full, or switched off).
    storage_refuses: BTreeSet<String>,
    locks: BTreeMap<String, SiteLock>,
    subscriptions: Vec<Subscription>,
    streams_frozen: bool,
}

/// The world: clock, hub, network and tabs. Cheap to clone (a handle).
#[derive(Clone)]
pub struct Sim {
    world: Rc<RefCell<World>>,
}

/// A browser tab of one site, running the engine. Cheap to clone (a handle).
#[derive(Clone)]
pub struct Tab {
    world: Rc<RefCell<World>>,
    id: usize,
}

impl Default for Sim {
    fn default() -> Self {
        Sim::new()
    }
}

impl Sim {
    /// A hub that is up and requires tokens, a perfect network with 5 ms latency.
    pub fn new() -> Sim {
        Sim::with_seed(1)
    }

    pub fn with_seed(seed: u64) -> Sim {
        let world = World {
            now: START_MS,
            rng: fastrand::Rng::with_seed(seed),
            hub: FakeHub::new("epoch-1"),
            net: Network::new(5),
            tabs: Vec::new(),
            storage: BTreeMap::new(),
            ever_stored: BTreeMap::new(),
            unstored_sends: Vec::new(),
            local: VecDeque::new(),
            granted: 0,
            debug: true,
            storage_events: true,
            storage_refuses: BTreeSet::new(),
            locks: BTreeMap::new(),
            subscriptions: Vec::new(),
            streams_frozen: false,
        };
        Sim { world: Rc::new(RefCell::new(world)) }
    }

    /// Opens a tab of `site` keeping [`DATA_TYPES`] in step, debug logging on. Its engine
    /// starts from the site's storage; nothing is triggered yet.
    pub fn open(&self, site: &str) -> Tab {
        self.open_with(site, |_| {})
    }

    /// Whether tabs opened from now on log their decisions ([`Event::Log`]); on by default.
    pub fn set_debug(&self, debug: bool) {
        self.world.borrow_mut().debug = debug;
    }

    /// Opens a tab with a configuration adjusted by `adjust`.
    pub fn open_with(&self, site: &str, adjust: impl FnOnce(&mut Config)) -> Tab {
        let mut world = self.world.borrow_mut();
        let mut config = Config::new(site, USER, DATA_TYPES.to_vec());
        config.debug = world.debug;
        config.needs_token = world.hub.tokens_required();
        config.asks_for_grants = true;
        adjust(&mut config);
        let id = world.tabs.len();
        let name = format!("{site}#{id}");
        let engine = world.start_engine(site, &config);
        world.tabs.push(TabState {
            name,
            site: site.into(),
            config,
            engine,
            generation: 0,
            open: true,
            timer: None,
            tokens: VecDeque::new(),
            grants: VecDeque::new(),
            events: Vec::new(),
            requests: Vec::new(),
            ops: Vec::new(),
            stale_wakeups: 0,
            versions: BTreeMap::new(),
            version_regressions: Vec::new(),
            stream: 0,
            stream_live: false,
            streams: Vec::new(),
            streamed: Vec::new(),
        });
        world.after_input(id);
        Tab { world: self.world.clone(), id }
    }

    /// Opens a tab of `site` that keeps the hub's event stream ([`Config::live`]). The fake hub
    /// sends no heartbeats: the tab keeps a quiet stream however long (see
    /// [`Sim::freeze_streams`] for one that goes silent).
    pub fn open_live(&self, site: &str) -> Tab {
        self.open_with(site, live)
    }

    /// While frozen, the hub sends nothing on its streams, nor ends them (a hub stopped with
    /// SIGSTOP, a connection gone without a word).
    pub fn freeze_streams(&self, frozen: bool) {
        self.world.borrow_mut().streams_frozen = frozen;
    }

    /// Whether a tab hears at once when another tab of its site stores (on by default).
    /// Without, a tab adopts another's writes only when it next stores or loads, as the
    /// browser shell does.
    pub fn set_storage_events(&self, on: bool) {
        self.world.borrow_mut().storage_events = on;
    }

    /// Whether `site`'s storage refuses every store from now on (full, or switched off).
    pub fn set_storage_refuses(&self, site: &str, refuses: bool) {
        let mut world = self.world.borrow_mut();
        if refuses {
            world.storage_refuses.insert(site.to_owned());
        } else {
            world.storage_refuses.remove(site);
        }
    }

    /// The hub. The world stays borrowed while the guard lives: use it within one statement,
    /// and not twice in the same one.
    pub fn hub(&self) -> RefMut<'_, FakeHub> {
        RefMut::map(self.world.borrow_mut(), |w| &mut w.hub)
    }

    /// The network; borrowed like [`Sim::hub`].
    pub fn net(&self) -> RefMut<'_, Network> {
        RefMut::map(self.world.borrow_mut(), |w| &mut w.net)
    }

    pub fn now(&self) -> u64 {
        self.world.borrow().now
    }

    /// Advances the clock to each next due thing (a packet's arrival, a tab's timer) until
    /// nothing is due within [`QUIET_MS`]. Panics if that takes more than an hour of fake
    /// time (a retry loop that never ends) or too many steps.
    pub fn drive(&self) {
        self.world.borrow_mut().drive();
    }

    /// Runs everything due within the next `ms`, then sets the clock to `now + ms`.
    pub fn run_for(&self, ms: u64) {
        let mut world = self.world.borrow_mut();
        let until = world.now + ms;
        world.run_until(until);
    }

    /// Sends every packet the network holds on its way, and stops holding (see
    /// [`Network::hold_when`]).
    pub fn release(&self) -> usize {
        let mut world = self.world.borrow_mut();
        let now = world.now;
        world.net.release(now)
    }

    /// Sends the held packets `pick` chooses on their way; the others stay held.
    pub fn release_if(&self, pick: impl FnMut(&Packet) -> bool) -> usize {
        let mut world = self.world.borrow_mut();
        let now = world.now;
        world.net.release_if(now, pick)
    }

    /// The hub's amount of `data_type` for the user.
    pub fn hub_amount(&self, data_type: DataType) -> i64 {
        let field = protocol::amount_field(data_type).expect("an amount type");
        self.hub().record(USER, data_type).data[field].as_i64().unwrap_or(0)
    }

    pub fn hub_coins(&self) -> i64 {
        self.hub_amount(DataType::Balance)
    }

    /// Writes a record on the hub directly (another site, the agent, an admin).
    pub fn hub_write(&self, data_type: DataType, data: Value) -> HubRecord {
        let now = self.now();
        self.hub().write(now, USER, data_type, data)
    }

    /// What `site`'s localStorage holds.
    pub fn storage(&self, site: &str) -> Option<Persisted> {
        self.world.borrow().storage.get(site).cloned()
    }

    /// Op ids of writes that were sent before they were ever stored.
    pub fn unstored_sends(&self) -> Vec<String> {
        self.world.borrow().unstored_sends.clone()
    }
}

impl Tab {
    // ---- inputs: nothing else happens, no time passes ----

    fn with<R>(&self, f: impl FnOnce(&mut World, usize) -> R) -> R {
        f(&mut self.world.borrow_mut(), self.id)
    }

    /// Feeds one input to the engine at the current time, then follows the call order.
    fn input<R>(&self, f: impl FnOnce(&mut Engine, u64) -> R) -> R {
        self.with(|world, id| {
            assert!(world.tabs[id].open, "{} is closed", world.tabs[id].name);
            let now = world.now;
            let result = f(&mut world.tabs[id].engine, now);
            world.after_input(id);
            result
        })
    }

    /// Which tab this is, as packets name it ([`Page::tab`]).
    pub fn id(&self) -> usize {
        self.id
    }

    pub fn name(&self) -> String {
        self.with(|w, id| w.tabs[id].name.clone())
    }

    /// The site this tab belongs to.
    pub fn site(&self) -> String {
        self.with(|w, id| w.tabs[id].site.clone())
    }

    /// Which page load this is: 0 for the first, +1 per reload.
    pub fn generation(&self) -> u32 {
        self.with(|w, id| w.tabs[id].generation)
    }

    pub fn is_open(&self) -> bool {
        self.with(|w, id| w.tabs[id].open)
    }

    pub fn trigger(&self, trigger: Trigger) -> u64 {
        self.input(|engine, now| engine.handle_trigger(now, trigger))
    }

    /// `apply_delta` on balance; the op id, or the engine's refusal.
    pub fn apply_delta(&self, amount: i64) -> Result<String, Refusal> {
        self.apply(DataType::Balance, amount)
    }

    /// `apply_delta` on `data_type`; a credit first gets a grant from the site's backend, as a
    /// page's must, and takes its op id.
    pub fn apply(&self, data_type: DataType, amount: i64) -> Result<String, Refusal> {
        if amount <= 0 {
            return self.apply_ungranted(data_type, amount);
        }
        let grant = self.grant(data_type, amount);
        self.apply_with_grant(data_type, amount, &grant)
    }

    /// A grant for a new credit, as the site's backend mints it: with an op id of its own, a
    /// UUIDv7 dated by the servers' clock (the hub's), as the site guide asks, so that the hub
    /// can date an op it has forgotten.
    pub fn grant(&self, data_type: DataType, amount: i64) -> String {
        self.with(|w, id| {
            let (now, site) = (w.now, w.tabs[id].site.clone());
            w.granted += 1;
            let op_id = protocol::wire::uuid7(w.hub.clock(now), w.rng.u64(..), w.rng.u64(..));
            w.hub.mint_grant(now, &site, USER, &op_id, data_type, amount)
        })
    }

    /// `apply_delta_with_grant` with `grant` (its op id read from its payload).
    pub fn apply_with_grant(&self, data_type: DataType, amount: i64, grant: &str) -> Result<String, Refusal> {
        let grant = Grant::from_jwt(grant).expect("a grant names its op id");
        self.record_op(self.input(|engine, now| {
            engine.apply_delta_with_grant(now, data_type, amount, Some("claim".into()), grant)
        }))
    }

    /// `apply_delta` without a grant: a spend, or a credit the hub refuses from a page.
    pub fn apply_ungranted(&self, data_type: DataType, amount: i64) -> Result<String, Refusal> {
        self.record_op(
            self.input(|engine, now| engine.apply_delta(now, data_type, amount, Some("game".into()))),
        )
    }

    fn record_op(&self, result: Result<String, Refusal>) -> Result<String, Refusal> {
        if let Ok(op_id) = &result {
            self.with(|w, id| w.tabs[id].ops.push(op_id.clone()));
        }
        result
    }

    /// `push_changes`; panics if the engine refuses the patch.
    pub fn push(&self, data_type: DataType, patch: Value) -> String {
        let op_id = self
            .input(|engine, now| engine.push_changes(now, data_type, Json::from(&patch)))
            .unwrap_or_else(|refusal| panic!("push refused by the engine: {refusal}"));
        self.with(|w, id| w.tabs[id].ops.push(op_id.clone()));
        op_id
    }

    pub fn hide(&self) {
        self.input(|engine, now| engine.handle_hidden(now));
    }

    pub fn go_offline(&self) {
        self.input(|engine, now| engine.handle_offline(now));
    }

    pub fn come_online(&self) -> u64 {
        self.trigger(Trigger::Online)
    }

    /// `pagehide`: the engine sends what is pending with `keepalive`. The page stays; see
    /// [`Tab::reload`] for the next one.
    pub fn unload(&self) {
        self.input(|engine, now| engine.handle_unload(now));
    }

    /// The next page load: the engine is dropped without warning and a new one starts from
    /// the site's storage. Replies to the old page are lost; its requests already on the way
    /// still reach the hub.
    pub fn reload(&self) {
        self.with(|world, id| world.reload(id, false));
    }

    /// Like [`Tab::reload`], but the browser aborts the old page's requests still on the way
    /// (all but the `keepalive` ones).
    pub fn reload_aborting(&self) {
        self.with(|world, id| world.reload(id, true));
    }

    /// `pagehide` (keepalive flush), then the next page load; the browser aborts the old
    /// page's other requests still on the way.
    pub fn unload_and_reload(&self) {
        self.unload();
        self.reload_aborting();
    }

    /// The tab is closed: its engine is gone, its requests on the way still arrive; its
    /// stream and stream lock go.
    pub fn close(&self) {
        self.with(|world, id| {
            world.page_gone(id);
            world.tabs[id].open = false;
            world.settle();
        });
    }

    /// The tab becomes visible again; the check it may start is not waited for.
    pub fn show(&self) -> u64 {
        self.trigger(Trigger::TabVisible)
    }

    /// Hands the engine `input` as the shell would, from this tab's stream or another tab.
    pub fn stream_input(&self, input: StreamInput) {
        self.input(|engine, now| engine.handle_stream(now, input));
    }

    /// Whether changes reach the page live, as the engine says.
    pub fn live(&self) -> bool {
        self.with(|w, id| w.tabs[id].engine.live())
    }

    /// Every event stream this tab opened, all page loads.
    pub fn streams(&self) -> Vec<StreamRequest> {
        self.with(|w, id| w.tabs[id].streams.iter().map(|(_, r)| r.clone()).collect())
    }

    /// The changes (type and version) this tab's engines took from event streams, its own or
    /// shared, in order.
    pub fn streamed(&self) -> Vec<(DataType, u64)> {
        self.with(|w, id| w.tabs[id].streamed.clone())
    }

    /// When this tab opened each of its streams.
    pub fn stream_times(&self) -> Vec<u64> {
        self.with(|w, id| w.tabs[id].streams.iter().map(|(at, _)| *at).collect())
    }

    /// Whether this page holds its site's stream lock.
    pub fn holds_stream_lock(&self) -> bool {
        self.with(|w, id| {
            let page = w.page(id);
            w.locks.get(&w.tabs[id].site).is_some_and(|lock| lock.holder == Some(page))
        })
    }

    /// What the page answers to the next `NeedToken`s, before valid tokens again.
    pub fn script_tokens(&self, answers: impl IntoIterator<Item = TokenAnswer>) {
        self.with(|w, id| w.tabs[id].tokens.extend(answers));
    }

    /// What the page's `getGrant` answers to the next `NeedGrant`s, before valid grants again.
    pub fn script_grants(&self, answers: impl IntoIterator<Item = GrantAnswer>) {
        self.with(|w, id| w.tabs[id].grants.extend(answers));
    }

    /// The page's `getGrant` answers now for `op_id`, asked earlier ([`GrantAnswer::Later`]):
    /// a grant for `amount` balance, or none.
    pub fn answer_grant(&self, op_id: &str, amount: Option<i64>) {
        let grant = amount.map(|amount| {
            self.with(|w, id| {
                let (now, site) = (w.now, w.tabs[id].site.clone());
                w.hub.mint_grant(now, &site, USER, op_id, DataType::Balance, amount)
            })
        });
        self.input(|engine, now| engine.handle_grant(now, op_id, grant));
    }

    // ---- stories: the input, then the world runs until quiescent ----

    fn check(&self, trigger: Trigger) -> bool {
        let ticket = self.trigger(trigger);
        self.sim().drive();
        self.check_done(ticket)
            .unwrap_or_else(|| panic!("{}: ticket {ticket} never got CheckDone", self.name()))
    }

    /// Signs in and waits for the check; whether it was fresh.
    pub fn login(&self) -> bool {
        self.check(Trigger::Login)
    }

    /// The tab is hidden, then visible again; waits for the check.
    pub fn tab_returns(&self) -> bool {
        self.hide();
        self.check(Trigger::TabVisible)
    }

    pub fn ensure_fresh(&self) -> bool {
        self.check(Trigger::EnsureFresh)
    }

    pub fn force_sync(&self) -> bool {
        self.check(Trigger::Force)
    }

    /// Adds `amount` coins and waits until the world is quiet; the op id.
    pub fn delta(&self, amount: i64) -> String {
        let op_id =
            self.apply_delta(amount).unwrap_or_else(|r| panic!("{}: delta refused: {r}", self.name()));
        self.sim().drive();
        op_id
    }

    /// Spends `amount` coins and waits until the world is quiet; the op id.
    pub fn spend(&self, amount: i64) -> String {
        self.delta(-amount)
    }

    fn sim(&self) -> Sim {
        Sim { world: self.world.clone() }
    }

    // ---- queries ----

    /// The balance the page shows (pending writes included).
    pub fn coins(&self) -> i64 {
        self.amount(DataType::Balance)
    }

    pub fn points(&self) -> i64 {
        self.amount(DataType::Points)
    }

    fn amount(&self, data_type: DataType) -> i64 {
        let field = protocol::amount_field(data_type).expect("an amount type");
        let view = self.view(data_type).unwrap_or_else(|| panic!("{}: no {data_type} known", self.name()));
        view[field].as_i64().expect("an integer amount")
    }

    /// What the page shows for `data_type` (pending writes included).
    pub fn view(&self, data_type: DataType) -> Option<Value> {
        self.with(|w, id| w.tabs[id].engine.view(data_type).as_ref().map(Value::from))
    }

    pub fn record(&self, data_type: DataType) -> Option<CachedRecord> {
        self.with(|w, id| w.tabs[id].engine.record(data_type).cloned())
    }

    pub fn status(&self) -> Status {
        self.with(|w, id| w.tabs[id].engine.status())
    }

    pub fn pending(&self) -> Vec<Op> {
        self.with(|w, id| w.tabs[id].engine.pending().cloned().collect())
    }

    pub fn persisted(&self) -> Persisted {
        self.with(|w, id| w.tabs[id].engine.persisted())
    }

    /// What `poll_timeout` says now.
    pub fn timer(&self) -> Option<u64> {
        self.with(|w, id| w.tabs[id].engine.poll_timeout())
    }

    pub fn data_types(&self) -> Vec<DataType> {
        self.with(|w, id| w.tabs[id].config.data_types.clone())
    }

    pub fn mark(&self) -> Mark {
        self.with(|w, id| Mark { events: w.tabs[id].events.len(), requests: w.tabs[id].requests.len() })
    }

    /// Every request this tab sent, all page loads.
    pub fn requests(&self) -> Vec<Request> {
        self.with(|w, id| w.tabs[id].requests.iter().map(|(_, r)| r.clone()).collect())
    }

    /// Requests sent after `mark`, with the time each was sent.
    pub fn requests_since(&self, mark: Mark) -> Vec<(u64, Request)> {
        self.with(|w, id| w.tabs[id].requests[mark.requests..].to_vec())
    }

    pub fn events_since(&self, mark: Mark) -> Vec<Event> {
        self.with(|w, id| w.tabs[id].events[mark.events..].iter().map(|l| l.event.clone()).collect())
    }

    /// The `CheckDone` of `ticket` in the current page load: whether it was fresh.
    pub fn check_done(&self, ticket: u64) -> Option<bool> {
        self.with(|w, id| {
            let tab = &w.tabs[id];
            let mut done =
                tab.events.iter().filter(|l| l.generation == tab.generation).filter_map(|l| match l.event {
                    Event::CheckDone { ticket: t, fresh } if t == ticket => Some(fresh),
                    _ => None,
                });
            let first = done.next();
            assert!(done.next().is_none(), "{}: ticket {ticket} got CheckDone twice", tab.name);
            first
        })
    }

    /// `(op_id, code)` of every `Refused` event.
    pub fn refused(&self) -> Vec<(String, String)> {
        self.with(|w, id| {
            w.tabs[id]
                .events
                .iter()
                .filter_map(|l| match &l.event {
                    Event::Refused { op_id, code, .. } => Some((op_id.clone(), code.clone())),
                    _ => None,
                })
                .collect()
        })
    }

    /// Every `Status` event, in order.
    pub fn statuses(&self) -> Vec<Status> {
        self.with(|w, id| {
            w.tabs[id]
                .events
                .iter()
                .filter_map(|l| match l.event {
                    Event::Status(status) => Some(status),
                    _ => None,
                })
                .collect()
        })
    }

    /// Why the status is offline or error, as the engine says now.
    pub fn status_reason(&self) -> Option<Reason> {
        self.with(|w, id| w.tabs[id].engine.status_reason())
    }

    /// Every `Error` event, in order.
    pub fn errors(&self) -> Vec<Reason> {
        self.with(|w, id| {
            w.tabs[id]
                .events
                .iter()
                .filter_map(|l| match l.event {
                    Event::Error { reason, .. } => Some(reason),
                    _ => None,
                })
                .collect()
        })
    }

    /// The hub's code carried by each `Error` event, in order (`None` for reasons that are
    /// not the hub's refusal).
    pub fn error_hub_codes(&self) -> Vec<Option<String>> {
        self.with(|w, id| {
            w.tabs[id]
                .events
                .iter()
                .filter_map(|l| match &l.event {
                    Event::Error { hub_code, .. } => Some(hub_code.clone()),
                    _ => None,
                })
                .collect()
        })
    }

    /// Every `Spinner` event with its time.
    pub fn spinner(&self) -> Vec<(u64, bool)> {
        self.with(|w, id| {
            w.tabs[id]
                .events
                .iter()
                .filter_map(|l| match l.event {
                    Event::Spinner(on) => Some((l.at, on)),
                    _ => None,
                })
                .collect()
        })
    }

    /// How many times the engine asked for a token.
    pub fn token_asks(&self) -> usize {
        self.with(|w, id| w.tabs[id].events.iter().filter(|l| matches!(l.event, Event::NeedToken)).count())
    }

    /// The op ids the engine asked fresh grants for, in order.
    pub fn grant_asks(&self) -> Vec<String> {
        self.with(|w, id| {
            w.tabs[id]
                .events
                .iter()
                .filter_map(|l| match &l.event {
                    Event::NeedGrant { op_id, .. } => Some(op_id.clone()),
                    _ => None,
                })
                .collect()
        })
    }

    /// Op ids this tab's engines made.
    pub fn ops(&self) -> Vec<String> {
        self.with(|w, id| w.tabs[id].ops.clone())
    }

    /// Times a cached record was replaced by an older version within one page load.
    pub fn version_regressions(&self) -> Vec<String> {
        self.with(|w, id| w.tabs[id].version_regressions.clone())
    }

    pub fn stale_wakeups(&self) -> u32 {
        self.with(|w, id| w.tabs[id].stale_wakeups)
    }

    /// The debug lines, for failure messages.
    pub fn debug_log(&self) -> String {
        self.with(|w, id| {
            w.tabs[id]
                .events
                .iter()
                .filter_map(|l| match &l.event {
                    Event::Log(line) => Some(format!("  +{}ms {line}", l.at - START_MS)),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
    }
}

/// The body of a POST as JSON.
pub fn body_of(request: &Request) -> Option<Value> {
    request.body.as_ref().map(Value::from)
}

/// The op id of a write request.
pub fn op_id_of(request: &Request) -> Option<String> {
    request.body.as_ref()?.get("op_id").and_then(Json::as_str).map(str::to_owned)
}

/// The op ids of the writes a request carries, in order: one for a push or a delta, each op's
/// for a batch.
pub fn op_ids_of(request: &Request) -> Vec<String> {
    let Some(body) = request.body.as_ref() else { return Vec::new() };
    let op_id = |op: &Json| op.get("op_id").and_then(Json::as_str).map(str::to_owned);
    match body.get("ops") {
        Some(Json::Array(ops)) => ops.iter().filter_map(op_id).collect(),
        _ => op_id(body).into_iter().collect(),
    }
}

/// The grant a delta request carries.
pub fn grant_of(request: &Request) -> Option<String> {
    request.body.as_ref()?.get("grant").and_then(Json::as_str).map(str::to_owned)
}

/// The `action` of a request (`timestamp`, `get`, `push`, `delta`).
pub fn action_of(request: &Request) -> String {
    match request.method {
        Method::Get => {
            hub::query_params(request.query.as_deref().unwrap_or("")).remove("action").unwrap_or_default()
        }
        Method::Post => body_of(request)
            .and_then(|b| b.get("action").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_default(),
    }
}

/// The `data_type` a request names (a comma list for a check).
pub fn data_type_of(request: &Request) -> String {
    match request.method {
        Method::Get => {
            hub::query_params(request.query.as_deref().unwrap_or("")).remove("data_type").unwrap_or_default()
        }
        Method::Post => body_of(request)
            .and_then(|b| b.get("data_type").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_default(),
    }
}

impl World {
    fn start_engine(&mut self, site: &str, config: &Config) -> Engine {
        let mut config = config.clone();
        // A real shell seeds every page load with fresh randomness.
        config.seed = self.rng.u64(..);
        Engine::new(config, self.storage.get(site).cloned(), self.now)
    }

    fn page(&self, id: usize) -> Page {
        Page { tab: id, generation: self.tabs[id].generation }
    }

    fn reload(&mut self, id: usize, abort: bool) {
        assert!(self.tabs[id].open, "{} is closed", self.tabs[id].name);
        self.page_gone(id);
        if abort {
            let page = self.page(id);
            self.net.abort_requests_of(page);
        }
        let (site, config) = (self.tabs[id].site.clone(), self.tabs[id].config.clone());
        let engine = self.start_engine(&site, &config);
        let tab = &mut self.tabs[id];
        tab.engine = engine;
        tab.generation += 1;
        tab.timer = None;
        tab.versions.clear();
        tab.stream_live = false;
        self.after_input(id);
    }

    /// The page of tab `id` goes (reload, close): its stream ends, its lock is let go of.
    fn page_gone(&mut self, id: usize) {
        let page = self.page(id);
        self.subscriptions.retain(|sub| sub.page != page);
        self.tabs[id].stream += 1;
        self.unlock(page);
    }

    /// `page` lets go of its site's stream lock, or of its request; the next page waiting
    /// gets it.
    fn unlock(&mut self, page: Page) {
        let site = self.tabs[page.tab].site.clone();
        let lock = self.locks.entry(site).or_default();
        lock.waiting.retain(|p| *p != page);
        if lock.holder == Some(page) {
            lock.holder = None;
            self.set_stream_live(page.tab, false);
            self.grant_lock(&self.tabs[page.tab].site.clone());
        }
    }

    /// The first page waiting for `site`'s free stream lock gets it, and says it is not live.
    fn grant_lock(&mut self, site: &str) {
        let lock = self.locks.entry(site.to_owned()).or_default();
        if lock.holder.is_some() {
            return;
        }
        let Some(page) = lock.waiting.pop_front() else { return };
        lock.holder = Some(page);
        self.local.push_back((page, Local::Stream(StreamInput::Locked)));
        // As the shell does: a holder before it may have gone without saying it was not live.
        for other in self.same_site(page.tab) {
            let other = self.page(other);
            self.local.push_back((other, Local::Stream(StreamInput::SharedLive(false))));
        }
    }

    /// The shell of tab `id` says whether its stream is live, to the site's other tabs, when
    /// that changed.
    fn set_stream_live(&mut self, id: usize, live: bool) {
        if self.tabs[id].stream_live == live {
            return;
        }
        self.tabs[id].stream_live = live;
        for other in self.same_site(id) {
            let page = self.page(other);
            self.local.push_back((page, Local::Stream(StreamInput::SharedLive(live))));
        }
    }

    /// What a page asked of its shell: the stream lock, a stream opened or closed.
    fn shell_effect(&mut self, page: Page, effect: Local) {
        let site = self.tabs[page.tab].site.clone();
        match effect {
            Local::Lock(true) => {
                // Asking whether the stream is live: the holder answers when it is.
                let holder = self.locks.get(&site).and_then(|lock| lock.holder);
                if holder.is_some_and(|h| h != page && self.tabs[h.tab].stream_live) {
                    self.local.push_back((page, Local::Stream(StreamInput::SharedLive(true))));
                }
                let lock = self.locks.entry(site.clone()).or_default();
                if lock.holder != Some(page) && !lock.waiting.contains(&page) {
                    lock.waiting.push_back(page);
                }
                self.grant_lock(&site);
            }
            Local::Lock(false) => self.unlock(page),
            Local::Open(request) => {
                let tab = &mut self.tabs[page.tab];
                tab.stream += 1;
                let stream = tab.stream;
                self.subscriptions.retain(|sub| sub.page != page);
                self.set_stream_live(page.tab, false);
                if let Some(request) = request {
                    let now = self.now;
                    self.tabs[page.tab].streams.push((now, request.clone()));
                    let packet = StreamPacket::Open { from: page, stream, request };
                    if self.net.send_stream(self.now, packet, 0, true, &mut self.rng).is_none() {
                        self.end_stream(page, stream, 0, 0);
                    }
                }
            }
            _ => {}
        }
    }

    /// Stream `stream` of `page` ends with `status`, arriving after `after`.
    fn end_stream(&mut self, page: Page, stream: u64, status: u16, after: u64) {
        let input = StreamInput::Ended { status, body: Json::Null, retry_after: None };
        let packet = StreamPacket::Input { to: page, stream, input };
        self.net.send_stream(self.now, packet, after, false, &mut self.rng);
    }

    /// The hub sends what each open stream is owed: the changes after its position, `reauth`
    /// and its end when its token expired, its end when the hub went down or its database
    /// was replaced. A lost packet breaks its stream.
    fn pump_streams(&mut self) {
        if self.streams_frozen {
            return;
        }
        let now = self.now;
        let mut i = 0;
        while i < self.subscriptions.len() {
            let sub = &self.subscriptions[i];
            let (page, stream) = (sub.page, sub.stream);
            let down = self.hub.mode() == hub::Mode::Down || sub.epoch != self.hub.epoch();
            if down || !self.hub.token_valid(sub.token.as_deref()) {
                let last_at = sub.last_at;
                let status = if down { 0 } else { 200 };
                let mut after = last_at;
                if !down {
                    let reauth = StreamEvent { name: "reauth".into(), id: None, data: Json::object() };
                    let input = StreamInput::Event(reauth);
                    let packet = StreamPacket::Input { to: page, stream, input };
                    after = self.net.send_stream(now, packet, after, false, &mut self.rng).unwrap_or(after);
                }
                self.end_stream(page, stream, status, after);
                self.subscriptions.remove(i);
                continue;
            }
            let events = self.hub.changes_after(&sub.user, sub.position);
            let position = self.hub.position();
            if self.send_events(i, events) {
                self.subscriptions[i].position = position;
                i += 1;
            } else {
                self.subscriptions.remove(i);
            }
        }
    }

    /// Sends `events` on subscription `i`, in order; false when one was lost and the stream
    /// broke (its end sent).
    fn send_events(&mut self, i: usize, events: Vec<StreamEvent>) -> bool {
        let (page, stream) = (self.subscriptions[i].page, self.subscriptions[i].stream);
        for event in events {
            let packet = StreamPacket::Input { to: page, stream, input: StreamInput::Event(event) };
            let after = self.subscriptions[i].last_at;
            match self.net.send_stream(self.now, packet, after, true, &mut self.rng) {
                Some(at) => self.subscriptions[i].last_at = at,
                None => {
                    self.end_stream(page, stream, 0, after);
                    return false;
                }
            }
        }
        true
    }

    /// A stream packet arrives: an opening at the hub, or what the hub sent at the page.
    fn deliver_stream(&mut self, packet: StreamPacket) {
        let now = self.now;
        match packet {
            StreamPacket::Open { from, stream, request } => {
                let user = hub::query_params(&request.query).remove("user_id").unwrap_or_default();
                let opened =
                    self.hub.open_stream(request.token.as_deref(), &user, request.last_event_id.as_deref());
                match opened {
                    Ok((events, position)) => {
                        let epoch = self.hub.epoch().to_owned();
                        let token = request.token;
                        let sub =
                            Subscription { page: from, stream, user, token, epoch, position, last_at: now };
                        self.subscriptions.push(sub);
                        let i = self.subscriptions.len() - 1;
                        if !self.send_events(i, events) {
                            self.subscriptions.remove(i);
                        }
                    }
                    Err((status, body, retry_after)) => {
                        let input = StreamInput::Ended { status, body, retry_after };
                        let packet = StreamPacket::Input { to: from, stream, input };
                        self.net.send_stream(now, packet, 0, false, &mut self.rng);
                    }
                }
            }
            StreamPacket::Input { to, stream, input } => {
                if !self.is_current(to) || self.tabs[to.tab].stream != stream {
                    return;
                }
                match &input {
                    StreamInput::Ended { .. } => self.set_stream_live(to.tab, false),
                    StreamInput::Event(event) => {
                        if event.name == "ready" {
                            self.set_stream_live(to.tab, true);
                        }
                        for other in self.same_site(to.tab) {
                            let page = self.page(other);
                            self.local.push_back((page, Local::Stream(StreamInput::Shared(event.clone()))));
                        }
                    }
                    _ => {}
                }
                self.tabs[to.tab].streamed.extend(change_of(&input));
                self.tabs[to.tab].engine.handle_stream(now, input);
                self.after_input(to.tab);
            }
        }
    }

    /// After an input to tab `id`: its outputs, then what it told the site's other tabs.
    fn after_input(&mut self, id: usize) {
        self.flush(id);
        self.settle();
    }

    /// Drives tab `id`'s engine ([`Engine::drive`]) until it has nothing more to say; arms its
    /// timer.
    fn flush(&mut self, id: usize) {
        if !self.tabs[id].open {
            return;
        }
        let others: Vec<Page> = self.same_site(id).into_iter().map(|other| self.page(other)).collect();
        let page = self.page(id);
        let World {
            now,
            rng,
            hub,
            net,
            tabs,
            storage,
            ever_stored,
            unstored_sends,
            local,
            storage_events,
            storage_refuses,
            ..
        } = self;
        let tab = &mut tabs[id];
        let mut stored = None;
        let mut host = TabHost {
            now: *now,
            page,
            site: &tab.site,
            others,
            events: &mut tab.events,
            tokens: &mut tab.tokens,
            grants: &mut tab.grants,
            requests: &mut tab.requests,
            hub,
            net,
            rng,
            storage,
            ever_stored,
            unstored_sends,
            local,
            storage_events: *storage_events,
            refuses: storage_refuses.contains(&tab.site),
            stored: &mut stored,
        };
        let Ok(mut timer) = tab.engine.drive(*now, &mut host);
        if let Some(taken) = host.stored.take() {
            // The page tells the engine whether storage took it, then drains it again.
            tab.engine.handle_persisted(*now, taken);
            let Ok(after) = tab.engine.drive(*now, &mut host);
            timer = after;
        }
        tab.timer = timer;
        for data_type in DataType::ALL {
            let Some(version) = tab.engine.record(data_type).map(|r| r.version) else { continue };
            let highest = tab.versions.entry(data_type).or_insert(version);
            if version < *highest {
                tab.version_regressions.push(format!("{data_type} v{highest} → v{version} at {now}"));
            }
            *highest = version.max(*highest);
        }
    }

    /// The other open tabs of tab `id`'s site.
    fn same_site(&self, id: usize) -> Vec<usize> {
        let site = &self.tabs[id].site;
        (0..self.tabs.len()).filter(|&o| o != id && self.tabs[o].open && self.tabs[o].site == *site).collect()
    }

    /// Delivers the messages between tabs, and what their reactions send on; carries out
    /// what pages asked of their shells.
    fn settle(&mut self) {
        while let Some((page, message)) = self.local.pop_front() {
            if !self.is_current(page) {
                continue;
            }
            if let Local::Lock(_) | Local::Open(_) = message {
                self.shell_effect(page, message);
                continue;
            }
            let now = self.now;
            let engine = &mut self.tabs[page.tab].engine;
            match message {
                Local::StoredOps(ops) => engine.handle_stored_ops(now, &ops),
                Local::Shared(shared) => engine.handle_shared(now, shared),
                Local::Stream(input) => {
                    self.tabs[page.tab].streamed.extend(change_of(&input));
                    self.tabs[page.tab].engine.handle_stream(now, input);
                }
                Local::Lock(_) | Local::Open(_) => {}
            }
            self.flush(page.tab);
        }
    }

    fn is_current(&self, page: Page) -> bool {
        let tab = &self.tabs[page.tab];
        tab.open && tab.generation == page.generation
    }

    fn deliver(&mut self, packet: Packet) {
        let now = self.now;
        match packet {
            Packet::Request { from, request } => {
                let reply = self.hub.handle(now, &request);
                let packet = Packet::Reply { to: from, request, reply };
                self.net.send(now, packet, &mut self.rng);
            }
            Packet::Reply { to, request, reply } => {
                if self.is_current(to) {
                    self.tabs[to.tab].engine.handle_reply(now, request.id, reply);
                    self.after_input(to.tab);
                }
            }
        }
    }

    fn next_due(&self) -> Option<u64> {
        let timers = self.tabs.iter().filter(|t| t.open).filter_map(|t| t.timer);
        timers.chain(self.net.next_at()).min()
    }

    /// Handles one thing due at the current time: a packet, else a timer; then the hub sends
    /// on its streams.
    fn step(&mut self) {
        self.step_once();
        self.pump_streams();
    }

    fn step_once(&mut self) {
        let now = self.now;
        if let Some(packet) = self.net.pop_stream_due(now) {
            self.deliver_stream(packet);
            return;
        }
        if let Some(packet) = self.net.pop_due(now) {
            self.deliver(packet);
            return;
        }
        let Some(id) = (0..self.tabs.len())
            .find(|&id| self.tabs[id].open && self.tabs[id].timer.is_some_and(|at| at <= now))
        else {
            return;
        };
        self.tabs[id].engine.handle_timeout(now);
        self.flush(id);
        if self.tabs[id].timer.is_some_and(|at| at <= now) {
            self.tabs[id].stale_wakeups += 1;
            self.tabs[id].timer = None;
        }
        self.settle();
    }

    fn run_until(&mut self, until: u64) {
        self.pump_streams();
        let mut steps = 0;
        while let Some(at) = self.next_due().filter(|&at| at <= until) {
            self.now = self.now.max(at);
            self.step();
            steps += 1;
            assert!(steps < MAX_STEPS, "no end in sight after {steps} steps: {}", self.describe());
        }
        self.now = self.now.max(until);
    }

    fn drive(&mut self) {
        self.pump_streams();
        let limit = self.now + DRIVE_LIMIT_MS;
        let mut steps = 0;
        loop {
            let next = self.next_due();
            if self.net.is_idle() && next.is_none_or(|at| at >= self.now + QUIET_MS) {
                return;
            }
            let at = next.expect("a packet in transit is due");
            assert!(at <= limit, "not quiescent after an hour: {}", self.describe());
            self.now = self.now.max(at);
            self.step();
            steps += 1;
            assert!(steps < MAX_STEPS, "no end in sight after {steps} steps: {}", self.describe());
        }
    }

    fn describe(&self) -> String {
        let tabs: Vec<String> = self
            .tabs
            .iter()
            .map(|t| {
                format!(
                    "{} (gen {}, open {}, timer {:?}, pending {}, status {:?})",
                    t.name,
                    t.generation,
                    t.open,
                    t.timer.map(|at| at as i64 - self.now as i64),
                    t.engine.pending().count(),
                    t.engine.status()
                )
            })
            .collect();
        format!(
            "now +{}ms, hub {:?}, {:?}, tabs: {}",
            self.now - START_MS,
            self.hub.mode(),
            self.net,
            tabs.join("; ")
        )
    }
}

/// The page's side of one tab while its engine is driven: the world around the engine.
struct TabHost<'w> {
    now: u64,
    page: Page,
    site: &'w str,
    /// The site's other open tabs, which hear of this one's storage and shared records.
    others: Vec<Page>,
    events: &'w mut Vec<Logged>,
    tokens: &'w mut VecDeque<TokenAnswer>,
    grants: &'w mut VecDeque<GrantAnswer>,
    requests: &'w mut Vec<(u64, Request)>,
    hub: &'w mut FakeHub,
    net: &'w mut Network,
    rng: &'w mut fastrand::Rng,
    storage: &'w mut BTreeMap<String, Persisted>,
    ever_stored: &'w mut BTreeMap<String, BTreeSet<String>>,
    unstored_sends: &'w mut Vec<String>,
    local: &'w mut VecDeque<(Page, Local)>,
    /// Whether the site's other tabs hear at once of what this one stores.
    storage_events: bool,
    /// The site's storage refuses every store.
    refuses: bool,
    /// Whether the last store was taken, if one was tried.
    stored: &'w mut Option<bool>,
}

impl Host for TabHost<'_> {
    type Error = Infallible;

    fn event(&mut self, event: &Event) -> Result<(), Infallible> {
        self.events.push(Logged { at: self.now, generation: self.page.generation, event: event.clone() });
        match event {
            Event::Share(shared) => {
                for &other in &self.others {
                    self.local.push_back((other, Local::Shared(shared.clone())));
                }
            }
            Event::StreamLock(on) => self.local.push_back((self.page, Local::Lock(*on))),
            Event::Stream(request) => self.local.push_back((self.page, Local::Open(request.clone()))),
            _ => {}
        }
        Ok(())
    }

    fn stored_ops(&mut self) -> Vec<Op> {
        self.storage.get(self.site).map(|stored| stored.outbox.clone()).unwrap_or_default()
    }

    fn persist(&mut self, persisted: Persisted) -> Result<(), Infallible> {
        *self.stored = Some(!self.refuses);
        if self.refuses {
            return Ok(());
        }
        let ops = persisted.outbox.clone();
        let grants = ops.iter().filter_map(|op| match &op.kind {
            OpKind::Delta { grant, .. } => grant.clone(),
            OpKind::Push { .. } => None,
        });
        let stored = self.ever_stored.entry(self.site.to_owned()).or_default();
        stored.extend(ops.iter().map(|op| op.op_id.clone()).chain(grants));
        self.storage.insert(self.site.to_owned(), persisted);
        if self.storage_events {
            for &other in &self.others {
                self.local.push_back((other, Local::StoredOps(ops.clone())));
            }
        }
        Ok(())
    }

    fn token(&mut self) -> Answer<Option<String>> {
        Answer::Now(match self.tokens.pop_front().unwrap_or(TokenAnswer::Valid) {
            TokenAnswer::Valid => Some(self.hub.mint_token(self.site, USER)),
            TokenAnswer::Bad => Some("forged-token".to_owned()),
            TokenAnswer::Expired => Some(self.hub.mint_expired_token(self.site, USER)),
            TokenAnswer::Unavailable => None,
        })
    }

    fn grant(&mut self, op_id: &str, data_type: DataType, amount: i64) -> Answer<Option<String>> {
        match self.grants.pop_front().unwrap_or(GrantAnswer::Valid) {
            GrantAnswer::Valid => {
                Answer::Now(Some(self.hub.mint_grant(self.now, self.site, USER, op_id, data_type, amount)))
            }
            GrantAnswer::Declined => Answer::Now(None),
            GrantAnswer::Later => Answer::Later,
        }
    }

    fn send(&mut self, request: Request) -> Result<Answer<Reply>, Infallible> {
        let stored = self.ever_stored.get(self.site);
        let stored = |key: &str| stored.is_some_and(|stored| stored.contains(key));
        if let Some(op_id) = op_id_of(&request)
            && !stored(&op_id)
        {
            self.unstored_sends.push(op_id);
        }
        if let Some(grant) = grant_of(&request)
            && !stored(&grant)
        {
            self.unstored_sends.push(format!("the grant of {}", op_id_of(&request).unwrap_or_default()));
        }
        self.requests.push((self.now, request.clone()));
        let packet = Packet::Request { from: self.page, request };
        self.net.send(self.now, packet, self.rng);
        Ok(Answer::Later)
    }
}
