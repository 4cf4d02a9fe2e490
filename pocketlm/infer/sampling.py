"""Turning next-token logits into a token: repetition penalty, temperature, top-k, top-p, min-p.

The order follows Hugging Face's logits processors, so the same settings mean the same thing there:
penalty on the raw logits, then temperature, then the three truncations (top-k, top-p, min-p),
then one draw from what is left. Temperature 0 means greedy (argmax), with no randomness at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from pocketlm.errors import PocketLMError


MIN_TEMPERATURE = 1e-4  # below this, logits / temperature can overflow to inf: treat it as greedy
NUCLEUS_FIRST = 256  # tokens ranked before falling back to a full sort (see _nucleus)
MIN_PENALTY = 0.01      # logits / a far smaller penalty overflow to inf (and sampling gets NaNs)


class SamplingError(PocketLMError):
    pass


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0         # 0 (or below MIN_TEMPERATURE): greedy
    top_k: int = 0                   # 0: off
    top_p: float = 1.0               # 1: off
    min_p: float = 0.0               # 0: off; drop tokens below min_p x the top token's probability
    repetition_penalty: float = 1.0  # 1: off; >1 makes tokens already in prompt or reply less likely
    seed: int | None = None          # same seed, same prompt, same settings: the same reply
    stop: list[str] = field(default_factory=list)            # strings that end the reply (not included)
    stop_token_ids: list[int] = field(default_factory=list)  # extra tokens that end it (beside the tokenizer's)
    ignore_eos: bool = False         # run past the tokenizer's end tokens (benchmarks want fixed lengths)
    # OpenAI's three: a bias added to these tokens' logits, and penalties on the reply's own tokens
    # (logit - frequency_penalty x count - presence_penalty x [count > 0]); applied before the rest
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise SamplingError naming the field and the accepted range."""
        def number(name, lo, hi, lo_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SamplingError(f"{name}: expected a number, got {v!r}")
            if v < lo or (lo_open and v == lo) or v > hi:
                bracket = "(" if lo_open else "["
                raise SamplingError(f"{name}: expected a value in {bracket}{lo}, {hi}], got {v}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SamplingError(f"max_tokens: expected a positive integer, got {self.max_tokens!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError(f"top_k: expected an integer >= 0 (0 turns it off), got {self.top_k!r}")
        number("temperature", 0.0, 100.0)
        number("top_p", 0.0, 1.0, lo_open=True)
        number("min_p", 0.0, 1.0)
        number("repetition_penalty", MIN_PENALTY, 100.0)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise SamplingError(f"seed: expected an integer, got {self.seed!r}")
        number("presence_penalty", -2.0, 2.0)
        number("frequency_penalty", -2.0, 2.0)
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise SamplingError(f"logit_bias: keys are token ids (integers >= 0), got {token!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise SamplingError(f"logit_bias[{token}]: expected a number in [-100, 100], got {bias!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingError(f"stop: expected non-empty strings, got {self.stop!r}")

    def check_vocabulary(self, vocab_size: int) -> None:
        """Raise SamplingError when logit_bias names a token the model does not have."""
        if self.logit_bias and max(self.logit_bias) >= vocab_size:
            raise SamplingError(f"logit_bias: token id {max(self.logit_bias)} is outside this model's vocabulary "
                                f"[0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()  # fresh OS entropy
    else:
        g.manual_seed(seed)
    return g


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (as in HF): a seen token's logit is divided by `penalty` when positive and
    multiplied when negative, so it always moves toward less likely. `seen` is a (V,) bool mask."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set the logits of tokens outside the top-k / nucleus / min-p sets to -inf. logits: (V,), already
    divided by the temperature. The most likely token always survives."""
    neg_inf = torch.tensor(-float("inf"), dtype=logits.dtype)
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[-1]
        logits = torch.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        logits = _nucleus(logits, top_p, neg_inf)
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = torch.where(probs < min_p * probs.max(), neg_inf, logits)
    return logits


def _nucleus(logits: torch.Tensor, top_p: float, neg_inf: torch.Tensor) -> torch.Tensor:
    """Drop a token when the tokens ranked above it already reach top_p on their own. The nucleus
    nearly always ends within the first few hundred tokens, so those are ranked first (a top-k of 256:
    ~20x cheaper than sorting a 49k vocabulary) and the whole row is sorted only when it does not."""
    probs = logits.softmax(-1)
    top, order = probs.topk(min(NUCLEUS_FIRST, probs.size(-1)))
    before = top.cumsum(-1) - top
    if before[-1] < top_p and top.size(-1) < probs.size(-1):  # the nucleus reaches past the top k
        top, order = probs.sort(descending=True)
        before = top.cumsum(-1) - top
    keep = before < top_p
    keep[0] = True  # even when top_p rounds to 0 in the logits' dtype
    kept = order[keep]
    out = torch.full_like(logits, float(neg_inf))
    out[kept] = logits[kept]
    return out


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from a (V,) row of logits (already through the request's processors: the
    repetition penalty is one, pocketlm/infer/processors.py). The only sampler: the engine, and so
    eval and the server, draw through it.

    The draw inverts the cumulative distribution at one uniform number, which picks token i with
    probability p_i exactly as torch.multinomial does. The sum runs in float64, so rounding cannot shift
    a tail token's share. A draw so costs ~70 us on SmolLM2's 49k vocabulary, where an exponential
    race (argmax p / E, one Exp(1) per token) cost ~800 us, 10% of a batch-1 decode step and a quarter
    of a 16-row one in serve."""
    logits = logits.float()
    if params.greedy:
        return int(logits.argmax())
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p, params.min_p)
    cdf = logits.softmax(-1).double().cumsum_(-1)
    u = torch.rand(1, dtype=torch.float64, generator=generator) * cdf[-1]
    i = int(torch.searchsorted(cdf, u, right=True))  # the first token whose interval ends past u
    # a token the filters dropped has an empty interval: never first past u. u rounding up to the
    # total (a 1e-16 chance) would step past the end: the most likely token then
    return i if i < cdf.numel() else int(logits.argmax())
