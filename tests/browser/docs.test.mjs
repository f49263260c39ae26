// Every code block of the package's README and of the site-owner guide, run as written: the
// files are written where their blocks say, the shell blocks run in bash, the servers they
// start serve real pages to Chromium, and the pages sync with a real hub. A block the
// documents gain, lose or reorder fails here until this test follows it, so no example rots.
//
// A block's info string says what it is: `php file=my-site/login.php` (the whole file at that
// path), `sh run` (commands), `sh run background` (a server, kept running), `text layout`
// (files that must exist), `ini fpm-pool` and `apache apache-vhost` (a PHP-FPM pool's and an
// Apache VirtualHost's lines, run by real PHP-FPM behind nginx and real Apache with mod_php,
// from `servers.mjs`). Before anything runs, the hub's address, its id, the site's secret and
// the ports 8080 and 8081 become the test's own.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { chmodSync, closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, test } from "node:test";
import { chromium } from "playwright-core";
import { CHROMIUM_ARGS, HUB_ID, Hub, repoRoot, until } from "./harness.mjs";
import { apacheModPhp, freePort, phpFpm } from "./servers.mjs";

const pkgDir = join(repoRoot, "pkg");
const VERSION = JSON.parse(readFileSync(join(pkgDir, "package.json"), "utf8")).version;
/** The site the documents' examples speak for. */
const SITE = "roflfaucet";
const USER = "8-evans";

/** The fenced code blocks of `file`, in order, with the line each starts on. */
function codeBlocks(file) {
  const text = readFileSync(join(repoRoot, file), "utf8");
  const blocks = [];
  for (const match of text.matchAll(/^```([^\n`]*)\n([\s\S]*?)^```[ \t]*$/gm)) {
    const line = text.slice(0, match.index).split("\n").length;
    blocks.push({ where: `${file}:${line}`, info: match[1].trim(), body: match[2] });
  }
  return blocks;
}

/**
 * One document, run block by block in a temporary folder. `take(info)` hands out the next
 * block and fails unless it is the one the test expects; `finish()` fails if any is left.
 */
class DocumentRun {
  constructor(file, values) {
    this.document = file;
    this.blocks = codeBlocks(file);
    this.next = 0;
    this.values = values;
    this.root = mkdtempSync(join(tmpdir(), "unified-sync-docs-"));
    this.servers = [];
    this.logs = [];
  }

  /** `text` with the document's example values replaced by the test's. */
  substitute(text) {
    const { hubUrl, secret, ports } = this.values;
    return text
      .replaceAll("https://hub.example.org", hubUrl)
      .replaceAll("directsponsor-hub", HUB_ID)
      .replaceAll("paste-the-site-secret-here", secret)
      .replace(/\b8080\b/g, String(ports[0]))
      .replace(/\b8081\b/g, String(ports[1]));
  }

  take(info) {
    const block = this.blocks[this.next];
    assert.ok(block, `${this.document} has no block \`${info}\` after its ${this.next} blocks`);
    assert.equal(block.info, info, `${block.where}: the test expects a block \`${info}\` here`);
    this.next += 1;
    return block;
  }

  /** Writes the next block, `lang file=PATH`, to PATH; returns the block. */
  file(lang, path) {
    const block = this.take(`${lang} file=${path}`);
    const target = join(this.root, path);
    mkdirSync(dirname(target), { recursive: true });
    writeFileSync(target, this.substitute(block.body));
    return block;
  }

  /** Runs shell commands (the next `sh run` block, or `commands`) in bash; returns stdout. */
  async run(commands = this.substitute(this.take("sh run").body), where = this.blocks[this.next - 1].where) {
    const child = spawn("bash", ["-euo", "pipefail", "-c", commands], {
      cwd: this.root,
      env: npmQuiet(process.env),
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (chunk) => (stdout += chunk));
    child.stderr.on("data", (chunk) => (stderr += chunk));
    const [code] = await once(child, "exit");
    assert.equal(code, 0, `${where} failed (exit ${code}):\n${commands}\n--- stdout\n${stdout}\n--- stderr\n${stderr}`);
    return stdout;
  }

  /**
   * Starts the next `sh run background` block (or `commands`, with `env`) and waits until
   * something answers HTTP on `port`; it runs until `close()`.
   */
  async serve(port, commands = this.substitute(this.take("sh run background").body), env = process.env) {
    const logPath = join(this.root, `server-${port}.log`);
    const log = openSync(logPath, "a");
    const child = spawn("bash", ["-euo", "pipefail", "-c", commands], {
      cwd: this.root,
      env,
      detached: true,
      stdio: ["ignore", log, log],
    });
    closeSync(log);
    this.servers.push(child);
    this.logs.push(logPath);
    const exited = once(child, "exit");
    await until(async () => {
      if (child.exitCode !== null) throw new Error(`the server exited:\n${readFileSync(logPath, "utf8")}`);
      return (await fetch(`http://127.0.0.1:${port}/`).catch(() => null)) !== null;
    }, `a server on port ${port}`);
    return { child, exited, log: () => readFileSync(logPath, "utf8") };
  }

  /** Stops one server this run started. */
  async stop({ child, exited }) {
    if (child.exitCode === null && child.signalCode === null) process.kill(-child.pid, "SIGTERM");
    await exited;
  }

  finish() {
    const left = this.blocks.slice(this.next).map((b) => `${b.where} \`${b.info}\``);
    assert.deepEqual(left, [], `blocks of ${this.document} no test runs`);
  }

  async close() {
    for (const child of this.servers) {
      if (child.exitCode === null && child.signalCode === null) process.kill(-child.pid, "SIGKILL");
    }
    rmSync(this.root, { recursive: true, force: true });
  }
}

/** `env` with npm told to use its cache first and to keep quiet about audits and funding. */
function npmQuiet(env) {
  return {
    ...env,
    npm_config_prefer_offline: "true",
    npm_config_audit: "false",
    npm_config_fund: "false",
    npm_config_update_notifier: "false",
  };
}

/**
 * The release files a site owner downloads, made from the package built in `pkg/` as
 * `cargo xtask dist` makes them: the npm tarball and the plain-script zip (one folder,
 * `unified-balance/`).
 */
async function releaseFiles(run) {
  await run.run(
    `npm pack --silent --pack-destination "${run.root}" "${pkgDir}" > /dev/null
     mkdir -p script/unified-balance
     cp "${pkgDir}/unified_balance.global.js" "${pkgDir}/unified_balance_bg.wasm" "${pkgDir}/README.md" script/unified-balance/
     (cd script && zip -qr "../unified-balance-${VERSION}-script.zip" unified-balance)
     rm -r script`,
    "the release files",
  );
}

/** The parts of a document's run: its hub, Chromium, and the run itself. */
async function start(file) {
  const hub = new Hub();
  await hub.start();
  // shop.test: a name for a page on an origin the hub does not list.
  const args = [...CHROMIUM_ARGS, "--host-resolver-rules=MAP shop.test 127.0.0.1"];
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args });
  const ports = [await freePort(), await freePort()];
  const run = new DocumentRun(file, { hubUrl: hub.url, secret: hub.secrets[SITE], ports });
  cleanups.push(async () => {
    await browser.close().catch(() => {});
    await run.close();
    await hub.destroy();
  });
  await releaseFiles(run);
  return { hub, browser, run, ports };
}

const cleanups = [];
after(async () => {
  for (const cleanup of cleanups) await cleanup();
});

/** A page of its own, whose errors and failed requests are collected. */
async function openPage(browser) {
  const context = await browser.newContext();
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  // Failed requests are named by the responses below; a site's missing favicon is not ours.
  page.on("console", (m) => m.type() === "error" && !m.text().startsWith("Failed to load resource") && errors.push(m.text()));
  page.on("response", (r) => r.status() >= 400 && !r.url().endsWith("/favicon.ico") && errors.push(`${r.status()} ${r.url()}`));
  return { page, errors };
}

/** The text of `selector` once `check` accepts it. */
async function shows(page, selector, check, what) {
  return until(async () => {
    const text = await page.textContent(selector);
    return check(text) ? text : false;
  }, what);
}

/** Fails unless the hub accepts `token`: a `timestamp` request with it answers 200. */
async function assertHubAccepts(hub, token, message, user = USER) {
  const check = await fetch(`${hub.syncUrl}?action=timestamp&user_id=${user}&data_type=balance`, {
    headers: { authorization: `Bearer ${token}` },
  });
  assert.equal(check.status, 200, `${message}; it answered ${await check.text()}`);
}

/**
 * Runs the next block, `info`, in `server` (phpFpm or apacheModPhp) serving my-site/, and
 * checks that the endpoint signs tokens the hub accepts with the settings of those lines: the
 * server sees none of the test's environment, and sync-settings.php is not written yet.
 * Answers the running server.
 */
async function endpointUnder(run, hub, info, server) {
  const block = run.take(info);
  assert.ok(!existsSync(join(run.root, "sync-settings.php")), `${block.where} runs before sync-settings.php exists`);
  // Under root, these servers' PHP runs as www-data, which must reach my-site/.
  chmodSync(run.root, 0o755);
  const site = await server(join(run.root, "my-site"), run.substitute(block.body));
  cleanups.push(() => site.stop());
  // The guide's login.php signs in under `php -S` only; here the session it would have
  // stored is written where this server's PHP keeps sessions.
  const cookie = site.session({ user_id: USER });
  const answer = await fetch(`${site.url}/api/sync-token.php`, { headers: { cookie } });
  const body = await answer.text();
  assert.equal(answer.status, 200, `${block.where}: the endpoint answered ${answer.status} ${body}\n${site.logs()}`);
  await assertHubAccepts(hub, JSON.parse(body).token, `${block.where}: the hub accepts the token signed with these lines' secret`);
  // A sign-in that stores the user id as a number (as a database hands it over).
  const numeric = await fetch(`${site.url}/api/sync-token.php`, { headers: { cookie: site.session({ user_id: 42 }) } });
  assert.equal(numeric.status, 200, `${block.where}: a numeric user id: ${numeric.status}`);
  await assertHubAccepts(hub, (await numeric.json()).token, `${block.where}: a token for user 42`, "42");
  return site;
}

/** The hub's record of the examples' user, read by a backend. */
const recordOf = (hub, dataType) => hub.record(USER, dataType);

test("the site-owner guide, from zero: PHP with the plain script, curl, then Node with TypeScript", async () => {
  const { hub, browser, run, ports } = await start("docs/site-owner.md");

  // 2. The files.
  await run.run();
  const layout = run.take("text layout");

  // 3. The signed-in user, and 4. the endpoint: the very file the PHP tests run.
  run.file("php", "my-site/login.php");
  const endpoint = run.file("php", "my-site/api/sync-token.php");
  assert.equal(
    endpoint.body,
    readFileSync(join(repoRoot, "docs/examples/sync-token.php"), "utf8"),
    `${endpoint.where}: the guide's endpoint must be docs/examples/sync-token.php, byte for byte`,
  );
  await run.serve(ports[0]);
  // PHP-FPM behind nginx, and Apache with mod_php: the blocks' lines are the only settings.
  await (await endpointUnder(run, hub, "ini fpm-pool", phpFpm)).stop();
  const apache = await endpointUnder(run, hub, "apache apache-vhost", apacheModPhp);
  const wasm = await fetch(`${apache.url}/unified-balance/unified_balance_bg.wasm`);
  assert.equal(wasm.headers.get("content-type"), "application/wasm", "Apache sends the wasm as the block's AddType says");
  await apache.stop();

  // Shared hosting: with no settings in the environment, the endpoint reads the file above
  // its document root.
  run.file("php", "sync-settings.php");
  const bare = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("SYNC_")));
  const settingsPort = await freePort();
  const shared = await run.serve(settingsPort, `cd my-site && exec php -S 127.0.0.1:${settingsPort}`, bare);
  const token = await run.run(
    `cd my-site && curl -sf -c jar "http://127.0.0.1:${settingsPort}/login.php?user=${USER}" > /dev/null
     curl -sf -b jar "http://127.0.0.1:${settingsPort}/api/sync-token.php"`,
    "the endpoint with sync-settings.php",
  );
  await run.stop(shared);
  await assertHubAccepts(hub, JSON.parse(token).token, "the hub accepts the token signed with the settings file's secret");

  // 5. The page, under `php -S`, in Chromium.
  run.file("php", "my-site/index.php");
  for (const line of layout.body.split("\n")) {
    const path = /([\w./-]+\.(?:php|js|wasm))\b/.exec(line)?.[1];
    if (!path) continue;
    const found = [join(run.root, "my-site", path), ...["api", "unified-balance"].map((d) => join(run.root, "my-site", d, path))];
    assert.ok(found.some(existsSync), `${layout.where}: ${path} is not in my-site/`);
  }
  const { page, errors } = await openPage(browser);
  await page.goto(`http://127.0.0.1:${ports[0]}/login.php?user=${USER}`);
  await shows(page, "#coins", (t) => t === "0", "the hub's 0 coins");
  await shows(page, "#status", (t) => t === "idle", "status idle");
  await page.click("#bonus");
  await shows(page, "#coins", (t) => t === "10", "the daily bonus shown");
  await until(async () => (await recordOf(hub, "balance")).data.coins === 10, "the bonus at the hub");
  await page.click("#bonus");
  await shows(page, "#status", (t) => t === "duplicate_op", "the same bonus refused by the page");
  await page.click("#spend");
  await shows(page, "#coins", (t) => t === "7", "the spend shown");
  await until(async () => (await recordOf(hub, "balance")).data.coins === 7, "the spend at the hub");
  await page.fill("#name", "Evans");
  await page.click("#save");
  await until(async () => (await recordOf(hub, "profile")).data.display_name === "Evans", "the name at the hub");
  assert.deepEqual(errors, []);

  // 6. By hand: the bonus was the page's already (one op id per user and day), the spend and
  // the bio are new.
  const answers = await run.run();
  assert.match(answers, /"timestamps"/);
  assert.equal((await recordOf(hub, "balance")).data.coins, 5);
  assert.equal((await recordOf(hub, "profile")).data.bio, "Set with curl");

  // 8. Node, a bundler and TypeScript.
  await run.run();
  run.file("js", "my-node-site/server.mjs");
  run.file("html", "my-node-site/index.html");
  run.file("ts", "my-node-site/src/page.ts");
  await run.run();
  await run.serve(ports[1]);
  const node = await openPage(browser);
  await node.page.goto(`http://127.0.0.1:${ports[1]}/login?user=${USER}`);
  await shows(node.page, "#coins", (t) => t.startsWith("5 (v"), "the hub's 5 coins on the Node page");
  await node.page.click("#click");
  await shows(node.page, "#coins", (t) => t.startsWith("6 "), "the granted coin shown");
  await until(async () => (await recordOf(hub, "balance")).data.coins === 6, "the granted coin at the hub");
  assert.deepEqual(node.errors, []);
  run.finish();
});

test("the package's README: the plain-script page, the bundler steps and the API tour", async () => {
  const { hub, browser, run, ports } = await start("pkg/README.md");
  await hub.delta(USER, 25);

  // The site the README's page lives on: the plain-script folder, and the guide's endpoint
  // with a sign-in stand-in.
  await run.run(
    `unzip -q unified-balance-*-script.zip -d site
     mkdir -p site/api
     cp "${repoRoot}/docs/examples/sync-token.php" site/api/
     printf '%s\\n' '<?php session_start(); $_SESSION["user_id"] = $_GET["user"]; header("Location: /");' > site/login.php`,
    "the README's site",
  );
  run.file("html", "site/index.html");
  const env = { ...process.env, SYNC_SITE_ID: SITE, SYNC_HUB_ID: HUB_ID, SYNC_SECRET: hub.secrets[SITE] };
  await run.serve(ports[0], `cd site && exec php -S 127.0.0.1:${ports[0]}`, env);
  const origin = `http://127.0.0.1:${ports[0]}`;

  // Signed in: the coins. Not signed in: the endpoint answers 401, getToken throws, and the
  // page shows why.
  const { page, errors } = await openPage(browser);
  await page.goto(`${origin}/login.php?user=${USER}`);
  await shows(page, "#coins", (t) => t === "25", "the hub's coins");
  assert.equal(await page.textContent("#why"), "");
  assert.deepEqual(errors, []);
  const stranger = await openPage(browser);
  await stranger.page.goto(`${origin}/`);
  await shows(stranger.page, "#why", (t) => t === "token_failed", "the reason login() gave false");
  // On an origin no site lists, the browser hides the hub's answer: the page sees a hub that
  // does not answer, and the hub's log names the origin.
  const elsewhere = await openPage(browser);
  await elsewhere.page.goto(`http://shop.test:${ports[0]}/login.php?user=${USER}`);
  await shows(elsewhere.page, "#why", (t) => t === "hub_unreachable", "the reason on an unlisted origin");
  await until(
    () => hub.log.some((line) => line.includes(`origin="http://shop.test:${ports[0]}"`) && line.includes("WARN")),
    "the hub's log naming the refused origin",
  );

  // The bundler steps.
  await run.run();
  run.file("js", "bundled/main.js");
  await run.run();
  assert.ok(existsSync(join(run.root, "bundled/dist/main.js")) && existsSync(join(run.root, "bundled/dist/unified_balance_bg.wasm")));

  // The tour, bundled the same way and opened by the signed-in user.
  run.file("js", "bundled/tour.js");
  await run.run(
    `cd bundled
     npx esbuild tour.js --bundle --format=esm --outdir=../site/tour
     cp dist/unified_balance_bg.wasm ../site/tour/
     printf '%s\\n' '<!doctype html><script type="module" src="tour.js"></script>' > ../site/tour/index.html`,
    "the tour's page",
  );
  await page.goto(`${origin}/tour/`);
  await until(
    () => page.evaluate(() => Object.values(localStorage).some((value) => value.includes('"Evans"'))),
    "the tour's last write stored",
  );
  // The tour destroys its SyncManager before every write is confirmed: the site's next page
  // sends the rest.
  await page.goto(`${origin}/`);
  await until(async () => (await recordOf(hub, "profile")).data.display_name === "Evans", "the tour's profile push");
  await until(async () => (await recordOf(hub, "balance")).data.coins === 30, "the tour's credit and spend");
  assert.deepEqual(errors, []);
  run.finish();
});
