"""Per-request logits processors: how a request shapes its own next-token choice.

A Processor sees its row's logits before sampling (it may mask or reweight them), hears which token
was chosen, may force the next tokens outright (the engine feeds them to the model as one extend, a
prefill of several tokens, not one decode step each), and may declare the request complete. One
instance per request, so a processor keeps its own state (a grammar's position, the tokens seen).

A greedy request takes the engine's fast path, one argmax over the whole batch, when it has no
processors or when every one of them allows that token (Processor.allows): no per-row logits work.
"""

from __future__ import annotations

import torch

from pocketlm.infer.sampling import apply_repetition_penalty


class Processor:
    """The protocol, with do-nothing defaults: override what a constraint needs."""

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) fp32 logits of this row -> the logits to sample from (e.g. -inf on banned tokens)."""
        return logits

    def allows(self, token: int) -> bool:
        """True only when process() would keep `token` and its logit as they are and touch no other
        logit but to lower it to -inf (a pure mask that lets this token through): then a greedy row
        whose argmax is `token` takes it from the batch's one argmax, with no full-vocabulary pass
        (as llama.cpp checks the sampled token against its grammar before masking). False: run process()."""
        return False

    def accept(self, token: int) -> None:
        """The token this row got (sampled or forced)."""

    def forced(self) -> list[int]:
        """Tokens the constraint forces next, if any (asked after every accepted token)."""
        return []

    def is_done(self) -> bool:
        """The constraint is complete: the request finishes with "stop"."""
        return False


def let_through(processors, token: int) -> bool:
    """Every processor allows `token` (Processor.allows); one without an allows() method does not."""
    return all(getattr(p, "allows", None) is not None and p.allows(token) for p in processors)


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


class LogitBias(Processor):
    """OpenAI's logit_bias: a fixed number added to some tokens' logits (±100 bans or forces one)."""

    def __init__(self, bias: dict[int, float]):
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def process(self, logits):
        return logits.index_add(-1, self.ids, self.values)


class ReplyPenalties(Processor):
    """OpenAI's frequency and presence penalties, on the tokens of the reply so far (not the prompt's)."""

    def __init__(self, frequency: float, presence: float, vocab_size: int):
        self.frequency, self.presence = frequency, presence
        self.counts = torch.zeros(vocab_size)

    def process(self, logits):
        return logits - self.frequency * self.counts - self.presence * (self.counts > 0).float()

    def accept(self, token):
        self.counts[token] += 1


class BanTokens(Processor):
    """Never emit these tokens (their logits become -inf)."""

    def __init__(self, token_ids):
        self.banned = set(token_ids)
        self.ids = torch.tensor(sorted(self.banned), dtype=torch.long)

    def process(self, logits):
        return logits.index_fill(-1, self.ids, -float("inf"))

    def allows(self, token):
        return token not in self.banned
