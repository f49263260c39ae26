// The package's TypeScript definitions: a page written against them type-checks under
// `--strict`, and a wrong call is rejected.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { writeFileSync, mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const here = fileURLToPath(new URL(".", import.meta.url));
const tsc = join(here, "node_modules", ".bin", "tsc");
const flags = ["--noEmit", "--strict", "--target", "es2022", "--module", "es2022", "--moduleResolution", "bundler"];

function check(file) {
  return spawnSync(tsc, [...flags, file], { encoding: "utf8" });
}

test("a page using the documented API type-checks", () => {
  const result = check(join(here, "typings", "use.ts"));
  assert.equal(result.status, 0, result.stdout + result.stderr);
});

test("a call that breaks the API is a type error", () => {
  const dir = mkdtempSync(join(tmpdir(), "typings-"));
  const good = readFileSync(join(here, "typings", "use.ts"), "utf8").replace(
    /"\.\.\/\.\.\/\.\.\/pkg\/unified_balance\.js"/,
    JSON.stringify(join(here, "..", "..", "pkg", "unified_balance.js")),
  );
  const bad = good.replace('sync.applyDelta("balance", { coins: -5 }, "game");', 'sync.applyDelta("profile", "ten");');
  assert.notEqual(bad, good);
  writeFileSync(join(dir, "bad.ts"), bad);
  const result = check(join(dir, "bad.ts"));
  assert.notEqual(result.status, 0, "tsc accepted applyDelta on profile with a string");
});

test("a credit's grant and getGrant are typed, and a wrong one is a type error", () => {
  const dir = mkdtempSync(join(tmpdir(), "typings-"));
  const pkg = JSON.stringify(join(here, "..", "..", "pkg", "unified_balance.js"));
  const page = (getGrant, grant) => `import init, { SyncManager, type GrantRequest } from ${pkg};
async function main() {
  await init();
  const sync = new SyncManager({ hubUrl: "https://hub", siteId: "roflfaucet", userId: "8-evans", getGrant: ${getGrant} });
  const opId: string = sync.applyDelta("balance", { coins: 10 }, "claim", { grant: ${grant} });
}
main();
`;
  const good = join(dir, "good.ts");
  writeFileSync(good, page('async (r: GrantRequest) => ("coins" in r.delta ? r.opId : null)', '"a.b.c"'));
  const result = check(good);
  assert.equal(result.status, 0, result.stdout + result.stderr);
  for (const [getGrant, grant] of [["() => 42", '"a.b.c"'], ["() => null", "42"]]) {
    const bad = join(dir, "bad.ts");
    writeFileSync(bad, page(getGrant, grant));
    assert.notEqual(check(bad).status, 0, `tsc accepted getGrant: ${getGrant} with grant: ${grant}`);
  }
});
