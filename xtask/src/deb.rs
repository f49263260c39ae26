//! The hub's Debian package, `unified-sync_<version>_amd64.deb`, which `cargo xtask dist`
//! builds with `dpkg-deb` from a tree staged here: the static hub as `/usr/bin/hub`, the
//! systemd units of `deploy/` naming that path, the service users (`systemd-sysusers`),
//! `/etc/unified-sync/` with the example configuration and the access log's logrotate entry
//! (both conffiles), the secrets file's template, which `postinst` copies into
//! `/etc/unified-sync/` once (a conffile's lines would show in dpkg's diffs, and an upgrade
//! could replace them), the maintainer scripts of `deploy/debian/`, and the guides. Then its check, which unpacks it with `dpkg-deb -x` into a
//! folder and runs it from there: the package is never installed on the machine that builds
//! it.
//!
//! `dpkg-deb` rather than cargo-deb: the units need their `ExecStart=` rewritten for the
//! package, the static hub is already built and checked by `dist`, and dpkg is on every
//! Debian machine, where cargo-deb would be one more tool to build for each release.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail, ensure};

use crate::process::{command, output, root, shown, target_dir};

/// The package's name: `hub` is taken in Debian (GitHub's command line tool, which also
/// installs `/usr/bin/hub`, hence `Conflicts: hub`).
pub const PACKAGE: &str = "unified-sync";

/// Where the hub's units are installed from the package, and what they call the hub there.
const UNITS: [&str; 2] = ["unified-sync-hub.service", "unified-sync-agent.service"];
const UNIT_DIR: &str = "usr/lib/systemd/system";
const INSTALLED_HUB: &str = "/usr/bin/hub";
/// What the units of `deploy/` call the hub: where the deployment guide installs it by hand.
const HAND_INSTALLED_HUB: &str = "/usr/local/bin/hub";

const CONFIG: &str = "etc/unified-sync/hub.toml";
/// What `postinst` copies to `/etc/unified-sync/secrets.env` when there is none.
const SECRETS_TEMPLATE: &str = "usr/share/unified-sync/secrets.env";
/// Rotates the access log, when the configuration writes it to `/var/log/unified-sync`.
const LOGROTATE: &str = "etc/logrotate.d/unified-sync-hub";
/// The example site's secret variable in [`CONFIG`].
const EXAMPLE_SECRET_ENV: &str = "ROFLFAUCET_HUB_SECRET";

/// Highest exposure `systemd-analyze security` may give a unit, in its tenths (2.0): the
/// units hold no capability (but the agent's `CAP_CHOWN`, for the files it writes), see
/// almost nothing of the system and filter their system calls.
const EXPOSURE_TENTHS: &str = "20";

/// The package file's name for `version`.
pub fn file_name(version: &str) -> String {
    format!("{PACKAGE}_{}_amd64.deb", debian_version(version))
}

/// A Cargo version as Debian orders it: a pre-release (`0.2.0-rc.1`) sorts before its
/// release, which Debian writes with `~`.
fn debian_version(version: &str) -> String {
    version.replacen('-', "~", 1)
}

/// Builds the package of `version` as `to`, around the built `hub`, staging its tree beside
/// `to`.
pub fn build(to: &Path, hub: &Path, version: &str) -> anyhow::Result<()> {
    let tree = to.with_extension("tree");
    let deploy = root().join("deploy");
    copy(hub, &tree.join("usr/bin/hub"), 0o755)?;
    for unit in UNITS {
        let text =
            std::fs::read_to_string(deploy.join(unit)).with_context(|| format!("cannot read {unit}"))?;
        write(&tree.join(UNIT_DIR).join(unit), &packaged_unit(unit, &text)?, 0o644)?;
    }
    copy(&deploy.join("debian/sysusers.conf"), &tree.join("usr/lib/sysusers.d/unified-sync.conf"), 0o644)?;
    copy(&deploy.join("hub.toml"), &tree.join(CONFIG), 0o640)?;
    copy(&deploy.join("debian/secrets.env"), &tree.join(SECRETS_TEMPLATE), 0o644)?;
    copy(&deploy.join("logrotate/unified-sync-hub"), &tree.join(LOGROTATE), 0o644)?;
    let doc = tree.join("usr/share/doc").join(PACKAGE);
    copy(&deploy.join("debian/copyright"), &doc.join("copyright"), 0o644)?;
    for guide in ["README.md", "docs/deployment.md", "docs/releasing.md"] {
        let name = Path::new(guide).file_name().context("a guide without a name")?;
        copy(&root().join(guide), &doc.join(name), 0o644)?;
    }
    for script in ["postinst", "prerm", "postrm"] {
        copy(&deploy.join("debian").join(script), &tree.join("DEBIAN").join(script), 0o755)?;
    }
    write(&tree.join("DEBIAN/conffiles"), conffiles(), 0o644)?;
    write(&tree.join("DEBIAN/md5sums"), &md5sums(&tree)?, 0o644)?;
    write(&tree.join("DEBIAN/control"), control(version, installed_kib(&tree)?), 0o644)?;
    open_folders(&tree)?;

    let args = ["--root-owner-group", "-Zxz", "--build", path(&tree)?, path(to)?];
    print!("{}", output("dpkg-deb", &args)?);
    std::fs::remove_dir_all(&tree)?;
    Ok(())
}

/// The files of `/etc` that the package installs: an upgrade keeps what the operator changed
/// in them.
fn conffiles() -> String {
    format!("/{CONFIG}\n/{LOGROTATE}\n")
}

/// A unit of `deploy/` as the package installs it: calling the hub where the package puts it.
fn packaged_unit(unit: &str, text: &str) -> anyhow::Result<String> {
    let calls = text.lines().filter(|line| line.starts_with("ExecStart=")).collect::<Vec<_>>();
    ensure!(
        calls.len() == 1 && calls[0].starts_with(&format!("ExecStart={HAND_INSTALLED_HUB} ")),
        "deploy/{unit} must start {HAND_INSTALLED_HUB} in one ExecStart=, which the package \
         changes to {INSTALLED_HUB}"
    );
    Ok(text.replace(&format!("ExecStart={HAND_INSTALLED_HUB} "), &format!("ExecStart={INSTALLED_HUB} ")))
}

fn control(version: &str, installed_kib: u64) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {}\n\
         Architecture: amd64\n\
         Maintainer: unified-sync maintainers <maintainers@unified-sync.invalid>\n\
         Installed-Size: {installed_kib}\n\
         Depends: systemd | systemd-standalone-sysusers | systemd-sysusers\n\
         Conflicts: hub\n\
         Section: net\n\
         Priority: optional\n\
         Description: hub keeping one user's coins, points and profile in step across websites\n \
         The unified-sync hub holds the canonical copy of each user's balance, points,\n \
         profile, roles and settings, and serves the sync API that the sites' pages use.\n \
         .\n \
         This package installs the hub as /usr/bin/hub (one static executable), the systemd\n \
         units unified-sync-hub and unified-sync-agent (neither enabled nor started), the\n \
         users unified-sync and unified-sync-agent, and an example configuration in\n \
         /etc/unified-sync/. The guide is /usr/share/doc/unified-sync/deployment.md.\n",
        debian_version(version)
    )
}

/// The `md5sums` control file: every file of the tree but the control files.
fn md5sums(tree: &Path) -> anyhow::Result<String> {
    let mut files = Vec::new();
    files_under(tree, tree, &mut files)?;
    let files: Vec<&str> =
        files.iter().map(String::as_str).filter(|file| !file.starts_with("DEBIAN/")).collect();
    let mut md5sum = command("md5sum", &files);
    md5sum.current_dir(tree);
    let listed = md5sum.output().context("cannot start md5sum")?;
    ensure!(listed.status.success(), "md5sum failed ({})", listed.status);
    String::from_utf8(listed.stdout).context("md5sum printed something that is not UTF-8")
}

/// What the package takes once installed, in KiB, as Debian counts it.
fn installed_kib(tree: &Path) -> anyhow::Result<u64> {
    let mut files = Vec::new();
    files_under(tree, tree, &mut files)?;
    let mut kib = 0;
    for file in files.iter().filter(|file| !file.starts_with("DEBIAN/")) {
        kib += std::fs::metadata(tree.join(file))?.len().div_ceil(1024);
    }
    Ok(kib)
}

/// Every file under `dir`, as a path relative to `tree`, sorted.
fn files_under(tree: &Path, dir: &Path, files: &mut Vec<String>) -> anyhow::Result<()> {
    let mut entries = std::fs::read_dir(dir)?.collect::<Result<Vec<_>, _>>()?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            files_under(tree, &path, files)?;
        } else {
            let relative = path.strip_prefix(tree)?.to_str().context("a file name that is not UTF-8")?;
            files.push(relative.to_owned());
        }
    }
    Ok(())
}

/// Makes every folder of the tree 0755, as installed folders are whatever the umask here.
fn open_folders(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            open_folders(&entry.path())?;
        }
    }
    Ok(())
}

fn copy(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    let text = std::fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
    write(to, &text, mode)
}

fn write(to: &Path, contents: impl AsRef<[u8]>, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let folder = to.parent().context("a file without a folder")?;
    std::fs::create_dir_all(folder).with_context(|| format!("cannot create {}", folder.display()))?;
    std::fs::write(to, contents).with_context(|| format!("cannot write {}", to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The package unpacked into a folder of its own, as `dpkg` would install it.
pub struct Unpacked {
    pub root: PathBuf,
}

impl Unpacked {
    /// Unpacks `deb` into `dir`, emptied first.
    pub fn new(deb: &Path, dir: PathBuf) -> anyhow::Result<Unpacked> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        output("dpkg-deb", &["-x", path(deb)?, path(&dir)?])?;
        Ok(Unpacked { root: dir })
    }

    pub fn hub(&self) -> PathBuf {
        self.root.join(INSTALLED_HUB.trim_start_matches('/'))
    }

    /// Writes the package's example configuration with its example lines in use (each
    /// `#key = value` and `#[[sites]]` line without its `#`, but `tls_cert` and `tls_key`,
    /// which name files a machine has only once it has a certificate), listening on `listen`,
    /// to `to`; returns the variable and value of the example site's secret.
    pub fn example_config(&self, listen: &str, to: &Path) -> anyhow::Result<(&'static str, &'static str)> {
        let shipped = std::fs::read_to_string(self.root.join(CONFIG))?;
        let mut config = String::new();
        for line in shipped.lines() {
            let example = line.strip_prefix('#').filter(|rest| {
                rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '[') && !rest.starts_with("tls_")
            });
            match example {
                Some(key) if key.starts_with("listen =") => {
                    config.push_str(&format!("listen = \"{listen}\""))
                }
                Some(key) => config.push_str(key),
                None => config.push_str(line),
            }
            config.push('\n');
        }
        ensure!(
            config.contains(&format!("secret_env = \"{EXAMPLE_SECRET_ENV}\"")),
            "deploy/hub.toml's example site no longer takes its secret from {EXAMPLE_SECRET_ENV}"
        );
        std::fs::write(to, config)?;
        Ok((EXAMPLE_SECRET_ENV, "an-example-secret-of-at-least-thirty-two-bytes"))
    }

    /// `hub args…` from the package.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut hub = Command::new(self.hub());
        hub.args(args);
        without_hub_variables(&mut hub);
        hub
    }
}

/// Keeps this process's `HUB_*` variables from `command`, and its stdin: the hub refuses a
/// `HUB_` variable that names no setting of its.
pub fn without_hub_variables(command: &mut Command) {
    command.stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("HUB_") {
            command.env_remove(name);
        }
    }
}

/// Checks the package as an operator's machine would see it, unpacked into a folder here:
/// its control fields and conffiles, its maintainer scripts' syntax, `hub --version`, both
/// units under `systemd-analyze verify` and `security`, and `hub check` of the shipped
/// configuration (refused: it names no site yet) and of its examples in use (accepted).
pub fn verify(deb: &Path, version: &str) -> anyhow::Result<()> {
    println!("==> checking {}", deb.display());
    let fields = output("dpkg-deb", &["--field", path(deb)?, "Package", "Version", "Architecture"])?;
    let expected = format!("Package: {PACKAGE}\nVersion: {}\nArchitecture: amd64\n", debian_version(version));
    ensure!(fields == expected, "the package's control says {fields:?}, not {expected:?}");

    let work = target_dir().join("deb-check");
    let unpacked = Unpacked::new(deb, work.join("root"))?;
    let control = work.join("control");
    output("dpkg-deb", &["--control", path(deb)?, path(&control)?])?;
    let listed = std::fs::read_to_string(control.join("conffiles"))?;
    ensure!(listed == conffiles(), "the package's conffiles are {listed:?}");
    for script in ["postinst", "prerm", "postrm"] {
        output("sh", &["-n", path(&control.join(script))?])?;
    }
    let postinst = std::fs::read_to_string(control.join("postinst"))?;
    ensure!(
        postinst.contains(&format!("/{SECRETS_TEMPLATE} ")) && unpacked.root.join(SECRETS_TEMPLATE).is_file(),
        "postinst copies /{SECRETS_TEMPLATE}, which the package must hold"
    );

    let printed = run(unpacked.command(&["--version"]))?;
    ensure!(printed.trim() == format!("hub {version}"), "the packaged hub says {printed:?} to --version");

    let root = format!("--root={}", path(&unpacked.root)?);
    // The hub's reload calls procps' kill, which every Debian system has; verify looks for it.
    std::fs::create_dir_all(unpacked.root.join("bin"))?;
    std::fs::copy("/bin/kill", unpacked.root.join("bin/kill")).context("cannot copy /bin/kill")?;
    for unit in UNITS {
        let installed = format!("/{UNIT_DIR}/{unit}");
        let args = ["verify", &root, "--man=no", "--recursive-errors=no", &installed];
        run(command("systemd-analyze", &args)).with_context(|| shown("systemd-analyze", &args))?;
        let args =
            ["security", "--offline=true", &root, &format!("--threshold={EXPOSURE_TENTHS}"), &installed];
        let assessed =
            run(command("systemd-analyze", &args)).with_context(|| shown("systemd-analyze", &args))?;
        println!("{}", assessed.lines().last().unwrap_or_default().trim());
    }

    let data = work.join("data");
    let shipped = unpacked.root.join(CONFIG);
    let check = ["check", "--config", path(&shipped)?, "--data-dir", path(&data)?];
    let refused = unpacked.command(&check).output().context("cannot start the packaged hub")?;
    // 1 is a check that found a problem; 2 would be clap refusing the command line.
    ensure!(
        refused.status.code() == Some(1),
        "hub check of the shipped {CONFIG}, which names no site yet, ended {}, not 1:\n{}{}",
        refused.status,
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    let examples = work.join("hub.toml");
    let (secret_env, secret) = unpacked.example_config("127.0.0.1:8787", &examples)?;
    let check = ["check", "--config", path(&examples)?, "--data-dir", path(&data)?];
    let mut accepted = unpacked.command(&check);
    accepted.env(secret_env, secret);
    print!("{}", run(accepted).context("hub check of the shipped configuration's examples")?);

    std::fs::remove_dir_all(&work)?;
    Ok(())
}

/// Runs `command`, returning what it printed; fails with its output unless it succeeds.
fn run(mut command: Command) -> anyhow::Result<String> {
    let out = command.stdin(Stdio::null()).output().context("cannot start it")?;
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("it failed ({}):\n{printed}{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(printed)
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("a path that is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::{debian_version, packaged_unit};

    #[test]
    fn a_pre_release_sorts_before_its_release_in_debian() {
        assert_eq!(debian_version("0.2.0"), "0.2.0");
        assert_eq!(debian_version("0.2.0-rc.1"), "0.2.0~rc.1");
    }

    #[test]
    fn the_packaged_units_call_the_packaged_hub() {
        let unit =
            "[Service]\nExecStart=/usr/local/bin/hub serve --config x\nExecReload=/bin/kill -HUP $MAINPID\n";
        assert_eq!(
            packaged_unit("u", unit).unwrap(),
            "[Service]\nExecStart=/usr/bin/hub serve --config x\nExecReload=/bin/kill -HUP $MAINPID\n"
        );
        let elsewhere = packaged_unit("u", "ExecStart=/opt/hub serve\n").unwrap_err().to_string();
        assert!(elsewhere.contains("must start /usr/local/bin/hub"), "{elsewhere}");
    }
}
