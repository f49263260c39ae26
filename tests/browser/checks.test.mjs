// Pulling: what a page asks the hub on login, on a tab return, and what it leaves alone.

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

const DEFAULT_TYPES = "balance,profile,roles";

test("login checks every configured type: one timestamp request, then one get per type", async () => {
  const user = h.user("login");
  const page = await h.site("roflfaucet").open(user);
  try {
    assert.equal(page.loginResult, true, "login resolves true when the data is fresh");
    const [stamps, ...gets] = page.requestsSince();
    assert.equal(stamps, `timestamp ${DEFAULT_TYPES}`);
    assert.deepEqual(gets.sort(), ["get balance", "get profile", "get roles"]);
    assert.equal(await page.coins(), 0, "a new user's balance is shown");
    assert.equal(await page.status(), "idle");
  } finally {
    await page.close();
  }

  // Another page asking for other types gets exactly those.
  const other = await h.site("clickforcharity").open(h.user("login"), { types: "points,settings,balance" });
  try {
    const [stamps, ...gets] = other.requestsSince();
    assert.equal(stamps, "timestamp points,settings,balance");
    assert.deepEqual(gets.sort(), ["get balance", "get points", "get settings"]);
  } finally {
    await other.close();
  }
});

test("a reload shows the cached coins at once, and login then costs one request", async () => {
  const user = h.user("reload");
  await h.hub.delta(user, 40);
  const page = await h.site("roflfaucet").open(user);
  try {
    assert.equal(await page.coins(), 40);
    const mark = page.mark();
    await page.reload();
    const seen = await page.seen();
    assert.deepEqual(
      { coins: seen.balance[0].coins, source: seen.balance[0].source },
      { coins: 40, source: "cache" },
      "the first thing the reloaded page shows is the cached balance",
    );
    assert.deepEqual(page.requestsSince(mark), [`timestamp ${DEFAULT_TYPES}`]);
    assert.equal(await page.coins(), 40);
  } finally {
    await page.close();
  }
});

test("a tab return with nothing changed costs exactly one request to the hub", async () => {
  const page = await h.site("roflfaucet").open(h.user("return"));
  try {
    for (let i = 0; i < 3; i++) {
      const mark = page.mark();
      const statuses = await page.tabReturns();
      assert.ok(statuses.includes("syncing"), "the tab return started a check");
      assert.deepEqual(page.requestsSince(mark), [`timestamp ${DEFAULT_TYPES}`]);
      // The CORS preflight of the timestamp URL was answered at login with a max-age; a
      // tab return must not send it again, or it costs two requests.
      assert.equal(page.preflightsSince(mark), 0, "no CORS preflight: the browser's preflight cache answers");
    }
    const answer = await page.hubRequests.at(-1).request.response();
    assert.equal(answer.status(), 200);
    const size = (await answer.body()).length;
    assert.ok(size <= 300, `the answer is small (${size} bytes)`);
    assert.equal(await page.status(), "idle");
  } finally {
    await page.close();
  }
});

test("a change made through another client shows after the next tab return; only that type is fetched", async () => {
  const user = h.user("remote");
  const page = await h.site("roflfaucet").open(user);
  try {
    const before = page.mark();
    const { version } = await h.hub.delta(user, 25); // e.g. clickforcharity's backend
    assert.deepEqual(page.requestsSince(before), [], "the page does not poll");
    assert.equal(await page.coins(), 0);

    await page.tabReturns();
    assert.equal(await page.coins(), 25);
    assert.deepEqual(page.requestsSince(before), [`timestamp ${DEFAULT_TYPES}`, "get balance"]);
    const requests = page.hubRequests.slice(before.requests);
    const opened = page.hubRequests.slice(0, before.requests).findLast((r) => r.what === "get balance");
    const etag = (await opened.request.response()).headers().etag;
    assert.match(etag, /^"[\w-]+-0"$/, "the hub's ETag names its epoch and the version");
    assert.equal(requests[1].ifNoneMatch, etag, "the fetch sends back the ETag the hub gave");
    const seen = await page.seen();
    assert.deepEqual(
      { coins: seen.balance.at(-1).coins, version: seen.balance.at(-1).version, source: seen.balance.at(-1).source },
      { coins: 25, version, source: "hub" },
    );

    const mark = page.mark();
    await h.hub.push(user, "profile", { display_name: "Evans" });
    await page.tabReturns();
    assert.equal(await page.page.textContent("#name"), "Evans");
    assert.deepEqual(page.requestsSince(mark), [`timestamp ${DEFAULT_TYPES}`, "get profile"]);
  } finally {
    await page.close();
  }
});

test("focus events are ignored", async () => {
  const page = await h.site("roflfaucet").open(h.user("focus"));
  try {
    const mark = page.mark();
    const after = await page.evaluate(() => {
      const mark = window.seen.status.length;
      window.dispatchEvent(new FocusEvent("focus"));
      document.dispatchEvent(new FocusEvent("focus"));
      return { status: window.sync.status, statuses: window.seen.status.slice(mark) };
    });
    assert.deepEqual(after, { status: "idle", statuses: [] }, "no check started");
    // A real trigger afterwards costs its one request: nothing was queued by the focus.
    await page.tabReturns();
    assert.deepEqual(page.requestsSince(mark), [`timestamp ${DEFAULT_TYPES}`]);
  } finally {
    await page.close();
  }
});

test("without any trigger, a visible tab checks again after inactivityMs", async () => {
  const user = h.user("inactive");
  const page = await h.site("roflfaucet").open(user, { inactivityMs: 200 });
  try {
    const mark = page.mark();
    await h.hub.delta(user, 7);
    await until(async () => (await page.coins()) === 7, "the inactivity check to fetch the new balance");
    assert.deepEqual(page.requestsSince(mark).slice(0, 2), [`timestamp ${DEFAULT_TYPES}`, "get balance"]);
  } finally {
    await page.close();
  }
});

test('localStorage.sync_debug = "true" logs each decision in the seed\'s format', async () => {
  const user = h.user("debug");
  const page = await h.site("roflfaucet").open(user);
  try {
    assert.deepEqual(
      page.console.filter((l) => l.startsWith("[SYNC]")),
      [],
      "silent unless asked",
    );
    await page.evaluate(() => {
      localStorage.sync_debug = "true";
    });
    await page.reload();
    const decisions = () => page.console.filter((l) => /^\[SYNC\] \w+: server=/.test(l));
    assert.deepEqual(decisions(), [
      "[SYNC] balance: server=v0, local=v0 → SKIP",
      "[SYNC] profile: server=v0, local=v0 → SKIP",
      "[SYNC] roles: server=v0, local=v0 → SKIP",
    ]);

    await h.hub.delta(user, 3);
    const mark = decisions().length;
    await page.tabReturns();
    assert.deepEqual(decisions().slice(mark), [
      "[SYNC] balance: server=v1, local=v0 → FETCH",
      "[SYNC] profile: server=v0, local=v0 → SKIP",
      "[SYNC] roles: server=v0, local=v0 → SKIP",
    ]);
    assert.ok(
      page.console.some((l) => l.startsWith("[SYNC] Tab visible")),
      "the trigger is logged too",
    );
  } finally {
    await page.evaluate(() => localStorage.removeItem("sync_debug"));
    await page.close();
  }
});

test("triggers that arrive together share one check", async () => {
  const page = await h.site("roflfaucet").open(h.user("together"));
  try {
    const mark = page.mark();
    const results = await page.evaluate(async () => {
      const waits = [window.sync.ensureFresh("balance"), window.sync.forceSync()];
      document.dispatchEvent(new Event("visibilitychange"));
      waits.push(window.sync.ensureFresh());
      return Promise.all(waits);
    });
    await page.idle();
    assert.deepEqual(results, [true, true, true]);
    assert.deepEqual(page.requestsSince(mark), [`timestamp ${DEFAULT_TYPES}`]);
  } finally {
    await page.close();
  }
});

test("a hub with a new database (new epoch) makes the page drop its cache and fetch everything", async () => {
  const user = h.user("epoch");
  await h.hub.delta(user, 40);
  const page = await h.site("roflfaucet").open(user);
  try {
    assert.equal(await page.coins(), 40);
    const epoch = (await page.stored()).epoch;
    await h.hub.wipe();
    const mark = page.mark();
    await page.tabReturns();
    const [stamps, ...gets] = page.requestsSince(mark);
    assert.equal(stamps, `timestamp ${DEFAULT_TYPES}`);
    assert.deepEqual(gets.sort(), ["get balance", "get profile", "get roles"], "everything is fetched again");
    assert.equal(await page.coins(), 0, "the old database's coins are gone");
    assert.notEqual((await page.stored()).epoch, epoch);
  } finally {
    await page.close();
  }
});

test("a listener added later hears the known data at once; off() stops it", async () => {
  const user = h.user("listeners");
  await h.hub.delta(user, 11);
  const page = await h.site("roflfaucet").open(user);
  try {
    const heardAtOnce = await page.evaluate(() => {
      window.late = [];
      window.lateListener = (data) => window.late.push(data.coins);
      window.sync.on("balance", window.lateListener);
      return [...window.late];
    });
    assert.deepEqual(heardAtOnce, [11]);
    await page.evaluate(() => window.sync.off("balance", window.lateListener));
    await h.hub.delta(user, 1);
    await page.tabReturns();
    assert.equal(await page.coins(), 12, "the page's own listener still hears");
    assert.deepEqual(await page.evaluate(() => window.late), [11], "the removed one does not");
  } finally {
    await page.close();
  }
});

test("sync_debug set on a live page logs from the next decision on, without a reload", async () => {
  const user = h.user("debug-live");
  const page = await h.site("roflfaucet").open(user);
  try {
    const lines = () => page.console.filter((l) => l.startsWith("[SYNC]"));
    await page.tabReturns();
    assert.deepEqual(lines(), [], "silent unless asked");
    await page.evaluate(() => {
      localStorage.sync_debug = "true";
    });
    await page.tabReturns();
    assert.ok(lines().some((l) => l.startsWith("[SYNC] Tab visible")), JSON.stringify(page.console));
    assert.ok(lines().some((l) => /^\[SYNC\] balance: server=v0, local=v0 → SKIP$/.test(l)));
    await page.evaluate(() => localStorage.removeItem("sync_debug"));
    const mark = lines().length;
    await page.tabReturns();
    assert.deepEqual(lines().slice(mark), [], "silent again once it is removed");
  } finally {
    await page.evaluate(() => localStorage.removeItem("sync_debug"));
    await page.close();
  }
});
