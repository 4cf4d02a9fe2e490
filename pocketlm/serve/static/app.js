// pocketlm web chat: keeps the conversation, streams replies from /v1/chat/completions (SSE),
// and lets the reader stop a reply. Plain browser JavaScript modules, no build step: api.js holds the
// key, images.js the images of a message, audio.js its audio clips, memory.js the Memory panel, the temporary-chat switch and the memory notes under replies.
"use strict";

import { headers, initKey } from "./api.js";
import { hasClips, initAudio, showClips, takeClips, withClips } from "./audio.js";
import { content as userContent, hasImages, initImages, showImages, takeImages } from "./images.js";
import { initMemory, noteUpdates, temporary, whoami } from "./memory.js";

const $ = (id) => document.getElementById(id);
const els = {
  messages: $("messages"), empty: $("empty"), composer: $("composer"), input: $("input"), send: $("send"),
  system: $("system"), temperature: $("temperature"), temperatureValue: $("temperature-value"),
  maxTokens: $("max-tokens"), modelName: $("model-name"), dot: $("status-dot"),
  settings: $("settings"), toggleSettings: $("toggle-settings"), newChat: $("new-chat"),
};

const SAVED = ["system", "temperature", "maxTokens"];  // settings remembered across visits (the key: api.js)
let model = null;
let history = [];        // [{role, content}] sent with every turn
let controller = null;   // AbortController of the reply being streamed

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    model = body.data[0].id;
    if (body.data[0].max_model_len) els.maxTokens.max = body.data[0].max_model_len;
    els.modelName.textContent = model;
    els.dot.className = "dot ok";
  } catch (e) {
    els.modelName.textContent = "server unavailable: " + e.message;
    els.dot.className = "dot down";
  }
}

function addMessage(role, text) {
  els.empty.hidden = true;
  const wrap = document.createElement("div");
  wrap.className = "msg " + role;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  bubble.textContent = text;
  const meta = document.createElement("div");
  meta.className = "meta";
  wrap.append(bubble, meta);
  els.messages.append(wrap);
  scrollDown();
  return { wrap, bubble, meta };
}

function scrollDown() {
  els.messages.scrollTop = els.messages.scrollHeight;
}

function setBusy(busy) {
  els.send.textContent = busy ? "Stop" : "Send";
  els.send.classList.toggle("stop", busy);
  els.send.type = busy ? "button" : "submit";
}

// Read a server-sent-event stream: yields the parsed JSON of each `data:` line until [DONE].
async function* sse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  if (!model) await loadModel();
  const images = takeImages(), clips = takeClips();
  history.push({ role: "user", content: withClips(userContent(text, images), clips) });
  const bubble = addMessage("user", text).bubble;
  showImages(bubble, images);
  showClips(bubble, clips);
  const reply = addMessage("assistant", "");
  reply.wrap.classList.add("streaming");
  controller = new AbortController();
  setBusy(true);

  const messages = (els.system.value.trim() ? [{ role: "system", content: els.system.value.trim() }] : []).concat(history);
  const body = {
    model, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number(els.temperature.value), max_tokens: Number(els.maxTokens.value) || 256,
  };
  const temp = temporary();
  if (temp) body.memory = false;  // a temporary chat: the server neither reads nor writes memory
  let content = "", usage = null, finish = null;
  const started = performance.now();
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : `HTTP ${r.status}`);
    }
    for await (const chunk of sse(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      if (chunk.memory_updates) noteUpdates(reply.wrap, chunk.memory_updates);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        content += choice.delta.content;
        reply.bubble.textContent = content;
        scrollDown();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    const seconds = (performance.now() - started) / 1000;
    const parts = [];
    if (usage) parts.push(`${usage.completion_tokens} tokens`, `${(usage.completion_tokens / seconds).toFixed(1)} tok/s`);
    if (finish === "length") parts.push("stopped at max tokens");
    if (temp) parts.push("temporary chat: memory not used");
    if (usage) reply.wrap.dataset.promptTokens = usage.prompt_tokens;
    reply.meta.textContent = parts.join(" · ");
  } catch (e) {
    if (e.name === "AbortError") {
      reply.meta.textContent = "stopped";
    } else {
      reply.wrap.classList.add("error");
      reply.bubble.textContent = (content ? content + "\n\n" : "") + "Error: " + e.message;
    }
  } finally {
    reply.wrap.classList.remove("streaming");
    if (content) history.push({ role: "assistant", content });
    else if (!reply.wrap.classList.contains("error")) reply.bubble.textContent = "(no reply)";
    controller = null;
    setBusy(false);
    els.input.focus();
  }
}

function resize() {
  els.input.style.height = "auto";
  els.input.style.height = Math.min(els.input.scrollHeight, 200) + "px";
}

els.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = els.input.value.trim();
  if ((!text && !hasImages() && !hasClips()) || controller) return;
  els.input.value = "";
  resize();
  send(text);
});
els.send.addEventListener("click", () => { if (controller) controller.abort(); });
els.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    els.composer.requestSubmit();
  }
});
els.input.addEventListener("input", resize);
els.temperature.addEventListener("input", () => { els.temperatureValue.textContent = Number(els.temperature.value).toFixed(2); });
els.toggleSettings.addEventListener("click", () => {
  const hidden = els.settings.classList.toggle("hidden");
  els.toggleSettings.setAttribute("aria-expanded", String(!hidden));
});
els.newChat.addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  els.messages.querySelectorAll(".msg").forEach((m) => m.remove());
  els.empty.hidden = false;
  els.input.focus();
});
for (const key of SAVED) {
  const saved = localStorage.getItem("pocketlm." + key);
  if (saved !== null) els[key].value = saved;
  els[key].addEventListener("change", () => localStorage.setItem("pocketlm." + key, els[key].value));
}
initKey(() => { loadModel(); whoami(); });
initMemory();
initImages();
initAudio();
els.temperatureValue.textContent = Number(els.temperature.value).toFixed(2);
loadModel();
whoami();
