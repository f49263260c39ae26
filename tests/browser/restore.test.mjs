// A hub restored from an older backup (`hub backup` while it serves, `hub restore` while it is
// stopped) under a page that holds newer data: at its next check the page sees the restored
// database's new epoch, drops its cache and shows the restored data.

import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { startHarness } from "./harness.mjs";

let h;
before(async () => {
  h = await startHarness();
});
after(async () => {
  await h?.close();
});

/** The new epoch a restore's report names: `… to …/hub.sqlite3: N bytes, epoch E, …`. */
function restoredEpoch(said) {
  const epoch = /hub\.sqlite3: \d+ bytes, epoch (\S+),/.exec(said)?.[1];
  assert.ok(epoch, `the restore names no epoch: ${said}`);
  return epoch;
}

test("a page holding newer coins than a restored backup shows the backup's at its next check", async () => {
  const user = h.user("restored");
  await h.hub.delta(user, 10);
  const page = await h.site("roflfaucet").open(user);
  try {
    assert.equal(await page.coins(), 10);
    const backup = join(h.hub.dir, "older.sqlite3");
    await h.hub.backup(backup);
    await h.hub.delta(user, 15);
    await page.tabReturns();
    assert.equal(await page.coins(), 25);
    const { epoch } = await page.stored();

    const restored = restoredEpoch(await h.hub.restore(backup));
    assert.notEqual(restored, epoch);
    const mark = page.mark();
    await page.tabReturns();
    assert.equal(await page.coins(), 10, "the page shows the restored coins, not the newer ones it held");
    assert.equal((await page.stored()).epoch, restored);
    const [stamps, ...gets] = page.requestsSince(mark);
    assert.equal(stamps, "timestamp balance,profile,roles");
    assert.deepEqual(gets.sort(), ["get balance", "get profile", "get roles"], "everything is fetched again");
    assert.equal(await h.hub.coins(user), 10);
  } finally {
    await page.close();
  }
});

test("a restored balance written back to the version the page held is fetched, not taken from the browser's cache", async () => {
  const user = h.user("same-version");
  await h.hub.delta(user, 10);
  const page = await h.site("roflfaucet").open(user);
  try {
    const backup = join(h.hub.dir, "same-version.sqlite3");
    await h.hub.backup(backup);
    await h.hub.delta(user, 15);
    await page.tabReturns();
    assert.equal(await page.coins(), 25);
    const held = (await page.stored()).records.balance.version;

    const restored = restoredEpoch(await h.hub.restore(backup));
    // Another site writes to the restored balance before this page checks: its version is
    // again the one the page fetched last, with other coins.
    const written = await h.hub.delta(user, 7);
    assert.equal(written.version, held);
    await page.tabReturns();
    assert.equal(await page.coins(), 17);
    assert.equal((await page.stored()).epoch, restored);
  } finally {
    await page.close();
  }
});
