"""Output moderation while a reply streams: an OutputFilter (the engine contract in
pocketlm/infer/textstream.py) that ends the reply with "content_filter" before a flagged word is shown.

The engine calls the filter with the reply so far after every token and shows all but the last
`holdback` characters. A listed word is found the moment its last letter arrives; while it could
still grow into a harmless word ("ass" -> "assess") it is only cut from the text handed back, and
once the word is closed (whitespace follows) the reply ends at the character before it. So a
flagged word shorter than `holdback` characters (spaced-out letters included) is never shown. Only
the last `window` characters are re-checked each token, which keeps the cost per token flat.
"""

from __future__ import annotations

import re

try:  # the engine's base class, where the engine branch has landed
    from pocketlm.infer.textstream import OutputFilter as _Base
except ImportError:  # pragma: no cover - before the engine contract is merged
    _Base = object


class ModerationFilter(_Base):
    def __init__(self, backend=None, holdback: int = 32, window: int = 160):
        from pocketlm.safety.rules import RulesBackend

        self.backend = backend or RulesBackend()
        self.holdback, self.window = holdback, max(window, 2 * holdback)
        self.ended: str | None = None  # the text shown when the reply was ended
        self.verdict = None
        # a backend that scores the whole text only (a classifier) runs when a word has just ended
        self.whole_text = not hasattr(self.backend, "lookup")

    def __call__(self, text: str) -> tuple[str, str | None]:
        if self.ended is not None:
            return self.ended, "content_filter"
        base = 0
        if len(text) > self.window:  # start the window at a word boundary
            cut = len(text) - self.window
            space = text.find(" ", cut)
            base = space + 1 if space >= 0 else cut
        if self.whole_text and text and text[-1].isalnum():
            return text, None
        verdict = self.backend.check(text[base:])
        if not verdict.flagged:
            return text, None
        hits = [h for h in verdict.hits if h.score >= verdict.threshold]
        if hits:
            start, end = base + hits[0].start, base + hits[0].end
        else:  # a backend that scores the whole text only: the last word tipped it
            last = re.search(r"\S+\s*$", text)
            start, end = (last.start(), last.end()) if last else (len(text), len(text))
        closed = re.search(r"\s", text[end:]) is not None
        if not closed and hits:
            return text[:start], None  # may yet grow into a harmless word: hide it, decide later
        self.verdict, self.ended = verdict, text[:start].rstrip()
        return self.ended, "content_filter"
