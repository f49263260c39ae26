//! What the tests and the demo need beyond cargo itself. Each [`Need`] knows how to tell
//! whether it is present and how it is installed; [`ensure`] installs what it can and names,
//! with the command to run by hand, whatever it cannot. Decides nothing about which tests run.

use std::path::Path;

use anyhow::bail;

use crate::process::{output, shown, step, succeeds};

/// The target the browser client compiles to; `protocol` must build for it too.
pub const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// The wasm-bindgen CLI must match the `wasm-bindgen` crate pinned in Cargo.toml.
pub const WASM_BINDGEN_VERSION: &str = "0.2.129";

/// Everything `cargo xtask test` needs, in the order it is checked.
pub const FOR_TESTS: &[Need] = &[
    RUSTFMT,
    CLIPPY,
    WASM,
    WASM_BINDGEN,
    NODE,
    CHROMIUM,
    PHP,
    NGINX,
    POSTGRES,
    CURL,
    PHP_FPM,
    APACHE_MOD_PHP,
    ZIP,
    UNZIP,
];

/// What `cargo xtask demo` needs to build the package (its binaryen and esbuild come from npm,
/// pinned in `pkg/package.json`).
pub const FOR_DEMO: &[Need] = &[WASM, WASM_BINDGEN, NODE];

/// What `cargo xtask demo --postgres` needs beside: a throwaway cluster, and nginx in front of
/// the two hub instances.
pub const FOR_DEMO_POSTGRES: &[Need] = &[POSTGRES, NGINX];

/// What `cargo xtask demo --check` needs beside: curl, to ask the demo what a person would.
pub const FOR_DEMO_CHECK: &[Need] = &[CURL];

/// What `cargo xtask bench` needs: the package's build, whose size it reports, and a
/// throwaway PostgreSQL cluster with pgbench, for the hub on PostgreSQL beside the database's
/// own single-row UPDATE rate (`--flood` needs neither, `--events` only PostgreSQL).
pub const FOR_BENCH: &[Need] = &[WASM, WASM_BINDGEN, NODE, POSTGRES];

/// What `cargo xtask bench --events` needs: a throwaway cluster, for the events across two
/// instances on PostgreSQL.
pub const FOR_BENCH_EVENTS: &[Need] = &[POSTGRES];

/// What `cargo xtask dist` needs: the package at its smallest, and the hub's static Linux
/// build. Only a release needs the musl toolchain; the tests never build for it.
pub const FOR_DIST: &[Need] =
    &[WASM, WASM_BINDGEN, NODE, MUSL, MUSL_GCC, ZIP, FILE, DPKG_DEB, SYSTEMD_ANALYZE];

/// What `cargo xtask soak`'s long suites need: the PostgreSQL crash suite's throwaway cluster.
pub const FOR_SOAK: &[Need] = &[POSTGRES];

/// What `cargo xtask soak` needs beyond a release to smoke it.
pub const FOR_RELEASE_SMOKE: &[Need] = &[STRACE];

/// The target of the hub's static Linux binary, which `cargo xtask dist` builds.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

const RUSTFMT: Need = Need {
    name: "rustfmt",
    present: || succeeds("cargo", &["fmt", "--version"]),
    install: Install::Rustup(&["component", "add", "rustfmt"]),
};

const CLIPPY: Need = Need {
    name: "clippy",
    present: || succeeds("cargo", &["clippy", "--version"]),
    install: Install::Rustup(&["component", "add", "clippy"]),
};

const WASM: Need = Need {
    name: "the wasm32-unknown-unknown target",
    present: || target_present(WASM_TARGET),
    install: Install::Rustup(&["target", "add", WASM_TARGET]),
};

const MUSL: Need = Need {
    name: "the x86_64-unknown-linux-musl target",
    present: || target_present(MUSL_TARGET),
    install: Install::Rustup(&["target", "add", MUSL_TARGET]),
};

/// The C compiler for the musl target: the hub's bundled SQLite, ring and mimalloc are C.
const MUSL_GCC: Need = Need {
    name: "musl-gcc (musl-tools)",
    present: || succeeds("musl-gcc", &["--version"]),
    install: Install::Apt(&["musl-tools"]),
};

/// Packs the plain-script build into the zip a site owner downloads (`cargo xtask dist`, and
/// the release files `tests/browser/docs.test.mjs` makes).
const ZIP: Need = Need { name: "zip", present: || succeeds("zip", &["-v"]), install: Install::Apt(&["zip"]) };

/// Tells `cargo xtask dist` that the hub it built is statically linked.
const FILE: Need =
    Need { name: "file", present: || succeeds("file", &["--version"]), install: Install::Apt(&["file"]) };

/// Builds the hub's Debian package and unpacks it to check it (`cargo xtask dist`).
const DPKG_DEB: Need = Need {
    name: "dpkg-deb (dpkg)",
    present: || succeeds("dpkg-deb", &["--version"]),
    install: Install::Apt(&["dpkg"]),
};

/// Checks the Debian package's systemd units (`systemd-analyze verify` and `security`); it
/// needs no systemd running.
const SYSTEMD_ANALYZE: Need = Need {
    name: "systemd-analyze (systemd)",
    present: || succeeds("systemd-analyze", &["--version"]),
    install: Install::Apt(&["systemd"]),
};

/// Traces the release's hub in `cargo xtask soak`, to check that the units' system call filter
/// allows every call it makes.
const STRACE: Need =
    Need { name: "strace", present: || succeeds("strace", &["-V"]), install: Install::Apt(&["strace"]) };

const WASM_BINDGEN: Need = Need {
    name: "wasm-bindgen-cli 0.2.129",
    present: || output("wasm-bindgen", &["--version"]).is_ok_and(|v| v.contains(WASM_BINDGEN_VERSION)),
    install: Install::Cargo(&["install", "wasm-bindgen-cli", "--version", WASM_BINDGEN_VERSION, "--locked"]),
};

const NODE: Need = Need {
    name: "Node.js and npm",
    present: || succeeds("node", &["--version"]) && succeeds("npm", &["--version"]),
    install: Install::Apt(&["nodejs", "npm"]),
};

const CHROMIUM: Need = Need {
    name: "Chromium",
    present: || succeeds("chromium", &["--version"]),
    install: Install::Apt(&["chromium"]),
};

/// Runs the deployment guide's PHP token endpoint (`docs/examples/sync-token.php`).
const PHP: Need = Need {
    name: "PHP (command line)",
    present: || succeeds("php", &["--version"]),
    install: Install::Apt(&["php-cli"]),
};

/// A real HTTP/2 client in `hub/tests/bodies.rs`: refusals of uploads still being sent must
/// reach it whole (Debian's curl speaks HTTP/2 through nghttp2).
const CURL: Need = Need {
    name: "curl with HTTP/2",
    present: || output("curl", &["--version"]).is_ok_and(|v| v.contains("HTTP2")),
    install: Install::Apt(&["curl"]),
};

/// Runs in front of the hub in `hub/tests/proxy.rs`, with the deployment guide's
/// configuration (`deploy/nginx/unified-sync-hub.conf`). Debian installs it in /usr/sbin,
/// which is not on every user's PATH.
const NGINX: Need = Need {
    name: "nginx",
    present: || succeeds("nginx", &["-v"]) || succeeds("/usr/sbin/nginx", &["-v"]),
    install: Install::Apt(&["nginx"]),
};

/// A throwaway PostgreSQL cluster for the PostgreSQL store's tests and its crash suite
/// (`hub/tests/support/postgres.rs`), and pgbench for the PostgreSQL row of `cargo xtask
/// bench`. Debian puts the server programs in /usr/lib/postgresql/<major>/bin, off the PATH;
/// psql, from postgresql-client, is on it.
const POSTGRES: Need = Need {
    name: "PostgreSQL (initdb, pg_ctl, pgbench and psql)",
    present: || {
        let has_server = |major: std::fs::DirEntry| {
            ["initdb", "pg_ctl", "pgbench"]
                .iter()
                .all(|program| major.path().join("bin").join(program).is_file())
        };
        std::fs::read_dir("/usr/lib/postgresql").into_iter().flatten().flatten().any(has_server)
            && succeeds("psql", &["--version"])
    },
    install: Install::Apt(&["postgresql"]),
};

/// Unpacks the plain-script zip in the site-owner guide, which `tests/browser/docs.test.mjs`
/// runs.
const UNZIP: Need =
    Need { name: "unzip", present: || succeeds("unzip", &["-v"]), install: Install::Apt(&["unzip"]) };

/// Runs the site-owner guide's PHP-FPM pool, behind nginx, in `tests/browser/servers.mjs`.
/// Debian names it by PHP's version (`php-fpm8.2`), in /usr/sbin.
const PHP_FPM: Need = Need {
    name: "PHP-FPM",
    present: || found_in("/usr/sbin", "php-fpm", "").is_some_and(|fpm| succeeds(&fpm, &["-v"])),
    install: Install::Apt(&["php-fpm"]),
};

/// Runs the site-owner guide's Apache VirtualHost in `tests/browser/servers.mjs`: Debian's
/// apache2 in /usr/sbin, and mod_php among its modules, named by PHP's version
/// (`libphp8.2.so`).
const APACHE_MOD_PHP: Need = Need {
    name: "Apache with mod_php",
    present: || {
        succeeds("/usr/sbin/apache2", &["-v"])
            && found_in("/usr/lib/apache2/modules", "libphp", ".so").is_some()
    },
    install: Install::Apt(&["apache2", "libapache2-mod-php"]),
};

/// Something a task needs.
pub struct Need {
    /// How the need is named to the person running the task.
    pub name: &'static str,
    /// Checked before installing, and again after, so a silent install failure is caught.
    pub present: fn() -> bool,
    pub install: Install,
}

/// How a missing need is installed.
pub enum Install {
    /// `rustup <args>`: components and targets of the active toolchain.
    Rustup(&'static [&'static str]),
    /// `cargo <args>`: tools published on crates.io.
    Cargo(&'static [&'static str]),
    /// `apt-get install -y <packages>`: Debian packages, as root.
    Apt(&'static [&'static str]),
}

impl Install {
    /// The program and arguments that install the need.
    fn command(&self) -> (&'static str, Vec<&'static str>) {
        match self {
            Install::Rustup(args) => ("rustup", args.to_vec()),
            Install::Cargo(args) => ("cargo", args.to_vec()),
            Install::Apt(packages) => {
                ("apt-get", [&["install", "-y", "--no-install-recommends"], *packages].concat())
            }
        }
    }

    /// Why this machine cannot run the install itself, if it cannot.
    fn obstacle(&self) -> Option<&'static str> {
        match self {
            Install::Rustup(_) => (!succeeds("rustup", &["--version"])).then_some("rustup is not installed"),
            Install::Cargo(_) => None,
            Install::Apt(_) => {
                if !succeeds("apt-get", &["--version"]) {
                    Some("this is not a Debian-like machine with apt-get")
                } else if output("id", &["-u"]).map_or(true, |uid| uid.trim() != "0") {
                    Some("installing Debian packages needs root")
                } else {
                    None
                }
            }
        }
    }

    /// Work to do once before the first install of this kind: Debian's package lists may be
    /// missing or stale on a new machine.
    fn prepare(&self, prepared: &mut bool) -> anyhow::Result<()> {
        if matches!(self, Install::Apt(_)) && !*prepared {
            step("apt-get", &["update"])?;
            *prepared = true;
        }
        Ok(())
    }
}

/// Installs every missing need it can; fails naming each one still missing and how to
/// install it.
pub fn ensure(needs: &[Need]) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    let mut apt_updated = false;
    for need in needs {
        if (need.present)() {
            continue;
        }
        let (program, args) = need.install.command();
        let by_hand = shown(program, &args);
        match need.install.obstacle() {
            Some(obstacle) => missing.push(format!("{}: {obstacle}; install it with `{by_hand}`", need.name)),
            None => {
                println!("{} is missing; installing it", need.name);
                let result = need.install.prepare(&mut apt_updated).and_then(|()| step(program, &args));
                if !(need.present)() {
                    let why =
                        result.err().map_or_else(|| "it is still missing".to_owned(), |e| e.to_string());
                    missing.push(format!("{}: `{by_hand}` did not install it ({why})", need.name));
                }
            }
        }
    }
    if !missing.is_empty() {
        bail!("this task needs what could not be installed here:\n  - {}", missing.join("\n  - "));
    }
    Ok(())
}

/// Whether the active toolchain has the standard library of `target`.
fn target_present(target: &str) -> bool {
    output("rustc", &["--print", "target-libdir", "--target", target])
        .is_ok_and(|dir| Path::new(dir.trim()).is_dir())
}

/// The path of a file in `dir` whose name starts with `prefix` and ends with `suffix`.
fn found_in(dir: &str, prefix: &str, suffix: &str) -> Option<String> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|entry| {
        let name = entry.file_name().into_string().ok()?;
        (name.starts_with(prefix) && name.ends_with(suffix)).then(|| format!("{dir}/{name}"))
    })
}
