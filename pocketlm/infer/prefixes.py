"""Shared prompt starts (an instruction every row of a table begins with, a long system prompt): their
keys and values are computed once, and a request whose prompt starts with one gets those positions
copied into its slot and prefills only the rest.

Each prefix has a one-slot KVStore of its own, which no request is ever given, so no step writes into
it. A prefix is kept under the identity of the weights it was computed with: the content hash of the
adapter (Engine.adapter_identity), None for the base model. Only a request running the same weights
reuses it: another adapter name with the same contents does, new contents loaded under a name do not.
"""

from __future__ import annotations

import torch

from pocketlm.errors import InputError
from pocketlm.infer.batch import KVStore


class PrefixCache:
    def __init__(self):
        self.stores: dict[tuple[str | None, tuple[int, ...]], KVStore] = {}
        self.reused_tokens = 0  # prompt tokens copied from a prefix instead of computed

    def longest(self) -> int:
        return max((len(ids) for _, ids in self.stores), default=0)

    def clear(self) -> None:
        self.stores.clear()

    def add(self, model, ids: list[int], identity: str | None, adapter_index: int | None, *, dtype, device,
            max_seq_len: int, chunk: int) -> None:
        """Compute and keep the keys and values of `ids` under `identity` (rows of `adapter_index`'s
        adapter, or the base model for None), `chunk` tokens per forward."""
        ids = [int(t) for t in ids]
        key = (identity, tuple(ids))
        if not ids or key in self.stores:
            return
        if len(ids) >= max_seq_len or not all(0 <= t < model.cfg.vocab_size for t in ids):
            raise InputError(f"cache_prefix: expected under {max_seq_len} token ids in [0, "
                             f"{model.cfg.vocab_size}), got {len(ids)} ids")
        store = KVStore(model.cfg, 1, len(ids), dtype=dtype, device=device)
        store.allocate()
        ids_t = torch.tensor([ids], device=device)
        rows = None if adapter_index is None else [adapter_index]
        with torch.inference_mode(), torch.autocast(device.type, enabled=False):
            for start in range(0, len(ids), chunk):
                part = ids_t[:, start:start + chunk]
                model(part, batch=store.step(0, 1, part, adapter_ids=rows))
        self.stores[key] = store

    def copy_into(self, cache: KVStore, slot: int, identity: str | None, prompt_ids: list[int]) -> int:
        """Copy the longest prefix kept under `identity` that the prompt starts with (and goes on past)
        into `slot` of `cache`; its length (0: none)."""
        prompt = tuple(prompt_ids)
        best = max((ids for who, ids in self.stores if who == identity and len(ids) < len(prompt)
                    and prompt[:len(ids)] == ids), key=len, default=None)
        if best is None:
            return 0
        cache.copy_prefix(0, slot, len(best), source=self.stores[identity, best])
        self.reused_tokens += len(best)
        return len(best)
