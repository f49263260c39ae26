// The browser test harness: the real hub binary, two sites on two origins serving the real
// `pkg/` build and a tiny page, and headless Chromium driven by playwright-core. Tests read
// like the story they check:
//
//   const h = await startHarness();
//   const page = await h.site("roflfaucet").open(h.user("evans"));
//   await page.tabReturns();
//   assert.equal(await page.coins(), await h.hub.coins(page.userId));
//   await h.close();
//
// Nothing here sleeps to let time pass: every wait is a bounded poll for a condition.

import { spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { once } from "node:events";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { dirname, extname, join, normalize, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
export const repoRoot = resolve(here, "../..");
const pkgDir = join(repoRoot, "pkg");
const pageDir = join(here, "page");

export const HUB_ID = "browser-test-hub";
export const SITES = ["roflfaucet", "clickforcharity"];
/** How long a bounded poll waits for its condition before the test fails. */
export const WAIT_MS = 10_000;

export const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
];

/**
 * A site's page script once it has the package's `SyncManager` (from either build): the hub
 * and the site come from the page's `site-config`, the user from the query (`?user=…`); it
 * shows the coins in `#coins` and leaves `window.sync`, `window.loggedIn` and `window.started`
 * for the tests.
 */
export const PAGE_SCRIPT = `
  const site = JSON.parse(document.getElementById("site-config").textContent);
  const userId = new URLSearchParams(location.search).get("user");
  const sync = new SyncManager({
    hubUrl: site.hubUrl,
    siteId: site.siteId,
    userId,
    getToken: async () => {
      const response = await fetch("/token?user=" + encodeURIComponent(userId));
      if (!response.ok) throw new Error("token endpoint answered " + response.status);
      return response.text();
    },
  });
  sync.on("balance", (data) => {
    document.getElementById("coins").textContent = String(data.coins);
  });
  window.sync = sync;
  window.loggedIn = sync.login();
  window.started = true;
`;

/** Polls `condition` (sync or async) until it returns a truthy value, which it returns. */
export async function until(condition, what, timeoutMs = WAIT_MS) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await condition();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${describe(last)})`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

function describe(value) {
  if (value instanceof Error) return value.message;
  try {
    return JSON.stringify(value);
  } catch {
    return String(value);
  }
}

/** An HS256 JWT, signed with node:crypto exactly as a site's backend would sign it. */
export function signJwt(secret, claims, typ = "JWT") {
  const part = (object) => Buffer.from(JSON.stringify(object)).toString("base64url");
  const unsigned = `${part({ alg: "HS256", typ })}.${part(claims)}`;
  const signature = createHmac("sha256", secret).update(unsigned).digest("base64url");
  return `${unsigned}.${signature}`;
}

function claimsFor(site, user, ttlSeconds = 600) {
  const iat = Math.floor(Date.now() / 1000);
  return { iss: site, sub: user, aud: HUB_ID, iat, exp: iat + ttlSeconds };
}

/**
 * The scopes of a site's backend talking to the hub for itself (another client in these
 * tests): a page's token could neither credit nor write roles.
 */
const BACKEND_SCOPE = "sync:read profile:write settings:write amounts:spend amounts:credit roles:write";

/** Seconds past its `exp` until the hub takes a grant for expired (its clock leeway). */
const HUB_LEEWAY_SECS = 30;

// ---------------------------------------------------------------------------------------
// The hub
// ---------------------------------------------------------------------------------------

/** The real `hub` binary with its own data dir and config; can be stopped and restarted. */
export class Hub {
  constructor() {
    this.bin = process.env.HUB_BIN ? resolve(repoRoot, process.env.HUB_BIN) : join(repoRoot, "target/debug/hub");
    this.dir = mkdtempSync(join(tmpdir(), "unified-sync-browser-"));
    this.dataDir = join(this.dir, "data");
    this.configPath = join(this.dir, "hub.toml");
    this.secrets = Object.fromEntries(SITES.map((id) => [id, randomBytes(32).toString("hex")]));
    this.port = 0;
    this.child = null;
    this.paused = false;
    this.log = [];
    this.writeConfig();
  }

  /** Writes hub.toml: auth on, a generous rate limit, both sites with their own secrets. */
  writeConfig() {
    const sites = SITES.map(
      (id) => `
[[sites]]
id = "${id}"
origins = ["http://127.0.0.1:*", "http://localhost:*"]
secret = "${this.secrets[id]}"
`,
    ).join("");
    writeFileSync(
      this.configPath,
      `hub_id = "${HUB_ID}"
auth = true

[limits]
requests_per_minute = 100000
unauthenticated_requests_per_minute = 100000
${sites}`,
    );
  }

  /** The site rotates its key; the hub learns it when it restarts. */
  rotateSecret(site) {
    this.secrets[site] = randomBytes(32).toString("hex");
    this.writeConfig();
  }

  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  get syncUrl() {
    return `${this.url}/api/sync`;
  }

  /** Starts the hub (on a free port the first time, on the same port after that). */
  async start() {
    if (this.child) throw new Error("the hub is already running");
    // The hub refuses HUB_* variables it does not know (HUB_BIN is ours, not its).
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("HUB_")));
    env.RUST_LOG = "info";
    env.NO_COLOR = "1";
    const child = spawn(
      this.bin,
      ["serve", "--config", this.configPath, "--data-dir", this.dataDir, "--listen", `127.0.0.1:${this.port}`],
      { env, stdio: ["ignore", "ignore", "pipe"] },
    );
    this.child = child;
    this.paused = false;
    const exited = once(child, "exit");
    const killOnExit = () => child.kill("SIGKILL");
    process.once("exit", killOnExit);
    exited.then(() => {
      process.removeListener("exit", killOnExit);
      if (this.child === child) this.child = null;
    });
    const listening = new Promise((resolveListening, reject) => {
      let buffer = "";
      child.stderr.setEncoding("utf8");
      child.stderr.on("data", (chunk) => {
        buffer += chunk;
        const lines = buffer.split("\n");
        buffer = lines.pop();
        for (const line of lines) {
          this.log.push(line);
          if (this.log.length > 500) this.log.shift();
          const match = /hub listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(line);
          if (match) resolveListening(Number(match[1]));
        }
      });
      child.once("error", reject);
      exited.then(([code, signal]) =>
        reject(new Error(`the hub exited at start (${code ?? signal}):\n${this.log.join("\n")}`)),
      );
    });
    this.port = await Promise.race([
      listening,
      new Promise((_, reject) =>
        setTimeout(() => reject(new Error(`the hub did not start:\n${this.log.join("\n")}`)), WAIT_MS).unref(),
      ),
    ]);
    await until(async () => (await fetch(`${this.url}/healthz`)).ok, "the hub's /healthz");
  }

  /** Stops the hub with `signal` (SIGTERM: graceful; SIGKILL: a crash) and waits for it. */
  async stop(signal = "SIGTERM") {
    const child = this.child;
    if (!child) return;
    const exited = child.exitCode !== null || child.signalCode !== null ? Promise.resolve() : once(child, "exit");
    if (this.paused) child.kill("SIGCONT");
    child.kill(signal);
    const timer = setTimeout(() => child.kill("SIGKILL"), 5_000);
    await exited;
    clearTimeout(timer);
    this.child = null;
  }

  /**
   * Freezes the hub (SIGSTOP): connections are accepted by the kernel but never answered.
   * A stop takes effect only when every thread has taken it (one busy in a system call, e.g.
   * an fsync, keeps serving until it returns), so this waits until /proc shows all stopped.
   */
  async pause() {
    this.child.kill("SIGSTOP");
    this.paused = true;
    const tasks = `/proc/${this.child.pid}/task`;
    await until(
      () =>
        readdirSync(tasks).every((tid) => {
          // The state follows the parenthesized command name: "T" is stopped.
          const stat = readFileSync(`${tasks}/${tid}/stat`, "utf8");
          return stat.slice(stat.lastIndexOf(")") + 2).startsWith("T");
        }),
      "every hub thread to stop",
    );
  }

  resume() {
    this.child.kill("SIGCONT");
    this.paused = false;
  }

  /** Stops the hub with `signal` and starts it again on the same port and data dir. */
  async restart(signal = "SIGTERM") {
    await this.stop(signal);
    await this.start();
  }

  /** The hub comes back with a new, empty database (a new epoch). */
  async wipe() {
    await this.stop();
    rmSync(this.dataDir, { recursive: true, force: true });
    await this.start();
  }

  /**
   * Runs `hub COMMAND ARGS…` on this hub's config and data dir, as its operator would, and
   * resolves with what it printed; rejects with it if the command fails.
   */
  async run(command, ...args) {
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("HUB_")));
    const child = spawn(this.bin, [command, "--config", this.configPath, "--data-dir", this.dataDir, ...args], {
      env,
      stdio: ["ignore", "pipe", "pipe"],
    });
    let output = "";
    child.stdout.on("data", (chunk) => (output += chunk));
    child.stderr.on("data", (chunk) => (output += chunk));
    const [code, signal] = await once(child, "close");
    if (code !== 0) throw new Error(`hub ${command} failed (${code ?? signal}):\n${output}`);
    return output;
  }

  /** Copies the database into `file` with `hub backup`, whether the hub runs or not. */
  backup(file) {
    return this.run("backup", "--to", file);
  }

  /**
   * Stops the hub, puts the backup `file` in place of its database with `hub restore` (which
   * gives it a new epoch), and starts it again; resolves with what the restore printed.
   */
  async restore(file) {
    await this.stop();
    const said = await this.run("restore", "--from", file);
    await this.start();
    return said;
  }

  async destroy() {
    await this.stop("SIGKILL");
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** A token for `user`, minted the way `site`'s backend mints it: a page's, or with `scope`. */
  token(user, site = SITES[0], scope = undefined) {
    return signJwt(this.secrets[site], { ...claimsFor(site, user), ...(scope ? { scope } : {}) });
  }

  /** One call to the sync API as another client: a site's backend, with its own scopes. */
  async call(user, { query, body, site = SITES[0] }) {
    const headers = { authorization: `Bearer ${this.token(user, site, BACKEND_SCOPE)}` };
    let response;
    if (body) {
      headers["content-type"] = "application/json";
      response = await fetch(this.syncUrl, { method: "POST", headers, body: JSON.stringify(body) });
    } else {
      response = await fetch(`${this.syncUrl}?${new URLSearchParams(query)}`, { headers });
    }
    const answer = await response.json();
    if (!response.ok) {
      const error = new Error(`hub answered ${response.status}: ${JSON.stringify(answer)}`);
      error.status = response.status;
      error.answer = answer;
      throw error;
    }
    return answer;
  }

  /** The hub's record `{data, version, last_updated}` of one user's type. */
  record(user, dataType = "balance") {
    return this.call(user, { query: { action: "get", user_id: user, data_type: dataType } });
  }

  async coins(user) {
    return (await this.record(user, "balance")).data.coins;
  }

  /** How many requests for `action` the hub has answered since it started, by its /metrics. */
  async answered(action) {
    const text = await (await fetch(`${this.url}/metrics`)).text();
    const pattern = new RegExp(`^hub_requests_total\\{action="${action}",.*\\} (\\d+)$`, "gm");
    return [...text.matchAll(pattern)].reduce((sum, match) => sum + Number(match[1]), 0);
  }

  /** Adds `amount` coins through another client. */
  delta(user, amount, { site = SITES[1], dataType = "balance" } = {}) {
    const field = dataType === "points" ? "points" : "coins";
    const op_id = `harness-${randomBytes(8).toString("hex")}`;
    return this.call(user, {
      site,
      body: { action: "delta", user_id: user, site_id: site, data_type: dataType, delta: { [field]: amount }, op_id },
    });
  }

  /** Writes a record through another client (merge patch, or the amount outright). */
  push(user, dataType, data, { site = SITES[1] } = {}) {
    return this.call(user, { site, body: { action: "push", user_id: user, site_id: site, data_type: dataType, data } });
  }
}

// ---------------------------------------------------------------------------------------
// The sites
// ---------------------------------------------------------------------------------------

const MIME = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".mjs": "text/javascript; charset=utf-8",
  ".wasm": "application/wasm",
  ".json": "application/json",
  ".ts": "text/plain; charset=utf-8",
  ".md": "text/plain; charset=utf-8",
};

/**
 * One website on its own origin: the test page, the package, and its backend's endpoints —
 * `/token` and `/regrant` (a fresh grant for an op this backend granted) — with `grant()`,
 * what the backend does when it decides a user earned a credit.
 */
export class Site {
  constructor(harness, id) {
    this.harness = harness;
    this.id = id;
    this.port = 0;
    /** Token requests per user, as this site's backend saw them. */
    this.tokenRequests = new Map();
    this.badTokensLeft = 0;
    /** While true, the token endpoint fails (500), as a backend that is down would. */
    this.tokenEndpointDown = false;
    /** Every op this backend granted, by op id: `{user, dataType, delta}`. */
    this.granted = new Map();
    /** The ops the page asked to be granted again (`/regrant`), in order. */
    this.regrants = [];
    /** Extra folders this site serves, by URL prefix (`/pkg/` is always served). */
    this.folders = new Map([["/pkg/", pkgDir]]);
    /** Content-Types a folder serves instead of the usual ones, by URL prefix and extension. */
    this.folderTypes = new Map();
    /** Headers a folder sends with every file, by URL prefix. */
    this.folderHeaders = new Map();
    this.server = createServer((req, res) => this.serve(req, res).catch((e) => fail(res, 500, e.message)));
  }

  get origin() {
    return `http://127.0.0.1:${this.port}`;
  }

  async listen() {
    this.server.listen(0, "127.0.0.1");
    await once(this.server, "listening");
    this.port = this.server.address().port;
  }

  close() {
    this.server.closeAllConnections();
    this.server.close();
  }

  /** The next `n` tokens this site's backend hands out are signed with the wrong key. */
  handOutBadTokens(n = 1) {
    this.badTokensLeft = n;
  }

  /** Serves the files of `dir` under `/name/`, as a site serves its built assets. */
  serveFolder(name, dir) {
    this.folders.set(`/${name}/`, resolve(dir));
  }

  /**
   * Serves the files of `dir` under `/name/` as a server that does not know some file types
   * would: `types` gives their Content-Type by extension (`{".wasm": "text/plain"}`).
   */
  serveFolderWithTypes(name, dir, types) {
    this.serveFolder(name, dir);
    this.folderTypes.set(`/${name}/`, types);
  }

  /** Serves the files of `dir` under `/name/` with `headers` (`{"content-security-policy": …}`). */
  serveFolderWithHeaders(name, dir, headers) {
    this.serveFolder(name, dir);
    this.folderHeaders.set(`/${name}/`, headers);
  }

  tokenCalls(user) {
    return this.tokenRequests.get(user) ?? 0;
  }

  /**
   * The backend decides `user` earned `amount`: a grant for a new op, `{grant, opId}`. With
   * `expiredSecsAgo`, the grant's life ended that long ago as the hub counts it (a page that
   * held it offline too long).
   */
  grant(user, amount, { dataType = "balance", expiredSecsAgo } = {}) {
    const opId = `${this.id}-grant-${randomBytes(8).toString("hex")}`;
    const delta = { [dataType === "points" ? "points" : "coins"]: amount };
    this.granted.set(opId, { user, dataType, delta });
    return { grant: this.signGrant(user, opId, dataType, delta, expiredSecsAgo), opId };
  }

  signGrant(user, opId, dataType, delta, expiredSecsAgo) {
    const claims = { ...claimsFor(this.id, user), op_id: opId, data_type: dataType, delta };
    if (expiredSecsAgo !== undefined) {
      claims.exp = claims.iat - HUB_LEEWAY_SECS - expiredSecsAgo;
      claims.iat = claims.exp - 600;
    }
    return signJwt(this.harness.hub.secrets[this.id], claims, "grant+jwt");
  }

  async serve(req, res) {
    const url = new URL(req.url, this.origin);
    if (url.pathname === "/" || url.pathname === "/index.html") {
      const config = JSON.stringify({ hubUrl: this.harness.hub.url, siteId: this.id }).replaceAll("<", "\\u003c");
      const html = (await readFile(join(pageDir, "index.html"), "utf8"))
        .replaceAll("{{SITE}}", this.id)
        .replace("{{CONFIG}}", config);
      return send(res, 200, MIME[".html"], html);
    }
    if (url.pathname === "/app.js") {
      return send(res, 200, MIME[".js"], await readFile(join(pageDir, "app.js")));
    }
    if (url.pathname === "/token") {
      const user = url.searchParams.get("user") ?? "";
      this.tokenRequests.set(user, this.tokenCalls(user) + 1);
      if (this.tokenEndpointDown) return fail(res, 500, "the session store is down");
      const bad = url.searchParams.get("bad") === "1" || this.badTokensLeft > 0;
      if (this.badTokensLeft > 0) this.badTokensLeft -= 1;
      const secret = bad ? randomBytes(32).toString("hex") : this.harness.hub.secrets[this.id];
      return send(res, 200, "text/plain; charset=utf-8", signJwt(secret, claimsFor(this.id, user)));
    }
    if (url.pathname === "/regrant") {
      // Only an op this backend granted, to that user: the same op, amount and data type.
      const user = url.searchParams.get("user") ?? "";
      const opId = url.searchParams.get("op") ?? "";
      this.regrants.push(opId);
      const op = this.granted.get(opId);
      if (op?.user !== user) return fail(res, 403, "this site granted no such op");
      return send(res, 200, "text/plain; charset=utf-8", this.signGrant(user, opId, op.dataType, op.delta));
    }
    for (const [prefix, dir] of this.folders) {
      if (!url.pathname.startsWith(prefix)) continue;
      const file = normalize(join(dir, decodeURIComponent(url.pathname.slice(prefix.length))));
      if (!file.startsWith(dir + sep) || file.includes(`${sep}node_modules${sep}`))
        return fail(res, 404, "not found");
      let body;
      try {
        body = await readFile(file);
      } catch {
        return fail(res, 404, "not found");
      }
      const type = this.folderTypes.get(prefix)?.[extname(file)] ?? MIME[extname(file)];
      return send(res, 200, type ?? "application/octet-stream", body, this.folderHeaders.get(prefix));
    }
    return fail(res, 404, "not found");
  }

  /**
   * Opens this site's test page (or another page of it, at `path`) for `user` in a new tab;
   * resolves once `login()` settled. `beforeLoad(page)` runs on the Playwright page before it
   * loads (to set its clock, say).
   */
  async open(user, options = {}, path = "/", beforeLoad = undefined) {
    const page = new SitePage(this, user, options, path);
    await page.open(beforeLoad);
    return page;
  }
}

function send(res, status, type, body, headers = {}) {
  // `no-cache`, not `no-store`: a `no-store` page never enters the back/forward cache.
  res.writeHead(status, { "content-type": type, "cache-control": "no-cache", ...headers });
  res.end(body);
}

function fail(res, status, message) {
  if (!res.headersSent) send(res, status, "text/plain; charset=utf-8", message);
  else res.end();
}

// ---------------------------------------------------------------------------------------
// A tab of a site
// ---------------------------------------------------------------------------------------

/** A hub request as the page sent it, with a short description (`"get balance"`). */
function hubRequest(request) {
  const url = new URL(request.url());
  const entry = { method: request.method(), url: request.url(), what: "", request };
  if (entry.method === "GET") {
    entry.action = url.searchParams.get("action");
    entry.dataType = url.searchParams.get("data_type");
    entry.what = `${entry.action} ${entry.dataType}`;
    entry.ifNoneMatch = request.headers()["if-none-match"] ?? null;
  } else if (entry.method === "POST") {
    entry.body = request.postDataJSON();
    entry.action = entry.body?.action;
    entry.dataType = entry.body?.data_type;
    entry.what = `${entry.action} ${entry.dataType}`;
  }
  return entry;
}

export class SitePage {
  constructor(site, user, { events = "none", ...options }, path = "/") {
    this.site = site;
    this.userId = user;
    this.options = options;
    this.path = path;
    /**
     * What `/api/events` is for this tab: `"hub"`, the hub's event stream; `"404"`, a 404 from
     * the network (`page.route`), as a hub without events answers; `"none"` (the default), a
     * 404 the page's own `fetch` answers, with nothing on the network, so that a test counts
     * the hub requests and CORS preflights of a page without streams (routing any request
     * turns Chromium's preflight cache off).
     */
    this.events = events;
    /** Every request this tab sent to the hub (CORS preflights and event streams excluded), in order. */
    this.hubRequests = [];
    /** Every event stream this tab opened: `{lastEventId, authorization, url}`, in order. */
    this.streams = [];
    /** The CORS preflights (OPTIONS) the browser sent to the hub for this tab (not for streams). */
    this.preflights = [];
    /** The CORS preflights the browser sent for this tab's event streams. */
    this.streamPreflights = [];
    /** Hub requests sent and not yet answered or failed. */
    this.inFlight = 0;
    /** Every console line of this tab. */
    this.console = [];
    this.errors = [];
    this.page = null;
  }

  get url() {
    const query = new URLSearchParams({ user: this.userId });
    for (const [key, value] of Object.entries(this.options)) query.set(key, String(value));
    return `${this.site.origin}${this.path}?${query}`;
  }

  async open(beforeLoad) {
    const context = this.site.harness.context;
    this.page = await context.newPage();
    if (beforeLoad) await beforeLoad(this.page);
    const hubApi = `${this.site.harness.hub.url}/api/`;
    const events = `${hubApi}events`;
    const isStream = (request) => request.url().startsWith(events) && request.method() === "GET";
    const isHub = (request) =>
      request.url().startsWith(hubApi) && request.method() !== "OPTIONS" && !isStream(request);
    const notFound = JSON.stringify({ success: false, code: "not_found", error: "no such endpoint" });
    if (this.events === "404") {
      await this.page.route(`${events}*`, (route) =>
        route.fulfill({
          status: 404,
          headers: { "access-control-allow-origin": this.site.origin, "content-type": "application/json" },
          body: notFound,
        }),
      );
    } else if (this.events === "none") {
      await this.page.addInitScript(
        ([events, body]) => {
          const fetch = window.fetch;
          window.fetch = (url, init) =>
            String(url).startsWith(events)
              ? Promise.resolve(new Response(body, { status: 404, headers: { "content-type": "application/json" } }))
              : fetch(url, init);
        },
        [events, notFound],
      );
    }
    this.page.on("request", (request) => {
      if (isStream(request)) {
        const headers = request.headers();
        this.streams.push({
          url: request.url(),
          lastEventId: headers["last-event-id"] ?? null,
          authorization: headers.authorization ?? null,
        });
      }
      if (!isHub(request)) return;
      this.hubRequests.push(hubRequest(request));
      this.inFlight += 1;
    });
    for (const done of ["requestfinished", "requestfailed"]) {
      this.page.on(done, (request) => {
        if (isHub(request)) this.inFlight -= 1;
      });
    }
    // Playwright does not report CORS preflights; the DevTools protocol does.
    const cdp = await context.newCDPSession(this.page);
    cdp.on("Network.requestWillBeSent", ({ request }) => {
      if (request.method !== "OPTIONS") return;
      if (request.url.startsWith(events)) this.streamPreflights.push(request.url);
      else if (request.url.startsWith(hubApi)) this.preflights.push(request.url);
    });
    await cdp.send("Network.enable");
    this.page.on("console", (message) => this.console.push(message.text()));
    this.page.on("pageerror", (error) => this.errors.push(error.message));
    await this.page.goto(this.url);
    await this.started();
  }

  /** Waits for the page script to have constructed its SyncManager and for login to settle. */
  async started() {
    await until(
      () => this.page.evaluate(() => window.started === true),
      `the page script of ${this.site.id} to start (page errors: ${JSON.stringify(this.errors)})`,
    );
    this.loginResult = await this.page.evaluate(() => window.loggedIn);
  }

  async reload() {
    await this.page.reload();
    await this.started();
  }

  async close() {
    if (!this.page.isClosed()) await this.page.close({ runBeforeUnload: true });
  }

  /** Where the hub traffic stands now: pass it to `requestsSince` or `preflightsSince`. */
  mark() {
    return { requests: this.hubRequests.length, preflights: this.preflights.length };
  }

  /** Short descriptions (`"timestamp balance,profile,roles"`) of the hub requests since `mark`. */
  /** The pushes and deltas this tab sent since `mark`, alone or inside a batch, in order. */
  opsSince(mark = { requests: 0 }) {
    return this.hubRequests
      .slice(mark.requests)
      .filter((r) => r.method === "POST")
      .flatMap((r) => (r.action === "batch" ? r.body.ops : [r.body]));
  }

  requestsSince(mark = { requests: 0 }) {
    return this.hubRequests.slice(mark.requests).map((r) => r.what);
  }

  /** How many CORS preflights the browser sent to the hub since `mark`. */
  preflightsSince(mark = { preflights: 0 }) {
    return this.preflights.length - mark.preflights;
  }

  evaluate(fn, arg) {
    return this.page.evaluate(fn, arg);
  }

  /** Everything the page's listeners saw (`window.seen`). */
  seen() {
    return this.evaluate(() => window.seen);
  }

  /** The coins the page shows, or null if it shows none yet. */
  async coins() {
    const text = await this.page.textContent("#coins");
    return /^-?\d+$/.test(text) ? Number(text) : null;
  }

  status() {
    return this.evaluate(() => window.sync.status);
  }

  /** `sync.forceSync()`; resolves with its result once the check has ended. */
  async forceSync() {
    const fresh = await this.evaluate(() => window.sync.forceSync());
    await this.idle();
    return fresh;
  }

  /**
   * The user leaves the tab and comes back. Headless Chromium never fires
   * `visibilitychange` by itself, so this does what the browser would: the document turns
   * `hidden`, then `visible`, with the event each time. Resolves once the check it started
   * has ended (unless `{wait: false}`), with the statuses the page reported meanwhile.
   */
  async tabReturns({ wait = true } = {}) {
    const statuses = await this.evaluate(() => {
      const mark = window.seen.status.length;
      const become = (state) => {
        Object.defineProperty(document, "visibilityState", { configurable: true, get: () => state });
        Object.defineProperty(document, "hidden", { configurable: true, get: () => state === "hidden" });
        document.dispatchEvent(new Event("visibilitychange"));
      };
      become("hidden");
      become("visible");
      delete document.visibilityState;
      delete document.hidden;
      return window.seen.status.slice(mark);
    });
    if (wait) await this.idle();
    return statuses;
  }

  /**
   * The document turns `state` (`"hidden"` or `"visible"`) with its `visibilitychange`, as the
   * browser does when the user leaves the tab or comes back (`tabReturns` does both at once).
   */
  async setVisibility(state) {
    await this.evaluate((state) => {
      Object.defineProperty(document, "visibilityState", { configurable: true, get: () => state });
      Object.defineProperty(document, "hidden", { configurable: true, get: () => state === "hidden" });
      document.dispatchEvent(new Event("visibilitychange"));
    }, state);
  }

  /** `sync.live`: whether changes reach the page live. */
  live() {
    return this.evaluate(() => window.sync.live);
  }

  /** Waits until no check is running and every hub request has its answer. */
  async idle() {
    await until(async () => (await this.status()) !== "syncing" && this.inFlight === 0, "the check to end");
  }

  /**
   * Applies a delta from the page; returns its op id and the coins shown right after. A
   * credit carries a grant, as a real page's does: `grant` if given, else one the site's
   * backend grants now.
   */
  applyDelta(amount, reason = "game", { grant } = {}) {
    const granted = grant ?? (amount > 0 ? this.site.grant(this.userId, amount).grant : undefined);
    return this.evaluate(
      ([amount, reason, grant]) => {
        const options = grant ? { grant } : undefined;
        const opId = window.sync.applyDelta("balance", { coins: amount }, reason, options);
        return { opId, shownRightAfter: Number(document.getElementById("coins").textContent) };
      },
      [amount, reason, granted],
    );
  }

  /**
   * The client's stored state for this user (`{epoch, records, outbox}`), or null: the cache
   * under its key, and the pending writes, each under that key and `:op:` and its op id, in
   * the order they were stored.
   */
  stored() {
    return this.evaluate((user) => {
      const key = Object.keys(localStorage).find((k) => k.startsWith("unified-sync:") && k.endsWith(`:${user}`));
      if (!key) return null;
      const outbox = Object.keys(localStorage)
        .filter((k) => k.startsWith(`${key}:op:`))
        .map((k) => JSON.parse(localStorage.getItem(k)))
        .sort((a, b) => a.at - b.at);
      return { ...JSON.parse(localStorage.getItem(key)), outbox };
    }, this.userId);
  }

  /** Waits until the client has no unconfirmed write left. */
  async outboxEmpty() {
    await until(async () => (await this.stored())?.outbox?.length === 0, "the outbox to empty");
  }
}

// ---------------------------------------------------------------------------------------
// Everything together
// ---------------------------------------------------------------------------------------

export class Harness {
  constructor() {
    this.hub = new Hub();
    this.sites = new Map(SITES.map((id) => [id, new Site(this, id)]));
    this.browser = null;
    this.context = null;
    this.users = 0;
    this.tag = randomBytes(3).toString("hex");
  }

  site(id) {
    const site = this.sites.get(id);
    if (!site) throw new Error(`no site ${id}`);
    return site;
  }

  /** A user id no other test uses. */
  user(name = "user") {
    this.users += 1;
    return `${name}-${this.tag}-${this.users}`;
  }

  /** `launchOptions` replace playwright's launch options (e.g. its default flags). */
  async start(launchOptions = {}) {
    await this.hub.start();
    for (const site of this.sites.values()) await site.listen();
    this.browser = await chromium.launch({
      executablePath: "/usr/bin/chromium",
      args: CHROMIUM_ARGS,
      ...launchOptions,
    });
    this.context = await this.browser.newContext();
  }

  async close() {
    await this.browser?.close().catch(() => {});
    for (const site of this.sites.values()) site.close();
    await this.hub.destroy();
  }
}

/** Starts the hub, both sites and Chromium; call `close()` in `after`. */
export async function startHarness(launchOptions) {
  const harness = new Harness();
  try {
    await harness.start(launchOptions);
  } catch (e) {
    await harness.close();
    throw e;
  }
  return harness;
}
