//! The hub speaks TLS to a PostgreSQL server that offers it: with `sslmode=require` it
//! insists on TLS and verifies the server's certificate and name, trusting the authorities of
//! `[store] ca_file` beside the system's; a server whose authority it does not trust is
//! refused at start, saying why.

mod support;

use hub::App;
use hub::config::Backend;
use support::postgres::Cluster;
use support::{TestHub, certs};

/// Turns TLS on in `cluster` with a certificate for 127.0.0.1 from a private authority, whose
/// certificate (PEM) it returns.
fn serve_tls(cluster: &Cluster) -> String {
    let issued = certs::loopback_signed_by("the database's authority");
    let data = cluster.dir().join("data");
    for (name, pem) in [("server.crt", &issued.cert), ("server.key", &issued.key)] {
        let path = data.join(name);
        std::fs::write(&path, pem).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        // The server's files belong to whoever runs it (the `postgres` user when tests run as root).
        let owned = std::process::Command::new("chown").arg("--reference").arg(&data).arg(&path).status();
        assert!(owned.unwrap().success());
    }
    let admin = cluster.database();
    cluster.psql(&admin, "ALTER SYSTEM SET ssl = on");
    cluster.psql(&admin, "SELECT pg_reload_conf()");
    issued.authority
}

#[tokio::test(flavor = "multi_thread")]
async fn with_sslmode_require_the_hub_verifies_the_servers_certificate_against_its_ca_file() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("database-ca.pem");
    std::fs::write(&ca, serve_tls(&cluster)).unwrap();
    let url = format!("{}?sslmode=require", cluster.database());

    let hub = TestHub::start_with(|config| {
        config.store.backend = Backend::Postgres;
        config.store.url = Some(url.clone());
        config.store.ca_file = Some(ca.clone());
    })
    .await;
    let site = hub.site("roflfaucet", "alice");
    site.delta("balance", 5, "over-tls-1").await.assert_ok();
    assert_eq!(site.coins().await, 5);
    let plain = cluster.psql(
        &url.replace("?sslmode=require", ""),
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
         WHERE application_name = 'unified-sync hub' AND NOT ssl",
    );
    let encrypted = cluster.psql(
        &url.replace("?sslmode=require", ""),
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
         WHERE application_name = 'unified-sync hub' AND ssl",
    );
    assert_eq!(plain, "0", "a connection of the hub is not encrypted");
    assert_ne!(encrypted, "0");

    // Without the authority, the server's certificate is not trusted: the hub does not start.
    let mut config = support::test_config(&dir.path().join("untrusting"));
    config.store.backend = Backend::Postgres;
    config.store.url = Some(url.clone());
    let refused = App::open(config).map(|_| ()).unwrap_err();
    let message = format!("{refused:#}");
    assert!(message.to_lowercase().contains("certificate"), "{message}");
}
