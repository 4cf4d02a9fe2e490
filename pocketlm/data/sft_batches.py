"""Fine-tuning batches from encoded examples: padded or packed rows, length-grouped epochs whose order
is a pure function of (seed, epoch), so a resumed run sees the batches it would have seen.

Rows are (ids, labels) pairs from pocketlm.data.sft.encode_examples; labels are -100 where not scored.
"""

from __future__ import annotations

import bisect
import random

import torch

from pocketlm.data.sft import SFTDataError


def pack_batch(rows: list[list[tuple[list[int], list[int]]]], pad_id: int):
    """Rows of one or more examples placed back to back: each example contributes its inputs ids[:-1]
    and targets labels[1:] (so no example predicts the next one's first token), and doc_ids numbers
    the examples of a row. Rows are right-padded to the longest; padding has -100 targets and a doc
    id of its own. Returns (inputs, targets, doc_ids, real tokens), all but the last (B, T) int64."""
    T = max(sum(len(ids) - 1 for ids, _ in row) for row in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -100, dtype=torch.long)
    doc = torch.zeros((len(rows), T), dtype=torch.long)
    real = 0
    for b, row in enumerate(rows):
        t = 0
        for k, (ids, labels) in enumerate(row):
            n = len(ids) - 1
            x[b, t:t + n] = torch.tensor(ids[:-1])
            y[b, t:t + n] = torch.tensor(labels[1:])
            doc[b, t:t + n] = k
            t += n
        doc[b, t:] = len(row)
        real += t
    return x, y, doc, real


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Inputs ids[:-1] and targets labels[1:], one example per row, right-padded to the longest row
    (pad targets are -100)."""
    x, y, _, _ = pack_batch([[r] for r in rows], pad_id)
    return x, y


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: longest first, each example goes into the fullest row that still has room
    for it, or a new row. Examples are never split; a row holds at most `capacity` tokens.
    Returns rows of example indices."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the first with room >= n is the best fit
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > capacity:
            raise SFTDataError(f"example {i} has {n} tokens, more than a packed row's {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        if room > n:
            bisect.insort(free, (room - n, r))
    return rows


class SFTBatches:
    """Shuffled epochs of batches. A row is one example, right-padded, or with `pack_len` several
    short examples packed into up to pack_len tokens (doc_ids keep their attention apart). Rows of
    similar length are batched together (sorted within windows of 64 batches) so little compute
    goes to padding. The state is (epoch, batch), so a resumed run continues with exactly the
    batches it would have seen. Under torchrun each rank takes its share of the same global batch.

    next_batch() -> (inputs, targets, doc_ids or None, real tokens): doc_ids only for packed rows
    (plain padded rows need no mask: padding sits after every real token)."""

    def __init__(self, examples, batch_size: int, pad_id: int, seed: int = 0, group_by_length: bool = True,
                 rank: int = 0, world_size: int = 1, pack_len: int = 0):
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.group_by_length, self.rank, self.world_size, self.pack_len = group_by_length, rank, world_size, pack_len
        # Packed once: with attention kept within each example, which examples share a row does not
        # change the gradient, and rows are still shuffled into different batches every epoch.
        self.rows = pack_rows([len(ids) - 1 for ids, _ in examples], pack_len) if pack_len else [[i] for i in range(len(examples))]
        self.row_len = [sum(len(examples[i][0]) - 1 for i in row) for row in self.rows]
        if len(self.rows) < batch_size * world_size:
            what = f"packed into {len(self.rows)} rows of {pack_len} tokens" if pack_len else "training examples"
            raise SFTDataError(f"{len(examples)} {what}, fewer than one batch ({batch_size * world_size} rows)")
        self.epoch, self.index = 0, 0
        self._order = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.rows)))
        rng.shuffle(order)
        gb = self.batch_size * self.world_size
        if self.group_by_length:
            window = gb * 64
            order = [i for w in range(0, len(order), window)
                     for i in sorted(order[w:w + window], key=self.row_len.__getitem__)]
        batches = [order[i:i + gb] for i in range(0, len(order) - gb + 1, gb)]  # drop the ragged last batch
        rng.shuffle(batches)
        return batches

    def steps_per_epoch(self) -> int:
        return len(self.rows) // (self.batch_size * self.world_size)

    def next_batch(self):
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_batches(self.epoch)
        batch = self._order[self.index][self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        self.index += 1
        x, y, doc_ids, real = pack_batch([[self.examples[i] for i in self.rows[r]] for r in batch], self.pad_id)
        return x, y, (doc_ids if self.pack_len else None), real

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_batches(self.epoch)


class SFTEvalBatches:
    """Every validation example once, in order; calling the object starts a fresh pass."""

    def __init__(self, examples, batch_size: int, pad_id: int):
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id

    def __call__(self, max_batches: int | None = None):
        for b, i in enumerate(range(0, len(self.examples), self.batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield pad_batch(self.examples[i:i + self.batch_size], self.pad_id)
