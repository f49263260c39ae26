// From a bundler: a site installs `unified-balance` into its node_modules, imports it by name,
// bundles its script with esbuild and serves the result. The bundle keeps
// `new URL("unified_balance_bg.wasm", import.meta.url)`, so the wasm goes next to it.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { repoRoot, startHarness } from "./harness.mjs";

const pkgDir = join(repoRoot, "pkg");
const esbuild = join(pkgDir, "node_modules/.bin/esbuild");

// The site's script, as its owner would write it. The page embeds where the hub is and who
// this site is; the user comes from the query (`?user=…`), as the harness's pages take it.
const ENTRY = `import init, { SyncManager } from "unified-balance";
await init();

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

let h;
let project;
let meta;
before(async () => {
  h = await startHarness();
  project = mkdtempSync(join(tmpdir(), "unified-sync-bundler-"));

  // `npm install unified-balance`: the package's published files in node_modules.
  const installed = join(project, "node_modules/unified-balance");
  mkdirSync(installed, { recursive: true });
  const manifest = JSON.parse(readFileSync(join(pkgDir, "package.json"), "utf8"));
  for (const file of ["package.json", ...manifest.files]) copyFileSync(join(pkgDir, file), join(installed, file));
  writeFileSync(join(project, "package.json"), JSON.stringify({ name: "a-site", private: true, type: "module" }));
  writeFileSync(join(project, "entry.js"), ENTRY);

  execFileSync(esbuild, ["entry.js", "--bundle", "--format=esm", "--outfile=dist/app.js", "--metafile=meta.json"], {
    cwd: project,
    stdio: ["ignore", "ignore", "pipe"],
  });
  meta = JSON.parse(readFileSync(join(project, "meta.json"), "utf8"));
  // The bundler copies nothing by itself: the site ships the wasm next to its bundle.
  copyFileSync(join(installed, "unified_balance_bg.wasm"), join(project, "dist/unified_balance_bg.wasm"));

  const site = h.site("roflfaucet");
  const config = JSON.stringify({ hubUrl: h.hub.url, siteId: site.id });
  writeFileSync(
    join(project, "dist/index.html"),
    `<!doctype html>
<html lang="en">
  <head><meta charset="utf-8" /><title>bundled</title><link rel="icon" href="data:," /></head>
  <body>
    <p>Coins: <span id="coins">…</span></p>
    <script type="application/json" id="site-config">${config}</script>
    <script type="module" src="./app.js"></script>
  </body>
</html>
`,
  );
  site.serveFolder("bundled", join(project, "dist"));
});
after(async () => {
  await h?.close();
  if (project) rmSync(project, { recursive: true, force: true });
});

test("bundled by esbuild from node_modules, the package syncs: login shows the hub's coins, a delta reaches the hub", async () => {
  // esbuild found the package by its name, through node_modules and its package.json.
  const entryImports = meta.inputs["entry.js"].imports;
  assert.deepEqual(
    entryImports.map((i) => [i.original, i.path]),
    [["unified-balance", "node_modules/unified-balance/unified_balance.js"]],
  );
  const bundle = readFileSync(join(project, "dist/app.js"), "utf8");
  assert.match(bundle, /new URL\("unified_balance_bg\.wasm", import\.meta\.url\)/, "the wasm is looked up next to the bundle");

  const user = h.user("bundled");
  await h.hub.delta(user, 40);
  const site = h.site("roflfaucet");
  const page = await site.open(user, {}, "/bundled/index.html");
  try {
    assert.deepEqual(page.errors, []);
    assert.equal(page.loginResult, true, "login resolves true when the data is fresh");
    assert.equal(await page.coins(), 40);
    assert.equal(await page.coins(), await h.hub.coins(user), "the page shows what the hub holds");
    assert.ok(page.requestsSince().includes("get balance"), "the coins came from the hub");

    // Everything the page loaded came from the site's bundled folder, not from /pkg/.
    const loaded = await page.evaluate(() => performance.getEntriesByType("resource").map((e) => e.name));
    const origin = site.origin;
    assert.ok(loaded.includes(`${origin}/bundled/app.js`), JSON.stringify(loaded));
    assert.ok(loaded.includes(`${origin}/bundled/unified_balance_bg.wasm`), JSON.stringify(loaded));
    assert.deepEqual(
      loaded.filter((url) => url.startsWith(`${origin}/pkg/`)),
      [],
      "nothing is loaded from the unbundled package",
    );

    // And writes go the other way.
    await page.applyDelta(5);
    await page.outboxEmpty();
    assert.equal(await h.hub.coins(user), 45);
    assert.equal(await page.coins(), 45);
  } finally {
    await page.close();
  }
});
