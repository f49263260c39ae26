//! `cargo xtask build-pkg`: the npm package `unified-balance` in `pkg/`. Builds the client
//! for wasm32 with the size profile, generates the ES module glue with the pinned
//! wasm-bindgen, shrinks the wasm with `wasm-opt -Oz` where binaryen is installed, and
//! prints the sizes. Writes only the generated files `.gitignore` keeps out of git.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use crate::prereq::WASM_TARGET;
use crate::process::{root, step, succeeds, target_dir};

/// The generated files, named after the package.
const OUT_NAME: &str = "unified_balance";
/// Features Rust's wasm output uses that binaryen must be told about.
const WASM_FEATURES: &[&str] = &[
    "--enable-bulk-memory",
    "--enable-reference-types",
    "--enable-multivalue",
    "--enable-nontrapping-float-to-int",
    "--enable-sign-ext",
];

pub fn run() -> anyhow::Result<()> {
    step("cargo", &["build", "-p", "client-wasm", "--target", WASM_TARGET, "--profile", "wasm-release"])?;
    let wasm = target_dir().join(WASM_TARGET).join("wasm-release").join("client_wasm.wasm");
    let pkg = root().join("pkg");
    let wasm_arg = wasm.to_str().context("the target dir is not UTF-8")?;
    let pkg_arg = pkg.to_str().context("the workspace path is not UTF-8")?;
    step("wasm-bindgen", &["--target", "web", "--out-dir", pkg_arg, "--out-name", OUT_NAME, wasm_arg])?;
    let built = pkg.join(format!("{OUT_NAME}_bg.wasm"));
    if succeeds("wasm-opt", &["--version"]) {
        let built_arg = built.to_str().context("the package path is not UTF-8")?;
        let mut args = vec!["-Oz"];
        args.extend_from_slice(WASM_FEATURES);
        args.extend_from_slice(&[built_arg, "-o", built_arg]);
        step("wasm-opt", &args)?;
    } else {
        println!("wasm-opt (Debian package binaryen) is not installed: the wasm is not shrunk further");
    }
    let wasm_size = sizes(&built)?;
    let js_size = sizes(&pkg.join(format!("{OUT_NAME}.js")))?;
    println!(
        "==> unified-balance: wasm + JS glue = {} bytes gzipped ({:.1} KiB; the target is at most 40 KB)",
        wasm_size + js_size,
        (wasm_size + js_size) as f64 / 1024.0
    );
    Ok(())
}

/// Prints a file's raw and gzipped size and returns the gzipped one.
fn sizes(path: &Path) -> anyhow::Result<u64> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(&bytes)?;
    let gzipped = encoder.finish()?.len() as u64;
    println!(
        "    {:<28} {:>8} bytes, {:>7} gzipped",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
        bytes.len(),
        gzipped
    );
    Ok(gzipped)
}
