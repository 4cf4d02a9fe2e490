// The Memory panel (the user's memories: list, add, edit, enable, delete, export), the temporary-chat
// switch, and a note with Undo for each memory write a reply reports (`memory_updates`).
// Memories are user data: they reach the page only through textContent, never as HTML.
"use strict";

import { api, headers } from "./api.js";

const $ = (id) => document.getElementById(id);
const KINDS = ["preference", "fact", "instruction"];
const VERB = { add: "Remembered", update: "Updated memory", delete: "Forgot" };

let user = null;      // the user this key reaches (GET /v1/users/me), or null: no memory here
let memories = [];    // the panel's list as last read

const path = (id) => `/v1/users/${encodeURIComponent(user)}/memories` + (id === undefined ? "" : `/${id}`);
export const temporary = () => $("temporary").checked;
export const memoryUser = () => user;

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function kindSelect(value) {
  const select = el("select", { className: "kind-select", ariaLabel: "kind" });
  for (const k of KINDS) select.append(el("option", { value: k, textContent: k, selected: k === value }));
  return select;
}

function status(text) {
  $("memory-status").textContent = text;
  $("memory-status").hidden = !text;
}

// Who the key is; the Memory button and the temporary-chat switch appear only where memory exists.
export async function whoami() {
  user = null;
  let available = false;
  try {
    const me = await api("GET", "/v1/users/me");
    user = me.name;
    available = true;
    if (me.admin) status("The admin key has no memories of its own: enter a user's key to see theirs.");
    else if (!user) status("Enter a user's API key (Settings) to use memory.");
  } catch (e) {
    status(e.status === 401 ? "This key is not accepted." : "");
  }
  $("toggle-memory").hidden = !available;
  $("temporary-switch").hidden = !user;
  $("memory-body").hidden = !user;
  $("memory-user").textContent = user ? "· " + user : "";
  if (!user && $("temporary").checked) setTemporary(false);
  if (!available) $("memory-panel").classList.add("hidden");
  await refresh();
}

export async function refresh() {
  memories = [];
  if (user) {
    try {
      memories = (await api("GET", path())).data;
      status(temporary() ? "Temporary chat: this conversation neither reads nor changes these." : "");
    } catch (e) {
      status("Could not load memories: " + e.message);
    }
  }
  render();
}

function render() {
  const list = $("memory-list");
  list.replaceChildren(...memories.map(item));
  $("memory-empty").hidden = !user || memories.length > 0;
}

function item(m) {
  const li = el("li", { className: "memory-item" + (m.enabled ? "" : " disabled") });
  li.dataset.id = m.id;
  const text = el("p", { className: "memory-text", textContent: m.text });
  const enabled = el("input", { type: "checkbox", checked: m.enabled, className: "memory-enabled",
                                title: "use this memory in chats", ariaLabel: "enabled" });
  enabled.addEventListener("change", () => act(() => api("PATCH", path(m.id), { enabled: enabled.checked })));
  const edit = el("button", { type: "button", className: "ghost small memory-edit", textContent: "Edit" });
  const del = el("button", { type: "button", className: "ghost small danger memory-delete", textContent: "Delete" });
  edit.addEventListener("click", () => startEdit(li, m, text));
  del.addEventListener("click", () => act(async () => {
    await api("DELETE", path(m.id));
    toast(`Deleted “${m.text}”`, undoOf({ ...m, action: "delete" }));
  }));
  const head = el("div", { className: "memory-head" }, el("span", { className: "kind kind-" + m.kind, textContent: m.kind }),
                  el("label", { className: "enabled-label" }, enabled, "use"), edit, del);
  li.append(head, text);
  return li;
}

function startEdit(li, m, text) {
  const area = el("textarea", { className: "memory-edit-text", value: m.text, rows: 3, ariaLabel: "memory text" });
  const kind = kindSelect(m.kind);
  const save = el("button", { type: "button", className: "primary small memory-save", textContent: "Save" });
  const cancel = el("button", { type: "button", className: "ghost small", textContent: "Cancel" });
  const form = el("div", { className: "memory-editor" }, area, el("div", { className: "row" }, kind, save, cancel));
  text.replaceWith(form);
  area.focus();
  cancel.addEventListener("click", render);
  save.addEventListener("click", () => act(async () => {
    await api("PATCH", path(m.id), { text: area.value.trim(), kind: kind.value });
    toast("Edited a memory", undoOf({ ...m, action: "update", previous: m }));
  }));
}

// Runs one change, then shows the list as the server now has it (or the error).
async function act(change) {
  try {
    await change();
  } catch (e) {
    toast("Memory: " + e.message);
  }
  await refresh();
}

// A memory_updates record -> the call that reverses it (null when it cannot be reversed).
function undoOf(u) {
  if (u.action === "add") return () => api("DELETE", path(u.id));
  if (u.action === "delete") return () => api("POST", path(), { text: u.text, kind: u.kind, enabled: u.enabled !== false });
  const before = u.previous || memories.find((m) => m.id === u.id);
  if (u.action === "update" && before) {
    return () => api("PATCH", path(u.id), { text: before.text, kind: before.kind, enabled: before.enabled });
  }
  return null;
}

function undoButton(undo, done) {
  const button = el("button", { type: "button", className: "ghost small undo", textContent: "Undo" });
  button.addEventListener("click", () => act(async () => {
    button.disabled = true;
    try {
      await undo();
    } catch (e) {
      button.disabled = false;
      throw e;
    }
    done();
  }));
  return button;
}

// The notes under a reply: one per write or delete the turn made, each with Undo.
export function noteUpdates(container, updates) {
  for (const u of updates) {
    const note = el("div", { className: "memory-note " + u.action },
                    el("span", { className: "verb", textContent: VERB[u.action] || u.action }), " ",
                    el("span", { className: "memory-note-text", textContent: u.text }));
    const undo = undoOf(u);
    if (undo) note.append(undoButton(undo, () => { note.classList.add("undone"); note.lastChild.textContent = "Undone"; }));
    container.append(note);
  }
  if (updates.length) refresh();
}

function toast(text, undo = null) {
  const box = el("div", { className: "toast", role: "status" }, el("span", { textContent: text }));
  const close = () => box.remove();
  if (undo) box.append(undoButton(undo, close));
  $("toasts").append(box);
  setTimeout(close, 8000);
}

function setTemporary(on) {
  $("temporary").checked = on;
  document.body.classList.toggle("temporary", on);
  $("temp-banner").hidden = !on;
  status(on && user ? "Temporary chat: this conversation neither reads nor changes these." : "");
}

async function exportAll() {
  try {
    const r = await fetch(`/v1/users/${encodeURIComponent(user)}/export`, { headers: headers() });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const url = URL.createObjectURL(await r.blob());
    const a = el("a", { href: url, download: `pocketlm-${user}-export.json` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  } catch (e) {
    toast("Export failed: " + e.message);
  }
}

export function initMemory() {
  $("memory-kind").replaceWith(Object.assign(kindSelect("fact"), { id: "memory-kind" }));
  $("memory-add").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("memory-text").value.trim();
    if (!text) return;
    act(async () => {
      await api("POST", path(), { text, kind: $("memory-kind").value });
      $("memory-text").value = "";
    });
  });
  $("memory-export").addEventListener("click", exportAll);
  $("temporary").addEventListener("change", () => setTemporary($("temporary").checked));
  $("toggle-memory").addEventListener("click", () => {
    const hidden = $("memory-panel").classList.toggle("hidden");
    $("toggle-memory").setAttribute("aria-expanded", String(!hidden));
    if (!hidden) refresh();
  });
}
