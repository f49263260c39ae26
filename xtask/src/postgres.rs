//! A throwaway PostgreSQL cluster for xtask's tasks: Debian's server programs (as the
//! `postgres` user when xtask runs as root), its data dir, socket and log in a new directory,
//! listening on a free port of 127.0.0.1 only and trusting every local connection, with
//! PostgreSQL's defaults otherwise (`fsync` on). `cargo xtask demo --postgres` runs its hub
//! instances on one; `cargo xtask bench` measures `pgbench` and the hub on one. Touches no
//! system configuration and no cluster it did not start.
//!
//! The directory is the cluster's and its task's: the task may keep its own files in it (the
//! demo's nginx and settings). A watcher removes it: a `sh` in a process group of its own (a
//! Ctrl-C at the terminal does not reach it) that reads a pipe only xtask holds open, and when
//! the pipe closes — the cluster is dropped, the task fails, or xtask is killed — stops the
//! cluster and removes the directory.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

use crate::process::output;

/// Where Debian's `postgresql` package puts each major version's server programs.
const DEBIAN_PROGRAMS: &str = "/usr/lib/postgresql";

/// A running cluster that only this xtask uses; stopped and its directory removed when
/// dropped, or when xtask exits in any way (see the module's doc).
pub struct Cluster {
    /// The task's directory; the cluster lives in `postgres/` (data dir `data`, its socket
    /// beside it, the server's log in `log`).
    dir: PathBuf,
    /// The server programs: `/usr/lib/postgresql/<major>/bin`.
    bin: PathBuf,
    /// The server programs' major version.
    major: String,
    /// Where it listens, on 127.0.0.1.
    port: u16,
    /// Whether initdb and pg_ctl, which refuse to run as root, run as the `postgres` user.
    as_postgres: bool,
    /// Stops the cluster and removes `dir` once its stdin closes.
    watcher: Child,
}

impl Cluster {
    /// Creates a directory `unified-sync-<task>-…` in `parent`, starts its watcher, then
    /// creates the cluster in it and starts it. On a failure, whatever started is stopped
    /// and the directory removed.
    pub fn start(parent: &Path, task: &str) -> anyhow::Result<Cluster> {
        let (major, bin) = server_programs()?;
        let as_postgres = output("id", &["-u"])?.trim() == "0";
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        let dir = parent.join(format!("unified-sync-{task}-{}-{since_epoch}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // The watcher first, so that a task failing or killed while its cluster starts leaves
        // nothing either.
        let watcher = match watch(&dir, &server(&bin, as_postgres, "pg_ctl", Path::new("/"))) {
            Ok(watcher) => watcher,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .context("cannot find a free port")?
            .port();
        let cluster = Cluster { dir, bin, major, port, as_postgres, watcher };
        cluster.init(task)?;
        cluster.pg_ctl_start()?;
        Ok(cluster)
    }

    /// The task's directory, removed with the cluster.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server programs' major version.
    pub fn major(&self) -> &str {
        &self.major
    }

    /// The URL of `database`, as a client on this machine reaches it.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates `database` and returns its URL.
    pub fn create_database(&self, database: &str) -> anyhow::Result<String> {
        let port = self.port.to_string();
        let args = ["-h", "127.0.0.1", "-p", &port, "-U", "postgres", database];
        println!("==> {}", crate::process::shown("createdb", &args));
        quietly(Command::new(self.bin.join("createdb")).args(args))?;
        Ok(self.url(database))
    }

    /// What `sql` prints in `database`: tuples only, unaligned, without the last newline.
    pub fn psql(&self, database: &str, sql: &str) -> anyhow::Result<String> {
        let url = self.url(database);
        let printed = quietly(
            Command::new(self.bin.join("psql")).args(["-X", "-q", "-A", "-t", "-d", &url, "-c", sql]),
        )?;
        Ok(printed.trim_end().to_owned())
    }

    /// Runs `pgbench <args>` against `database` (announced, quietly) and returns what it
    /// printed on stdout.
    pub fn pgbench(&self, database: &str, args: &[&str]) -> anyhow::Result<String> {
        let port = self.port.to_string();
        let connection = ["-h", "127.0.0.1", "-p", &port, "-U", "postgres"];
        let all: Vec<&str> = args.iter().copied().chain(connection).chain([database]).collect();
        println!("==> {}", crate::process::shown("pgbench", &all));
        quietly(Command::new(self.bin.join("pgbench")).args(&all))
    }

    /// The process id of the server's postmaster, the parent of every other server process.
    pub fn postmaster_pid(&self) -> anyhow::Result<u32> {
        let file = self.data().join("postmaster.pid");
        let text =
            std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let first = text.lines().next().unwrap_or_default();
        first.trim().parse().with_context(|| format!("{} starts with {first:?}", file.display()))
    }

    /// Stops the cluster and removes the directory, saying so.
    pub fn stop(self) {
        println!("==> pg_ctl stop -m fast, rm -rf {}", self.dir.display());
    }

    fn data(&self) -> PathBuf {
        self.dir.join("postgres").join("data")
    }

    /// Creates the data dir in `postgres/`, listening on 127.0.0.1:`port` only and trusting
    /// every local connection.
    fn init(&self, task: &str) -> anyhow::Result<()> {
        let dir = self.dir.join("postgres");
        std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        if self.as_postgres {
            quietly(Command::new("chown").arg("postgres").arg(&dir))?;
            // A parent the postgres user may not enter (a home directory of mode 0700) fails
            // initdb with a message that does not say which.
            if quietly(Command::new("runuser").args(["-u", "postgres", "--", "test", "-w"]).arg(&dir))
                .is_err()
            {
                bail!(
                    "the postgres user cannot write to {}: a directory above it is closed to other users",
                    dir.display()
                );
            }
        }
        let data = self.data();
        let user = if self.as_postgres { ", as the postgres user" } else { "" };
        println!("==> initdb -D {} (PostgreSQL {}{user})", data.display(), self.major);
        quietly(self.server("initdb").arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-locale",
        ]))?;
        let settings = format!(
            "\n# cargo xtask {task} (xtask/src/postgres.rs)\n\
             listen_addresses = '127.0.0.1'\n\
             port = {}\n\
             unix_socket_directories = '{}'\n",
            self.port,
            dir.display()
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut conf| conf.write_all(settings.as_bytes()))
            .context("cannot write the cluster's postgresql.conf")?;
        Ok(())
    }

    /// Starts the server and waits until it accepts connections.
    fn pg_ctl_start(&self) -> anyhow::Result<()> {
        let (data, log) = (self.data(), self.dir.join("postgres").join("log"));
        println!("==> pg_ctl start -D {} -l {} (on 127.0.0.1:{})", data.display(), log.display(), self.port);
        let started = quietly(
            self.server("pg_ctl").arg("-D").arg(&data).arg("-l").arg(&log).args(["-w", "-t", "60", "start"]),
        );
        started.map(drop).map_err(|e| {
            let logged = std::fs::read_to_string(&log).unwrap_or_default();
            e.context(format!("PostgreSQL did not start; its log:\n{logged}"))
        })
    }

    /// One of the server programs, run in the cluster's directory.
    fn server(&self, program: &str) -> Command {
        server(&self.bin, self.as_postgres, program, &self.dir.join("postgres"))
    }
}

impl Drop for Cluster {
    /// Closes the watcher's pipe and waits while it stops the cluster and removes the
    /// directory.
    fn drop(&mut self) {
        drop(self.watcher.stdin.take());
        let _ = self.watcher.wait();
    }
}

/// Starts the watcher of `dir` (see the module's doc); `pg_ctl` is how it stops the cluster.
fn watch(dir: &Path, pg_ctl: &Command) -> anyhow::Result<Child> {
    // $0 is the directory, "$@" pg_ctl; a cluster that never started has no pid file.
    let script = r#"cat >/dev/null
data="$0/postgres/data"
if [ -f "$data/postmaster.pid" ]; then "$@" -D "$data" -m fast stop >/dev/null; fi
rm -rf "$0""#;
    Command::new("sh")
        .args(["-c", script])
        .arg(dir)
        .arg(pg_ctl.get_program())
        .args(pg_ctl.get_args())
        .process_group(0)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start sh, which stops the cluster and removes its directory")
}

/// The newest major version of Debian's server programs: the version and its `bin`.
fn server_programs() -> anyhow::Result<(String, PathBuf)> {
    let majors = std::fs::read_dir(DEBIAN_PROGRAMS).into_iter().flatten().flatten();
    majors
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|major| Path::new(DEBIAN_PROGRAMS).join(major.to_string()).join("bin/initdb").is_file())
        .max()
        .map(|major| (major.to_string(), Path::new(DEBIAN_PROGRAMS).join(major.to_string()).join("bin")))
        .with_context(|| format!("no {DEBIAN_PROGRAMS}/<major>/bin/initdb: install Debian's postgresql"))
}

/// `program` of the server programs in `bin`, run in `dir`, as the `postgres` user if
/// `as_postgres`.
fn server(bin: &Path, as_postgres: bool, program: &str, dir: &Path) -> Command {
    let mut command = if as_postgres {
        let mut runuser = Command::new("runuser");
        runuser.args(["-u", "postgres", "--"]).arg(bin.join(program));
        runuser
    } else {
        Command::new(bin.join(program))
    };
    command.current_dir(dir).stdin(Stdio::null());
    command
}

/// Runs `command` and returns what it printed on stdout, printing nothing unless it fails,
/// when the error carries what it printed.
fn quietly(command: &mut Command) -> anyhow::Result<String> {
    let line = format!("{command:?}");
    let out = command.stdin(Stdio::null()).output().with_context(|| format!("cannot start {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{line} printed something that is not UTF-8"))
}
