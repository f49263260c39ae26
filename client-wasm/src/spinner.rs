//! The sync indicator: a small status element whose text is set with `textContent` and
//! announced politely to screen readers, or the page's own callback, or nothing.

use wasm_bindgen::JsValue;
use web_sys::HtmlElement;

use crate::options::SpinnerOption;

const DEFAULT_CLASS: &str = "sync-indicator";
/// Inline look of the built-in element when the page brings no class of its own.
const DEFAULT_STYLE: &str = "position:fixed;top:10px;right:10px;z-index:9999;padding:8px 12px;\
border-radius:4px;background:#2e7d32;color:#fff;font:14px/1.2 system-ui,sans-serif;";

pub(crate) struct Spinner {
    option: SpinnerOption,
    element: Option<HtmlElement>,
}

impl Spinner {
    pub(crate) fn new(option: SpinnerOption) -> Spinner {
        Spinner { option, element: None }
    }

    pub(crate) fn show(&mut self, visible: bool) {
        match &self.option {
            SpinnerOption::Off => {}
            SpinnerOption::Callback(callback) => {
                let _ = callback.call1(&JsValue::NULL, &JsValue::from_bool(visible));
            }
            SpinnerOption::Element { class_name, text } => {
                if self.element.is_none() && visible {
                    self.element = create(class_name.as_deref(), text);
                }
                if let Some(element) = &self.element {
                    element.set_hidden(!visible);
                }
            }
        }
    }

    pub(crate) fn remove(&mut self) {
        if let Some(element) = self.element.take() {
            element.remove();
        }
    }
}

fn create(class_name: Option<&str>, text: &str) -> Option<HtmlElement> {
    let document = web_sys::window()?.document()?;
    let element: HtmlElement = wasm_bindgen::JsCast::dyn_into(document.create_element("div").ok()?).ok()?;
    element.set_class_name(class_name.unwrap_or(DEFAULT_CLASS));
    if class_name.is_none() {
        let _ = element.set_attribute("style", DEFAULT_STYLE);
    }
    let _ = element.set_attribute("role", "status");
    let _ = element.set_attribute("aria-live", "polite");
    element.set_text_content(Some(text));
    document.body()?.append_child(&element).ok()?;
    Some(element)
}
