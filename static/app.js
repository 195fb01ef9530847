// sse-llm dashboard: the script every page loads (the Content-Security-Policy allows only
// scripts from /static; the detail page's raw view also loads annotate.js). The pages
// work without it; it adds two things:
// - a streaming conversation's page follows the answer live (EventSource), then shows
//   it rendered (Markdown) once it ends;
// - the playground sends a prompt to POST /stream and shows the answer as it streams.
// Streamed text is only ever inserted as text (append / textContent), never as HTML; HTML
// comes only as elements of the server's own page (fetched, parsed, adopted).

const response = document.getElementById("response");
if (response?.dataset.follow) followConversation(response);

const playground = document.getElementById("playground");
if (playground) setUpPlayground(playground);

/** Follow a streaming conversation: append each chunk, then show how it ended. */
function followConversation(target) {
  const status = document.getElementById("live-status");
  const cancel = document.getElementById("cancel");
  // The page already shows the chunks persisted when it was rendered, and the URL asks
  // only for those after them (?last_event_id=N); on a reconnect the browser sends
  // Last-Event-ID itself, so no chunk is shown twice or skipped.
  const source = new EventSource(target.dataset.follow);
  let ended = false;
  status.textContent = "connecting…";
  offerCancel(cancel);

  const end = async (message) => {
    ended = true;
    source.close();
    cancel.hidden = true;
    status.textContent = message;
    await refreshFacts();
  };
  source.addEventListener("open", () => {
    status.textContent = "streaming live";
  });
  source.addEventListener("message", (event) => {
    target.append(JSON.parse(event.data).text);
    setText("chunks", Number(event.lastEventId).toLocaleString("en-US"));
  });
  source.addEventListener("done", () => end("finished"));
  source.addEventListener("error", (event) => {
    if (ended) return;
    if (event.data) {
      // The server's `error` event: the generation failed or was cancelled (the refreshed
      // facts show the error's message).
      end(`ended: ${JSON.parse(event.data).status}`);
    } else if (source.readyState === EventSource.CLOSED) {
      // 204 (it ended with nothing new to send) or a refusal: the server's view tells which.
      end("ended");
    } else {
      status.textContent = "connection lost — reconnecting…";
    }
  });
}

/** Replace the facts and the status badge with the server's view once a stream has ended. */
async function refreshFacts() {
  try {
    const reply = await fetch(window.location.href, { headers: { Accept: "text/html" } });
    if (!reply.ok) return;
    const fresh = new DOMParser().parseFromString(await reply.text(), "text/html");
    for (const id of ["facts", "status"]) {
      const current = document.getElementById(id);
      const replacement = fresh.getElementById(id);
      if (current && replacement) current.replaceWith(document.adoptNode(replacement));
    }
    showRendered(fresh);
  } catch {
    // The live text is already complete; stale timings until a reload are acceptable.
  }
}

/** Once a stream has ended, show the answer as the server renders it (Markdown) in place
 * of the live raw text, which stays in the page, hidden. */
function showRendered(fresh) {
  const live = document.getElementById("response");
  const rendered = fresh.getElementById("response-rendered");
  if (!live || !rendered || document.getElementById("response-rendered")) return;
  live.before(document.adoptNode(rendered));
  live.hidden = true;
  const reading = document.querySelector(".reading");
  for (const id of ["view-toggle", "view-note"]) {
    const part = fresh.getElementById(id);
    if (part && reading) reading.before(document.adoptNode(part));
  }
}

/** Show a "stop" button that cancels the generation (POST /conversations/{id}/cancel). */
function offerCancel(button, url = button?.dataset.cancelUrl) {
  if (!button || !url) return;
  button.hidden = false;
  button.disabled = false;
  button.onclick = async () => {
    button.disabled = true;
    await fetch(url, { method: "POST" }).catch(() => {});
  };
}

function setText(id, text) {
  const element = document.getElementById(id);
  if (element) element.textContent = text;
}

/** The playground: stream the answer to a prompt into the page, then link to it. */
function setUpPlayground(form) {
  const send = document.getElementById("send");
  const stop = document.getElementById("stop");
  const prompt = form.elements.namedItem("prompt");
  const section = document.getElementById("answer-section");
  const answer = document.getElementById("answer");
  const status = document.getElementById("answer-status");
  const link = document.getElementById("answer-link");
  send.disabled = false;

  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    send.disabled = true;
    section.hidden = false;
    link.hidden = true;
    answer.textContent = "";
    answer.setAttribute("aria-busy", "true");
    status.textContent = "sending…";
    try {
      const outcome = await streamAnswer(prompt.value, answer, (id) => {
        status.textContent = "streaming…";
        link.querySelector("a").href = `/conversations/${encodeURIComponent(id)}`;
        link.hidden = false;
        stop.dataset.cancelUrl = `/conversations/${encodeURIComponent(id)}/cancel`;
        offerCancel(stop);
      });
      status.textContent = outcome;
    } catch (error) {
      status.textContent = error.message;
    } finally {
      answer.removeAttribute("aria-busy");
      stop.hidden = true;
      send.disabled = false;
    }
  });
}

/**
 * POST the prompt to /stream and append each chunk's text to `target`.
 * Calls `onStart(id)` once the conversation exists; resolves to a short description of
 * how the stream ended; rejects with a readable Error when the request is refused.
 */
async function streamAnswer(prompt, target, onStart) {
  let reply;
  try {
    reply = await fetch("/stream", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify({ prompt }),
    });
  } catch {
    throw new Error("The service could not be reached.");
  }
  if (!reply.ok) {
    const body = await reply.json().catch(() => null);
    throw new Error(body?.error?.message ?? `The service answered ${reply.status}.`);
  }
  onStart(reply.headers.get("X-Conversation-Id"));
  for await (const event of readEvents(reply.body)) {
    if (event.type === "message") {
      target.append(JSON.parse(event.data).text);
    } else if (event.type === "done") {
      return "finished";
    } else if (event.type === "error") {
      const { status, error } = JSON.parse(event.data);
      return `ended: ${status} — ${error.message}`;
    }
  }
  return "the connection closed before the end; open the conversation to follow it";
}

/** Parse a text/event-stream body into {type, data, id} events (comments are skipped). */
async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { type: "message", data: [], id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (event.data.length) yield { ...event, data: event.data.join("\n") };
        event = { type: "message", data: [], id: null };
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon === -1 ? line : line.slice(0, colon);
      const value = colon === -1 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event.type = value;
      else if (field === "data") event.data.push(value);
      else if (field === "id") event.id = value;
    }
  }
}
