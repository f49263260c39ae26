<?php
// The site's webhook receiver for unified-sync. The hub POSTs here a small JSON notification
// for each change of a user's record that this site's own backend did not make:
//   {"type":"record.changed","epoch":"…","user_id":"8-evans","data_type":"balance",
//    "version":12,"last_updated":"2026-12-06T10:00:00.123Z","data":{"coins":120}}
// (`data` only when its JSON is at most 2048 bytes: otherwise read the record through the
// API). It is signed as the Standard Webhooks specification says: `webhook-signature` holds
// `v1,` and the base64 HMAC-SHA256, keyed with the secret's bytes, of
// "{webhook-id}.{webhook-timestamp}.{body}". This file checks that signature in constant time
// (any one of several space-separated signatures, as during a secret's rotation) and that the
// timestamp is within five minutes of this server's clock, answers 401 otherwise, and
// acknowledges with 200 at once: the hub waits at most `[webhooks] timeout_secs` and sends
// again what was not acknowledged, so do slow work after answering, and expect a notification
// more than once — `webhook-id` ("{epoch}.{data_type}.{version}.{user_id}") is the same on
// every attempt, and a record's notifications arrive in version order, so keep the newest
// version seen per user and type and drop what is not newer.
//
// Settings come from the environment (PHP-FPM's pool, Apache's SetEnv, `php -S`'s shell):
//   WEBHOOK_SECRET         the site's webhook secret, whsec_…, the value the hub reads from
//                          the variable its `webhook_secret_env` names
//   WEBHOOK_VERIFIED_FILE  (optional) a file each verified notification is appended to, one
//                          JSON line each: stands in for the site's own work (updating a
//                          legacy balance file, a cache, a job queue)
//
// Served as the URL the hub's `webhook_url` names, or for a try on this machine:
//   WEBHOOK_SECRET=whsec_… php -S 127.0.0.1:8080 webhook-receiver.php

declare(strict_types=1);

// How far a notification's timestamp may be from this server's clock: older ones are
// refused, so that a captured notification cannot be replayed later.
const WEBHOOK_TOLERANCE_SECONDS = 300;

/** Answers `$status` with `$why`, and stops. */
function webhook_refuse(int $status, string $why): never
{
    http_response_code($status);
    header('Content-Type: text/plain; charset=utf-8');
    echo $why, "\n";
    exit;
}

/** The key of a Standard Webhooks secret: the bytes whose base64 follows "whsec_". */
function webhook_key(string $secret): ?string
{
    if (!str_starts_with($secret, 'whsec_')) {
        return null;
    }
    $key = base64_decode(substr($secret, strlen('whsec_')), true);
    return $key === false || $key === '' ? null : $key;
}

/**
 * Whether `$body` came from the hub: `$signatures` (space-separated `v1,<base64>`) holds the
 * HMAC-SHA256 of "{id}.{timestamp}.{body}" under `$key`, and `$timestamp` is within the
 * tolerance of `$now`.
 */
function webhook_verified(string $key, string $id, string $timestamp, string $signatures, string $body, int $now): bool
{
    if ($id === '' || !ctype_digit($timestamp) || abs($now - (int) $timestamp) > WEBHOOK_TOLERANCE_SECONDS) {
        return false;
    }
    $expected = base64_encode(hash_hmac('sha256', "{$id}.{$timestamp}.{$body}", $key, true));
    foreach (explode(' ', $signatures) as $versioned) {
        [$version, $signature] = array_pad(explode(',', $versioned, 2), 2, '');
        if ($version === 'v1' && hash_equals($expected, $signature)) {
            return true;
        }
    }
    return false;
}

if (($_SERVER['REQUEST_METHOD'] ?? '') !== 'POST') {
    header('Allow: POST');
    webhook_refuse(405, 'the hub POSTs its notifications here');
}
$key = webhook_key((string) getenv('WEBHOOK_SECRET'));
if ($key === null) {
    error_log('webhook-receiver: WEBHOOK_SECRET is not a whsec_ secret');
    webhook_refuse(500, 'not configured');
}
$body = (string) file_get_contents('php://input');
$verified = webhook_verified(
    $key,
    $_SERVER['HTTP_WEBHOOK_ID'] ?? '',
    $_SERVER['HTTP_WEBHOOK_TIMESTAMP'] ?? '',
    $_SERVER['HTTP_WEBHOOK_SIGNATURE'] ?? '',
    $body,
    time(),
);
if (!$verified) {
    webhook_refuse(401, 'signature not verified');
}
$notification = json_decode($body, true);
if (!is_array($notification)) {
    webhook_refuse(400, 'not JSON');
}

// The site's own work goes here (or into a job queue, answered first): $notification['user_id'],
// ['data_type'], ['version'], and ['data'] when it came. This example keeps each verified
// notification, as the hub sent it, in the file WEBHOOK_VERIFIED_FILE names.
$file = getenv('WEBHOOK_VERIFIED_FILE');
if ($file !== false && $file !== '') {
    file_put_contents($file, $body . "\n", FILE_APPEND | LOCK_EX);
}
http_response_code(200);
header('Content-Type: text/plain; charset=utf-8');
echo "ok\n";
