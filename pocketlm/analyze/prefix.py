"""Shared-prefix KV reuse for analyze: every row's prompt starts with the same system message and
instruction, so those positions are computed once and copied into each row's slot; a row's prefill
then runs only its own text.

The engine offers the primitive (KVStore.copy_prefix) but not yet a per-request prefix, so this
subclass overrides its prefill: the prefix lives in a one-slot KVStore of its own (never a slot a
request could be given, so no decode step ever writes into it), and a prompt that starts with it
gets those positions copied, then an extend with the rest. Any other prompt prefills as usual."""

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
    prefix: list[int] = []
    reused_tokens = 0  # prompt tokens not computed thanks to the prefix (for the summary)

    def set_prefix(self, ids: list[int]) -> None:
        """Compute the keys and values of `ids` once (at least one token of every prompt stays its own)."""
        self.prefix = list(ids)
        if not ids:
            return
        cache = self.cache
        self._prefix_store = KVStore(self.model.cfg, 1, len(ids), dtype=cache.k.dtype, device=cache.device)
        ids_t = torch.tensor([ids], device=self.device)
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            for start in range(0, len(ids), PREFILL_CHUNK):
                chunk = ids_t[:, start:start + PREFILL_CHUNK]
                self.model(chunk, batch=self._prefix_store.step(0, 1, chunk))

    def _prefill(self, req):
        n = len(self.prefix)
        if not n or req.input_embeds is not None or req.adapter is not None or len(req.prompt_ids) <= n \
                or req.prompt_ids[:n] != self.prefix:
            return super()._prefill(req)
        req._generator = make_generator(req.params.seed)
        store = self._prefix_store
        self.cache.k[:, req.slot, :, :n] = store.k[:, 0, :, :n]
        self.cache.v[:, req.slot, :, :n] = store.v[:, 0, :, :n]
        self.cache.lengths[req.slot] = n
        self.reused_tokens += n
        self._choose(req, self._feed(req, req.prompt_ids[n:]))
