"""A reply's text as its tokens arrive: incremental detokenization, stop strings, hold-back, filters.

What a listener is shown only ever grows: text is released once no later token can change it. That
means holding back (1) the bytes of a character split over several tokens, (2) an end of the text
that could be the start of a stop string, and (3) whatever an output filter asks to hold (a word
still being formed, which a moderation filter may yet redact).
"""

from __future__ import annotations

from pocketlm.tokenizer import Tokenizer


class StreamDecoder:
    """Incremental detokenization: turns a growing list of token ids into text deltas.

    Byte-level BPE can split one character over several tokens; a piece that decodes to a trailing
    U+FFFD is held back until the rest of the character arrives. Decoding from a few tokens before the
    new ones (prefix) keeps the spacing right for tokenizers that drop a leading space at the start."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded already, and give the context for the next piece
        self.read = 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        seen = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(seen) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(seen):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character stays as U+FFFD)."""
        seen = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(seen):]


class OutputFilter:
    """The hook a moderation or redaction step plugs in; one instance per request."""
    holdback: int = 0  # characters at the end of the text not shown yet (a word being formed)

    def __call__(self, text: str) -> tuple[str, str | None]:
        """The reply so far -> (the text to show, possibly redacted; a finish_reason such as
        "content_filter" to end the request now, or None)."""
        return text, None


def partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string (held back)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextStream:
    """One request's reply text. push() each token and release() what may be shown; close() at the
    end releases the rest. `text` is the reply as shown in full at the end: cut before a stop string,
    passed through the filters."""

    def __init__(self, tokenizer: Tokenizer, stop=(), filters=()):
        self.decoder = StreamDecoder(tokenizer)
        self.stop, self.filters = list(stop), list(filters)
        self.raw = ""       # decoded so far, cut at a stop string
        self.text = ""      # raw through the filters
        self.shown = 0      # characters of text released
        self.ended = False  # a stop string or a filter ended the reply: no more text

    def push(self, token: int) -> str | None:
        """Add a token; returns "stop" when a stop string completed, a filter's finish reason, or None."""
        if self.ended:
            return None
        start = self._scan_from()
        self.raw += self.decoder.push(token)
        reason = "stop" if self.stop and self._cut_at_stop(start) else None
        return self._filter() or reason

    def close(self) -> str:
        """The end of the reply (a stop token, the length limit, a finish reason): all that is left."""
        if not self.ended:
            start = self._scan_from()
            self.raw += self.decoder.flush()
            if self.stop:
                self._cut_at_stop(start)
            self._filter()
            self.ended = True
        return self.release(final=True)

    def release(self, final: bool = False) -> str:
        """The new text that is safe to show now."""
        hold = 0 if final or self.ended else max([partial_stop(self.raw, self.stop)] +
                                                  [f.holdback for f in self.filters])
        safe = max(self.shown, len(self.text) - hold)
        delta, self.shown = self.text[self.shown:safe], safe
        return delta

    def _filter(self) -> str | None:
        text, reason = self.raw, None
        for f in self.filters:
            text, why = f(text)
            reason = reason or why
        self.text = text
        if reason is not None:
            self.ended = True
        return reason

    def _scan_from(self) -> int:
        """Where a stop string completed by the next piece could start: it must end in the new text."""
        return max(0, len(self.raw) - max(map(len, self.stop))) if self.stop else 0

    def _cut_at_stop(self, start: int) -> bool:
        hits = [i for i in (self.raw.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.raw = self.raw[:min(hits)]
            self.ended = True
        return bool(hits)
