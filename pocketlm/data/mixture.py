"""The deterministic schedule that blends sources by weight: which source global sample i comes from.

With shares w_s = p_s / q (exact rationals from the weights), the schedule keeps every prefix within one
sample of every share: after n samples, source s has supplied floor(n w_s) or ceil(n w_s) of them
(|count - n w_s| < 1). Sample k of source s (k = 1, 2, ...) may come no earlier than the first n with
(k - 1) < n w_s and no later than ceil(k / w_s); those are unit jobs with integer release times and
deadlines on one machine, which a schedule meeting the bounds always exists for (Tijdeman's
chairman-assignment theorem), and earliest-deadline-first finds one. After q samples every source has
had exactly p_s, so the schedule repeats with period q: sample i's source and its index within that
source are read from one period table, and any position is O(1) to reach (resume needs no history).

Weights whose exact common denominator exceeds MAX_PERIOD (say 1/3 written as 0.333333333) are rounded
to multiples of 1/MAX_PERIOD by largest remainders; `shares` reports the shares actually used.
"""

from __future__ import annotations

import heapq
from fractions import Fraction
from math import lcm

import numpy as np

from pocketlm.errors import InputError

MAX_PERIOD = 100_000


def _integer_shares(weights) -> tuple[list[int], int]:
    if not weights or any(not w > 0 for w in weights):
        raise InputError(f"mixture weights: expected positive numbers, got {weights}")
    fr = [Fraction(str(w)) for w in weights]
    total = sum(fr)
    shares = [f / total for f in fr]
    q = lcm(*(s.denominator for s in shares))
    if q <= MAX_PERIOD:
        return [int(s * q) for s in shares], q
    q = MAX_PERIOD
    p = [int(s * q) for s in shares]
    by_remainder = sorted(range(len(p)), key=lambda i: (-(shares[i] * q - p[i]), i))
    for i in by_remainder[:q - sum(p)]:
        p[i] += 1
    if min(p) == 0:
        raise InputError(f"mixture weights {weights}: a share below 1/{MAX_PERIOD} cannot be scheduled")
    return p, q


def schedule_period(p: list[int], q: int) -> np.ndarray:
    """The source of each sample in one period, by earliest deadline first (ties: the lower index).
    Source s's next sample, its (c+1)-th, is released at n = floor(c q / p_s) + 1 (from then on taking it
    keeps count <= ceil(n w_s)) and due at n = ceil((c+1) q / p_s) (count >= floor(n w_s))."""
    counts = [0] * len(p)
    waiting = [(1, s) for s in range(len(p))]  # (release, source): every first sample is released at n=1
    ready: list[tuple[int, int]] = []  # (deadline, source)
    out = np.empty(q, dtype=np.int32)
    for n in range(1, q + 1):
        while waiting and waiting[0][0] <= n:
            s = heapq.heappop(waiting)[1]
            heapq.heappush(ready, (-(-(counts[s] + 1) * q // p[s]), s))
        s = heapq.heappop(ready)[1]
        out[n - 1] = s
        counts[s] += 1
        heapq.heappush(waiting, (counts[s] * q // p[s] + 1, s))
    return out


class Mixture:
    def __init__(self, weights):
        self.p, self.q = _integer_shares(list(weights))
        self.table = schedule_period(self.p, self.q)
        # index of each period position within its source's samples of that period
        self.rank_in_source = np.zeros(self.q, dtype=np.int64)
        for s in range(len(self.p)):
            where = np.nonzero(self.table == s)[0]
            self.rank_in_source[where] = np.arange(len(where))

    @property
    def shares(self) -> list[float]:
        return [ps / self.q for ps in self.p]

    def lookup(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Global samples [start, start+n) -> (source of each, its index among that source's samples)."""
        i = np.arange(start, start + n, dtype=np.int64)
        period, r = np.divmod(i, self.q)
        src = self.table[r].astype(np.int64)
        return src, period * np.asarray(self.p, dtype=np.int64)[src] + self.rank_in_source[r]
