//! docs/codes.md lists every code there is, and only those: the codes the hub answers, read
//! out of the source of `hub` and `protocol`; the codes `SyncManager` throws and its status
//! reasons, read out of `sync-core` and `client-wasm`. Each way of writing a code in the
//! source is a pattern here that must keep finding codes, so that a pattern the source no
//! longer uses fails loudly instead of finding nothing. It reads files and starts nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const DOC: &str = "docs/codes.md";

/// Where the hub's codes are made, and the client's.
const HUB_SOURCES: &[&str] = &["hub/src", "protocol/src"];
const CLIENT_SOURCES: &[&str] = &["sync-core/src", "client-wasm/src"];

/// The tables of docs/codes.md, by the start of the heading above each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Table {
    /// The hub's refusals of a write, which reach a page's `refused` listeners.
    Refused,
    /// The hub's refusals of a token or a page: status reason `unauthorized`.
    Unauthorized,
    /// The hub's codes a page never sees as a refusal.
    Backend,
    /// What `SyncManager`'s methods throw.
    Thrown,
    /// `sync.statusReason`.
    Reasons,
}

const HEADINGS: &[(&str, Table)] = &[
    ("### Refused writes", Table::Refused),
    ("### Refused tokens and pages", Table::Unauthorized),
    ("### Seen only by a backend or curl", Table::Backend),
    ("### What `SyncManager`'s methods throw", Table::Thrown),
    ("### Status reasons", Table::Reasons),
];

/// Which tables a code of a kind belongs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// Answered by the hub: one of its three tables.
    Hub,
    /// A refusal the client makes itself and reports as `refused`.
    RefusedByClient,
    Thrown,
    Reason,
}

impl Kind {
    fn tables(self) -> &'static [Table] {
        match self {
            Kind::Hub => &[Table::Refused, Table::Unauthorized, Table::Backend],
            Kind::RefusedByClient => &[Table::Refused],
            Kind::Thrown => &[Table::Thrown],
            Kind::Reason => &[Table::Reasons],
        }
    }
}

/// How a code is written in the source.
#[derive(Debug, Clone, Copy)]
enum Find {
    /// The string literal that is the first argument of a call: `Refusal::invalid("code", …)`.
    /// A call whose first argument is not a literal passes on a code made elsewhere.
    Call { prefix: &'static str, status: Option<u16> },
    /// `ApiError::new(StatusCode::NAME, "code", …)`, with the status it names.
    ApiError,
    /// `code: "code"` in a struct literal (a `Refusal`, an `ErrorAnswer`).
    Field,
    /// Every literal right after `after` from `prefix` to the end of its statement: the
    /// branches of `let code = if … { "a" } else { "b" };` (after `{`).
    Statement { prefix: &'static str, after: char },
    /// Every literal in the body of `item` (a function or a module) after `within` in `file`.
    Body { file: &'static str, within: &'static str, item: &'static str, status: Option<u16> },
    /// The codes of the `Refusal`s made in the body of `item` after `within` in `file`.
    Refusals { file: &'static str, within: &'static str, item: &'static str },
}

struct Pattern {
    name: &'static str,
    find: Find,
    /// Where to look, for `Call`, `ApiError`, `Field` and `Statement`.
    sources: &'static [&'static str],
    kind: Kind,
}

const PATTERNS: &[Pattern] = &[
    Pattern {
        name: "Refusal::invalid",
        find: Find::Call { prefix: "Refusal::invalid(", status: Some(400) },
        sources: HUB_SOURCES,
        kind: Kind::Hub,
    },
    Pattern {
        name: "Refusal::forbidden",
        find: Find::Call { prefix: "Refusal::forbidden(", status: Some(403) },
        sources: HUB_SOURCES,
        kind: Kind::Hub,
    },
    Pattern { name: "ApiError::new", find: Find::ApiError, sources: HUB_SOURCES, kind: Kind::Hub },
    Pattern { name: "code: \"…\"", find: Find::Field, sources: HUB_SOURCES, kind: Kind::Hub },
    Pattern {
        name: "protocol's batch refusals (refuse(\"…\"))",
        find: Find::Call { prefix: "refuse(", status: Some(400) },
        sources: &["protocol/src/request.rs"],
        kind: Kind::Hub,
    },
    Pattern {
        name: "let code = if …",
        find: Find::Statement { prefix: "let code = if", after: '{' },
        sources: HUB_SOURCES,
        kind: Kind::Hub,
    },
    Pattern {
        name: "AuthError::code",
        // Every `AuthError` is answered 401 (see `auth_errors_are_answered_401`).
        find: Find::Body {
            file: "hub/src/auth.rs",
            within: "impl AuthError",
            item: "fn code(",
            status: Some(401),
        },
        sources: &[],
        kind: Kind::Hub,
    },
    Pattern {
        name: "Rejection::code",
        find: Find::Body {
            file: "hub/src/store/mod.rs",
            within: "impl Rejection",
            item: "fn code(",
            status: None,
        },
        sources: &[],
        kind: Kind::Hub,
    },
    Pattern {
        name: "Limits::check_amount",
        find: Find::Body {
            file: "protocol/src/validate.rs",
            within: "impl Limits",
            item: "fn check_amount(",
            status: Some(400),
        },
        sources: &[],
        kind: Kind::Hub,
    },
    Pattern {
        name: "protocol::wire::code",
        find: Find::Body { file: "protocol/src/wire.rs", within: "", item: "pub mod code", status: None },
        sources: &[],
        kind: Kind::Hub,
    },
    Pattern {
        name: "sync-core's Refusal::invalid",
        find: Find::Call { prefix: "Refusal::invalid(", status: None },
        sources: CLIENT_SOURCES,
        kind: Kind::Thrown,
    },
    Pattern {
        name: "SyncError::new",
        find: Find::Call { prefix: "SyncError::new(", status: None },
        sources: CLIENT_SOURCES,
        kind: Kind::Thrown,
    },
    Pattern {
        name: "the shell's JavaScript error(\"…\")",
        find: Find::Call { prefix: "error(", status: None },
        sources: &["client-wasm/src/shell.rs"],
        kind: Kind::Thrown,
    },
    Pattern {
        name: "UserId::parse, called by the client's options",
        find: Find::Refusals { file: "protocol/src/ids.rs", within: "impl UserId", item: "fn parse(" },
        sources: &[],
        kind: Kind::Thrown,
    },
    Pattern {
        name: "SiteId::parse, called by the client's options",
        find: Find::Refusals { file: "protocol/src/ids.rs", within: "impl SiteId", item: "fn parse(" },
        sources: &[],
        kind: Kind::Thrown,
    },
    Pattern {
        name: "Limits::check_amount, called by the client's applyDelta",
        find: Find::Body {
            file: "protocol/src/validate.rs",
            within: "impl Limits",
            item: "fn check_amount(",
            status: None,
        },
        sources: &[],
        kind: Kind::Thrown,
    },
    Pattern {
        name: "a refusal the engine makes itself",
        find: Find::Statement { prefix: "let refused = (", after: '(' },
        sources: &["sync-core/src"],
        kind: Kind::RefusedByClient,
    },
    Pattern {
        name: "Reason::code",
        find: Find::Body {
            file: "sync-core/src/lib.rs",
            within: "impl Reason",
            item: "fn code(",
            status: None,
        },
        sources: &[],
        kind: Kind::Reason,
    },
];

/// The calls through which the client throws a refusal `protocol` makes: each pattern above
/// that reads such a function stands for one of these, which the client must still make.
const CLIENT_CALLS: &[(&str, &str)] = &[
    ("client-wasm/src/options.rs", "protocol::UserId::parse("),
    ("client-wasm/src/options.rs", "protocol::SiteId::parse("),
    ("sync-core/src/engine/write.rs", ".check_amount("),
];

/// One code as the source makes it.
#[derive(Debug, Clone)]
struct Found {
    code: String,
    kind: Kind,
    /// The HTTP status it is answered with, where the pattern tells.
    status: Option<u16>,
    /// `file:line`, for the failure message.
    at: String,
}

/// A source file without its comment lines and its test module.
struct Source {
    path: String,
    text: String,
}

impl Source {
    fn read(path: &str) -> Source {
        let raw =
            std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut lines: Vec<&str> = Vec::new();
        let mut all = raw.lines().peekable();
        while let Some(line) = all.next() {
            let trimmed = line.trim_start();
            // Test modules close their files; their literals assert codes, they make none.
            if trimmed == "#[cfg(test)]"
                && all.peek().is_some_and(|next| next.trim_start().starts_with("mod tests"))
            {
                break;
            }
            // Comments keep their line, blank, so that lines are still counted right.
            lines.push(if trimmed.starts_with("//") { "" } else { line });
        }
        Source { path: path.to_owned(), text: lines.join("\n") }
    }

    fn line_of(&self, offset: usize) -> String {
        format!("{}:{}", self.path, self.text[..offset].lines().count().max(1))
    }
}

/// Every `.rs` file under `dir`, but the modules compiled for tests only (`#[cfg(test)] mod x;`).
fn rust_files(dir: &str) -> Vec<String> {
    let mut files = Vec::new();
    let mut stack = vec![PathBuf::from(ROOT).join(dir)];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path.strip_prefix(ROOT).unwrap().to_string_lossy().into_owned());
        }
    }
    let test_only: BTreeSet<String> = files
        .iter()
        .flat_map(|file| {
            let text = std::fs::read_to_string(Path::new(ROOT).join(file)).unwrap();
            let dir = Path::new(file).parent().unwrap().to_owned();
            let lines: Vec<String> = text.lines().map(|l| l.trim().to_owned()).collect();
            lines
                .windows(2)
                .filter(|pair| pair[0] == "#[cfg(test)]")
                .filter_map(|pair| pair[1].strip_prefix("mod ")?.strip_suffix(';').map(str::to_owned))
                .map(|module| dir.join(format!("{module}.rs")).to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    files.retain(|file| !test_only.contains(file));
    files.sort();
    files
}

/// The string literal at the start of `text` (after whitespace), and where it ends.
fn literal(text: &str) -> Option<(String, usize)> {
    let start = text.len() - text.trim_start().len();
    let rest = text[start..].strip_prefix('"')?;
    let end = rest.find('"')?;
    Some((rest[..end].to_owned(), start + 1 + end + 1))
}

/// Every string literal in `text`.
fn literals(text: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(open) = text[from..].find('"') {
        let start = from + open;
        let Some((value, len)) = literal(&text[start..]) else { break };
        found.push((value, start));
        from = start + len;
    }
    found
}

/// Where `prefix` starts a call or a field of its own (not the end of a longer name, nor a
/// method: `console.error(` is no `error(`).
fn occurrences<'a>(text: &'a str, prefix: &'a str) -> impl Iterator<Item = usize> + 'a {
    text.match_indices(prefix)
        .map(|(at, _)| at)
        .filter(move |&at| !text[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.'))
}

/// The body (`{…}`) of the first `item` after `within` in `source`, and where it starts.
fn body<'a>(source: &'a Source, within: &str, item: &str) -> (&'a str, usize) {
    let text = &source.text;
    let after = text.find(within).unwrap_or_else(|| panic!("{}: no {within:?}", source.path));
    let start = after
        + text[after..].find(item).unwrap_or_else(|| panic!("{}: no {item:?} after {within:?}", source.path));
    let open = start + text[start..].find('{').unwrap();
    let mut depth = 0;
    for (i, c) in text[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if depth == 0 {
            return (&text[open..=open + i], open);
        }
    }
    panic!("{}: the body of {item:?} does not close", source.path)
}

/// The code protocol's `wire::code::NAME` stands for.
fn wire_code(sources: &BTreeMap<String, Source>, name: &str) -> String {
    let (module, _) = body(&sources["protocol/src/wire.rs"], "", "pub mod code");
    let declaration = format!("pub const {name}: &str =");
    let at = module.find(&declaration).unwrap_or_else(|| panic!("protocol/src/wire.rs: no code::{name}"));
    literal(&module[at + declaration.len()..]).unwrap_or_else(|| panic!("code::{name} is no literal")).0
}

fn status_named(name: &str) -> u16 {
    match name {
        "BAD_REQUEST" => 400,
        "UNAUTHORIZED" => 401,
        "FORBIDDEN" => 403,
        "NOT_FOUND" => 404,
        "METHOD_NOT_ALLOWED" => 405,
        "REQUEST_TIMEOUT" => 408,
        "CONFLICT" => 409,
        "GONE" => 410,
        "PAYLOAD_TOO_LARGE" => 413,
        "UNSUPPORTED_MEDIA_TYPE" => 415,
        "UNPROCESSABLE_ENTITY" => 422,
        "TOO_MANY_REQUESTS" => 429,
        "INTERNAL_SERVER_ERROR" => 500,
        "SERVICE_UNAVAILABLE" => 503,
        other => panic!("ApiError::new with StatusCode::{other}: add its number to status_named"),
    }
}

/// The codes one pattern finds.
fn find(pattern: &Pattern, sources: &BTreeMap<String, Source>) -> Vec<Found> {
    let found = |code: String, status, source: &Source, at| Found {
        code,
        kind: pattern.kind,
        status,
        at: source.line_of(at),
    };
    let mut codes = Vec::new();
    match pattern.find {
        Find::Body { file, within, item, status } => {
            let source = &sources[file];
            let (text, start) = body(source, within, item);
            for (code, at) in literals(text) {
                codes.push(found(code, status, source, start + at));
            }
            // A code named by its constant in protocol's `wire::code`.
            for (at, _) in text.match_indices("code::") {
                let name: String =
                    text[at + 6..].chars().take_while(|c| c.is_ascii_uppercase() || *c == '_').collect();
                if !name.is_empty() {
                    codes.push(found(wire_code(sources, &name), status, source, start + at));
                }
            }
            return codes;
        }
        Find::Refusals { file, within, item } => {
            let source = &sources[file];
            let (text, start) = body(source, within, item);
            for prefix in ["Refusal::invalid(", "Refusal::forbidden("] {
                for at in occurrences(text, prefix) {
                    if let Some((code, _)) = literal(&text[at + prefix.len()..]) {
                        codes.push(found(code, None, source, start + at));
                    }
                }
            }
            return codes;
        }
        _ => {}
    }
    for source in sources.values().filter(|s| pattern.sources.iter().any(|dir| s.path.starts_with(dir))) {
        let text = source.text.as_str();
        match pattern.find {
            Find::Call { prefix, status } => {
                for at in occurrences(text, prefix) {
                    if let Some((code, _)) = literal(&text[at + prefix.len()..]) {
                        codes.push(found(code, status, source, at));
                    }
                }
            }
            Find::ApiError => {
                for at in occurrences(text, "ApiError::new(") {
                    let args = &text[at + "ApiError::new(".len()..];
                    let (first, rest) = args.split_once(',').unwrap();
                    if let Some((code, _)) = literal(rest) {
                        let name = first.trim().strip_prefix("StatusCode::").unwrap_or_else(|| {
                            panic!(
                                "{}: ApiError::new with a literal code and no StatusCode",
                                source.line_of(at)
                            )
                        });
                        codes.push(found(code, Some(status_named(name)), source, at));
                    }
                }
            }
            Find::Field => {
                for at in occurrences(text, "code: \"") {
                    if let Some((code, _)) = literal(&text[at + "code: ".len()..]) {
                        codes.push(found(code, None, source, at));
                    }
                }
            }
            Find::Statement { prefix, after } => {
                for at in occurrences(text, prefix) {
                    let statement = &text[at..at + text[at..].find(';').unwrap()];
                    for (code, offset) in literals(statement) {
                        if statement[..offset].trim_end().ends_with(after) {
                            codes.push(found(code, None, source, at + offset));
                        }
                    }
                }
            }
            Find::Body { .. } | Find::Refusals { .. } => unreachable!("read above"),
        }
    }
    codes
}

fn is_code(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The codes the source makes, by pattern; fails if a pattern finds none, or finds a literal
/// that is no code.
fn source_codes() -> Vec<Found> {
    let sources: BTreeMap<String, Source> = HUB_SOURCES
        .iter()
        .chain(CLIENT_SOURCES)
        .flat_map(|dir| rust_files(dir))
        .map(|path| (path.clone(), Source::read(&path)))
        .collect();
    let mut all = Vec::new();
    for pattern in PATTERNS {
        let found = find(pattern, &sources);
        assert!(
            !found.is_empty(),
            "the pattern {} finds no code any more: update it to the source",
            pattern.name
        );
        for f in &found {
            assert!(
                is_code(&f.code),
                "{}: {:?}, found by {}, is not a snake_case code",
                f.at,
                f.code,
                pattern.name
            );
        }
        all.extend(found);
    }
    for (file, call) in CLIENT_CALLS {
        assert!(
            sources[*file].text.contains(call),
            "{file} no longer calls {call}: update CLIENT_CALLS and PATTERNS"
        );
    }
    all
}

/// Where the source makes one code, and the statuses it answers it with.
#[derive(Default)]
struct Made<'a> {
    at: Vec<&'a str>,
    statuses: BTreeSet<u16>,
}

/// One row of docs/codes.md: its code, its table, its second cell (the HTTP status of the
/// hub's codes) and its line.
#[derive(Debug)]
struct Row {
    code: String,
    table: Table,
    second: String,
    line: usize,
}

fn doc_rows() -> Vec<Row> {
    let doc = std::fs::read_to_string(Path::new(ROOT).join(DOC)).unwrap();
    let mut table = None;
    let mut seen = BTreeSet::new();
    let mut rows = Vec::new();
    for (i, line) in doc.lines().enumerate() {
        if line.starts_with('#') {
            table = HEADINGS.iter().find(|(start, _)| line.starts_with(start)).map(|(_, t)| *t);
            seen.extend(table);
            continue;
        }
        let Some(row) = line.strip_prefix("| `") else { continue };
        let table =
            table.unwrap_or_else(|| panic!("{DOC}:{}: a row under no heading this test knows", i + 1));
        let cells: Vec<&str> = row.split(" | ").collect();
        let code = cells[0]
            .strip_suffix('`')
            .unwrap_or_else(|| panic!("{DOC}:{}: the first cell is not one `code`", i + 1));
        assert!(is_code(code), "{DOC}:{}: {code:?} is no code", i + 1);
        rows.push(Row { code: code.to_owned(), table, second: cells[1].to_owned(), line: i + 1 });
    }
    for (heading, table) in HEADINGS {
        assert!(seen.contains(table), "{DOC} has no heading starting {heading:?}");
    }
    rows
}

/// The statuses a row's second cell names.
fn statuses(cell: &str) -> Vec<u16> {
    cell.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect()
}

#[test]
fn every_code_is_in_docs_codes_md_and_no_other() {
    let found = source_codes();
    let rows = doc_rows();
    let mut problems = Vec::new();

    // Each code once, with every place that makes it and the statuses it is answered with.
    let mut made: BTreeMap<(&str, Kind), Made> = BTreeMap::new();
    for f in &found {
        let entry = made.entry((f.code.as_str(), f.kind)).or_default();
        entry.at.push(&f.at);
        entry.statuses.extend(f.status);
    }
    for ((code, kind), Made { at, statuses: answered }) in &made {
        let tables = kind.tables();
        let in_table: Vec<&Row> =
            rows.iter().filter(|r| r.code == *code && tables.contains(&r.table)).collect();
        match in_table.as_slice() {
            [] => problems
                .push(format!("`{code}` ({}) is in none of the tables {tables:?} of {DOC}", at.join(", "))),
            [row] => {
                let listed = statuses(&row.second);
                for status in answered.iter().filter(|s| !listed.contains(s)) {
                    problems.push(format!(
                        "{DOC}:{}: `{code}` is answered {status} ({}), not {}",
                        row.line,
                        at.join(", "),
                        row.second
                    ));
                }
            }
            more => problems.push(format!(
                "`{code}` is listed {} times: lines {:?}",
                more.len(),
                more.iter().map(|r| r.line).collect::<Vec<_>>()
            )),
        }
    }
    for row in &rows {
        let made = found.iter().any(|f| f.code == row.code && f.kind.tables().contains(&row.table));
        if !made {
            problems.push(format!(
                "{DOC}:{}: `{}` is listed under {:?}, but the source no longer makes it there",
                row.line, row.code, row.table
            ));
        }
    }
    assert!(problems.is_empty(), "{DOC} and the source disagree:\n  - {}", problems.join("\n  - "));
}

/// The client settles a write by the hub's answer: a 401 renews the token, a 408, 429 or 5xx is
/// sent again, and any other refusal is final, reported as `refused`. The hub's tables follow
/// that rule.
#[test]
fn each_hub_code_is_in_the_table_of_what_the_client_does_with_it() {
    let mut problems = Vec::new();
    for row in doc_rows() {
        let statuses = statuses(&row.second);
        let allowed = |s: &u16| match row.table {
            Table::Refused => (400..500).contains(s) && ![401, 408, 429].contains(s),
            Table::Unauthorized => [401, 403].contains(s),
            Table::Backend => *s != 401,
            Table::Thrown | Table::Reasons => true,
        };
        if matches!(row.table, Table::Refused | Table::Unauthorized | Table::Backend) && statuses.is_empty() {
            problems.push(format!("{DOC}:{}: `{}` names no HTTP status", row.line, row.code));
        }
        if let Some(s) = statuses.iter().find(|s| !allowed(s)) {
            problems.push(format!(
                "{DOC}:{}: `{}`, answered {s}, does not belong under {:?}",
                row.line, row.code, row.table
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn auth_errors_are_answered_401() {
    let error = Source::read("hub/src/http/error.rs");
    assert!(
        error.text.contains("ApiError::new(StatusCode::UNAUTHORIZED, e.code(), e.to_string())"),
        "hub/src/http/error.rs no longer answers every AuthError 401: update the AuthError::code pattern"
    );
}

/// The package's README carries a short copy of every code a page meets (all but the
/// backend's): it names each of them in its `## Codes` section.
#[test]
fn the_package_readme_names_every_code_a_page_meets() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("pkg/README.md")).unwrap();
    let section = readme.split_once("\n## Codes\n").expect("pkg/README.md has a `## Codes` section").1;
    let section = section.split("\n## ").next().unwrap();
    let missing: Vec<String> = doc_rows()
        .into_iter()
        .filter(|row| row.table != Table::Backend && !section.contains(&format!("`{}`", row.code)))
        .map(|row| format!("`{}` ({DOC}:{})", row.code, row.line))
        .collect();
    assert!(missing.is_empty(), "pkg/README.md's Codes section does not name {}", missing.join(", "));
}
