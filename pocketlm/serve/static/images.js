// Images for the next message: by the file picker, by pasting, or by dropping them on the chat.
// They wait as thumbnails above the composer and go out as OpenAI image_url parts (data: URLs; the
// server fetches no remote image). A picture too big for a request body is scaled down here first.
"use strict";

const MAX_URL_CHARS = 1_500_000;  // the server takes bodies of up to 2 MiB
const MAX_SIDE = 1024;            // a scaled-down image's longer side (the model sees far fewer pixels)
let pending = [];                 // data URLs of the images waiting to be sent

const $ = (id) => document.getElementById(id);

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function shrink(url) {
  const img = new Image();
  img.src = url;
  await img.decode();
  const scale = Math.min(1, MAX_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
  canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
  canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", 0.9);
}

async function add(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    let url = await readAsDataURL(file);
    if (url.length > MAX_URL_CHARS) url = await shrink(url);
    pending.push(url);
  }
  render();
}

function render() {
  const tray = $("attachments");
  tray.replaceChildren(...pending.map((url, i) => {
    const item = document.createElement("div");
    item.className = "attachment";
    const img = document.createElement("img");
    img.src = url;
    img.alt = "image to send";
    item.append(img, removeButton("remove this image", () => { pending.splice(i, 1); render(); }));
    return item;
  }));
  tray.hidden = pending.length === 0;
}

// The × on a waiting attachment (an image here, a clip in audio.js).
export function removeButton(title, onClick) {
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "remove";
  remove.title = title;
  remove.textContent = "×";
  remove.addEventListener("click", onClick);
  return remove;
}

export function hasImages() {
  return pending.length > 0;
}

// The waiting images, handed over once (the tray empties).
export function takeImages() {
  const urls = pending;
  pending = [];
  render();
  return urls;
}

// A user message's content: plain text, or the images then the text as OpenAI content parts.
export function content(text, urls) {
  if (!urls.length) return text;
  return [...urls.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text }];
}

// The images shown in a message bubble, above its text.
export function showImages(bubble, urls) {
  if (!urls.length) return;
  const row = document.createElement("div");
  row.className = "images";
  for (const url of urls) {
    const img = document.createElement("img");
    img.src = url;
    img.alt = "image sent";
    row.append(img);
  }
  bubble.prepend(row);
}

export function initImages() {
  const picker = $("image-input");
  $("attach").addEventListener("click", () => picker.click());
  picker.addEventListener("change", () => { add([...picker.files]); picker.value = ""; });
  $("input").addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (files.some((f) => f.type.startsWith("image/"))) {
      e.preventDefault();
      add(files);
    }
  });
  const chat = document.querySelector("main.chat");
  chat.addEventListener("dragover", (e) => { e.preventDefault(); chat.classList.add("dropping"); });
  chat.addEventListener("dragleave", () => chat.classList.remove("dropping"));
  chat.addEventListener("drop", (e) => {
    e.preventDefault();
    chat.classList.remove("dropping");
    add([...(e.dataTransfer ? e.dataTransfer.files : [])]);
  });
}
