//! `cargo xtask build-pkg`: the npm package `unified-balance` in `pkg/`. Builds the client
//! for wasm32 with the size profile, generates the ES module glue with the pinned
//! wasm-bindgen, shrinks the wasm with the package's pinned binaryen (`wasm-opt -Oz`) and
//! shortens the names it shares with the glue, bundles and minifies the glue with the
//! package's pinned esbuild, bundles the plain-script build (one global, `UnifiedBalance`, for
//! a classic `<script src>`) from `pkg/global-entry.mjs`, and prints the sizes. Writes only the
//! generated files `.gitignore` keeps out of git.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use crate::prereq::WASM_TARGET;
use crate::process::{command, root, step, step_with, target_dir};

/// The package's budget, wasm and JS glue gzipped together, for each of its two builds (the
/// module and the plain script): `cargo xtask test` fails above it, and `cargo xtask bench`
/// reports against it.
pub const MAX_BYTES: u64 = 40_000;

/// The generated files, named after the package.
const OUT_NAME: &str = "unified_balance";

/// What a page downloads, gzipped: the wasm with the JS of one build or the other.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// The wasm and the ES module glue (`unified_balance.js`), for imports and bundlers.
    pub module: u64,
    /// The wasm and the plain script (`unified_balance.global.js`), for `<script src>`.
    pub script: u64,
}
/// Features Rust's wasm output uses that binaryen must be told about.
const WASM_FEATURES: &[&str] = &[
    "--enable-bulk-memory",
    "--enable-reference-types",
    "--enable-multivalue",
    "--enable-nontrapping-float-to-int",
    "--enable-sign-ext",
];

/// Builds the package; returns the gzipped size of its wasm with each build's JS.
pub fn run() -> anyhow::Result<Sizes> {
    let args = ["build", "-p", "client-wasm", "--target", WASM_TARGET, "--profile", "wasm-release"];
    let mut build = command("cargo", &args);
    // Source paths end up in the wasm (panic locations): name them relative to the workspace
    // and the registry, so the package neither leaks this machine's paths nor changes size
    // with where the workspace was cloned.
    let mut flags = format!("--remap-path-prefix={}=/unified-sync", root().display());
    if let Some(home) = std::env::var_os("CARGO_HOME").or_else(|| {
        std::env::var_os("HOME").map(|h| {
            let mut cargo = std::path::PathBuf::from(h);
            cargo.push(".cargo");
            cargo.into_os_string()
        })
    }) {
        flags.push_str(&format!("\x1f--remap-path-prefix={}=/cargo", std::path::Path::new(&home).display()));
    }
    build.env("CARGO_ENCODED_RUSTFLAGS", flags);
    step_with(build, "cargo", &args)?;
    let wasm = target_dir().join(WASM_TARGET).join("wasm-release").join("client_wasm.wasm");
    let pkg = root().join("pkg");
    let wasm_arg = wasm.to_str().context("the target dir is not UTF-8")?;
    let pkg_arg = pkg.to_str().context("the workspace path is not UTF-8")?;
    // A browser that runs this wasm (built with reference types, on in Rust's wasm32 output
    // since 1.82: Chrome 96, Firefox 79, Safari 15) has `TextEncoder.encodeInto` (Chrome 74,
    // Firefox 66, Safari 14.1): the glue needs no fallback for it.
    let bindgen = [
        "--target",
        "web",
        "--encode-into",
        "always",
        "--out-dir",
        pkg_arg,
        "--out-name",
        OUT_NAME,
        wasm_arg,
    ];
    step("wasm-bindgen", &bindgen)?;
    if !["esbuild", "wasm-opt"].iter().all(|tool| pkg.join("node_modules/.bin").join(tool).exists()) {
        step("npm", &["ci", "--prefix", "pkg", "--no-audit", "--no-fund"])?;
    }
    let built = pkg.join(format!("{OUT_NAME}_bg.wasm"));
    shrink(&built, &pkg)?;
    // Bundling inlines the shell's JavaScript snippets, so the package stays one module.
    step("npm", &["run", "--silent", "--prefix", "pkg", "minify"])?;
    // The plain script bundles that module into one IIFE. Its entry passes the wasm's URL to
    // the module's init, whose `import.meta.url` default (empty in a script) is never used.
    step("npm", &["run", "--silent", "--prefix", "pkg", "global"])?;
    let snippets = pkg.join("snippets");
    if snippets.exists() {
        std::fs::remove_dir_all(&snippets)
            .with_context(|| format!("cannot remove {}", snippets.display()))?;
    }
    let wasm_size = sizes(&built)?;
    let measured = Sizes {
        module: wasm_size + sizes(&pkg.join(format!("{OUT_NAME}.js")))?,
        script: wasm_size + sizes(&pkg.join(format!("{OUT_NAME}.global.js")))?,
    };
    for (name, bytes) in [("module", measured.module), ("script", measured.script)] {
        println!(
            "==> unified-balance, {name} build: wasm + JS = {bytes} bytes gzipped ({:.1} KiB; at most {MAX_BYTES} bytes)",
            bytes as f64 / 1024.0
        );
    }
    Ok(measured)
}

/// Shrinks the wasm with the package's binaryen (npm's build of it, pinned like esbuild, so
/// that the package's size does not depend on the machine's; release 132 makes it 558 bytes
/// gzipped smaller than Debian 12's 108): `wasm-opt -Oz` twice (the second pass still cuts
/// 146 bytes gzipped), then its imports and exports are given names of a letter or two, and
/// its imports' module the name `a`, and they are renamed alike in the glue and the types.
/// wasm-bindgen names an import after its function and a hash
/// (`__wbg_readDelta_5ee0fae881e2cc41`), and the wasm and the glue each spell every name out:
/// about 2 KB of the package, gzipped.
fn shrink(wasm: &Path, pkg: &Path) -> anyhow::Result<()> {
    let wasm_arg = wasm.to_str().context("the package path is not UTF-8")?;
    let wasm_opt = pkg.join("node_modules/.bin/wasm-opt");
    let wasm_opt = wasm_opt.to_str().context("the workspace path is not UTF-8")?;
    // `--low-memory-unused` lets binaryen fold a pointer's added constant (under 1 KiB) into
    // the load's or store's offset, which differs from the add only where the address wraps
    // past 4 GiB into the first KiB; Rust never computes such an address (the stack grows down
    // from 1 MiB to 0, the data lies above it). 278 bytes gzipped.
    let mut args = vec!["-Oz", "-Oz", "--low-memory-unused", "--minify-imports-and-exports-and-modules"];
    args.extend_from_slice(WASM_FEATURES);
    args.extend_from_slice(&[wasm_arg, "-o", wasm_arg]);
    println!("==> {}", crate::process::shown(wasm_opt, &args));
    let printed = crate::process::output(wasm_opt, &args)?;
    let renames = renames(&printed)?;
    let glue = pkg.join(format!("{OUT_NAME}.js"));
    let module = format!("\"./{OUT_NAME}_bg.js\": import0,");
    rewrite(&glue, |text| {
        anyhow::ensure!(
            text.matches(&module).count() == 1 && !text.contains("import1"),
            "the glue does not import from the one module {module}"
        );
        rename_in_glue(&text.replacen(&module, "\"a\": import0,", 1), &renames)
    })?;
    for types in [format!("{OUT_NAME}.d.ts"), format!("{OUT_NAME}_bg.wasm.d.ts")] {
        rewrite(&pkg.join(types), |text| rename_in_types(text, &renames))?;
    }
    Ok(())
}

/// The names wasm-opt gave, as it prints them: `old => new` one a line (binaryen up to 116 or
/// so), or JSON (`{"imports": [[module, old, new], …], "exports": [[old, new], …]}`).
fn renames(printed: &str) -> anyhow::Result<Vec<(String, String)>> {
    let renames: Vec<(String, String)> = if printed.trim_start().starts_with('{') {
        let json: serde_json::Value =
            serde_json::from_str(printed).context("wasm-opt printed JSON that does not parse")?;
        let pair = |names: &[serde_json::Value]| match names {
            [.., old, new] => Some((old.as_str()?.to_owned(), new.as_str()?.to_owned())),
            _ => None,
        };
        ["imports", "exports"]
            .iter()
            .filter_map(|side| json[side].as_array())
            .flatten()
            .filter_map(|names| pair(names.as_array()?))
            .collect()
    } else {
        printed
            .lines()
            .filter_map(|line| line.split_once(" => "))
            .map(|(old, new)| (old.trim().to_owned(), new.trim().to_owned()))
            .collect()
    };
    anyhow::ensure!(!renames.is_empty(), "wasm-opt printed no renamed import or export");
    Ok(renames)
}

fn rewrite(path: &Path, change: impl FnOnce(&str) -> anyhow::Result<String>) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let changed = change(&text)
        .with_context(|| format!("cannot rename the wasm's imports and exports in {}", path.display()))?;
    std::fs::write(path, changed).with_context(|| format!("cannot write {}", path.display()))
}

/// The glue with each import's key (`name: function…`) and each use of an export
/// (`wasm.name`) renamed; a function of the glue's own may share an export's name
/// (`__wasm_bindgen_func_elem_…`) and keeps it. Fails on an export read another way (a
/// property or a string), which a new shape of wasm-bindgen's glue would need looked at.
fn rename_in_glue(glue: &str, renames: &[(String, String)]) -> anyhow::Result<String> {
    rename_identifiers(glue, renames, |before, after| {
        if before.ends_with("wasm.") || after.starts_with(':') {
            Some(true)
        } else if before.ends_with(['.', '"', '\'', '`', '[']) {
            None
        } else {
            Some(false)
        }
    })
}

/// The types with each export (`export const name:`, `readonly name:` of `InitOutput`)
/// renamed.
fn rename_in_types(types: &str, renames: &[(String, String)]) -> anyhow::Result<String> {
    rename_identifiers(types, renames, |before, after| {
        ((before.ends_with("export const ") || before.ends_with("readonly ")) && after.starts_with(':'))
            .then_some(true)
    })
}

/// Renames the whole identifiers of `text` that `renames` names where `rename` says so
/// (given the text before and after one): `Some(true)` renames it, `Some(false)` keeps it,
/// `None` fails.
fn rename_identifiers(
    text: &str,
    renames: &[(String, String)],
    rename: impl Fn(&str, &str) -> Option<bool>,
) -> anyhow::Result<String> {
    let is_part = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '$';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(is_part) {
        let end = rest[start..].find(|c: char| !is_part(c)).map_or(rest.len(), |n| start + n);
        let word = &rest[start..end];
        out.push_str(&rest[..start]);
        let before = &text[..text.len() - rest.len() + start];
        match renames.iter().find(|(old, _)| *old == word) {
            Some((old, new)) => match rename(before, &rest[end..]) {
                Some(true) => out.push_str(new),
                Some(false) => out.push_str(old),
                None => anyhow::bail!("`{old}` is used where it was not expected"),
            },
            None => out.push_str(word),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Fails when either build of the package (gzipped, as [`run`] returns them) is over its
/// budget.
pub fn check_size(sizes: Sizes) -> anyhow::Result<()> {
    for (name, bytes) in [("module", sizes.module), ("plain-script", sizes.script)] {
        anyhow::ensure!(
            bytes <= MAX_BYTES,
            "the package's {name} build is {bytes} bytes gzipped, over its budget of {MAX_BYTES}: see docs/performance.md for where its bytes go"
        );
    }
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

/// The files `npm pack` puts in the package: exactly the module, the plain script, their
/// types, the wasm and the README, nothing generated by accident or left over (the plain
/// script's entry `global-entry.mjs` stays out).
pub fn check_contents() -> anyhow::Result<()> {
    let listing =
        crate::process::output("npm", &["pack", "--dry-run", "--json", "--prefix", "pkg", "./pkg"])?;
    let mut files: Vec<&str> = listing
        .lines()
        .filter_map(|line| line.trim().strip_prefix("\"path\": \""))
        .map(|rest| rest.trim_end_matches(['"', ',']))
        .collect();
    files.sort_unstable();
    let expected = [
        "README.md",
        "package.json",
        "unified_balance.d.ts",
        "unified_balance.global.js",
        "unified_balance.js",
        "unified_balance_bg.wasm",
        "unified_balance_bg.wasm.d.ts",
    ];
    anyhow::ensure!(files == expected, "npm pack would publish {files:?}, not {expected:?}");
    println!("npm pack: {}", files.join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_package_over_its_budget_fails_the_suite() {
        assert!(check_size(Sizes { module: MAX_BYTES, script: MAX_BYTES }).is_ok());
        let error = check_size(Sizes { module: MAX_BYTES + 1, script: MAX_BYTES }).unwrap_err().to_string();
        assert!(error.contains("module build is 40001 bytes gzipped, over its budget of 40000"), "{error}");
    }

    #[test]
    fn the_glue_and_the_types_use_the_names_wasm_opt_gave() {
        let renames =
            renames("__wbg_now_aa4c => A\nmemory => V\n__wasm_bindgen_func_elem_160 => ja\n").unwrap();
        let glue = "__wbg_now_aa4c: function() { return Date.now(); },\n\
                    const ret = makeMutClosure(arg0, __wasm_bindgen_func_elem_160);\n\
                    function __wasm_bindgen_func_elem_160(a) { wasm.__wasm_bindgen_func_elem_160(a); }\n\
                    new DataView(wasm.memory.buffer); // memory_grown";
        assert_eq!(
            rename_in_glue(glue, &renames).unwrap(),
            "A: function() { return Date.now(); },\n\
             const ret = makeMutClosure(arg0, __wasm_bindgen_func_elem_160);\n\
             function __wasm_bindgen_func_elem_160(a) { wasm.ja(a); }\n\
             new DataView(wasm.V.buffer); // memory_grown"
        );
        let types = "export const memory: WebAssembly.Memory;\n    readonly memory: WebAssembly.Memory;";
        assert_eq!(
            rename_in_types(types, &renames).unwrap(),
            "export const V: WebAssembly.Memory;\n    readonly V: WebAssembly.Memory;"
        );
    }

    #[test]
    fn newer_binaryen_prints_its_names_as_json() {
        let printed = r#"{
 "imports": [
  ["./unified_balance_bg.js", "__wbg_now_aa4c", "A"]
 ],
"exports": [
  ["memory", "V"]
 ]
}"#;
        let expected =
            [("__wbg_now_aa4c", "A"), ("memory", "V")].map(|(old, new)| (old.to_owned(), new.to_owned()));
        assert_eq!(renames(printed).unwrap(), expected);
    }

    #[test]
    fn an_export_the_glue_reads_another_way_fails_the_build() {
        let renames = renames("memory => V\n").unwrap();
        let error = rename_in_glue("new DataView(instance.exports.memory.buffer)", &renames).unwrap_err();
        assert!(error.to_string().contains("`memory` is used where it was not expected"), "{error}");
        assert!(rename_in_glue("wasm[\"memory\"]", &renames).is_err());
        assert!(rename_in_types("memory: number", &renames).is_err());
    }

    #[test]
    fn a_plain_script_over_the_budget_fails_the_suite_too() {
        let error = check_size(Sizes { module: MAX_BYTES, script: MAX_BYTES + 1 }).unwrap_err().to_string();
        assert!(error.contains("plain-script build is 40001 bytes gzipped, over its budget"), "{error}");
    }
}
