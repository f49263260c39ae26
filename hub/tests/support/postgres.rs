//! A throwaway PostgreSQL cluster for the tests of the PostgreSQL store: Debian's
//! `postgresql` programs, a data dir in a temporary directory, a free port on 127.0.0.1.
//! Tests that only need a database share one cluster per test binary ([`Cluster::shared`]),
//! each in a database of its own ([`Cluster::database`]); a crash test starts a cluster of
//! its own ([`Cluster::start`]) to crash and restart. Touches neither the package's own
//! service nor any cluster it did not start.
//!
//! No cluster outlives its test binary. Each has a watcher: a `sh` in a process group of its
//! own (a Ctrl-C at the terminal does not reach it) that reads a pipe only the test process
//! holds open. When the pipe closes — the cluster is dropped, or the test process ends in
//! any way, `kill -9` included — the watcher stops the cluster in immediate mode and removes
//! its directory. That is also how the shared cluster, a static that nothing drops, is
//! stopped: the workspace forbids unsafe code, so no `atexit` hook can do it, and the stop
//! happens a moment after the test binary has exited. Should the watcher itself be killed,
//! the cluster is left running with its directory in place.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Where Debian's `postgresql` package puts each major version's server programs.
const DEBIAN_PROGRAMS: &str = "/usr/lib/postgresql";

/// A running PostgreSQL cluster that only this test binary uses. Stopped and removed when
/// dropped, or when the test binary exits (see the module's doc).
pub struct Cluster {
    /// The server programs: `/usr/lib/postgresql/<major>/bin`.
    bin: PathBuf,
    /// The data dir (`data`), the unix socket and the server's log (`log`).
    dir: PathBuf,
    /// The port on 127.0.0.1, the same after [`Cluster::start_again`], so that a database's
    /// URL outlives a crash.
    pub port: u16,
    /// Whether initdb and pg_ctl, which refuse to run as root, run as the `postgres` user.
    as_postgres: bool,
    /// Stops the cluster and removes `dir` once its stdin closes.
    watcher: Child,
    /// Numbers the databases [`Cluster::database`] creates.
    databases: AtomicU32,
}

impl Cluster {
    /// Creates a cluster in a new temporary directory and starts it. Panics, naming the
    /// Debian package, if PostgreSQL is not installed.
    pub fn start() -> Cluster {
        let bin = server_programs();
        if !Command::new("psql").arg("--version").output().is_ok_and(|out| out.status.success()) {
            panic!("psql is not on the PATH; {INSTALL}");
        }
        let dir = tempfile::Builder::new().prefix("hub-postgres-").tempdir().unwrap().keep();
        // The directory is the test process's: owned by root if it runs as root.
        let as_postgres = std::fs::metadata(&dir).unwrap().uid() == 0;
        let watcher = watch(&dir, &server_program(&bin, as_postgres, "pg_ctl"));
        if as_postgres {
            run(Command::new("chown").arg("postgres").arg(&dir));
        }
        let mut cluster = Cluster {
            bin,
            dir,
            port: super::free_port(),
            as_postgres,
            watcher,
            databases: AtomicU32::new(0),
        };
        cluster.init();
        cluster.start_again();
        cluster
    }

    /// The cluster every test of this binary that only needs a database shares, started by
    /// the first to ask. Nothing may crash or stop it, hence no `&mut`.
    pub fn shared() -> &'static Cluster {
        static SHARED: OnceLock<Cluster> = OnceLock::new();
        SHARED.get_or_init(Cluster::start)
    }

    /// Creates a database no other test uses and returns its URL,
    /// `postgres://postgres@127.0.0.1:PORT/NAME`.
    pub fn database(&self) -> String {
        let name = format!("test_{}", self.databases.fetch_add(1, Ordering::Relaxed) + 1);
        self.psql(&self.url("postgres"), &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// Runs `sql` (one or more statements, in one transaction) in the database at `db_url`
    /// and returns what it printed: tuples only, unaligned (`|` between columns, one row a
    /// line), without the last newline. Panics if a statement fails.
    pub fn psql(&self, db_url: &str, sql: &str) -> String {
        let mut psql = Command::new("psql");
        psql.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", db_url, "-c", sql])
            .env("PGCONNECT_TIMEOUT", "10");
        let printed = run(&mut psql);
        printed.strip_suffix('\n').unwrap_or(&printed).to_owned()
    }

    /// Kills the database as a crash would (`pg_ctl stop -m immediate`): no checkpoint, so
    /// the next start recovers from the write-ahead log.
    pub fn crash(&mut self) {
        self.pg_ctl(&["stop", "-m", "immediate"]);
    }

    /// Shuts the database down cleanly (`pg_ctl stop -m fast`): sessions are ended, and a
    /// checkpoint is written.
    pub fn stop(&mut self) {
        self.pg_ctl(&["stop", "-m", "fast"]);
    }

    /// Starts the cluster's data dir on its port, after [`Cluster::crash`] or
    /// [`Cluster::stop`], and returns once it accepts connections (after any recovery).
    pub fn start_again(&mut self) {
        let log = self.dir.join("log");
        let port = format!("-p {}", self.port);
        let out = self
            .server("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "-o", &port, "start"])
            .output()
            .unwrap();
        if !out.status.success() {
            panic!("{}the server's log:\n{}", failure("pg_ctl start", &out), self.log());
        }
    }

    /// What the server has logged since the cluster was created.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// The temporary directory holding the data dir, removed with the cluster.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates the data dir, with the settings every test cluster has.
    fn init(&self) {
        run(self.server("initdb").arg("-D").arg(self.data_dir()).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-locale",
        ]));
        let settings = format!(
            "\n# A test cluster's (hub/tests/support/postgres.rs).\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             # Several hubs, each with a pool of connections.\n\
             max_connections = 200\n\
             # Crash tests check that a committed write survives.\n\
             fsync = on\n",
            self.dir.display()
        );
        let conf = self.data_dir().join("postgresql.conf");
        std::fs::OpenOptions::new().append(true).open(conf).unwrap().write_all(settings.as_bytes()).unwrap();
    }

    fn pg_ctl(&self, args: &[&str]) {
        run(self.server("pg_ctl").arg("-D").arg(self.data_dir()).args(args));
    }

    /// One of the server programs, ready to run in the cluster's directory.
    fn server(&self, program: &str) -> Command {
        let mut command = server_program(&self.bin, self.as_postgres, program);
        command.current_dir(&self.dir);
        command
    }
}

impl Drop for Cluster {
    /// Closes the watcher's pipe and waits while it stops the cluster and removes its
    /// directory.
    fn drop(&mut self) {
        drop(self.watcher.stdin.take());
        let _ = self.watcher.wait();
    }
}

/// How to get PostgreSQL onto the machine, for the panics that find it missing.
const INSTALL: &str = "the PostgreSQL store's tests need Debian's PostgreSQL: \
     `apt-get install -y postgresql`, or run them through `cargo xtask test`, which installs it";

/// The newest major version's server programs under [`DEBIAN_PROGRAMS`].
fn server_programs() -> PathBuf {
    let majors = std::fs::read_dir(DEBIAN_PROGRAMS).into_iter().flatten().flatten();
    majors
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|major| Path::new(DEBIAN_PROGRAMS).join(major.to_string()).join("bin/initdb").exists())
        .max()
        .map(|major| Path::new(DEBIAN_PROGRAMS).join(major.to_string()).join("bin"))
        .unwrap_or_else(|| panic!("no {DEBIAN_PROGRAMS}/<major>/bin/initdb; {INSTALL}"))
}

/// `program` of the server programs in `bin`, as the `postgres` user if `as_postgres`.
fn server_program(bin: &Path, as_postgres: bool, program: &str) -> Command {
    let mut command = if as_postgres {
        let mut runuser = Command::new("runuser");
        runuser.args(["-u", "postgres", "--"]).arg(bin.join(program));
        runuser
    } else {
        Command::new(bin.join(program))
    };
    command.stdin(Stdio::null());
    command
}

/// Starts the watcher of the cluster in `dir` (see the module's doc); `pg_ctl` is how to run
/// pg_ctl. Started first, so that a test that fails or is killed while its cluster starts
/// leaves nothing either.
fn watch(dir: &Path, pg_ctl: &Command) -> Child {
    let script = r#"cat >/dev/null; "$@" -D "$0/data" -m immediate stop; rm -rf "$0""#;
    Command::new("sh")
        .args(["-c", script])
        .arg(dir)
        .arg(pg_ctl.get_program())
        .args(pg_ctl.get_args())
        .process_group(0)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Runs `command` and returns what it printed; panics with its output unless it succeeds.
fn run(command: &mut Command) -> String {
    let out = command.output().unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    if !out.status.success() {
        panic!("{}", failure(&format!("{command:?}"), &out));
    }
    String::from_utf8(out.stdout).unwrap()
}

fn failure(what: &str, out: &Output) -> String {
    format!(
        "{what} failed ({})\nstdout:\n{}\nstderr:\n{}\n",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A hub on the PostgreSQL database at `url`, with a rate limit that never gets in the way.
pub async fn hub_on(url: &str) -> super::TestHub {
    super::TestHub::start_with(|c| {
        c.limits.requests_per_minute = 1_000_000;
        c.store.backend = hub::config::Backend::Postgres;
        c.store.url = Some(url.to_owned());
    })
    .await
}
