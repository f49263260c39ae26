//! The `hub` binary's commands, run as an operator would.

use std::process::Command;

use hub::auth::Keys;
use hub::config::Config;
use protocol::{Scope, Scopes};

fn hub(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hub")).args(args).env_remove("HUB_CONFIG").output().unwrap()
}

#[test]
fn a_dev_token_is_accepted_by_a_dev_hub_on_the_same_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap();
    let out =
        hub(&["token", "--dev", "--data-dir", dir_arg, "--site", "clickforcharity", "--user", "8-evans"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap();
    let config = Config { data_dir: dir.path().to_path_buf(), ..Config::default() }.with_dev_sites().unwrap();
    let verified = Keys::from_config(&config).unwrap().verify(token.trim()).unwrap();
    assert_eq!(
        (verified.site.as_str(), verified.user.as_str(), verified.admin, verified.scopes),
        ("clickforcharity", "8-evans", false, Scopes::PAGE)
    );
}

#[test]
fn token_mints_the_scopes_asked_for_and_refuses_what_the_site_may_not_sign() {
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap();
    let token = |extra: &[&str]| {
        let mut args =
            vec!["token", "--dev", "--data-dir", dir_arg, "--site", "roflfaucet", "--user", "8-evans"];
        args.extend_from_slice(extra);
        hub(&args)
    };
    let out = token(&["--scope", "sync:read amounts:credit"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = Config { data_dir: dir.path().to_path_buf(), ..Config::default() }.with_dev_sites().unwrap();
    let verified =
        Keys::from_config(&config).unwrap().verify(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    assert_eq!(verified.scopes, Scopes::of(&[Scope::SyncRead, Scope::AmountsCredit]));
    for (args, says) in [
        (&["--scope", "sync:read amounts:set"][..], "may not sign amounts:set"),
        (&["--scope", "coins:mint"][..], "\"coins:mint\" is no scope"),
        (&["--admin"][..], "may not sign admin tokens"),
        (&["--ttl", "7200"][..], "at most 3600 s"),
    ] {
        let out = token(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[test]
fn token_refuses_unknown_sites_and_bad_user_ids() {
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap();
    let unknown = hub(&["token", "--dev", "--data-dir", dir_arg, "--site", "nosuchsite", "--user", "u"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("nosuchsite"));
    let bad = hub(&["token", "--dev", "--data-dir", dir_arg, "--site", "wrc", "--user", "../etc"]);
    assert!(!bad.status.success());
}

#[test]
fn serve_refuses_auth_off_on_a_public_address() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hub.toml");
    std::fs::write(&config, "auth = false\n").unwrap();
    let out = hub(&[
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--listen",
        "0.0.0.0:0",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("loopback"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
