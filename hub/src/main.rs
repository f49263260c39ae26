//! `hub`: serve the sync API (rereading its sites and TLS certificate on SIGHUP), check
//! everything a start needs, mint a site token, import balance files, run the agent that
//! pushes a site's balance files to the hub, or back up and restore the database.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hub::App;
use hub::auth::Keys;
use hub::config::{Backend, Config};
use hub::metrics::Reload;
use hub::service;
use protocol::{Scope, Scopes};
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

/// Every request allocates a little (headers, JSON, tokens) on whichever worker thread runs
/// it; mimalloc's per-thread heaps make that cheaper than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "hub", version, about = "The unified-sync hub")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the configuration comes from; shared by every subcommand.
#[derive(clap::Args)]
struct ConfigArgs {
    /// TOML configuration file; HUB_* environment variables override it.
    #[arg(long, env = "HUB_CONFIG")]
    config: Option<PathBuf>,
    /// Directory of the database (overrides data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Development mode: the demo sites with keys kept in the data dir, localhost origins.
    #[arg(long)]
    dev: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the sync API.
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        /// Address to listen on (overrides listen).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Check everything `hub serve` needs — the settings, every site's keys, the TLS
    /// certificate and key, the data dir, the metrics token — and print one line per item;
    /// exits 1 on any problem. Binds no port and opens no database: safe beside a running hub.
    Check {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Bring per-user balance files (`<user_id>.json` holding `coins` or `balance`) into the
    /// hub's database; the hub must not be running on it.
    Import {
        #[command(flatten)]
        config: ConfigArgs,
        /// The folder of balance files.
        #[arg(long)]
        from: PathBuf,
        /// Report what would happen, and write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Watch a site's per-user balance files (`<user_id>.json`), push every change to the hub
    /// and write into them what changed elsewhere, with tokens signed by the site's key from
    /// the configuration.
    Agent {
        #[command(flatten)]
        config: ConfigArgs,
        /// The folder of balance files.
        #[arg(long, value_name = "DIR")]
        watch: PathBuf,
        /// The site whose files these are (a configured site with a key that can sign).
        #[arg(long, value_name = "ID")]
        site: String,
        /// The hub's base URL, e.g. https://hub.example.org (requests go to <URL>/api/sync).
        #[arg(long, value_name = "URL")]
        hub: String,
        /// Where the agent remembers what the hub has [default: .hub-agent-state.json in the
        /// watched folder].
        #[arg(long, value_name = "FILE")]
        state: Option<PathBuf>,
        /// Certificate authorities (PEM) to trust for an https:// hub, beside the public ones
        /// and the system's trust store: for a hub whose certificate a private authority signed.
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// Only push the files' changes to the hub: never write a balance file (and need no
        /// `changes:read` in the site's scopes).
        #[arg(long)]
        push_only: bool,
    },
    /// Print a token for a user, signed with a site's key, as the site's backend would.
    Token {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long)]
        site: String,
        #[arg(long)]
        user: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// What the token may do, space-separated (e.g. "sync:read amounts:set"); without it,
        /// a page's token: sync:read profile:write settings:write amounts:spend.
        #[arg(long, value_name = "SCOPES")]
        scope: Option<String>,
        /// Mark the token as an admin token (may write global_roles; the site must be
        /// configured admin = true). Without --scope it gets the page's scopes and roles:write.
        #[arg(long)]
        admin: bool,
    },
    /// Copy the database, while the hub serves it, into one file: every write the hub
    /// acknowledged before the copy began is in it.
    Backup {
        #[command(flatten)]
        config: ConfigArgs,
        /// The backup file to write.
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Put a backup in place of the database, with a new epoch so that every page drops its
    /// cache; the database it replaces is kept beside it. The hub must not be running on it.
    Restore {
        #[command(flatten)]
        config: ConfigArgs,
        /// The backup file (made by `hub backup`); `-` reads it from standard input, so that
        /// the hub's user can restore a backup only root may read.
        #[arg(long, value_name = "FILE", required_unless_present = "epoch_only")]
        from: Option<PathBuf>,
        /// PostgreSQL: only give the database a new epoch, after `pg_restore` put a dump in
        /// place, so that every page drops what it cached of the database as it was.
        #[arg(long, conflicts_with = "from")]
        epoch_only: bool,
    },
    /// Bring the store's schema up to date and exit, as `hub serve` does at start: to migrate
    /// a PostgreSQL database once before new instances roll out.
    Migrate {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

impl ConfigArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let config = self.load_settings()?;
        if self.dev { config.with_dev_sites() } else { Ok(config) }
    }

    /// The configuration without `--dev`'s sites, whose keys are written into the data dir
    /// the first time: what `hub serve` binds its port with before it writes anything.
    fn load_settings(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(dir) = &self.data_dir {
            config.data_dir.clone_from(dir);
        }
        Ok(config)
    }
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hub: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config: args, listen } => {
            let mut config = args.load_settings()?;
            if let Some(listen) = listen {
                config.listen = listen;
            }
            let _logs = init_logging();
            serve(config, args.dev, move || args.load())
        }
        Command::Agent { config, watch, site, hub, state, ca_file, push_only } => {
            let config = config.load()?;
            let _logs = init_logging();
            agent(&config, hub_agent::Options { dir: watch, site, hub_url: hub, state, ca_file, push_only })
        }
        Command::Check { config } => check(&config),
        Command::Import { config, from, dry_run } => import(config.load()?, &from, dry_run),
        Command::Token { config, site, user, ttl, scope, admin } => {
            let mut config = config.load()?;
            protocol::UserId::parse(&user).map_err(|e| anyhow::anyhow!(e.message))?;
            // Only this site's keys are read: the others' secrets may live where this shell
            // cannot see them.
            config.sites.retain(|s| s.id == site);
            let keys = Keys::from_config(&config)?;
            let scopes = scope
                .map(|claim| {
                    Scopes::parse(&claim).map_err(|name| {
                        anyhow::anyhow!("--scope: {name:?} is no scope; the scopes are {}", Scopes::ALL)
                    })
                })
                .transpose()?;
            let token = match (scopes, admin) {
                (None, false) => keys.mint(&site, &user, ttl)?,
                (Some(scopes), admin) => keys.mint_scoped(&site, &user, ttl, scopes, admin)?,
                (None, true) => {
                    let scopes = Scopes::PAGE.iter().chain([Scope::RolesWrite]).collect();
                    keys.mint_scoped(&site, &user, ttl, scopes, true)?
                }
            };
            println!("{token}");
            Ok(())
        }
        Command::Backup { config, to, force } => {
            let config = config.load()?;
            if config.store.backend == Backend::Postgres {
                anyhow::bail!(
                    "a PostgreSQL store is backed up with pg_dump, and restored with pg_restore and \
                     `hub restore --epoch-only` (docs/deployment.md, \"Several instances on PostgreSQL\")"
                );
            }
            let summary = hub::store::sqlite::backup::backup(&config.data_dir, &to, force)?;
            println!("wrote {summary}");
            Ok(())
        }
        Command::Restore { config, from, epoch_only } => {
            let config = config.load()?;
            match (config.store.backend, from) {
                (Backend::Postgres, None) if epoch_only => {
                    let epoch = hub::store::postgres::renew_epoch(hub::store::postgres::Database::of(
                        &config.store,
                    )?)?;
                    println!("the database's epoch is now {epoch}: pages drop what they cached of it");
                }
                (Backend::Sqlite, Some(from)) => {
                    println!("{}", hub::store::sqlite::backup::restore(&config.data_dir, &from)?);
                }
                (Backend::Sqlite, None) => anyhow::bail!(
                    "--epoch-only is for a PostgreSQL store; a SQLite backup is restored with --from, which gives it a new epoch"
                ),
                (Backend::Postgres, _) => anyhow::bail!(
                    "a PostgreSQL store is restored with pg_restore, then `hub restore --epoch-only` \
                     (docs/deployment.md, \"Several instances on PostgreSQL\")"
                ),
            }
            Ok(())
        }
        Command::Migrate { config } => migrate(&config.load()?),
    }
}

/// `hub check`: prints what every check found, the configuration's own loading first. Writes
/// nothing: with `--dev`, sites whose keys the data dir does not hold yet get keys only this
/// check sees.
fn check(args: &ConfigArgs) -> anyhow::Result<()> {
    let loaded = args
        .load_settings()
        .and_then(|config| if args.dev { config.with_dev_sites_unwritten() } else { Ok(config) });
    let config = match loaded {
        Ok(config) => config,
        Err(e) => {
            println!("FAIL  configuration: {e:#}");
            anyhow::bail!("the configuration does not load; `hub serve` would not start");
        }
    };
    let report = hub::check::check(&config);
    for item in &report.items {
        println!("{item}");
    }
    match (report.problems().count(), report.warnings().count()) {
        (0, 0) => {
            println!("all is well: `hub serve` would start with this configuration");
            Ok(())
        }
        (0, warnings) => {
            println!("`hub serve` would start with this configuration; see the {warnings} warning(s) above");
            Ok(())
        }
        (n, _) => anyhow::bail!("{n} problem(s); `hub serve` would not start"),
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), until the guard is dropped.
///
/// A thread of its own writes the lines, as many per write as are waiting: a request's thread
/// only formats its line and queues it, rather than writing it to stderr under stderr's lock
/// (every applied write logs a `[SYNC]` line). No line is dropped: with 128,000 lines
/// queued, logging waits.
fn init_logging() -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("log-writer")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    let info = Targets::new().with_default(Level::INFO);
    let (targets, unreadable) = match std::env::var("RUST_LOG") {
        Ok(text) => match text.parse::<Targets>() {
            Ok(targets) => (targets, None),
            Err(e) => (info, Some(format!("{text:?}: {e}"))),
        },
        Err(_) => (info, None),
    };
    // Colours only on a terminal: a log file or the journal gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(ansi))
        .with(targets)
        .init();
    if let Some(unreadable) = unreadable {
        tracing::warn!("RUST_LOG {unreadable}; logging at info");
    }
    guard
}

/// Runs the agent with what it reads of the configuration: the hub's id and the site's key.
#[tokio::main]
async fn agent(config: &Config, options: hub_agent::Options) -> anyhow::Result<()> {
    let config: hub_agent::Config = serde_json::from_value(serde_json::to_value(config)?)
        .context("the configuration does not hold what the agent reads")?;
    hub_agent::run(&config, options, shutdown_signal()).await
}

/// Serves with `config`, to which `dev` adds the development sites once the port is bound;
/// `reread` reads the configuration again on SIGHUP.
#[tokio::main]
async fn serve(
    config: Config,
    dev: bool,
    reread: impl Fn() -> anyhow::Result<Config> + Send + 'static,
) -> anyhow::Result<()> {
    if !config.auth {
        tracing::warn!("auth is OFF: any caller may read and write any user (development only)");
    }
    // The port first: a hub that cannot listen leaves no data dir, development keys or
    // database behind.
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let config = if dev { config.with_dev_sites()? } else { config };
    let app = App::open(config.clone())?;
    let addr = listener.local_addr()?;
    #[cfg(unix)]
    tokio::spawn(reload_on_hangup(
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot handle SIGHUP")?,
        app.clone(),
        reread,
    ));
    let scheme = if app.tls().is_some() { "https" } else { "http" };
    tracing::info!(
        "hub listening on {scheme}://{addr} (data in {}, epoch {}, sites: {})",
        config.data_dir.display(),
        app.domain().epoch(),
        config.sites.iter().map(|s| s.id.as_str()).collect::<Vec<_>>().join(", ")
    );
    let signals = service::StopSignals::install().context("cannot handle SIGTERM and SIGINT")?;
    service::notify_ready(&format!("serving on {scheme}://{addr}"));
    let drain = std::time::Duration::from_secs(config.drain_secs);
    hub::serve(listener, app.clone(), service::stop_requested(app, drain, signals)).await?;
    Ok(())
}

/// `hub migrate`: opens the store, which brings its schema up to date, and closes it.
#[tokio::main]
async fn migrate(config: &Config) -> anyhow::Result<()> {
    config.validate_records()?;
    let store = hub::store::open(
        &config.store,
        &config.data_dir,
        config.limits.op_retention(),
        hub::store::StoreMetrics::default(),
    )?;
    store.close().await;
    let schema = match config.store.backend {
        Backend::Sqlite => hub::store::sqlite::SCHEMA_VERSION.to_string(),
        Backend::Postgres => hub::store::postgres::SCHEMA_VERSION.to_string(),
    };
    println!("the store's schema is at version {schema}, this hub's");
    Ok(())
}

#[tokio::main]
async fn import(config: Config, from: &std::path::Path, dry_run: bool) -> anyhow::Result<()> {
    use hub::import::{self, Outcome};
    let scan = import::scan(from)?;
    // A dry run on a hub that has no database yet creates none: every balance would be new.
    let fresh = config.store.backend == Backend::Sqlite
        && !config.data_dir.join(hub::store::sqlite::DB_FILE).exists();
    let outcomes = if dry_run && fresh {
        vec![Outcome::Imported; scan.balances.len()]
    } else {
        let domain = import::open(&config)?;
        let outcomes = if dry_run {
            import::preview(&domain, &scan.balances).await
        } else {
            import::apply(&domain, &scan.balances).await
        };
        domain.store().close().await;
        outcomes?
    };
    let (kept, verb) =
        if dry_run { ("it would be kept", "would import") } else { ("it is kept", "imported") };
    let mut imported = 0;
    for (balance, outcome) in scan.balances.iter().zip(&outcomes) {
        match outcome {
            Outcome::Imported => {
                imported += 1;
                let text = balance
                    .text
                    .as_ref()
                    .map(|text| format!(" (the file writes it as the text {text:?}, read as a number)"))
                    .unwrap_or_default();
                println!("{verb} {}: {} coins for {}{text}", balance.file, balance.coins, balance.user);
            }
            Outcome::AlreadyHad { version, coins } => println!(
                "skipped {}: {} already has a balance ({coins} coins, version {version}); {kept}",
                balance.file, balance.user
            ),
        }
    }
    for refused in &scan.refused {
        println!("refused {}: {}", refused.file, refused.reason);
    }
    println!(
        "{imported} {verb}, {} already had a balance, {} refused{}",
        scan.balances.len() - imported,
        scan.refused.len(),
        if dry_run { " (dry run: nothing was written)" } else { "" }
    );
    if !scan.refused.is_empty() {
        anyhow::bail!("{} file(s) refused; fix them and run the import again", scan.refused.len());
    }
    Ok(())
}

/// On every SIGHUP (`systemctl reload`): reopens the access log's file (which logrotate moved
/// away), rereads the configuration's sites — their keys, origins, scopes and ceilings — and
/// the TLS certificate and key, so that a key is added or revoked and a renewed certificate
/// served without a restart or a dropped connection. Each outcome is counted in
/// `hub_reloads_total`. A
/// file that does not load is logged and what is in use stays; the hub keeps serving either
/// way.
#[cfg(unix)]
async fn reload_on_hangup(
    mut hangup: tokio::signal::unix::Signal,
    app: App,
    reread: impl Fn() -> anyhow::Result<Config>,
) {
    while hangup.recv().await.is_some() {
        if let Some(reopened) = app.reopen_access_log() {
            app.metrics().reloaded(Reload::AccessLog, reopened.is_ok());
            match reopened {
                Ok(()) => tracing::info!("SIGHUP: access log reopened"),
                Err(e) => tracing::error!("SIGHUP: writing on to the access log's current file: {e:#}"),
            }
        }
        let sites = reread().and_then(|config| app.reload_sites(&config).map(|()| config));
        app.metrics().reloaded(Reload::Sites, sites.is_ok());
        match sites {
            Ok(config) => tracing::info!(
                "SIGHUP: sites reloaded ({}); new requests use their keys and policies",
                config.sites.iter().map(|s| s.id.as_str()).collect::<Vec<_>>().join(", ")
            ),
            Err(e) => tracing::error!("SIGHUP: keeping the current sites: {e:#}"),
        }
        let tls = app.reload_tls();
        if let Some(reloaded) = &tls {
            app.metrics().reloaded(Reload::Tls, reloaded.is_ok());
        }
        match tls {
            None => {}
            Some(Ok(expires)) => tracing::info!(
                "SIGHUP: TLS certificate reloaded, valid until {}; new connections get it",
                hub::time::rfc3339_ms(expires.saturating_mul(1000))
            ),
            Some(Err(e)) => tracing::error!("SIGHUP: keeping the current TLS certificate: {e:#}"),
        }
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
