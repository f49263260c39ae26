//! The PHP token endpoint of the deployment guide (`docs/examples/sync-token.php`) mints
//! tokens the real hub accepts: run from the command line with a test site's secret, it
//! prints a token that reads the user's versions, and the same token with a tampered
//! signature is refused.

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::{SiteClient, TestHub, client, site_secret};

const SITE: &str = "roflfaucet";
const USER: &str = "8-evans";

/// What `php docs/examples/sync-token.php USER` prints with `SITE`'s test secret.
fn php_token(hub_id: &str) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/sync-token.php");
    let output = Command::new("php")
        .arg(&script)
        .arg(USER)
        .env("SYNC_SITE_ID", SITE)
        .env("SYNC_HUB_ID", hub_id)
        .env("SYNC_SECRET", site_secret(SITE))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `php` ({e}): install the Debian package php-cli (`apt-get install php-cli`)")
        });
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{} failed ({}): {}{}",
        script.display(),
        output.status,
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout.trim().to_owned()
}

fn page(hub: &TestHub, token: String) -> SiteClient {
    SiteClient {
        url: hub.url.clone(),
        client: client(),
        token: Some(token),
        site: SITE.into(),
        user: USER.into(),
    }
}

/// The token with one character of its signature changed.
fn tampered(token: &str) -> String {
    let signature = token.rfind('.').unwrap() + 1;
    let mut bytes = token.as_bytes().to_vec();
    bytes[signature] = if bytes[signature] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).unwrap()
}

#[tokio::test]
async fn the_hub_accepts_the_php_token_and_refuses_it_tampered() {
    let hub = TestHub::start().await;
    let token = php_token(&hub.app.config().hub_id);

    let body = page(&hub, token.clone()).timestamp("balance").await;
    assert_eq!(body.assert_ok()["version"], 0, "body: {}", body.body);

    page(&hub, tampered(&token)).timestamp("balance").await.assert_refused(401, "invalid_token");
    hub.stop().await;
}
