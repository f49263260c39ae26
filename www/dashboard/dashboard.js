// The hub's dashboard: reads the last hour from /dashboard/data every ten seconds and draws
// it as SVG charts. Everything shown is set with textContent or SVG attributes, never as HTML.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 960;
const HEIGHT = 220;
const PAD = { left: 52, right: 12, top: 12, bottom: 26 };
const HOUR_MS = 3_600_000;
const MINUTE_MS = 60_000;
const REFRESH_MS = 10_000;
const DAY_MS = 86_400_000;
const TOKEN_KEY = "hub_metrics_token";
const SITE_COLORS = ["#2563eb", "#16a34a", "#d97706", "#9333ea", "#0891b2", "#db2777", "#65a30d", "#dc2626"];
const NO_TOKEN_COLOR = "#9ca3af";

const $ = (id) => document.getElementById(id);

function setState(state, text) {
  $("state").dataset.state = state;
  $("state").textContent = text;
}

function svgElement(name, attributes, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) {
    node.setAttribute(key, String(value));
  }
  parent.appendChild(node);
  return node;
}

function legend(list, entries) {
  list.replaceChildren(
    ...entries.map(({ name, color }) => {
      const item = document.createElement("li");
      item.textContent = name;
      item.style.setProperty("--swatch", color);
      return item;
    }),
  );
}

// Sums each slot's `pick` into one-minute buckets covering the hour that ends now.
function perMinute(data, pick) {
  const end = Math.floor(data.now_ms / MINUTE_MS) * MINUTE_MS + MINUTE_MS;
  const start = end - HOUR_MS;
  const values = new Array(HOUR_MS / MINUTE_MS).fill(0);
  for (const slot of data.slots) {
    const index = Math.floor((slot.start_ms - start) / MINUTE_MS);
    if (index >= 0 && index < values.length) {
      values[index] += pick(slot);
    }
  }
  return { start, end, values };
}

// The top of a y axis with four equal steps, each a round number (whole, for counts).
function niceMax(value, { whole = false } = {}) {
  const quarter = value / 4;
  if (quarter <= 0) return whole ? 4 : 1;
  const magnitude = 10 ** Math.floor(Math.log10(quarter));
  const step = [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]
    .map((s) => s * magnitude)
    .find((s) => s >= quarter && (!whole || Number.isInteger(s)));
  return 4 * (step ?? Math.ceil(quarter));
}

function formatNumber(value) {
  if (value >= 10_000) return `${Math.round(value / 1000)}k`;
  if (value >= 1000) return `${(value / 1000).toFixed(1)}k`;
  return String(Number(value.toFixed(value < 10 ? 2 : 1)));
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

// The frame shared by every chart: grid lines, the y scale and a clock on the x axis.
function frame(svg, { start, end, yMax, yLabel }) {
  svg.replaceChildren();
  const plotWidth = WIDTH - PAD.left - PAD.right;
  const plotHeight = HEIGHT - PAD.top - PAD.bottom;
  const x = (t) => PAD.left + ((t - start) / (end - start)) * plotWidth;
  const y = (v) => PAD.top + plotHeight - (v / yMax) * plotHeight;
  for (let i = 0; i <= 4; i += 1) {
    const value = (yMax * i) / 4;
    svgElement("line", { class: "grid", x1: PAD.left, x2: WIDTH - PAD.right, y1: y(value), y2: y(value) }, svg);
    const label = svgElement("text", { x: PAD.left - 6, y: y(value) + 4, "text-anchor": "end" }, svg);
    label.textContent = yLabel(value);
  }
  for (let t = Math.ceil(start / (10 * MINUTE_MS)) * 10 * MINUTE_MS; t <= end; t += 10 * MINUTE_MS) {
    const label = svgElement("text", { x: x(t), y: HEIGHT - 6, "text-anchor": "middle" }, svg);
    label.textContent = clock(t);
  }
  return { x, y, plotHeight };
}

// Stacked bars, one per minute: each series adds its part on top of the ones before it.
function stackedBars(svg, series, { start, end, yLabel = formatNumber }) {
  const totals = series[0].values.map((_, i) => series.reduce((sum, s) => sum + s.values[i], 0));
  const { x, y } = frame(svg, { start, end, yMax: niceMax(Math.max(...totals), { whole: true }), yLabel });
  const barWidth = Math.max(1, x(start + MINUTE_MS) - x(start) - 2);
  totals.forEach((_, i) => {
    let base = 0;
    for (const s of series) {
      const value = s.values[i];
      if (value > 0) {
        const t = start + i * MINUTE_MS;
        svgElement(
          "rect",
          { x: x(t) + 1, y: y(base + value), width: barWidth, height: y(base) - y(base + value), fill: s.color },
          svg,
        );
        base += value;
      }
    }
  });
}

// Lines through points [time, value]; a null value breaks the line.
function lines(svg, series, { start, end, yMax, yLabel }) {
  const { x, y } = frame(svg, { start, end, yMax, yLabel });
  for (const s of series) {
    let path = "";
    let pen = "M";
    for (const [t, value] of s.points) {
      if (value === null) {
        pen = "M";
        continue;
      }
      path += `${pen}${x(t).toFixed(1)},${y(Math.min(value, yMax)).toFixed(1)}`;
      pen = "L";
    }
    if (path) {
      svgElement("path", { d: path, fill: "none", stroke: s.color, "stroke-width": 2, "stroke-linejoin": "round" }, svg);
    }
    for (const [t, value] of s.points.filter((p) => p[1] !== null)) {
      svgElement("circle", { cx: x(t), cy: y(Math.min(value, yMax)), r: 1.6, fill: s.color }, svg);
    }
  }
}

function drawRequests(data) {
  const sites = data.sites.map((name, i) => ({ name, color: SITE_COLORS[i % SITE_COLORS.length], index: i }));
  sites.push({ name: "without a valid token", color: NO_TOKEN_COLOR, index: data.sites.length });
  const series = sites.map((site) => ({
    ...site,
    values: perMinute(data, (slot) => slot.requests[site.index]).values,
  }));
  const { start, end } = perMinute(data, () => 0);
  stackedBars($("chart-requests"), series, { start, end });
  legend($("legend-requests"), sites);
}

function drawHitRatio(data) {
  const checks = perMinute(data, (slot) => slot.checks);
  const fetches = perMinute(data, (slot) => slot.fetches);
  const points = checks.values.map((c, i) => [
    checks.start + (i + 0.5) * MINUTE_MS,
    c > 0 ? Math.max(0, 1 - fetches.values[i] / c) * 100 : null,
  ]);
  const series = [{ name: "checks answered with nothing new (%)", color: "#16a34a", points }];
  lines($("chart-hit"), series, { start: checks.start, end: checks.end, yMax: 100, yLabel: (v) => `${v}%` });
  legend($("legend-hit"), series);
}

function drawLatency(data) {
  const { start, end } = perMinute(data, () => 0);
  const series = [
    { name: "p50", key: "p50_ms", color: "#16a34a" },
    { name: "p95", key: "p95_ms", color: "#d97706" },
    { name: "p99", key: "p99_ms", color: "#dc2626" },
  ].map((s) => ({
    ...s,
    points: data.slots.map((slot) => [slot.start_ms + data.slot_ms / 2, slot[s.key]]),
  }));
  const highest = Math.max(0, ...data.slots.map((slot) => slot.p99_ms ?? 0));
  lines($("chart-latency"), series, { start, end, yMax: niceMax(highest), yLabel: formatNumber });
  legend($("legend-latency"), series);
}

function drawErrors(data) {
  const series = [
    { name: "server errors (5xx)", color: "#dc2626", pick: (slot) => slot.server_errors },
    { name: "refused requests (4xx)", color: "#d97706", pick: (slot) => slot.client_errors },
    { name: "rate-limited", color: "#9333ea", pick: (slot) => slot.rate_limited },
  ].map((s) => ({ ...s, values: perMinute(data, s.pick).values }));
  const { start, end } = perMinute(data, () => 0);
  stackedBars($("chart-errors"), series, { start, end });
  legend($("legend-errors"), series);
}

function drawTiles(data) {
  const sum = (pick, slots = data.slots) => slots.reduce((total, slot) => total + pick(slot), 0);
  const requests = sum((slot) => slot.requests.reduce((a, b) => a + b, 0));
  const checks = sum((slot) => slot.checks);
  const fetches = sum((slot) => slot.fetches);
  const recent = data.slots.filter((slot) => slot.start_ms >= data.now_ms - 5 * MINUTE_MS && slot.p99_ms !== null);
  $("tile-requests").textContent = formatNumber(requests);
  $("tile-hit").textContent = checks > 0 ? `${Math.round(Math.max(0, 1 - fetches / checks) * 100)}%` : "–";
  $("tile-p99").textContent = recent.length ? `${formatNumber(Math.max(...recent.map((s) => s.p99_ms)))} ms` : "–";
  $("tile-errors").textContent = formatNumber(
    sum((slot) => slot.client_errors + slot.server_errors + slot.rate_limited),
  );
  $("tile-connections").textContent = formatNumber(data.open_connections);
  drawCertificate(data);
}

// When the certificate served over HTTPS expires: days left, and the date; the tile turns
// amber two weeks before and red three days before.
function drawCertificate(data) {
  const notAfter = data.tls_cert_not_after_ms;
  const tile = $("certificate");
  if (notAfter === null || notAfter === undefined) {
    tile.dataset.expiry = "none";
    $("tile-certificate").textContent = "–";
    $("certificate-date").textContent = "plain HTTP: no certificate";
    return;
  }
  const left = notAfter - data.now_ms;
  const days = Math.floor(left / DAY_MS);
  tile.dataset.expiry = left < 3 * DAY_MS ? "urgent" : left < 14 * DAY_MS ? "soon" : "ok";
  $("tile-certificate").textContent =
    left <= 0 ? "expired" : days >= 1 ? `in ${days} day${days === 1 ? "" : "s"}` : `in ${Math.ceil(left / 3_600_000)} h`;
  $("certificate-date").textContent = new Date(notAfter).toISOString().replace(/\.\d{3}Z$/, "Z").replace("T", " ");
}

function duration(secs) {
  if (secs < 120) return `${secs} s`;
  if (secs < 7200) return `${Math.round(secs / 60)} min`;
  if (secs < 172_800) return `${Math.round(secs / 3600)} h`;
  return `${Math.round(secs / 86_400)} days`;
}

// One row per site with a webhook: its queue, what it delivered, failed and gave up, and
// whether its receiver is failing now (and why).
function drawWebhooks(data) {
  const webhooks = data.webhooks ?? [];
  $("webhooks").hidden = webhooks.length === 0;
  $("webhook-rows").replaceChildren(
    ...webhooks.map((hook) => {
      const row = document.createElement("tr");
      row.dataset.failing = String(hook.failing);
      const cells = [
        hook.site,
        hook.receiver,
        formatNumber(hook.queued),
        hook.queued > 0 ? duration(hook.oldest_pending_secs) : "–",
        formatNumber(hook.delivered),
        formatNumber(hook.failed),
        formatNumber(hook.dropped),
        hook.failing ? `failing: ${hook.last_failure ?? "unknown"}` : "delivering",
      ];
      row.replaceChildren(
        ...cells.map((text) => {
          const cell = document.createElement("td");
          cell.textContent = text;
          return cell;
        }),
      );
      return row;
    }),
  );
}

function draw(data) {
  drawTiles(data);
  drawRequests(data);
  drawHitRatio(data);
  drawLatency(data);
  drawWebhooks(data);
  drawErrors(data);
}

async function refresh() {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch("data", { headers, cache: "no-store" });
  } catch {
    setState("error", "The hub cannot be reached; retrying.");
    return;
  }
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("charts").hidden = true;
    $("token-form").hidden = false;
    setState("locked", token ? "That token was refused." : "A metrics token is needed.");
    return;
  }
  if (!response.ok) {
    setState("error", `The hub answered ${response.status}; retrying.`);
    return;
  }
  draw(await response.json());
  $("token-form").hidden = true;
  $("charts").hidden = false;
  setState("live", `Updated ${new Date().toLocaleTimeString()} · every ${REFRESH_MS / 1000} s`);
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  refresh();
});

refresh();
setInterval(refresh, REFRESH_MS);
