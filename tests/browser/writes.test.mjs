// Pushing: deltas are shown at once, stored before they are sent, and applied by the hub
// exactly once — across reloads, closed pages, a crashed hub, and refusals; only the hub's own
// answer settles a write; what a page leaves lands in order; old ops and wrong clocks; a full
// storage.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { after, before, test } from "node:test";
import { startHarness, until } from "./harness.mjs";

const DAY_MS = 24 * 60 * 60 * 1000;

/** A UUIDv7 dated `ms`, as a page makes its op ids. */
function uuid7(ms) {
  const time = ms.toString(16).padStart(12, "0");
  const random = randomBytes(10).toString("hex");
  const variant = (8 + (parseInt(random[3], 16) & 3)).toString(16);
  return `${time.slice(0, 8)}-${time.slice(8)}-7${random.slice(0, 3)}-${variant}${random.slice(4, 7)}-${random.slice(7, 19)}`;
}

/** The time a UUIDv7 is dated with. */
const datedMs = (id) => parseInt(id.slice(0, 8) + id.slice(9, 13), 16);

let h;
before(async () => {
  h = await startHarness();
});
after(async () => {
  await h?.close();
});

const deltasSent = (page, mark) => page.requestsSince(mark).filter((r) => r === "delta balance").length;

test("applyDelta shows at once and reaches the hub exactly once; a reload resends nothing", async () => {
  const user = h.user("delta");
  await h.hub.delta(user, 100);
  const page = await h.site("roflfaucet").open(user);
  try {
    const start = await h.hub.record(user);
    const mark = page.mark();
    const { opId, shownRightAfter } = await page.applyDelta(10);
    assert.equal(shownRightAfter, 110, "shown before the hub answers");

    await page.outboxEmpty();
    const end = await h.hub.record(user);
    assert.deepEqual(
      { coins: end.data.coins, version: end.version },
      { coins: 110, version: start.version + 1 },
      "the hub applied it once",
    );
    assert.equal(deltasSent(page, mark), 1);
    const sent = page.hubRequests.slice(mark.requests).find((r) => r.action === "delta");
    assert.equal(sent.body.op_id, opId);
    assert.equal(sent.body.reason, "game");
    assert.equal(await page.coins(), 110);

    const reload = page.mark();
    await page.reload();
    assert.equal(await page.coins(), 110);
    await page.forceSync();
    assert.equal(deltasSent(page, reload), 0, "the reloaded page sends nothing again");
    assert.deepEqual(await h.hub.record(user).then((r) => [r.data.coins, r.version]), [110, start.version + 1]);
  } finally {
    await page.close();
  }
});

test("a reload before the hub answered still applies the delta exactly once", async () => {
  const user = h.user("reload-delta");
  await h.hub.delta(user, 50);
  const page = await h.site("roflfaucet").open(user);
  try {
    const start = await h.hub.record(user);
    await h.hub.pause(); // the hub accepts the connection but answers nothing yet
    let resumed = false;
    try {
      const mark = page.mark();
      const { opId } = await page.applyDelta(5);
      await until(() => deltasSent(page, mark) === 1, "the first send");
      assert.deepEqual(
        (await page.stored()).outbox.map((op) => op.op_id),
        [opId],
        "stored before it was sent",
      );
      // Reload while the hub holds the request: the old page's send, its `pagehide` flush and
      // the new page's resend may all reach the hub.
      await page.page.reload({ waitUntil: "commit" });
      h.hub.resume();
      resumed = true;
      await page.started();
      await page.outboxEmpty();
    } finally {
      if (!resumed) h.hub.resume();
    }
    const end = await h.hub.record(user);
    assert.deepEqual([end.data.coins, end.version], [55, start.version + 1], "applied exactly once");
    await page.forceSync();
    assert.equal(await page.coins(), 55);
  } finally {
    await page.close();
  }
});

test("a delta left by a page closed while the hub was down is delivered once by the next page", async () => {
  const user = h.user("outbox");
  await h.hub.delta(user, 20);
  const site = h.site("roflfaucet");
  const first = await site.open(user);
  const start = await h.hub.record(user);

  await h.hub.stop("SIGKILL");
  let opId;
  try {
    ({ opId } = await first.applyDelta(15));
    assert.equal(await first.coins(), 35, "shown at once, hub or no hub");
    await until(async () => (await first.status()) === "offline", "the page to notice the hub is gone");
    const stored = await first.stored();
    assert.deepEqual(
      stored.outbox.map((op) => [op.op_id, op.data_type]),
      [[opId, "balance"]],
      "the delta waits in localStorage",
    );
  } finally {
    await first.close();
    await h.hub.start();
  }

  const second = await site.open(user);
  try {
    await second.outboxEmpty();
    const end = await h.hub.record(user);
    assert.deepEqual([end.data.coins, end.version], [35, start.version + 1], "applied exactly once");
    const sent = second.hubRequests.filter((r) => r.action === "delta");
    assert.deepEqual(
      sent.map((r) => r.body.op_id),
      [opId],
      "resent under its original op id",
    );
    await second.forceSync();
    assert.equal(await second.coins(), 35);
    assert.equal(await h.hub.coins(user), 35);
  } finally {
    await second.close();
  }
});

test("a delta the hub refuses fires `refused` and shows the hub's value again", async () => {
  const user = h.user("refused");
  await h.hub.delta(user, 100);
  const page = await h.site("roflfaucet").open(user);
  try {
    assert.equal(await page.coins(), 100);
    // Another site spends 80 meanwhile; this page does not know yet.
    const spent = await h.hub.delta(user, -80);
    assert.equal(await page.coins(), 100);

    const { opId, shownRightAfter } = await page.applyDelta(-50, "purchase");
    assert.equal(shownRightAfter, 50, "the page's own view allows it");
    const refused = await until(async () => (await page.seen()).refused[0], "the refusal");
    assert.deepEqual(
      { dataType: refused.dataType, opId: refused.opId, code: refused.code },
      { dataType: "balance", opId, code: "insufficient_funds" },
    );
    assert.ok(refused.message.length > 0, "with a message");
    assert.equal(await page.coins(), 20, "rolled back to the hub's balance, not the stale cache");
    await page.outboxEmpty();
    const end = await h.hub.record(user);
    assert.deepEqual([end.data.coins, end.version], [20, spent.version], "nothing changed at the hub");
  } finally {
    await page.close();
  }
});

test("a delta below what the page shows is refused at once, without a request", async () => {
  const user = h.user("local-refusal");
  await h.hub.delta(user, 5);
  const page = await h.site("roflfaucet").open(user);
  try {
    const mark = page.mark();
    const error = await page.evaluate(() => {
      try {
        window.sync.applyDelta("balance", { coins: -6 });
        return null;
      } catch (e) {
        return { code: e.code, message: e.message };
      }
    });
    assert.equal(error?.code, "insufficient_funds");
    assert.equal(await page.coins(), 5);
    assert.deepEqual((await page.stored()).outbox, []);
    assert.deepEqual(page.requestsSince(mark), []);
  } finally {
    await page.close();
  }
});

test("pushChanges shows at once and reaches the hub once", async () => {
  const user = h.user("profile");
  const page = await h.site("roflfaucet").open(user);
  try {
    const mark = page.mark();
    const shown = await page.evaluate(() => {
      window.sync.pushChanges("profile", { display_name: "Evans", bio: "<b>hi</b>" });
      return document.getElementById("name").textContent;
    });
    assert.equal(shown, "Evans");
    await page.outboxEmpty();
    const record = await h.hub.record(user, "profile");
    assert.deepEqual([record.data.display_name, record.data.bio, record.version], ["Evans", "<b>hi</b>", 1]);
    assert.deepEqual(page.requestsSince(mark), ["push profile"]);
  } finally {
    await page.close();
  }
});

test("ensureFresh before a purchase sees another site's spending, so the page refuses it itself", async () => {
  const user = h.user("ensure");
  await h.hub.delta(user, 100);
  const page = await h.site("roflfaucet").open(user);
  try {
    await h.hub.delta(user, -80);
    const mark = page.mark();
    const outcome = await page.evaluate(async () => {
      const fresh = await window.sync.ensureFresh("balance");
      try {
        window.sync.applyDelta("balance", { coins: -50 }, "purchase");
        return { fresh, code: null };
      } catch (e) {
        return { fresh, code: e.code };
      }
    });
    assert.deepEqual(outcome, { fresh: true, code: "insufficient_funds" });
    assert.equal(await page.coins(), 20);
    assert.deepEqual(page.requestsSince(mark), ["timestamp balance,profile,roles", "get balance"]);
  } finally {
    await page.close();
  }
});

test("offline, deltas wait; back online, they go out once and the page checks", async () => {
  const user = h.user("offline");
  const page = await h.site("roflfaucet").open(user);
  const context = page.page.context();
  try {
    const mark = page.mark();
    await context.setOffline(true);
    await until(async () => (await page.status()) === "offline", "the page to know it is offline");
    await page.applyDelta(3);
    await page.applyDelta(4);
    assert.equal(await page.coins(), 7);
    assert.deepEqual(page.requestsSince(mark), [], "nothing is sent while offline");
    assert.equal((await page.stored()).outbox.length, 2);

    await context.setOffline(false);
    await page.outboxEmpty();
    await page.idle();
    const sent = page.requestsSince(mark);
    assert.deepEqual(
      page.opsSince(mark).map((op) => op.delta.coins),
      [3, 4],
      "each sent once, in order (as one batch)",
    );
    assert.ok(sent.includes("timestamp balance,profile,roles"), "coming back online checks the hub");
    const record = await h.hub.record(user);
    assert.deepEqual([record.data.coins, record.version], [7, 2]);
    assert.equal(await page.status(), "idle");
  } finally {
    await context.setOffline(false);
    await page.close();
  }
});

test("closing a page flushes its queued writes with keepalive; the next page finishes the rest once", async () => {
  const user = h.user("keepalive");
  await h.hub.delta(user, 100);
  const site = h.site("roflfaucet");
  const page = await site.open(user);
  const start = await h.hub.record(user);
  await h.hub.pause(); // the first write stays unanswered, so the second waits in the outbox
  try {
    const mark = page.mark();
    await page.applyDelta(1);
    await until(() => deltasSent(page, mark) === 1, "the first write to be sent");
    await page.applyDelta(10);
    assert.equal(deltasSent(page, mark), 1, "writes go one at a time");
    await page.close();
  } finally {
    h.hub.resume();
  }
  // Nobody reopens the site: the hub still gets the queued write, sent during `pagehide`.
  const moved = await until(async () => {
    const coins = (await h.hub.coins(user)) - 100;
    return coins >= 10 && coins;
  }, "the flushed write to reach the hub");
  assert.ok(moved === 10 || moved === 11, `the queued delta arrived (hub moved by ${moved})`);

  const next = await site.open(user);
  try {
    await next.outboxEmpty();
    const end = await h.hub.record(user);
    assert.deepEqual([end.data.coins, end.version], [111, start.version + 2], "each delta applied exactly once");
    assert.equal(await next.coins(), 111);
  } finally {
    await next.close();
  }
});

test("a hub that stops answering: requests time out, the write is retried, and applied once", async () => {
  const user = h.user("timeout");
  const page = await h.site("roflfaucet").open(user, { requestTimeoutMs: 300 });
  const start = await h.hub.record(user);
  await h.hub.pause();
  try {
    const fresh = page.evaluate(() => window.sync.ensureFresh());
    await page.applyDelta(2);
    assert.equal(await fresh, false, "the check gives up and the page keeps its cached data");
    await until(async () => (await page.status()) === "offline", "the page to report offline");
  } finally {
    h.hub.resume();
  }
  try {
    await page.outboxEmpty();
    const end = await h.hub.record(user);
    assert.deepEqual([end.data.coins, end.version], [2, start.version + 1], "applied once");
    assert.equal(await page.forceSync(), true);
    assert.equal(await page.status(), "idle");
    assert.equal(await page.coins(), 2);
  } finally {
    await page.close();
  }
});

test("destroy() stops syncing, removes the indicator and keeps unconfirmed writes for the next page", async () => {
  const user = h.user("destroy");
  const site = h.site("roflfaucet");
  const page = await site.open(user, { spinnerDelayMs: 0 });
  try {
    await h.hub.stop();
    const { opId } = await page.applyDelta(6);
    const pending = page.evaluate(() => window.sync.forceSync());
    await page.evaluate(() => window.sync.destroy());
    assert.equal(await pending, false, "a check still waited on resolves false");
    assert.notEqual(await page.evaluate(() => window.sync.status), "syncing", "the abandoned check is not reported");
    const statusRightAfterReturn = await page.evaluate(() => {
      document.dispatchEvent(new Event("visibilitychange")); // the document is visible
      return window.sync.status; // a check would have started synchronously
    });
    assert.notEqual(statusRightAfterReturn, "syncing", "a tab return starts no check");
    assert.equal(await page.evaluate(() => document.querySelectorAll(".sync-indicator").length), 0);
    assert.deepEqual(
      (await page.stored()).outbox.map((op) => op.op_id),
      [opId],
    );
  } finally {
    await page.close();
    await h.hub.start();
  }
  const next = await site.open(user);
  try {
    await next.outboxEmpty();
    assert.equal(await h.hub.coins(user), 6);
  } finally {
    await next.close();
  }
});

test(
  "the page hears when its write is confirmed (meta.pending back to 0)",
  async () => {
    const user = h.user("confirmed");
    const page = await h.site("roflfaucet").open(user);
    try {
      await page.applyDelta(5);
      await page.outboxEmpty();
      const hub = await h.hub.record(user);
      const last = await until(async () => {
        const last = (await page.seen()).balance.at(-1);
        return last.pending === 0 && last;
      }, "a balance event with nothing pending");
      assert.deepEqual([last.coins, last.version, last.source], [5, hub.version, "hub"]);
    } finally {
      await page.close();
    }
  },
);

test("an answer that is not the hub's (a proxy's 403 page) leaves the write pending and says why", async () => {
  const user = h.user("proxy");
  await h.hub.delta(user, 50);
  const page = await h.site("roflfaucet").open(user);
  const start = await h.hub.record(user);
  // Something in front of the hub answers every write with its own error page.
  const writes = (url) => url.href === h.hub.syncUrl;
  const origin = page.site.origin;
  await page.page.route(writes, (route) =>
    route.request().method() === "POST"
      ? route.fulfill({
          status: 403,
          contentType: "text/html",
          headers: { "access-control-allow-origin": origin },
          body: "<html><body><h1>403 Forbidden</h1></body></html>",
        })
      : route.continue(),
  );
  try {
    const { opId } = await page.applyDelta(-5);
    await until(async () => (await page.status()) === "error", "the status to say error");
    assert.equal(await page.evaluate(() => window.sync.statusReason), "unexpected_answer");
    const seen = await page.seen();
    assert.deepEqual(seen.errors, [{ code: "unexpected_answer", hubCode: null, message: null }]);
    assert.deepEqual(seen.refused, [], "not rolled back");
    assert.equal(await page.coins(), 45, "still shown");
    assert.deepEqual((await page.stored()).outbox.map((op) => op.op_id), [opId], "still pending");

    await page.page.unroute(writes);
    await page.outboxEmpty();
    const end = await h.hub.record(user);
    assert.deepEqual([end.data.coins, end.version], [45, start.version + 1], "applied once, when the hub answered");
    await until(async () => (await page.status()) === "idle", "the status to clear");
    assert.equal(await page.evaluate(() => window.sync.statusReason), null);
  } finally {
    await page.close();
  }
});

test("a credit and a spend pending when the page leaves land in order, in one batch", async () => {
  const user = h.user("leave-batch");
  await h.hub.delta(user, 5);
  const page = await h.site("roflfaucet").open(user);
  const start = await h.hub.record(user);
  const batches = await h.hub.answered("batch");
  await h.hub.pause(); // the first write waits for an answer; the second queues behind it
  let resumed = false;
  try {
    await page.applyDelta(10, "claim");
    await page.applyDelta(-15, "game");
    assert.equal(await page.coins(), 0);
    await page.close(); // pagehide: what is pending leaves with keepalive
    h.hub.resume();
    resumed = true;
  } finally {
    if (!resumed) h.hub.resume();
  }
  const end = await until(async () => {
    const record = await h.hub.record(user);
    return record.version === start.version + 2 && record;
  }, "both writes to land");
  assert.equal(end.data.coins, 0, "the spend came after the credit (first, it would have been refused)");
  assert.equal(
    await h.hub.answered("batch"),
    batches + 1,
    "what the page left went as one keepalive batch (Playwright does not see a closing page's requests)",
  );
});

test("a write stored long ago that the hub no longer knows is refused op_expired and dropped, and the record fetched again", async () => {
  const user = h.user("expired");
  await h.hub.delta(user, 20);
  const site = h.site("roflfaucet");
  await (await site.open(user)).close();
  const start = await h.hub.record(user);
  // A page of this site left a spend in storage two months ago, and nobody came back since.
  const opId = uuid7(Date.now() - 60 * DAY_MS);
  const storage = await h.context.newPage();
  await storage.goto(`${site.origin}/pkg/README.md`);
  await storage.evaluate(
    ([key, op]) => localStorage.setItem(`${key}:op:${op.op_id}`, JSON.stringify(op)),
    [
      `unified-sync:${h.hub.syncUrl}:${user}`,
      { op_id: opId, data_type: "balance", delta: -5, reason: "game", grant: null, at: 1 },
    ],
  );
  await storage.close();
  const page = await site.open(user);
  try {
    const refused = await until(async () => (await page.seen()).refused[0], "the refusal");
    assert.deepEqual([refused.opId, refused.code], [opId, "op_expired"]);
    await page.outboxEmpty();
    // The page checks the hub again (or its login check, still on its way, does it).
    await until(async () => (await page.coins()) === 20, "the page to show the hub's record again");
    const end = await h.hub.record(user);
    assert.deepEqual([end.data.coins, end.version], [20, start.version], "never applied now");
    await page.forceSync();
    assert.equal(await page.coins(), 20, "the hub's record, the old spend dropped");
  } finally {
    await page.close();
  }
});

test("a device whose clock is two months behind dates its op ids by the hub's clock, and the hub applies them", async () => {
  const user = h.user("clock");
  await h.hub.delta(user, 20);
  const behind = Date.now() - 60 * DAY_MS;
  const page = await h.site("roflfaucet").open(user, {}, "/", (p) => p.clock.setSystemTime(behind));
  try {
    assert.ok((await page.evaluate(() => Date.now())) < Date.now() - 59 * DAY_MS, "the page's clock is behind");
    const { opId } = await page.applyDelta(-5);
    const off = datedMs(opId) - Date.now();
    assert.ok(Math.abs(off) < 10_000, `${opId} is dated ${off} ms from the hub's clock`);
    await page.outboxEmpty();
    assert.deepEqual((await page.seen()).refused, []);
    assert.equal(await h.hub.coins(user), 15);
  } finally {
    await page.close();
  }
});

test("a storage that refuses the pending writes is an error until it has room again; the write is sent all the same", async () => {
  const user = h.user("quota");
  await h.hub.delta(user, 20);
  const page = await h.site("roflfaucet").open(user);
  const start = await h.hub.record(user);
  const fill = () =>
    page.evaluate(() => {
      let chunk = "x".repeat(1 << 20);
      for (let i = 0; chunk.length > 0; i++) {
        try {
          localStorage.setItem(`filler-${i}`, chunk);
        } catch {
          chunk = chunk.slice(0, chunk.length >> 1);
        }
      }
    });
  const empty = () =>
    page.evaluate(() => Object.keys(localStorage).forEach((k) => k.startsWith("filler-") && localStorage.removeItem(k)));
  try {
    await fill();
    await h.hub.pause(); // the write stays pending, so the page must keep storing it
    try {
      await page.applyDelta(-1);
      assert.deepEqual(await page.evaluate(() => [window.sync.status, window.sync.statusReason]), [
        "error",
        "storage_failed",
      ]);
      assert.deepEqual((await page.seen()).errors, [{ code: "storage_failed", hubCode: null, message: null }]);
    } finally {
      h.hub.resume();
    }
    await until(async () => (await h.hub.record(user)).version === start.version + 1, "the write to land");

    await empty();
    await page.applyDelta(-1);
    await page.outboxEmpty();
    await until(async () => (await page.status()) === "idle", "the status to clear");
    assert.equal(await page.evaluate(() => window.sync.statusReason), null);
    assert.equal(await h.hub.coins(user), 18);
  } finally {
    await empty();
    await page.close();
  }
});
