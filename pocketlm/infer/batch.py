"""What one engine step runs (StepBatch) and where the keys and values live (KVStore).

The KV store is one preallocated (layers, slots, kv heads, positions, head dim) buffer per keys and
values: its size is the engine's memory budget, and a request holds one slot (row) of it for its
life. Each slot's length is kept in Python, so every shape a step needs (how many positions attention
covers, the mask) is known without reading a tensor back, and a compiled step never syncs.

A step covers a contiguous run of slots start:stop and appends the same number of tokens T to each:
a prefill (T prompt tokens from position 0), a decode step (T = 1 for every running row), or an
extend (T tokens appended to one running row: forced tokens, a continued conversation, a copied
shared prefix's remainder). `GPT.forward(ids, input_embeds=..., batch=step)` writes the new keys and
values at each row's own positions and attends over the row's past.

    store = KVStore(model.cfg, slots=4, max_len=256)
    step = store.step(0, 1, ids)                     # (1, T) prompt into slot 0
    logits = model(step.input_ids, batch=step)       # last position's logits (B, 1, V)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pocketlm.errors import InputError


@dataclass
class StepBatch:
    """One forward's worth of work, built once per step by the engine (or a test) from a KVStore.

    input_ids (B, T) and/or input_embeds (B, T, D): with both, ids < 0 mark the positions whose
    embedding is taken from input_embeds (an image or audio encoder's output spliced into the prompt).
    positions (B, T): each token's position in its row. mask: (B, 1, T, end) bool, or None where plain
    causal attention is right. end: how many positions attention reads (a Python int: a shape).
    adapter_ids (B,) long, -1 = the base model; None when no row uses an adapter (the fast path).
    last_only: the head runs on the last position only (the engine samples from nothing else).
    last: (B,) long, or None: with last_only, the position along T of each row's last token, for a
    step whose rows were padded to one T (a batched prefill of prompts of different lengths).
    k, v: the store's buffers for rows start:stop, written in place; rows (B, 1) and layer_index
    are the index tensors of that write."""
    input_ids: torch.Tensor | None
    input_embeds: torch.Tensor | None
    positions: torch.Tensor
    mask: torch.Tensor | None
    end: int
    adapter_ids: torch.Tensor | None
    last_only: bool
    k: torch.Tensor
    v: torch.Tensor
    rows: torch.Tensor
    layer_index: list[torch.Tensor]
    last: torch.Tensor | None = None
    # None: attention is SDPA over what write returns, with `mask`. A step whose tokens are not laid out
    # one row per slot (together.PackedStep) sets a method attend(q, k, v, gqa) -> (B, heads, T, head_dim).
    attend = None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this layer's new keys/values (B, H, T, D) at each row's positions; return the keys
        and values attention reads, (B, H, end, D). One index_put_ into the whole buffer: compiled,
        that stays an in-place write of T positions (a slice assignment into a view of it compiles
        to a copy of all of it)."""
        i = self.layer_index[layer]
        self.k[i, self.rows, :, self.positions] = k.transpose(1, 2)
        self.v[i, self.rows, :, self.positions] = v.transpose(1, 2)
        return self.k[layer, :, :, :self.end], self.v[layer, :, :, :self.end]


class KVStore:
    """Keys and values of `slots` sequences of up to `max_len` positions, with a slot allocator and
    host-side lengths (`lengths[s]`: positions slot s holds)."""

    def __init__(self, cfg, slots: int, max_len: int, dtype=torch.float32, device=None):
        shape = (cfg.n_layer, slots, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len, self.device = max_len, self.k.device
        self.lengths = [0] * slots
        self.in_use = [False] * slots
        # (1, 1) index tensors made once: a step indexes the buffer with them, never with .item()
        self.layer_index = [torch.tensor([[i]], device=self.device) for i in range(cfg.n_layer)]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def allocate(self) -> int | None:
        """The lowest free slot, emptied (None when all are taken). Lowest first keeps the running
        rows packed at the start, so a decode step spans few idle rows."""
        for s, used in enumerate(self.in_use):
            if not used:
                self.in_use[s], self.lengths[s] = True, 0
                return s
        return None

    def free(self, slot: int) -> None:
        self.in_use[slot] = False

    def copy_prefix(self, src: int, dst: int, n: int, *, source: "KVStore | None" = None) -> None:
        """Give slot dst the first n positions of slot src (a shared system prompt, an earlier turn of
        the same conversation): an extend of dst then continues from position n. source: the store
        slot src belongs to (default this one; the engine keeps shared prefixes in one of their own)."""
        source = self if source is None else source
        if not 0 < n <= source.lengths[src]:
            raise InputError(f"copy_prefix: slot {src} holds {source.lengths[src]} positions, asked for {n}")
        self.k[:, dst, :, :n] = source.k[:, src, :, :n]
        self.v[:, dst, :, :n] = source.v[:, src, :, :n]
        self.lengths[dst] = n

    def step(self, start: int, stop: int, input_ids=None, input_embeds=None, *, adapter_ids=None,
             last_only: bool = True) -> StepBatch:
        """The batch that appends T tokens to every slot in start:stop (ids (B, T) and/or embeddings
        (B, T, D)), and advance those slots' lengths by T: the forward that runs it writes them."""
        ref = input_ids if input_ids is not None else input_embeds
        B, T = ref.shape[0], ref.shape[1]
        if B != stop - start:
            raise InputError(f"a step over slots {start}:{stop} needs {stop - start} rows, got {B}")
        lengths = self.lengths[start:stop]
        end = max(lengths) + T
        if end > self.max_len:
            raise InputError(f"the KV store holds {self.max_len} positions per slot; this step needs {end}")
        offsets = torch.arange(T, device=self.device)
        positions = torch.tensor(lengths, device=self.device)[:, None] + offsets
        mask = None
        if not (B == 1 and (T == 1 or lengths[0] == 0)):  # one row decoding, or prefilling from 0: causal
            keys = torch.arange(end, device=self.device)
            mask = (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)
        if adapter_ids is not None and not torch.is_tensor(adapter_ids):
            adapter_ids = torch.tensor(adapter_ids, device=self.device)
        for s in range(start, stop):
            self.lengths[s] += T
        rows = torch.arange(B, device=self.device)[:, None]
        return StepBatch(input_ids, input_embeds, positions, mask, end, adapter_ids, last_only,
                         self.k[:, start:stop], self.v[:, start:stop], rows, self.layer_index)
