// The hub's dashboard in Chromium: its certificate tile says when the certificate the hub serves
// expires — the days left and the date, amber two weeks before and red three days before — and
// "plain HTTP" on a hub that serves none. The page reads the real hub's data; the expiry in it
// is set here, since this hub speaks plain HTTP (hub/tests/tls.rs checks that an HTTPS hub's
// data carries its certificate's).

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { chromium } from "playwright-core";
import { CHROMIUM_ARGS, Hub, until } from "./harness.mjs";

const DAY_MS = 86_400_000;

let hub;
let browser;
before(async () => {
  hub = new Hub();
  await hub.start();
  browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: CHROMIUM_ARGS });
});
after(async () => {
  await browser?.close();
  await hub?.destroy();
});

/** The certificate tile as the page shows it. */
async function certificateTile(page) {
  await until(async () => (await page.locator("#state").getAttribute("data-state")) === "live", "the dashboard's data");
  return {
    shown: await page.locator("#tile-certificate").textContent(),
    date: await page.locator("#certificate-date").textContent(),
    expiry: await page.locator("#certificate").getAttribute("data-expiry"),
  };
}

test("the certificate tile shows the days left, turning amber and then red as expiry nears", async () => {
  const page = await browser.newPage();
  const problems = [];
  page.on("pageerror", (error) => problems.push(error.message));
  page.on("console", (message) => {
    if (message.type() === "error") problems.push(message.text());
  });

  await page.goto(`${hub.url}/dashboard/`);
  assert.deepEqual(await certificateTile(page), { shown: "–", date: "plain HTTP: no certificate", expiry: "none" });

  for (const [daysLeft, shown, expiry] of [
    [40.5, "in 40 days", "ok"],
    [10.5, "in 10 days", "soon"],
    [1.5, "in 1 day", "urgent"],
    [0.25, "in 6 h", "urgent"],
    [-2, "expired", "urgent"],
  ]) {
    let notAfter;
    await page.unroute("**/dashboard/data");
    await page.route("**/dashboard/data", async (route) => {
      const response = await route.fetch();
      const data = await response.json();
      notAfter = data.now_ms + daysLeft * DAY_MS;
      data.tls_cert_not_after_ms = notAfter;
      await route.fulfill({ response, json: data });
    });
    await page.reload();
    const tile = await certificateTile(page);
    const date = new Date(notAfter).toISOString().replace(/\.\d{3}Z$/, "Z").replace("T", " ");
    assert.deepEqual(tile, { shown, date, expiry }, `${daysLeft} days left`);
  }
  assert.deepEqual(problems, [], "no script error and nothing the content policy blocked");
  await page.close();
});
