//! `hub backup` and `hub restore`: a consistent copy of the live database, and that copy put
//! back in place as a new database.
//!
//! A backup reads the database through a connection of its own, beside the hub's, with
//! SQLite's online backup in one step: one read transaction, so the copy is the database as
//! it stood at one moment, every write acknowledged before that moment included, while the
//! hub goes on serving (in WAL mode a reader never blocks the writer). The copy is a single
//! file (rollback journal, no `-wal` beside it), written beside its target and renamed into
//! place once complete.
//!
//! A restore runs only while no hub holds the data dir (the store's lock, which a hub holds
//! as long as it runs). It checks that the file is a hub database this hub can read — whole
//! (SQLite's `integrity_check`), with exactly the schema this hub's migrations make, nothing
//! more — keeps the database it replaces under another name, never deletes it, and gives the
//! restored one a new epoch: every page then drops its cache at its next check and fetches the
//! restored records, even where it holds versions the restored database has not reached. The
//! restored database replaces the current one in one rename. It does not touch the backup
//! file, and it does nothing to a running hub.
//!
//! The restored database remembers the op ids it remembered when the backup was made, and its
//! op horizon with them: an op applied before the backup replays, and one applied only after
//! it is unknown to it and dated after its horizon, so it is applied again, to the restored
//! records. That is what a restore means: the data went back to that moment.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use rusqlite::backup::{Backup, StepResult};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use rusqlite_migration::SchemaVersion;

use super::{
    DB_FILE, LOCK_FILE, StoreError, lock_data_dir, migrations, new_epoch, open_in_data_dir, trusted_data_dir,
};

/// What a kept database's name adds to `hub.sqlite3`, before the time of the restore.
const KEPT_INFIX: &str = ".before-restore-";

/// How long a backup waits for a lock on the live database (the hub's writer holds none a
/// reader waits for, but a checkpoint or a recovery may).
const BUSY: Duration = Duration::from_secs(5);

/// What a database file holds, as `hub backup` and `hub restore` report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub path: PathBuf,
    pub bytes: u64,
    pub epoch: String,
    /// The migrations applied to it (SQLite's `user_version`).
    pub schema_version: i64,
    pub records: i64,
    pub users: i64,
    /// Rows of the audit ledger: every change to an amount.
    pub ledger_rows: i64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} bytes, epoch {}, schema version {}, {} records of {} users, {} ledger rows",
            self.path.display(),
            self.bytes,
            self.epoch,
            self.schema_version,
            self.records,
            self.users,
            self.ledger_rows
        )
    }
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub from: PathBuf,
    /// The epoch the backup had.
    pub backup_epoch: String,
    /// The database now in the data dir, with its new epoch.
    pub installed: Summary,
    /// Where the database it replaced is now, if there was one.
    pub kept: Option<PathBuf>,
}

impl std::fmt::Display for Restored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "restored {} (epoch {}) to {}",
            source_name(&self.from),
            self.backup_epoch,
            self.installed
        )?;
        writeln!(
            f,
            "with its new epoch, every page drops its cache at its next check and fetches the restored records"
        )?;
        match &self.kept {
            Some(kept) => write!(f, "the database it replaced is kept as {}", kept.display()),
            None => write!(f, "there was no database to replace"),
        }
    }
}

/// Copies the database of `data_dir` to `to`, which must not exist unless `replace`.
pub fn backup(data_dir: &Path, to: &Path, replace: bool) -> anyhow::Result<Summary> {
    let live = data_dir.join(DB_FILE);
    if !live.is_file() {
        bail!("there is no database at {}", live.display());
    }
    if !replace && to.exists() {
        bail!("{} exists; give --force to replace it", to.display());
    }
    let name = to.file_name().with_context(|| format!("{} names no file", to.display()))?;
    let dir = match to.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    // Only the backup's user may read it: it holds every user's records.
    let partial = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".partial")
        .tempfile_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;

    // Opened for writing so that SQLite, closing the last connection of a database no hub
    // serves, removes the `-wal` and `-shm` files it made (a read-only connection leaves
    // them, owned by whoever ran the backup); `query_only` keeps it from writing anything.
    // Not through a symbolic link in the data dir: a backup run by root reads only the hub's
    // database.
    let data_dir =
        std::fs::canonicalize(data_dir).with_context(|| format!("cannot open {}", live.display()))?;
    let source = Connection::open_with_flags(
        data_dir.join(DB_FILE),
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_NOFOLLOW,
    )
    .with_context(|| format!("cannot open {}", live.display()))?;
    source.busy_timeout(BUSY)?;
    source.pragma_update(None, "query_only", true)?;
    let mut copy = Connection::open(partial.path())?;
    {
        // One step copies every page inside one read transaction: a consistent copy however
        // much the hub writes meanwhile (in smaller steps, each write of the hub's would make
        // the copy start over).
        let step = Backup::new(&source, &mut copy)?.step(-1)?;
        if step != StepResult::Done {
            bail!("{} stayed locked for {BUSY:?} ({step:?}); try again", live.display());
        }
    }
    drop(source);
    // The copy's header says WAL, like the live database's: one file without a `-wal` beside
    // it is what a backup should be.
    copy.pragma_update(None, "journal_mode", "DELETE")?;
    quick_check(&copy).with_context(|| format!("the copy of {} is damaged", live.display()))?;
    let mut summary = summarize(&copy, to)?;
    copy.close().map_err(|(_, e)| e)?;
    partial.as_file().sync_all()?;
    let written = if replace { partial.persist(to) } else { partial.persist_noclobber(to) };
    written.map_err(|e| match e.error.kind() {
        std::io::ErrorKind::AlreadyExists => {
            anyhow::anyhow!("{} exists; give --force to replace it", to.display())
        }
        _ => anyhow::Error::new(e.error).context(format!("cannot write {}", to.display())),
    })?;
    sync_dir(dir)?;
    summary.bytes = std::fs::metadata(to)?.len();
    Ok(summary)
}

/// Replaces the database of `data_dir` by the backup `from` (`-`: standard input), with a new
/// epoch; no hub may be running on `data_dir`.
///
/// Run by root, it opens nothing in the data dir through a symbolic link, and gives what it
/// makes there to the dir's owner through the open file, never by name: the dir belongs to the
/// hub's user, who must not be able to lead it to another file.
pub fn restore(data_dir: &Path, from: &Path) -> anyhow::Result<Restored> {
    let stdin = from == Path::new("-");
    if !stdin {
        check_backup_file(from)?;
    }
    let data_dir = &trusted_data_dir(data_dir)?;
    let lock = lock_data_dir(data_dir)?;
    give_to_owner_of(&lock, &data_dir.join(LOCK_FILE), data_dir)?;

    // Checked and changed as a copy in the data dir: the backup file is only read.
    let mut staged = tempfile::Builder::new()
        .prefix(&format!(".{DB_FILE}."))
        .suffix(".restoring")
        .make_in(data_dir, |path| {
            let mut options = OpenOptions::new();
            options.read(true).write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            open_in_data_dir(path, &mut options)
        })
        .with_context(|| format!("cannot write in {}", data_dir.display()))?;
    let copied = if stdin {
        std::io::copy(&mut std::io::stdin().lock(), staged.as_file_mut())
    } else {
        let mut source = File::open(from).with_context(|| format!("cannot read {}", from.display()))?;
        std::io::copy(&mut source, staged.as_file_mut())
    };
    copied.with_context(|| format!("cannot copy {} into {}", source_name(from), data_dir.display()))?;
    staged.as_file_mut().flush()?;

    let mut conn = Connection::open_with_flags(
        staged.path(),
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_NOFOLLOW,
    )?;
    let backup_epoch =
        hub_database_epoch(&conn).with_context(|| format!("{} cannot be restored", source_name(from)))?;
    migrations()
        .to_latest(&mut conn)
        .with_context(|| format!("cannot bring {} to this hub's schema", source_name(from)))?;
    conn.execute("UPDATE meta SET value = ?1 WHERE key = 'epoch'", params![new_epoch()])?;
    conn.pragma_update(None, "journal_mode", "DELETE")?;
    let target = data_dir.join(DB_FILE);
    let mut installed = summarize(&conn, &target)?;
    conn.close().map_err(|(_, e)| e)?;
    staged.as_file().sync_all()?;
    give_to_owner_of(staged.as_file(), staged.path(), data_dir)?;
    installed.bytes = staged.as_file().metadata()?.len();

    // The current database stays in place until the restored one replaces it in one rename:
    // however the restore ends, `hub.sqlite3` is one database or the other.
    let kept = keep_aside(data_dir)?;
    sync_dir(data_dir)?;
    staged
        .persist(&target)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot write {}", target.display()))?;
    sync_dir(data_dir)?;
    drop(lock);
    Ok(Restored { from: from.to_owned(), backup_epoch, installed, kept })
}

/// How a restore names its backup: its path, or what `-` means.
fn source_name(from: &Path) -> std::borrow::Cow<'_, str> {
    if from == Path::new("-") { "the backup on standard input".into() } else { from.to_string_lossy() }
}

/// Refuses `from` unless it is a file with no write-ahead log beside it.
fn check_backup_file(from: &Path) -> anyhow::Result<()> {
    if !from.is_file() {
        bail!("{} is not a file", from.display());
    }
    let wal = with_suffix(from, "-wal");
    if wal.metadata().is_ok_and(|m| m.len() > 0) {
        bail!(
            "{} has a write-ahead log beside it ({}): it is a database in use, or a copy of one, not a backup; make one with `hub backup`",
            from.display(),
            wal.display()
        );
    }
    Ok(())
}

/// The epoch of a hub database this hub can take; an error saying why `conn`'s is none.
///
/// The file may have been made by anyone: its schema must be exactly the one this hub's
/// migrations make, or a trigger, a view or a missing constraint of its maker's would come
/// into the live database with it; and it is read with SQLite's defences up, so that nothing
/// in it runs meanwhile.
fn hub_database_epoch(conn: &Connection) -> anyhow::Result<String> {
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
    conn.pragma_update(None, "trusted_schema", false)?;
    integrity_check(conn).context("it is not an SQLite database, or a damaged one")?;
    let version = match migrations().current_version(conn)? {
        SchemaVersion::NoneSet => bail!("it is not a hub database: it has no schema version"),
        SchemaVersion::Outside(version) => bail!(
            "it was made by a newer hub (schema version {version}, beyond this hub's): restore it with that hub or a newer one"
        ),
        SchemaVersion::Inside(version) => version.get(),
    };
    same_schema_as_hub(conn, version)?;
    let epoch = conn
        .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| r.get(0))
        .optional()
        .ok()
        .flatten();
    epoch.context("it is not a hub database: it has no epoch")
}

/// SQLite's `integrity_check`: every page well formed, and every index holding exactly its
/// table's rows (`quick_check` does not compare them).
fn integrity_check(conn: &Connection) -> anyhow::Result<()> {
    let problems: Vec<String> =
        conn.prepare("PRAGMA integrity_check(10)")?.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    if problems != ["ok"] {
        bail!("SQLite's integrity_check: {}", problems.join("; "));
    }
    Ok(())
}

/// A database's schema as SQLite keeps it: every table, index, view and trigger, by kind and
/// name, with the table it belongs to and the SQL that made it.
type Schema = BTreeMap<(String, String), (String, Option<String>)>;

fn schema(conn: &Connection) -> rusqlite::Result<Schema> {
    conn.prepare("SELECT type, name, tbl_name, sql FROM sqlite_schema")?
        .query_map([], |r| Ok(((r.get(0)?, r.get(1)?), (r.get(2)?, r.get(3)?))))?
        .collect()
}

/// " on TABLE" for an index or a trigger; nothing for a table or a view, its own table.
fn on(name: &str, table: &str) -> String {
    if name == table { String::new() } else { format!(" on {table}") }
}

/// Refuses `conn`'s database unless its schema is the one this hub's migrations make at
/// `version`, naming what it has more, lacks or defines otherwise.
fn same_schema_as_hub(conn: &Connection, version: usize) -> anyhow::Result<()> {
    let mut reference = Connection::open_in_memory()?;
    migrations().to_version(&mut reference, version)?;
    let (found, expected) = (schema(conn)?, schema(&reference)?);
    let mut differences = Vec::new();
    for ((kind, name), (table, sql)) in &found {
        match expected.get(&(kind.clone(), name.clone())) {
            None => differences.push(format!("an extra {kind} {name:?}{}", on(name, table))),
            Some(hub) if *hub != (table.clone(), sql.clone()) => {
                differences.push(format!("the {kind} {name:?} defined otherwise"));
            }
            Some(_) => {}
        }
    }
    for ((kind, name), (table, _)) in &expected {
        if !found.contains_key(&(kind.clone(), name.clone())) {
            differences.push(format!("no {kind} {name:?}{}", on(name, table)));
        }
    }
    if !differences.is_empty() {
        bail!("its schema is not the hub's (schema version {version}): {}", differences.join("; "));
    }
    Ok(())
}

/// SQLite's `quick_check`: every page and index readable and well formed.
fn quick_check(conn: &Connection) -> anyhow::Result<()> {
    let result: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if result != "ok" {
        bail!("SQLite's quick_check: {result}");
    }
    Ok(())
}

/// What `conn`'s database holds; its size is the caller's to fill in once it is written.
fn summarize(conn: &Connection, path: &Path) -> anyhow::Result<Summary> {
    let epoch = conn.query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| r.get(0))?;
    let schema_version = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let (records, users) =
        conn.query_row("SELECT count(*), count(DISTINCT user_id) FROM records", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let ledger_rows = conn.query_row("SELECT count(*) FROM ledger", [], |r| r.get(0))?;
    Ok(Summary { path: path.to_owned(), bytes: 0, epoch, schema_version, records, users, ledger_rows })
}

/// Keeps the database of `data_dir`, with its `-wal` and `-shm` if a hub that stopped without
/// closing it left them, as `hub.sqlite3.before-restore-<UTC time>`, and returns that name, or
/// `None` when there was nothing to keep. The database gets its second name by a hard link
/// and keeps its own until the restored one replaces it; its log goes after it, so that an
/// interruption leaves a database that still shares its file with the name it was to be kept
/// under ([`interrupted_restore`]), which a hub refuses to serve and the next restore takes
/// up. Renames and links never follow a symbolic link.
fn keep_aside(data_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let db = data_dir.join(DB_FILE);
    let sidecars = ["", "-wal", "-shm"];
    let present = |path: &Path, suffix: &str| with_suffix(path, suffix).symlink_metadata().is_ok();
    let kept = match interrupted_restore(data_dir)? {
        Some(kept) => kept,
        None if !sidecars.iter().any(|s| present(&db, s)) => return Ok(None),
        None => {
            let now = time::OffsetDateTime::now_utc()
                .format(time::macros::format_description!("[year][month][day]T[hour][minute][second]Z"))?;
            let base = with_suffix(&db, &format!("{KEPT_INFIX}{now}"));
            let mut kept = base.clone();
            for n in 2.. {
                if !sidecars.iter().any(|s| present(&kept, s)) {
                    break;
                }
                kept = with_suffix(&base, &format!("-{n}"));
            }
            if present(&db, "") {
                std::fs::hard_link(&db, &kept)
                    .with_context(|| format!("cannot link {} to {}", db.display(), kept.display()))?;
            }
            kept
        }
    };
    for suffix in ["-wal", "-shm"] {
        let (from, to) = (with_suffix(&db, suffix), with_suffix(&kept, suffix));
        if present(&db, suffix) {
            std::fs::rename(&from, &to)
                .with_context(|| format!("cannot rename {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(Some(kept))
}

/// The name a restore was keeping the database of `data_dir` under when it was interrupted:
/// a `hub.sqlite3.before-restore-…` that is the very file `hub.sqlite3` is. The database may
/// then lack its log, already moved aside beside that name.
pub(super) fn interrupted_restore(data_dir: &Path) -> Result<Option<PathBuf>, StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let unreadable =
            |e: std::io::Error| StoreError::Open(format!("cannot read {}: {e}", data_dir.display()));
        let Ok(db) = data_dir.join(DB_FILE).symlink_metadata() else {
            return Ok(None);
        };
        if !db.is_file() || db.nlink() < 2 {
            return Ok(None);
        }
        let prefix = format!("{DB_FILE}{KEPT_INFIX}");
        for entry in std::fs::read_dir(data_dir).map_err(unreadable)? {
            let entry = entry.map_err(unreadable)?;
            let kept = entry.metadata().map_err(unreadable)?;
            if entry.file_name().to_string_lossy().starts_with(&prefix)
                && (kept.dev(), kept.ino()) == (db.dev(), db.ino())
            {
                return Ok(Some(entry.path()));
            }
        }
    }
    #[cfg(not(unix))]
    let _ = data_dir;
    Ok(None)
}

/// `path` with `suffix` appended to its name: `hub.sqlite3` → `hub.sqlite3-wal`.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Gives `file`, which this process opened in `dir` as `name`, to the owner of `dir` when
/// someone else (root) made it, so that the hub, which runs as that owner, can open it. Through
/// the open file: the name may lead elsewhere by now. A file with another name too, which may
/// be anyone's file linked into the data dir, is refused.
fn give_to_owner_of(file: &File, name: &Path, dir: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let (meta, owner) = (file.metadata()?, std::fs::metadata(dir)?);
        if meta.uid() != owner.uid() {
            if meta.nlink() != 1 {
                bail!(
                    "{} has {} names (hard links): it may be a file from outside the data dir, which the restore does not give to the data dir's owner; remove it",
                    name.display(),
                    meta.nlink()
                );
            }
            std::os::unix::fs::fchown(file, Some(owner.uid()), Some(owner.gid())).with_context(|| {
                format!(
                    "cannot give {} to the owner of {} (uid {}): run the restore as that user or as root",
                    name.display(),
                    dir.display(),
                    owner.uid()
                )
            })?;
        }
    }
    #[cfg(not(unix))]
    let _ = (file, name, dir);
    Ok(())
}

/// Makes the names created or renamed in `dir` durable.
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all().with_context(|| format!("cannot sync {}", dir.display()))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
