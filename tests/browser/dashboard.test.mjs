// The hub's dashboard in Chromium: its certificate tile says when the certificate the hub serves
// expires — the days left and the date, amber two weeks before and red three days before — and
// "plain HTTP" on a hub that serves none. The page reads the real hub's data; the expiry in it
// is set here, since this hub speaks plain HTTP (hub/tests/tls.rs checks that an HTTPS hub's
// data carries its certificate's). Its webhooks table shows each site's queue and deliveries
// from the data (set here too; hub/tests/webhooks.rs checks the real data), a failing receiver
// in red with why, and stays hidden on a hub without webhooks.

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

test("the webhooks table shows each site's queue and deliveries, a failing receiver in red, and hides without webhooks", async () => {
  const page = await browser.newPage();
  const problems = [];
  page.on("pageerror", (error) => problems.push(error.message));
  await page.goto(`${hub.url}/dashboard/`);
  await until(async () => (await page.locator("#state").getAttribute("data-state")) === "live", "the dashboard's data");
  assert.equal(await page.locator("#webhooks").isHidden(), true, "this hub has no webhook");

  await page.route("**/dashboard/data", async (route) => {
    const response = await route.fetch();
    const data = await response.json();
    data.webhooks = [
      {
        site: "roflfaucet", receiver: "https://roflfaucet.com", queued: 0, oldest_pending_secs: 0,
        delivered: 1200, failed: 3, dropped: 0, failing: false, last_failure: "answered 503 Service Unavailable",
      },
      {
        site: "clickforcharity", receiver: "https://clickforcharity.net", queued: 42, oldest_pending_secs: 5400,
        delivered: 7, failed: 18, dropped: 1, failing: true, last_failure: "no answer within 10 s",
      },
    ];
    await route.fulfill({ response, json: data });
  });
  await page.reload();
  await until(async () => (await page.locator("#webhook-rows tr").count()) === 2, "the webhooks' rows");
  const rows = await page.locator("#webhook-rows tr").evaluateAll((trs) =>
    trs.map((tr) => ({ failing: tr.dataset.failing, cells: [...tr.cells].map((td) => td.textContent) })),
  );
  assert.deepEqual(rows, [
    { failing: "false", cells: ["roflfaucet", "https://roflfaucet.com", "0", "–", "1.2k", "3", "0", "delivering"] },
    {
      failing: "true",
      cells: ["clickforcharity", "https://clickforcharity.net", "42", "90 min", "7", "18", "1", "failing: no answer within 10 s"],
    },
  ]);
  assert.equal(await page.locator("#webhooks").isVisible(), true);
  const red = await page.locator('#webhook-rows tr[data-failing="true"] td').first().evaluate((td) => getComputedStyle(td).color);
  assert.equal(red, "rgb(185, 28, 28)");
  assert.deepEqual(problems, []);
  await page.close();
});
