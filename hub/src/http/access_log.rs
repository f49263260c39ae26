//! The access log (`[access_log]`): one line per answered request — when, who (the client's
//! address, the forwarded one behind a trusted proxy), the method and action, the status and
//! the hub's code for a refusal, how long it took, the site and user the request spoke for,
//! the site a refused token only claimed, and its request id — to stderr or to a file that
//! SIGHUP reopens for logrotate.
//!
//! A request's thread only formats its line and queues it: a thread of its own writes the
//! lines (tracing-appender's non-blocking writer, as for the hub's own log), those waiting
//! together in one write, so that a reopen falls between two lines. Unlike that log, a line
//! that finds 128,000 others waiting is dropped rather than waited for, so that a slow disk
//! never holds up an answer; drops are counted (`hub_access_log_dropped_lines_total`) and
//! logged. Decides nothing about a request.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, LineWriter, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::http::Method;
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

use crate::config::AccessLogConfig;
use crate::time::rfc3339_ms;

/// Lines that may wait for the writer; a line beyond them is dropped.
const LINES_WAITING: usize = 128_000;

/// Bytes of lines the writer gathers at most before it writes them to the file.
const BATCH_BYTES: usize = 64 * 1024;

/// What one line says of one request.
#[derive(Debug)]
pub(super) struct Line<'a> {
    pub time_ms: i64,
    pub client: IpAddr,
    pub method: &'a Method,
    pub action: &'static str,
    pub status: u16,
    /// The hub's code for a refusal or failure (`invalid_token`, `rate_limited`, …).
    pub code: Option<&'static str>,
    pub duration: Duration,
    /// The site the request spoke for: its verified token's (an expired token's too), or with
    /// auth off the one it named.
    pub site: Option<&'a str>,
    /// The configured site a refused token names without proving it: anyone can claim one.
    pub claimed_site: Option<&'a str>,
    pub user: Option<&'a str>,
    pub request_id: Option<&'a str>,
}

impl Line<'_> {
    /// `2026-12-06T09:15:02.114Z client=203.0.113.7 method=POST action=delta status=200
    /// code=- duration_ms=1.204 site=roflfaucet claimed_site=- user=8-evans id=3fa1b2c4-17`,
    /// one line. Every value is one word: ids are validated, and a request id a client sent is
    /// cut to the characters ids are made of.
    fn render(&self) -> String {
        let mut text = String::with_capacity(192);
        let _ = writeln!(
            text,
            "{} client={} method={} action={} status={} code={} duration_ms={:.3} site={} claimed_site={} user={} id={}",
            rfc3339_ms(self.time_ms),
            self.client,
            word(self.method.as_str()),
            self.action,
            self.status,
            self.code.unwrap_or("-"),
            self.duration.as_secs_f64() * 1000.0,
            self.site.unwrap_or("-"),
            self.claimed_site.unwrap_or("-"),
            self.user.unwrap_or("-"),
            word(self.request_id.unwrap_or("-")),
        );
        text
    }
}

/// `text` as one word of at most 64 characters of `A-Z a-z 0-9 . _ -`; others become `_`.
fn word(text: &str) -> String {
    text.chars()
        .take(64)
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .collect()
}

/// The access log, when enabled.
#[derive(Debug)]
pub(super) struct AccessLog {
    lines: NonBlocking,
    dropped: ErrorCounter,
    /// The file, when it is one: SIGHUP reopens it.
    file: Option<Arc<LogFile>>,
    /// Flushes the lines still queued when the hub stops.
    _guard: WorkerGuard,
}

impl AccessLog {
    /// Opens the access log the configuration asks for, or `None` when it is off. A file that
    /// cannot be opened stops the start, naming it.
    pub(super) fn open(config: &AccessLogConfig) -> anyhow::Result<Option<AccessLog>> {
        if !config.enabled {
            return Ok(None);
        }
        let (writer, file): (Box<dyn Write + Send>, _) = match &config.path {
            // A line at a time, so that its lines and the hub's own log never interleave
            // inside a line on stderr.
            None => (Box::new(LineWriter::new(std::io::stderr())), None),
            Some(path) => {
                let file = Arc::new(LogFile::open(path)?);
                (Box::new(Batches::new(file.clone())), Some(file))
            }
        };
        Ok(Some(AccessLog::writing_to(writer, file, LINES_WAITING)))
    }

    /// The access log written by a thread of its own to `writer`, with at most `waiting`
    /// lines queued for it.
    fn writing_to(writer: Box<dyn Write + Send>, file: Option<Arc<LogFile>>, waiting: usize) -> AccessLog {
        let (lines, guard) = NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(waiting)
            .thread_name("access-log")
            .finish(writer);
        let dropped = lines.error_counter();
        AccessLog { lines, dropped, file, _guard: guard }
    }

    /// Queues one line; never waits.
    pub(super) fn write(&self, line: &Line<'_>) {
        // A dropped line is counted by the writer itself, and an error is impossible here:
        // the line is only handed to the writer's queue.
        let _ = self.lines.clone().write_all(line.render().as_bytes());
    }

    /// Lines dropped since the hub started.
    pub(super) fn dropped(&self) -> u64 {
        self.dropped.dropped_lines() as u64
    }

    /// Opens the file anew at its path, after logrotate moved it away: the lines from now on
    /// go to the new file. `None` when the log goes to stderr; on an error the current file
    /// stays in use.
    pub(super) fn reopen(&self) -> Option<anyhow::Result<()>> {
        let file = self.file.as_ref()?;
        Some(file.reopen())
    }
}

/// The access log's file, which SIGHUP replaces with a new one at the same path.
///
/// Written by hand rather than with a crate such as `reopen`, which reopens lazily at the next
/// write: here the new file is opened when SIGHUP comes, so that a failure is reported then,
/// to the operator who sent it, and the current file kept.
struct LogFile {
    path: PathBuf,
    /// The file open now; only the writer's thread and a reopen take the lock.
    current: Mutex<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for LogFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogFile").field("path", &self.path).finish_non_exhaustive()
    }
}

impl LogFile {
    fn open(path: &Path) -> anyhow::Result<LogFile> {
        Ok(LogFile { path: path.to_path_buf(), current: Mutex::new(Box::new(append(path)?)) })
    }

    fn reopen(&self) -> anyhow::Result<()> {
        let file = append(&self.path)?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Box::new(file);
        Ok(())
    }

    /// Writes `lines` whole to the file open now: a reopen waits for the end of it.
    fn write_all(&self, lines: &[u8]) -> std::io::Result<()> {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).write_all(lines)
    }
}

/// `path` opened for appending; created, if missing, readable by its owner and its group only
/// (0640, whatever the umask: the unit's `UMask=0077` too), since it names users and their
/// addresses. A file that exists keeps its mode.
fn append(path: &Path) -> anyhow::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let open = |create: bool| OpenOptions::new().append(true).create_new(create).mode(0o640).open(path);
    let opened = match open(true) {
        // The umask took bits off the mode asked for: set it whole.
        Ok(created) => created.set_permissions(std::fs::Permissions::from_mode(0o640)).map(|()| created),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => open(false),
        Err(e) => Err(e),
    };
    opened.with_context(|| format!("cannot open the access log {}", path.display()))
}

/// What the writer's thread writes the lines to: it hands over one whole line per write and
/// flushes once no more are waiting. The lines are gathered until then (or [`BATCH_BYTES`])
/// and written with one write to the file open at that moment, so that a reopen falls between
/// two batches and never splits a line between the moved file and the new one. A batch the
/// file refuses (a full disk) is dropped whole, never finished in the next file.
struct Batches {
    file: Arc<LogFile>,
    batch: Vec<u8>,
}

impl Batches {
    fn new(file: Arc<LogFile>) -> Batches {
        Batches { file, batch: Vec::with_capacity(BATCH_BYTES) }
    }
}

impl Write for Batches {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        if !self.batch.is_empty() && self.batch.len() + line.len() > BATCH_BYTES {
            self.flush()?;
        }
        self.batch.extend_from_slice(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let written = self.file.write_all(&self.batch);
        self.batch.clear();
        written
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Condvar;

    use super::*;

    /// A writer that takes nothing until it is opened: a disk that does not keep up.
    #[derive(Clone, Default)]
    struct Stuck(Arc<(Mutex<bool>, Condvar)>);

    impl Stuck {
        fn open(&self) {
            *self.0.0.lock().unwrap() = true;
            self.0.1.notify_all();
        }
    }

    impl Write for Stuck {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let (open, opened) = &*self.0;
            drop(opened.wait_while(open.lock().unwrap(), |open| !*open).unwrap());
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn line(method: &Method) -> Line<'_> {
        Line {
            time_ms: 0,
            client: "127.0.0.1".parse().unwrap(),
            method,
            action: "get",
            status: 200,
            code: None,
            duration: Duration::ZERO,
            site: Some("wrc"),
            claimed_site: None,
            user: Some("8-evans"),
            request_id: None,
        }
    }

    #[test]
    fn a_writer_that_falls_behind_drops_and_counts_lines_rather_than_holding_up_requests() {
        let stuck = Stuck::default();
        let log = AccessLog::writing_to(Box::new(stuck.clone()), None, 4);
        let method = Method::GET;
        // Returns although the writer takes nothing: at most the 4 waiting and the one in
        // the writer's hands are kept.
        for _ in 0..20 {
            log.write(&line(&method));
        }
        assert!((15..=16).contains(&log.dropped()), "{} dropped", log.dropped());
        stuck.open();
    }

    /// A file that takes `room` bytes, then refuses the rest: a disk that fills up.
    struct Filling {
        taken: Arc<Mutex<Vec<u8>>>,
        room: usize,
    }

    impl Write for Filling {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let mut taken = self.taken.lock().unwrap();
            let n = bytes.len().min(self.room - taken.len());
            if n == 0 {
                return Err(std::io::Error::other("no space left on device"));
            }
            taken.extend_from_slice(&bytes[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_file_a_reopen_brings_starts_with_a_whole_line() {
        let full = Arc::new(Mutex::new(Vec::new()));
        let file = Arc::new(LogFile {
            path: PathBuf::from("access.log"),
            current: Mutex::new(Box::new(Filling { taken: full.clone(), room: 10 })),
        });
        // Driven as the writer's thread drives it: a whole line per write, then a flush.
        let mut writer = Batches::new(file.clone());
        writer.write_all(b"the first line, cut by a full disk\n").unwrap();
        assert!(writer.flush().is_err());
        assert_eq!(full.lock().unwrap().as_slice(), b"the first ");

        // What SIGHUP does after logrotate moved the file away.
        let next = Arc::new(Mutex::new(Vec::new()));
        *file.current.lock().unwrap() = Box::new(Filling { taken: next.clone(), room: usize::MAX });
        writer.write_all(b"the second line\n").unwrap();
        writer.write_all(b"the third line\n").unwrap();
        writer.flush().unwrap();
        assert_eq!(String::from_utf8_lossy(&next.lock().unwrap()), "the second line\nthe third line\n");
    }

    #[test]
    fn a_line_is_one_line_of_single_words_whatever_the_client_sent() {
        let method = Method::from_bytes(b"WEIRD").unwrap();
        let line = Line {
            time_ms: 1_796_544_165_854,
            client: "203.0.113.7".parse().unwrap(),
            method: &method,
            action: "other",
            status: 404,
            code: Some("not_found"),
            duration: Duration::from_micros(1204),
            site: None,
            claimed_site: None,
            user: None,
            request_id: Some("forged id=1 user=admin\nnext"),
        };
        assert_eq!(
            line.render(),
            "2026-12-06T08:02:45.854Z client=203.0.113.7 method=WEIRD action=other status=404 \
             code=not_found duration_ms=1.204 site=- claimed_site=- user=- id=forged_id_1_user_admin_next\n"
        );
    }
}
