// The API key and the one helper every call to /v1 goes through.
//
// Where the key lives: sessionStorage by default, so a user's key (which unlocks that user's
// memories) is forgotten when the tab closes and never outlives a shared computer's session; the
// "remember on this device" box moves it to localStorage for people on their own machine. Either
// way only this page's origin can read it, and the page loads no script from anywhere else.
"use strict";

const KEY = "pocketlm.apiKey";
const field = () => document.getElementById("api-key");
const rememberBox = () => document.getElementById("remember-key");

export function initKey(onChange) {
  const saved = localStorage.getItem(KEY);
  rememberBox().checked = saved !== null;
  field().value = saved ?? sessionStorage.getItem(KEY) ?? "";
  const store = () => {
    const key = field().value.trim();
    localStorage.removeItem(KEY);
    sessionStorage.removeItem(KEY);
    if (key) (rememberBox().checked ? localStorage : sessionStorage).setItem(KEY, key);
  };
  field().addEventListener("change", () => { store(); onChange(); });
  rememberBox().addEventListener("change", store);
}

export function headers() {
  const h = { "Content-Type": "application/json" };
  const key = field().value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// A JSON request; a non-2xx answer throws an Error carrying the server's message and status.
export async function api(method, path, body) {
  const r = await fetch(path, { method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const e = new Error(data.error ? data.error.message : `HTTP ${r.status}`);
    e.status = r.status;
    throw e;
  }
  return data;
}
