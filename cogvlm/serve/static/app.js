// The chat page: one conversation (at most one image, as CogVLM takes it) sent to /v1/chat/completions with
// stream: true; the answer is read from the server-sent events as it arrives.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, messages: [], controller: null, model: "cogvlm" };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function status(text) { $("status").textContent = text; }

function bubble(kind, text, image) {
  const div = document.createElement("div");
  div.className = "msg " + kind;
  if (image) {
    const img = document.createElement("img");
    img.src = image;
    img.alt = "the conversation's image";
    div.appendChild(img);
  }
  div.appendChild(document.createTextNode(text));
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function newConversation() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("log").textContent = "";
  status("ready");
}

function setImage(dataUrl) {
  // One image per conversation: a new image (or removing it) starts a new one.
  if (state.messages.length) newConversation();
  state.image = dataUrl;
  $("preview").src = dataUrl || "";
  $("preview").hidden = !dataUrl;
  $("drop-hint").hidden = !!dataUrl;
  $("clear-image").hidden = !dataUrl;
}

function readImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { status(file.name + " is not an image"); return; }
  const reader = new FileReader();
  reader.onload = () => setImage(reader.result);
  reader.onerror = () => status("cannot read " + file.name);
  reader.readAsDataURL(file);
}

function userMessage(text) {
  if (state.messages.length === 0 && state.image) {
    return { role: "user", content: [{ type: "image_url", image_url: { url: state.image } }, { type: "text", text }] };
  }
  return { role: "user", content: text };
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

// Yields the JSON payload of each `data:` event until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function ask(text) {
  const message = userMessage(text);
  const firstImage = state.messages.length === 0 ? state.image : null;
  bubble("user", text, firstImage);
  const answer = bubble("assistant streaming", "");
  const request = { model: state.model, messages: [...state.messages, message], stream: true };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) request.max_tokens = maxTokens;
  const temperature = parseFloat($("temperature").value);
  if (temperature > 0) request.temperature = temperature;

  state.controller = new AbortController();
  busy(true);
  status("answering…");
  let reply = "";
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const event of events(response)) {
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        reply += choice.delta.content;
        answer.textContent = reply;
        $("log").scrollTop = $("log").scrollHeight;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    if (!finish) throw new Error("the answer ended early");
    state.messages.push(message, { role: "assistant", content: reply });
    status(finish === "length" ? "done (max tokens reached)" : "done");
  } catch (e) {
    // A failed or stopped turn is not kept, so the next question is asked without it (as `cogvlm chat` does).
    if (e.name === "AbortError") status("stopped; this turn is not kept");
    else { bubble("error", e.message); status("error"); }
    if (!reply) answer.remove();
  } finally {
    answer.classList.remove("streaming");
    answer.dataset.done = "true";
    state.controller = null;
    busy(false);
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").hidden = !on;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) { $("model").textContent = await errorText(response); return; }
    const body = await response.json();
    state.model = body.data[0].id;
    $("model").textContent = state.model + " · context " + body.data[0].max_model_len + " tokens";
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

$("image-input").addEventListener("change", (e) => readImage(e.target.files[0]));
$("clear-image").addEventListener("click", () => { $("image-input").value = ""; setImage(null); });
$("new").addEventListener("click", newConversation);
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("api-key").value = localStorage.getItem("cogvlm-api-key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("cogvlm-api-key", $("api-key").value); loadModel(); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  readImage(e.dataTransfer.files[0]);
});
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("image-input").click(); });
$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("question").value.trim();
  if (!text || state.controller) return;
  $("question").value = "";
  ask(text);
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
loadModel();
