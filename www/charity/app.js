// Click for Charity's page: a button that earns coins, one that gives them, and the profile
// and roles (read-only) of the account the unified-sync hub keeps for every site. Uses the
// package exactly as a site owner would; everything user-written is shown with textContent,
// never innerHTML.
//
// A click's coin is granted by Click for Charity's backend (one a second); the page passes the
// grant to the package, which shows the coin at once and delivers it exactly once. A donation
// is the page's own spend: it needs no grant and works offline.
import init, { SyncManager } from "/pkg/unified_balance.js";

const DEFAULT_USER = "8-evans";
/** Coins one donation gives. */
const DONATION = 5;
const USER_KEY = "demo_user";
const STATUS_TEXT = {
  idle: "in step with the hub",
  syncing: "checking the hub…",
  offline: "hub out of reach — showing saved data; clicks wait here",
  error: "the hub refused this page's requests",
};

const $ = (id) => document.getElementById(id);

// What the site's backend tells its pages: where the hub is and which site this is.
const site = await (await fetch("/config.json")).json();
const rules = site.rules;
const other = site.otherSites[0];
for (const link of [$("other-site"), $("edit-elsewhere")]) {
  link.textContent = other.name;
  link.href = other.url;
}

await init();

/** @type {SyncManager | null} */
let sync = null;
let userId = null;
let earned = 0;
let given = 0;

function signedInUser() {
  const fromUrl = new URLSearchParams(location.search).get("user");
  if (fromUrl) localStorage.setItem(USER_KEY, fromUrl);
  return fromUrl || localStorage.getItem(USER_KEY) || DEFAULT_USER;
}

/**
 * One request to Click for Charity's backend (`POST /api/<action>`, for the signed-in user):
 * `{ok, status, body}`, with status 0 when the backend is out of reach.
 */
async function backend(action, params = {}) {
  const query = new URLSearchParams({ user: userId, ...params });
  try {
    const response = await fetch(`/api/${action}?${query}`, { method: "POST" });
    const body = await response.json().catch(() => ({}));
    return { ok: response.ok, status: response.status, body };
  } catch {
    return { ok: false, status: 0, body: { code: "backend_unreachable", error: "Click for Charity's server is out of reach" } };
  }
}

/** Signs `user` in: a new SyncManager for that user, with every listener the page needs. */
function signIn(user) {
  sync?.destroy();
  userId = user;
  localStorage.setItem(USER_KEY, userId);
  earned = 0;
  given = 0;
  $("user-label").textContent = userId;
  $("coins").textContent = "…";
  $("coins-note").textContent = "";
  for (const id of ["earned", "donated"]) {
    delete $(id).dataset.outcome;
    $(id).dataset.count = "0";
    $(id).textContent = "";
  }
  $("refused").hidden = true;
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
    // A click whose grant expired before the hub got it (offline for long): the backend
    // grants the same op again if it is one it granted; otherwise the coin is undone.
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
  $("profile-bio").textContent = profile.bio || "No bio yet.";
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
  grant_expired: "It reached the hub after its grant expired, and Click for Charity did not grant it again.",
  grant_invalid: "Click for Charity's grant did not match it.",
  credit_limit: "Click for Charity has credited all it may for you today.",
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

$("earn").addEventListener("click", async () => {
  const earn = $("earn");
  earn.disabled = true;
  const answer = await backend("click");
  // One paid click a second: the button waits out the backend's pace.
  setTimeout(() => (earn.disabled = false), answer.status === 429 ? answer.body.retryAfterMs : rules.clickIntervalMs);
  if (answer.status === 429) {
    show("earned", "wait", "One coin a second, please — try again in a moment.");
    return;
  }
  if (!answer.ok) {
    show("earned", answer.status === 0 ? "unreachable" : "refused", `That click was not counted: ${answer.body.error}.`);
    return;
  }
  // Shown at once, saved in this browser, and delivered to the hub exactly once.
  try {
    sync.applyDelta("balance", { coins: answer.body.coins }, answer.body.reason, { grant: answer.body.grant });
  } catch (error) {
    show("earned", "refused", `That click was not counted: ${error.message}.`);
    return;
  }
  earned += answer.body.coins;
  $("earned").dataset.count = String(earned);
  show("earned", "earned", `You earned ${earned} coin${earned === 1 ? "" : "s"} on this visit. Thank you!`);
});

$("donate").addEventListener("click", () => {
  // A spend: the page's own token may make it, and it waits here while the hub is away.
  try {
    sync.applyDelta("balance", { coins: -DONATION }, "donation");
  } catch (error) {
    const why = error.code === "insufficient_funds" ? `you have fewer than ${DONATION} coins` : error.message;
    show("donated", "refused", `Nothing was given: ${why}.`);
    return;
  }
  given += DONATION;
  $("donated").dataset.count = String(given);
  show("donated", "given", `You gave ${given} coins to charity on this visit. Thank you!`);
});

$("force-sync").addEventListener("click", async () => {
  const button = $("force-sync");
  button.disabled = true;
  try {
    await sync.forceSync();
  } finally {
    button.disabled = false;
  }
});

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
