"""Feeding several rows' short token runs (the rest of a prompt after a copied prefix, forced tokens)
in one forward instead of one each, two ways:

- packed: rows that start with the same cached prefix (prefixes.py), as `analyze` submits them, are
  laid end to end in ONE row of the forward for the linears, with no padding at all (on a CPU a padded
  token costs what a real one does, so a batch of prompts of mixed lengths computes only its real
  tokens). Attention alone goes row by row: the queries are dealt back to their slots, padded to the
  longest row's new tokens, and each slot's queries attend to that slot's own keys (the copied prefix
  and the row's past, read in place), so no query scores another row's keys.
- padded: rows of neighbouring slots, each padded on the right to the longest (any other rows).

The engine (Engine._feed_short) sends what packs here, the rest to the padded path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pocketlm.infer.batch import StepBatch

# Admitted prompts up to this many tokens (after a shared prefix), and forced-token extends as short,
# are fed together in one forward over their rows: one pass over the weights instead of one each.
# A longer prompt is compute-bound on its own and goes alone.
SHORT_PROMPT = 64
PAD_SLACK = 1.25  # padded / real tokens a padded forward may compute (see padding_groups)
# New tokens a pack may hold. Attention is per row, so a larger pack costs no extra attention, and
# fewer forwards mean fewer passes over the weights and fewer small ops: on 128 Bitext rows (a seeded
# sample apart from the benchmark's) 1024 ran as fast as 256 on one thread and faster on two loaded
# ones. What bounds it is the size of one forward's activations.
PACK_TOKENS = 1024


class PackedStep(StepBatch):
    """One forward over rows laid end to end in one row (see the module docstring). The new tokens'
    keys/values go to their own slots and positions; attention runs over the slots first:stop the
    rows hold (a slot between them that is not in the pack gets throwaway queries)."""

    def __init__(self, cache, slots: list[int], lengths: list[int], counts: list[int], adapter: int, device):
        first, stop, width = min(slots), max(slots) + 1, max(counts)
        new_slot, new_pos, dealt = [], [], []  # dealt: each packed token's place in the (slots, width) grid
        for s, length, n in zip(slots, lengths, counts):
            new_slot += [s] * n
            new_pos += range(length, length + n)
            dealt += range((s - first) * width, (s - first) * width + n)
        t = lambda x: torch.tensor(x, device=device)  # noqa: E731
        q_pos, self.dealt = t(new_pos), t(dealt)
        end = max(length + n for length, n in zip(lengths, counts))
        # a grid cell no token fills sits at position 0: it attends to key 0 alone (never to nothing,
        # which would be 0/0), and its output is dropped
        grid = torch.zeros((stop - first) * width, dtype=torch.long, device=device)
        grid[self.dealt] = q_pos
        keys = torch.arange(end, device=device)
        mask = (keys <= grid[:, None]).view(stop - first, 1, width, end)
        last = torch.tensor(counts, device=device).cumsum(0) - 1
        # one row: GPT.forward's head then picks x[arange(1), last], each packed row's last token
        super().__init__(input_ids=None, input_embeds=None, positions=q_pos[None], mask=mask, end=end,
                         adapter_ids=None if adapter < 0 else t([adapter]), last_only=True, k=cache.k,
                         v=cache.v, rows=None, layer_index=None, last=last)
        self.first, self.stop, self.width = first, stop, width
        self.new_slot, self.new_pos = t(new_slot), q_pos

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.k[layer, self.new_slot, :, self.new_pos] = k[0].transpose(0, 1)  # (tokens, heads, head_dim)
        self.v[layer, self.new_slot, :, self.new_pos] = v[0].transpose(0, 1)
        rows = slice(self.first, self.stop)
        return self.k[layer, rows, :, :self.end], self.v[layer, rows, :, :self.end]  # views: nothing copied

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
        """q (1, heads, tokens, head_dim) in pack order; k, v (slots, kv heads, end, head_dim) from write."""
        heads, dim = q.shape[1], q.shape[3]
        grid = q.new_zeros(heads, (self.stop - self.first) * self.width, dim)
        grid[:, self.dealt] = q[0]
        grid = grid.view(heads, self.stop - self.first, self.width, dim).transpose(0, 1)
        y = F.scaled_dot_product_attention(grid, k, v, attn_mask=self.mask, enable_gqa=gqa)
        return y.transpose(0, 1).reshape(heads, -1, dim)[:, self.dealt][None]


def packs(engine, reqs) -> tuple[list[list], list]:
    """(packs, the rest): rows whose slot holds a cached prefix and then only their own few tokens,
    grouped by prefix and adapter, up to PACK_TOKENS new tokens a pack."""
    groups: dict = {}  # (prefix, adapter) -> [[pack, new tokens]]
    rest = []
    for r in sorted(reqs, key=lambda r: r.slot):
        n, new = r._prefix_len, len(engine._todo(r))
        own = engine.cache.lengths[r.slot] - n + new
        if n == 0 or own > PACK_TOKENS:
            rest.append(r)
            continue
        key = (engine.adapter_identity(r.adapter), tuple(r.prompt_ids[:n]), engine._adapter_index(r))
        chunks = groups.setdefault(key, [[[], 0]])
        if chunks[-1][1] + new > PACK_TOKENS:
            chunks.append([[], 0])
        chunks[-1][0].append(r)
        chunks[-1][1] += new
    return [pack for chunks in groups.values() for pack, _ in chunks], rest


def feed_packed(engine, reqs):
    """One forward over a pack (all of one prefix and adapter); each row then chooses its next token."""
    cache = engine.cache
    todo = [engine._todo(r) for r in reqs]
    slots = [r.slot for r in reqs]
    lengths = [cache.lengths[s] for s in slots]
    batch = PackedStep(cache, slots, lengths, [len(t) for t in todo], engine._adapter_index(reqs[0]),
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
