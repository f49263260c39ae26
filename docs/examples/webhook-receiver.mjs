// The site's webhook receiver for unified-sync, in Node (18 or later, nothing to install): the
// same checks as webhook-receiver.php beside it. The hub POSTs a small JSON notification for
// each change of a user's record that this site's own backend did not make:
//   {"type":"record.changed","epoch":"…","user_id":"8-evans","data_type":"balance",
//    "version":12,"last_updated":"2026-12-06T10:00:00.123Z","data":{"coins":120}}
// (`data` only when its JSON is at most 2048 bytes). It is signed as the Standard Webhooks
// specification says: `webhook-signature` holds `v1,` and the base64 HMAC-SHA256, keyed with
// the secret's bytes, of "{webhook-id}.{webhook-timestamp}.{body}", over the body's exact
// bytes (verify before parsing). This server checks that signature in constant time (any one
// of several space-separated signatures, as during a secret's rotation) and that the
// timestamp is within five minutes of its clock, answers 401 otherwise, and acknowledges with
// 200 at once: the hub sends again what was not acknowledged within `[webhooks]
// timeout_secs`, so a notification may come more than once — `webhook-id` is the same on
// every attempt, and a record's notifications arrive in version order.
//
// Settings come from the environment:
//   WEBHOOK_SECRET         the site's webhook secret, whsec_…
//   WEBHOOK_VERIFIED_FILE  (optional) a file each verified notification is appended to, one
//                          JSON line each, standing in for the site's own work
//   PORT                   the port to listen on, on 127.0.0.1 (8080): put it behind the
//                          site's HTTPS proxy, or run it on the hub's machine
//
//   WEBHOOK_SECRET=whsec_… node webhook-receiver.mjs

import { createHmac, timingSafeEqual } from "node:crypto";
import { appendFileSync } from "node:fs";
import { createServer } from "node:http";

// How far a notification's timestamp may be from this server's clock.
const TOLERANCE_SECONDS = 300;
// The longest body read: notifications are a few KiB at most.
const MAX_BODY_BYTES = 64 * 1024;

/** The key of a Standard Webhooks secret: the bytes whose base64 follows "whsec_". */
function webhookKey(secret) {
  if (!secret?.startsWith("whsec_")) throw new Error("WEBHOOK_SECRET is not a whsec_ secret");
  const key = Buffer.from(secret.slice("whsec_".length), "base64");
  if (key.length === 0) throw new Error("WEBHOOK_SECRET holds no key");
  return key;
}

/**
 * Whether `body` (a Buffer) came from the hub: `signatures` (space-separated `v1,<base64>`)
 * holds the HMAC-SHA256 of "{id}.{timestamp}.{body}" under `key`, and `timestamp` is within
 * the tolerance of `nowSecs`.
 */
function verified(key, id, timestamp, signatures, body, nowSecs) {
  if (!id || !/^\d+$/.test(timestamp ?? "") || Math.abs(nowSecs - Number(timestamp)) > TOLERANCE_SECONDS) {
    return false;
  }
  const expected = createHmac("sha256", key).update(`${id}.${timestamp}.`).update(body).digest();
  return (signatures ?? "").split(" ").some((versioned) => {
    const [version, signature] = versioned.split(",", 2);
    if (version !== "v1" || !signature) return false;
    const given = Buffer.from(signature, "base64");
    return given.length === expected.length && timingSafeEqual(given, expected);
  });
}

const key = webhookKey(process.env.WEBHOOK_SECRET);
const verifiedFile = process.env.WEBHOOK_VERIFIED_FILE;

function answer(response, status, text, headers = {}) {
  response.writeHead(status, { "content-type": "text/plain; charset=utf-8", ...headers });
  response.end(`${text}\n`);
}

const server = createServer((request, response) => {
  if (request.method !== "POST") {
    answer(response, 405, "the hub POSTs its notifications here", { allow: "POST" });
    return;
  }
  const chunks = [];
  let length = 0;
  request.on("data", (chunk) => {
    length += chunk.length;
    if (length > MAX_BODY_BYTES) {
      answer(response, 413, "too large");
      request.destroy();
      return;
    }
    chunks.push(chunk);
  });
  request.on("end", () => {
    if (response.writableEnded) return;
    const body = Buffer.concat(chunks);
    const headers = request.headers;
    const nowSecs = Math.floor(Date.now() / 1000);
    if (!verified(key, headers["webhook-id"], headers["webhook-timestamp"], headers["webhook-signature"], body, nowSecs)) {
      answer(response, 401, "signature not verified");
      return;
    }
    let notification;
    try {
      notification = JSON.parse(body.toString("utf8"));
    } catch {
      answer(response, 400, "not JSON");
      return;
    }
    // The site's own work goes here (or into a job queue, answered first):
    // notification.user_id, .data_type, .version, and .data when it came.
    if (verifiedFile) appendFileSync(verifiedFile, `${JSON.stringify(notification)}\n`);
    answer(response, 200, "ok");
  });
});

server.listen(Number(process.env.PORT ?? 8080), "127.0.0.1");
