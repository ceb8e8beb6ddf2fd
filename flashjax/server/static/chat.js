// The flashjax chat page: keeps the conversation here, streams each reply from /v1/chat/completions
// (server-sent events read from fetch, so the API key can travel in a header), and shows the
// server's memory plan and each reply's speed. Plain JavaScript: no build step, nothing fetched
// from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];  // {role, content}: what the next request sends
let controller = null;  // the running request's AbortController

function apiKey() {
  return $("api-key").value.trim() || localStorage.getItem("flashjax-api-key") || "";
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function errorText(status, body) {
  const message = body && body.error ? body.error.message : "HTTP " + status;
  return status === 401 ? message + " (enter the API key below)" : message;
}

async function loadModel() {
  // The model may still be loading: ask /health until it is ready, then show the model and its plan.
  for (;;) {
    try {
      const health = await fetch("/health");
      if (health.ok) break;
    } catch (e) { /* the server is starting */ }
    await new Promise((r) => setTimeout(r, 1000));
  }
  const response = await fetch("/v1/models", { headers: headers() });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    $("plan").textContent = errorText(response.status, body);
    return;
  }
  const model = body.data[0];
  $("model").textContent = `${model.id} · context ${model.context_length} tokens`;
  $("plan").textContent = model.memory_plan.description;
}

function figuresText(f, usage) {
  const parts = [];
  if (f.tokens_per_s) parts.push(`${f.tokens_per_s.toFixed(1)} tokens/s`);
  if (f.time_to_first_token_ms != null) parts.push(`first token ${Math.round(f.time_to_first_token_ms)} ms`);
  if (usage) parts.push(`${usage.completion_tokens} tokens`);
  if (f.bytes_read_per_token != null) parts.push(`${(f.bytes_read_per_token / 1e6).toFixed(2)} MB read/token`);
  if (f.cache_hit_rate != null) parts.push(`cache hits ${(100 * f.cache_hit_rate).toFixed(0)}%`);
  return parts.join(" · ");
}

// Yields the parsed `data:` payloads of an SSE stream.
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
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;  // a keep-alive comment
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function send(text) {
  const system = $("system").value.trim();
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.dataset.done = "false";
  reply.dataset.chunks = "0";
  const textNode = document.createTextNode("");
  reply.appendChild(textNode);
  busy(true);
  controller = new AbortController();
  const messages = system ? [{ role: "system", content: system }, ...conversation] : conversation;
  const request = {
    messages, stream: true, stream_options: { include_usage: true },
    max_tokens: parseInt($("max-tokens").value, 10) || 256,
    temperature: parseFloat($("temperature").value) || 0,
  };
  let figures = null, usage = null, failed = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new Error(errorText(response.status, body));
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      if (chunk.flashjax) figures = chunk.flashjax;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        textNode.appendData(delta.content);
        reply.dataset.chunks = String(parseInt(reply.dataset.chunks, 10) + 1);
        reply.scrollIntoView({ block: "end" });
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      failed = true;
      addMessage("error", e.message);
    }
  } finally {
    controller = null;
    busy(false);
    reply.dataset.done = "true";
    if (failed && !textNode.data) {
      conversation.pop();  // the message was not answered: it is not sent again
      reply.remove();
    } else {
      // What was shown stays in the conversation, a reply cut short by Stop included.
      conversation.push({ role: "assistant", content: textNode.data });
    }
    if (figures) {
      const line = document.createElement("span");
      line.className = "figures";
      line.textContent = figuresText(figures, usage);
      reply.appendChild(line);
      $("stats").textContent = line.textContent;
    }
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation.length = 0;
  $("messages").replaceChildren();
  $("stats").textContent = "";
});
$("api-key").value = localStorage.getItem("flashjax-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("flashjax-api-key", $("api-key").value.trim());
  loadModel();
});
loadModel();
