//! `SyncOptions` as the page passes them, read once at construction.

use js_sys::{Function, Reflect};
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

pub(crate) fn field(options: &JsValue, name: &str) -> JsValue {
    Reflect::get(options, &JsValue::from_str(name)).unwrap_or(JsValue::UNDEFINED)
}

fn required_string(options: &JsValue, name: &str) -> Result<String, SyncError> {
    field(options, name).as_string().filter(|s| !s.is_empty()).ok_or_else(|| {
        SyncError::new("invalid_options", concat(&["SyncManager needs ", name, " (a string)"]))
    })
}

/// An optional callback option.
fn function(options: &JsValue, name: &str) -> Result<Option<Function>, SyncError> {
    let value = field(options, name);
    if value.is_undefined() || value.is_null() {
        return Ok(None);
    }
    match value.dyn_into::<Function>() {
        Ok(f) => Ok(Some(f)),
        Err(_) => Err(SyncError::new("invalid_options", concat(&[name, " must be a function"]))),
    }
}

fn millis(options: &JsValue, name: &str) -> Result<Option<u64>, SyncError> {
    let value = field(options, name);
    if value.is_undefined() {
        return Ok(None);
    }
    match value.as_f64() {
        Some(n) if n >= 0.0 && n.is_finite() => Ok(Some(n as u64)),
        _ => Err(SyncError::new("invalid_options", concat(&[name, " must be a number of milliseconds"]))),
    }
}

impl Options {
    pub(crate) fn from_js(options: &JsValue) -> Result<Options, SyncError> {
        if !options.is_object() {
            return Err(SyncError::new("invalid_options", "SyncManager needs an options object"));
        }
        let user_id = required_string(options, "userId")?;
        protocol::UserId::parse(&user_id)?;
        let site_id = required_string(options, "siteId")?;
        protocol::SiteId::parse(&site_id)?;
        let types = field(options, "dataTypes");
        let data_types = if types.is_undefined() {
            vec![DataType::Balance, DataType::Profile, DataType::Roles]
        } else {
            let array: js_sys::Array = types
                .dyn_into()
                .map_err(|_| SyncError::new("invalid_options", "dataTypes must be an array"))?;
            let mut list = Vec::new();
            for item in array.iter() {
                let name = item.as_string().unwrap_or_default();
                let t = crate::shell::data_type_of(&name)?;
                if !list.contains(&t) {
                    list.push(t);
                }
            }
            if list.is_empty() {
                return Err(SyncError::new("invalid_options", "dataTypes must name at least one type"));
            }
            list
        };
        let spinner = field(options, "spinner");
        if !(spinner.is_undefined()
            || spinner.is_object()
            || spinner.is_function()
            || spinner.as_bool() == Some(false))
        {
            return Err(SyncError::new("invalid_options", "spinner must be false, a function or an object"));
        }
        Ok(Options {
            hub_url: required_string(options, "hubUrl")?,
            site_id,
            user_id,
            get_token: function(options, "getToken")?,
            get_grant: function(options, "getGrant")?,
            data_types,
            spinner,
            spinner_delay_ms: millis(options, "spinnerDelayMs")?,
            inactivity_ms: millis(options, "inactivityMs")?,
            request_timeout_ms: millis(options, "requestTimeoutMs")?,
            debug: field(options, "debug").as_bool().unwrap_or(false),
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
