// Tokens: the page asks its own backend for a token, and once more after a 401.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { startHarness } from "./harness.mjs";

let h;
before(async () => {
  h = await startHarness();
});
after(async () => {
  await h?.close();
});

test("a 401 makes the page call getToken again, and then the check succeeds", async () => {
  const user = h.user("token");
  await h.hub.delta(user, 12);
  const site = h.site("roflfaucet");
  site.handOutBadTokens(1); // e.g. the site rotated its key; the first token is refused
  const page = await site.open(user);
  try {
    assert.equal(page.loginResult, true);
    assert.equal((await page.seen()).tokenCalls, 2, "getToken was called again after the 401");
    assert.equal(site.tokenCalls(user), 2, "the site's backend signed twice");
    const [refused, ...rest] = page.requestsSince();
    assert.equal(refused, "timestamp balance,profile,roles");
    assert.equal(rest[0], "timestamp balance,profile,roles", "the check is repeated with the new token");
    assert.deepEqual(rest.slice(1).sort(), ["get balance", "get profile", "get roles"]);
    assert.equal(await page.coins(), 12);
    assert.equal(await page.status(), "idle");
  } finally {
    await page.close();
  }
});

test("a write met by a 401 gets a fresh token and is applied once", async () => {
  const user = h.user("token-write");
  const page = await h.site("roflfaucet").open(user);
  try {
    assert.equal((await page.seen()).tokenCalls, 1);
    // The site rotates its hub key: the token the page holds is no longer accepted.
    h.hub.rotateSecret("roflfaucet");
    await h.hub.restart();

    const mark = page.mark();
    await page.applyDelta(4);
    await page.outboxEmpty();
    assert.equal((await page.seen()).tokenCalls, 2, "getToken was called again after the 401");
    assert.deepEqual(page.requestsSince(mark), ["delta balance", "delta balance"], "refused once, then sent again");
    const record = await h.hub.record(user);
    assert.deepEqual([record.data.coins, record.version], [4, 1], "applied once");
    assert.equal(await page.status(), "idle");
  } finally {
    await page.close();
  }
});

test("a token refused twice stops the asking (status error) until the page asks again", async () => {
  const user = h.user("token-twice");
  const site = h.site("roflfaucet");
  site.handOutBadTokens(2);
  const page = await site.open(user);
  try {
    assert.equal(page.loginResult, false, "login resolves false: only cached data");
    assert.equal(await page.status(), "error");
    assert.equal((await page.seen()).tokenCalls, 2, "one retry, no loop");
    // The page is told why, with the hub's own code.
    assert.equal(await page.evaluate(() => window.sync.statusReason), "unauthorized");
    const [error, ...more] = (await page.seen()).errors;
    assert.deepEqual(more, []);
    assert.equal(error.code, "unauthorized");
    assert.equal(error.hubCode, "invalid_token");
    assert.match(error.message, /\S/, "the hub's message");
    assert.deepEqual(page.requestsSince(), ["timestamp balance,profile,roles", "timestamp balance,profile,roles"]);

    // A tab return does not hammer the hub with a refused identity…
    const mark = page.mark();
    await page.tabReturns();
    assert.deepEqual(page.requestsSince(mark), []);
    assert.equal((await page.seen()).tokenCalls, 2);

    // …but an explicit request tries again, and now the backend's token is good.
    assert.equal(await page.forceSync(), true);
    assert.equal((await page.seen()).tokenCalls, 3);
    assert.equal(await page.status(), "idle");
  } finally {
    await page.close();
  }
});

test("a page whose backend cannot give a token shows cached data and asks the hub nothing", async () => {
  const user = h.user("no-token");
  const site = h.site("roflfaucet");
  site.tokenEndpointDown = true;
  let page;
  try {
    page = await site.open(user);
    assert.equal(page.loginResult, false);
    assert.equal(await page.status(), "error");
    assert.deepEqual(page.requestsSince(), [], "no request without a token");
    assert.equal(await page.evaluate(() => window.sync.statusReason), "token_failed");
    assert.deepEqual((await page.seen()).errors, [{ code: "token_failed", hubCode: null, message: null }]);
    assert.ok(
      page.console.some((line) => line.includes("unified-balance: getToken threw")),
      `the console says what getToken threw:\n${page.console.join("\n")}`,
    );
    site.tokenEndpointDown = false;
    assert.equal(await page.forceSync(), true, "an explicit sync asks for a token again");
    assert.equal(await page.status(), "idle");
  } finally {
    site.tokenEndpointDown = false;
    await page?.close();
  }
});
