// Click for Charity's page: a button that earns coins, and the profile and roles (read-only)
// of the account the unified-sync hub keeps for every site. Uses the package exactly as a
// site owner would; everything user-written is shown with textContent, never innerHTML.
import init, { SyncManager } from "/pkg/unified_balance.js";

const DEFAULT_USER = "8-evans";
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
const other = site.otherSites[0];
for (const link of [$("other-site"), $("edit-elsewhere")]) {
  link.textContent = other.name;
  link.href = other.url;
}

await init();

/** @type {SyncManager | null} */
let sync = null;
let earned = 0;

function signedInUser() {
  const fromUrl = new URLSearchParams(location.search).get("user");
  if (fromUrl) localStorage.setItem(USER_KEY, fromUrl);
  return fromUrl || localStorage.getItem(USER_KEY) || DEFAULT_USER;
}

/** Signs `userId` in: a new SyncManager for that user, with every listener the page needs. */
function signIn(userId) {
  sync?.destroy();
  localStorage.setItem(USER_KEY, userId);
  earned = 0;
  $("user-label").textContent = userId;
  $("coins").textContent = "…";
  $("coins-note").textContent = "";
  $("earned").textContent = "";
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
    note.textContent = `${meta.pending} click${meta.pending === 1 ? "" : "s"} on the way to the hub`;
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

function showRefused(write) {
  const box = $("refused");
  box.dataset.code = write.code;
  box.textContent = `The hub refused a ${write.dataType} change: ${write.message} It was undone here, so this page shows the hub's value again. (${write.code})`;
  box.hidden = false;
}

$("earn").addEventListener("click", () => {
  // Shown at once, saved in this browser, and delivered to the hub exactly once.
  try {
    sync.applyDelta("balance", { coins: 1 }, "click");
  } catch (error) {
    $("earned").textContent = `That click was not counted: ${error.message}.`;
    return;
  }
  earned += 1;
  $("earned").textContent = `You earned ${earned} coin${earned === 1 ? "" : "s"} on this visit. Thank you!`;
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
