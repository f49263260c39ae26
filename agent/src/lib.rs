//! `hub agent`: runs beside a site that keeps its users' balances in files
//! (`<user_id>.json` holding `coins` or `balance`, read by [`balance_file`]), and pushes
//! every change of such a file to the hub, signing its own short-lived tokens with the site's
//! key ([`Signer`]).
//!
//! A client of the hub's public sync API, in a crate of its own: it depends on `protocol`
//! and not on the hub, so it cannot reach the hub's database or domain. The `hub` binary
//! runs it as `hub agent`, reading the site's key and the hub's id from the hub's
//! configuration format ([`Config`]).
//!
//! It watches the folder (inotify on Linux), lets each event settle (notify-debouncer-full),
//! reads each changed file and reconciles it with the hub as [`reconcile`] decides. Requests that fail
//! for a reason that may pass (no connection, 5xx, 429, a refused token) are sent again with
//! backoff until answered; the file is read anew each time a user is reconciled, so only its
//! latest value is pushed. What the file and the hub last agreed on is kept in a state file
//! (written whole to a temporary file, then renamed), together with the writes under way, so
//! that a restart neither pushes again nor misses a change made while the agent was down:
//! at start every file is compared with it.
//!
//! A file it cannot use (a name that is not a user id, content that is not a balance) is
//! skipped with a warning, and the skipped files are counted and named in the lines that end
//! its first check and its run, so that users left unsynced do not go unnoticed.
//!
//! It will not write balance files, delete anything, follow subfolders, or push anything
//! but balances; a removed file pushes nothing.

mod api;
pub mod balance_file;
mod config;
pub mod reconcile;
mod token;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use protocol::{Scope, Scopes, SiteId, UserId};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use self::api::Hub;
pub use self::config::Config;
use self::reconcile::{Agreed, Outcome, Reconcile, Request};
pub use self::token::Signer;

/// The state file's name in the watched folder, unless `--state` names another.
pub const STATE_FILE: &str = ".hub-agent-state.json";

/// How long each file event is held before its file is read: a writer that writes in several
/// steps, or writes a temporary file and renames it, is then read once.
const SETTLE: Duration = Duration::from_millis(150);
/// Each request carries a token minted for it, valid this long (or the site's
/// `max_token_ttl_secs`, if shorter).
const TOKEN_TTL_SECS: u64 = 120;
/// What the agent's tokens may do: read balances, set them, and add or take the local
/// change. Its site must be allowed to sign them all, `amounts:set` included.
pub const SCOPES: Scopes =
    Scopes::of(&[Scope::SyncRead, Scope::AmountsSet, Scope::AmountsCredit, Scope::AmountsSpend]);
/// Remembered agreements are written at least this often while files keep changing (and
/// whenever the agent has nothing left to do).
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// The skipped files a summary line names; it counts the others.
const SKIPPED_NAMED: usize = 10;

/// What `hub agent` is told on its command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// The folder of balance files.
    pub dir: PathBuf,
    /// The site whose files they are; its key (from the configuration) signs the tokens.
    pub site: String,
    /// The hub's base URL; requests go to `<hub_url>/api/sync`.
    pub hub_url: String,
    /// More certificate authorities (PEM) to trust for an `https://` hub, beside the public
    /// ones and the system's: a hub whose certificate a private authority signed.
    pub ca_file: Option<PathBuf>,
    /// The state file; [`STATE_FILE`] in `dir` when `None`.
    pub state: Option<PathBuf>,
}

/// Watches and pushes until `shutdown` completes (or a file watcher or the state file
/// fails). Stopping in the middle of a reconciliation loses nothing: its writes are redone,
/// and recognised by the hub, at the next start.
pub async fn run(
    config: &Config,
    options: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut agent = Agent::new(config, options)?;
    let ended = tokio::select! {
        ended = agent.watch() => ended,
        () = shutdown => Ok(()),
    };
    if agent.unsaved {
        agent.save()?;
    }
    match agent.skipped_summary() {
        None => tracing::info!("agent stopped"),
        Some(skipped) => tracing::warn!("agent stopped; {skipped}"),
    }
    ended
}

/// What the agent remembers between runs: the state file.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    /// The hub database the versions belong to; a hub with another epoch has a new
    /// database, where they mean nothing.
    #[serde(default)]
    epoch: Option<String>,
    /// Where each user's file and the hub last agreed.
    #[serde(default)]
    users: BTreeMap<String, Agreed>,
    /// A reconciliation whose writes were sent or about to be: its answers may have been
    /// lost, so the next start redoes it before anything else (the hub answers its op ids
    /// from the first time), and only then reads the file again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sending: Option<Sending>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sending {
    user: String,
    from: Option<Agreed>,
    file: i64,
}

/// What the file watcher reports.
enum Signal {
    /// Files were created, written or renamed.
    Changed(Vec<PathBuf>),
    /// Events may have been missed (or the watcher failed): every file is read again.
    Lost(String),
}

/// Whether a reconciliation ended, or found the hub on a new database.
enum Flow {
    Done,
    NewHub,
}

struct Agent {
    dir: PathBuf,
    site: SiteId,
    hub: Hub,
    state_path: PathBuf,
    state: State,
    /// Whether `state` holds something the state file does not.
    unsaved: bool,
    saved_at: Instant,
    /// The names of the agent's own files in the watched folder (each also with `.tmp`).
    own_names: Vec<String>,
    /// The files skipped, by name: their users are not synced until they are fixed. A name
    /// that is not a user id is reported once; a file that is not a balance each time it is
    /// read, until it is one.
    skipped: BTreeSet<String>,
    events: mpsc::UnboundedReceiver<Signal>,
    /// Keeps the watcher running.
    _watcher: Watcher,
}

impl Agent {
    fn new(config: &Config, options: Options) -> anyhow::Result<Agent> {
        let site = SiteId::parse(&options.site).map_err(|e| anyhow::anyhow!("--site: {}", e.message))?;
        let signer = Signer::new(config, site.clone(), SCOPES, TOKEN_TTL_SECS)?;
        let hub = Hub::new(&options.hub_url, options.ca_file.as_deref(), signer, site.clone())?;
        let dir =
            options.dir.canonicalize().with_context(|| format!("cannot watch {}", options.dir.display()))?;
        if !dir.is_dir() {
            bail!("{} is not a folder", dir.display());
        }
        let state_path = match options.state {
            Some(path) => {
                let name = path.file_name().context("--state must name a file")?;
                let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
                let folder = folder.canonicalize().with_context(|| {
                    format!("the state file's folder {} does not exist", folder.display())
                })?;
                folder.join(name)
            }
            None => dir.join(STATE_FILE),
        };
        // The default name is never a balance file, even when `--state` puts the state
        // elsewhere and an earlier run left one in the folder.
        let mut own_names = vec![STATE_FILE.to_owned()];
        if state_path.parent() == Some(dir.as_path()) {
            own_names.extend(state_path.file_name().map(|n| n.to_string_lossy().into_owned()));
        }
        let state = load(&state_path)?;
        let (watcher, events) = watch(&dir)?;
        tracing::info!(
            "agent for site {site}: watching {}, pushing to {}, state in {}",
            dir.display(),
            hub.api,
            state_path.display()
        );
        Ok(Agent {
            dir,
            site,
            hub,
            state_path,
            state,
            unsaved: false,
            saved_at: Instant::now(),
            own_names,
            skipped: BTreeSet::new(),
            events,
            _watcher: watcher,
        })
    }

    /// The agent's life: compare every file with the state (and the hub), then follow the
    /// file events.
    async fn watch(&mut self) -> anyhow::Result<()> {
        let mut pending = self.scan()?;
        let files = pending.len();
        if let Flow::NewHub = self.check_epoch().await? {
            pending = self.scan()?;
        }
        if let Some(sending) = self.state.sending.clone() {
            let user = UserId::parse(&sending.user).map_err(|e| self.damaged(&e.message))?;
            tracing::info!("{user}: finishing the push under way when the agent stopped");
            if let Flow::NewHub = self.reconcile(&user, sending.from, sending.file).await? {
                pending = self.scan()?;
            }
        }
        let mut started = false;
        loop {
            while let Ok(signal) = self.events.try_recv() {
                self.note(signal, &mut pending)?;
            }
            if let Some(user) = pending.pop_first() {
                if let Flow::NewHub = self.reconcile_file(&user).await? {
                    pending = self.scan()?;
                }
                if self.unsaved && self.saved_at.elapsed() >= SAVE_EVERY {
                    self.save()?;
                }
                continue;
            }
            if self.unsaved {
                self.save()?;
            }
            if !started {
                started = true;
                match self.skipped_summary() {
                    None => {
                        tracing::info!("checked {files} balance files against the hub; watching for changes")
                    }
                    Some(skipped) => tracing::warn!(
                        "checked {files} balance files against the hub; {skipped}; watching for changes"
                    ),
                }
            }
            let signal = self.events.recv().await.context("the file watcher stopped")?;
            self.note(signal, &mut pending)?;
        }
    }

    /// The users of every balance file in the folder.
    fn scan(&mut self) -> anyhow::Result<BTreeSet<UserId>> {
        let mut users = BTreeSet::new();
        let entries =
            std::fs::read_dir(&self.dir).with_context(|| format!("cannot read {}", self.dir.display()))?;
        for entry in entries {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                users.extend(self.user_of(&entry.path()));
            }
        }
        Ok(users)
    }

    fn note(&mut self, signal: Signal, pending: &mut BTreeSet<UserId>) -> anyhow::Result<()> {
        match signal {
            Signal::Changed(paths) => {
                for path in paths {
                    pending.extend(self.user_of(&path));
                }
            }
            Signal::Lost(why) => {
                tracing::warn!("file events may have been missed ({why}); reading every file again");
                *pending = self.scan()?;
            }
        }
        Ok(())
    }

    /// The user whose balance file `path` is, or `None` (with a log line) for any other file.
    fn user_of(&mut self, path: &Path) -> Option<UserId> {
        let name = path.file_name()?.to_string_lossy();
        if self.own_names.iter().any(|own| *own == name || name.strip_suffix(".tmp") == Some(own)) {
            return None;
        }
        let Some(stem) = name.strip_suffix(".json") else {
            tracing::debug!("ignoring {name}: not a balance file (<user_id>.json)");
            return None;
        };
        match UserId::parse(stem) {
            Ok(user) => Some(user),
            Err(e) => {
                if !self.skipped.contains(name.as_ref()) {
                    self.skip(&name, &format!("the file name is not a user id: {}", e.message));
                }
                None
            }
        }
    }

    /// Reads the user's file and reconciles its value with the hub.
    async fn reconcile_file(&mut self, user: &UserId) -> anyhow::Result<Flow> {
        let name = format!("{user}.json");
        let bytes = match std::fs::read(self.dir.join(&name)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!("{name} is gone; nothing to push");
                self.skipped.remove(&name);
                return Ok(Flow::Done);
            }
            Err(e) => {
                self.skip(&name, &format!("it cannot be read: {e}"));
                return Ok(Flow::Done);
            }
        };
        match balance_file::parse(&name, &bytes) {
            Ok(balance) => {
                self.skipped.remove(&name);
                let from = self.state.users.get(user.as_str()).copied();
                self.reconcile(user, from, balance.coins).await
            }
            Err(reason) => {
                self.skip(&name, &format!("{reason}; it is read again when it changes"));
                Ok(Flow::Done)
            }
        }
    }

    /// Notes that the file `name` is skipped, and warns of it with how many are.
    fn skip(&mut self, name: &str, why: &str) {
        self.skipped.insert(name.to_owned());
        self.forget_removed_skipped();
        tracing::warn!("skipping {name}: {why} ({} skipped in all)", file_count(self.skipped.len()));
    }

    /// Stops counting the skipped files removed since: their removal is no event the agent
    /// follows.
    fn forget_removed_skipped(&mut self) {
        let dir = &self.dir;
        self.skipped.retain(|name| dir.join(name).is_file());
    }

    /// `2 files skipped and not synced until fixed: bad name.json, carol.json`, naming at
    /// most [`SKIPPED_NAMED`] of them; `None` when none is.
    fn skipped_summary(&mut self) -> Option<String> {
        self.forget_removed_skipped();
        if self.skipped.is_empty() {
            return None;
        }
        let names: Vec<&str> = self.skipped.iter().take(SKIPPED_NAMED).map(String::as_str).collect();
        let more = self.skipped.len().saturating_sub(SKIPPED_NAMED);
        let more = if more > 0 { format!(" and {more} more") } else { String::new() };
        Some(format!(
            "{} skipped and not synced until fixed: {}{more}",
            file_count(self.skipped.len()),
            names.join(", ")
        ))
    }

    /// Brings the hub in step with a file that shows `file` coins, starting from `from`.
    async fn reconcile(&mut self, user: &UserId, from: Option<Agreed>, file: i64) -> anyhow::Result<Flow> {
        let mut reconcile = Reconcile::new(self.site.clone(), user.clone(), from, file);
        let mut recorded = false;
        while let Some(request) = reconcile.poll_request().cloned() {
            if request.writes() && !recorded {
                self.state.sending = Some(Sending { user: user.to_string(), from, file });
                self.save()?;
                recorded = true;
            }
            let answer = self.hub.send_until_answered(user, &request).await;
            if let Some(epoch) = answer.epoch
                && let Flow::NewHub = self.note_epoch(epoch)?
            {
                return Ok(Flow::NewHub);
            }
            reconcile.handle_reply(answer.reply);
        }
        let (agreed, outcome) = reconcile.finish().expect("no request is left");
        report(user, file, agreed, &outcome);
        if let Some(agreed) = agreed
            && self.state.users.insert(user.to_string(), agreed) != Some(agreed)
        {
            self.unsaved = true;
        }
        if recorded {
            self.state.sending = None;
            self.unsaved = true;
        }
        Ok(Flow::Done)
    }

    /// At start, with agreements remembered: are they about the database the hub has now?
    async fn check_epoch(&mut self) -> anyhow::Result<Flow> {
        let Some(user) = self.state.users.keys().next() else {
            return Ok(Flow::Done);
        };
        let user = UserId::parse(user).map_err(|e| self.damaged(&e.message))?;
        match self.hub.send_until_answered(&user, &Request::Get).await.epoch {
            Some(epoch) => self.note_epoch(epoch),
            None => Ok(Flow::Done),
        }
    }

    /// Remembers the hub's epoch; a new one voids every agreement.
    fn note_epoch(&mut self, epoch: String) -> anyhow::Result<Flow> {
        match &self.state.epoch {
            Some(known) if *known == epoch => Ok(Flow::Done),
            None => {
                self.state.epoch = Some(epoch);
                self.unsaved = true;
                Ok(Flow::Done)
            }
            Some(known) => {
                tracing::warn!(
                    "the hub has a new database (epoch {epoch}, was {known}): forgetting what it had, \
                     and comparing every file with it anew"
                );
                self.state = State { epoch: Some(epoch), ..State::default() };
                self.save()?;
                Ok(Flow::NewHub)
            }
        }
    }

    fn damaged(&self, why: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "the state file {} is damaged ({why}); remove it to start afresh (every file is then compared \
             with the hub, whose balances are kept)",
            self.state_path.display()
        )
    }

    /// Writes the state file whole: a temporary file, flushed to disk, renamed over it.
    fn save(&mut self) -> anyhow::Result<()> {
        let mut tmp = self.state_path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&serde_json::to_vec(&self.state).map_err(std::io::Error::other)?)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.state_path)?;
            if let Some(parent) = self.state_path.parent() {
                std::fs::File::open(parent)?.sync_all()?;
            }
            Ok(())
        };
        write().with_context(|| format!("cannot write the state file {}", self.state_path.display()))?;
        self.unsaved = false;
        self.saved_at = Instant::now();
        Ok(())
    }
}

/// `1 file`, `2 files`.
fn file_count(n: usize) -> String {
    if n == 1 { "1 file".to_owned() } else { format!("{n} files") }
}

/// One log line for a reconciliation that did something or found something to say.
fn report(user: &UserId, file: i64, agreed: Option<Agreed>, outcome: &Outcome) {
    let hub = agreed.map_or_else(String::new, |a| format!("{} coins (v{})", a.hub, a.version));
    match outcome {
        Outcome::InStep => tracing::debug!("{user}: in step with the hub: {hub}"),
        Outcome::Pushed => tracing::info!("{user}: pushed, the hub has {hub}"),
        Outcome::Merged { change } => tracing::info!(
            "{user}: another site changed the balance meanwhile; the local change {change:+} was added to it: \
             the hub has {hub}"
        ),
        Outcome::HubKept => tracing::warn!(
            "{user}: the file says {file} coins, the hub {hub}; the hub's balance is kept, and later changes \
             of the file are added to it"
        ),
        Outcome::Refused { change, code, message } => tracing::error!(
            "{user}: the hub refused the local change {change:+} ({code}: {message}); it keeps {hub}, and later \
             changes of the file are added to that"
        ),
        Outcome::Unread { code, message } => tracing::error!(
            "{user}: the hub would not give the balance ({code}: {message}); the file's {file} coins are \
             pushed when it changes again"
        ),
    }
}

fn load(path: &Path) -> anyhow::Result<State> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
        Err(e) => return Err(e).with_context(|| format!("cannot read the state file {}", path.display())),
    };
    let state: State = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "the state file {} is damaged; remove it to start afresh (every file is then compared with the hub, \
             whose balances are kept)",
            path.display()
        )
    })?;
    Ok(state)
}

/// The file watcher, behind the debouncer that holds each event for [`SETTLE`].
type Watcher = Debouncer<RecommendedWatcher, RecommendedCache>;

/// Starts watching `dir`; events arrive on the receiver, each once it is [`SETTLE`] old.
///
/// The debouncer's thread wakes every [`SETTLE`] / 3 to hand over the events that have
/// settled, also while nothing happens: a few wakeups a second, in exchange for every event
/// settling the same way, those that arrive during a reconciliation too.
fn watch(dir: &Path) -> anyhow::Result<(Watcher, mpsc::UnboundedReceiver<Signal>)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut watcher = new_debouncer(SETTLE, Some(SETTLE / 3), move |events: DebounceEventResult| {
        let signals = match events {
            Ok(events) => events
                .into_iter()
                .filter_map(|debounced| {
                    let event = debounced.event;
                    if event.need_rescan() {
                        Some(Signal::Lost("the event queue overflowed".into()))
                    } else if changes_content(event.kind) {
                        Some(Signal::Changed(event.paths))
                    } else {
                        None
                    }
                })
                .collect(),
            Err(errors) => {
                let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
                vec![Signal::Lost(errors.join("; "))]
            }
        };
        // The receiver is gone only when the agent stops.
        for signal in signals {
            let _ = tx.send(signal);
        }
    })
    .context("cannot start the file watcher")?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    Ok((watcher, rx))
}

/// Whether an event may mean new content. Opening and reading a file (the agent's own
/// reads among them) does not; a removal leaves nothing to push.
fn changes_content(kind: EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Any | EventKind::Other => true,
        EventKind::Access(access) => access == AccessKind::Close(AccessMode::Write),
        EventKind::Remove(_) => false,
    }
}
