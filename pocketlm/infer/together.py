"""Feeding several rows' short token runs (the rest of a prompt after a copied prefix, forced tokens)
in one forward instead of one each, two ways:

- packed: rows that start with the same cached prefix (prefixes.py), as `analyze` submits them, are
  laid end to end in ONE row of the forward, with no padding at all. Their queries attend to the
  prefix's keys (read from the prefix's own store, where they were computed once) and to their own
  row's keys (gathered from the slots); a mask keeps each row to itself. On a CPU a padded token
  costs what a real one does, so a batch of prompts of mixed lengths computes only its real tokens.
  The extra attention (every query scores the pack's other rows before the mask drops them) is
  bounded by PACK_TOKENS and PACK_KEYS.
- padded: rows of neighbouring slots, each padded on the right to the longest (any other rows).

The engine (Engine._feed_short) sends what packs here, the rest to the padded path.
"""

from __future__ import annotations

import torch

from pocketlm.infer.batch import StepBatch

# Admitted prompts up to this many tokens (after a shared prefix), and forced-token extends as short,
# are fed together in one forward over their rows: one pass over the weights instead of one each.
# A longer prompt is compute-bound on its own and goes alone.
SHORT_PROMPT = 64
PAD_SLACK = 1.25  # padded / real tokens a padded forward may compute (see padding_groups)
# New tokens a pack may hold, and keys (own past + new tokens) besides the prefix: every query of the
# pack scores all of its keys, so these bound the attention the mask throws away (a few % of a SmolLM2
# forward), while the pack's matmuls stay large (on 2 loaded cores 256 ran faster than 64, 128 and
# 512). Extends (2-3 forced tokens a row over ~20 of their own) pack by the first bound, not the second.
PACK_TOKENS = 256
PACK_KEYS = 4 * PACK_TOKENS


class PackedStep(StepBatch):
    """One forward over rows laid end to end in one row (see the module docstring). The new tokens'
    keys/values go to their own slots and positions; attention reads the prefix from its store, then
    the pack's own positions gathered from the slots, in pack order."""

    def __init__(self, cache, prefix, slots: list[int], lengths: list[int], counts: list[int], adapter: int,
                 device):
        P = prefix.lengths[0]
        new_slot, new_pos, key_slot, key_pos, q_row, k_row = [], [], [], [], [], []
        for i, (s, length, n) in enumerate(zip(slots, lengths, counts)):
            new_slot += [s] * n
            new_pos += range(length, length + n)
            key_slot += [s] * (length + n - P)
            key_pos += range(P, length + n)
            q_row += [i] * n
            k_row += [i] * (length + n - P)
        t = lambda x: torch.tensor(x, device=device)  # noqa: E731
        q_pos, k_pos = t(new_pos), t(key_pos)
        own = (t(q_row)[:, None] == t(k_row)[None, :]) & (k_pos[None, :] <= q_pos[:, None])
        mask = torch.cat([torch.ones(len(q_row), P, dtype=torch.bool, device=device), own], 1)[None, None]
        last = torch.tensor(counts, device=device).cumsum(0) - 1
        # one row: GPT.forward's head then picks x[arange(1), last], each packed row's last token
        super().__init__(input_ids=None, input_embeds=None, positions=q_pos[None], mask=mask,
                         end=int(q_pos.max()) + 1, adapter_ids=None if adapter < 0 else t([adapter]),
                         last_only=True, k=cache.k, v=cache.v, rows=None, layer_index=None, last=last)
        self.prefix_k, self.prefix_v = prefix.k[:, :1, :, :P], prefix.v[:, :1, :, :P]
        self.new_slot, self.new_pos, self.key_slot, self.key_pos = t(new_slot), q_pos, t(key_slot), k_pos

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.k[layer, self.new_slot, :, self.new_pos] = k[0].transpose(0, 1)  # (tokens, heads, head_dim)
        self.v[layer, self.new_slot, :, self.new_pos] = v[0].transpose(0, 1)
        # gathered straight into (heads, keys, head_dim): the cat below then copies contiguous blocks
        keys = self.k[layer].transpose(0, 1)[:, self.key_slot, self.key_pos][None]
        values = self.v[layer].transpose(0, 1)[:, self.key_slot, self.key_pos][None]
        return torch.cat([self.prefix_k[layer], keys], 2), torch.cat([self.prefix_v[layer], values], 2)


def packs(engine, reqs) -> tuple[list[list], list]:
    """(packs, the rest): rows whose slot holds a cached prefix and then only their own few tokens,
    grouped by prefix and adapter, up to PACK_TOKENS new tokens and PACK_KEYS keys a pack."""
    groups: dict = {}  # (prefix, adapter) -> [[pack, new tokens, keys]]
    rest = []
    for r in sorted(reqs, key=lambda r: r.slot):
        n, new = r._prefix_len, len(engine._todo(r))
        own = engine.cache.lengths[r.slot] - n + new
        if n == 0 or own > PACK_TOKENS:
            rest.append(r)
            continue
        key = (engine.adapter_identity(r.adapter), tuple(r.prompt_ids[:n]), engine._adapter_index(r))
        chunks = groups.setdefault(key, [[[], 0, 0]])
        if chunks[-1][1] + new > PACK_TOKENS or chunks[-1][2] + own > PACK_KEYS:
            chunks.append([[], 0, 0])
        chunks[-1][0].append(r)
        chunks[-1][1] += new
        chunks[-1][2] += own
    return [pack for chunks in groups.values() for pack, _, _ in chunks], rest


def feed_packed(engine, reqs):
    """One forward over a pack (all of one prefix and adapter); each row then chooses its next token."""
    cache, n = engine.cache, reqs[0]._prefix_len
    prefix = engine.prefixes.stores[engine.adapter_identity(reqs[0].adapter), tuple(reqs[0].prompt_ids[:n])]
    todo = [engine._todo(r) for r in reqs]
    slots = [r.slot for r in reqs]
    lengths = [cache.lengths[s] for s in slots]
    batch = PackedStep(cache, prefix, slots, lengths, [len(t) for t in todo], engine._adapter_index(reqs[0]),
                       engine.device)
    ids = torch.tensor([[t for ts in todo for t in ts]], device=engine.device)
    for r in reqs:
        r._pending = []
    logits = engine.model(ids, batch=batch)[:, -1]
    for r, s, length, ts in zip(reqs, slots, lengths, todo):
        cache.lengths[s] = length + len(ts)
    for i, r in enumerate(reqs):
        engine._choose(r, logits[i])


def padding_groups(engine, reqs) -> list[list]:
    """Runs of neighbouring slots to feed padded. On a CPU a forward this size is bound by compute,
    so padding costs as much as real tokens: a run ends where the padded tokens it would compute
    exceed PAD_SLACK x the real ones (callers that submit prompts sorted by length get few runs), or
    where a row's padding would run off the end of its slot."""
    groups, group = [], []
    for r in sorted(reqs, key=lambda r: r.slot):
        trial = group + [r]
        todo = [len(engine._todo(q)) for q in trial]
        start, stop = trial[0].slot, r.slot + 1
        padded = max(todo) * (stop - start)
        fits = max(engine.cache.lengths[start:stop]) + max(todo) <= engine.max_seq_len
        if group and (padded > PAD_SLACK * sum(todo) + SHORT_PROMPT or not fits):
            groups.append(group)
            trial = [r]
        group = trial
    return groups + ([group] if group else [])


def feed_padded(engine, reqs):
    """One forward over the slots start:stop the requests hold, each row's tokens (the rest of its
    prompt, or its forced tokens) padded on the right to the longest. A pad's keys land past its
    row's end, hidden by the mask, and the row's next tokens overwrite them; the head runs at each
    row's own last token. Rows of the range not fed (decoding, or free) get a throwaway write the
    same way and keep their length."""
    cache = engine.cache
    start, stop = min(r.slot for r in reqs), max(r.slot for r in reqs) + 1
    lengths = cache.lengths[start:stop]
    todo = {r.slot - start: engine._todo(r) for r in reqs}
    T = max(len(ids) for ids in todo.values())
    tokens, last, adapter = [[0] * T for _ in lengths], [T - 1] * len(lengths), [-1] * len(lengths)
    for r in reqs:
        i = r.slot - start
        tokens[i][:len(todo[i])], last[i], adapter[i] = todo[i], len(todo[i]) - 1, engine._adapter_index(r)
        r._pending = []
    ids = torch.tensor(tokens, device=engine.device)
    batch = cache.step(start, stop, ids, adapter_ids=adapter if max(adapter) >= 0 else None)
    batch.last = torch.tensor(last, device=engine.device)
    logits = engine.model(ids, batch=batch)[:, -1]
    for i, length in enumerate(lengths):
        cache.lengths[start + i] = length + len(todo.get(i, ()))
    for r in reqs:
        engine._choose(r, logits[r.slot - start])
