// Coming back through the back/forward cache (`pageshow` with `persisted`) checks the hub.
// Playwright's default launch flags switch the cache off, so this file launches Chromium
// with its own flags (see /work/shared/notes/browser-testing.md).

import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { CHROMIUM_ARGS, startHarness, until } from "./harness.mjs";

let h;
const profile = mkdtempSync(join(tmpdir(), "unified-sync-bfcache-"));
before(async () => {
  h = await startHarness({
    ignoreDefaultArgs: true,
    args: [
      ...CHROMIUM_ARGS,
      "--headless=new",
      "--remote-debugging-pipe",
      "--no-startup-window",
      `--user-data-dir=${profile}`,
    ],
  });
});
after(async () => {
  await h?.close();
  rmSync(profile, { recursive: true, force: true });
});

test("a page restored from the back/forward cache checks once and shows what changed meanwhile", async () => {
  const user = h.user("bfcache");
  const site = h.site("roflfaucet");
  const page = await site.open(user);
  try {
    await page.page.goto(`${site.origin}/elsewhere`);
    await h.hub.delta(user, 9);
    const mark = page.mark();
    await page.page.goBack({ waitUntil: "commit" });
    const pageshows = await until(async () => {
      const seen = await page.evaluate(() => window.seen?.pageshows);
      return seen?.length === 2 && seen;
    }, "the restored page's pageshow");
    assert.deepEqual(pageshows, [{ persisted: false }, { persisted: true }], "restored from the cache, not reloaded");
    await page.idle();
    assert.equal(await page.coins(), 9);
    assert.deepEqual(page.requestsSince(mark), ["timestamp balance,profile,roles", "get balance"]);
  } finally {
    await page.close();
  }
});
