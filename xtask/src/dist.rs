//! `cargo xtask dist`: a release's artifacts, built afresh in `target/dist/` — the npm
//! package's tarball, the plain-script build zipped for a site without tooling, the hub as a
//! static Linux binary and as a Debian package (checked unpacked, see `deb`), and
//! `SHA256SUMS` of the four. Publishes nothing and tags nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::prereq::{self, MUSL_TARGET};
use crate::process::{command, output, root, step, step_with, target_dir};

/// The checksum file, in `sha256sum`'s format (`sha256sum -c SHA256SUMS` checks it).
pub const SUMS: &str = "SHA256SUMS";

/// The plain-script build's files, which the zip holds in one folder of this name.
const SCRIPT_FOLDER: &str = "unified-balance";
const SCRIPT_FILES: [&str; 2] = ["unified_balance.global.js", "unified_balance_bg.wasm"];

/// What [`build`] made.
pub struct Release {
    /// `target/dist/`.
    pub dir: PathBuf,
    /// The package's and the hub's version, which agree.
    pub version: String,
    /// The Debian package of the hub.
    pub deb: PathBuf,
}

pub fn run() -> anyhow::Result<()> {
    build().map(drop)
}

/// Builds every artifact of the release into an empty `target/dist/` and prints them.
pub fn build() -> anyhow::Result<Release> {
    prereq::ensure(prereq::FOR_DIST)?;
    let version = version()?;
    let dir = target_dir().join("dist");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;

    println!("==> cargo xtask build-pkg");
    crate::build_pkg::check_size(crate::build_pkg::run()?)?;
    crate::build_pkg::check_contents()?;
    let tarball = format!("unified-balance-{version}.tgz");
    step("npm", &["pack", "--prefix", "pkg", "--pack-destination", path(&dir)?, "./pkg"])?;
    anyhow::ensure!(dir.join(&tarball).is_file(), "npm pack made no {tarball} in {}", dir.display());

    let script = format!("unified-balance-{version}-script.zip");
    zip_script(&dir, &script)?;

    let hub = format!("hub-{version}-{MUSL_TARGET}");
    build_hub(&dir.join(&hub), &version)?;
    let deb = crate::deb::file_name(&version);
    crate::deb::build(&dir.join(&deb), &dir.join(&hub), &version)?;
    crate::deb::verify(&dir.join(&deb), &version)?;

    let artifacts = [tarball.as_str(), script.as_str(), hub.as_str(), deb.as_str()];
    let mut sums = in_dir(&dir, "sha256sum", &artifacts);
    let listed = sums.output().context("cannot start sha256sum")?;
    anyhow::ensure!(listed.status.success(), "sha256sum failed ({})", listed.status);
    std::fs::write(dir.join(SUMS), &listed.stdout).context("cannot write SHA256SUMS")?;

    println!("==> {} (version {version}):", dir.display());
    for name in artifacts.iter().chain([&SUMS]) {
        let bytes = std::fs::metadata(dir.join(name))?.len() as f64;
        let (size, unit) =
            if bytes < 1024.0 * 1024.0 { (bytes / 1024.0, "KiB") } else { (bytes / 1024.0 / 1024.0, "MiB") };
        println!("    {name:<40} {bytes:>10} bytes ({size:.1} {unit})");
    }
    Ok(Release { deb: dir.join(&deb), dir, version })
}

/// The release's version: the package's (`pkg/package.json`), which must be the hub's
/// (`hub/Cargo.toml`), so that one number names every artifact.
fn version() -> anyhow::Result<String> {
    let manifest =
        std::fs::read_to_string(root().join("pkg/package.json")).context("cannot read pkg/package.json")?;
    let manifest: serde_json::Value =
        serde_json::from_str(&manifest).context("pkg/package.json is not JSON")?;
    let package = manifest["version"].as_str().context("pkg/package.json has no version")?.to_owned();
    let metadata: serde_json::Value =
        serde_json::from_str(&output("cargo", &["metadata", "--no-deps", "--format-version", "1"])?)?;
    let hub = metadata["packages"]
        .as_array()
        .and_then(|packages| packages.iter().find(|p| p["name"] == "hub"))
        .and_then(|hub| hub["version"].as_str())
        .context("cargo metadata names no hub package")?;
    same_version(package, hub)
}

fn same_version(package: String, hub: &str) -> anyhow::Result<String> {
    if package != hub {
        bail!(
            "the package is version {package} (pkg/package.json) but the hub is {hub} (hub/Cargo.toml): \
             a release gives both the same version"
        );
    }
    Ok(package)
}

/// Zips the plain-script build as one folder, `unified-balance/`, with the package's README:
/// a site owner unzips it and uploads the folder as it is.
fn zip_script(dir: &Path, name: &str) -> anyhow::Result<()> {
    let staging = dir.join("script");
    let folder = staging.join(SCRIPT_FOLDER);
    std::fs::create_dir_all(&folder)?;
    let pkg = root().join("pkg");
    let license = ["LICENSE", "LICENSE.md"].into_iter().map(|l| root().join(l)).find(|l| l.is_file());
    let files = SCRIPT_FILES.iter().map(|f| pkg.join(f)).chain([pkg.join("README.md")]).chain(license);
    for file in files {
        let to = folder.join(file.file_name().context("a file without a name")?);
        std::fs::copy(&file, &to).with_context(|| format!("cannot copy {}", file.display()))?;
    }
    let zip = dir.join(name);
    let args = ["-r", "-X", path(&zip)?, SCRIPT_FOLDER];
    step_with(in_dir(&staging, "zip", &args), "zip", &args)?;
    std::fs::remove_dir_all(&staging)?;
    Ok(())
}

/// Builds the hub for [`MUSL_TARGET`], copies it to `to`, and checks that it is static and
/// runs.
fn build_hub(to: &Path, version: &str) -> anyhow::Result<()> {
    step("cargo", &["build", "--release", "-p", "hub", "--target", MUSL_TARGET])?;
    let built = target_dir().join(MUSL_TARGET).join("release/hub");
    std::fs::copy(&built, to).with_context(|| format!("cannot copy {}", built.display()))?;
    let kind = output("file", &["--brief", path(to)?])?;
    anyhow::ensure!(
        kind.contains("statically linked") || kind.contains("static-pie linked"),
        "the hub built for {MUSL_TARGET} is not static: file says {}",
        kind.trim()
    );
    let printed = output(path(to)?, &["--version"])?;
    anyhow::ensure!(
        printed.trim() == format!("hub {version}"),
        "the hub binary says {:?} to --version, not \"hub {version}\"",
        printed.trim()
    );
    println!("{}: {}", to.display(), kind.trim());
    Ok(())
}

/// `program args…` run in `dir` rather than the workspace root.
fn in_dir(dir: &Path, program: &str, args: &[&str]) -> Command {
    let mut command = command(program, args);
    command.current_dir(dir);
    command
}

/// Checks every artifact against `SHA256SUMS`, as someone who downloaded them would.
pub fn verify_sums(dir: &Path) -> anyhow::Result<()> {
    let args = ["--check", "--strict", SUMS];
    step_with(in_dir(dir, "sha256sum", &args), "sha256sum", &args)
        .with_context(|| format!("in {}", dir.display()))
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("the target directory's path is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::same_version;

    #[test]
    fn a_release_whose_package_and_hub_versions_differ_names_both() {
        assert_eq!(same_version("0.2.0".into(), "0.2.0").unwrap(), "0.2.0");
        let error = same_version("0.2.0".into(), "0.1.9").unwrap_err().to_string();
        assert!(
            error.contains("package is version 0.2.0 (pkg/package.json) but the hub is 0.1.9"),
            "{error}"
        );
    }
}
