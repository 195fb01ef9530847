// sse-llm review queue: keyboard shortcuts on top of the page's plain forms (which do
// everything without this script). g good, b bad, u unsure, s skip, a annotate (the note).
// Keys are single characters, so (WCAG 2.1.4) they are inactive while typing in a field
// or with a modifier held, and a visible switch turns them off, remembered per browser.

const STORAGE_KEY = "sse-llm.review-keys";
const toggle = document.getElementById("queue-keys-toggle");

function keysOn() {
  try {
    return window.localStorage.getItem(STORAGE_KEY) !== "off";
  } catch {
    return true; // storage refused (private mode): the switch still works for this page
  }
}

let enabled = keysOn();
if (toggle) {
  toggle.checked = enabled;
  toggle.closest("label").hidden = false;
  toggle.addEventListener("change", () => {
    enabled = toggle.checked;
    try {
      window.localStorage.setItem(STORAGE_KEY, enabled ? "on" : "off");
    } catch {
      // Not remembered; still applies to this page.
    }
  });
}

function typing(target) {
  if (!(target instanceof Element)) return false;
  return target.closest("input, textarea, select, [contenteditable]") !== null;
}

document.addEventListener("keydown", (event) => {
  if (!enabled || event.defaultPrevented || event.repeat) return;
  if (event.ctrlKey || event.metaKey || event.altKey || event.shiftKey) return;
  if (typing(event.target)) return;
  const key = event.key.length === 1 ? event.key.toLowerCase() : "";
  const control = key ? document.querySelector(`#queue-item [data-key="${key}"]`) : null;
  if (!control) return;
  event.preventDefault();
  if (control instanceof HTMLButtonElement) {
    control.form.requestSubmit(control); // the form's own submit: validation and all
  } else {
    control.focus();
  }
});
