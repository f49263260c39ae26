// The hub's event stream: a change made on one site reaches the other sites' visible pages
// without any user action; one stream per site, shared with the site's other tabs; a hidden
// tab closes its stream after the grace and resumes it on return; a hub without events leaves
// pages as they were before streams.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { startHarness, until } from "./harness.mjs";

/** How long a hidden tab keeps its stream (sync-core's STREAM_GRACE_MS), and some slack. */
const GRACE_MS = 10_000;
const PAST_GRACE_MS = GRACE_MS + 10_000;

let h;
before(async () => {
  h = await startHarness();
});
after(async () => {
  await h?.close();
});

const isLive = (page) => until(() => page.live(), `${page.site.id} to be live`);

test("coins earned on one site appear on the other site's visible page without any user action", async () => {
  const user = h.user("live");
  const faucet = await h.site("roflfaucet").open(user, { events: "hub" });
  const charity = await h.site("clickforcharity").open(user, { events: "hub" });
  try {
    await isLive(faucet);
    await isLive(charity);
    for (const page of [faucet, charity]) {
      const [stream] = page.streams;
      assert.equal(page.streams.length, 1);
      assert.match(stream.authorization, /^Bearer /, "the token travels in the Authorization header");
      assert.equal(new URL(stream.url).search, `?user_id=${user}`, "and nowhere in the URL");
      assert.deepEqual((await page.seen()).live, [true]);
    }
    await charity.evaluate(() => {
      window.arrivals = [];
      window.sync.on("balance", (data, meta) => window.arrivals.push({ ...meta, coins: data.coins, at: Date.now() }));
    });
    const quiet = charity.mark();
    const delays = [];
    for (const amount of [7, 11, 13]) {
      const expected = (await h.hub.coins(user)) + amount;
      const sentAt = await faucet.evaluate(() => Date.now());
      await faucet.applyDelta(amount);
      const arrival = await until(
        () => charity.evaluate((coins) => window.arrivals.find((a) => a.coins === coins), expected),
        `the charity page to show ${expected}`,
      );
      assert.equal(arrival.source, "hub");
      assert.equal(await charity.coins(), expected);
      delays.push(arrival.at - sentAt);
    }
    console.log(`a credit on the faucet reached the charity's page after ${delays.join(", ")} ms (the faucet's write included)`);
    assert.deepEqual(charity.requestsSince(quiet), [], "the charity page asked the hub nothing");
    assert.equal(charity.streams.length, 1, "over the one stream it opened");
    assert.deepEqual((await charity.seen()).errors, []);
  } finally {
    await faucet.close();
    await charity.close();
  }
});

test("one tab per site holds the stream; the site's other tab takes its events from it", async () => {
  const user = h.user("live-tabs");
  const faucet = h.site("roflfaucet");
  const first = await faucet.open(user, { events: "hub" });
  const second = await faucet.open(user, { events: "hub" });
  const charity = await h.site("clickforcharity").open(user, { events: "hub" });
  try {
    await Promise.all([isLive(first), isLive(second), isLive(charity)]);
    assert.equal(first.streams.length + second.streams.length, 1, "one stream for the site");
    const follower = first.streams.length === 0 ? first : second;
    const quiet = follower.mark();
    await charity.applyDelta(9);
    await until(async () => (await follower.coins()) === 9, "the tab without the stream to show 9");
    const last = (await follower.seen()).balance.at(-1);
    assert.deepEqual([last.coins, last.source], [9, "hub"]);
    assert.deepEqual(follower.requestsSince(quiet), [], "it asked the hub nothing");
    assert.equal(first.streams.length + second.streams.length, 1, "still one stream");

    // The holder goes: the other tab takes the stream over, where it was.
    const holder = follower === first ? second : first;
    await holder.close();
    await until(() => follower.streams.length === 1, "the other tab to open the site's stream");
    assert.notEqual(follower.streams[0].lastEventId, null, "it resumes");
    await isLive(follower);
    await charity.applyDelta(4);
    await until(async () => (await follower.coins()) === 13, "the tab now holding the stream to show 13");
  } finally {
    for (const page of [first, second, charity]) await page.close();
  }
});

test("hidden past the grace, a tab closes its stream; on return it resumes with one request", async () => {
  const user = h.user("live-grace");
  const faucet = await h.site("roflfaucet").open(user, { events: "hub" });
  const charity = await h.site("clickforcharity").open(user, { events: "hub" });
  try {
    await isLive(faucet);
    await isLive(charity);

    // A short look elsewhere: the stream stays, the return costs nothing.
    let quiet = faucet.mark();
    await faucet.tabReturns();
    assert.deepEqual(faucet.requestsSince(quiet), []);
    assert.equal(faucet.streams.length, 1);

    await faucet.setVisibility("hidden");
    await until(async () => !(await faucet.live()), "the hidden tab's stream to close", PAST_GRACE_MS);
    assert.deepEqual((await faucet.seen()).live, [true, false]);

    // Nothing changed: the return is the stream alone, resumed.
    quiet = faucet.mark();
    await faucet.setVisibility("visible");
    await isLive(faucet);
    assert.equal(faucet.streams.length, 2);
    assert.notEqual(faucet.streams[1].lastEventId, null, "it resumes with Last-Event-ID");
    assert.deepEqual(faucet.requestsSince(quiet), [], "no timestamp check");
    assert.equal(faucet.streamPreflights.length, 1, "no second CORS preflight: the browser's cache answers");

    // A change made while it is away comes with the resumed stream.
    await faucet.setVisibility("hidden");
    await until(async () => !(await faucet.live()), "the hidden tab's stream to close", PAST_GRACE_MS);
    await charity.applyDelta(6);
    await charity.outboxEmpty();
    quiet = faucet.mark();
    await faucet.setVisibility("visible");
    await until(async () => (await faucet.coins()) === 6, "the returning tab to show 6");
    assert.deepEqual(faucet.requestsSince(quiet), [], "the change came on the stream");
    assert.equal(faucet.streams.length, 3);
  } finally {
    await faucet.close();
    await charity.close();
  }
});

test("a hub answering 404 for events leaves the page as it was before streams, with no error", async () => {
  const user = h.user("live-404");
  const page = await h.site("roflfaucet").open(user, { events: "404" });
  try {
    await until(() => page.streams.length === 1, "the page to try the stream");
    await page.idle();
    assert.equal(await page.live(), false);
    assert.equal(await page.status(), "idle");
    assert.equal(await page.evaluate(() => window.sync.statusReason), null);
    const seen = await page.seen();
    assert.deepEqual([seen.errors, seen.live], [[], []]);
    assert.deepEqual(page.errors, []);

    await h.hub.delta(user, 5);
    const mark = page.mark();
    await page.tabReturns();
    assert.deepEqual(page.requestsSince(mark), ["timestamp balance,profile,roles", "get balance"]);
    assert.equal(await page.coins(), 5);
    assert.equal(page.streams.length, 1, "never tried again");
  } finally {
    await page.close();
  }
});
