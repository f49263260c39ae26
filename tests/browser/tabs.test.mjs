// Several tabs of one site: fresh data travels between them through BroadcastChannel, and
// writes from both are applied exactly once.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { startHarness, until } from "./harness.mjs";

let h;
before(async () => {
  h = await startHarness();
});
after(async () => {
  await h?.close();
});

const shows = (page, coins) => until(async () => (await page.coins()) === coins, `${page.site.id} to show ${coins}`);

test("what one tab fetches, the site's other tab shows without asking the hub", async () => {
  const user = h.user("tabs");
  const site = h.site("roflfaucet");
  const first = await site.open(user);
  const second = await site.open(user);
  try {
    const quiet = second.mark();
    await h.hub.delta(user, 30);
    await first.tabReturns();
    assert.equal(await first.coins(), 30);
    await shows(second, 30);
    assert.deepEqual(second.requestsSince(quiet), [], "the second tab sent nothing");
    const last = (await second.seen()).balance.at(-1);
    assert.deepEqual([last.coins, last.source], [30, "tab"]);

    // The second tab's own next check finds it current: one request, nothing fetched.
    const mark = second.mark();
    await second.tabReturns();
    assert.deepEqual(second.requestsSince(mark), ["timestamp balance,profile,roles"]);
  } finally {
    await first.close();
    await second.close();
  }
});

test("a write confirmed in one tab shows in the other", async () => {
  const user = h.user("tabs-write");
  const site = h.site("roflfaucet");
  const first = await site.open(user);
  const second = await site.open(user);
  try {
    const quiet = second.mark();
    await first.applyDelta(8);
    await first.outboxEmpty();
    await shows(second, 8);
    // (It may resend the first tab's delta if it read their shared localStorage before the
    // first tab stored the confirmation; the hub applies it once either way.)
    const checks = second.requestsSince(quiet).filter((r) => !r.startsWith("delta"));
    assert.deepEqual(checks, [], "the second tab checked nothing");
    assert.equal(await h.hub.coins(user), 8);
  } finally {
    await first.close();
    await second.close();
  }
});

test("deltas made in two tabs at once are each applied exactly once", async () => {
  const user = h.user("tabs-both");
  await h.hub.delta(user, 100);
  const site = h.site("roflfaucet");
  const first = await site.open(user);
  const second = await site.open(user);
  try {
    const start = await h.hub.record(user);
    await Promise.all([first.applyDelta(10), second.applyDelta(-3), first.applyDelta(1)]);
    await first.outboxEmpty();
    await second.outboxEmpty();
    const end = await h.hub.record(user);
    assert.deepEqual([end.data.coins, end.version], [108, start.version + 3], "three deltas, three changes");
    await shows(first, 108);
    await shows(second, 108);
  } finally {
    await first.close();
    await second.close();
  }
});

test("two tabs writing at once while the hub is gone keep every write: each lands exactly once", async () => {
  const user = h.user("tabs-race");
  await h.hub.delta(user, 1000);
  const site = h.site("roflfaucet");
  const first = await site.open(user);
  const second = await site.open(user);
  const start = await h.hub.record(user);
  const perTab = 40;
  await h.hub.stop("SIGKILL");
  try {
    // Each tab spends as fast as the page can, both at once: their stores of the outbox cross.
    const spend = (page) =>
      page.evaluate(async (n) => {
        for (let i = 0; i < n; i++) {
          window.sync.applyDelta("balance", { coins: -1 }, "race");
          await new Promise((resolve) => setTimeout(resolve, 0));
        }
      }, perTab);
    await Promise.all([spend(first), spend(second)]);
  } finally {
    // Both leave before the hub is back: only what storage kept can still be sent.
    await first.close();
    await second.close();
    await h.hub.start();
  }
  const next = await site.open(user);
  try {
    await next.outboxEmpty();
    const end = await h.hub.record(user);
    assert.deepEqual(
      [end.data.coins, end.version],
      [start.data.coins - 2 * perTab, start.version + 2 * perTab],
      "every write of both tabs, each once",
    );
  } finally {
    await next.close();
  }
});

test("a tab of another site (another origin) learns of the change at its next tab return", async () => {
  const user = h.user("sites");
  const faucet = await h.site("roflfaucet").open(user);
  const charity = await h.site("clickforcharity").open(user);
  try {
    await faucet.applyDelta(6);
    await faucet.outboxEmpty();
    const mark = charity.mark();
    await charity.tabReturns();
    assert.equal(await charity.coins(), 6);
    assert.deepEqual(charity.requestsSince(mark), ["timestamp balance,profile,roles", "get balance"]);
  } finally {
    await faucet.close();
    await charity.close();
  }
});
