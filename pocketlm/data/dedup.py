"""Duplicate removal within one source, in document order: the first copy stays, later copies are dropped.

- `exact` (the default): documents whose normalized text (NFKC, case-folded, whitespace collapsed)
  has the same 128-bit BLAKE2b digest. Digests of finished tasks are kept in sorted numpy arrays, 16
  bytes per kept document: 16 MB per million documents, 16 GB per billion. The running task's digests sit
  in a Python set (~100 bytes each, bounded by one task's documents) until the task is sealed.
- `minhash`: exact, then near duplicates through datasketch: a MinHash of the word 5-gram shingles
  (128 permutations) looked up in a MinHashLSH index at Jaccard similarity >= 0.8. The index costs
  roughly 1 KB per kept document, so it suits sources of up to tens of millions of documents.
- `none`: keep everything.

A sealed task's state is persisted by `prepare` beside its completion marker, so a resumed run rebuilds
exactly the index an uninterrupted one had at that point.
"""

from __future__ import annotations

import hashlib
import unicodedata

import numpy as np

NUM_PERM, THRESHOLD, SHINGLE, SCHEME = 128, 0.8, 5, "affine32"


def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def digest(normalized: str) -> bytes:
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()


class DigestSet:
    """A set of 16-byte digests in sorted numpy arrays (a small log-structured merge: a new array is
    merged into the last while it is at least half its size, so lookups touch O(log n) arrays)."""

    def __init__(self):
        self.levels: list[np.ndarray] = []
        self.pending: set[bytes] = set()

    def __contains__(self, d: bytes) -> bool:
        if d in self.pending:
            return True
        q = np.array([d], dtype="S16")[0]  # numpy strips trailing NULs on both sides alike
        for a in self.levels:
            i = int(np.searchsorted(a, q))
            if i < len(a) and a[i] == q:
                return True
        return False

    def add(self, d: bytes) -> None:
        self.pending.add(d)

    def seal(self) -> np.ndarray:
        arr = np.array(sorted(self.pending), dtype="S16")
        self.pending = set()
        self.extend(arr)
        return arr

    def extend(self, arr: np.ndarray) -> None:
        if len(arr) == 0:
            return
        self.levels.append(arr)
        while len(self.levels) > 1 and 2 * len(self.levels[-1]) >= len(self.levels[-2]):
            top = self.levels.pop()
            self.levels[-1] = np.sort(np.concatenate([self.levels[-1], top]))

    def __len__(self) -> int:
        return sum(len(a) for a in self.levels) + len(self.pending)


class Deduper:
    """`check(text)` -> None for a new document (now remembered), or "exact" / "near" for a duplicate."""

    def __init__(self, mode: str):
        self.mode = mode
        self.exact = DigestSet()
        self.lsh = None
        self.pending_hashes: list[np.ndarray] = []
        self.n_indexed = 0
        if mode == "minhash":
            from datasketch import MinHashLSH
            self.lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)

    def check(self, text: str) -> str | None:
        if self.mode == "none":
            return None
        norm = normalize(text)
        d = digest(norm)
        if d in self.exact:
            return "exact"
        if self.lsh is not None:
            from datasketch import MinHash
            words = norm.split()
            shingles = {" ".join(words[i:i + SHINGLE]).encode("utf-8") for i in range(max(1, len(words) - SHINGLE + 1))}
            m = MinHash(num_perm=NUM_PERM, scheme=SCHEME)
            m.update_batch(list(shingles))
            if self.lsh.query(m):
                return "near"
            self._index(m)
            self.pending_hashes.append(m.hashvalues)
        self.exact.add(d)
        return None

    def _index(self, m) -> None:
        self.lsh.insert(self.n_indexed, m)
        self.n_indexed += 1

    def seal(self) -> dict[str, np.ndarray]:
        """End of a task: its state, to persist; `restore` of the same arrays rebuilds it."""
        state = {"digests": self.exact.seal()}
        if self.lsh is not None:
            state["minhash"] = np.array(self.pending_hashes, dtype=np.uint32).reshape(-1, NUM_PERM)
            self.pending_hashes = []
        return state

    def restore(self, state) -> None:
        self.exact.extend(state["digests"])
        if self.lsh is not None:
            from datasketch import MinHash
            for hv in state["minhash"]:
                self._index(MinHash(num_perm=NUM_PERM, hashvalues=hv, scheme=SCHEME))
