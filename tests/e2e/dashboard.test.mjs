// The hub's dashboard, as its operator opens it after real traffic from both demo sites:
// every chart drawn from the hub's own numbers, no script error, no blocked resource.

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

test("the dashboard draws requests per site, the check hit ratio, latency, errors and rate-limit events", async () => {
  const user = demo.user("dashboard");
  const faucet = await demo.open("faucet", user);
  const charity = await demo.open("charity", user);
  await charity.bringToFront();
  for (let i = 0; i < 3; i++) await charity.earn();
  await charity.settled();
  await faucet.tabReturns();

  // A stranger's bad token, then one user far over the limit of 100 requests a minute.
  const url = `${demo.hubUrl}/api/sync?action=timestamp&user_id=${user}&data_type=balance`;
  const refused = await fetch(url, { headers: { authorization: "Bearer not-a-token" } });
  assert.equal(refused.status, 401);
  const token = await demo.token(user);
  const statuses = [];
  for (let i = 0; i < 110; i++) {
    statuses.push((await fetch(url, { headers: { authorization: `Bearer ${token}` } })).status);
  }
  assert.ok(statuses.includes(429), "the user's limit refused some requests");

  const page = await demo.context.newPage();
  const problems = [];
  page.on("pageerror", (error) => problems.push(error.message));
  page.on("console", (message) => {
    if (message.type() === "error") problems.push(message.text());
  });
  await page.goto(`${demo.hubUrl}/dashboard`);
  assert.equal(new URL(page.url()).pathname, "/dashboard/");
  await until(async () => (await page.locator("#state").getAttribute("data-state")) === "live", "the dashboard's data");

  const count = (selector) => page.locator(selector).count();
  assert.ok((await count("#chart-requests rect")) > 0, "requests are drawn as bars");
  const legend = await page.locator("#legend-requests li").allTextContents();
  for (const site of ["roflfaucet", "clickforcharity", "without a valid token"]) {
    assert.ok(legend.includes(site), `the legend names ${site}: ${legend}`);
  }
  assert.ok((await count("#chart-hit path")) > 0, "the hit ratio is drawn");
  assert.equal(await count("#chart-latency path"), 3, "p50, p95 and p99 are drawn");
  assert.ok((await count("#chart-errors rect")) > 0, "errors and rate-limit events are drawn");
  const requests = Number((await page.locator("#tile-requests").textContent()).replace(/k$/, "e3"));
  assert.ok(requests >= 112, `the requests tile counts the traffic: ${requests}`);
  assert.match(await page.locator("#tile-p99").textContent(), /ms$/);
  assert.deepEqual(problems, [], "no script error and nothing the content policy blocked");

  await page.screenshot({ path: artifactPath("dashboard.png"), fullPage: true });
  await page.close();
});
