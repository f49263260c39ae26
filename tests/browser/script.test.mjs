// The plain-script build, as a site owner with no tooling uses it: `unified_balance.global.js`
// and `unified_balance_bg.wasm` copied into a folder of the site, a page that loads the script
// with a classic `<script src>` and waits for `UnifiedBalance.ready`. Then both builds served
// by a server that does not know `.wasm` (wasm-bindgen's init falls back from streaming
// compilation), and a folder whose wasm was never copied.

import assert from "node:assert/strict";
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { PAGE_SCRIPT, repoRoot, startHarness } from "./harness.mjs";

const pkgDir = join(repoRoot, "pkg");
const WASM = "unified_balance_bg.wasm";
/** Where the site keeps the package's files, below the page: the wasm is found beside the script. */
const VENDOR = "vendor/unified-balance";
/** Types a server that does not know `.wasm` gives it, by the folder that serves them. */
const WRONG_TYPES = { "octet-stream": "application/octet-stream", "text-plain": "text/plain; charset=utf-8" };
/** What wasm-bindgen's init logs when it compiles the wasm without streaming. */
const MIME_WARNING = /does not serve Wasm with `application\/wasm` MIME type/;


function html(title, config, scripts) {
  return `<!doctype html>
<html lang="en">
  <head><meta charset="utf-8" /><title>${title}</title><link rel="icon" href="data:," /></head>
  <body>
    <p>Coins: <span id="coins">…</span></p>
    <script type="application/json" id="site-config">${config}</script>
${scripts}
  </body>
</html>
`;
}

/** A page with the plain script: the global's SyncManager once `ready` resolves. */
function scriptPage(config) {
  return html(
    "plain script",
    config,
    `    <script src="${VENDOR}/unified_balance.global.js"></script>
    <script>
      UnifiedBalance.ready.then(
        () => {
          const { SyncManager } = UnifiedBalance;
          ${PAGE_SCRIPT}
        },
        (error) => {
          window.readyError = error.message;
          window.started = true;
        },
      );
    </script>`,
  );
}

/** A page with the module build, imported without a bundler. */
function modulePage(config) {
  return html(
    "module",
    config,
    `    <script type="module">
      import init, { SyncManager } from "./${VENDOR}/unified_balance.js";
      await init();
      ${PAGE_SCRIPT}
    </script>`,
  );
}

let h;
let site;
let root;
before(async () => {
  h = await startHarness();
  site = h.site("roflfaucet");
  const config = JSON.stringify({ hubUrl: h.hub.url, siteId: site.id });
  root = mkdtempSync(join(tmpdir(), "unified-sync-script-"));
  const folder = (name, pkgFiles, page) => {
    mkdirSync(join(root, name, VENDOR), { recursive: true });
    for (const file of pkgFiles) copyFileSync(join(pkgDir, file), join(root, name, VENDOR, file));
    writeFileSync(join(root, name, "index.html"), page);
  };
  folder("script", ["unified_balance.global.js", WASM], scriptPage(config));
  folder("module", ["unified_balance.js", WASM], modulePage(config));
  folder("missing", ["unified_balance.global.js"], scriptPage(config));
  // The same files, served right, and by servers that give `.wasm` another type.
  site.serveFolder("static", root);
  for (const [prefix, type] of Object.entries(WRONG_TYPES)) site.serveFolderWithTypes(prefix, root, { ".wasm": type });
});
after(async () => {
  await h?.close();
  if (root) rmSync(root, { recursive: true, force: true });
});

/**
 * Opens `path` for a user the hub credited 40 coins; checks that the page shows them after
 * login, that a spend is applied at once and confirmed by the hub, and that the wasm came
 * from `wasmUrl` as `wasmType`. Returns the page's console.
 */
async function syncsWith(path, wasmUrl, wasmType) {
  const user = h.user("script");
  await h.hub.delta(user, 40);
  const wasmTypes = [];
  const page = await site.open(user, {}, path, (playwrightPage) =>
    playwrightPage.on("response", (response) => {
      if (response.url().endsWith(`/${WASM}`)) wasmTypes.push([response.url(), response.headers()["content-type"]]);
    }),
  );
  try {
    assert.deepEqual(page.errors, []);
    assert.deepEqual(wasmTypes, [[wasmUrl, wasmType]], "the wasm came once, from beside the script");
    assert.equal(page.loginResult, true, "login resolves true when the data is fresh");
    assert.equal(await page.coins(), 40);
    assert.ok(page.requestsSince().includes("get balance"), "the coins came from the hub");

    const { shownRightAfter } = await page.applyDelta(-5);
    assert.equal(shownRightAfter, 35, "a spend is shown at once");
    await page.outboxEmpty();
    assert.equal(await h.hub.coins(user), 35, "the hub applied the spend");
    assert.equal(await page.coins(), 35);
    return page.console;
  } finally {
    await page.close();
  }
}

test("the plain script from a static folder: ready resolves, the page logs in, shows the hub's coins, and a spend reaches the hub", async () => {
  const logged = await syncsWith(
    "/static/script/index.html",
    `${site.origin}/static/script/${VENDOR}/${WASM}`,
    "application/wasm",
  );
  assert.deepEqual(
    logged.filter((line) => MIME_WARNING.test(line)),
    [],
    "served as application/wasm, the wasm is compiled while it streams",
  );
});

for (const [prefix, type] of Object.entries(WRONG_TYPES)) {
  for (const build of ["script", "module"]) {
    test(`the ${build} build still syncs when the wasm is served as ${type}, and says how to serve it`, async () => {
      const wasmUrl = `${site.origin}/${prefix}/${build}/${VENDOR}/${WASM}`;
      const logged = await syncsWith(`/${prefix}/${build}/index.html`, wasmUrl, type);
      assert.equal(
        logged.filter((line) => MIME_WARNING.test(line)).length,
        1,
        `wasm-bindgen's init fell back to WebAssembly.instantiate and said why: ${JSON.stringify(logged)}`,
      );
    });
  }
}

test("without its wasm beside it, the plain script's ready rejects naming the URL it tried, and the page sends nothing to the hub", async () => {
  const user = h.user("missing");
  const page = await site.open(user, {}, "/static/missing/index.html");
  try {
    const message = await page.evaluate(() => window.readyError);
    const tried = `${site.origin}/static/missing/${VENDOR}/${WASM}`;
    assert.ok(message?.includes(tried), `the rejection names ${tried}: ${message}`);
    assert.match(message, /answered 404/);
    assert.match(message, /put unified_balance_bg\.wasm beside unified_balance\.global\.js/);
    assert.equal(await page.evaluate(() => typeof window.sync), "undefined");
    assert.deepEqual(page.requestsSince(), []);
  } finally {
    await page.close();
  }
});

test("under a Content-Security-Policy, the plain script syncs when the policy allows 'wasm-unsafe-eval' and the hub, as the README says, and cannot load the wasm without it", async () => {
  // The page's own script is inline here, so the policy allows inline scripts as well.
  const policy = (wasm) =>
    `default-src 'self'; img-src data:; script-src 'self' 'unsafe-inline'${wasm ? " 'wasm-unsafe-eval'" : ""}; connect-src 'self' ${h.hub.url}`;
  site.serveFolderWithHeaders("csp-allowed", root, { "content-security-policy": policy(true) });
  site.serveFolderWithHeaders("csp-refused", root, { "content-security-policy": policy(false) });

  const user = h.user("csp");
  await h.hub.delta(user, 12);
  const allowed = await site.open(user, {}, "/csp-allowed/script/index.html");
  try {
    assert.equal(allowed.loginResult, true, allowed.console.join("\n"));
    assert.equal(await allowed.coins(), 12);
  } finally {
    await allowed.close();
  }

  const refused = await site.open(user, {}, "/csp-refused/script/index.html");
  try {
    const message = await refused.evaluate(() => window.readyError);
    assert.match(message ?? "", /wasm-unsafe-eval/, `ready rejects naming what the policy lacks: ${message}`);
    assert.deepEqual(refused.requestsSince(), [], "nothing reaches the hub");
  } finally {
    await refused.close();
  }
});
