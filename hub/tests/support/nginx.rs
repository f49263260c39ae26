//! A real nginx in front of a test hub, with the deployment guide's configuration
//! (`deploy/nginx/unified-sync-hub.conf`) as a test adapts it: every file in a directory of
//! its own, HTTPS with a certificate of a private authority for 127.0.0.1 and ::1.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::process::{Child, Command};

use super::{PATIENCE, TestHub};

/// The configuration the deployment guide shows and installs.
pub const NGINX_CONF: &str = include_str!("../../../deploy/nginx/unified-sync-hub.conf");

/// A running nginx in front of a hub, killed when dropped.
pub struct Nginx {
    pub dir: TempDir,
    /// On 127.0.0.1 and ::1 alike.
    pub port: u16,
    /// The authority that signed its certificate, which the tests' clients trust alone.
    pub authority_pem: String,
    _child: Child,
}

/// The nginx binary: on the PATH, or where Debian puts it (not on a user's PATH).
fn nginx_binary() -> PathBuf {
    ["nginx", "/usr/sbin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|nginx| std::process::Command::new(nginx).arg("-v").output().is_ok_and(|o| o.status.success()))
        .unwrap_or_else(|| {
            panic!(
                "nginx is not installed: `cargo xtask test` installs it (Debian's package nginx), \
                 or run `apt-get install nginx`"
            )
        })
}

/// Replaces the one occurrence of `from` in `text`, so that a change of the deployment
/// guide's file that these tests do not follow fails them.
pub fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "deploy/nginx/unified-sync-hub.conf has no single {from:?}");
    text.replace(from, to)
}

impl Nginx {
    /// Starts nginx with the deployment's configuration as `adapt` changes it, forwarding to
    /// `hub`, on a free port of 127.0.0.1 and `::1`, and waits until it accepts connections.
    pub async fn start(hub: &TestHub, adapt: impl FnOnce(String) -> String) -> Nginx {
        let nginx = nginx_binary();
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let hub_addr = hub.url.strip_prefix("http://").expect("the hub behind nginx speaks plain HTTP");

        let pems = super::certs::loopback_signed_by("nginx test authority");
        std::fs::write(dir.path().join("fullchain.pem"), &pems.cert).unwrap();
        std::fs::write(dir.path().join("privkey.pem"), &pems.key).unwrap();

        let site = replace_once(NGINX_CONF, "server 127.0.0.1:8787;", &format!("server {hub_addr};"));
        let site = replace_once(&site, "listen 443 ssl", &format!("listen 127.0.0.1:{port} ssl"));
        let site = replace_once(&site, "listen [::]:443 ssl", &format!("listen [::1]:{port} ssl"));
        let certificates = format!("{}/", dir.path().display());
        let site = site.replace("/etc/letsencrypt/live/hub.example.org/", &certificates);
        let directives = site.lines().filter(|line| !line.trim_start().starts_with('#'));
        assert!(
            !directives.clone().any(|line| line.contains("/etc/")),
            "a directive names a system file:\n{site}"
        );
        std::fs::write(dir.path().join("site.conf"), adapt(site)).unwrap();

        // What /etc/nginx/nginx.conf would hold, with every file inside the test's directory.
        // One process, no workers: killing it stops nginx.
        let d = dir.path().display();
        let main = format!(
            "master_process off;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
                 access_log {d}/access.log;\n\
                 client_body_temp_path {d}/client_body;\n\
                 proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fastcgi;\n\
                 uwsgi_temp_path {d}/uwsgi;\n\
                 scgi_temp_path {d}/scgi;\n\
                 include {d}/site.conf;\n\
             }}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), main).unwrap();

        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let mut child = Command::new(nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-g")
            .arg(format!("daemon off; pid {d}/nginx.pid; error_log stderr;"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let said = || std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("nginx exited ({status}); it said:\n{}", said());
            }
            let v4 = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok();
            if v4 && tokio::net::TcpStream::connect(("::1", port)).await.is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen within {PATIENCE:?}; it said:\n{}",
                said()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Nginx { dir, port, authority_pem: pems.authority, _child: child }
    }

    /// What nginx wrote to its error log.
    pub fn said(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }
}
