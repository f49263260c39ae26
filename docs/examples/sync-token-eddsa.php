<?php
// The site's endpoint for unified-sync, for a site whose key is an Ed25519 pair: the EdDSA
// variant of sync-token.php, answering the same requests in the same way. It signs with the
// site's private key, which only this server holds; the hub's [[sites]] entry holds the
// public key (`public_key_pem`), so the hub keeps no secret of the site. The signed-in user's
// page asks it for a token (an EdDSA JWT that lets the page read, edit the profile and spend
// at the hub) and for grants (a JWT that lets exactly one credit through). The browser never
// sees the key and never names an amount: what a user earns is decided here, by the site's
// own rule (site_credit below). The op ids it grants are UUIDv7 (sync_op_id), dated by this
// server's clock, which must stay within the hub's token leeway (30 s) of the hub's, as the
// tokens' times must anyway (NTP). It needs PHP's sodium extension (built into Debian's
// php-cli and php-fpm; `php -m | grep sodium`).
//
// Settings come from the environment (PHP-FPM's pool, Apache's SetEnv, `php -S`'s shell), or
// else from the file SYNC_SETTINGS_FILE names: sync-settings.php two folders up from this
// one — with this file at <document root>/api/, the folder holding the document root, which
// the web server never serves (shared hosting). Never from a file under the document root:
//   SYNC_SITE_ID           this site's id in the hub's [[sites]] (the `iss` of tokens and grants)
//   SYNC_HUB_ID            the hub's `hub_id` (their `aud`)
//   SYNC_PRIVATE_KEY_FILE  the site's Ed25519 private key, a PEM file as
//                          `openssl genpkey -algorithm ed25519` writes it, outside the document
//                          root and readable by PHP's user only
//
// Served as /api/sync-token.php, for the user of the PHP session ($_SESSION['user_id']), or
// 401 when nobody is signed in:
//   GET                    {"token":"…"}
//   POST ?credit=NAME      a credit the user asks for, if the site's rule says they earned it:
//                          {"grant":"…","op_id":"…","data_type":"balance","delta":{"coins":10},
//                          "reason":"…"}; 403 otherwise
//   POST ?op_id=ID         a fresh grant for that same op, if the site would grant it now (the
//                          package's getGrant, when a grant expired before the hub got it)
// From the command line, it prints a token for the user named as the argument, or the answer
// to a credit or a fresh grant (exiting with 1 when there is none):
//   SYNC_SITE_ID=roflfaucet SYNC_HUB_ID=unified-sync-hub SYNC_PRIVATE_KEY_FILE=… php sync-token-eddsa.php 8-evans
//   … php sync-token-eddsa.php 8-evans credit daily
//   … php sync-token-eddsa.php 8-evans again 01a248a6-7c00-73b0-87fa-29742ead697c

declare(strict_types=1);

// Seconds a token stays valid; the page asks for a new one when the hub answers 401.
const SYNC_TOKEN_TTL = 600;
// Seconds a grant stays valid, at most 600: the page passes it on at once; one that expired
// before it reached the hub (the page was offline) is granted again through ?op_id=.
const SYNC_GRANT_TTL = 600;
// The example rule's daily bonus.
const DAILY_BONUS_COINS = 10;
// Where the settings are when the environment has none; change it if this file lives
// elsewhere than <document root>/api/.
const SYNC_SETTINGS_FILE = __DIR__ . '/../../sync-settings.php';
// What every Ed25519 private key in PKCS#8 (RFC 8410) starts with: its 32-byte seed follows.
const ED25519_PKCS8_PREFIX = "\x30\x2e\x02\x01\x00\x30\x05\x06\x03\x2b\x65\x70\x04\x22\x04\x20";

function base64url(string $bytes): string
{
    return rtrim(strtr(base64_encode($bytes), '+/', '-_'), '=');
}

/**
 * The site's Ed25519 key as sodium signs with it (64 bytes: the seed, then the public key),
 * from the PEM file SYNC_PRIVATE_KEY_FILE names.
 */
function sync_signing_key(): string
{
    static $key = null;
    if ($key !== null) {
        return $key;
    }
    if (!function_exists('sodium_crypto_sign_detached')) {
        throw new RuntimeException("PHP's sodium extension is missing: it signs the tokens (Debian's php-cli and php-fpm have it built in)");
    }
    $file = sync_setting('SYNC_PRIVATE_KEY_FILE');
    $pem = @file_get_contents($file);
    if ($pem === false) {
        throw new RuntimeException("cannot read SYNC_PRIVATE_KEY_FILE $file");
    }
    $der = preg_match('/-----BEGIN PRIVATE KEY-----(.+?)-----END PRIVATE KEY-----/s', $pem, $body) === 1
        ? base64_decode($body[1], true)
        : false;
    if ($der === false || strlen($der) !== 48 || !str_starts_with($der, ED25519_PKCS8_PREFIX)) {
        throw new RuntimeException("$file is not an Ed25519 private key in PEM, as `openssl genpkey -algorithm ed25519` writes it");
    }
    $key = sodium_crypto_sign_secretkey(sodium_crypto_sign_seed_keypair(substr($der, 16)));
    return $key;
}

/** A compact EdDSA JWS of `$claims` under `$header`. */
function sync_jwt(array $header, array $claims): string
{
    $json = JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES;
    $signed = base64url(json_encode($header, $json)) . '.' . base64url(json_encode($claims, $json));
    return $signed . '.' . base64url(sodium_crypto_sign_detached($signed, sync_signing_key()));
}

/** A page's token: no `scope`, so the page set (read, profile, settings, spend). */
function sync_token(string $site, string $hub, string $user): string
{
    $now = time();
    return sync_jwt(['alg' => 'EdDSA', 'typ' => 'JWT'], [
        'iss' => $site,
        'sub' => $user,
        'aud' => $hub,
        'iat' => $now,
        'exp' => $now + SYNC_TOKEN_TTL,
    ]);
}

/**
 * A grant: the site's yes to one credit. The hub applies a page's positive delta only with a
 * grant that names exactly its user, op id, data type and amounts, once.
 */
function sync_grant(string $site, string $hub, string $user, string $op_id, string $data_type, array $delta): string
{
    $now = time();
    return sync_jwt(['alg' => 'EdDSA', 'typ' => 'grant+jwt'], [
        'iss' => $site,
        'sub' => $user,
        'aud' => $hub,
        'iat' => $now,
        'exp' => $now + SYNC_GRANT_TTL,
        'op_id' => $op_id,
        'data_type' => $data_type,
        'delta' => $delta,
    ]);
}

/**
 * An op id the hub can date: a UUIDv7 (RFC 9562) whose time is `$unix_ms` and whose other 74
 * bits come from `$bits` (10 bytes or more): random_bytes(10) for an op named once, a
 * signature for an op the site must name again the same way. The hub refuses, with `422
 * op_expired`, an op it no longer remembers whose id is dated before its memory (at least 7
 * days) by the hub's clock: date an op when the site decides it (or the start of its day), by
 * a clock close to the hub's.
 */
function sync_op_id(int $unix_ms, string $bits): string
{
    if (strlen($bits) < 10) {
        throw new InvalidArgumentException('an op id takes 10 bytes besides its time');
    }
    $bytes = substr(pack('J', $unix_ms), 2, 6) . substr($bits, 0, 10);
    $bytes[6] = chr(0x70 | (ord($bytes[6]) & 0x0f)); // version 7
    $bytes[8] = chr(0x80 | (ord($bytes[8]) & 0x3f)); // variant 10
    $hex = bin2hex($bytes);
    return implode('-', [substr($hex, 0, 8), substr($hex, 8, 4), substr($hex, 12, 4), substr($hex, 16, 4), substr($hex, 20)]);
}

/**
 * The op id of `$user`'s daily bonus for the UTC day that starts at `$day_start` (Unix
 * seconds): a UUIDv7 of that moment whose other bits are the site key's signature of the
 * site, the user and the day (Ed25519 signs alike every time), so that the site names it
 * alike however often it is asked, and nobody else can.
 */
function daily_bonus_op_id(string $user, int $day_start): string
{
    $day = gmdate('Y-m-d', $day_start);
    $signature = sodium_crypto_sign_detached('daily-bonus|' . sync_setting('SYNC_SITE_ID') . "|$user|$day", sync_signing_key());
    return sync_op_id($day_start * 1000, $signature);
}

/**
 * YOUR SITE'S RULE: what `$user` earned as the credit named `$credit` — the op's id, data
 * type, amounts and reason — or null when they earned nothing. The page only names the
 * credit; the amount, the reason and the op id are decided here.
 *
 * The example is a daily bonus of DAILY_BONUS_COINS. Its op id is the user's for the UTC day,
 * so the hub credits it once a day however often the page asks. A rule that pays per event (a
 * won game, a click) makes a new op id each time it says yes:
 * sync_op_id((int) floor(microtime(true) * 1000), random_bytes(10)).
 */
function site_credit(string $user, string $credit): ?array
{
    if ($credit !== 'daily') {
        return null;
    }
    $now = time();
    return [
        'op_id' => daily_bonus_op_id($user, $now - $now % 86400),
        'data_type' => 'balance',
        'delta' => ['coins' => DAILY_BONUS_COINS],
        'reason' => 'daily bonus',
    ];
}

/**
 * YOUR SITE'S RULE, asked again: the credit whose op is `$op_id`, if the site would grant it
 * now — never an op it did not grant. Here: today's daily bonus only. A site whose op ids are
 * new for each credit keeps the ones it granted (or signs them) to recognize them.
 */
function site_credit_again(string $user, string $op_id): ?array
{
    $today = site_credit($user, 'daily');
    return $today !== null && hash_equals($today['op_id'], $op_id) ? $today : null;
}

/**
 * The setting `$name`: from the environment, or else from SYNC_SETTINGS_FILE (an array of the
 * same names: `<?php return ['SYNC_SITE_ID' => …];`).
 */
function sync_setting(string $name): string
{
    static $file = null;
    $value = getenv($name);
    if ($value !== false && $value !== '') {
        return $value;
    }
    $file ??= is_file(SYNC_SETTINGS_FILE) ? (array) require SYNC_SETTINGS_FILE : [];
    $value = $file[$name] ?? '';
    if (!is_string($value) || $value === '') {
        throw new RuntimeException("the setting $name is in neither the environment nor " . SYNC_SETTINGS_FILE);
    }
    return $value;
}

/**
 * The hub's user id for the session's `$id` (a string, or a number as its decimal digits), or
 * null when it is none: 1–64 of A-Z, a-z, 0-9, '.', '_', '-', not only dots.
 */
function sync_user_id(mixed $id): ?string
{
    $id = is_int($id) ? (string) $id : $id;
    return is_string($id) && preg_match('/^(?!\.+$)[A-Za-z0-9._-]{1,64}$/D', $id) === 1 ? $id : null;
}

function sync_token_for(string $user): string
{
    return sync_token(sync_setting('SYNC_SITE_ID'), sync_setting('SYNC_HUB_ID'), $user);
}

/** What the rule decided, with its grant; null when it decided nothing. */
function sync_grant_for(string $user, ?array $decided): ?array
{
    if ($decided === null) {
        return null;
    }
    $decided['grant'] = sync_grant(
        sync_setting('SYNC_SITE_ID'),
        sync_setting('SYNC_HUB_ID'),
        $user,
        $decided['op_id'],
        $decided['data_type'],
        $decided['delta']
    );
    return $decided;
}

if (PHP_SAPI === 'cli') {
    [$user, $what, $name] = [sync_user_id($argv[1] ?? ''), $argv[2] ?? null, $argv[3] ?? ''];
    if ($user === null || ($what !== null && !in_array($what, ['credit', 'again'], true))) {
        fwrite(STDERR, "usage: SYNC_SITE_ID=… SYNC_HUB_ID=… SYNC_PRIVATE_KEY_FILE=… php sync-token-eddsa.php USER_ID [credit NAME | again OP_ID]\n");
        exit(2);
    }
    if ($what === null) {
        echo sync_token_for($user), "\n";
        exit(0);
    }
    $answer = sync_grant_for($user, $what === 'credit' ? site_credit($user, $name) : site_credit_again($user, $name));
    if ($answer === null) {
        fwrite(STDERR, "nothing to grant\n");
        exit(1);
    }
    echo json_encode($answer, JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES), "\n";
    exit(0);
}

session_start();
header('Content-Type: application/json');
header('Cache-Control: no-store');
$signed_in = $_SESSION['user_id'] ?? null;
session_write_close();
if ($signed_in === null || $signed_in === '') {
    http_response_code(401);
    echo json_encode(['error' => 'not signed in']);
    exit;
}
$user = sync_user_id($signed_in);
if ($user === null) {
    http_response_code(500);
    echo json_encode(['error' => "the session's user id is not a hub user id: 1-64 of A-Z, a-z, 0-9, '.', '_', '-'"]);
    exit;
}
$credit = $_GET['credit'] ?? null;
$op_id = $_GET['op_id'] ?? null;
if ($credit === null && $op_id === null) {
    echo json_encode(['token' => sync_token_for($user)]);
    exit;
}
if ($_SERVER['REQUEST_METHOD'] !== 'POST' || !is_string($credit ?? $op_id)) {
    http_response_code(405);
    echo json_encode(['error' => 'ask for a credit with POST ?credit=NAME, or again with POST ?op_id=ID']);
    exit;
}
$answer = sync_grant_for($user, is_string($credit) ? site_credit($user, $credit) : site_credit_again($user, $op_id));
if ($answer === null) {
    http_response_code(403);
    echo json_encode(['error' => 'nothing to grant']);
    exit;
}
echo json_encode($answer, JSON_UNESCAPED_SLASHES);
