// Audio clips for the next message: by the ♪ picker, by dropping files on the chat, or recorded with the ●
// button. They wait as chips above the composer and go out as OpenAI input_audio parts (base64 WAV, the only
// format the server reads: pocketlm/data/speech.py). A PCM WAV the server can read is sent as it is; any other
// file (mp3, ogg, webm, a float WAV) is decoded by the browser and re-encoded as 16 kHz mono 16-bit PCM.
"use strict";

import { removeButton } from "./images.js";

const RATE = 16000;                   // the speech model's rate: what a re-encoded clip is written at
const MAX_SECONDS = 30;               // the server refuses a longer clip (MAX_AUDIO_SECONDS)
const MAX_B64_CHARS = 1_500_000;      // every clip of one message together: the server takes bodies of up to 2 MiB
const MAX_CLIPS = 8;                  // the server's Limits.max_images counts audio clips too
const MAX_FILE_BYTES = 64 * 2 ** 20;  // a bigger file is not even decoded
const AUDIO_EXT = /\.(wav|wave|mp3|ogg|oga|opus|flac|m4a|aac|webm)$/i;
let pending = [];                     // {data: base64 WAV, name, seconds} waiting to be sent
let recording = null;                 // the microphone capture in progress
let recordings = 0;                   // numbers the recordings' names on this page

const $ = (id) => document.getElementById(id);
const isAudio = (file) => file.type.startsWith("audio/") || AUDIO_EXT.test(file.name);
const used = () => pending.reduce((n, clip) => n + clip.data.length, 0);

// A line under the clips: limits, microphone trouble, the recording's progress. Empty text hides it.
function note(text, error = true) {
  const el = $("audio-note");
  el.textContent = text;
  el.classList.toggle("error", error);
  el.hidden = !text;
}

// The header of a WAV the server's reader (Python's wave module) takes as it is, or null: PCM (format 1)
// only, so a float or extensible WAV is re-encoded here.
function pcmWav(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const tag = (at) => String.fromCharCode(...bytes.subarray(at, at + 4));
  if (bytes.length < 44 || tag(0) !== "RIFF" || tag(8) !== "WAVE") return null;
  let fmt = null;
  for (let at = 12; at + 8 <= bytes.length;) {
    const id = tag(at), size = view.getUint32(at + 4, true), body = at + 8;
    if (id === "fmt " && body + 16 <= bytes.length) {
      fmt = { format: view.getUint16(body, true), channels: view.getUint16(body + 2, true),
              rate: view.getUint32(body + 4, true), bits: view.getUint16(body + 14, true) };
    } else if (id === "data" && fmt) {
      const ok = fmt.format === 1 && [8, 16, 24, 32].includes(fmt.bits) && fmt.channels >= 1 && fmt.rate >= 1000;
      return ok ? { ...fmt, seconds: Math.min(size, bytes.length - body) / (fmt.channels * fmt.bits / 8) / fmt.rate } : null;
    }
    at = body + size + (size & 1);  // chunks are padded to an even length
  }
  return null;
}

// 16 kHz mono samples of any AudioBuffer: rendered through an OfflineAudioContext, which resamples and mixes down.
async function mono16k(buffer) {
  const ctx = new OfflineAudioContext(1, Math.max(1, Math.ceil(buffer.duration * RATE)), RATE);
  const source = ctx.createBufferSource();
  source.buffer = buffer;
  source.connect(ctx.destination);
  source.start();
  return (await ctx.startRendering()).getChannelData(0);
}

// 16-bit PCM mono WAV bytes of float samples in [-1, 1].
function wav(samples, rate = RATE) {
  const out = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const put = (at, s) => [...s].forEach((c, i) => out.setUint8(at + i, c.charCodeAt(0)));
  put(0, "RIFF"); out.setUint32(4, 36 + samples.length * 2, true); put(8, "WAVE");
  put(12, "fmt "); out.setUint32(16, 16, true); out.setUint16(20, 1, true); out.setUint16(22, 1, true);
  out.setUint32(24, rate, true); out.setUint32(28, rate * 2, true); out.setUint16(32, 2, true); out.setUint16(34, 16, true);
  put(36, "data"); out.setUint32(40, samples.length * 2, true);
  samples.forEach((x, i) => out.setInt16(44 + i * 2, Math.max(-1, Math.min(1, x)) * 32767, true));
  return new Uint8Array(out.buffer);
}

function base64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

const tooLong = (name, seconds) => `${name} is ${seconds.toFixed(1)} s long; the server takes clips of up to ${MAX_SECONDS} s`;

// Queue one clip if it fits the message's limits; else the reason is shown.
function queue(name, data, seconds) {
  if (seconds > MAX_SECONDS) note(tooLong(name, seconds));
  else if (pending.length >= MAX_CLIPS) note(`at most ${MAX_CLIPS} clips go in one message`);
  else if (used() + data.length > MAX_B64_CHARS) {
    note(`${name} does not fit: one message carries about ${Math.floor(MAX_B64_CHARS * 3 / 4 / 32000)} s of 16 kHz audio`);
  } else {
    pending.push({ name, data, seconds });
    render();
  }
}

async function addFile(file) {
  if (file.size > MAX_FILE_BYTES) return note(`${file.name} is over ${MAX_FILE_BYTES / 2 ** 20} MiB; pick a shorter clip`);
  const bytes = new Uint8Array(await file.arrayBuffer());
  const header = pcmWav(bytes);
  if (header && header.seconds > MAX_SECONDS) return note(tooLong(file.name, header.seconds));
  const data = header && base64(bytes);
  if (data && used() + data.length <= MAX_B64_CHARS) return queue(file.name, data, header.seconds);
  let decoded;  // not a WAV the server reads, or too big a one: decoded at 16 kHz and written anew
  try {
    decoded = await new OfflineAudioContext(1, 1, RATE).decodeAudioData(bytes.buffer.slice(0));
  } catch {
    return note(`${file.name}: this browser cannot decode it as audio`);
  }
  if (decoded.duration > MAX_SECONDS) return note(tooLong(file.name, decoded.duration));
  queue(file.name, base64(wav(await mono16k(decoded))), decoded.duration);
}

async function add(files) {
  note("");
  for (const file of files.filter(isAudio)) await addFile(file);
}

// The microphone: an AudioWorklet hands each 128-sample block of the (mixed-down) input to the page.
const CAPTURE = `registerProcessor("capture", class extends AudioWorkletProcessor {
  process([input]) {
    if (input.length) {
      const mono = new Float32Array(input[0].length);
      for (const channel of input) channel.forEach((x, i) => { mono[i] += x / input.length; });
      this.port.postMessage(mono, [mono.buffer]);
    }
    return true;
  }
});`;

function micError(e) {
  if (!navigator.mediaDevices) return "the microphone needs a secure page: open it over https or on localhost";
  if (e.name === "NotAllowedError" || e.name === "SecurityError") return "the microphone permission was refused; allow it in the browser's site settings to record";
  if (e.name === "NotFoundError" || e.name === "OverconstrainedError") return "no microphone was found";
  if (e.name === "NotReadableError") return "the microphone is in use by another program";
  return "the microphone could not start: " + e.message;
}

function capture(rec, block) {
  if (recording !== rec) return;
  rec.blocks.push(block);
  rec.samples += block.length;
  const seconds = rec.samples / rec.ctx.sampleRate;
  const text = `recording… ${seconds.toFixed(1)} s (press ● again to stop)`;
  if (text !== rec.shown) note(rec.shown = text, false);  // blocks of 128 samples: the line changes every 0.1 s
  if (seconds >= MAX_SECONDS) stopRecording(`stopped at the server's limit of ${MAX_SECONDS} s`);
}

async function startRecording() {
  note("");
  recording = { starting: true };  // a second press while the browser asks for the microphone does nothing
  let stream;
  try {
    if (!navigator.mediaDevices) throw new Error("no mediaDevices");
    stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: false } });
  } catch (e) {
    recording = null;
    return note(micError(e));
  }
  const ctx = new AudioContext();
  const rec = { stream, ctx, blocks: [], samples: 0, shown: "" };
  try {
    const url = URL.createObjectURL(new Blob([CAPTURE], { type: "text/javascript" }));
    await ctx.audioWorklet.addModule(url);
    URL.revokeObjectURL(url);
    const node = new AudioWorkletNode(ctx, "capture");
    const mute = ctx.createGain();
    mute.gain.value = 0;  // the worklet runs only when pulled by the output: connected, but silent
    ctx.createMediaStreamSource(stream).connect(node).connect(mute).connect(ctx.destination);
    node.port.onmessage = ({ data }) => capture(rec, data);
  } catch (e) {
    stream.getTracks().forEach((t) => t.stop());
    ctx.close();
    recording = null;
    return note("the browser could not start recording: " + e.message);
  }
  recording = rec;
  $("record").classList.add("recording");
  $("record").setAttribute("aria-pressed", "true");
}

async function stopRecording(why = "") {
  const rec = recording;
  if (!rec || rec.starting) return;
  recording = null;
  $("record").classList.remove("recording");
  $("record").setAttribute("aria-pressed", "false");
  rec.stream.getTracks().forEach((t) => t.stop());
  await rec.ctx.close();
  note(why, false);
  if (!rec.samples) return note("nothing was recorded");
  const rate = rec.ctx.sampleRate;  // the last block may run past the limit: cut there
  const buffer = new AudioBuffer({ length: Math.min(rec.samples, MAX_SECONDS * rate), numberOfChannels: 1, sampleRate: rate });
  let at = 0;
  for (const block of rec.blocks) {
    if (at >= buffer.length) break;
    buffer.copyToChannel(block.subarray(0, buffer.length - at), 0, at);
    at += block.length;
  }
  queue(`recording ${++recordings}`, base64(wav(await mono16k(buffer))), buffer.duration);
}

function render() {
  const tray = $("audio-clips");
  tray.replaceChildren(...pending.map((clip, i) => {
    const chip = document.createElement("div");
    chip.className = "clip-chip";
    chip.textContent = `♪ ${clip.name} · ${clip.seconds.toFixed(1)} s`;
    chip.append(removeButton("remove this clip", () => { pending.splice(i, 1); render(); }));
    return chip;
  }));
  tray.hidden = pending.length === 0;
}

export function hasClips() {
  return pending.length > 0;
}

// The waiting clips, handed over once (the tray empties).
export function takeClips() {
  const clips = pending;
  pending = [];
  render();
  note("");
  return clips;
}

// A user message's content with the clips as input_audio parts before it (images.js makes the rest).
export function withClips(content, clips) {
  if (!clips.length) return content;
  const parts = clips.map((clip) => ({ type: "input_audio", input_audio: { data: clip.data, format: "wav" } }));
  return [...parts, ...(typeof content === "string" ? [{ type: "text", text: content }] : content)];
}

// The clips shown in a message bubble, above its text, each one playable.
export function showClips(bubble, clips) {
  if (!clips.length) return;
  const row = document.createElement("div");
  row.className = "clips";
  for (const clip of clips) {
    const audio = document.createElement("audio");
    audio.controls = true;
    audio.preload = "metadata";  // so the player shows the clip's length
    audio.src = "data:audio/wav;base64," + clip.data;
    audio.title = clip.name;
    row.append(audio);
  }
  bubble.prepend(row);
}

export function initAudio() {
  const picker = $("audio-input");
  $("attach-audio").addEventListener("click", () => picker.click());
  picker.addEventListener("change", () => { add([...picker.files]); picker.value = ""; });
  $("record").addEventListener("click", () => (recording ? stopRecording() : startRecording()));
  // images.js takes the images of a drop (and marks the drop target); this takes its audio files
  document.querySelector("main.chat").addEventListener("drop", (e) => add([...(e.dataTransfer ? e.dataTransfer.files : [])]));
}
