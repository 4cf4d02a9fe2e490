"""The inference engine: prefill, then decode one token at a time for every running request.

A request is prefilled into its own slot of one preallocated KV store (pocketlm/infer/batch.py);
each decode step then runs the model once on the last token of every running request. New requests
join between decode steps and finished ones leave (continuous batching); the store's size (slots x
positions) is the memory budget, and a request that finds no free slot waits in the queue.

Each request brings its own logits processors (processors.py: the repetition penalty, a grammar, a
ban list) and output filters (textstream.py: redaction, moderation), an optional per-row adapter
(adapters.py) and optionally embeddings in place of prompt tokens. Text is streamed as it is decoded,
never splitting a multi-byte character and never showing the start of a stop string.

    engine = Engine(model, tokenizer)
    for event in engine.stream(tokenizer.encode("Once upon a time"), SamplingParams(max_tokens=50)):
        print(event.text, end="")
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from pocketlm import native
from pocketlm.errors import InputError, PocketLMError
from pocketlm.infer import adapters as row_adapters
from pocketlm.infer import cstep
from pocketlm.infer.batch import KVStore
from pocketlm.infer.fused import ACTIVATIONS, inference_copy
from pocketlm.infer.prefixes import PrefixCache
from pocketlm.infer.processors import LogitBias, Processor, RepetitionPenalty, ReplyPenalties, let_through
from pocketlm.infer.runner import Event, Runner
from pocketlm.infer.sampling import SamplingParams, make_generator, sample_token
from pocketlm.infer.textstream import OutputFilter, StreamDecoder, TextStream
from pocketlm.infer.together import SHORT_PROMPT, feed_packed, feed_padded, packs, padding_groups
from pocketlm.model.gpt import GPT
from pocketlm.tokenizer import Tokenizer

__all__ = ["ContextLengthError", "Engine", "Event", "Request", "StreamDecoder"]

PREFILL_CHUNK = 512  # prompt tokens per forward: bounds the activations a long prompt allocates


class ContextLengthError(PocketLMError):
    pass


_ids = itertools.count()


@dataclass(eq=False)  # requests are compared by identity: their fields hold tensors (input_embeds)
class Request:
    prompt_ids: list[int]           # ids < 0: positions whose embedding comes from input_embeds
    params: SamplingParams
    on_event: Callable[[Event], None] | None = None  # called from the engine's thread
    processors: list[Processor] = field(default_factory=list)
    adapter: str | None = None
    input_embeds: torch.Tensor | None = None  # (number of ids < 0, n_embd)
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
    _stream: TextStream | None = None
    _generator: torch.Generator | None = None
    _pending: list[int] = field(default_factory=list)  # accepted tokens not yet in the KV store
    _prefix_len: int = 0  # positions of its slot copied from a cached prefix (together.py packs by them)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine(Runner):
    """Runs requests against one model. Either call step() yourself (stream() does when no
    background thread runs) or start() a thread that steps whenever there is work (the server)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, max_batch: int = 8, max_seq_len: int | None = None,
                 precision: str = "fp32", compile: bool = False):
        if max_batch < 1:
            raise InputError(f"max_batch: expected at least 1, got {max_batch}")
        super().__init__()
        native.keep_freed_memory()  # activations reused, not re-faulted, forward after forward
        # the engine runs its own copy of the weights, fused and laid out for `precision` (see fused.py)
        self.model = inference_copy(model, precision, compiled=compile)
        self.precision, self.tokenizer, self.compiled = precision, tokenizer, compile
        cfg = model.cfg
        self.max_seq_len = min(max_seq_len or 2048, cfg.block_size)
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.cache = KVStore(cfg, max_batch, self.max_seq_len, dtype=ACTIVATIONS[precision], device=self.device)
        self.stop_ids = set(tokenizer.stop_ids)
        self.slots: list[Request | None] = [None] * max_batch
        self.adapters: dict[str, list] = {}
        self.adapter_slots = row_adapters.Slots(self.model)  # name -> its rows' adapter id, kept while loaded
        self.prefixes = PrefixCache()  # shared prompt starts, computed once (cache_prefix)
        self.adapter_hashes: dict[str, str] = {}  # name -> content_hash: what prefix caches key by
        # Compiling fuses the small ops between the matmuls (weights frozen in as constants), and the C++
        # wrapper calls the kernels without Python in between (~1 ms a token less than the Python one).
        # Measured on 2 cores with SmolLM2-135M at batch 1: ~1.3x at fp32, ~1.9x at bf16, for about two
        # minutes of compiling; so it is opt-in (benchmarks/decode_speed.py --compile, serve --compile).
        # Guards on the model's modules are skipped (~0.6 ms a token of checks on SmolLM2): the fused
        # copy is the engine's own and never changes, and freezing bakes its weights in anyway.
        options = {"freezing": True, "cpp_wrapper": True,
                   "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        # eager: batch-1 decode steps run in one C++ call where it can (cstep.py), anything else the model
        self.forward = torch.compile(self.model, options=options) if compile else cstep.decoder(self.model, self.cache)

    @property
    def kv_cache_bytes(self) -> int:
        return self.cache.nbytes

    def warmup(self) -> None:
        """Run a few throwaway requests so a compiled decode step is compiled now, for one row and for
        several (the second shape makes torch.compile generalise), not during the first real request."""
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        for n in sorted({1, min(2, self.max_batch)}):
            for _ in range(n):
                self.submit([0, 1], params)
            while self.step():
                pass

    # ---- shared prefixes (prefixes.py) ---------------------------------------------------
    def cache_prefix(self, ids: list[int], adapter: str | None = None) -> None:
        """Compute the keys and values of `ids` once, under `adapter` (a name given to add_adapter;
        None: the base model): later requests on the same weights whose prompts start with them reuse them."""
        if adapter is not None and adapter not in self.adapters:
            raise InputError(f"cache_prefix: unknown adapter {adapter!r}; loaded: {sorted(self.adapters)}")
        index = None if adapter is None else self.adapter_slots.index[adapter]
        self.prefixes.add(self.model, ids, self.adapter_identity(adapter), index, dtype=self.cache.k.dtype,
                          device=self.device, max_seq_len=self.max_seq_len, chunk=PREFILL_CHUNK)

    @property
    def reused_tokens(self) -> int:
        return self.prefixes.reused_tokens

    # ---- adapters ------------------------------------------------------------------------
    def add_adapter(self, name: str, adapter) -> None:
        """Register a LoRA adapter (a PEFT folder, or (module, A, B, scaling) updates) that requests
        name with adapter_id=name; rows of one batch may each run a different one."""
        if self.compiled:  # a compiled step has the copy's modules frozen in: it would not see the wrappers
            raise InputError("per-row adapters need an engine built with compile=False")
        updates = row_adapters.read_adapter(self.model.cfg, adapter)
        identity = row_adapters.content_hash(updates)
        self.adapter_slots.add(name, updates)  # writes its slot only; nothing is registered if it fails
        with self._cv:
            self.adapters[name], self.adapter_hashes[name] = updates, identity

    def remove_adapter(self, name: str) -> None:
        with self._cv:  # submit checks and queues under the same lock: no request slips in meanwhile
            if any(r is not None and r.adapter == name for r in [*self.slots, *self.waiting]):
                raise InputError(f"adapter {name!r} is in use by a running or waiting request")
            del self.adapters[name], self.adapter_hashes[name]
        self.adapter_slots.remove(name)

    def adapter_identity(self, name: str | None) -> str | None:
        """What a cache of computed keys and values must be keyed by besides the tokens: the content
        hash of the adapter a request runs (None: the base model)."""
        return None if name is None else self.adapter_hashes[name]

    # ---- submitting ----------------------------------------------------------------------
    def submit(self, prompt_ids: list[int] | None, params: SamplingParams, on_event: Callable[[Event], None] | None = None,
               *, processors=(), output_filters=(), adapter_id: str | None = None, input_embeds=None) -> Request:
        """Queue a request; it starts at the next step that finds a free slot. input_embeds (N, n_embd):
        embeddings for the prompt's N positions whose id is -1 (all of it when prompt_ids is None)."""
        cfg = self.model.cfg
        if prompt_ids is None and input_embeds is not None:
            prompt_ids = [-1] * len(input_embeds)
        prompt_ids = list(prompt_ids or [])
        if not prompt_ids:
            raise ContextLengthError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= self.max_seq_len:
            raise ContextLengthError(f"the prompt has {len(prompt_ids)} tokens; this engine's context is "
                                     f"{self.max_seq_len} tokens and must leave room for at least one new token")
        holes = sum(t < 0 for t in prompt_ids)
        if any(t >= cfg.vocab_size or (t < 0 and input_embeds is None) for t in prompt_ids):
            raise InputError(f"prompt token ids must be in [0, {cfg.vocab_size})")
        if input_embeds is not None:
            input_embeds = torch.as_tensor(input_embeds, dtype=torch.float32, device=self.device)
            if input_embeds.shape != (holes, cfg.n_embd):
                raise InputError(f"input_embeds: expected shape ({holes}, {cfg.n_embd}) (one row per prompt id "
                                 f"of -1), got {tuple(input_embeds.shape)}")
        procs = list(processors)
        if params.repetition_penalty != 1.0:
            procs.insert(0, RepetitionPenalty(params.repetition_penalty, prompt_ids, cfg.vocab_size))
        if params.frequency_penalty or params.presence_penalty:
            procs.insert(0, ReplyPenalties(params.frequency_penalty, params.presence_penalty, cfg.vocab_size))
        if params.logit_bias:
            params.check_vocabulary(cfg.vocab_size)
            procs.insert(0, LogitBias(params.logit_bias))
        req = Request(prompt_ids, params, on_event, procs, adapter_id, input_embeds)
        req._stream = TextStream(self.tokenizer, params.stop, output_filters)
        with self._cv:  # (an RLock) remove_adapter checks the queue under it
            if adapter_id is not None and adapter_id not in self.adapters:
                raise InputError(f"adapter_id {adapter_id!r}: no such adapter (added: {sorted(self.adapters)})")
            self._enqueue(req)
        return req

    # ---- the loop ------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit waiting requests into free slots (prefill), run the extends that forced tokens asked
        for, then one decode step for all running requests. Returns False when there was nothing to do."""
        self._drop_cancelled()
        admitted = []
        with self._cv:
            while self.waiting and None in self.slots:
                req = self.waiting.popleft()
                req.slot = self.cache.allocate()
                self.slots[req.slot] = req
                admitted.append(req)
        if admitted:
            self._prefill_admitted(admitted)
        extending = [r for r in self.slots if r is not None and len(r._pending) > 1]
        for req in [r for r in extending if len(r._pending) > SHORT_PROMPT]:
            self._guarded([req], self._extend, req)
        self._feed_short([r for r in extending if len(r._pending) <= SHORT_PROMPT])
        running = [r for r in self.slots if r is not None and len(r._pending) == 1]
        if running:
            self._guarded(running, self._decode, running)
        return bool(admitted or running or self.running)

    def _guarded(self, reqs, fn, *args):
        """A failure inside the model fails the requests involved, never the engine."""
        try:
            with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):  # (eval runs under autocast)
                fn(*args)
        except Exception as e:  # noqa: BLE001 - reported to the requests' listeners
            for r in reqs:
                if not r.finished:
                    r.error = f"{type(e).__name__}: {e}"
                    self._finish(r, "error")

    def _adapter_index(self, req: Request) -> int:
        return -1 if req.adapter is None else self.adapter_slots.index[req.adapter]

    def _feed(self, req: Request, ids: list[int], embeds=None) -> torch.Tensor:
        """Append tokens to the request's row, PREFILL_CHUNK at a time; the last position's logits."""
        ids_t = torch.tensor([ids], device=self.device)
        adapter = None if req.adapter is None else [self._adapter_index(req)]
        for start in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids_t[:, start:start + PREFILL_CHUNK]
            e = None if embeds is None else embeds[None, start:start + PREFILL_CHUNK]
            batch = self.cache.step(req.slot, req.slot + 1, chunk, e, adapter_ids=adapter)
            logits = self.model(chunk, input_embeds=e, batch=batch)
        return logits[0, -1]

    def _prefill_admitted(self, admitted: list[Request]):
        """Copy each new request's shared prefix, then prefill the rest of its prompt (short ones
        together, see _feed_short; long ones, or with embeddings, each alone)."""
        short = []
        for req in admitted:
            req._generator = make_generator(req.params.seed)
            if req.input_embeds is None:
                req._prefix_len = self.prefixes.copy_into(self.cache, req.slot, self.adapter_identity(req.adapter),
                                                          req.prompt_ids)
            if req.input_embeds is None and len(self._todo(req)) <= SHORT_PROMPT:
                short.append(req)
            else:
                self._guarded([req], self._prefill, req)
        self._feed_short(short)

    def _todo(self, req: Request) -> list[int]:
        """The tokens a request's row needs next: its forced tokens, or (admitted) the rest of its prompt."""
        return req._pending if req._pending else req.prompt_ids[self.cache.lengths[req.slot]:]

    def _feed_short(self, reqs: list[Request]):
        """Prefills and extends of a few tokens each, several rows in one forward (together.py): packed
        where rows share a cached prefix, else padded; a row alone takes the plain path."""
        packed, rest = packs(self, reqs)
        for pack in packed:
            self._guarded(pack, feed_packed, self, pack)
        for group in padding_groups(self, rest):
            if len(group) > 1:
                self._guarded(group, feed_padded, self, group)
            elif group[0]._pending:
                self._guarded(group, self._extend, group[0])
            else:
                self._guarded(group, self._prefill, group[0])

    def _prefill(self, req: Request):
        """The prompt after the positions the slot holds already (a copied prefix), in one row."""
        embeds = None
        if req.input_embeds is not None:  # one (T, n_embd) table; ids < 0 take their row from it
            ids = torch.tensor(req.prompt_ids, device=self.device)
            embeds = torch.zeros(len(ids), self.model.cfg.n_embd, device=self.device)
            embeds[ids < 0] = req.input_embeds
        self._choose(req, self._feed(req, req.prompt_ids[self.cache.lengths[req.slot]:], embeds))

    def _extend(self, req: Request):
        """Forced tokens: one forward over all of them (an extend of the running row), not one each."""
        tokens, req._pending = req._pending, []
        self._choose(req, self._feed(req, tokens))

    def _decode(self, running: list[Request]):
        n = max(r.slot for r in running) + 1  # rows 0..n-1; the others among them compute a throwaway token
        tokens, adapter = [0] * n, [-1] * n
        for r in running:
            tokens[r.slot], adapter[r.slot] = r._pending.pop(), self._adapter_index(r)
        # rows not decoding: free ones sit at position 0 (never run off the end); a row waiting for its
        # extend gets a throwaway write at its next position, which the extend overwrites
        others = {i: 0 if self.slots[i] is None else self.cache.lengths[i] for i in set(range(n)) - {r.slot for r in running}}
        for i, length in others.items():
            self.cache.lengths[i] = length
        ids = torch.tensor(tokens, device=self.device)[:, None]
        batch = self.cache.step(0, n, ids, adapter_ids=adapter if max(adapter) >= 0 else None)
        logits = self.forward(ids, batch=batch)[:, -1]
        for i, length in others.items():
            self.cache.lengths[i] = length
        greedy = any(r.params.greedy for r in running)
        best = logits.argmax(-1).tolist() if greedy else None  # one read-back for every greedy row
        for r in running:  # (a greedy row whose processors all let the batch's argmax through takes it)
            if r.params.greedy and let_through(r.processors, best[r.slot]):
                self._accept(r, best[r.slot])
            else:
                self._choose(r, logits[r.slot])

    def _choose(self, req: Request, logits: torch.Tensor):
        """Run the request's processors over its row's logits, sample, accept."""
        if req.processors:
            logits = logits.float()
            for p in req.processors:
                logits = p.process(logits)
        self._accept(req, sample_token(logits, req.params, req._generator))

    def _accept(self, req: Request, token: int):
        """Record a chosen token, then the tokens the processors force after it (they join the row's
        pending tokens, which the next step feeds as one extend)."""
        self._record(req, token)
        while not req.finished:
            forced = next((f for p in req.processors if (f := p.forced())), [])
            if not forced:
                break
            for t in forced:
                self._record(req, t)
                if req.finished:
                    break

    def _record(self, req: Request, token: int):
        """Add one token: update the text, stream what is safe to show, finish if it is time."""
        if req.t_first_token is None:
            req.t_first_token = time.perf_counter()
        req.output_ids.append(token)
        req._pending.append(token)
        for p in req.processors:
            p.accept(token)
        params = req.params
        if (token in self.stop_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return self._finish(req, "stop")
        reason = req._stream.push(token)
        req.text = req._stream.text
        if reason is None and any(p.is_done() for p in req.processors):
            reason = "stop"
        position = len(req.prompt_ids) + len(req.output_ids)
        if reason is None and (len(req.output_ids) >= params.max_tokens or position >= self.max_seq_len):
            reason = "length"
        if reason is not None:
            return self._finish(req, reason)
        text = req._stream.release()
        if text:
            self._emit(req, text)

    def _finish(self, req: Request, reason: str):
        req.finish_reason = reason
        req.t_done = time.perf_counter()
        if req.slot >= 0 and self.slots[req.slot] is req:
            self.slots[req.slot] = None
            self.cache.free(req.slot)
        text = ""
        if reason in ("stop", "length", "content_filter") and req._stream is not None:
            text = req._stream.close()
            req.text = req._stream.text
        self._emit(req, text, reason)
