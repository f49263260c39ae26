//! `hub agent`: runs beside a site that keeps its users' balances in files
//! (`<user_id>.json` holding `coins` or `balance`, read by [`balance_file`]), pushes every
//! change of such a file to the hub, and writes into the files what changed elsewhere,
//! signing its own short-lived tokens with the site's key ([`Signer`]).
//!
//! A client of the hub's public API (sync and change feed), in a crate of its own: it depends
//! on `protocol` and not on the hub, so it cannot reach the hub's database or domain. The `hub` binary
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
//! The other way (unless `--push-only`): a task reads the site's change feed
//! (`/api/changes`, balances only) from a cursor kept in the state file, and each change of a
//! user who has a file, newer than what the file and the hub agreed, is written into the file
//! once any local change the hub has not seen is reconciled ([`reconcile::file_step`]). A
//! write replaces the file whole by renaming a temporary file of the agent's own over it, with
//! the file's permissions and owner, and is recorded in the state file before the rename, so
//! that a stop at any point neither loses it nor reads it back as a local change; the
//! watcher's event for it then finds the file in step and pushes nothing. The file is read
//! again just before the rename, under its lock (`flock`, which PHP's `flock()` takes too):
//! one that changed meanwhile is reconciled first. The same
//! write shows the hub's balance in the file after a reconciliation that left them apart
//! (a merge, a refused change, the hub's balance kept at first sight).
//!
//! A file it cannot use (a name that is not a user id, content that is not a balance) is
//! skipped with a warning, and the skipped files are counted and named in the lines that end
//! its first check and its run, so that users left unsynced do not go unnoticed.
//!
//! It will not create or delete balance files (a user without a file is left alone), follow
//! subfolders, or sync anything but balances; a removed file pushes nothing.

mod api;
pub mod balance_file;
mod config;
pub mod reconcile;
mod token;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use protocol::{Scope, Scopes, SiteId, UserId};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use self::api::{Changes, Feed, FeedAnswer, Hub};
pub use self::config::Config;
use self::reconcile::{Agreed, FileStep, HubBalance, Outcome, Reconcile, Reply, Request};
pub use self::token::Signer;

/// The state file's name in the watched folder, unless `--state` names another.
pub const STATE_FILE: &str = ".hub-agent-state.json";
/// How the agent's temporary files for balance files end (`.<user_id>.json.hub-agent.tmp`):
/// not `.json`, so that a site that lists `*.json` never sees one, and ignored by the watcher.
pub const TEMP_SUFFIX: &str = ".hub-agent.tmp";

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
/// What the tokens that read the change feed may do, in two-way mode.
pub const FEED_SCOPES: Scopes = Scopes::of(&[Scope::ChangesRead]);
/// The `sub` of the feed's tokens: the feed is the site's, not a user's; the hub counts the
/// feed's requests against this name.
const FEED_READER: &str = "hub-agent";
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
    /// Only push the files' changes: never read the change feed nor write a balance file.
    pub push_only: bool,
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
    /// Where the change feed is read on from: past every change already written into the
    /// files (or found older than their agreements). Opaque, the hub's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cursor: Option<String>,
    /// A balance file being replaced: recorded before the rename, so that the next start
    /// knows which agreement holds ([`reconcile::interrupted_write`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    writing: Option<Writing>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sending {
    user: String,
    from: Option<Agreed>,
    file: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Writing {
    user: String,
    from: Agreed,
    to: Agreed,
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

/// How a write of the hub's balance into a file ended.
enum Written {
    Done,
    /// The file changed while the write was prepared; it was left as it is.
    FileChanged,
    /// The write failed (logged); the file was left as it is.
    Failed,
}

/// How often the agent reads the change feed, at most, once [`FEED_BURST`] reads came one
/// after the other: the changes that come faster are then read together, so that a busy
/// hub's feed costs the agent at most about 86 requests a minute, within the per-user rate
/// limit the hub has by default (100 a minute).
const FEED_PACE: Duration = Duration::from_millis(700);
/// Reads of the change feed that may follow each other at once, before [`FEED_PACE`] spaces
/// them: the changes of a quiet site reach the files without waiting.
const FEED_BURST: f64 = 10.0;
/// How long the agent waits for a balance file that another process holds locked (`flock`,
/// as PHP's `flock()` takes it) before it leaves the write for the user's next turn.
const LOCK_PATIENCE: Duration = Duration::from_secs(2);

/// The task that reads the change feed; it ends with the agent.
struct FeedTask(tokio::task::JoinHandle<()>);

impl Drop for FeedTask {
    fn drop(&mut self) {
        self.0.abort();
    }
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
    /// Whether the agent writes into the files what changed elsewhere (not `--push-only`).
    two_way: bool,
    /// The change feed's reader until it is started; `None` with `--push-only`.
    feed: Option<Feed>,
    /// What the feed's task read, once started.
    changes: Option<mpsc::Receiver<Changes>>,
    _feed_task: Option<FeedTask>,
    /// Whether the agent was found unable to give a written file its owner: said once.
    owner_warned: bool,
}

impl Agent {
    fn new(config: &Config, options: Options) -> anyhow::Result<Agent> {
        let site = SiteId::parse(&options.site).map_err(|e| anyhow::anyhow!("--site: {}", e.message))?;
        let signer = Signer::new(config, site.clone(), SCOPES, TOKEN_TTL_SECS)?;
        let feed_signer = if options.push_only {
            None
        } else {
            let signer = Signer::new(config, site.clone(), FEED_SCOPES, TOKEN_TTL_SECS).context(
                "the agent reads the hub's change feed to write other sites' changes into the files \
                 (run it with --push-only to only push)",
            )?;
            Some(signer)
        };
        let hub = Hub::new(&options.hub_url, options.ca_file.as_deref(), signer, site.clone())?;
        let reader = UserId::parse(FEED_READER).expect("a user id");
        let feed = feed_signer.map(|signer| hub.feed(signer, reader));
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
        let way = if feed.is_some() { "and writing into its files what changed elsewhere" } else { "only" };
        tracing::info!(
            "agent for site {site}: watching {}, pushing to {} {way}, state in {}",
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
            two_way: feed.is_some(),
            feed,
            changes: None,
            _feed_task: None,
            owner_warned: false,
        })
    }

    /// The agent's life: compare every file with the state (and the hub), then follow the
    /// file events.
    async fn watch(&mut self) -> anyhow::Result<()> {
        self.finish_writing()?;
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
        self.start_feed();
        let mut started = false;
        loop {
            while let Ok(signal) = self.events.try_recv() {
                self.note(signal, &mut pending)?;
            }
            if let Some(user) = pending.pop_first() {
                if let Flow::NewHub = self.settle(&user, None).await? {
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
            tokio::select! {
                signal = self.events.recv() => {
                    self.note(signal.context("the file watcher stopped")?, &mut pending)?;
                }
                changes = next_changes(&mut self.changes) => {
                    let changes = changes.context("the change feed's reader stopped")?;
                    if let Flow::NewHub = self.take_changes(changes).await? {
                        pending = self.scan()?;
                    }
                }
            }
        }
    }

    /// Starts reading the change feed from the state's cursor (in two-way mode).
    fn start_feed(&mut self) {
        let Some(feed) = self.feed.take() else { return };
        let (tx, rx) = mpsc::channel(1);
        let cursor = self.state.cursor.clone();
        self.changes = Some(rx);
        self._feed_task = Some(FeedTask(tokio::spawn(follow(feed, cursor, tx))));
    }

    /// Writes into the files the changes the feed brought, then moves the cursor past them.
    async fn take_changes(&mut self, changes: Changes) -> anyhow::Result<Flow> {
        if let Flow::NewHub = self.note_epoch(changes.epoch)? {
            return Ok(Flow::NewHub);
        }
        for change in &changes.changes {
            let Ok(user) = UserId::parse(&change.user_id) else { continue };
            let known = self.state.users.get(user.as_str()).map(|agreed| agreed.version);
            if change.data_type != "balance" || known.is_some_and(|version| version >= change.version) {
                continue;
            }
            let newer = match change.balance() {
                Some(newer) => newer,
                // Without its record, the change is read from the hub, when the user has a
                // file it could go into.
                None if self.dir.join(format!("{user}.json")).is_file() => {
                    let answer = self.hub.send_until_answered(&user, &Request::Get).await;
                    if let Some(epoch) = answer.epoch
                        && let Flow::NewHub = self.note_epoch(epoch)?
                    {
                        return Ok(Flow::NewHub);
                    }
                    let Reply::Balance(hub) = answer.reply else { continue };
                    hub
                }
                None => continue,
            };
            if let Flow::NewHub = self.settle(&user, Some(newer)).await? {
                return Ok(Flow::NewHub);
            }
        }
        if self.state.cursor.as_ref() != Some(&changes.cursor) {
            self.state.cursor = Some(changes.cursor);
            self.unsaved = true;
        }
        Ok(Flow::Done)
    }

    /// The users of every balance file in the folder.
    fn scan(&mut self) -> anyhow::Result<BTreeSet<UserId>> {
        let mut users = BTreeSet::new();
        let entries =
            std::fs::read_dir(&self.dir).with_context(|| format!("cannot read {}", self.dir.display()))?;
        for entry in entries {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            let path = entry.path();
            if is_temp_name(&entry.file_name().to_string_lossy()) {
                // A write the agent gave up, or one cut short before its rename.
                tracing::debug!("removing {}, left by an earlier write", path.display());
                std::fs::remove_file(&path)
                    .with_context(|| format!("cannot remove the agent's own {}", path.display()))?;
                continue;
            }
            users.extend(self.user_of(&path));
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
        if self.is_own(&name) || is_temp_name(&name) {
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

    /// Whether `name` is the agent's own file (its state file, or that file's temporary one).
    fn is_own(&self, name: &str) -> bool {
        self.own_names.iter().any(|own| own == name || name.strip_suffix(".tmp") == Some(own))
    }

    /// The user's file, as bytes and the coins they show; `None` (with a log line) when there
    /// is none, or it cannot be read as a balance.
    fn read_balance(&mut self, user: &UserId) -> Option<(Vec<u8>, i64)> {
        let name = format!("{user}.json");
        if self.is_own(&name) {
            return None;
        }
        let bytes = match std::fs::read(self.dir.join(&name)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!("{name} is gone, or was never there; nothing to do");
                self.skipped.remove(&name);
                return None;
            }
            Err(e) => {
                self.skip(&name, &format!("it cannot be read: {e}"));
                return None;
            }
        };
        match balance_file::parse(&name, &bytes) {
            Ok(balance) => {
                self.skipped.remove(&name);
                Some((bytes, balance.coins))
            }
            Err(reason) => {
                self.skip(&name, &format!("{reason}; it is read again when it changes"));
                None
            }
        }
    }

    /// Brings the user's file and the hub in step: reconciles the file's change, if any, with
    /// the hub; then, in two-way mode, writes into the file the hub's balance it does not show
    /// (`newer`, from the change feed, or what the reconciliation left).
    async fn settle(&mut self, user: &UserId, newer: Option<HubBalance>) -> anyhow::Result<Flow> {
        loop {
            let from = self.state.users.get(user.as_str()).copied();
            let Some((bytes, file)) = self.read_balance(user) else {
                // The file cannot be read now (a site's write half done, or the file deleted
                // to be written again): the hub's newer balance is remembered as not yet
                // written, so that the file's next event writes it, or merges a change made
                // meanwhile, rather than taking the file's old coins as agreed.
                if let (Some(from), Some(newer)) = (from, newer)
                    && newer.version > from.version
                {
                    let to = Agreed { file: newer.coins, version: newer.version, hub: newer.coins };
                    self.state.users.insert(user.to_string(), reconcile::unwritten(from, to));
                    self.unsaved = true;
                }
                return Ok(Flow::Done);
            };
            if !self.two_way {
                return self.reconcile(user, from, file).await;
            }
            match reconcile::file_step(from, file, newer) {
                FileStep::Reconcile => {
                    if let Flow::NewHub = self.reconcile(user, from, file).await? {
                        return Ok(Flow::NewHub);
                    }
                    // The hub would not give the balance: nothing is known to write.
                    if self.state.users.get(user.as_str()).is_none_or(|agreed| agreed.file != file) {
                        return Ok(Flow::Done);
                    }
                }
                FileStep::Write { coins, agreed } => {
                    let from = from.expect("a file is written only where it agreed with the hub");
                    match self.write_file(user, &bytes, from, agreed).await? {
                        Written::FileChanged => {
                            tracing::debug!(
                                "{user}: the file changed while the hub's {coins} coins were written"
                            );
                        }
                        Written::Done => return Ok(Flow::Done),
                        Written::Failed => {
                            self.state.users.insert(user.to_string(), reconcile::unwritten(from, agreed));
                            self.unsaved = true;
                            return Ok(Flow::Done);
                        }
                    }
                }
                FileStep::Agree(agreed) => {
                    self.state.users.insert(user.to_string(), agreed);
                    self.unsaved = true;
                    return Ok(Flow::Done);
                }
                FileStep::InStep => return Ok(Flow::Done),
            }
        }
    }

    /// Replaces the user's file, which held `bytes`, with one showing `to`'s coins, unless it
    /// changed meanwhile; then `to` is agreed.
    async fn write_file(
        &mut self,
        user: &UserId,
        bytes: &[u8],
        from: Agreed,
        to: Agreed,
    ) -> anyhow::Result<Written> {
        let name = format!("{user}.json");
        let (path, temp) = (self.dir.join(&name), self.dir.join(temp_name(user)));
        let cannot = |why: &dyn std::fmt::Display| {
            tracing::error!(
                "{user}: cannot write the hub's {} coins into {name}: {why}; it is left as it is until the \
                 user's next turn",
                to.file
            );
        };
        let content = match balance_file::rewrite(bytes, to.file, time::OffsetDateTime::now_utc()) {
            Ok(content) => content,
            Err(reason) => {
                cannot(&reason);
                return Ok(Written::Failed);
            }
        };
        if let Err(e) = self.make_temp(&path, &temp, &content) {
            cannot(&e);
            let _ = std::fs::remove_file(&temp);
            return Ok(Written::Failed);
        }
        // From here a stop leaves the temporary file if and only if the file was not
        // replaced, which the next start reads as the outcome.
        self.state.writing = Some(Writing { user: user.to_string(), from, to });
        self.save()?;
        // As late as can be, and under the file's lock: a write of the site's own since the
        // file was read must not be replaced, but reconciled (and the hub's balance then
        // written over it, its change included).
        let replaced = match lock_unchanged(&path, bytes).await {
            Ok(Some(lock)) => {
                let renamed = std::fs::rename(&temp, &path);
                drop(lock);
                renamed.map_err(|e| Some(format!("cannot rename {} over it: {e}", temp.display())))
            }
            Ok(None) => Err(None),
            Err(e) => Err(Some(e.to_string())),
        };
        if let Err(why) = replaced {
            // Forgotten before the temporary file goes, for the same reason.
            self.state.writing = None;
            self.save()?;
            std::fs::remove_file(&temp)
                .with_context(|| format!("cannot remove the agent's own {}", temp.display()))?;
            return Ok(match why {
                None => Written::FileChanged,
                Some(why) => {
                    cannot(&why);
                    Written::Failed
                }
            });
        }
        if let Err(e) = std::fs::File::open(&self.dir).and_then(|dir| dir.sync_all()) {
            tracing::warn!("{user}: {name} was replaced, but the folder could not be flushed to disk: {e}");
        }
        self.state.writing = None;
        self.state.users.insert(user.to_string(), to);
        self.unsaved = true;
        tracing::info!("{user}: wrote the hub's {} coins (v{}) into {name}", to.file, to.version);
        Ok(Written::Done)
    }

    /// Writes `content` to `temp`, beside `path`, with `path`'s permissions and, where the
    /// agent may give it, owner, and flushes it to disk.
    fn make_temp(&mut self, path: &Path, temp: &Path, content: &[u8]) -> std::io::Result<()> {
        let meta = std::fs::symlink_metadata(path)?;
        if !meta.is_file() {
            // Renaming over a symbolic link would replace the link, not the file it names.
            return Err(std::io::Error::other(
                "it is not a regular file (a symbolic link?), which the agent does not replace",
            ));
        }
        match std::fs::remove_file(temp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(temp)?;
        file.write_all(content)?;
        file.set_permissions(meta.permissions())?;
        let made = file.metadata()?;
        if (made.uid(), made.gid()) != (meta.uid(), meta.gid()) {
            let owned = std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()))
                .or_else(|_| std::os::unix::fs::fchown(&file, None, Some(meta.gid())));
            let now = file.metadata()?;
            if (now.uid(), now.gid()) != (meta.uid(), meta.gid()) && !self.owner_warned {
                self.owner_warned = true;
                tracing::warn!(
                    "the agent may not give the balance files it writes their owner ({} belongs to uid {}, gid \
                     {}; its new version to uid {}, gid {}{}): run the agent as the files' owner, or give it \
                     CAP_CHOWN; said once",
                    path.display(),
                    meta.uid(),
                    meta.gid(),
                    now.uid(),
                    now.gid(),
                    owned.err().map_or_else(String::new, |e| format!(": {e}"))
                );
            }
        }
        file.sync_all()
    }

    /// At start: settles the write of a balance file under way when the agent stopped.
    fn finish_writing(&mut self) -> anyhow::Result<()> {
        let Some(writing) = self.state.writing.take() else { return Ok(()) };
        let user = UserId::parse(&writing.user).map_err(|e| self.damaged(&e.message))?;
        let temp_left = self.dir.join(temp_name(&user)).exists();
        let agreed = reconcile::interrupted_write(writing.from, writing.to, temp_left);
        self.state.users.insert(writing.user, agreed);
        self.save()
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

/// The balance file at `path`, locked (`flock`, waiting up to [`LOCK_PATIENCE`]) if it still
/// holds `bytes` and is still the file at `path` (not one renamed over it while the lock was
/// awaited); `None` if it changed.
async fn lock_unchanged(path: &Path, bytes: &[u8]) -> std::io::Result<Option<std::fs::File>> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let deadline = Instant::now() + LOCK_PATIENCE;
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    format!("another process kept it locked for {LOCK_PATIENCE:?}"),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
    let (held, now) = (file.metadata()?, std::fs::metadata(path)?);
    let mut content = Vec::with_capacity(bytes.len());
    file.read_to_end(&mut content)?;
    let unchanged = (held.dev(), held.ino()) == (now.dev(), now.ino()) && content == bytes;
    Ok(unchanged.then_some(file))
}

/// The name of the agent's temporary file for `user`'s balance file.
fn temp_name(user: &UserId) -> String {
    format!(".{user}.json{TEMP_SUFFIX}")
}

fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(TEMP_SUFFIX)
}

/// The feed's task: reads the change feed from `cursor` for as long as the agent runs, and
/// hands each read that brought something over (one at a time: it waits while the agent
/// writes the last one into the files).
async fn follow(feed: Feed, mut cursor: Option<String>, changes: mpsc::Sender<Changes>) {
    // Reads the agent may make now, refilled by one every FEED_PACE up to FEED_BURST.
    let (mut allowance, mut counted) = (FEED_BURST, tokio::time::Instant::now());
    loop {
        let now = tokio::time::Instant::now();
        allowance = (allowance + (now - counted).as_secs_f64() / FEED_PACE.as_secs_f64()).min(FEED_BURST);
        counted = now;
        if allowance < 1.0 {
            tokio::time::sleep(FEED_PACE.mul_f64(1.0 - allowance)).await;
            (allowance, counted) = (1.0, tokio::time::Instant::now());
        }
        allowance -= 1.0;
        match feed.read(cursor.as_deref()).await {
            FeedAnswer::Changes(read) => {
                if read.changes.is_empty() && cursor.as_ref() == Some(&read.cursor) {
                    continue;
                }
                cursor = Some(read.cursor.clone());
                if changes.send(read).await.is_err() {
                    return;
                }
            }
            FeedAnswer::Reset { code, message } => {
                tracing::warn!(
                    "the change feed no longer knows the agent's cursor ({code}: {message}); reading it again \
                     from its start"
                );
                cursor = None;
            }
        }
    }
}

/// What the change feed's task read next; never, with `--push-only`.
async fn next_changes(changes: &mut Option<mpsc::Receiver<Changes>>) -> Option<Changes> {
    match changes {
        Some(changes) => changes.recv().await,
        None => std::future::pending().await,
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
