"""Per-request logits processors: how a request shapes its own next-token choice.

A Processor sees its row's logits before sampling (it may mask or reweight them), hears which token
was chosen, may force the next tokens outright (the engine feeds them to the model as one extend, a
prefill of several tokens, not one decode step each), and may declare the request complete. One
instance per request, so a processor keeps its own state (a grammar's position, the tokens seen).

A request with no processors and greedy settings takes the engine's fast path: one argmax over the
whole batch, no per-row work at all.
"""

from __future__ import annotations

import torch

from pocketlm.infer.sampling import apply_repetition_penalty


class Processor:
    """The protocol, with do-nothing defaults: override what a constraint needs."""

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) fp32 logits of this row -> the logits to sample from (e.g. -inf on banned tokens)."""
        return logits

    def accept(self, token: int) -> None:
        """The token this row got (sampled or forced)."""

    def forced(self) -> list[int]:
        """Tokens the constraint forces next, if any (asked after every accepted token)."""
        return []

    def is_done(self) -> bool:
        """The constraint is complete: the request finishes with "stop"."""
        return False


class RepetitionPenalty(Processor):
    """CTRL's penalty (as in HF) on every token of the prompt and the reply so far."""

    def __init__(self, penalty: float, prompt_ids, vocab_size: int):
        self.penalty = penalty
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)
        self.seen[[t for t in prompt_ids if t >= 0]] = True  # (ids < 0 are embedding placeholders)

    def process(self, logits):
        return apply_repetition_penalty(logits, self.seen, self.penalty)

    def accept(self, token):
        self.seen[token] = True


class BanTokens(Processor):
    """Never emit these tokens (their logits become -inf)."""

    def __init__(self, token_ids):
        self.ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long)

    def process(self, logits):
        return logits.index_fill(-1, self.ids, -float("inf"))
