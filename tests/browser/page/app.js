// The test page's script: what a site would write, plus a record of everything the page saw
// (`window.seen`) for the tests to read. Query parameters:
//   user=ID                 the signed-in user (required)
//   types=balance,points    dataTypes (default: the package's default)
//   spinner=builtin|count|off, spinnerDelayMs=N, inactivityMs=N, requestTimeoutMs=N
//   login=0                 construct the SyncManager but do not call login()
//   getGrant=0              no getGrant option: a credit whose grant expired is refused
import init, { SyncManager } from "/pkg/unified_balance.js";

const site = JSON.parse(document.getElementById("site-config").textContent);
const params = new URLSearchParams(location.search);
const userId = params.get("user");

const seen = {
  balance: [],
  profile: [],
  status: [],
  refused: [],
  /** The "error" events: why the status turned "error". */
  errors: [],
  spinner: [],
  pageshows: [],
  tokenCalls: 0,
  /** What the package asked `getGrant` for. */
  grantAsks: [],
  /** The "live" events: whether changes reach the page live. */
  live: [],
};
window.seen = seen;

addEventListener("pageshow", (event) => seen.pageshows.push({ persisted: event.persisted }));

await init();

const options = {
  hubUrl: site.hubUrl,
  siteId: site.siteId,
  userId,
  // The site's backend signs a token for the signed-in user.
  getToken: async () => {
    seen.tokenCalls += 1;
    const response = await fetch(`/token?user=${encodeURIComponent(userId)}`);
    if (!response.ok) throw new Error(`token endpoint answered ${response.status}`);
    return response.text();
  },
};
if (params.get("getGrant") !== "0") {
  // A credit whose grant expired before the hub got it: the site's backend grants the same
  // op again (if it granted it), or the page gives it up.
  options.getGrant = async (request) => {
    seen.grantAsks.push(JSON.parse(JSON.stringify(request)));
    const query = new URLSearchParams({ user: userId, op: request.opId });
    const response = await fetch(`/regrant?${query}`);
    return response.ok ? response.text() : null;
  };
}
if (params.has("types")) options.dataTypes = params.get("types").split(",");
for (const name of ["spinnerDelayMs", "inactivityMs", "requestTimeoutMs"]) {
  if (params.has(name)) options[name] = Number(params.get(name));
}
switch (params.get("spinner") ?? "builtin") {
  case "off":
    options.spinner = false;
    break;
  case "count":
    options.spinner = (visible) => seen.spinner.push(visible);
    break;
}

const sync = new SyncManager(options);
window.sync = sync;
sync.on("balance", (data, meta) => {
  document.getElementById("coins").textContent = String(data.coins);
  seen.balance.push({ coins: data.coins, ...meta });
});
sync.on("profile", (data, meta) => {
  document.getElementById("name").textContent = data.display_name ?? "";
  seen.profile.push({ data, ...meta });
});
sync.on("status", (status) => seen.status.push(status));
sync.on("refused", (write) => seen.refused.push(write));
sync.on("error", (error) => seen.errors.push(error));
sync.on("live", (live) => seen.live.push(live));

window.loggedIn = params.get("login") === "0" ? Promise.resolve(null) : sync.login();
window.started = true;
