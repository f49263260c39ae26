//! How the hub reaches its PostgreSQL database: the URL's settings with the hub's own, TLS
//! with the hub's rustls, every call bounded in time, and what each failure means to a write.

use std::future::Future;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::ToStatement;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::config::StoreConfig;
use crate::store::StoreError;

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How much longer than the statement timeout the hub waits for an answer before it gives up
/// on the connection: the database cancels a statement itself at the statement timeout, so
/// only a database that stopped answering (frozen, or cut off without the network saying so)
/// is waited on this long.
const ANSWER_MARGIN: Duration = Duration::from_secs(2);

/// The database and how the hub reaches it: `url`'s settings, with what every connection of
/// the hub sets, and TLS. The hub's settings come after the URL's own `options`:
/// - a statement timeout, and a lock timeout of half of it, so that a write waiting on a
///   record another transaction holds fails alone ([`StoreError::Busy`]) before its batch's
///   statement times out;
/// - an idle-in-transaction timeout of three statement timeouts, so that the locks of an
///   instance cut off in the middle of a batch are released;
/// - commits that wait until they are durable, whatever the server's default;
/// - no notices, and the hub's name in `pg_stat_activity`;
/// - TCP keepalives and a TCP user timeout, so that a connection whose packets go unanswered
///   fails.
///
/// TLS is as the URL's `sslmode` says; without one, `prefer` for a database on this host
/// (loopback, or a unix socket) and `require` for any other, so that a password never
/// crosses a network in clear because someone in between declined TLS. Over TLS the
/// server's certificate and name are always verified, against the system's authorities and
/// those of `ca_file` (PEM).
#[derive(Clone)]
pub struct Database {
    pub(super) config: tokio_postgres::Config,
    pub(super) tls: MakeRustlsConnect,
    /// How long a statement may run before the database cancels it.
    pub(super) statement_timeout: Duration,
}

impl Database {
    pub fn new(
        url: &str,
        statement_timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<Database, StoreError> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Open(format!("the store's URL is not a PostgreSQL URL: {e}")))?;
        let ms = statement_timeout.as_millis().max(2);
        let hub_options = format!(
            "-c statement_timeout={ms} -c lock_timeout={} -c idle_in_transaction_session_timeout={} \
             -c synchronous_commit=on -c client_min_messages=warning",
            ms / 2,
            ms * 3
        );
        let options = match config.get_options() {
            Some(own) if !own.trim().is_empty() => format!("{own} {hub_options}"),
            _ => hub_options,
        };
        let local = config.get_hosts().iter().all(|host| match host {
            Host::Tcp(name) => {
                name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
            }
            Host::Unix(_) => true,
        });
        if !url.to_ascii_lowercase().contains("sslmode=") && !local {
            config.ssl_mode(SslMode::Require);
        }
        config
            .options(options)
            .application_name("unified-sync hub")
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(15))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .tcp_user_timeout(statement_timeout + ANSWER_MARGIN);
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if let Some(path) = ca_file {
            let unusable = |why: String| StoreError::Open(format!("store.ca_file {}: {why}", path.display()));
            let pem = std::fs::read(path).map_err(|e| unusable(format!("cannot be read: {e}")))?;
            let authorities = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| unusable(format!("is not PEM: {e}")))?;
            if authorities.is_empty() {
                return Err(unusable("holds no CERTIFICATE block".into()));
            }
            for authority in authorities {
                roots.add(authority).map_err(|e| unusable(format!("holds an unusable certificate: {e}")))?;
            }
        }
        let tls = ClientConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Open(format!("cannot set up TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Database { config, tls: MakeRustlsConnect::new(tls), statement_timeout })
    }

    /// The database `[store]` names, and how to reach it.
    pub fn of(config: &StoreConfig) -> anyhow::Result<Database> {
        let timeout = Duration::from_millis(config.statement_timeout_ms);
        Ok(Database::new(&config.postgres_url()?, timeout, config.ca_file.as_deref())?)
    }

    /// How long the hub waits for any answer of the database.
    pub(super) fn answer_deadline(&self) -> Duration {
        self.statement_timeout + ANSWER_MARGIN
    }

    /// Whether TLS is required to reach it.
    #[cfg(test)]
    fn requires_tls(&self) -> bool {
        self.config.get_ssl_mode() == SslMode::Require
    }
}

/// A connection for a thread that is not the hub runtime's (the writer's, a command's):
/// tokio-postgres driven by a runtime of the thread's own, every call bounded by `deadline`,
/// so that a database that stops answering fails the call instead of holding the thread. A
/// call that failed for want of an answer leaves the connection unusable: drop it.
pub(super) struct Client {
    runtime: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
    deadline: Duration,
}

impl Client {
    pub(super) fn connect(database: &Database, deadline: Duration) -> Result<Client, StoreError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Open(format!("cannot start the database client's runtime: {e}")))?;
        let (client, connection) =
            bounded(&runtime, deadline, database.config.connect(database.tls.clone()))?;
        runtime.spawn(connection);
        Ok(Client { runtime, client, deadline })
    }

    pub(super) fn execute<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        bounded(&self.runtime, self.deadline, self.client.execute(statement, params))
    }

    pub(super) fn query_one<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, StoreError> {
        bounded(&self.runtime, self.deadline, self.client.query_one(statement, params))
    }

    pub(super) fn batch_execute(&self, sql: &str) -> Result<(), StoreError> {
        bounded(&self.runtime, self.deadline, self.client.batch_execute(sql))
    }

    pub(super) fn prepare(&self, sql: &str) -> Result<Statement, StoreError> {
        bounded(&self.runtime, self.deadline, self.client.prepare(sql))
    }

    /// Runs `requests`, which may send several statements at once over the connection
    /// (`tokio::join!`): they are pipelined, one round trip for all, and run in the order
    /// they were sent. Each request's own result is the caller's to look at.
    pub(super) fn pipeline<'a, T, Fut>(
        &'a self,
        requests: impl FnOnce(&'a tokio_postgres::Client) -> Fut,
    ) -> Result<T, StoreError>
    where
        Fut: Future<Output = T>,
    {
        let deadline = self.deadline;
        self.runtime.block_on(async { tokio::time::timeout(deadline, requests(&self.client)).await }).map_err(
            |_| {
                StoreError::Unavailable(format!(
                    "the database did not answer within {:.1} s",
                    deadline.as_secs_f64()
                ))
            },
        )
    }

    /// Whether the connection is known to be gone.
    pub(super) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// Runs `call` on `runtime`, waiting at most `deadline` for it.
fn bounded<T>(
    runtime: &tokio::runtime::Runtime,
    deadline: Duration,
    call: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StoreError> {
    match runtime.block_on(async { tokio::time::timeout(deadline, call).await }) {
        Ok(answer) => Ok(answer?),
        Err(_) => Err(StoreError::Unavailable(format!(
            "the database did not answer within {:.1} s",
            deadline.as_secs_f64()
        ))),
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        let Some(db) = e.as_db_error() else {
            // No answer from the database: the connection broke, or never opened (and why:
            // a refused connection, an untrusted certificate).
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            return StoreError::Unavailable(message);
        };
        let message = format!("{}: {}", db.code().code(), db.message());
        let code = db.code();
        if *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::UNIQUE_VIOLATION
        {
            StoreError::Conflict(message)
        } else if *code == SqlState::LOCK_NOT_AVAILABLE {
            StoreError::Busy(message)
        } else if *code == SqlState::QUERY_CANCELED
            || *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
            || ["08", "53", "57"].iter().any(|class| code.code().starts_with(class))
        {
            // Cut off, out of resources, or shutting down: passing, from the hub's side.
            StoreError::Unavailable(message)
        } else {
            StoreError::Database(message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_is_required_for_a_database_on_another_host_unless_the_url_says_otherwise() {
        let timeout = Duration::from_secs(5);
        let database = |url: &str| Database::new(url, timeout, None).unwrap();
        assert!(database("postgres://hub:pw@db.internal/hub").requires_tls());
        assert!(database("postgres://hub:pw@10.0.0.5:5432/hub").requires_tls());
        assert!(!database("postgres://hub:pw@127.0.0.1:5432/hub").requires_tls());
        assert!(!database("postgres://hub:pw@localhost/hub").requires_tls());
        assert!(!database("postgres://hub@%2Frun%2Fpostgresql/hub").requires_tls());
        assert!(!database("postgres://hub:pw@db.internal/hub?sslmode=prefer").requires_tls());
        assert!(database("postgres://hub:pw@127.0.0.1/hub?sslmode=require").requires_tls());
    }

    #[test]
    fn the_urls_own_options_come_before_the_hubs() {
        let database = Database::new(
            "postgres://hub@127.0.0.1/hub?options=-c%20search_path%3Dhub",
            Duration::from_secs(5),
            None,
        )
        .unwrap();
        let options = database.config.get_options().unwrap();
        assert!(options.starts_with("-c search_path=hub "), "{options}");
        assert!(
            options.contains("statement_timeout=5000") && options.contains("lock_timeout=2500"),
            "{options}"
        );
    }
}
