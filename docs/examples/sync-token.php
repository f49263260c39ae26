<?php
// The site's token endpoint for unified-sync: an HS256 JWT that lets the signed-in user's
// page talk to the hub, signed with this site's hub secret. The browser never sees the
// secret, only tokens.
//
// Settings come from the environment, never from a file under the document root:
//   SYNC_SITE_ID  this site's id in the hub's [[sites]] (the token's `iss`)
//   SYNC_HUB_ID   the hub's `hub_id` (the token's `aud`)
//   SYNC_SECRET   the site's HS256 secret, the same value the hub reads from `secret_env`
//
// Served as /api/sync-token.php, it answers {"token":"…"} for the user of the PHP session
// ($_SESSION['user_id']), or 401 when nobody is signed in.
// From the command line, it prints a token for the user named as the argument:
//   SYNC_SITE_ID=roflfaucet SYNC_HUB_ID=unified-sync-hub SYNC_SECRET=… php sync-token.php 8-evans

declare(strict_types=1);

// Seconds a token stays valid; the page asks for a new one when the hub answers 401.
const SYNC_TOKEN_TTL = 600;

function base64url(string $bytes): string
{
    return rtrim(strtr(base64_encode($bytes), '+/', '-_'), '=');
}

function sync_token(string $secret, string $site, string $hub, string $user): string
{
    $now = time();
    $json = JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES;
    $header = base64url(json_encode(['alg' => 'HS256', 'typ' => 'JWT'], $json));
    $claims = base64url(json_encode([
        'iss' => $site,
        'sub' => $user,
        'aud' => $hub,
        'iat' => $now,
        'exp' => $now + SYNC_TOKEN_TTL,
    ], $json));
    $signature = base64url(hash_hmac('sha256', "$header.$claims", $secret, true));
    return "$header.$claims.$signature";
}

function sync_setting(string $name): string
{
    $value = getenv($name);
    if ($value === false || $value === '') {
        throw new RuntimeException("the environment variable $name is not set");
    }
    return $value;
}

function sync_token_for(string $user): string
{
    return sync_token(sync_setting('SYNC_SECRET'), sync_setting('SYNC_SITE_ID'), sync_setting('SYNC_HUB_ID'), $user);
}

if (PHP_SAPI === 'cli') {
    $user = $argv[1] ?? '';
    if ($user === '') {
        fwrite(STDERR, "usage: SYNC_SITE_ID=… SYNC_HUB_ID=… SYNC_SECRET=… php sync-token.php USER_ID\n");
        exit(2);
    }
    echo sync_token_for($user), "\n";
    exit(0);
}

session_start();
header('Content-Type: application/json');
header('Cache-Control: no-store');
$user = $_SESSION['user_id'] ?? null;
session_write_close();
if (!is_string($user) || $user === '') {
    http_response_code(401);
    echo json_encode(['error' => 'not signed in']);
    exit;
}
echo json_encode(['token' => sync_token_for($user)]);
