// Passage annotations on a conversation's raw-text view (?view=raw), loaded by that page
// only. The server sends each text cut into segments, each an element with data-start /
// data-end: its offsets in Unicode code points into the stored text (what SPEC 9's
// annotations count). This script turns the browser's selection into those offsets,
// POSTs the annotation to /conversations/{id}/annotations, and deletes ones listed.
//
// How the stored text maps to the page's text: the HTML parser turns CR LF, and a lone
// CR, into one LF, so the server gives every CR LF / CR its own segment
// (data-line-break); inside every other segment the page's text is the stored text, in
// UTF-16 code units (an emoji outside the BMP is 2 units but 1 code point).

const panel = document.getElementById("annotations");
if (panel) setUpAnnotations(panel);

function setUpAnnotations(panel) {
  const form = document.getElementById("annotate-form");
  const passage = document.getElementById("annotate-passage");
  const save = document.getElementById("annotate-save");
  const status = document.getElementById("annotate-status");
  const reviewer = form.elements.namedItem("reviewer");
  const fields = [...document.querySelectorAll("[data-field]")];
  form.hidden = false;
  if (!reviewer.value) reviewer.value = localStorage.getItem("sse-llm-reviewer") ?? "";

  document.addEventListener("selectionchange", () => {
    const selection = document.getSelection();
    if (!selection || selection.rangeCount === 0 || selection.isCollapsed) return;
    // A collapsed selection (a click into the form) keeps the passage chosen before it.
    const span = selectedSpan(selection.getRangeAt(0), fields);
    if (span === null) return;
    if (span.error) {
      passage.textContent = span.error;
      save.disabled = true;
      return;
    }
    for (const name of ["field", "start", "end"]) form.elements.namedItem(name).value = span[name];
    const text = selection.toString();
    const shown = text.length > 120 ? `${text.slice(0, 60)} … ${text.slice(-60)}` : text;
    passage.textContent = `${span.field}, characters ${span.start}–${span.end}: “${shown}”`;
    save.disabled = false;
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    save.disabled = true;
    status.textContent = "saving…";
    const data = new FormData(form);
    const body = Object.fromEntries(["reviewer", "field", "label", "note"].map((k) => [k, data.get(k)]));
    body.start = Number(data.get("start"));
    body.end = Number(data.get("end"));
    const reply = await send("POST", panel.dataset.url, body);
    if (!reply.ok) {
      status.textContent = reply.message;
      save.disabled = false;
      return;
    }
    if (!reviewer.readOnly) localStorage.setItem("sse-llm-reviewer", body.reviewer);
    reloadAt(`annotation-${reply.body.id}`);
  });

  for (const item of panel.querySelectorAll("[data-annotation]")) setUpListed(item, status);
  for (const mark of document.querySelectorAll("mark[data-annotations]")) {
    mark.addEventListener("click", () => {
      const ids = mark.dataset.annotations.split(" ");
      for (const item of panel.querySelectorAll("[data-annotation]")) {
        item.classList.toggle("annotation--focus", ids.includes(item.dataset.annotation));
      }
      document.getElementById(`annotation-${ids[0]}`)?.scrollIntoView({ block: "nearest" });
    });
  }
}

/** An annotation in the list: shows its passage on hover or focus, and can be deleted. */
function setUpListed(item, status) {
  const id = item.dataset.annotation;
  const marks = () => document.querySelectorAll(`mark[data-annotations~="${CSS.escape(id)}"]`);
  const focus = (on) => {
    for (const mark of marks()) mark.classList.toggle("annotated--focus", on);
  };
  item.addEventListener("mouseenter", () => focus(true));
  item.addEventListener("mouseleave", () => focus(false));
  item.addEventListener("focusin", () => focus(true));
  item.addEventListener("focusout", () => focus(false));
  const remove = item.querySelector("[data-delete-url]");
  remove.hidden = false;
  remove.addEventListener("click", async () => {
    remove.disabled = true;
    const reply = await send("DELETE", remove.dataset.deleteUrl);
    if (reply.ok) reloadAt("annotations");
    else {
      status.textContent = reply.message;
      remove.disabled = false;
    }
  });
}

/**
 * The stored-text span {field, start, end} a selection covers, clamped to the one text it
 * touches; {error} if it touches both texts or is empty; null if it touches neither.
 */
export function selectedSpan(range, fields) {
  const touched = fields.filter((field) => range.intersectsNode(field));
  if (touched.length === 0) return null;
  if (touched.length > 1) return { error: "Select a passage within one text: the prompt or the answer." };
  const field = touched[0];
  const whole = document.createRange();
  whole.selectNodeContents(field);
  const length = Number(field.dataset.length);
  const start =
    range.compareBoundaryPoints(Range.START_TO_START, whole) <= 0
      ? 0
      : storedOffset(field, range.startContainer, range.startOffset);
  const end =
    range.compareBoundaryPoints(Range.END_TO_END, whole) >= 0
      ? length
      : storedOffset(field, range.endContainer, range.endOffset);
  if (start >= end) return { error: "Select at least one character." };
  return { field: field.dataset.field, start, end };
}

/** The code-point offset into the stored text of a DOM boundary point inside `field`. */
export function storedOffset(field, node, offset) {
  if (node === field) {
    // Between segments: the offset counts child elements.
    const next = field.children[offset];
    return next ? Number(next.dataset.start) : Number(field.dataset.length);
  }
  const isText = node.nodeType === Node.TEXT_NODE;
  const segment = (isText ? node.parentElement : node).closest("[data-start]");
  const start = Number(segment.dataset.start);
  const end = Number(segment.dataset.end);
  if (!isText) return offset === 0 ? start : end; // before or after the segment's text
  if ("lineBreak" in segment.dataset) return offset === 0 ? start : end;
  // UTF-16 code units before the point, counted as code points (a surrogate pair is one).
  return Math.min(start + Array.from(node.data.slice(0, offset)).length, end);
}

/** A same-origin JSON request; {ok, body} or {ok: false, message} to show. */
async function send(method, url, body) {
  let reply;
  try {
    reply = await fetch(url, {
      method,
      headers: body ? { "Content-Type": "application/json", Accept: "application/json" } : {},
      body: body ? JSON.stringify(body) : undefined,
      credentials: "same-origin",
    });
  } catch {
    return { ok: false, message: "The service could not be reached." };
  }
  const data = reply.status === 204 ? null : await reply.json().catch(() => null);
  if (reply.ok) return { ok: true, body: data };
  return { ok: false, message: data?.error?.message ?? `The service answered ${reply.status}.` };
}

/** Reload the raw view scrolled to an element, to show the server's view of the change. */
function reloadAt(anchor) {
  const url = new URL(window.location.href);
  url.searchParams.set("view", "raw");
  url.hash = anchor;
  window.history.replaceState(null, "", url);
  window.location.reload();
}
