// From zero, with a bundler: the package packed by `npm pack` (the tarball a release
// publishes), installed with `npm install` into an empty folder, imported by name from a
// site's script, bundled with esbuild and served. The bundle keeps
// `new URL("unified_balance_bg.wasm", import.meta.url)`, so the wasm goes next to it.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { copyFileSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { PAGE_SCRIPT, repoRoot, startHarness } from "./harness.mjs";

const pkgDir = join(repoRoot, "pkg");
const esbuild = join(pkgDir, "node_modules/.bin/esbuild");

// The site's script, as its owner would write it: the module build imported by name, then
// the page script every site page of these tests runs.
const ENTRY = `import init, { SyncManager } from "unified-balance";
await init();
${PAGE_SCRIPT}`;

/** Runs `program args…` in `cwd`; returns what it printed, or fails with its stderr. */
function run(program, args, cwd) {
  return execFileSync(program, args, { cwd, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

let h;
let packed;
let project;
let installed;
let meta;
before(async () => {
  h = await startHarness();
  packed = mkdtempSync(join(tmpdir(), "unified-sync-packed-"));
  project = mkdtempSync(join(tmpdir(), "unified-sync-bundler-"));

  // The tarball, then `npm install …/unified-balance-<version>.tgz` in an empty folder. The
  // package has no dependencies, so nothing is fetched.
  const [{ filename }] = JSON.parse(run("npm", ["pack", "--json", "--pack-destination", packed], pkgDir));
  const { version } = JSON.parse(readFileSync(join(pkgDir, "package.json"), "utf8"));
  assert.equal(filename, `unified-balance-${version}.tgz`);
  assert.deepEqual(readdirSync(project), []);
  run("npm", ["install", join(packed, filename), "--offline", "--no-audit", "--no-fund"], project);
  installed = join(project, "node_modules/unified-balance");
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
  for (const dir of [packed, project]) if (dir) rmSync(dir, { recursive: true, force: true });
});

test("the tarball installs the package's files and nothing else", () => {
  const manifest = JSON.parse(readFileSync(join(project, "package.json"), "utf8"));
  assert.match(manifest.dependencies["unified-balance"], /^file:.*\/unified-balance-[^/]*\.tgz$/);
  assert.deepEqual(readdirSync(installed).sort(), [
    "README.md",
    "package.json",
    "unified_balance.d.ts",
    "unified_balance.global.js",
    "unified_balance.js",
    "unified_balance_bg.wasm",
    "unified_balance_bg.wasm.d.ts",
  ]);
  assert.ok(!existsSync(join(installed, "global-entry.mjs")), "the plain script's entry is not shipped");
});

test("installed from the tarball and bundled by esbuild, the package syncs: login shows the hub's coins, a delta reaches the hub", async () => {
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
