"""Shared-prefix KV reuse for analyze: every row's prompt starts with the same system message and
instruction, so those positions are computed once and copied into each row's slot; a row's prefill
then runs only its own text.

The engine offers the primitive (KVStore.copy_prefix) but not yet a per-request prefix, so this
subclass overrides its prefill: the prefix lives in a one-slot KVStore of its own (never a slot a
request could be given, so no decode step ever writes into it), and a prompt that starts with it
gets those positions copied, then an extend with the rest. Any other prompt prefills as usual.
A prefix is computed under one adapter identity (the base model, or an adapter's content hash) and
only given to requests running that same identity."""

from __future__ import annotations

import torch

from pocketlm.infer.batch import KVStore
from pocketlm.infer.engine import PREFILL_CHUNK, Engine
from pocketlm.infer.sampling import make_generator


def common_prefix(seqs: list[list[int]]) -> list[int]:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for j in range(n):
        if any(s[j] != first[j] for s in seqs):
            return first[:j]
    return first[:n]


class PrefixEngine(Engine):
    """An Engine whose requests starting with a set prefix skip computing it. Prefixes are kept per
    adapter identity (Engine.adapter_identity: the adapter's content hash, None for the base model):
    keys and values computed under one adapter are never given to a request running another, nor to
    one running a different adapter later loaded under the same name."""
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefixes: dict = {}  # adapter identity -> (prefix ids, a one-slot KVStore holding them)
        self.reused_tokens = 0  # prompt tokens not computed thanks to a prefix (for the summary)

    @property
    def prefix(self) -> list[int]:
        """The base model's prefix (what analyze sets)."""
        return self.prefixes.get(None, ([], None))[0]

    def set_prefix(self, ids: list[int], adapter: str | None = None) -> None:
        """Compute the keys and values of `ids` once, under `adapter` (a name added with add_adapter,
        None: the base model); at least one token of every prompt stays its own."""
        key = self.adapter_identity(adapter)
        self.prefixes.pop(key, None)
        if not ids:
            return
        cache = self.cache
        store = KVStore(self.model.cfg, 1, len(ids), dtype=cache.k.dtype, device=cache.device)
        ids_t = torch.tensor([ids], device=self.device)
        index = None if adapter is None else [list(self.adapters).index(adapter)]
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            for start in range(0, len(ids), PREFILL_CHUNK):
                chunk = ids_t[:, start:start + PREFILL_CHUNK]
                self.model(chunk, batch=store.step(0, 1, chunk, adapter_ids=index))
        self.prefixes[key] = (list(ids), store)

    def _prefill(self, req):
        prefix, store = self.prefixes.get(self.adapter_identity(req.adapter), ([], None))
        n = len(prefix)
        if not n or req.input_embeds is not None or len(req.prompt_ids) <= n or req.prompt_ids[:n] != prefix:
            return super()._prefill(req)
        req._generator = make_generator(req.params.seed)
        self.cache.k[:, req.slot, :, :n] = store.k[:, 0, :, :n]
        self.cache.v[:, req.slot, :, :n] = store.v[:, 0, :, :n]
        self.cache.lengths[req.slot] = n
        self.reused_tokens += n
        self._choose(req, self._feed(req, req.prompt_ids[n:]))
