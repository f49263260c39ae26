// The plain-script build's entry (`unified_balance.global.js`, one global `UnifiedBalance`):
// for a classic `<script src>` tag, without modules or a bundler. The wasm is loaded from
// beside the script, wherever the page itself is:
//
//   <script src="/js/unified-balance/unified_balance.global.js"></script>
//   await UnifiedBalance.ready;
//   const sync = new UnifiedBalance.SyncManager({ … });
//
// Not shipped in the package: `cargo xtask build-pkg` bundles it with esbuild.

import init, { SyncManager } from "./unified_balance.js";

const WASM = "unified_balance_bg.wasm";

// Only while the script runs does `document.currentScript` name it.
const script = typeof document === "undefined" ? null : document.currentScript;

async function load() {
  if (!script?.src) {
    throw new Error(`unified-balance: load unified_balance.global.js with a classic <script src> (it finds ${WASM} beside itself); with modules, import "unified-balance"`);
  }
  const url = new URL(WASM, script.src).href;
  const failed = (why, cause) => new Error(`unified-balance: cannot load ${url}: ${why}`, { cause });
  let response;
  try {
    response = await fetch(url);
  } catch (e) {
    throw failed(e.message, e);
  }
  if (!response.ok) throw failed(`it answered ${response.status}; put ${WASM} beside unified_balance.global.js`);
  try {
    await init({ module_or_path: response });
  } catch (e) {
    // A Content-Security-Policy that forbids compiling WebAssembly names only 'unsafe-eval'.
    const policy = /Content Security/i.test(e.message) ? "; allow 'wasm-unsafe-eval' in the page's script-src" : "";
    throw failed(e.message + policy, e);
  }
}

/** Resolves once the wasm is loaded; rejects with an error that names the URL it tried. */
export const ready = load();

export { SyncManager };
