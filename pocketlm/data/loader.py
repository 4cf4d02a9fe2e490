"""Batches from token shards, memory-mapped so a corpus larger than RAM streams from disk.

Training batches are random windows whose positions are a pure function of (seed, step): a resumed
run sees exactly the batches it would have seen, and under torchrun rank r reads rows
[r*B, (r+1)*B) of the same global batch, so K processes train on what one process with a K-times
larger batch would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pocketlm.errors import PocketLMError


class DataError(PocketLMError):
    pass


def read_meta(data_dir) -> dict:
    file = Path(data_dir) / "meta.json"
    if not file.exists():
        raise DataError(f"{data_dir}: no meta.json (run `pocketlm prepare` to make a data directory)")
    return json.loads(file.read_text())


class TokenShards:
    """The token shards of one split, seen as one long array."""

    def __init__(self, data_dir, split: str):
        meta = read_meta(data_dir)
        files = sorted(Path(data_dir).glob(f"{split}-*.bin"))
        if not files:
            raise DataError(f"{data_dir}: no {split}-*.bin shards")
        self.shards = [np.memmap(f, dtype=np.dtype(meta["dtype"]), mode="r") for f in files]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.meta = meta

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        out, pos = [], start
        while length > 0:
            i = int(np.searchsorted(self.offsets, pos, side="right") - 1)
            take = min(length, int(self.offsets[i + 1]) - pos)
            local = pos - int(self.offsets[i])
            out.append(self.shards[i][local:local + take])
            pos, length = pos + take, length - take
        return np.concatenate(out).astype(np.int64)


class PretrainBatches:
    """Random (input, target) windows for pre-training; state is just the micro-step counter."""

    def __init__(self, data_dir, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.tokens = TokenShards(data_dir, "train")
        if len(self.tokens) <= seq_len + 1:
            raise DataError(f"{data_dir}: {len(self.tokens)} training tokens, fewer than seq_len+1 = {seq_len + 1}")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.step = 0

    def next_batch(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        global_b = self.batch_size * self.world_size
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (global_b,), generator=g)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()
        rows = np.stack([self.tokens.window(s, self.seq_len + 1) for s in mine])
        self.step += 1
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class EvalBatches:
    """Consecutive windows over the validation split: every token after the first is a target once.
    Calling the object yields a fresh pass (at most `max_batches` batches; None = the whole split)."""

    def __init__(self, data_dir, batch_size: int, seq_len: int, split: str = "val"):
        self.tokens = TokenShards(data_dir, split)
        self.batch_size, self.seq_len = batch_size, seq_len

    def __call__(self, max_batches: int | None = None):
        n_windows = (len(self.tokens) - 1) // self.seq_len
        if n_windows == 0:
            raise DataError(f"validation split has {len(self.tokens)} tokens, fewer than seq_len+1 = {self.seq_len + 1}")
        for b, i in enumerate(range(0, n_windows, self.batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            rows = [self.tokens.window(w * self.seq_len, self.seq_len + 1) for w in range(i, min(i + self.batch_size, n_windows))]
            t = torch.from_numpy(np.stack(rows))
            yield t[:, :-1], t[:, 1:]
