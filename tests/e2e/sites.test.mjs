// The seed's Phase 3 list, items 1–4 and 8: coins and profile travel between the two real
// demo sites on their two origins, through the real hub started by `xtask demo`; every coin
// earned is granted by the site's backend.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { artifactPath, startDemo, until } from "./harness.mjs";

let demo;
before(async () => {
  demo = await startDemo();
});
after(async () => {
  const exit = await demo?.close();
  if (exit && !exit.already) assert.deepEqual([exit.code, exit.signal], [0, null], "the demo exits cleanly on SIGINT");
});

test("1. coins earned on the charity site show on the faucet when the user returns to its tab", async () => {
  const user = demo.user("earn-charity");
  const faucet = await demo.open("faucet", user);
  const charity = await demo.open("charity", user);
  const before = await demo.hubCoins(user);
  await faucet.settled();
  assert.equal(await faucet.coins(), before);

  await charity.bringToFront();
  for (let i = 0; i < 3; i++) await charity.earn();
  await charity.shows(before + 3);
  await charity.settled();
  assert.equal(await demo.hubCoins(user), before + 3, "the hub has every click, once");
  // The faucet, open beside it, is live: the clicks are there before the user comes back.
  await faucet.shows(before + 3);
  assert.ok(await faucet.page.isVisible("#live"), "the faucet says it is live");

  await faucet.tabReturns();
  assert.equal(await faucet.coins(), before + 3, "the faucet shows them after the tab return");

  // The artifacts: each demo site as a person sees it.
  await faucet.page.screenshot({ path: artifactPath("faucet.png"), fullPage: true });
  await charity.page.screenshot({ path: artifactPath("charity.png"), fullPage: true });
});

test("2. coins won or spent on the faucet's game show on the charity site when the user returns to its tab", async () => {
  const user = demo.user("earn-faucet");
  await demo.hubDelta(user, 50);
  const charity = await demo.open("charity", user);
  const faucet = await demo.open("faucet", user);
  await charity.settled();
  assert.equal(await charity.coins(), 50);

  let expected = 50;
  for (let i = 0; i < 3; i++) {
    const change = await faucet.play();
    assert.notEqual(change, 0, "a roll with 50+ coins is made");
    expected += change;
  }
  await faucet.shows(expected);
  await faucet.settled();
  assert.equal(await demo.hubCoins(user), expected);

  await charity.tabReturns();
  assert.equal(await charity.coins(), expected, "the charity site shows the game's outcome");
});

test("3. rapid switching between two charity tabs and a faucet tab: every tab ends on the hub's value, no delta counted twice", async () => {
  const user = demo.user("switching");
  await demo.hubDelta(user, 100);
  const tabs = [await demo.open("charity", user), await demo.open("charity", user), await demo.open("faucet", user)];
  let expected = 100;
  for (let round = 0; round < 5; round++) {
    for (const tab of tabs) {
      await tab.tabReturns({ wait: false });
      if (tab.site === "charity") {
        await tab.earn();
        await tab.earn();
        expected += 2;
      } else {
        expected += await tab.play();
      }
    }
  }
  for (const tab of tabs) await tab.settled();
  for (const tab of tabs) await tab.tabReturns();
  const hub = await demo.hubCoins(user);
  assert.equal(hub, expected, "the hub counted every click and roll exactly once");
  for (const tab of tabs) {
    await tab.settled();
    assert.equal(await tab.coins(), hub, `the ${tab.site} tab ends on the hub's value`);
  }
});

test("Force Sync, beside the sync status, brings what another site's backend changed", async () => {
  const user = demo.user("force-sync");
  // A network that cuts the event stream: only a check brings the change (a live page shows
  // it at once).
  await (await demo.contextFor(user)).route(`${demo.hubUrl}/api/events*`, (route) => route.abort());
  const faucet = await demo.open("faucet", user);
  const charity = await demo.open("charity", user);
  await faucet.settled();
  await charity.settled();
  await demo.hubDelta(user, 30);
  for (const tab of [faucet, charity]) {
    assert.equal(await tab.coins(), 0, `${tab.site} has not checked yet`);
    await tab.page.click("#force-sync");
    await tab.shows(30);
    await tab.settled();
    assert.ok(await tab.page.isEnabled("#force-sync"), "the button is back once the check ended");
  }
});

/** Records, in the page, every time the profile editor opens and what its bio field holds. */
function watchEditor(tab) {
  return tab.page.evaluate(() => {
    window.editorOpenings = [];
    const form = document.getElementById("profile-form");
    new MutationObserver(() => {
      if (!form.hidden) window.editorOpenings.push(form.elements.bio.value);
    }).observe(form, { attributes: true, attributeFilter: ["hidden"] });
  });
}

test("4. a profile changed on one site is what the other site's editor opens with, and what it shows after a tab return or live", async () => {
  const user = demo.user("profile");
  const faucet = await demo.open("faucet", user);
  const charity = await demo.open("charity", user);
  await faucet.settled();
  await charity.settled();

  // Edited on the faucet: the charity tab shows it once the user comes back to it.
  await faucet.page.click("#edit-profile");
  await faucet.page.waitForSelector("#profile-form:not([hidden])");
  await faucet.page.fill("#edit-name", "Ada");
  await faucet.page.fill("#edit-bio", "Written on the faucet");
  await faucet.page.click("#save-profile");
  await faucet.settled();
  await charity.tabReturns();
  assert.equal(await charity.page.textContent("#profile-bio"), "Written on the faucet");
  assert.equal(await charity.page.textContent("#profile-name"), "Ada");

  // Changed elsewhere (the charity site's backend, through the hub) while the faucet tab
  // stays in front: the live page shows it without a tab return, and opening the editor
  // starts from the hub's text, never the one the page had.
  await demo.hubCall(user, {
    site: "charity",
    body: { action: "push", user_id: user, site_id: "clickforcharity", data_type: "profile", data: { bio: "Changed on the other site" } },
  });
  await until(
    async () => (await faucet.page.textContent("#profile-bio")) === "Changed on the other site",
    "the faucet tab, in front, shows the profile changed on the other site",
  );
  await watchEditor(faucet);
  await faucet.page.click("#edit-profile");
  await faucet.page.waitForSelector("#profile-form:not([hidden])");
  assert.deepEqual(await faucet.page.evaluate(() => window.editorOpenings), ["Changed on the other site"]);
  assert.equal(await faucet.page.inputValue("#edit-name"), "Ada");
  await faucet.page.click("#cancel-edit");
});

// Fits the editor's shortest field (the name, 64 characters).
const HOSTILE = `<img src=x onerror="__pwned=1;alert(1);console.log('PWNED')">`;

test("8. a hostile profile text is shown as text on both sites and never run", async () => {
  const user = demo.user("hostile");
  const faucet = await demo.open("faucet", user);
  const charity = await demo.open("charity", user);
  await faucet.settled();
  const images = (tab) => tab.page.evaluate(() => document.querySelectorAll("img").length);
  const imagesBefore = [await images(faucet), await images(charity)];

  await faucet.page.click("#edit-profile");
  await faucet.page.waitForSelector("#profile-form:not([hidden])");
  await faucet.page.fill("#edit-name", HOSTILE);
  await faucet.page.fill("#edit-bio", HOSTILE);
  await faucet.page.fill("#edit-location", HOSTILE);
  await faucet.page.click("#save-profile");
  await faucet.settled();
  assert.equal((await demo.hubRecord(user, "profile")).data.bio, HOSTILE, "the hub keeps the text as written");

  await charity.tabReturns();
  // A fresh page load renders it from the cache and then from the hub.
  const fresh = await demo.open("charity", user);
  await fresh.settled();
  for (const tab of [faucet, charity, fresh]) {
    await until(async () => (await tab.page.textContent("#profile-bio")) === HOSTILE, `${tab.site} to show the text`);
    assert.equal(await tab.page.textContent("#profile-name"), HOSTILE);
    assert.equal(await tab.page.textContent("#profile-location"), HOSTILE);
    assert.equal(await tab.page.evaluate(() => document.querySelectorAll("#profile-bio *, #profile-name *").length), 0);
    assert.equal(await tab.page.evaluate(() => window.__pwned), undefined, `${tab.site}: the handler never ran`);
    assert.deepEqual(tab.dialogs, [], `${tab.site}: no dialog`);
    assert.ok(!tab.console.some((line) => line.includes("PWNED")), `${tab.site}: no console side effect`);
  }
  assert.deepEqual([await images(faucet), await images(charity)], imagesBefore, "no img element was created");
  assert.equal(await images(fresh), imagesBefore[1]);
});
