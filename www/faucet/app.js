// ROFLFaucet's page: a dice game that costs and wins coins, and a profile editor, on the
// account the unified-sync hub keeps for every site. Uses the package exactly as a site
// owner would; everything user-written is shown with textContent, never innerHTML.
import init, { SyncManager } from "/pkg/unified_balance.js";

const COST = 5;
const PRIZE = 15;
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

// What the site's backend tells its pages: where the hub is and which site this is.
const site = await (await fetch("/config.json")).json();
const other = site.otherSites[0];
$("other-site").textContent = other.name;
$("other-site").href = other.url;

await init();

/** @type {SyncManager | null} */
let sync = null;

function signedInUser() {
  const fromUrl = new URLSearchParams(location.search).get("user");
  if (fromUrl) localStorage.setItem(USER_KEY, fromUrl);
  return fromUrl || localStorage.getItem(USER_KEY) || DEFAULT_USER;
}

/** Signs `userId` in: a new SyncManager for that user, with every listener the page needs. */
function signIn(userId) {
  sync?.destroy();
  localStorage.setItem(USER_KEY, userId);
  $("user-label").textContent = userId;
  $("coins").textContent = "…";
  $("coins-note").textContent = "";
  $("game-result").textContent = "";
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
    dataTypes: ["balance", "profile", "roles"],
    spinner: { className: "sync-spinner", text: "Syncing with the hub…" },
  });
  window.sync = sync; // for the console and for tests
  sync.on("status", renderStatus);
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

function showRefused(write) {
  const box = $("refused");
  box.dataset.code = write.code;
  const why =
    write.code === "insufficient_funds"
      ? "There were not enough coins at the hub (spent on another site?)."
      : write.message;
  box.textContent = `The hub refused a ${write.dataType} change: ${why} It was undone here, so this page shows the hub's value again. (${write.code})`;
  box.hidden = false;
}

// --- The game -------------------------------------------------------------------------

$("play").addEventListener("click", async () => {
  const play = $("play");
  const result = $("game-result");
  play.disabled = true;
  $("refused").hidden = true;
  result.dataset.outcome = "checking";
  result.textContent = "Checking your coins with the hub…";
  // A roll spends coins: make sure the balance is the hub's current one first.
  const fresh = await sync.ensureFresh("balance");
  const coins = sync.get("balance")?.coins ?? 0;
  play.disabled = false;
  if (coins < COST) {
    result.dataset.outcome = "short";
    result.textContent = `You need ${COST} coins to roll and have ${coins}. Earn some on ${other.name}!`;
    return;
  }
  const roll = 1 + Math.floor(Math.random() * 6);
  const win = roll >= 5;
  try {
    sync.applyDelta("balance", { coins: win ? PRIZE - COST : -COST }, "game");
  } catch (error) {
    // Refused before it was sent, e.g. coins spent in another tab a moment ago.
    result.dataset.outcome = "refused";
    result.textContent = `The roll was not made: ${error.message}.`;
    return;
  }
  result.dataset.outcome = win ? "win" : "lose";
  result.dataset.roll = String(roll);
  result.textContent = win
    ? `You rolled a ${roll} — you win ${PRIZE} coins! (+${PRIZE - COST} after paying for the roll)`
    : `You rolled a ${roll} — no luck this time (−${COST} coins).`;
  if (!fresh) result.textContent += " The hub is out of reach: the roll is kept here and sent when it is back.";
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
