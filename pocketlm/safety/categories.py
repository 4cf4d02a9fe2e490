"""OpenAI's moderation categories, one verdict type every backend returns, and the /v1/moderations
request and response shapes (so `client.moderations.create` of the official client parses ours)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from pocketlm.errors import InputError

# the category keys of openai.types.moderation.Categories (by alias), in its order
CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
              "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
              "violence/graphic")


class ModerationError(InputError):
    """A moderation request or backend option is malformed."""


@dataclass
class Hit:
    """What a rule matched: the category, its score, and where in the text (characters start:end)."""
    category: str
    score: float
    start: int
    end: int
    rule: str


@dataclass
class Verdict:
    """One text's moderation: a score in [0, 1] for every category, flagged where a score reaches
    the backend's threshold. `hits` locate the offending words when the backend can (the list and
    rules backend); a classifier or guard model only scores the whole text."""
    scores: dict[str, float]
    threshold: float = 0.5
    hits: list[Hit] = field(default_factory=list)
    flagged_override: bool | None = None  # a guard model's "unsafe" in a category OpenAI has no key for
    detail: dict = field(default_factory=dict)  # backend-specific (a guard model's category codes)

    @classmethod
    def empty(cls, threshold: float = 0.5) -> "Verdict":
        return cls({c: 0.0 for c in CATEGORIES}, threshold)

    @property
    def categories(self) -> dict[str, bool]:
        return {c: self.scores.get(c, 0.0) >= self.threshold for c in CATEGORIES}

    @property
    def flagged(self) -> bool:
        if self.flagged_override is not None:
            return self.flagged_override
        return any(self.categories.values())

    def raise_score(self, category: str, score: float):
        if category not in CATEGORIES:
            raise ValueError(f"unknown moderation category {category!r}")
        self.scores[category] = max(self.scores.get(category, 0.0), score)


def moderation_inputs(value) -> list[str]:
    """The texts of a /v1/moderations `input`: a string, a list of strings, or a list of
    {"type": "text", "text": ...} parts (images are refused: the backends read text)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise ModerationError("input: expected a string, a non-empty list of strings, or a list of "
                              "{'type': 'text', 'text': ...} objects")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
            out.append(item["text"])
        elif isinstance(item, dict) and item.get("type") == "image_url":
            raise ModerationError(f"input[{i}]: image inputs are not supported; the moderation backends read text")
        else:
            raise ModerationError(f"input[{i}]: expected a string or {{'type': 'text', 'text': str}}, got {item!r:.80}")
    return out


def result_json(v: Verdict) -> dict:
    """One element of `results`, with every OpenAI category key."""
    return {"flagged": v.flagged,
            "categories": v.categories,
            "category_scores": {c: float(round(v.scores.get(c, 0.0), 6)) for c in CATEGORIES},
            # the backends read text only, so every category was applied to the text
            "category_applied_input_types": {c: ["text"] for c in CATEGORIES}}


def moderation_response(texts, backend, model: str | None = None) -> dict:
    """OpenAI's ModerationCreateResponse for `texts` (a string or a list) checked by `backend`."""
    texts = moderation_inputs(texts)
    return {"id": f"modr-{uuid.uuid4().hex}", "model": model or backend.name,
            "results": [result_json(backend.check(t)) for t in texts]}


def timed(backend, texts: list[str]) -> float:
    """Mean seconds per message of backend.check (for the latency figure)."""
    t = time.perf_counter()
    for s in texts:
        backend.check(s)
    return (time.perf_counter() - t) / max(1, len(texts))
