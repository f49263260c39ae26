//! The demo sites' own backends, one origin each: what a real site's backend does, so that
//! the browser never holds a key and never decides what it earns. Each serves the site's
//! static folder under `www/` at `/`, what the sites share (`www/shared/`) at `/shared/`, the
//! package at `/pkg/`, `/config.json` (where the hub is, which site this is, the rules of its
//! games) and `GET /api/token?user=ID`, a page's token for that user signed with the site's
//! development key. Each also decides its own credits and answers them with grants:
//!
//! - ROFLFaucet: `POST /api/claim` grants a free claim once per claim period.
//!   `POST /api/stake` names a roll's stake, a spend the page makes with the grant it gets;
//!   `POST /api/roll?stake=ID` makes sure that stake is paid — it sends the very same op to
//!   the hub itself, so it is one spend whichever copy lands first — then rolls the die and
//!   grants a win's prize.
//! - Click for Charity: `POST /api/click` grants one coin a click, one click a second per
//!   user. A donation is the page's own spend and asks nothing of the backend.
//! - Both: `POST /api/regrant?op=ID` grants again, for the same op, a credit whose grant
//!   expired before the page delivered it (the package's `getGrant`).
//!
//! Every op these backends grant is named by them, as a UUIDv7 the hub can date (it refuses,
//! with `op_expired`, an op it no longer remembers whose id is older than its memory), laid
//! out as:
//!
//! - the first 48 bits, the op's time in Unix ms: when it was named, a claim's period start,
//!   a prize's stake's time;
//! - the version (7), then the 12 `rand_a` bits: the kind (2 bits, its place in
//!   `OpKind::ALL`) and a 10-bit nonce that tells apart two of one user's ops of one
//!   millisecond (0 for a claim; a prize has its stake's);
//! - the variant (`10`), then the 62 `rand_b` bits: the first 62 bits of an HMAC-SHA256
//!   over the site, the user, the kind, the time and the nonce, with a secret kept in the
//!   hub's data dir.
//!
//! So a page can neither make up an op nor move one to another user or site, and a backend
//! knows its own ops, and their kind, when a page asks for a fresh grant: only the lowercase
//! text it made, whose MAC checks. Two of one user's stakes named in one millisecond share an
//! id once in 1024 times: they are then one op (one spend, one roll), never two bodies under
//! one id. Amounts and reasons come from the kind of op, never from the page. Nothing else is
//! kept: a claim's op is named by its period, a prize by its stake, and the hub applies an op
//! once, so a restarted backend never pays twice; what it forgets (who claimed or clicked a
//! moment ago) only turns a polite 429 into an op the hub replays. An op is honoured for a
//! day, far less than the week a hub remembers op ids at least, so an op granted again is
//! never one the hub has forgotten (and would refuse as expired). Checks no password:
//! whoever names a user id is that user, as befits a demo.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use hmac::{Hmac, Mac};
use hub::auth::{Keys, MAX_GRANT_TTL_SECS};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::root;

/// How long a token stays valid; the package asks for a new one when the hub answers 401.
const TOKEN_TTL_SECS: u64 = 600;
/// A free claim's coins.
const CLAIM_COINS: i64 = 10;
/// What a roll of the die costs.
const ROLL_COST: i64 = 5;
/// What a winning roll pays.
const PRIZE: i64 = 15;
/// The least roll of the die that wins.
const WINNING_ROLL: u64 = 5;
/// A click's coins.
const CLICK_COINS: i64 = 1;
/// The least time between two of a user's paid clicks.
const CLICK_INTERVAL_MS: u64 = 1000;
/// How long after naming an op a backend still rolls its stake or grants it again: far less
/// than the 7 days a hub remembers an op id at least.
const HONOURED_FOR_MS: u64 = 24 * 3600 * 1000;
/// How long a backend waits for the hub before telling its page to try again later.
const HUB_TIMEOUT: Duration = Duration::from_secs(5);
/// Users remembered at most for the polite 429s, before those no longer waiting are dropped.
const REMEMBERED_USERS: usize = 10_000;

/// One demo site.
#[derive(Debug, Clone)]
pub struct Site {
    /// The hub's name for the site: the `iss` of its tokens, which selects its key.
    pub id: &'static str,
    /// The name people see, also in the other site's link to this one.
    pub name: &'static str,
    /// Its static files, under `www/`.
    pub folder: &'static str,
    pub port: u16,
    /// What its backend grants.
    pub kind: SiteKind,
}

impl Site {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// What a site's backend decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteKind {
    /// Claims and the dice.
    Faucet,
    /// Clicks.
    Charity,
}

/// What every site's backend shares.
#[derive(Clone)]
pub struct Setup {
    pub hub_url: String,
    pub keys: Arc<Keys>,
    pub secret: Secret,
    /// How often a user may claim on the faucet: at most a day, since a claim's op is dated at
    /// its period's start and granted again within a day of it.
    pub claim_every_secs: u64,
}

/// The backends' own secret: it names their ops and rolls their dice. Kept in the hub's data
/// dir, so a restarted backend names and rolls exactly as before.
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Reads the secret from `path`, or makes one and writes it there (readable by its owner
    /// only) when there is none.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Secret> {
        if !path.exists() {
            use std::io::Write;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            options
                .open(path)
                .and_then(|mut file| file.write_all(hub::config::random_secret().as_bytes()))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let text = text.trim();
        anyhow::ensure!(text.len() >= 32, "{} holds less than 32 bytes", path.display());
        Ok(Secret(text.into()))
    }
}

/// The sites' servers, running until [`Running::stop`].
pub struct Running {
    stop: watch::Sender<bool>,
    servers: JoinSet<std::io::Result<()>>,
}

/// Binds every site's port (failing if one is taken) and starts serving them.
pub async fn start(sites: &[Site], setup: &Setup) -> anyhow::Result<Running> {
    let (stop, stopped) = watch::channel(false);
    let mut servers = JoinSet::new();
    for site in sites {
        let addr = SocketAddr::from(([127, 0, 0, 1], site.port));
        let listener =
            TcpListener::bind(addr).await.with_context(|| format!("cannot serve {} on {addr}", site.name))?;
        let others = sites
            .iter()
            .filter(|other| other.id != site.id)
            .map(|other| json!({ "name": other.name, "url": other.url() }))
            .collect();
        let backend = Arc::new(Backend::new(site, setup, others)?);
        let mut stopped = stopped.clone();
        let shutdown = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        servers.spawn(
            axum::serve(listener, router(site, backend)).with_graceful_shutdown(shutdown).into_future(),
        );
    }
    Ok(Running { stop, servers })
}

impl Running {
    /// Stops accepting, lets requests in flight finish, and waits for every server.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        while let Some(result) = self.servers.join_next().await {
            result.context("a site server panicked")?.context("a site server failed")?;
        }
        Ok(())
    }
}

/// What a backend grants, each kind for one fixed amount and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Claim,
    /// A roll's stake: a spend, granted only so that the backend names it.
    Stake,
    /// A winning roll's prize, named after its stake.
    Win,
    Click,
}

impl OpKind {
    const ALL: [OpKind; 4] = [OpKind::Claim, OpKind::Stake, OpKind::Win, OpKind::Click];

    fn as_str(self) -> &'static str {
        match self {
            OpKind::Claim => "claim",
            OpKind::Stake => "stake",
            OpKind::Win => "win",
            OpKind::Click => "click",
        }
    }

    fn coins(self) -> i64 {
        match self {
            OpKind::Claim => CLAIM_COINS,
            OpKind::Stake => -ROLL_COST,
            OpKind::Win => PRIZE,
            OpKind::Click => CLICK_COINS,
        }
    }

    /// The op's reason in the hub's ledger.
    fn reason(self) -> &'static str {
        match self {
            OpKind::Claim => "claim",
            OpKind::Stake => "game",
            OpKind::Win => "win",
            OpKind::Click => "click",
        }
    }

    fn site(self) -> SiteKind {
        match self {
            OpKind::Claim | OpKind::Stake | OpKind::Win => SiteKind::Faucet,
            OpKind::Click => SiteKind::Charity,
        }
    }
}

/// An op a backend named: what it is for, when (Unix ms, at most 48 bits), and a nonce (10
/// bits) that tells apart two of one millisecond. A win has its stake's time and nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Op {
    kind: OpKind,
    at_ms: u64,
    nonce: u16,
}

/// The bits of an op id's nonce, below its kind's 2 in `rand_a`.
const NONCE_BITS: u32 = 10;

/// The UUIDv7 text of `value`: lowercase, 8-4-4-4-12.
fn uuid_text(value: u128) -> String {
    let hex = format!("{value:032x}");
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// The 128 bits `text` spells, only if it is spelled as [`uuid_text`] spells them.
fn uuid_bits(text: &str) -> Option<u128> {
    if text.len() != 36 {
        return None;
    }
    let mut value = 0u128;
    for (i, byte) in text.bytes().enumerate() {
        let digit = match (i, byte) {
            (8 | 13 | 18 | 23, b'-') => continue,
            (8 | 13 | 18 | 23, _) => return None,
            (_, b'0'..=b'9') => byte - b'0',
            (_, b'a'..=b'f') => byte - b'a' + 10,
            _ => return None,
        };
        value = value << 4 | u128::from(digit);
    }
    Some(value)
}

/// What a site's backend knows: its own id, key and secret, the hub, and what its pages are
/// told.
struct Backend {
    site: &'static str,
    kind: SiteKind,
    keys: Arc<Keys>,
    secret: Secret,
    hub_url: String,
    http: reqwest::Client,
    claim_every_ms: u64,
    config: Value,
    /// When each user last claimed or clicked here: only to answer a second try with 429.
    recent: Mutex<HashMap<String, u64>>,
}

impl Backend {
    fn new(site: &Site, setup: &Setup, other_sites: Vec<Value>) -> anyhow::Result<Backend> {
        anyhow::ensure!(
            setup.claim_every_secs <= HONOURED_FOR_MS / 1000,
            "a claim period is at most a day, not {} s",
            setup.claim_every_secs
        );
        let rules = match site.kind {
            SiteKind::Faucet => json!({
                "claimCoins": CLAIM_COINS,
                "claimEverySecs": setup.claim_every_secs,
                "rollCost": ROLL_COST,
                "prize": PRIZE,
                "winningRoll": WINNING_ROLL,
            }),
            SiteKind::Charity => json!({ "clickCoins": CLICK_COINS, "clickIntervalMs": CLICK_INTERVAL_MS }),
        };
        Ok(Backend {
            site: site.id,
            kind: site.kind,
            keys: Arc::clone(&setup.keys),
            secret: setup.secret.clone(),
            hub_url: setup.hub_url.clone(),
            http: reqwest::Client::builder().timeout(HUB_TIMEOUT).build()?,
            claim_every_ms: setup.claim_every_secs.max(1) * 1000,
            config: json!({
                "hubUrl": setup.hub_url,
                "siteId": site.id,
                "siteName": site.name,
                "otherSites": other_sites,
                "rules": rules,
            }),
            recent: Mutex::new(HashMap::new()),
        })
    }

    /// The MAC of one of `user`'s ops (or rolls) at this site.
    fn mac(&self, user: &str, what: &str, at_ms: u64, nonce: u16) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.secret.0.as_bytes()).expect("HMAC takes any key");
        mac.update(format!("{}|{user}|{what}|{at_ms}|{nonce}", self.site).as_bytes());
        mac
    }

    /// The bits of `op`'s id for `user`, laid out as the module says.
    fn op_bits(&self, user: &str, op: Op) -> u128 {
        let tag = self.mac(user, op.kind.as_str(), op.at_ms, op.nonce).finalize().into_bytes();
        let mut first = [0u8; 8];
        first.copy_from_slice(&tag[..8]);
        let kind = OpKind::ALL.iter().position(|&k| k == op.kind).expect("every kind is in ALL") as u128;
        let rand_a = kind << NONCE_BITS | u128::from(op.nonce) & ((1 << NONCE_BITS) - 1);
        u128::from(op.at_ms) << 80
            | 0x7 << 76
            | rand_a << 64
            | 0b10 << 62
            | u128::from(u64::from_be_bytes(first) >> 2)
    }

    /// The op id of `op` for `user`: a UUIDv7.
    fn op_id(&self, user: &str, op: Op) -> String {
        uuid_text(self.op_bits(user, op))
    }

    /// The op `id` names, if this backend named it for `user`: only the exact text it made
    /// (no other spelling of the same bits), with a MAC that checks.
    fn recognize(&self, user: &str, id: &str) -> Option<Op> {
        let bits = uuid_bits(id)?;
        let rand_a = (bits >> 64) as u16 & 0xfff;
        let kind = *OpKind::ALL.get(usize::from(rand_a >> NONCE_BITS))?;
        let op = Op { kind, at_ms: (bits >> 80) as u64, nonce: rand_a & ((1 << NONCE_BITS) - 1) };
        bool::from(self.op_bits(user, op).to_be_bytes().ct_eq(&bits.to_be_bytes())).then_some(op)
    }

    /// The die for a stake: the same for every ask, unknowable without the secret.
    fn roll(&self, user: &str, stake: Op) -> u64 {
        let bytes = self.mac(user, "roll", stake.at_ms, stake.nonce).finalize().into_bytes();
        let mut first = [0u8; 8];
        first.copy_from_slice(&bytes[..8]);
        u64::from_le_bytes(first) % 6 + 1
    }

    /// A grant for `op`, with its id, amount and reason: all the backend's own.
    fn grant(&self, user: &str, op: Op) -> Result<Value, Refusal> {
        let op_id = self.op_id(user, op);
        let coins = op.kind.coins();
        let delta = Map::from_iter([("coins".to_owned(), Value::from(coins))]);
        let grant = self
            .keys
            .mint_grant(self.site, user, &op_id, "balance", delta, MAX_GRANT_TTL_SECS)
            .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, "cannot_sign", format!("{e:#}")))?;
        Ok(json!({ "grant": grant, "opId": op_id, "coins": coins, "reason": op.kind.reason() }))
    }

    /// Notes that `user` acts now, unless their last act here was so recent that they may act
    /// again only at `free_at(last)`: then the milliseconds left.
    fn take_turn(&self, user: &str, now: u64, free_at: impl Fn(u64) -> u64) -> Result<(), u64> {
        let mut recent = self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(&last) = recent.get(user)
            && free_at(last) > now
        {
            return Err(free_at(last) - now);
        }
        if recent.len() >= REMEMBERED_USERS {
            recent.retain(|_, last| free_at(*last) > now);
        }
        recent.insert(user.to_owned(), now);
        Ok(())
    }

    /// Sends `user`'s stake to the hub as the page sends it (same op id, same body): the hub
    /// applies it once whichever copy comes first, and answers each copy alike.
    async fn pay(&self, user: &str, stake_id: &str) -> Payment {
        let token = match self.keys.mint(self.site, user, 60) {
            Ok(token) => token,
            Err(e) => return Payment::Unreachable(format!("cannot sign a token: {e:#}")),
        };
        let body = json!({
            "action": "delta",
            "user_id": user,
            "site_id": self.site,
            "data_type": "balance",
            "delta": { "coins": OpKind::Stake.coins() },
            "op_id": stake_id,
            "reason": OpKind::Stake.reason(),
        });
        let sent = self.http.post(format!("{}/api/sync", self.hub_url)).bearer_auth(token).json(&body).send();
        let response = match sent.await {
            Ok(response) => response,
            Err(e) => return Payment::Unreachable(e.to_string()),
        };
        let status = response.status();
        if status.is_success() {
            return Payment::Paid;
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Payment::Unreachable(format!("the hub answered {status}"));
        }
        let answer: Value = response.json().await.unwrap_or_default();
        let field = |name: &str| answer.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
        Payment::Refused { code: field("code"), message: field("error") }
    }
}

/// Whether a stake is paid.
enum Payment {
    Paid,
    /// The hub refused the stake for good, with its code.
    Refused {
        code: String,
        message: String,
    },
    /// The hub did not answer, or not yet: ask again later.
    Unreachable(String),
}

fn router(site: &Site, backend: Arc<Backend>) -> Router {
    let www = root().join("www").join(site.folder);
    let api = match site.kind {
        SiteKind::Faucet => Router::new()
            .route("/api/claim", post(claim))
            .route("/api/stake", post(stake))
            .route("/api/roll", post(roll)),
        SiteKind::Charity => Router::new().route("/api/click", post(click)),
    };
    api.route("/api/regrant", post(regrant))
        .route("/api/token", get(token))
        .route("/config.json", get(config))
        .with_state(backend)
        .nest_service("/pkg", ServeDir::new(root().join("pkg")))
        .nest_service("/shared", ServeDir::new(root().join("www").join("shared")))
        .fallback_service(ServeDir::new(www))
        // Pages and the package are revalidated on every load, so a rebuild shows at once.
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        ))
}

/// Now, in Unix ms: the time that dates the op ids. The hub dates an op id against its own
/// clock, to refuse one older than what it remembers. Here the backends run on the hub's
/// machine, so theirs is the hub's clock; a real backend keeps its clock within the hub's
/// token leeway (30 s) of the hub's, as the tokens it signs need anyway (NTP).
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

/// A backend's refusal: `{"code", "error"}` with its status, and for a refusal that may
/// change, when to ask again (`Retry-After`, and `retryAfterMs` for the page).
struct Refusal {
    status: StatusCode,
    code: String,
    message: String,
    retry_after_ms: Option<u64>,
}

fn refuse(status: StatusCode, code: &str, message: impl Into<String>) -> Refusal {
    Refusal { status, code: code.into(), message: message.into(), retry_after_ms: None }
}

impl Refusal {
    fn retry_after(self, wait_ms: u64) -> Refusal {
        Refusal { retry_after_ms: Some(wait_ms), ..self }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut body = json!({ "code": self.code, "error": self.message });
        if let Some(wait) = self.retry_after_ms {
            body["retryAfterMs"] = json!(wait);
        }
        let mut response = (self.status, no_store(Json(body))).into_response();
        if let Some(wait) = self.retry_after_ms {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait.div_ceil(1000)));
        }
        response
    }
}

fn no_store(body: impl IntoResponse) -> Response {
    ([(header::CACHE_CONTROL, "no-store")], body).into_response()
}

/// A handler's answer.
type Answer = Result<Response, Refusal>;

#[derive(Deserialize)]
struct UserQuery {
    user: String,
}

#[derive(Deserialize)]
struct RollQuery {
    user: String,
    stake: String,
}

#[derive(Deserialize)]
struct RegrantQuery {
    user: String,
    op: String,
}

/// Refuses a user id the hub would refuse.
fn check_user(user: &str) -> Result<(), Refusal> {
    protocol::UserId::parse(user).map(drop).map_err(|r| refuse(StatusCode::BAD_REQUEST, r.code, r.message))
}

async fn token(State(backend): State<Arc<Backend>>, Query(query): Query<UserQuery>) -> Response {
    if let Err(refusal) = protocol::UserId::parse(&query.user) {
        return (StatusCode::BAD_REQUEST, refusal.message).into_response();
    }
    match backend.keys.mint(backend.site, &query.user, TOKEN_TTL_SECS) {
        Ok(token) => ([(header::CACHE_CONTROL, "no-store")], token).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot sign a token: {e:#}")).into_response(),
    }
}

async fn config(State(backend): State<Arc<Backend>>) -> Json<Value> {
    Json(backend.config.clone())
}

/// A claim: once per claim period, under the op id of that period.
async fn claim(State(backend): State<Arc<Backend>>, Query(query): Query<UserQuery>) -> Answer {
    check_user(&query.user)?;
    let now = now_ms();
    let every = backend.claim_every_ms;
    if let Err(wait) = backend.take_turn(&query.user, now, |last| last - last % every + every) {
        let secs = wait.div_ceil(1000);
        let message = format!("the next claim opens in {secs} s");
        return Err(refuse(StatusCode::TOO_MANY_REQUESTS, "claimed_already", message).retry_after(wait));
    }
    let op = Op { kind: OpKind::Claim, at_ms: now - now % every, nonce: 0 };
    Ok(no_store(Json(backend.grant(&query.user, op)?)))
}

/// A roll's stake, named here; the page spends it with the grant.
async fn stake(State(backend): State<Arc<Backend>>, Query(query): Query<UserQuery>) -> Answer {
    check_user(&query.user)?;
    let op = Op { kind: OpKind::Stake, at_ms: now_ms(), nonce: rand_nonce() };
    Ok(no_store(Json(backend.grant(&query.user, op)?)))
}

/// A roll: only of a stake this backend named, once the hub has it paid; the same roll for
/// every ask, and a win's prize under an op id named after the stake.
async fn roll(State(backend): State<Arc<Backend>>, Query(query): Query<RollQuery>) -> Answer {
    let user = &query.user;
    check_user(user)?;
    let Some(stake) = backend.recognize(user, &query.stake).filter(|op| op.kind == OpKind::Stake) else {
        return Err(refuse(StatusCode::FORBIDDEN, "unknown_stake", "this site named no such stake for you"));
    };
    if now_ms().saturating_sub(stake.at_ms) > HONOURED_FOR_MS {
        return Err(refuse(StatusCode::FORBIDDEN, "stake_expired", "a stake is rolled within a day"));
    }
    match backend.pay(user, &query.stake).await {
        Payment::Paid => {}
        Payment::Refused { code, message } => {
            let code = if code == "op_id_reused" { "stake_mismatch" } else { &code };
            return Err(refuse(StatusCode::CONFLICT, code, format!("the hub refused the stake: {message}")));
        }
        Payment::Unreachable(why) => {
            let message = format!("the hub has not taken the stake yet ({why}); ask again");
            return Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "hub_unreachable", message).retry_after(5000));
        }
    }
    let die = backend.roll(user, stake);
    if die < WINNING_ROLL {
        return Ok(no_store(Json(json!({ "roll": die, "win": false }))));
    }
    let mut answer = backend.grant(user, Op { kind: OpKind::Win, ..stake })?;
    answer["roll"] = json!(die);
    answer["win"] = json!(true);
    Ok(no_store(Json(answer)))
}

/// A click's coin: one a second per user.
async fn click(State(backend): State<Arc<Backend>>, Query(query): Query<UserQuery>) -> Answer {
    check_user(&query.user)?;
    let now = now_ms();
    if let Err(wait) = backend.take_turn(&query.user, now, |last| last + CLICK_INTERVAL_MS) {
        return Err(
            refuse(StatusCode::TOO_MANY_REQUESTS, "too_fast", "one paid click a second").retry_after(wait)
        );
    }
    let op = Op { kind: OpKind::Click, at_ms: now, nonce: rand_nonce() };
    Ok(no_store(Json(backend.grant(&query.user, op)?)))
}

/// A fresh grant for an op this backend named for this user, within a day.
async fn regrant(State(backend): State<Arc<Backend>>, Query(query): Query<RegrantQuery>) -> Answer {
    check_user(&query.user)?;
    let Some(op) = backend.recognize(&query.user, &query.op).filter(|op| op.kind.site() == backend.kind)
    else {
        return Err(refuse(StatusCode::FORBIDDEN, "unknown_op", "this site granted no such op to you"));
    };
    if now_ms().saturating_sub(op.at_ms) > HONOURED_FOR_MS {
        return Err(refuse(StatusCode::FORBIDDEN, "op_too_old", "an op is granted again within a day only"));
    }
    Ok(no_store(Json(backend.grant(&query.user, op)?)))
}

/// A nonce for an op id, of `NONCE_BITS`.
fn rand_nonce() -> u16 {
    use rand::Rng;
    rand::rng().random_range(0..1 << NONCE_BITS)
}

#[cfg(test)]
mod tests {
    //! The backends' rules against the real hub, in process on `127.0.0.1:0`, tried the way a
    //! signed-in user with curl would: asking twice, asking after a restart, making up ops.

    use super::*;

    /// The hub with the development sites, and the faucet's and the charity's backends.
    struct Demo {
        setup: Setup,
        http: reqwest::Client,
        faucet: String,
        charity: String,
        stop_hub: Option<tokio::sync::oneshot::Sender<()>>,
        _dir: tempfile::TempDir,
    }

    const FAUCET: Site =
        Site { id: "roflfaucet", name: "ROFLFaucet", folder: "faucet", port: 0, kind: SiteKind::Faucet };
    const CHARITY: Site = Site {
        id: "clickforcharity",
        name: "Click for Charity",
        folder: "charity",
        port: 0,
        kind: SiteKind::Charity,
    };

    impl Demo {
        async fn start() -> Demo {
            let dir = tempfile::tempdir().unwrap();
            let config = hub::config::Config {
                hub_id: "sites-test-hub".into(),
                data_dir: dir.path().to_path_buf(),
                limits: hub::config::Limits { requests_per_minute: 100_000, ..Default::default() },
                ..Default::default()
            }
            .with_dev_sites()
            .unwrap();
            let keys = Arc::new(Keys::from_config(&config).unwrap());
            let app = hub::App::open(config).unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let hub_url = format!("http://{}", listener.local_addr().unwrap());
            let (stop_hub, stopped) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(hub::serve(listener, app, async {
                let _ = stopped.await;
            }));
            let secret = Secret::load_or_create(&dir.path().join("backends.key")).unwrap();
            let setup = Setup { hub_url, keys, secret, claim_every_secs: 3600 };
            let mut demo = Demo {
                setup,
                http: reqwest::Client::new(),
                faucet: String::new(),
                charity: String::new(),
                stop_hub: Some(stop_hub),
                _dir: dir,
            };
            demo.restart_backends().await;
            demo
        }

        /// Starts both backends afresh (their memory empty), on new ports.
        async fn restart_backends(&mut self) {
            self.faucet = serve(&FAUCET, &self.setup).await;
            self.charity = serve(&CHARITY, &self.setup).await;
        }

        /// The faucet's backend itself, to name ops as it would.
        fn faucet_backend(&self) -> Backend {
            Backend::new(&FAUCET, &self.setup, Vec::new()).unwrap()
        }

        /// `POST {site}{path}`: the status and the JSON answer (null when it is not JSON).
        async fn ask(&self, site: &str, path: &str) -> (u16, Value) {
            let response = self.http.post(format!("{site}{path}")).send().await.unwrap();
            (response.status().as_u16(), response.json().await.unwrap_or_default())
        }

        /// The hub's answer to `body`, sent with `token`.
        async fn hub(&self, token: &str, body: Value) -> (u16, Value) {
            let url = format!("{}/api/sync", self.setup.hub_url);
            let response = self.http.post(url).bearer_auth(token).json(&body).send().await.unwrap();
            (response.status().as_u16(), response.json().await.unwrap())
        }

        /// What the page does with a grant answer: its delta, with the page's token.
        async fn deliver(&self, site: &str, user: &str, granted: &Value) -> (u16, Value) {
            let token = self.setup.keys.mint(site, user, 60).unwrap();
            let body = json!({
                "action": "delta", "user_id": user, "site_id": site, "data_type": "balance",
                "delta": { "coins": granted["coins"] }, "op_id": granted["opId"],
                "reason": granted["reason"], "grant": granted["grant"],
            });
            self.hub(&token, body).await
        }

        /// Credits `coins` as the charity's backend would, with its own token.
        async fn credit(&self, user: &str, coins: i64) {
            let keys = &self.setup.keys;
            let token =
                keys.mint_scoped(CHARITY.id, user, 60, keys.signable(CHARITY.id).unwrap(), false).unwrap();
            let op_id = format!("setup-{:016x}", rand::random::<u64>());
            let body = json!({
                "action": "delta", "user_id": user, "site_id": CHARITY.id, "data_type": "balance",
                "delta": { "coins": coins }, "op_id": op_id,
            });
            assert_eq!(self.hub(&token, body).await.0, 200);
        }

        async fn coins(&self, user: &str) -> i64 {
            let token = self.setup.keys.mint(FAUCET.id, user, 60).unwrap();
            let url = format!("{}/api/sync?action=get&user_id={user}&data_type=balance", self.setup.hub_url);
            let response = self.http.get(url).bearer_auth(token).send().await.unwrap();
            let answer: Value = response.json().await.unwrap();
            answer["data"]["coins"].as_i64().unwrap_or(0)
        }
    }

    impl Drop for Demo {
        fn drop(&mut self) {
            if let Some(stop) = self.stop_hub.take() {
                let _ = stop.send(());
            }
        }
    }

    /// The time of an op id the hub can date: a UUIDv7 (version 7, variant `10`), spelled in
    /// lowercase 8-4-4-4-12.
    fn dated(id: &Value) -> u64 {
        let text = id.as_str().unwrap_or_else(|| panic!("no op id: {id}"));
        let bits = uuid_bits(text).unwrap_or_else(|| panic!("not a lowercase UUID: {text}"));
        assert_eq!((bits >> 76 & 0xf, bits >> 62 & 0b11), (7, 0b10), "not a UUIDv7: {text}");
        (bits >> 80) as u64
    }

    /// Serves `site`'s backend on a free port; its URL.
    async fn serve(site: &Site, setup: &Setup) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let backend = Arc::new(Backend::new(site, setup, Vec::new()).unwrap());
        tokio::spawn(axum::serve(listener, router(site, backend)).into_future());
        url
    }

    #[tokio::test]
    async fn a_claim_credits_once_a_period_asked_again_or_after_a_backend_restart() {
        let mut demo = Demo::start().await;
        let user = "claims-twice";
        let (status, first) = demo.ask(&demo.faucet, &format!("/api/claim?user={user}")).await;
        assert_eq!(status, 200, "{first}");
        assert_eq!((first["coins"].as_i64(), first["reason"].as_str()), (Some(CLAIM_COINS), Some("claim")));
        let period_start = dated(&first["opId"]);
        assert_eq!(period_start % 3_600_000, 0, "dated at its period's start: {first}");
        assert!(now_ms() - period_start < 3_600_000, "{first}");
        assert_eq!(demo.deliver(FAUCET.id, user, &first).await.0, 200);
        assert_eq!(demo.coins(user).await, CLAIM_COINS);

        let (status, again) = demo.ask(&demo.faucet, &format!("/api/claim?user={user}")).await;
        assert_eq!((status, again["code"].as_str()), (429, Some("claimed_already")), "{again}");
        assert!(again["retryAfterMs"].as_u64().unwrap() <= 3_600_000, "{again}");

        // A restarted backend forgot the claim, and grants the period's op again: the hub
        // replays it.
        demo.restart_backends().await;
        let (status, after) = demo.ask(&demo.faucet, &format!("/api/claim?user={user}")).await;
        assert_eq!(status, 200, "{after}");
        assert_eq!(after["opId"], first["opId"], "one op id per user and period");
        let (status, replayed) = demo.deliver(FAUCET.id, user, &after).await;
        assert_eq!((status, &replayed["replayed"]), (200, &json!(true)), "{replayed}");
        assert_eq!(demo.coins(user).await, CLAIM_COINS, "credited once");
    }

    #[tokio::test]
    async fn a_stake_is_paid_and_rolled_once_however_often_the_roll_is_asked() {
        let mut demo = Demo::start().await;
        let user = "rolls-twice";
        demo.credit(user, 1000).await;
        let mut expected = 1000;
        let mut seen = (false, false);
        // Until both a win and a loss were seen (a third of the rolls win).
        for _ in 0..40 {
            let (status, stake) = demo.ask(&demo.faucet, &format!("/api/stake?user={user}")).await;
            assert_eq!(status, 200, "{stake}");
            assert_eq!((stake["coins"].as_i64(), stake["reason"].as_str()), (Some(-ROLL_COST), Some("game")));
            let stake_id = stake["opId"].as_str().unwrap();
            assert!(now_ms() - dated(&stake["opId"]) < 60_000, "dated when named: {stake}");
            let roll_path = format!("/api/roll?user={user}&stake={stake_id}");
            let (status, roll) = demo.ask(&demo.faucet, &roll_path).await;
            assert_eq!(status, 200, "{roll}");
            expected -= ROLL_COST;
            // The page's own copy of the stake lands after the backend's: one spend.
            let (status, paid) = demo.deliver(FAUCET.id, user, &stake).await;
            assert_eq!((status, &paid["replayed"]), (200, &json!(true)), "{paid}");

            demo.restart_backends().await;
            let (status, again) = demo.ask(&demo.faucet, &roll_path).await;
            assert_eq!(status, 200, "{again}");
            assert_eq!(
                (&again["roll"], &again["win"], &again["opId"]),
                (&roll["roll"], &roll["win"], &roll["opId"])
            );
            if roll["win"] == json!(true) {
                assert!(roll["roll"].as_u64().unwrap() >= WINNING_ROLL, "{roll}");
                assert_eq!(roll["coins"].as_i64(), Some(PRIZE));
                assert_eq!(dated(&roll["opId"]), dated(&stake["opId"]), "a prize has its stake's time");
                assert_ne!(roll["opId"], stake["opId"]);
                assert_eq!(demo.deliver(FAUCET.id, user, &roll).await.0, 200);
                let (status, replayed) = demo.deliver(FAUCET.id, user, &again).await;
                assert_eq!((status, &replayed["replayed"]), (200, &json!(true)), "{replayed}");
                expected += PRIZE;
                seen.0 = true;
            } else {
                assert!(roll["roll"].as_u64().unwrap() < WINNING_ROLL, "{roll}");
                assert_eq!(roll.get("grant"), None, "a loss grants nothing");
                seen.1 = true;
            }
            assert_eq!(demo.coins(user).await, expected, "each stake paid once, each prize once");
            if seen == (true, true) {
                return;
            }
        }
        panic!("40 rolls without both a win and a loss: {seen:?}");
    }

    #[tokio::test]
    async fn a_stake_the_hub_refuses_is_never_rolled() {
        let demo = Demo::start().await;
        let user = "no-coins";
        let (_, stake) = demo.ask(&demo.faucet, &format!("/api/stake?user={user}")).await;
        let roll_path = format!("/api/roll?user={user}&stake={}", stake["opId"].as_str().unwrap());
        for _ in 0..2 {
            let (status, refused) = demo.ask(&demo.faucet, &roll_path).await;
            assert_eq!((status, refused["code"].as_str()), (409, Some("insufficient_funds")), "{refused}");
        }
        // Coins that come later do not pay a stake the hub refused: it stays refused.
        demo.credit(user, 50).await;
        let (status, refused) = demo.ask(&demo.faucet, &roll_path).await;
        assert_eq!((status, refused["code"].as_str()), (409, Some("insufficient_funds")), "{refused}");

        // A stake the page spent with another reason is another op's body: no roll.
        let (_, stake) = demo.ask(&demo.faucet, &format!("/api/stake?user={user}")).await;
        let mut changed = stake.clone();
        changed["reason"] = json!("shopping");
        assert_eq!(demo.deliver(FAUCET.id, user, &changed).await.0, 200);
        let roll_path = format!("/api/roll?user={user}&stake={}", stake["opId"].as_str().unwrap());
        let (status, refused) = demo.ask(&demo.faucet, &roll_path).await;
        assert_eq!((status, refused["code"].as_str()), (409, Some("stake_mismatch")), "{refused}");
        assert_eq!(demo.coins(user).await, 50 - ROLL_COST);
    }

    #[tokio::test]
    async fn a_backend_grants_again_only_ops_it_named_for_that_user_within_a_day() {
        let demo = Demo::start().await;
        let user = "asks-for-more";
        let (_, claim) = demo.ask(&demo.faucet, &format!("/api/claim?user={user}")).await;
        let claim_id = claim["opId"].as_str().unwrap().to_owned();

        // Its own op, for its user: the same op, amount and reason, whatever the page asks.
        let (status, again) =
            demo.ask(&demo.faucet, &format!("/api/regrant?user={user}&op={claim_id}")).await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(
            (&again["opId"], &again["coins"], &again["reason"]),
            (&claim["opId"], &claim["coins"], &claim["reason"])
        );
        assert_eq!(demo.deliver(FAUCET.id, user, &claim).await.0, 200);
        let (status, replayed) = demo.deliver(FAUCET.id, user, &again).await;
        assert_eq!((status, &replayed["replayed"]), (200, &json!(true)));

        let backend = demo.faucet_backend();
        let two_days_ago = now_ms() - 2 * HONOURED_FOR_MS;
        let old = backend.op_id(user, Op { kind: OpKind::Claim, at_ms: two_days_ago, nonce: 0 });
        // The claim's id with one bit changed: of its MAC, its nonce, its kind (a stake), its
        // time; or spelled otherwise.
        let bits = uuid_bits(&claim_id).unwrap();
        let changed =
            [0, 64, 74, 80].map(|bit| (&demo.faucet, user, uuid_text(bits ^ 1 << bit), "unknown_op"));
        let refusals = changed.into_iter().chain([
            (&demo.faucet, "another", claim_id.clone(), "unknown_op"),
            (&demo.charity, user, claim_id.clone(), "unknown_op"),
            (&demo.faucet, user, claim_id.to_uppercase(), "unknown_op"),
            (&demo.faucet, user, claim_id.replace('-', ""), "unknown_op"),
            (&demo.faucet, user, format!("{{{claim_id}}}"), "unknown_op"),
            (&demo.faucet, user, "roflfaucet-0123456789abcdef0123456789abcdef".into(), "unknown_op"),
            (&demo.faucet, user, old, "op_too_old"),
        ]);
        for (site, asker, op, code) in refusals {
            let (status, refused) = demo.ask(site, &format!("/api/regrant?user={asker}&op={op}")).await;
            assert_eq!(
                (status, refused["code"].as_str()),
                (403, Some(code)),
                "{asker} asks for {op}: {refused}"
            );
        }
        // Only a stake it named is rolled: not a claim, not an op the page made up.
        for stake in [claim_id, "roflfaucet-0123456789abcdef0123456789abcdef".into()] {
            let (status, refused) =
                demo.ask(&demo.faucet, &format!("/api/roll?user={user}&stake={stake}")).await;
            assert_eq!((status, refused["code"].as_str()), (403, Some("unknown_stake")), "{refused}");
        }
        assert_eq!(demo.coins(user).await, CLAIM_COINS);
    }

    #[tokio::test]
    async fn clicks_faster_than_one_a_second_are_not_paid() {
        let demo = Demo::start().await;
        let user = "clicks-fast";
        let (status, click) = demo.ask(&demo.charity, &format!("/api/click?user={user}")).await;
        assert_eq!(status, 200, "{click}");
        assert_eq!((click["coins"].as_i64(), click["reason"].as_str()), (Some(CLICK_COINS), Some("click")));
        assert!(now_ms() - dated(&click["opId"]) < 60_000, "dated when named: {click}");
        let (status, refused) = demo.ask(&demo.charity, &format!("/api/click?user={user}")).await;
        assert_eq!((status, refused["code"].as_str()), (429, Some("too_fast")), "{refused}");
        assert_eq!(demo.deliver(CHARITY.id, user, &click).await.0, 200);
        assert_eq!(demo.coins(user).await, CLICK_COINS);
        // The faucet's backend grants no clicks, nor the charity's claims.
        for (site, path) in [(&demo.faucet, "click"), (&demo.charity, "claim")] {
            let (status, answer) = demo.ask(site, &format!("/api/{path}?user={user}")).await;
            assert!((400..500).contains(&status) && answer.get("grant").is_none(), "{status} {answer}");
        }
    }
}
