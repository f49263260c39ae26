// ROFLFaucet's page: a free claim and a dice game, and a profile editor, on the account the
// unified-sync hub keeps for every site. Uses the package exactly as a site owner would;
// everything user-written is shown with textContent, never innerHTML.
//
// The page decides nothing it earns. ROFLFaucet's backend grants claims, rolls the die and
// grants prizes; the page passes each grant to the package, which shows the coins at once
// and delivers the op exactly once. A roll's stake is a spend the backend names (so it can
// roll it once), and the page spends it like any other.
import init, { SyncManager } from "/pkg/unified_balance.js";

const DEFAULT_USER = "8-evans";
const USER_KEY = "demo_user";
const PROFILE_FIELDS = ["display_name", "avatar", "location", "website", "bio"];
const STATUS_TEXT = {
  idle: "in step with the hub",
  syncing: "checking the hub…",
  offline: "hub out of reach — showing saved data; changes wait here",
  error: "the hub refused this page's requests",
};

const $ = (id) => document.getElementById(id);

// What the site's backend tells its pages: where the hub is, which site this is, its rules.
const site = await (await fetch("/config.json")).json();
const rules = site.rules;
const other = site.otherSites[0];
$("other-site").textContent = other.name;
$("other-site").href = other.url;
for (const [id, value] of [
  ["claim-coins", rules.claimCoins],
  ["claim-every", `${rules.claimEverySecs} seconds`],
  ["roll-cost", rules.rollCost],
  ["winning-roll", rules.winningRoll],
  ["prize", rules.prize],
]) {
  for (const element of document.querySelectorAll(`[data-rule="${id}"]`)) element.textContent = String(value);
}
$("play").textContent = `Roll the die — ${rules.rollCost} coins`;

await init();

/** @type {SyncManager | null} */
let sync = null;
let userId = null;
/** Stakes whose roll was asked for and not answered yet. */
const rolling = new Set();

function signedInUser() {
  const fromUrl = new URLSearchParams(location.search).get("user");
  if (fromUrl) localStorage.setItem(USER_KEY, fromUrl);
  return fromUrl || localStorage.getItem(USER_KEY) || DEFAULT_USER;
}

/**
 * One request to ROFLFaucet's backend (`POST /api/<action>`, for the signed-in user):
 * `{ok, status, body}`, with status 0 when the backend is out of reach.
 */
async function backend(action, params = {}) {
  const query = new URLSearchParams({ user: userId, ...params });
  try {
    const response = await fetch(`/api/${action}?${query}`, { method: "POST" });
    const body = await response.json().catch(() => ({}));
    return { ok: response.ok, status: response.status, body };
  } catch {
    return { ok: false, status: 0, body: { code: "backend_unreachable", error: "ROFLFaucet's server is out of reach" } };
  }
}

/** Passes what the backend granted to the package: its amount, its reason, its op. */
function applyGrant(granted) {
  return sync.applyDelta("balance", { coins: granted.coins }, granted.reason, { grant: granted.grant });
}

/** Signs `user` in: a new SyncManager for that user, with every listener the page needs. */
function signIn(user) {
  sync?.destroy();
  userId = user;
  rolling.clear();
  localStorage.setItem(USER_KEY, userId);
  $("user-label").textContent = userId;
  $("coins").textContent = "…";
  $("coins-note").textContent = "";
  for (const id of ["game-result", "claim-result"]) {
    delete $(id).dataset.outcome;
    $(id).textContent = "";
  }
  $("refused").hidden = true;
  closeEditor();
  renderProfile({});
  renderRoles(null);

  sync = new SyncManager({
    hubUrl: site.hubUrl,
    siteId: site.siteId,
    userId,
    // The site's own backend signs a token for the signed-in user; the page never holds a key.
    getToken: async () => {
      const response = await fetch(`/api/token?user=${encodeURIComponent(userId)}`);
      if (!response.ok) throw new Error(`the site's token endpoint answered ${response.status}`);
      return response.text();
    },
    // A claim, stake or prize whose grant expired before the hub got it (offline for long):
    // the backend grants the same op again if it is one it granted; otherwise it is undone.
    getGrant: async ({ opId }) => {
      const answer = await backend("regrant", { op: opId });
      return answer.ok ? answer.body.grant : null;
    },
    dataTypes: ["balance", "profile", "roles"],
    spinner: { className: "sync-spinner", text: "Syncing with the hub…" },
  });
  window.sync = sync; // for the console and for tests
  sync.on("status", renderStatus);
  sync.on("live", (live) => ($("live").hidden = !live));
  sync.on("balance", renderBalance);
  sync.on("profile", (data) => renderProfile(data));
  sync.on("roles", (data) => renderRoles(data));
  sync.on("refused", showRefused);
  renderStatus(sync.status);
  sync.login();
}

function renderStatus(status) {
  $("status").dataset.status = status;
  $("status").textContent = STATUS_TEXT[status] ?? status;
  // In step with the hub again: a stake staked while it was out of reach can be rolled.
  if (status === "idle") resumeRolls();
}

function renderBalance(data, meta) {
  $("coins").textContent = String(data.coins ?? 0);
  const note = $("coins-note");
  note.dataset.source = meta.source;
  note.dataset.pending = String(meta.pending);
  if (meta.pending > 0) {
    note.textContent = `${meta.pending} change${meta.pending === 1 ? "" : "s"} on the way to the hub`;
  } else if (meta.source === "cache") {
    note.textContent = "Saved in this browser; checking the hub…";
  } else {
    note.textContent = `Confirmed by the hub (version ${meta.version})`;
  }
}

function renderProfile(profile) {
  $("profile-name").textContent = profile.display_name || "No name yet";
  // The avatar is an emoji the user picked; without one, the name's first letter.
  $("profile-avatar").textContent = profile.avatar || [...(profile.display_name || "?")][0].toUpperCase();
  $("profile-location").textContent = profile.location || "";
  $("profile-bio").textContent = profile.bio || "No bio yet. Tell the world something about you.";
  const website = $("profile-website");
  website.textContent = profile.website || "";
  // The hub accepts only http(s) addresses; checked again here before it becomes a link.
  if (/^https?:\/\//i.test(profile.website || "")) website.href = profile.website;
  else website.removeAttribute("href");
}

function renderRoles(roles) {
  const list = $("roles");
  list.replaceChildren();
  const add = (name, where) => {
    const item = document.createElement("li");
    item.dataset.role = name;
    item.textContent = name;
    const scope = document.createElement("small");
    scope.textContent = where;
    item.append(" ", scope);
    list.append(item);
  };
  for (const name of roles?.global_roles ?? []) add(name, "all sites");
  for (const [siteId, names] of Object.entries(roles?.site_roles ?? {})) {
    for (const name of names) add(name, siteId === site.siteId ? "this site" : siteId);
  }
  if (list.children.length === 0) {
    const empty = document.createElement("li");
    empty.className = "empty";
    empty.textContent = roles ? "No roles yet" : "…";
    list.append(empty);
  }
}

const REFUSALS = {
  insufficient_funds: "There were not enough coins at the hub (spent on another site?).",
  grant_expired: "It reached the hub after its grant expired, and ROFLFaucet did not grant it again.",
  grant_invalid: "ROFLFaucet's grant did not match it.",
  credit_limit: "ROFLFaucet has credited all it may for you today.",
};

function showRefused(write) {
  const box = $("refused");
  box.dataset.code = write.code;
  const why = REFUSALS[write.code] ?? write.message;
  box.textContent = `The hub refused a ${write.dataType} change: ${why} It was undone here, so this page shows the hub's value again. (${write.code})`;
  box.hidden = false;
}

/** Sets an outcome's `data-outcome` and text. */
function show(id, outcome, text) {
  $(id).dataset.outcome = outcome;
  $(id).textContent = text;
}

// --- The free claim -------------------------------------------------------------------

$("claim").addEventListener("click", async () => {
  const claim = $("claim");
  claim.disabled = true;
  $("refused").hidden = true;
  show("claim-result", "asking", "Asking ROFLFaucet for your claim…");
  const answer = await backend("claim");
  claim.disabled = false;
  if (answer.status === 429) {
    const secs = Math.ceil(answer.body.retryAfterMs / 1000);
    show("claim-result", "wait", `You have claimed already: the next claim opens in ${secs} s.`);
    return;
  }
  if (!answer.ok) {
    show("claim-result", answer.status === 0 ? "unreachable" : "refused", `No claim: ${answer.body.error}.`);
    return;
  }
  try {
    applyGrant(answer.body);
  } catch (error) {
    if (error.code === "duplicate_op") {
      show("claim-result", "already", "This claim is counted already: wait for the next one.");
    } else {
      show("claim-result", "refused", `The claim was not made: ${error.message}.`);
    }
    return;
  }
  show("claim-result", "claimed", `+${answer.body.coins} coins! They are yours on every site.`);
});

// --- The game -------------------------------------------------------------------------

/** The stakes paid from this browser and not rolled yet, kept across reloads. */
const rollsKey = () => `faucet_rolls:${userId}`;
const pendingRolls = () => JSON.parse(localStorage.getItem(rollsKey()) ?? "[]");
function keepRoll(stake) {
  localStorage.setItem(rollsKey(), JSON.stringify([...pendingRolls(), stake]));
}
function forgetRoll(stake) {
  localStorage.setItem(rollsKey(), JSON.stringify(pendingRolls().filter((s) => s !== stake)));
}

/** Rolls every stake still waiting (e.g. staked while the hub was out of reach). */
function resumeRolls() {
  for (const stake of pendingRolls()) if (!rolling.has(stake)) roll(stake);
}

/**
 * Asks the backend to roll a stake it named: it makes sure the stake is paid (sending the
 * same op to the hub itself), then rolls; the same stake always gets the same roll.
 */
async function roll(stake) {
  rolling.add(stake);
  const answer = await backend("roll", { stake });
  rolling.delete(stake);
  if (answer.status === 0 || answer.status === 503) {
    show(
      "game-result",
      "pending",
      `Your ${rules.rollCost} coins are staked; the die is rolled as soon as the hub has them.`,
    );
    return;
  }
  forgetRoll(stake);
  if (!answer.ok) {
    const why = answer.body.code === "insufficient_funds" ? "there were not enough coins at the hub" : answer.body.error;
    show("game-result", "refused", `The roll was not made: ${why}.`);
    return;
  }
  const { roll: die, win } = answer.body;
  if (win) {
    try {
      applyGrant(answer.body);
    } catch (error) {
      // `duplicate_op`: the prize of a stake rolled before, counted once already.
      if (error.code !== "duplicate_op") {
        show("game-result", "refused", `You rolled a ${die} and won, but the prize was not taken: ${error.message}.`);
        return;
      }
    }
  }
  $("game-result").dataset.roll = String(die);
  show(
    "game-result",
    win ? "win" : "lose",
    win
      ? `You rolled a ${die} — you win ${rules.prize} coins! (+${rules.prize - rules.rollCost} after paying for the roll)`
      : `You rolled a ${die} — no luck this time (−${rules.rollCost} coins).`,
  );
}

$("play").addEventListener("click", async () => {
  const play = $("play");
  play.disabled = true;
  $("refused").hidden = true;
  delete $("game-result").dataset.roll;
  show("game-result", "checking", "Checking your coins with the hub…");
  try {
    // A roll spends coins: make sure the balance is the hub's current one first.
    await sync.ensureFresh("balance");
    const coins = sync.get("balance")?.coins ?? 0;
    if (coins < rules.rollCost) {
      show("game-result", "short", `You need ${rules.rollCost} coins to roll and have ${coins}. Claim some above!`);
      return;
    }
    show("game-result", "rolling", "Rolling…");
    const stake = await backend("stake");
    if (!stake.ok) {
      show("game-result", stake.status === 0 ? "unreachable" : "refused", `No roll was made: ${stake.body.error}.`);
      return;
    }
    try {
      applyGrant(stake.body);
    } catch (error) {
      // Refused before it was sent, e.g. coins spent in another tab a moment ago.
      show("game-result", "refused", `No roll was made: ${error.message}.`);
      return;
    }
    keepRoll(stake.body.opId);
    await roll(stake.body.opId);
  } finally {
    play.disabled = false;
  }
});

// --- Force Sync -----------------------------------------------------------------------

$("force-sync").addEventListener("click", async () => {
  const button = $("force-sync");
  button.disabled = true;
  try {
    await sync.forceSync();
  } finally {
    button.disabled = false;
  }
});

// --- The profile editor ---------------------------------------------------------------

function closeEditor() {
  $("profile-form").hidden = true;
  $("edit-profile").hidden = false;
}

$("edit-profile").addEventListener("click", async () => {
  const edit = $("edit-profile");
  edit.disabled = true;
  edit.textContent = "Getting your latest profile…";
  // Another site may have changed it: start editing from the hub's current text.
  await sync.ensureFresh("profile");
  edit.disabled = false;
  edit.textContent = "Edit profile";
  const profile = sync.get("profile") ?? {};
  const form = $("profile-form");
  for (const field of PROFILE_FIELDS) form.elements[field].value = profile[field] ?? "";
  $("profile-saved").textContent = "";
  edit.hidden = true;
  form.hidden = false;
  form.elements.display_name.focus();
});

$("profile-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = $("profile-form");
  const current = sync.get("profile") ?? {};
  const changes = {};
  for (const field of PROFILE_FIELDS) {
    const value = form.elements[field].value.trim();
    if (value !== (current[field] ?? "")) changes[field] = value === "" ? null : value;
  }
  closeEditor();
  if (Object.keys(changes).length === 0) {
    $("profile-saved").textContent = "Nothing changed.";
    return;
  }
  sync.pushChanges("profile", changes);
  $("profile-saved").textContent = `Saved — every site shows it from now on.`;
});

$("cancel-edit").addEventListener("click", closeEditor);

// --- Signing in -----------------------------------------------------------------------

$("switch-user").addEventListener("click", () => {
  $("signed-in").hidden = true;
  $("sign-in").hidden = false;
  $("user-id").value = localStorage.getItem(USER_KEY) || DEFAULT_USER;
  $("user-id").focus();
});

$("sign-in").addEventListener("submit", (event) => {
  event.preventDefault();
  $("sign-in").hidden = true;
  $("signed-in").hidden = false;
  signIn($("user-id").value.trim());
});

signIn(signedInUser());
