//! Architecture invariants that a machine can check, as ARCHITECTURE.md states them: which
//! crates a crate must not depend on (read from `cargo tree`), which names a layer's source
//! must not mention, which way the hub's modules import each other, which files must
//! never be tracked (read from `git ls-files`), and that every relative link of the tracked
//! Markdown files leads to a file, and to a heading of it where it names one.
//! Reports every violation, not just the first. Compiles nothing.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::process::{output, root, shown};

/// Crates that must stay free of runtime, server, storage and browser dependencies, so they
/// build for wasm32 and can be tested without I/O.
const FORBIDDEN_DEPENDENCIES: &[(&str, &[&str])] = &[
    ("protocol", &["tokio", "hyper", "axum", "rusqlite", "web-sys"]),
    // The engine is sans-IO: no runtime, no browser, no clock source of its own.
    ("sync-core", &["tokio", "hyper", "axum", "rusqlite", "web-sys", "js-sys", "wasm-bindgen"]),
    // `hub agent` is a client of the public API (sync and change feed): it cannot name the
    // hub's domain or store.
    ("hub-agent", &["hub", "rusqlite"]),
    // xtask runs the workspace's programs and compiles none of them, so that `cargo xtask`
    // answers before the server would have built.
    ("xtask", &["hub", "hub-agent", "demo-sites", "sync-core", "rusqlite", "axum"]),
];

/// Layers of the hub that must not name what lies outside them. `cargo tree` cannot see
/// inside one crate, so these are read from the source: a file or every `.rs` file below a
/// directory, and the words it must not contain.
const FORBIDDEN_NAMES: &[(&str, &[&str])] = &[
    // The store knows nothing of HTTP.
    ("hub/src/store", &["axum", "hyper", "http::", "crate::http"]),
    // The domain knows nothing of HTTP, and sees storage only through `Arc<dyn Store>`.
    ("hub/src/domain.rs", &["axum", "hyper", "http::", "crate::http", "rusqlite", "sqlite::", "SqliteStore"]),
    // The write rules are one for every backend: no backend's types or ideas in them.
    ("hub/src/store/rules.rs", &["rusqlite", "postgres", "sqlite", "WAL", "checkpoint", "savepoint"]),
    // The trait speaks of no backend's types or ideas; only `open` names the backends it chooses.
    ("hub/src/store/mod.rs", &["rusqlite", "tokio_postgres", "WAL", "checkpoint", "savepoint", "fsync"]),
    // The engine reads no clock: time comes in as `now`.
    ("sync-core/src", &["Instant::now", "SystemTime"]),
];

/// Where a request's client could be read from other than `ClientAddr`: in `hub/src/http`,
/// only `client.rs` names them, which believes forwarding headers from trusted proxies alone.
const CLIENT_SOURCES: &[&str] = &["ConnectInfo", "x-forwarded", "x-real-ip", "FORWARDED"];
const CLIENT_RS: &str = "hub/src/http/client.rs:";

/// The hub's modules, outermost first: a module imports (`crate::…`) only modules of a later
/// rank, so that requests travel one way, `server` → `http` → `domain` → `store`, with what
/// several layers need below them all.
const HUB_LAYERS: &[&[&str]] = &[
    &["service"],
    &["server"],
    &["http"],
    &["check"],
    &["auth", "limit", "metrics", "tls", "import", "events", "webhooks"],
    &["domain"],
    &["store"],
    &["config", "time", "bounded"],
];

pub fn run() -> anyhow::Result<()> {
    let mut problems = Vec::new();
    problems.extend(hub_imports_upward()?);
    for (krate, forbidden) in FORBIDDEN_DEPENDENCIES {
        problems.extend(forbidden_dependencies(krate, forbidden)?);
    }
    for (path, forbidden) in FORBIDDEN_NAMES {
        problems.extend(forbidden_names(path, forbidden)?);
    }
    problems.extend(
        forbidden_names("hub/src/http", CLIENT_SOURCES)?.into_iter().filter(|p| !p.starts_with(CLIENT_RS)),
    );
    problems.extend(tracked_build_outputs()?);
    problems.extend(wasm_bindgen_pinned()?);
    problems.extend(broken_doc_links()?);
    if !problems.is_empty() {
        bail!("tidy found {} problem(s):\n  - {}", problems.len(), problems.join("\n  - "));
    }
    println!("tidy: ok");
    Ok(())
}

/// Every crate in `krate`'s normal dependency tree, on any target, that is in `forbidden`.
fn forbidden_dependencies(krate: &str, forbidden: &[&str]) -> anyhow::Result<Vec<String>> {
    let args = ["tree", "-p", krate, "-e", "normal", "--prefix", "none", "--target", "all"];
    let tree = output("cargo", &args)?;
    let mut found: Vec<&str> = tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| forbidden.contains(name))
        .collect();
    found.sort_unstable();
    found.dedup();
    Ok(found
        .into_iter()
        .map(|dep| format!("{krate} depends on {dep} (see `{}`)", shown("cargo", &args)))
        .collect())
}

/// Every line of the Rust source at `path` (relative to the workspace root) that names
/// one of `forbidden`.
fn forbidden_names(path: &str, forbidden: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut files = Vec::new();
    rust_files(&root().join(path), &mut files)
        .with_context(|| format!("cannot read {path}; if it moved, update FORBIDDEN_NAMES in xtask"))?;
    let mut problems = Vec::new();
    for file in files {
        let text =
            std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let shown = file.strip_prefix(root()).unwrap_or(&file).display();
        for (number, line) in text.lines().enumerate() {
            for name in forbidden.iter().filter(|name| line.contains(*name)) {
                problems
                    .push(format!("{shown}:{} names `{name}`, which this layer must not use", number + 1));
            }
        }
    }
    Ok(problems)
}

/// Every `crate::module` a hub module names that is not below it in [`HUB_LAYERS`].
fn hub_imports_upward() -> anyhow::Result<Vec<String>> {
    let rank = |module: &str| HUB_LAYERS.iter().position(|layer| layer.contains(&module));
    let src = root().join("hub/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files).context("cannot read hub/src")?;
    let mut problems = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap_or(&file);
        let Some(first) = relative.components().next().and_then(|c| c.as_os_str().to_str()) else { continue };
        let module = first.trim_end_matches(".rs");
        if matches!(module, "lib" | "main") {
            continue;
        }
        let Some(own) = rank(module) else {
            problems
                .push(format!("hub/src/{} is in no layer of HUB_LAYERS in xtask's tidy", relative.display()));
            continue;
        };
        let text =
            std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
        for (number, line) in text.lines().enumerate() {
            for named in crate_modules(line) {
                if named != module && rank(named).is_none_or(|theirs| theirs <= own) {
                    problems.push(format!(
                        "hub/src/{}:{} ({module}) imports crate::{named}, which is not below it",
                        relative.display(),
                        number + 1
                    ));
                }
            }
        }
    }
    Ok(problems)
}

/// The top-level modules a line names as `crate::module` or `crate::{module, …}`.
fn crate_modules(line: &str) -> Vec<&str> {
    let ident =
        |s: &str| -> usize { s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len()) };
    let mut found = Vec::new();
    for (at, _) in line.match_indices("crate::") {
        let rest = &line[at + "crate::".len()..];
        if let Some(list) = rest.strip_prefix('{') {
            let list = &list[..list.find('}').unwrap_or(list.len())];
            found.extend(
                list.split(',').map(str::trim).map(|item| &item[..ident(item)]).filter(|m| !m.is_empty()),
            );
        } else {
            let name = &rest[..ident(rest)];
            if !name.is_empty() && name.starts_with(|c: char| c.is_ascii_lowercase()) {
                found.push(name);
            }
        }
    }
    found
}

/// `path` itself if it is a file, or every `.rs` file below it.
fn rust_files(path: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if path.is_file() {
        files.push(path.to_owned());
        return Ok(());
    }
    for entry in std::fs::read_dir(path)? {
        let path = entry?.path();
        if path.is_dir() || path.extension().is_some_and(|e| e == "rs") {
            rust_files(&path, files)?;
        }
    }
    Ok(())
}

/// Tracked files that are build or run outputs: they belong in `.gitignore`, not in git.
fn tracked_build_outputs() -> anyhow::Result<Vec<String>> {
    let files = output("git", &["ls-files", "-z"])?;
    Ok(files
        .split('\0')
        .filter(|path| !path.is_empty() && is_build_output(path))
        .map(|path| format!("{path} is a build output but is tracked by git"))
        .collect())
}

/// Cargo's `target/`, npm's `node_modules/`, the demo hub's data (it holds development
/// keys), and what wasm-bindgen writes into `pkg/`.
fn is_build_output(path: &str) -> bool {
    let first = path.split('/').next().unwrap_or_default();
    let generated_in_pkg = path.strip_prefix("pkg/").is_some_and(|name| {
        !name.contains('/') && [".wasm", ".js", ".d.ts"].iter().any(|e| name.ends_with(e))
    });
    matches!(first, "target" | "hub-data")
        || path.split('/').any(|part| part == "node_modules")
        || generated_in_pkg
}

/// The `wasm-bindgen` crate in Cargo.lock must be the version of the CLI that generates the
/// package's glue, or the glue and the wasm disagree at run time.
fn wasm_bindgen_pinned() -> anyhow::Result<Vec<String>> {
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).context("cannot read Cargo.lock")?;
    let locked: Vec<&str> = lock
        .split("[[package]]")
        .filter(|entry| entry.contains("name = \"wasm-bindgen\"\n"))
        .filter_map(|entry| entry.lines().find_map(|l| l.strip_prefix("version = ")))
        .map(|v| v.trim_matches('"'))
        .collect();
    let wanted = crate::prereq::WASM_BINDGEN_VERSION;
    Ok(if locked == [wanted] {
        Vec::new()
    } else {
        vec![format!("Cargo.lock has wasm-bindgen {locked:?}, but the pinned CLI is {wanted}")]
    })
}

/// Every relative link of a tracked Markdown file (`[text](path)`, `[text](path#heading)`,
/// `[text](#heading)`) whose file or heading does not exist.
fn broken_doc_links() -> anyhow::Result<Vec<String>> {
    let files = output("git", &["ls-files", "-z", "*.md"])?;
    let mut problems = Vec::new();
    for file in files.split('\0').filter(|f| !f.is_empty()) {
        let path = root().join(file);
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let dir = path.parent().unwrap_or(Path::new(""));
        for target in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (linked, heading) = target.split_once('#').unwrap_or((target, ""));
            let linked_path = if linked.is_empty() { path.clone() } else { dir.join(linked) };
            if !linked_path.exists() {
                problems.push(format!("{file} links to {target}, which does not exist"));
                continue;
            }
            if heading.is_empty() || linked_path.is_dir() {
                continue;
            }
            let linked_text = std::fs::read_to_string(&linked_path).unwrap_or_default();
            if !headings(&linked_text).any(|h| slug(h) == heading) {
                problems.push(format!("{file} links to {target}, but it has no such heading"));
            }
        }
    }
    Ok(problems)
}

/// The lines of Markdown `text` outside fenced code blocks.
fn prose(text: &str) -> impl Iterator<Item = &str> {
    let mut fenced = false;
    text.lines().filter(move |line| {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            return false;
        }
        !fenced
    })
}

/// The targets of the links of Markdown `text` — inline links, without their title, and the
/// `href`s of HTML links — outside code blocks and code spans.
fn links(text: &str) -> Vec<&str> {
    let mut found = Vec::new();
    for line in prose(text) {
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 1 {
                continue;
            }
            for (open, close) in [("](", ')'), ("href=\"", '"')] {
                let mut rest = part;
                while let Some(at) = rest.find(open) {
                    let after = &rest[at + open.len()..];
                    let Some(end) = after.find(close) else { break };
                    let target = after[..end].trim();
                    found.push(target.split_once(" \"").map_or(target, |(path, _title)| path));
                    rest = &after[end..];
                }
            }
        }
    }
    found
}

/// The text of each ATX heading (`## 4. Integrating a site`) of Markdown `text`, outside
/// code blocks.
fn headings(text: &str) -> impl Iterator<Item = &str> {
    prose(text).filter_map(|line| {
        let rest = line.trim_start_matches('#');
        (rest.len() < line.len() && rest.starts_with(' ')).then(|| rest.trim().trim_end_matches('#').trim())
    })
}

/// The anchor GitHub gives a heading: lowercased, punctuation dropped but `-` and `_`,
/// spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{crate_modules, headings, is_build_output, links, slug};

    #[test]
    fn links_and_headings_are_read_as_github_renders_them() {
        let text = "See [the guide](docs/site-owner.md#4-the-token-and-grant-endpoint) and [x](#a).\n\
                    `[not](a link)` here\n```md\n[nor](this)\n```\n[web](https://example.org)";
        assert_eq!(
            links(text),
            ["docs/site-owner.md#4-the-token-and-grant-endpoint", "#a", "https://example.org"]
        );
        let titled = "[t](a.md \"A title\") and <a href=\"examples/x.php\">x</a>";
        assert_eq!(links(titled), ["a.md", "examples/x.php"]);
        let text = "# Top\n```sh\n# a comment, not a heading\n```\n## Closed ##";
        assert_eq!(headings(text).collect::<Vec<_>>(), ["Top", "Closed"]);
        assert_eq!(slug("4. The token and grant endpoint"), "4-the-token-and-grant-endpoint");
        assert_eq!(slug("`[limits]`"), "limits");
        assert_eq!(slug("Use it from a plain `<script>` tag"), "use-it-from-a-plain-script-tag");
    }

    #[test]
    fn crate_paths_name_their_top_level_modules() {
        assert_eq!(crate_modules("use crate::store::{Record, Stamp};"), ["store"]);
        assert_eq!(crate_modules("use crate::{config, domain::Caller};"), ["config", "domain"]);
        assert_eq!(crate_modules("if x == crate::config::IMPORT_SITE && crate::App::new()"), ["config"]);
        assert!(crate_modules("use super::App; // not crate-wide").is_empty());
    }

    #[test]
    fn build_outputs_are_recognized() {
        for path in [
            "target/debug/hub",
            "node_modules/x/index.js",
            "www/node_modules/a",
            "pkg/client_wasm_bg.wasm",
            "pkg/client_wasm.js",
            "pkg/client_wasm.d.ts",
            "pkg/unified_balance.global.js",
            "hub-data/dev-sites.toml",
        ] {
            assert!(is_build_output(path), "{path}");
        }
    }

    #[test]
    fn sources_are_not_build_outputs() {
        for path in [
            "pkg/package.json",
            "pkg/README.md",
            "pkg/global-entry.mjs",
            "www/app.js",
            "hub/src/target.rs",
            "xtask/src/tidy.rs",
        ] {
            assert!(!is_build_output(path), "{path}");
        }
    }
}
