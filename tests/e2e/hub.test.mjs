// The seed's Phase 3 list, items 5–7: the hub stopped (frozen with SIGSTOP, and killed and
// started again), a slow hub and a fast one, and the documented debug lines; and a claim
// granted by the faucet's backend across a restart of everything.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { OFFLINE_MS, startDemo, until } from "./harness.mjs";

let demo;
before(async () => {
  demo = await startDemo();
});
after(async () => {
  demo?.thawHub();
  const exit = await demo?.close();
  if (exit && !exit.already) assert.deepEqual([exit.code, exit.signal], [0, null], "the demo exits cleanly on SIGINT");
});

const offline = (tab) =>
  until(async () => (await tab.status()) === "offline", `${tab.site} to show the offline status`, OFFLINE_MS);

test("5. with the hub stopped both sites keep working from their cache and show offline; what was done meanwhile reaches the hub exactly once, also across a page reload", async () => {
  const user = demo.user("hub-down");
  await demo.hubDelta(user, 40);
  const faucet = await demo.open("faucet", user);
  const charity = await demo.open("charity", user);
  await faucet.settled();
  await charity.settled();
  assert.equal(await faucet.coins(), 40);

  await demo.freezeHub(); // SIGSTOP: the hub answers nothing; the sites' own backends stay up
  let expected = 40;
  try {
    await charity.earn();
    await charity.earn();
    expected += 2;
    await charity.shows(expected);
    await offline(charity);
    assert.equal(await charity.pending(), 2, "the clicks wait in this browser");

    await faucet.tabReturns({ wait: false });
    await offline(faucet);
    // ensureFresh fails, the cached balance allows the stake, and the faucet's backend names
    // it; but it rolls only a paid stake, and the hub cannot say yet.
    assert.equal(await faucet.play(), null, "the stake is made and its roll waits");
    assert.equal(await faucet.outcome(), "pending");

    // The charity page is reloaded while the hub is still down: its clicks survive.
    await charity.reload();
    await offline(charity);
    assert.equal(await charity.coins(), 42, "the reloaded page shows the cached balance with its clicks");
    assert.equal(await charity.pending(), 2, "and still holds them for the hub");
  } finally {
    demo.thawHub(); // SIGCONT: the hub answers every request it was sent meanwhile
  }
  for (const tab of [faucet, charity]) {
    await tab.tabReturns({ wait: false });
    await tab.settled(OFFLINE_MS);
  }
  expected += await faucet.rolled(); // back in step with the hub, the page asks for its roll
  await faucet.settled();
  assert.equal(await demo.hubCoins(user), expected, "each click, the stake and any prize counted exactly once");
  for (const tab of [faucet, charity]) {
    await tab.tabReturns();
    assert.equal(await tab.coins(), expected, `${tab.site} ends on the hub's value`);
  }
});

test("5b. with the whole demo stopped and started again on the same data, the pages' offline donations reach the hub exactly once; a click waits for its site's backend", async () => {
  const user = demo.user("hub-restart");
  await demo.hubDelta(user, 20);
  const charity = await demo.open("charity", user);
  const faucet = await demo.open("faucet", user);
  await charity.settled();
  await faucet.settled();

  const exit = await demo.stop(); // Ctrl-C: the hub and the sites' backends are gone
  assert.deepEqual([exit.code, exit.signal], [0, null]);
  for (let i = 0; i < 3; i++) await charity.donate();
  await charity.shows(5);
  await offline(charity);
  assert.equal(await charity.pending(), 3, "the donations wait in this browser");
  // A click's coin is the backend's to grant: without it, nothing is counted.
  await charity.page.click("#earn");
  await until(async () => (await charity.page.getAttribute("#earned", "data-outcome")) === "unreachable", "the refused click");
  assert.equal(await charity.coins(), 5);
  await faucet.tabReturns({ wait: false });
  await offline(faucet);
  assert.equal(await faucet.coins(), 20, "the faucet still shows its cached balance");

  await demo.start();
  for (const tab of [charity, faucet]) {
    await tab.tabReturns({ wait: false });
    await tab.settled(OFFLINE_MS);
  }
  assert.equal(await demo.hubCoins(user), 5, "the three donations counted exactly once");
  await faucet.tabReturns();
  assert.equal(await faucet.coins(), 5);
  await charity.reload();
  await charity.settled();
  assert.equal(await charity.coins(), 5, "a reload delivers nothing twice");
  assert.equal(await demo.hubCoins(user), 5);
});

test("5c. a claim granted by the faucet's backend lands exactly once across a restart of the hub and a reload of the page", async () => {
  const user = demo.user("claim");
  const faucet = await demo.open("faucet", user);
  await faucet.settled();
  const hubApi = `${demo.hubUrl}/api/**`;

  // The page cannot reach the hub (its requests fail); its site's backend it can.
  await faucet.page.route(hubApi, (route) => route.abort());
  assert.equal(await faucet.claim(), "claimed");
  await faucet.shows(10);
  await offline(faucet);
  assert.equal(await faucet.pending(), 1, "the claim waits in this browser");
  assert.equal(await faucet.claim(), "wait", "one claim a period");
  assert.equal(await faucet.coins(), 10);

  const exit = await demo.stop();
  assert.deepEqual([exit.code, exit.signal], [0, null]);
  await demo.start();
  assert.equal(await demo.hubCoins(user), 0, "the hub has not had it yet");

  // Reloaded once the hub is in reach: the leaving page's flush and the new page's resend
  // may both carry it.
  await faucet.page.unroute(hubApi);
  await faucet.reload();
  await faucet.settled(OFFLINE_MS);
  assert.equal(await demo.hubCoins(user), 10, "the claim counted once");

  // The restarted backend no longer knows the claim was made, and grants the period's op
  // again: the hub replays it.
  await faucet.claim();
  await faucet.settled();
  await faucet.tabReturns();
  assert.equal(await demo.hubCoins(user), 10, "a claim asked again in its period counts nothing");
  assert.equal(await faucet.coins(), 10);
});

/** Starts recording, in the page, every moment the package's spinner is visible. */
function watchSpinner(tab) {
  return tab.page.evaluate(() => {
    window.spinnerShown = 0;
    const look = () => {
      const spinner = document.querySelector(".sync-spinner");
      if (spinner && !spinner.hidden && spinner.checkVisibility()) window.spinnerShown += 1;
    };
    new MutationObserver(look).observe(document.documentElement, {
      subtree: true,
      childList: true,
      attributes: true,
      attributeFilter: ["hidden", "class", "style"],
    });
    look();
  });
}

test("6. a slow hub shows the spinner, a fast one never flashes it", async () => {
  const user = demo.user("spinner");
  const faucet = await demo.open("faucet", user);
  await faucet.settled();

  // A live page checks only when asked (Force Sync); a tab return needs no check.
  const check = async () => {
    await faucet.page.click("#force-sync");
    await faucet.idle();
  };
  await watchSpinner(faucet);
  for (let i = 0; i < 5; i++) await check();
  assert.equal(await faucet.page.evaluate(() => window.spinnerShown), 0, "fast checks never show it");

  await demo.freezeHub();
  try {
    await faucet.page.click("#force-sync");
    await until(() => faucet.page.evaluate(() => window.spinnerShown > 0), "the spinner while the hub is slow");
    assert.equal(await faucet.page.getAttribute(".sync-spinner", "role"), "status");
  } finally {
    demo.thawHub();
  }
  await faucet.settled(OFFLINE_MS);
  await until(
    () => faucet.page.evaluate(() => !document.querySelector(".sync-spinner")?.checkVisibility()),
    "the spinner to hide once the hub answered",
  );
});

test("7. localStorage.sync_debug = \"true\" logs the documented [SYNC] lines", async () => {
  const user = demo.user("debug");
  const faucet = await demo.open("faucet", user);
  const charity = await demo.open("charity", user);
  await faucet.settled();
  await faucet.page.evaluate(() => localStorage.setItem("sync_debug", "true"));
  // The user leaves the faucet, earns on the charity site, and opens the faucet again: its
  // login checks and fetches what changed.
  await faucet.page.goto("about:blank");
  await charity.earn();
  await charity.settled();
  let from = faucet.console.length;
  await faucet.goto();
  await faucet.settled();
  let lines = faucet.console.slice(from);
  assert.ok(lines.some((l) => /^\[SYNC\] .+ - checking timestamps$/.test(l)), `a check line in ${JSON.stringify(lines)}`);
  assert.ok(
    lines.some((l) => /^\[SYNC\] balance: server=v\d+, local=(v\d+|none) → FETCH$/.test(l)),
    `a FETCH line for the changed balance in ${JSON.stringify(lines)}`,
  );
  assert.ok(
    lines.some((l) => /^\[SYNC\] profile: server=(v\d+|none), local=(v\d+|none) → (FETCH|SKIP)$/.test(l)),
    `a line for the profile in ${JSON.stringify(lines)}`,
  );

  // Live, the next change comes as an event.
  from = faucet.console.length;
  await charity.earn();
  await charity.settled();
  await faucet.shows(await charity.coins());
  lines = faucet.console.slice(from);
  assert.ok(
    lines.some((l) => /^\[SYNC\] balance: event v\d+ → APPLY$/.test(l)),
    `an event line for the balance in ${JSON.stringify(lines)}`,
  );

  const again = faucet.console.length;
  await faucet.page.click("#force-sync");
  await faucet.idle();
  const unchanged = faucet.console.slice(again);
  assert.ok(
    unchanged.some((l) => /^\[SYNC\] balance: server=v(\d+), local=v\1 → SKIP$/.test(l)),
    `a SKIP line when nothing changed in ${JSON.stringify(unchanged)}`,
  );

  assert.ok(!charity.console.some((l) => l.startsWith("[SYNC]")), "without the flag, the other site logs nothing");
});
