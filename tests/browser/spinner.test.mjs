// The sync indicator: shown only while a check outlasts its delay, announced politely.

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

/** The built-in indicator as the page has it: null if it was never created. */
const indicator = (page) =>
  page.evaluate(() => {
    const element = document.querySelector(".sync-indicator");
    return (
      element && {
        role: element.getAttribute("role"),
        ariaLive: element.getAttribute("aria-live"),
        text: element.textContent,
        hidden: element.hidden,
        visible: element.checkVisibility(),
        count: document.querySelectorAll(".sync-indicator").length,
      }
    );
  });

/** Runs `during` while the hub is frozen (SIGSTOP), so that a check cannot end. */
async function withSlowHub(during) {
  await h.hub.pause();
  try {
    return await during();
  } finally {
    h.hub.resume();
  }
}

test("a slow check shows the built-in indicator with role=status and aria-live=polite, then hides it", async () => {
  const page = await h.site("roflfaucet").open(h.user("spinner"));
  try {
    await withSlowHub(async () => {
      await page.tabReturns({ wait: false });
      const shown = await until(async () => {
        const state = await indicator(page);
        return state?.visible && state;
      }, "the indicator to appear while the hub is slow");
      assert.deepEqual(shown, {
        role: "status",
        ariaLive: "polite",
        text: "Checking for updates…",
        hidden: false,
        visible: true,
        count: 1,
      });
    });
    await page.idle();
    const hidden = await indicator(page);
    assert.deepEqual([hidden.hidden, hidden.visible, hidden.count], [true, false, 1], "hidden when the check ends");
  } finally {
    await page.close();
  }
});

test("a spinner callback hears show and hide once per slow check, and nothing for a fast one", async () => {
  const shows = async (page) => (await page.seen()).spinner;
  const eager = await h.site("roflfaucet").open(h.user("spinner-cb"), { spinner: "count", spinnerDelayMs: 0 });
  try {
    assert.deepEqual(await shows(eager), [true, false], "with no delay, every check shows it");
    await eager.tabReturns();
    assert.deepEqual(await shows(eager), [true, false, true, false]);
    assert.equal(await indicator(eager), null, "a callback replaces the built-in element");
  } finally {
    await eager.close();
  }

  const patient = await h.site("roflfaucet").open(h.user("spinner-cb"), { spinner: "count", spinnerDelayMs: 60000 });
  try {
    await patient.tabReturns();
    assert.deepEqual(await shows(patient), [], "a check shorter than the delay never shows it");
  } finally {
    await patient.close();
  }
});

test("spinner: false draws nothing, even for a slow check", async () => {
  const page = await h.site("roflfaucet").open(h.user("spinner-off"), { spinner: "off", spinnerDelayMs: 0 });
  try {
    await withSlowHub(async () => {
      await page.tabReturns({ wait: false });
      assert.equal(await page.status(), "syncing");
      assert.equal(await indicator(page), null);
    });
    await page.idle();
    assert.equal(await indicator(page), null);
  } finally {
    await page.close();
  }
});
