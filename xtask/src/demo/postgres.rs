//! `cargo xtask demo --postgres`: the hub as docs/deployment.md's "Several instances on
//! PostgreSQL" runs it. A throwaway PostgreSQL cluster (`crate::postgres`) holds one
//! database; two `hub serve` instances share it, each on a port of its own, with the
//! development sites and their keys from the demo's data dir; nginx listens on the hub's port
//! and sends requests to each instance in turn, with the proxy settings of
//! `deploy/nginx/unified-sync-hub.conf`. Touches no system configuration and no cluster or
//! nginx it did not start.
//!
//! Everything but the keys lives in the cluster's temporary directory, removed with it however
//! xtask ends: the cluster's data dir, socket and log, nginx's prefix, configuration, pid and
//! logs, and the instances' settings.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};

use anyhow::{Context, bail};
use tokio::process::Child;

use super::{start, stop};
use crate::postgres::Cluster;
use crate::process::shown;

/// The database the instances share.
const DATABASE: &str = "unified_sync";

/// The deployment guide's nginx site, which the demo's is made from.
const GUIDE_SITE: &str = include_str!("../../../deploy/nginx/unified-sync-hub.conf");

/// The header nginx adds to every answer: the instance that gave it (`$upstream_addr`).
pub const INSTANCE_HEADER: &str = "X-Demo-Hub";

/// nginx in front of two hub instances on one PostgreSQL database, all started by xtask.
pub struct Balanced {
    nginx: Child,
    instances: [Instance; 2],
    /// Where nginx listens: the hub's port.
    listen: SocketAddr,
    /// The database's URL, as the instances reach it.
    database_url: String,
    /// Dropped after the processes above (fields drop in order): the cluster stops once
    /// nothing uses it.
    cluster: Cluster,
}

/// One `hub serve` on the shared database.
struct Instance {
    name: &'static str,
    addr: SocketAddr,
    child: Child,
}

impl Balanced {
    /// Creates and starts the cluster, creates the database, brings its schema up to date
    /// (`hub migrate --dev`, which also keeps the development keys in the data dir the first
    /// time, so that both instances read the same), and starts both instances and nginx. On
    /// a failure, whatever started is stopped and the temporary directory removed.
    pub async fn start(listen: SocketAddr, data_dir: &str) -> anyhow::Result<Balanced> {
        let cluster = Cluster::start(&std::env::temp_dir(), "demo")?;
        let [port_a, port_b] = free_ports()?;
        let database_url = cluster.create_database(DATABASE)?;

        let settings = cluster.dir().join("hub.toml");
        std::fs::write(&settings, hub_settings(&database_url))
            .with_context(|| format!("cannot write {}", settings.display()))?;
        let settings = path_str(&settings)?;
        let status =
            start("hub", &["migrate", "--dev", "--config", settings, "--data-dir", data_dir])?.wait().await?;
        if !status.success() {
            bail!("`hub migrate` exited with {status}");
        }
        let instance = |name, port| -> anyhow::Result<Instance> {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let listen = addr.to_string();
            let args = ["serve", "--dev", "--config", settings, "--data-dir", data_dir, "--listen", &listen];
            Ok(Instance { name, addr, child: start("hub", &args)? })
        };
        let instances = [instance("hub instance A", port_a)?, instance("hub instance B", port_b)?];
        let nginx = start_nginx(cluster.dir(), listen, &[port_a, port_b])?;
        Ok(Balanced { nginx, instances, listen, database_url, cluster })
    }

    /// What must accept connections before the demo goes on: the instances, then nginx.
    pub fn listening(&self) -> Vec<(String, SocketAddr)> {
        let instances = self.instances.iter().map(|i| (i.name.to_owned(), i.addr));
        instances.chain([("nginx".to_owned(), self.listen)]).collect()
    }

    /// Prints what runs where, once everything accepts connections.
    pub fn describe(&self, data_dir: &str) {
        let [a, b] = &self.instances;
        let (listen, dir) = (self.listen, self.cluster.dir().display());
        println!(
            r#"
The hub is two instances behind nginx, on one PostgreSQL database:

  nginx              http://{listen}   (to each instance in turn; {INSTANCE_HEADER} names the one that answered)
  hub instance A     http://{a}   (its dashboard: http://{a}/dashboard/)
  hub instance B     http://{b}   (its dashboard: http://{b}/dashboard/)
  PostgreSQL {major}      {url}   (psql '{url}')
  sites' keys        {data_dir}/dev-sites.toml   (both instances read them)
  everything else    {dir}   (nginx.conf, hub.toml, the cluster; removed when the demo stops)

Through nginx, /metrics and the dashboard's data want the metrics token: ask an instance.
"#,
            a = a.addr,
            b = b.addr,
            major = self.cluster.major(),
            url = self.database_url,
        );
    }

    /// The first of nginx and the instances to exit, named.
    pub async fn exited(&mut self) -> anyhow::Result<(String, ExitStatus)> {
        let [a, b] = &mut self.instances;
        let (name, status) = tokio::select! {
            status = self.nginx.wait() => ("nginx", status?),
            status = a.child.wait() => (a.name, status?),
            status = b.child.wait() => (b.name, status?),
        };
        Ok((name.to_owned(), status))
    }

    /// Stops nginx, then both instances, then the cluster, and removes the temporary
    /// directory; fails naming a process that did not exit successfully.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let mut failed = Vec::new();
        let nginx = stop(&mut self.nginx).await?;
        if !nginx.success() {
            failed.push(format!("nginx exited with {nginx}"));
        }
        for instance in &mut self.instances {
            let status = stop(&mut instance.child).await?;
            if !status.success() {
                failed.push(format!("{} exited with {status}", instance.name));
            }
        }
        self.cluster.stop();
        if !failed.is_empty() {
            bail!("{}", failed.join("; "));
        }
        Ok(())
    }
}

/// The instances' settings: the database, and nginx as their proxy (the development sites
/// come from `--dev`).
fn hub_settings(database_url: &str) -> String {
    format!(
        "# cargo xtask demo --postgres: both instances' settings (docs/deployment.md, \"Several\n\
         # instances on PostgreSQL\"); --dev adds the sites, with the keys of the data dir.\n\
         trusted_proxies = [\"127.0.0.1\"]\n\
         \n\
         [store]\n\
         backend = \"postgres\"\n\
         url = \"{database_url}\"\n"
    )
}

/// Starts nginx on `listen` in front of the instances on `ports`, with its files in
/// `scratch/nginx`: one process, not a daemon, so that the demo stops it as it stops a hub.
fn start_nginx(scratch: &Path, listen: SocketAddr, ports: &[u16]) -> anyhow::Result<Child> {
    let dir = scratch.join("nginx");
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let instances: Vec<_> = ports.iter().map(|port| SocketAddr::from(([127, 0, 0, 1], *port))).collect();
    let site = dir.join("site.conf");
    std::fs::write(&site, demo_site(listen, &instances)?)
        .with_context(|| format!("cannot write {}", site.display()))?;
    // What /etc/nginx/nginx.conf would hold, with every file in the temporary directory.
    let d = dir.display();
    let main = format!(
        "# cargo xtask demo --postgres (xtask/src/demo/postgres.rs)\n\
         daemon off;\n\
         master_process off;\n\
         pid {d}/nginx.pid;\n\
         lock_file {d}/nginx.lock;\n\
         error_log stderr;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n\
         \x20   access_log {d}/access.log;\n\
         \x20   client_body_temp_path {d}/client_body;\n\
         \x20   proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/uwsgi;\n\
         \x20   scgi_temp_path {d}/scgi;\n\
         \x20   include {d}/site.conf;\n\
         }}\n"
    );
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, main).with_context(|| format!("cannot write {}", conf.display()))?;
    // Debian installs nginx in /usr/sbin, which is not on every user's PATH.
    let nginx = if crate::process::succeeds("nginx", &["-v"]) { "nginx" } else { "/usr/sbin/nginx" };
    let (prefix, conf) = (format!("{}/", dir.display()), path_str(&conf)?.to_owned());
    let args = ["-e", "stderr", "-p", &prefix, "-c", &conf];
    println!("==> {}", shown(nginx, &args));
    tokio::process::Command::from(crate::process::command(nginx, &args))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {nginx}"))
}

/// The demo's nginx site: the deployment guide's, with the instances in its upstream (as its
/// section 9 writes them), plain HTTP on `listen` in place of HTTPS on port 443, and each
/// answer naming the instance that gave it. Fails naming a line of the guide's file it no
/// longer finds, so that the demo follows the file rather than drifting from it.
fn demo_site(listen: SocketAddr, instances: &[SocketAddr]) -> anyhow::Result<String> {
    let mut site = String::from(
        "# deploy/nginx/unified-sync-hub.conf as cargo xtask demo --postgres runs it: plain HTTP,\n\
         # two instances (xtask/src/demo/postgres.rs).\n",
    );
    let (upstream, listen_line, proxy_pass) =
        ("server 127.0.0.1:8787;", "listen 443 ssl http2;", "proxy_pass http://unified_sync_hub;");
    let mut found = [(upstream, 0), (listen_line, 0), (proxy_pass, 0)];
    for line in GUIDE_SITE.lines() {
        let directive = line.trim_start();
        let indent = &line[..line.len() - directive.len()];
        // The comments speak of a deployment; HTTPS, its certificate and HSTS are not the demo's.
        let https = ["listen [::]:443 ", "ssl_", "add_header Strict-Transport-Security"];
        if directive.starts_with('#') || https.iter().any(|start| directive.starts_with(start)) {
            continue;
        }
        if let Some((_, count)) = found.iter_mut().find(|(wanted, _)| *wanted == directive) {
            *count += 1;
        }
        if directive == upstream {
            for addr in instances {
                site.push_str(&format!("{indent}server {addr} max_fails=2 fail_timeout=5s;\n"));
            }
        } else if directive == listen_line {
            site.push_str(&format!("{indent}listen {listen};\n"));
        } else if directive == proxy_pass {
            site.push_str(&format!("{line}\n{indent}add_header {INSTANCE_HEADER} $upstream_addr always;\n"));
        } else {
            site.push_str(line);
            site.push('\n');
        }
    }
    if let Some((wanted, count)) = found.iter().find(|(_, count)| *count != 1) {
        bail!("deploy/nginx/unified-sync-hub.conf has {count} lines `{wanted}`, where the demo expects one");
    }
    Ok(site)
}

/// Two distinct ports of 127.0.0.1 that were free a moment ago.
fn free_ports() -> anyhow::Result<[u16; 2]> {
    let bind = || std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port");
    let listeners = [bind()?, bind()?];
    let port = |listener: &std::net::TcpListener| listener.local_addr().map(|addr| addr.port());
    Ok([port(&listeners[0])?, port(&listeners[1])?])
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str().with_context(|| format!("{} is not UTF-8", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_runs_the_guide_s_proxy_settings_over_plain_http_in_front_of_both_instances() {
        let instances = ["127.0.0.1:41001".parse().unwrap(), "127.0.0.1:41002".parse().unwrap()];
        let site = demo_site("127.0.0.1:8787".parse().unwrap(), &instances).unwrap();
        let directives: Vec<&str> = site.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
        for wanted in [
            "server 127.0.0.1:41001 max_fails=2 fail_timeout=5s;",
            "server 127.0.0.1:41002 max_fails=2 fail_timeout=5s;",
            "listen 127.0.0.1:8787;",
            "proxy_pass http://unified_sync_hub;",
            "add_header X-Demo-Hub $upstream_addr always;",
            "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
            "proxy_set_header Forwarded \"\";",
            "keepalive 32;",
        ] {
            assert!(directives.contains(&wanted), "no `{wanted}` in:\n{site}");
        }
        for gone in ["443", "ssl", "/etc/", "Strict-Transport-Security"] {
            assert!(!directives.iter().any(|d| d.contains(gone)), "`{gone}` is still in:\n{site}");
        }
        assert!(!directives.contains(&"server 127.0.0.1:8787;"), "the guide's one hub is still in:\n{site}");
    }
}
