"""Batches from token shards, memory-mapped so a corpus larger than RAM streams from disk.

Training samples form one global sequence, and the loader's whole position is one number: the samples
consumed. Global sample i comes from the source the mixture schedule assigns it (pocketlm.data.mixture;
every prefix is within one sample of each source's share), and is a window of that source whose start is
a pure function of (seed, source, index within the source). Under torchrun rank r of W reads samples
[n + rB, n + (r+1)B) and then n advances by WB, so K processes train on what one process with a K-times
larger batch would, and a resume at any world size continues the same sequence.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pocketlm.data.mixture import Mixture
from pocketlm.errors import PocketLMError


class DataError(PocketLMError):
    pass


def read_meta(data_dir) -> dict:
    file = Path(data_dir) / "meta.json"
    if not file.exists():
        raise DataError(f"{data_dir}: no meta.json (run `pocketlm prepare` to make a data directory)")
    return json.loads(file.read_text())


def shard_files(data_dir, split: str, source: int | None = None) -> list[Path]:
    """The shards of one split: of one source of the mixture, or of all of them in order. Data
    directories from before mixtures list no shards in meta.json and are globbed."""
    meta = read_meta(data_dir)
    if "mixture" not in meta:
        return sorted(Path(data_dir).glob(f"{split}-*.bin"))
    picked = meta["mixture"] if source is None else [meta["mixture"][source]]
    return [Path(data_dir) / f for s in picked for f in s[split]["shards"]]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a counter-based hash, so sample k's window needs no generator state."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def window_starts(seed: int, source: np.ndarray, index: np.ndarray, n_starts: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        key = _mix64(np.full(len(index), seed, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        x = _mix64(key ^ (source.astype(np.uint64) << np.uint64(48)) ^ _mix64(index.astype(np.uint64)))
    return (x % n_starts.astype(np.uint64)).astype(np.int64)


class TokenShards:
    """The token shards of one split, seen as one long array."""

    def __init__(self, data_dir, split: str, source: int | None = None):
        meta = read_meta(data_dir)
        files = shard_files(data_dir, split, source)
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
    """Random (input, target) windows for pre-training, blended over the mixture's sources by weight;
    the state is the number of global samples consumed."""

    def __init__(self, data_dir, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        meta = read_meta(data_dir)
        sources = meta.get("mixture") or [{"name": "train", "weight": 1}]
        self.sources = [TokenShards(data_dir, "train", i if "mixture" in meta else None) for i in range(len(sources))]
        for s, tokens in zip(sources, self.sources):
            if len(tokens) <= seq_len + 1:
                raise DataError(f"{data_dir}: source {s['name']!r} has {len(tokens)} training tokens, "
                                f"fewer than seq_len+1 = {seq_len + 1}")
        self.names = [s["name"] for s in sources]
        self.mixture = Mixture([s["weight"] for s in sources])
        self.n_starts = np.array([len(t) - seq_len - 1 for t in self.sources], dtype=np.int64)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.samples = 0

    def sample_sources(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, window start) of global samples [start, start+n)."""
        src, index = self.mixture.lookup(start, n)
        return src, window_starts(self.seed, src, index, self.n_starts[src])

    def next_batch(self):
        src, starts = self.sample_sources(self.samples + self.rank * self.batch_size, self.batch_size)
        rows = np.stack([self.sources[s].window(int(w), self.seq_len + 1) for s, w in zip(src, starts)])
        self.samples += self.batch_size * self.world_size
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        # checkpoints from before mixtures counted micro-steps of this world size
        self.samples = int(state["samples"]) if "samples" in state else \
            int(state["step"]) * self.batch_size * self.world_size


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
