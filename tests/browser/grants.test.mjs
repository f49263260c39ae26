// Who may change what, from a page: its token spends, a credit needs its site's grant. A
// credit without one is refused and undone; a grant that expired while the page was offline
// is granted again through getGrant and lands once; a spend needs nothing and works offline.

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

/** The deltas a page sent since `mark` (their bodies), alone or in a batch. */
const deltas = (page, mark) => page.opsSince(mark).filter((op) => op.action === "delta");

/** Takes the page offline until the returned function is called; waits until it knows. */
async function offline(page) {
  const context = page.page.context();
  await context.setOffline(true);
  await until(async () => (await page.status()) === "offline", "the page to know it is offline");
  return () => context.setOffline(false);
}

test("a credit without a grant is refused (insufficient_scope), undone on the page, and reported", async () => {
  const user = h.user("no-grant");
  await h.hub.delta(user, 10);
  const page = await h.site("roflfaucet").open(user);
  try {
    const start = await h.hub.record(user);
    const { opId, shownRightAfter } = await page.evaluate(() => {
      const opId = window.sync.applyDelta("balance", { coins: 1000 }, "claim");
      return { opId, shownRightAfter: Number(document.getElementById("coins").textContent) };
    });
    assert.equal(shownRightAfter, 1010, "optimistic, as any write");
    const refused = await until(async () => (await page.seen()).refused[0], "the refusal");
    assert.deepEqual([refused.opId, refused.code, refused.dataType], [opId, "insufficient_scope", "balance"]);
    await page.outboxEmpty();
    assert.equal(await page.coins(), 10, "rolled back to the hub's value");
    const end = await h.hub.record(user);
    assert.deepEqual([end.data.coins, end.version], [10, start.version], "nothing changed at the hub");
    assert.equal((await page.seen()).tokenCalls, 1, "a refusal for the scope is not the token's fault");
  } finally {
    await page.close();
  }
});

test("a credit with its site's grant lands once under the grant's op id; the same grant again counts nothing", async () => {
  const user = h.user("grant");
  const site = h.site("roflfaucet");
  const page = await site.open(user);
  try {
    const mark = page.mark();
    const { grant, opId } = site.grant(user, 10);
    const applied = await page.applyDelta(10, "claim", { grant });
    assert.deepEqual(applied, { opId, shownRightAfter: 10 }, "the op takes the grant's op id");
    await page.outboxEmpty();
    const [sent] = deltas(page, mark);
    assert.deepEqual([sent.op_id, sent.grant, sent.delta], [opId, grant, { coins: 10 }]);

    const again = await page.evaluate((grant) => {
      try {
        window.sync.applyDelta("balance", { coins: 10 }, "claim", { grant });
        return null;
      } catch (e) {
        return e.code;
      }
    }, grant);
    assert.equal(again, "duplicate_op");
    assert.equal(await page.coins(), 10);
    assert.equal(await h.hub.coins(user), 10);
    assert.equal(deltas(page, mark).length, 1);
  } finally {
    await page.close();
  }
});

test("a credit queued offline past its grant's life is granted again through getGrant and lands exactly once", async () => {
  const user = h.user("regrant");
  const site = h.site("roflfaucet");
  const page = await site.open(user);
  try {
    const mark = page.mark();
    const online = await offline(page);
    // Granted before the page went offline; by the time it is back, the grant has expired.
    const { grant, opId } = site.grant(user, 7, { expiredSecsAgo: 60 });
    try {
      await page.applyDelta(7, "claim", { grant });
      assert.equal(await page.coins(), 7, "shown at once, offline");
      assert.deepEqual((await page.stored()).outbox.map((op) => op.op_id), [opId]);
    } finally {
      await online();
    }
    await page.outboxEmpty();

    const asked = (await page.seen()).grantAsks;
    assert.deepEqual(asked, [{ opId, dataType: "balance", delta: { coins: 7 }, reason: "claim" }]);
    assert.deepEqual(
      site.regrants.filter((op) => op === opId),
      [opId],
      "the site's backend was asked once, for that op",
    );
    const sent = deltas(page, mark);
    assert.deepEqual(
      sent.map((op) => op.op_id),
      [opId, opId],
      "refused as expired, then sent again as the same op",
    );
    assert.equal(sent[0].grant, grant);
    assert.notEqual(sent[1].grant, grant, "with the fresh grant");
    assert.deepEqual((await page.seen()).refused, []);
    const record = await h.hub.record(user);
    assert.deepEqual([record.data.coins, record.version], [7, 1], "applied exactly once");

    const reload = page.mark();
    await page.reload();
    await page.forceSync();
    assert.equal(deltas(page, reload).length, 0, "the reloaded page sends nothing again");
    assert.equal(await page.coins(), 7);
  } finally {
    await page.close();
  }
});

test("without getGrant, a credit whose grant expired is refused and undone", async () => {
  const user = h.user("expired");
  const site = h.site("roflfaucet");
  const page = await site.open(user, { getGrant: 0 });
  try {
    const { grant, opId } = site.grant(user, 5, { expiredSecsAgo: 60 });
    await page.applyDelta(5, "claim", { grant });
    const refused = await until(async () => (await page.seen()).refused[0], "the refusal");
    assert.deepEqual([refused.opId, refused.code], [opId, "grant_expired"]);
    await page.outboxEmpty();
    assert.equal(await page.coins(), 0);
    assert.equal((await h.hub.coins(user)) ?? 0, 0, "nothing reached the hub");
    assert.ok(!site.regrants.includes(opId), "nobody asked the site again");
  } finally {
    await page.close();
  }
});

test("a spend works offline and reaches the hub once when the page is back online", async () => {
  const user = h.user("spend-offline");
  await h.hub.delta(user, 20);
  const page = await h.site("clickforcharity").open(user);
  try {
    const start = await h.hub.record(user);
    const mark = page.mark();
    const online = await offline(page);
    try {
      await page.applyDelta(-5, "donation");
      await page.applyDelta(-8, "donation");
      assert.equal(await page.coins(), 7);
      assert.deepEqual(page.requestsSince(mark), [], "nothing is sent while offline");
      assert.equal((await page.stored()).outbox.length, 2);
    } finally {
      await online();
    }
    await page.outboxEmpty();
    const end = await h.hub.record(user);
    assert.deepEqual([end.data.coins, end.version], [7, start.version + 2], "each spend applied once");
    assert.equal(deltas(page, mark).length, 2);
    assert.ok(deltas(page, mark).every((op) => op.grant === undefined), "a spend carries no grant");
    assert.deepEqual((await page.seen()).refused, []);
  } finally {
    await page.close();
  }
});
