//! `SyncOptions` as the page passes them, read once at construction. Their shapes (strings,
//! callbacks, milliseconds, the spinner) are checked in JavaScript (`readOptions` in
//! `shell.rs`), which says it in fewer bytes of the package than Rust reading the object one
//! field at a time; the ids and data type names are checked here, by `protocol`'s rules.

use alloc::{borrow::ToOwned, string::String, vec::Vec};

use js_sys::{Array, Function};
use protocol::compact::concat;
use sync_core::DataType;
use wasm_bindgen::{JsCast, JsValue};

use crate::shell::SyncError;

pub(crate) struct Options {
    pub hub_url: String,
    pub site_id: String,
    pub user_id: String,
    pub get_token: Option<Function>,
    /// Mints a fresh grant for a credit whose grant expired while it waited to be sent.
    pub get_grant: Option<Function>,
    pub data_types: Vec<DataType>,
    /// `false`, the page's callback, or the built-in element's options (undefined for the
    /// defaults); the shell's JavaScript draws it.
    pub spinner: JsValue,
    pub spinner_delay_ms: Option<u64>,
    pub inactivity_ms: Option<u64>,
    pub request_timeout_ms: Option<u64>,
    pub debug: bool,
}

impl Options {
    /// Reads the page's options, or the `Error` (with its `code`) that says what is wrong.
    pub(crate) fn from_js(options: &JsValue) -> Result<Options, JsValue> {
        let read = crate::shell::read_options(options)?;
        let text = |i| read.get(i).as_string().unwrap_or_default();
        let callback = |i| read.get(i).dyn_into::<Function>().ok();
        let millis = |i| read.get(i).as_f64().filter(|ms| *ms >= 0.0).map(|ms| ms as u64);
        let (user_id, site_id) = (text(0), text(1));
        protocol::UserId::parse(&user_id).map_err(SyncError::from)?;
        protocol::SiteId::parse(&site_id).map_err(SyncError::from)?;
        let mut data_types = Vec::new();
        for name in Array::from(&read.get(2)).iter() {
            let data_type = crate::shell::data_type_of(&name.as_string().unwrap_or_default())?;
            if !data_types.contains(&data_type) {
                data_types.push(data_type);
            }
        }
        if data_types.is_empty() {
            return Err(SyncError::new("invalid_options", "dataTypes must name at least one type").into());
        }
        Ok(Options {
            hub_url: text(4),
            site_id,
            user_id,
            get_token: callback(5),
            get_grant: callback(6),
            data_types,
            spinner: read.get(3),
            spinner_delay_ms: millis(7),
            inactivity_ms: millis(8),
            request_timeout_ms: millis(9),
            debug: read.get(10).as_bool() == Some(true),
        })
    }

    /// The sync endpoint: `hubUrl` itself when it already names one, else `/api/sync` under it.
    pub(crate) fn endpoint(&self) -> String {
        let url = self.hub_url.trim_end_matches('/');
        if url.ends_with("/api/sync.php") || url.ends_with("/api/sync") {
            url.to_owned()
        } else {
            concat(&[url, "/api/sync"])
        }
    }
}
