// The end-to-end harness: the REAL demo, started the way a person starts it
// (`target/debug/xtask demo --hub-port … --faucet-port … --charity-port … --data-dir …`), and
// headless Chromium driving its two sites on their two origins.
//
//   const demo = await startDemo();             // hub + ROFLFaucet + Click for Charity
//   const faucet = await demo.open("faucet", user);
//   await faucet.tabReturns();
//   assert.equal(await faucet.coins(), await demo.hubCoins(user));
//   await demo.close();                          // SIGINT, and checks that the demo exited
//
// The caller builds first: `cargo xtask build-pkg && cargo build -p hub -p xtask`; the demo
// builds the release hub, whose `hub token` signs the backends' own tokens here, and the demo
// sites (`demo-sites`), which xtask starts beside it.
// Nothing here sleeps to let time pass: every wait is a bounded poll for a condition.

import { execFileSync, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
export const repoRoot = resolve(here, "../..");
export const artifactsDir = join(here, "artifacts");
/** How long a bounded poll waits for its condition before the test fails. */
export const WAIT_MS = 15_000;
/** The demo builds (no-op when built) before it serves; allow for a cold cargo. */
const START_MS = 180_000;
/** The client gives up on a hub request after 15 s; allow for that plus a margin. */
export const OFFLINE_MS = 40_000;
/**
 * How often the faucet grants a claim here: a day, so that two claims of one test always
 * fall in one period (the demo's own default is 30 s).
 */
export const CLAIM_EVERY_SECS = 86_400;
/** What the sites' backends may sign for themselves (`hub token --scope`): a page's cannot credit. */
const BACKEND_SCOPE = "sync:read profile:write settings:write amounts:spend amounts:credit roles:write";

export const SITES = {
  faucet: { id: "roflfaucet", name: "ROFLFaucet" },
  charity: { id: "clickforcharity", name: "Click for Charity" },
};

const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
];

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
      const shown = last instanceof Error ? last.message : JSON.stringify(last);
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${shown})`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** A port nothing listens on now (the OS picks it; the demo does not accept port 0). */
async function freePort(taken) {
  for (;;) {
    const server = createServer();
    server.listen(0, "127.0.0.1");
    await once(server, "listening");
    const { port } = server.address();
    server.close();
    await once(server, "close");
    if (!taken.includes(port)) return port;
  }
}

/** Whether every thread of process `pid` is stopped (state `T` in /proc). */
function allThreadsStopped(pid) {
  const tasks = `/proc/${pid}/task`;
  return readdirSync(tasks).every((tid) => {
    const stat = readFileSync(`${tasks}/${tid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).startsWith("T");
  });
}

/** The child processes of `pid`, from /proc. */
function childrenOf(pid) {
  const children = [];
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try {
      const list = readFileSync(`/proc/${pid}/task/${tid}/children`, "utf8").trim();
      if (list) children.push(...list.split(/\s+/).map(Number));
    } catch {
      // the thread ended meanwhile
    }
  }
  return children;
}

/** SIGKILL to `pid`, unless it is gone already. */
function killIfThere(pid) {
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    // it exited meanwhile
  }
}

function commandOf(pid) {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").filter(Boolean);
  } catch {
    return [];
  }
}

// ---------------------------------------------------------------------------------------
// The demo process
// ---------------------------------------------------------------------------------------

export class Demo {
  constructor() {
    this.bin = join(repoRoot, "target/debug/xtask");
    this.dir = mkdtempSync(join(tmpdir(), "unified-sync-e2e-"));
    this.dataDir = join(this.dir, "hub-data");
    this.ports = null;
    this.child = null;
    this.log = [];
    this.browser = null;
    this.context = null;
    /** Each user's browser profile, by user id. */
    this.contexts = new Map();
    this.pages = [];
    this.tag = randomBytes(3).toString("hex");
    this.users = 0;
  }

  get hubUrl() {
    return `http://127.0.0.1:${this.ports.hub}`;
  }

  origin(site) {
    return `http://127.0.0.1:${this.ports[site]}`;
  }

  /** A user id no other test uses. */
  user(name = "user") {
    this.users += 1;
    return `${name}-${this.tag}-${this.users}`;
  }

  /** Spawns `xtask demo` (on free ports the first time, on the same ports and data after). */
  async start() {
    if (this.child) throw new Error("the demo is already running");
    // Only this start's lines: a restart must not take the last run's guide for its own.
    this.log = [];
    if (!this.ports) {
      const taken = [];
      for (const name of ["hub", "faucet", "charity"]) taken.push(await freePort(taken));
      this.ports = { hub: taken[0], faucet: taken[1], charity: taken[2] };
    }
    // The hub refuses HUB_* variables it does not know; the demo's own DEMO_* would override
    // nothing (the flags win), but leave neither to chance.
    const env = Object.fromEntries(
      Object.entries(process.env).filter(([k]) => !k.startsWith("HUB_") && !k.startsWith("DEMO_")),
    );
    env.NO_COLOR = "1";
    env.RUST_LOG = "info";
    const args = [
      "demo",
      "--hub-port", String(this.ports.hub),
      "--faucet-port", String(this.ports.faucet),
      "--charity-port", String(this.ports.charity),
      "--data-dir", this.dataDir,
      "--claim-every-secs", String(CLAIM_EVERY_SECS),
    ];
    const child = spawn(this.bin, args, { cwd: repoRoot, env, stdio: ["ignore", "pipe", "pipe"] });
    this.child = child;
    this.exited = new Promise((resolveExit) =>
      child.once("exit", (code, signal) => {
        if (this.child === child) this.child = null;
        resolveExit({ code, signal });
      }),
    );
    const killOnExit = () => {
      const servers = this.serverPids();
      child.kill("SIGKILL");
      for (const pid of servers) killIfThere(pid);
    };
    process.once("exit", killOnExit);
    this.exited.then(() => process.removeListener("exit", killOnExit));
    for (const stream of [child.stdout, child.stderr]) {
      stream.setEncoding("utf8");
      let buffer = "";
      stream.on("data", (chunk) => {
        buffer += chunk;
        const lines = buffer.split("\n");
        buffer = lines.pop();
        for (const line of lines) {
          this.log.push(line);
          if (this.log.length > 1000) this.log.shift();
        }
      });
    }
    const gone = this.exited.then(({ code, signal }) => {
      throw new Error(`the demo exited while starting (${code ?? signal}):\n${this.log.join("\n")}`);
    });
    await Promise.race([
      gone,
      until(() => this.log.some((l) => l.includes("The demo is running")), "the demo's guide", START_MS),
    ]);
    await until(async () => (await fetch(`${this.hubUrl}/healthz`)).ok, "the hub's /healthz");
    for (const site of ["faucet", "charity"]) {
      await until(async () => {
        const config = await (await fetch(`${this.origin(site)}/config.json`)).json();
        return config.siteId === SITES[site].id;
      }, `${site}'s /config.json`);
      await until(async () => (await fetch(`${this.origin(site)}/`)).ok, `${site}'s page`);
    }
    gone.catch(() => {});
  }

  /** The hub process the demo started (its child running `…/hub serve`), or null. */
  hubPid() {
    if (!this.child) return null;
    for (const pid of childrenOf(this.child.pid)) {
      const command = commandOf(pid);
      if (command[0]?.endsWith("/hub") && command[1] === "serve") return pid;
    }
    return null;
  }

  /** The processes the demo started: the hub and the sites (`…/demo-sites`). */
  serverPids() {
    if (!this.child) return [];
    return childrenOf(this.child.pid).filter((pid) => {
      const command = commandOf(pid);
      return (command[0]?.endsWith("/hub") && command[1] === "serve") || command[0]?.endsWith("/demo-sites");
    });
  }

  /**
   * Freezes the hub (SIGSTOP): the kernel still accepts connections, nothing answers. Waits
   * until every thread has stopped (one inside a system call stops only when it returns).
   */
  async freezeHub() {
    const pid = this.hubPid();
    if (!pid) throw new Error("no hub process to freeze");
    this.frozen = pid;
    process.kill(pid, "SIGSTOP");
    await until(() => allThreadsStopped(pid), "every hub thread to stop");
  }

  thawHub() {
    if (!this.frozen) return;
    process.kill(this.frozen, "SIGCONT");
    this.frozen = null;
  }

  /** Sends SIGINT to the demo, as Ctrl-C would; resolves with its exit once it is gone. */
  async stop() {
    const child = this.child;
    if (!child) return { code: 0, signal: null, already: true };
    this.thawHub();
    const servers = this.serverPids();
    child.kill("SIGINT");
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      for (const pid of servers) killIfThere(pid);
    }, 15_000);
    const exit = await this.exited;
    clearTimeout(timer);
    for (const pid of servers) {
      await until(() => commandOf(pid).length === 0, `the demo's process ${pid} to be gone`);
    }
    return exit;
  }

  /** Opens Chromium, with one profile for the operator's pages (the dashboard). */
  async launchBrowser() {
    this.browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: CHROMIUM_ARGS });
    this.context = await this.browser.newContext({ viewport: { width: 1200, height: 900 } });
  }

  /**
   * `user`'s browser profile, one for both sites (one person's browser). Each user has a
   * browser of their own: a visible page keeps the hub's event stream open, and over HTTP/1.1
   * a browser holds at most six connections to one host (the demo's two sites on 127.0.0.1
   * are one site to it, and share them), which the users of earlier tests must not use up.
   */
  async contextFor(user) {
    if (!this.contexts.has(user)) {
      this.contexts.set(user, await this.browser.newContext({ viewport: { width: 1200, height: 900 } }));
    }
    return this.contexts.get(user);
  }

  /** Opens `site` (faucet|charity) signed in as `user` in a new tab, once it shows data. */
  async open(site, user) {
    const tab = new Tab(this, site, user);
    await tab.open();
    this.pages.push(tab);
    return tab;
  }

  // --- the hub, as a site's backend talks to it ------------------------------------------

  /** A token for `user` from `site`'s own backend (`/api/token`). */
  async token(user, site = "faucet") {
    const response = await fetch(`${this.origin(site)}/api/token?user=${encodeURIComponent(user)}`);
    if (!response.ok) throw new Error(`${site}'s /api/token answered ${response.status}`);
    return response.text();
  }

  /**
   * A token of `site`'s backend itself, with the scopes it may sign: what `hub token --scope`
   * prints with the demo's development keys.
   */
  backendToken(user, site = "faucet") {
    const hub = join(repoRoot, "target/release/hub");
    const args = ["token", "--dev", "--data-dir", this.dataDir, "--site", SITES[site].id, "--user", user];
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("HUB_")));
    return execFileSync(hub, [...args, "--scope", BACKEND_SCOPE], { env, encoding: "utf8" }).trim();
  }

  /** One call to the sync API as `site`'s backend. */
  async hubCall(user, { query, body, site = "faucet" }) {
    const headers = { authorization: `Bearer ${this.backendToken(user, site)}` };
    let response;
    if (body) {
      headers["content-type"] = "application/json";
      response = await fetch(`${this.hubUrl}/api/sync`, { method: "POST", headers, body: JSON.stringify(body) });
    } else {
      response = await fetch(`${this.hubUrl}/api/sync?${new URLSearchParams(query)}`, { headers });
    }
    const answer = await response.json();
    if (!response.ok) throw new Error(`hub answered ${response.status}: ${JSON.stringify(answer)}`);
    return answer;
  }

  /** The hub's record `{data, version, …}` of one of `user`'s types. */
  hubRecord(user, dataType = "balance") {
    return this.hubCall(user, { query: { action: "get", user_id: user, data_type: dataType } });
  }

  /** The hub's coins for `user` (0 when it has no balance yet). */
  async hubCoins(user) {
    try {
      return (await this.hubRecord(user, "balance")).data?.coins ?? 0;
    } catch (e) {
      if (/404/.test(e.message)) return 0;
      throw e;
    }
  }

  /** Adds `amount` coins at the hub, as a site's backend would with its own token (to set up a test). */
  hubDelta(user, amount, site = "charity") {
    const siteId = SITES[site].id;
    const op_id = `e2e-${randomBytes(8).toString("hex")}`;
    return this.hubCall(user, {
      site,
      body: { action: "delta", user_id: user, site_id: siteId, data_type: "balance", delta: { coins: amount }, op_id },
    });
  }

  async close() {
    for (const tab of this.pages) tab.dispose?.();
    await this.browser?.close().catch(() => {});
    const exit = await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
    return exit;
  }
}

/** Starts the demo and Chromium; call `close()` in `after`. */
export async function startDemo() {
  const demo = new Demo();
  try {
    await demo.start();
    await demo.launchBrowser();
  } catch (e) {
    await demo.close().catch(() => {});
    throw e;
  }
  return demo;
}

export function artifactPath(name) {
  mkdirSync(artifactsDir, { recursive: true });
  return join(artifactsDir, name);
}

// ---------------------------------------------------------------------------------------
// A tab of a demo site
// ---------------------------------------------------------------------------------------

export class Tab {
  constructor(demo, site, user) {
    this.demo = demo;
    this.site = site;
    this.user = user;
    this.page = null;
    /** Every console line of this tab. */
    this.console = [];
    this.errors = [];
    this.dialogs = [];
    /** Hub requests sent and not yet answered or failed (the event stream aside). */
    this.inFlight = 0;
    this.hubRequests = [];
  }

  get url() {
    return `${this.demo.origin(this.site)}/?user=${encodeURIComponent(this.user)}`;
  }

  async open() {
    this.page = await (await this.demo.contextFor(this.user)).newPage();
    const hubApi = `${this.demo.hubUrl}/api/`;
    // The event stream a visible page keeps open is never "in flight" to wait for.
    const isHub = (request) =>
      request.url().startsWith(hubApi) && request.method() !== "OPTIONS" && !request.url().startsWith(`${hubApi}events`);
    this.page.on("request", (request) => {
      if (!isHub(request)) return;
      this.inFlight += 1;
      this.hubRequests.push({ method: request.method(), url: request.url(), body: request.postData() });
    });
    for (const done of ["requestfinished", "requestfailed"]) {
      this.page.on(done, (request) => {
        if (isHub(request)) this.inFlight -= 1;
      });
    }
    this.page.on("console", (message) => this.console.push(message.text()));
    this.page.on("pageerror", (error) => this.errors.push(error.message));
    this.page.on("dialog", (dialog) => {
      this.dialogs.push(`${dialog.type()}: ${dialog.message()}`);
      dialog.dismiss().catch(() => {});
    });
    await this.goto();
  }

  /** Loads the page (again) and waits until it shows a balance. */
  async goto() {
    await this.page.goto(this.url);
    await this.started();
  }

  async reload() {
    this.inFlight = 0;
    await this.page.reload();
    await this.started();
  }

  /** Waits for the page script's SyncManager and a first balance (from cache or hub). */
  async started() {
    await until(
      async () => (await this.page.evaluate(() => typeof window.sync === "object")) && (await this.coins()) !== null,
      `${this.site} to start and show a balance (page errors: ${JSON.stringify(this.errors)})`,
    );
  }

  /** The coins the page shows, or null if it shows none yet. */
  async coins() {
    const text = (await this.page.textContent("#coins")).trim();
    return /^-?\d+$/.test(text) ? Number(text) : null;
  }

  /** `#status`'s `data-status`: starting | idle | syncing | offline | error. */
  status() {
    return this.page.getAttribute("#status", "data-status");
  }

  /** Unconfirmed writes, as `#coins-note` shows them. */
  async pending() {
    return Number((await this.page.getAttribute("#coins-note", "data-pending")) ?? "0");
  }

  async bringToFront() {
    await this.page.bringToFront();
  }

  /**
   * The user leaves the tab and comes back. Headless Chromium never fires
   * `visibilitychange` by itself, so this does what the browser would: the document turns
   * `hidden`, then `visible`, with the event each time.
   */
  async tabReturns({ wait = true } = {}) {
    await this.page.bringToFront();
    await this.page.evaluate(() => {
      const become = (state) => {
        Object.defineProperty(document, "visibilityState", { configurable: true, get: () => state });
        Object.defineProperty(document, "hidden", { configurable: true, get: () => state === "hidden" });
        document.dispatchEvent(new Event("visibilitychange"));
      };
      become("hidden");
      become("visible");
      delete document.visibilityState;
      delete document.hidden;
    });
    if (wait) await this.idle();
  }

  /** Waits until no check is running and every hub request of this tab has its answer. */
  async idle(timeoutMs = WAIT_MS) {
    await until(
      async () => (await this.page.evaluate(() => window.sync.status)) !== "syncing" && this.inFlight <= 0,
      `${this.site}'s check to end`,
      timeoutMs,
    );
  }

  /** Waits until the page shows `coins`. */
  async shows(coins, timeoutMs = WAIT_MS) {
    await until(async () => (await this.coins()) === coins, `${this.site} to show ${coins} coins`, timeoutMs);
  }

  /** Waits until this tab has no unconfirmed write left. */
  async settled(timeoutMs = WAIT_MS) {
    await until(
      async () => (await this.page.evaluate(() => window.sync.status)) === "idle" && (await this.pending()) === 0,
      `${this.site} to be idle with nothing pending`,
      timeoutMs,
    );
  }

  /**
   * Charity: one paid click on "Click to earn". The backend pays one click a second per user
   * (across tabs too): a click it refused is made again once the button is enabled.
   */
  async earn() {
    const count = async () => Number(await this.page.getAttribute("#earned", "data-count"));
    const before = await count();
    await until(async () => {
      if ((await count()) > before) return true;
      if (await this.page.isEnabled("#earn")) await this.page.click("#earn");
      return false;
    }, "a paid click");
  }

  /** Charity: one donation (a spend of 5 coins, the page's own). */
  async donate() {
    await this.page.click("#donate");
  }

  /** Faucet: the claim's outcome (`claimed`, `wait`, `already`, `unreachable`, …). */
  async claim() {
    await this.page.evaluate(() => delete document.getElementById("claim-result").dataset.outcome);
    await this.page.click("#claim");
    return until(async () => {
      const outcome = await this.page.getAttribute("#claim-result", "data-outcome");
      return outcome && outcome !== "asking" ? outcome : null;
    }, "the claim's outcome");
  }

  /** Faucet: the game's `data-outcome`. */
  outcome() {
    return this.page.getAttribute("#game-result", "data-outcome");
  }

  /**
   * Faucet: one roll. Returns the coins it changed by (+10, −5), 0 if no roll was made, or
   * null while its stake waits for the hub (the roll is made once it is back: `rolled()`).
   */
  async play() {
    await this.page.evaluate(() => {
      const result = document.getElementById("game-result");
      delete result.dataset.outcome;
      delete result.dataset.roll;
    });
    await this.page.click("#play");
    const outcome = await until(
      async () => {
        const o = await this.outcome();
        return o && o !== "checking" && o !== "rolling" ? o : null;
      },
      "the roll's outcome",
      OFFLINE_MS,
    );
    return outcome === "pending" ? null : ({ win: 10, lose: -5 }[outcome] ?? 0);
  }

  /** Faucet: waits for a pending roll to be made; the coins it changed by. */
  async rolled(timeoutMs = OFFLINE_MS) {
    const outcome = await until(
      async () => {
        const o = await this.outcome();
        return o === "win" || o === "lose" ? o : null;
      },
      "the pending roll",
      timeoutMs,
    );
    return { win: 10, lose: -5 }[outcome];
  }

  dispose() {}
}
