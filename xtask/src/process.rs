//! Running other programs from the workspace root: a step announces itself and fails
//! loudly; a probe answers quietly. Nothing here interprets what a program prints.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// The workspace root; every command runs there, so `rust-toolchain.toml` applies.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives inside the workspace")
}

/// Cargo's build output directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// `program args…` in the workspace root. `cargo` is the cargo that started xtask (so
/// `cargo +nightly xtask …` stays on nightly), found through `$CARGO`.
pub fn command(program: &str, args: &[&str]) -> Command {
    let resolved = match program {
        "cargo" => std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
        other => other.into(),
    };
    let mut command = Command::new(resolved);
    command.args(args).current_dir(root());
    command
}

/// The command as a person would type it, for `==>` lines and error messages.
pub fn shown(program: &str, args: &[&str]) -> String {
    std::iter::once(program).chain(args.iter().copied()).collect::<Vec<_>>().join(" ")
}

/// Prints `==> program args…`, runs it with the terminal attached, and fails unless it
/// exits successfully.
pub fn step(program: &str, args: &[&str]) -> anyhow::Result<()> {
    step_with(command(program, args), program, args)
}

/// [`step`] for a command the caller has prepared further (environment, …).
pub fn step_with(mut command: Command, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let line = shown(program, args);
    println!("==> {line}");
    let status = command.status().with_context(|| format!("cannot start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs a command quietly and returns what it printed; on failure, the error carries what
/// it printed on stderr.
pub fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let line = shown(program, args);
    let out = command(program, args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !out.status.success() {
        bail!("`{line}` failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr).trim_end());
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed something that is not UTF-8"))
}

/// Whether a command starts and exits successfully; its output is discarded.
pub fn succeeds(program: &str, args: &[&str]) -> bool {
    command(program, args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
