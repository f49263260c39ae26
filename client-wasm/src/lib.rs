//! The browser shell of the unified-sync client: the `SyncManager` class of the npm
//! package `unified-balance`. It makes no sync decision: it wires browser events, `fetch`,
//! timers, `localStorage`, `BroadcastChannel` and the spinner element to a
//! [`sync_core::Engine`], and turns the engine's events into callbacks and promises.

#![cfg_attr(all(target_arch = "wasm32", not(test)), no_std)]

extern crate alloc;

use alloc::string::String;

mod options;
mod shell;

use alloc::rc::Rc;

use sync_core::Trigger;
use wasm_bindgen::prelude::*;

use crate::options::Options;
use crate::shell::Shell;

#[wasm_bindgen(typescript_custom_section)]
const TYPES: &'static str = r#"
/** A kind of user record kept in step across sites. */
export type DataType = "balance" | "points" | "profile" | "roles" | "settings";
/** Where sync stands. */
export type SyncStatus = "idle" | "syncing" | "offline" | "error";
/** Why the status is "offline" (the first two) or "error" (the others). "hub_unreachable"
 *  is also how a hub refusing this page's origin (CORS) looks to a page: the hub logs it. */
export type SyncStatusReason =
  | "offline"
  | "hub_unreachable"
  | "token_failed"
  | "unauthorized"
  | "unexpected_answer"
  | "storage_failed";

export interface SyncOptions {
  /** The hub, e.g. "https://auth.directsponsor.org" (the sync endpoint is found under it). */
  hubUrl: string;
  /** This site's id: the `iss` of its tokens. */
  siteId: string;
  userId: string;
  /** Returns a JWT minted by this site's backend; called at start and again after a 401.
   *  Omit only for a hub running without auth (development). */
  getToken?: () => string | Promise<string>;
  /** Returns a fresh grant from this site's backend for a credit whose grant expired before
   *  it reached the hub (e.g. offline for long), for the same op; `null` gives the credit up
   *  (it is rolled back and reported as `refused`). Without it, such a credit is refused. */
  getGrant?: (request: GrantRequest) => string | null | Promise<string | null>;
  /** Types to keep in step (default: balance, profile, roles). */
  dataTypes?: DataType[];
  /** The sync indicator: `false` for none, a callback to draw your own, or options for the
   *  built-in element. */
  spinner?: false | ((visible: boolean) => void) | { className?: string; text?: string };
  /** A check shorter than this never shows the indicator (default 150 ms). */
  spinnerDelayMs?: number;
  /** While visible, check after this long without a check (default 5 minutes). */
  inactivityMs?: number;
  /** A request unanswered after this long counts as failed (default 15 s). */
  requestTimeoutMs?: number;
  /** Log every decision to the console (also while localStorage.sync_debug === "true",
   *  read at each line, so that it can be set on a live page). */
  debug?: boolean;
}

/** The credit `getGrant` is asked to grant again: the same op, data type and amounts. */
export interface GrantRequest {
  opId: string;
  dataType: "balance" | "points";
  delta: { coins: number } | { points: number };
  reason: string | null;
}

/** What a data listener learns besides the data. */
export interface RecordMeta {
  /** The hub's version the data is based on. */
  version: number;
  lastUpdated: string | null;
  /** "cache" (restored), "hub" (fetched or confirmed), "local" (optimistic), "tab" (another tab). */
  source: "cache" | "hub" | "local" | "tab";
  /** Local writes not yet confirmed by the hub. */
  pending: number;
}

/** Why the status turned "error": the `"error"` event's argument. For "unauthorized", the
 *  hub's own refusal: `hubCode` (e.g. "invalid_token", "origin_not_allowed") and `message`. */
export interface SyncErrorEvent {
  code: "token_failed" | "unauthorized" | "unexpected_answer" | "storage_failed";
  hubCode: string | null;
  message: string | null;
}

/** A local write the hub refused; its optimistic effect has been rolled back. Code
 *  `op_expired`: the hub no longer knows whether this old op was applied; it is dropped (never
 *  resend it as a new op) and the record is fetched again. */
export interface RefusedWrite {
  dataType: DataType;
  opId: string;
  code: string;
  message: string;
}

export interface SyncManager {
  on(event: DataType, listener: (data: any, meta: RecordMeta) => void): void;
  on(event: "status", listener: (status: SyncStatus) => void): void;
  on(event: "refused", listener: (write: RefusedWrite) => void): void;
  on(event: "error", listener: (error: SyncErrorEvent) => void): void;
  /** Whether changes reach the page live (the hub's event stream), each time it changes. */
  on(event: "live", listener: (live: boolean) => void): void;
  off(event: string, listener: Function): void;
}
"#;

/// Keeps one user's records in step with the hub.
#[wasm_bindgen(skip_typescript)]
pub struct SyncManager {
    shell: Rc<Shell>,
}

#[wasm_bindgen]
impl SyncManager {
    /// Starts syncing: restores the cache (listeners get it at once), wires the page's
    /// events, and sends any writes a previous page left unconfirmed.
    #[wasm_bindgen(constructor)]
    pub fn new(options: JsValue) -> Result<SyncManager, JsValue> {
        let options = Options::from_js(&options)?;
        Ok(SyncManager { shell: Shell::start(options)? })
    }

    /// Calls `listener` whenever a data type's data, the status, or a refusal changes, or the
    /// status turns `error` (`"error"`, with its code). A data listener is called at
    /// once with what is already known.
    pub fn on(&self, event: &str, listener: &js_sys::Function) {
        self.shell.on(event, listener);
    }

    pub fn off(&self, event: &str, listener: &js_sys::Function) {
        self.shell.off(event, listener);
    }

    /// Checks every data type against the hub; resolves to true when the data is fresh,
    /// false when only cached data could be used.
    pub fn login(&self) -> js_sys::Promise {
        self.shell.check(Trigger::Login)
    }

    /// Checks the hub before an operation that needs current data (a game, a claim, the
    /// profile editor). Resolves like `login`.
    #[wasm_bindgen(js_name = ensureFresh)]
    pub fn ensure_fresh(&self, data_type: Option<String>) -> Result<js_sys::Promise, JsValue> {
        if let Some(t) = data_type {
            shell::data_type_of(&t)?;
        }
        Ok(self.shell.check(Trigger::EnsureFresh))
    }

    /// Checks every data type now.
    #[wasm_bindgen(js_name = forceSync)]
    pub fn force_sync(&self) -> js_sys::Promise {
        self.shell.check(Trigger::Force)
    }

    /// Adds to balance or points: shown at once, stored, then sent until the hub confirms it
    /// exactly once. `delta` is `{coins: 10}` (or `{points: 10}`) or a plain number; a credit
    /// carries the grant the site's backend signed for it (`options.grant`), whose op id the
    /// write takes. Returns the write's op id; throws if the write is invalid, would go below
    /// zero, or its grant's op is already pending or done.
    #[wasm_bindgen(js_name = applyDelta)]
    pub fn apply_delta(
        &self,
        data_type: &str,
        delta: JsValue,
        reason: Option<String>,
        options: JsValue,
    ) -> Result<String, JsValue> {
        self.shell.apply_delta(data_type, &delta, reason, &options)
    }

    /// Merges `changes` into a record (profile fields, settings, this site's roles) without
    /// waiting; sent in order and retried. Returns the write's op id.
    #[wasm_bindgen(js_name = pushChanges)]
    pub fn push_changes(&self, data_type: &str, changes: JsValue) -> Result<String, JsValue> {
        Ok(self.shell.push_changes(data_type, &changes)?)
    }

    /// The data the page should show for a type, or `undefined` if nothing is known yet.
    pub fn get(&self, data_type: &str) -> Result<JsValue, JsValue> {
        Ok(self.shell.get(data_type)?)
    }

    /// "idle" | "syncing" | "offline" | "error".
    #[wasm_bindgen(getter)]
    pub fn status(&self) -> String {
        self.shell.status().into()
    }

    /// True while changes reach the page live: the hub's event stream is open in this tab, or
    /// the tab holding the site's stream shares one.
    #[wasm_bindgen(getter)]
    pub fn live(&self) -> bool {
        self.shell.live()
    }

    /// Why the status is "offline" or "error" (a `SyncStatusReason`); null otherwise.
    #[wasm_bindgen(getter, js_name = statusReason)]
    pub fn status_reason(&self) -> JsValue {
        self.shell.status_reason().map_or(JsValue::NULL, JsValue::from_str)
    }

    /// Stops syncing: removes every listener, timer and the indicator. Unconfirmed writes
    /// stay stored for the next page.
    pub fn destroy(&self) {
        self.shell.destroy();
    }
}

#[wasm_bindgen(typescript_custom_section)]
const CLASS: &'static str = r#"
export class SyncManager {
  free(): void;
  constructor(options: SyncOptions);
  on(event: string, listener: Function): void;
  off(event: string, listener: Function): void;
  login(): Promise<boolean>;
  ensureFresh(dataType?: DataType): Promise<boolean>;
  forceSync(): Promise<boolean>;
  applyDelta(dataType: "balance" | "points", delta: { coins: number } | { points: number } | number, reason?: string, options?: { grant?: string }): string;
  pushChanges(dataType: DataType, changes: Record<string, unknown>): string;
  get(dataType: DataType): any;
  readonly status: SyncStatus;
  readonly statusReason: SyncStatusReason | null;
  /** True while changes reach the page live: the hub's event stream is open in this tab, or
   *  the site's tab holding it shares one. */
  readonly live: boolean;
  destroy(): void;
}
"#;

/// `free()` (or garbage collection) stops syncing as `destroy()` does, so nothing the
/// manager wired calls into it afterwards.
impl Drop for SyncManager {
    fn drop(&mut self) {
        self.shell.destroy();
    }
}

/// A small allocator: the client's heap holds a few kilobytes of records and requests, and
/// the default allocator would be a sixth of the package.
#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: lol_alloc::LockedAllocator<lol_alloc::FreeListAllocator> =
    lol_alloc::LockedAllocator::new(lol_alloc::FreeListAllocator::new());

/// Without std, a panic in the browser build goes straight to a trap, as std's handler ended
/// with `panic = "abort"` after formatting a message no one could read.
#[cfg(all(target_arch = "wasm32", not(test)))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    core::arch::wasm32::unreachable()
}
