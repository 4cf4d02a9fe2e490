"""The inference engine: prefill, then decode one token at a time for every running request.

A request is prefilled into its own row (slot) of one preallocated KV cache; each decode step then
runs the model once on the last token of every running request. New requests join between decode
steps and finished ones leave (continuous batching); the cache's size (slots x positions) is the
memory budget, and a request that finds no free slot waits in the queue. Text is streamed as it is
decoded, never splitting a multi-byte character and never showing the start of a stop string.

    engine = Engine(model, tokenizer)
    for event in engine.stream(tokenizer.encode("Once upon a time"), SamplingParams(max_tokens=50)):
        print(event.text, end="")
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from pocketlm.infer.fused import ACTIVATIONS, FusedGPT
from pocketlm.infer.sampling import SamplingParams, make_generator, sample_token
from pocketlm.model.gpt import GPT, KVCache
from pocketlm.tokenizer import Tokenizer
from pocketlm.errors import InputError, PocketLMError

PREFILL_CHUNK = 512  # prompt tokens per forward: bounds the (chunk x vocab) logits a long prompt allocates


class ContextLengthError(PocketLMError):
    pass


class StreamDecoder:
    """Incremental detokenization: turns a growing list of token ids into text deltas.

    Byte-level BPE can split one character over several tokens; a piece that decodes to a trailing
    U+FFFD is held back until the rest of the character arrives. Decoding from a few tokens before the
    new ones (prefix) keeps the spacing right for tokenizers that drop a leading space at the start."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded already, and give the context for the next piece
        self.read = 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        seen = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(seen) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(seen):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character stays as U+FFFD)."""
        seen = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(seen):]


@dataclass
class Event:
    """What a request's listener receives: new text, and finish_reason on the last event."""
    request: "Request"
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"


class CacheRows:
    """Rows start:stop of the engine's KVCache, as views the model fills in place. The engine keeps
    every row's length in Python too, so the cache's shape questions (end, mask, update: the same
    code as KVCache's) are answered without reading a tensor back: the decode step compiles whole."""
    end, mask, update = KVCache.end, KVCache.mask, KVCache.update

    def __init__(self, cache: KVCache, start: int, stop: int, lengths: list[int]):
        self.k, self.v = cache.k[:, start:stop], cache.v[:, start:stop]
        self.lengths = cache.lengths[start:stop]
        self.max_len = cache.max_len
        self.known = lengths

    def host_lengths(self) -> list[int]:
        return self.known


_ids = itertools.count()


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None] | None = None  # called from the engine's thread
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    text: str = ""                  # the reply so far (a stop string and what follows it cut off)
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    slot: int = -1
    t_submit: float = field(default_factory=time.perf_counter)
    t_first_token: float | None = None
    t_done: float | None = None
    _sent: int = 0                  # characters of `text` already handed to the listener
    _decoder: StreamDecoder | None = None
    _generator: torch.Generator | None = None
    _seen: torch.Tensor | None = None  # (V,) bool, for the repetition penalty

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Runs requests against one model. Either call step() yourself (stream() does when no
    background thread runs) or start() a thread that steps whenever there is work (the server)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, max_batch: int = 8, max_seq_len: int | None = None,
                 precision: str = "fp32", compile: bool = False):
        if max_batch < 1:
            raise InputError(f"max_batch: expected at least 1, got {max_batch}")
        # the engine runs its own copy of the weights, fused and laid out for `precision` (see fused.py)
        self.model = FusedGPT(model, precision, compiled=compile)
        self.precision = precision
        self.tokenizer = tokenizer
        cfg = model.cfg
        self.max_seq_len = min(max_seq_len or 2048, cfg.block_size)
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.cache = KVCache(cfg, max_batch, self.max_seq_len, dtype=ACTIVATIONS[precision], device=self.device)
        self.stop_ids = set(tokenizer.stop_ids)
        self.slots: list[Request | None] = [None] * max_batch
        self.lengths = [0] * max_batch  # positions each cache row holds (the cache's lengths, host side)
        self.waiting: deque[Request] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Compiling fuses the small ops between the matmuls (weights frozen in as constants), and the C++
        # wrapper calls the kernels without Python in between (~1 ms a token less than the Python one).
        # Measured on 2 cores with SmolLM2-135M at batch 1: ~1.3x at fp32, ~1.9x at bf16, for about two
        # minutes of compiling; so it is opt-in (benchmarks/decode_speed.py --compile, serve --compile).
        # Guards on the model's modules are skipped (~0.6 ms a token of checks on SmolLM2): the fused
        # copy is the engine's own and never changes, and freezing bakes its weights in anyway.
        options = {"freezing": True, "cpp_wrapper": True,
                   "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        self.forward = torch.compile(self.model, options=options) if compile else self.model

    @property
    def kv_cache_bytes(self) -> int:
        return self.cache.k.numel() * self.cache.k.element_size() * 2

    def warmup(self) -> None:
        """Run a few throwaway requests so a compiled decode step is compiled now, for one row and for
        several (the second shape makes torch.compile generalise), not during the first real request."""
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        for n in sorted({1, min(2, self.max_batch)}):
            for _ in range(n):
                self.submit([0, 1], params)
            while self.step():
                pass

    # ---- submitting ----------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams,
               on_event: Callable[[Event], None] | None = None) -> Request:
        """Queue a request; it starts at the next step that finds a free slot."""
        if not prompt_ids:
            raise ContextLengthError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= self.max_seq_len:
            raise ContextLengthError(f"the prompt has {len(prompt_ids)} tokens; this engine's context is "
                                     f"{self.max_seq_len} tokens and must leave room for at least one new token")
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise InputError(f"prompt token ids must be in [0, {vocab})")
        req = Request(list(prompt_ids), params, on_event)
        with self._cv:
            self.waiting.append(req)
            self._cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (a client went away); its slot is freed at the next step."""
        req.cancelled = True
        with self._cv:
            self._cv.notify()

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[Event]:
        """Submit and yield events until the request finishes; closing the iterator cancels it."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        req = self.submit(prompt_ids, params, events.put)
        try:
            while True:
                if self._thread is None:
                    while events.empty():
                        if not self.step() and events.empty():
                            raise RuntimeError("engine idle but the request never finished")
                event = events.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if not req.finished:
                self.cancel(req)
                if self._thread is None:
                    self.step()

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        """Run one request to the end and return it (req.text, req.output_ids, req.finish_reason)."""
        for event in self.stream(prompt_ids, params):
            pass
        return event.request

    # ---- the loop ------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit waiting requests into free slots (prefill), then one decode step for all running
        requests. Returns False when there was nothing to do."""
        self._drop_cancelled()
        admitted = []
        with self._cv:
            while self.waiting and None in self.slots:
                req = self.waiting.popleft()
                req.slot = self.slots.index(None)
                self.slots[req.slot] = req
                admitted.append(req)
        for req in admitted:
            self._guarded([req], self._prefill, req)
        running = [r for r in self.slots if r is not None]
        if running:
            self._guarded(running, self._decode, running)
        return bool(admitted or running)

    def _guarded(self, reqs, fn, *args):
        """A failure inside the model fails the requests involved, never the engine."""
        try:
            with torch.inference_mode():
                fn(*args)
        except Exception as e:  # noqa: BLE001 - reported to the requests' listeners
            for r in reqs:
                if not r.finished:
                    r.error = f"{type(e).__name__}: {e}"
                    self._finish(r, "error")

    def _drop_cancelled(self):
        with self._cv:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                self._finish(r, "cancelled")
        for r in self.slots:
            if r is not None and r.cancelled and not r.finished:
                self._finish(r, "cancelled")

    def _rows(self, start: int, stop: int) -> CacheRows:
        return CacheRows(self.cache, start, stop, self.lengths[start:stop])

    def _prefill(self, req: Request):
        p = req.params
        req._decoder = StreamDecoder(self.tokenizer)
        req._generator = make_generator(p.seed)
        if p.repetition_penalty != 1.0:
            req._seen = torch.zeros(self.model.cfg.vocab_size, dtype=torch.bool)
            req._seen[req.prompt_ids] = True
        self.cache.lengths[req.slot] = self.lengths[req.slot] = 0
        ids = torch.tensor([req.prompt_ids], device=self.device)
        for start in range(0, ids.size(1), PREFILL_CHUNK):
            chunk = ids[:, start:start + PREFILL_CHUNK]
            logits = self.model(chunk, cache=self._rows(req.slot, req.slot + 1))
            self.lengths[req.slot] += chunk.size(1)
        self._accept(req, self._sample(req, logits[0, -1]))

    def _decode(self, running: list[Request]):
        n = max(r.slot for r in running) + 1  # rows 0..n-1; idle rows among them compute a throwaway token
        tokens = [0] * n
        for r in running:
            tokens[r.slot] = r.output_ids[-1]
        for i in set(range(n)) - {r.slot for r in running}:
            self.cache.lengths[i] = self.lengths[i] = 0  # idle rows stay at position 0, never run off the end
        logits = self.forward(torch.tensor(tokens, device=self.device)[:, None], cache=self._rows(0, n))[:, -1]
        for i in range(n):
            self.lengths[i] += 1
        greedy = [r for r in running if r.params.greedy and r._seen is None]
        if greedy:
            best = logits.argmax(-1).tolist()
        for r in running:
            token = best[r.slot] if r in greedy else self._sample(r, logits[r.slot])
            self._accept(r, token)

    def _sample(self, req: Request, logits: torch.Tensor) -> int:
        return sample_token(logits, req.params, req._generator, req._seen)

    def _accept(self, req: Request, token: int):
        """Record a new token: update the text, stream what is safe to show, finish if it is time."""
        if req.t_first_token is None:
            req.t_first_token = time.perf_counter()
        req.output_ids.append(token)
        if req._seen is not None:
            req._seen[token] = True
        p = req.params
        if (token in self.stop_ids and not p.ignore_eos) or token in p.stop_token_ids:
            req.text += req._decoder.flush()
            if p.stop:
                self._cut_at_stop(req)
            return self._finish(req, "stop")
        req.text += req._decoder.push(token)
        if p.stop and self._cut_at_stop(req):
            return self._finish(req, "stop")
        position = len(req.prompt_ids) + len(req.output_ids)
        if len(req.output_ids) >= p.max_tokens or position >= self.max_seq_len:
            req.text += req._decoder.flush()
            return self._finish(req, "length")
        safe = len(req.text) - _partial_stop(req.text, p.stop)
        if safe > req._sent:
            self._emit(req, req.text[req._sent:safe])

    @staticmethod
    def _cut_at_stop(req: Request) -> bool:
        longest = max(len(s) for s in req.params.stop)
        window = max(0, req._sent - longest)  # a stop string can only end in the new text
        hits = [i for i in (req.text.find(s, window) for s in req.params.stop) if i >= 0]
        if hits:
            req.text = req.text[:min(hits)]
        return bool(hits)

    def _finish(self, req: Request, reason: str):
        req.finish_reason = reason
        req.t_done = time.perf_counter()
        if req.slot >= 0 and self.slots[req.slot] is req:
            self.slots[req.slot] = None
        self._emit(req, req.text[req._sent:] if reason in ("stop", "length") else "", reason)

    def _emit(self, req: Request, text: str, finish_reason: str | None = None):
        req._sent += len(text)
        if req.on_event is not None:
            try:
                req.on_event(Event(req, text, finish_reason))
            except Exception:  # noqa: BLE001 - a broken listener loses its own request only
                req.cancelled = True

    # ---- background thread (servers) -----------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.slots)

    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="pocketlm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self):
        while True:
            with self._cv:
                while not self._stopping and not self.waiting and all(r is None for r in self.slots):
                    self._cv.wait()
                if self._stopping:
                    return
            self.step()


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string (held back)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
