"""The built-in moderation backend: word lists and phrase rules over normalized text, well under a
millisecond a message and able to say where each hit is (so a stream can be cut just before it).

Hand-written rather than a package: the point is a dependency-free first line that also runs inside
the token loop; a classifier (classifier.py) or a guard model (guard.py) is the second line.
"""

from __future__ import annotations

import bisect
import re
import unicodedata

from pocketlm.safety.categories import CATEGORIES, Hit, ModerationError, Verdict
from pocketlm.safety.wordlists import MINOR_DISTANCE, MINOR_WORDS, PHRASES, SUFFIXES, WORDS

# letters that look Latin in other scripts (Cyrillic, Greek): "іdіоt" is "idiot"
_LOOKALIKE = str.maketrans("аеорсухіјѕԁɡмтнвкαεορτυνιкһ", "aeopcyxijsdgmtnbkaeoptuvikh")
_LEET = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g", "@": "a", "$": "s"}
_LEET_INSIDE = {"!": "i", "|": "l", "+": "t"}  # only between letters: "idiot!" ends a word, "sh!t" does not
_MASKS = "*#"
_TRIPLE = re.compile(r"([a-z])\1\1")
_RUN = re.compile(r"([a-z])\1+")


def _squeeze(w: str) -> str:
    return _RUN.sub(r"\1", w)


def _fold(ch: str) -> str:
    if ch.isascii():
        return ch.lower()
    if unicodedata.category(ch) == "Cf":  # zero-width joiners and the like hide nothing
        return ""
    return unicodedata.normalize("NFKC", ch).lower().translate(_LOOKALIKE)


_PLAIN = re.compile(r"[a-z]+")
_SPECIAL = re.compile(r"[0-9@$!|+*#]")


def words(text: str) -> list[tuple[str, int, int]]:
    """(normalized word, start, end) with start:end the characters of `text` it came from. A word is
    letters (after l33t mapping, inside chunks that have a letter) and mask characters between them."""
    if text.isascii() and not _SPECIAL.search(text):  # most text: one regex pass
        return [(m.group(), m.start(), m.end()) for m in _PLAIN.finditer(text.lower())]
    out = []
    for chunk in re.finditer(r"\S+", text):
        raw, base = chunk.group(), chunk.start()
        if raw.isascii() and not _SPECIAL.search(raw):  # the common case: letters and punctuation
            out += [(m.group(), base + m.start(), base + m.end()) for m in _PLAIN.finditer(raw.lower())]
            continue
        has_letter = any(c.isalpha() for c in raw)
        cur, start = [], None
        for i, ch in enumerate(raw):
            for c in _fold(ch):
                nxt = raw[i + 1] if i + 1 < len(raw) else ""
                if c.isalpha():
                    pass
                elif has_letter and c in _LEET:
                    c = _LEET[c]
                elif cur and c in _LEET_INSIDE and (nxt.isalnum() or nxt in _LEET):
                    c = _LEET_INSIDE[c]
                elif cur and c in _MASKS and (nxt.isalpha() or nxt in _MASKS):
                    c = "*"
                else:
                    if cur:
                        out.append(("".join(cur), base + start, base + i))
                    cur, start = [], None
                    continue
                if start is None:
                    start = i
                cur.append(c)
        if cur:
            out.append(("".join(cur), base + start, base + len(raw)))
    return out


class RulesBackend:
    """Word lists and phrase rules (pocketlm/safety/wordlists.py). Flags a category at `threshold`."""
    name = "pocketlm-rules"

    def __init__(self, threshold: float = 0.5, extra_words: dict | None = None):
        self.threshold = threshold
        self.words = {**WORDS, **(extra_words or {})}
        self.forms = {}  # every inflected form -> the listed word (fucking -> fuck, shitty -> shit)
        for w in self.words:
            for suf in SUFFIXES:
                self.forms.setdefault(w + suf, w)
                self.forms.setdefault(w + w[-1] + suf, w)
        self.forms.update({w: w for w in self.words})
        self.squeezed = {}
        for form, w in self.forms.items():
            self.squeezed.setdefault(_squeeze(form), w)
        self.by_length: dict[int, list[str]] = {}
        for w in self.words:
            self.by_length.setdefault(len(w), []).append(w)
        # a phrase regex runs only when one of its trigger words is in the text: most text has none,
        # and Python's re tries every alternative at every position
        self.phrases = [(re.compile(rf"(?<![a-z*])(?:{p})(?![a-z*])"), frozenset(trig.split()), p, cats)
                        for p, trig, cats in PHRASES]

    def lookup(self, w: str) -> str | None:
        """The listed word `w` is a form of (fucking -> fuck, b1tches -> bitch, fuuuck -> fuck, sh*t -> shit)."""
        listed = self.forms.get(w)
        if listed or len(w) < 3:
            return listed
        if "*" in w:
            if not w[0].isalpha():
                return None
            for cand in self.by_length.get(len(w), ()):
                if all(a == b or a == "*" for a, b in zip(w, cand)):
                    return cand
            return None
        return self.squeezed.get(_squeeze(w)) if _TRIPLE.search(w) else None

    def _word_hits(self, ws) -> list[tuple[Hit, int]]:
        hits, i = [], 0
        while i < len(ws):
            j = i
            while j < len(ws) and len(ws[j][0]) == 1 and j - i < 24:
                j += 1
            if j - i >= 3:  # s-p-a-c-e-d letters: the longest listed word inside the run
                found = None
                for a in range(i, j - 2):
                    for b in range(j, a + 2, -1):
                        listed = self.lookup("".join(w for w, _, _ in ws[a:b]))
                        if listed:
                            found = (a, b, listed)
                            break
                    if found:
                        break
                if found:
                    a, b, listed = found
                    hits += [(Hit(c, s, ws[a][1], ws[b - 1][2], f"word:{listed}"), a) for c, s in self.words[listed]]
                i = j if j > i else i + 1
                continue
            listed = self.lookup(ws[i][0])
            if listed:
                hits += [(Hit(c, s, ws[i][1], ws[i][2], f"word:{listed}"), i) for c, s in self.words[listed]]
            i += 1
        return hits

    def check(self, text: str) -> Verdict:
        v = Verdict.empty(self.threshold)
        ws = words(text)
        word_hits = self._word_hits(ws)
        # phrases over the words joined by single spaces, mapped back to characters of the text
        joined, starts, pos = [], [], 0
        for w, _, _ in ws:
            starts.append(pos)
            joined.append(w)
            pos += len(w) + 1
        line = " ".join(joined)
        hits = [h for h, _ in word_hits]
        present = set(joined)
        for rx, trig, p, cats in self.phrases:
            if present.isdisjoint(trig):
                continue
            for m in rx.finditer(line):
                a = bisect.bisect_right(starts, m.start()) - 1
                b = bisect.bisect_right(starts, max(m.end() - 1, m.start())) - 1
                hits += [Hit(c, s, ws[a][1], ws[b][2], f"phrase:{p[:40]}") for c, s in cats]
        # sexual content next to a word for a child is sexual/minors
        minors = [i for i, (w, _, _) in enumerate(ws) if w in MINOR_WORDS]
        for h, i in word_hits:
            if h.category == "sexual" and minors:
                near = min(minors, key=lambda k: abs(k - i))
                if abs(near - i) <= MINOR_DISTANCE or h.score >= 0.6:
                    a, b = min(i, near), max(i, near)
                    hits.append(Hit("sexual/minors", 0.9 if abs(near - i) <= MINOR_DISTANCE else 0.7,
                                    ws[a][1], ws[b][2], "rule:sexual-near-minor"))
        for h in hits:
            v.raise_score(h.category, h.score)
        v.hits = sorted(hits, key=lambda h: h.start)
        return v


def load_word_file(path) -> dict:
    """A user's block list: one word a line, optionally followed by an OpenAI category (default
    harassment); blank lines and # comments are skipped. Words are normalized like the text."""
    from pathlib import Path

    out = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ModerationError(f"{path}: cannot read the word list ({e})") from None
    for i, line in enumerate(lines, 1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) > 2 or (len(parts) == 2 and parts[1] not in CATEGORIES):
            raise ModerationError(f"{path}:{i}: expected 'WORD [CATEGORY]' with CATEGORY one of {', '.join(CATEGORIES)}")
        normalized = words(parts[0])
        if len(normalized) != 1:
            raise ModerationError(f"{path}:{i}: {parts[0]!r} is not one word")
        out[normalized[0][0]] = ((parts[1] if len(parts) == 2 else "harassment", 0.9),)
    return out
