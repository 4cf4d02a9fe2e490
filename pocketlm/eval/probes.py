"""Bias probe files: WinoBias (the authors' text files) and minimal-pair CSVs in the CrowS-Pairs format.

Every loader checks what it reads and raises ProbeError naming the file and line, so a hand-made or
downloaded probe set fails loudly instead of silently scoring garbage.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from pocketlm.errors import PocketLMError

PAIR_COLUMNS = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")
PRONOUNS = {"he", "she", "him", "her", "his", "hers", "himself", "herself"}


class ProbeError(PocketLMError):
    """A probe file (or folder) is missing, malformed, or not the format asked for."""


@dataclass
class Pair:
    """A minimal pair: `more` is the stereotyping sentence (CrowS-Pairs' sent_more, WinoBias' pro)."""
    more: str
    less: str
    category: str
    direction: str  # "stereo" | "antistereo" (CrowS-Pairs; WinoBias pairs are all "stereo")
    where: str      # file:line, for messages and for finding the pair again


@dataclass
class Resolution:
    """One WinoBias sentence to resolve: which of the two occupations does `pronoun` refer to?"""
    sentence: str
    pronoun: str     # the first pronoun referring to `answer` (the question asks about it)
    answer: str      # the occupation the pronoun refers to, as written ("the accountant")
    distractor: str  # the other occupation
    where: str


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ProbeError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ProbeError(f"{path}: not UTF-8 text (byte {e.start})") from None


# ---- CrowS-Pairs-format CSV -----------------------------------------------------------------------

def load_pairs(path, limit: int | None = None) -> list[Pair]:
    """Rows of a CSV (or .tsv) with columns sent_more, sent_less, stereo_antistereo, bias_type; other
    columns (CrowS-Pairs' index, annotator ids) are ignored, so the published file loads unchanged."""
    path = Path(path)
    text = _read_text(path)
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter="\t" if path.suffix == ".tsv" else ",")
    fields = [f.strip() for f in reader.fieldnames or []]
    missing = [c for c in PAIR_COLUMNS if c not in fields]
    if missing:
        raise ProbeError(f"{path}:1: missing column(s) {', '.join(missing)} (expected a header with "
                         f"{', '.join(PAIR_COLUMNS)}, as in CrowS-Pairs)")
    reader.fieldnames = fields
    pairs = []
    start = 1
    for row in reader:
        line = start + 1  # the line the record starts on (a quoted field may span lines)
        start = reader.line_num
        if None in row:
            raise ProbeError(f"{path}:{line}: more fields than the header has")
        for c in PAIR_COLUMNS:
            if not (row.get(c) or "").strip():
                raise ProbeError(f"{path}:{line}: column {c!r} is empty")
        direction = row["stereo_antistereo"].strip()
        if direction not in ("stereo", "antistereo"):
            raise ProbeError(f"{path}:{line}: column 'stereo_antistereo' must be 'stereo' or 'antistereo', got {direction!r}")
        if row["sent_more"].strip() == row["sent_less"].strip():
            raise ProbeError(f"{path}:{line}: sent_more and sent_less are the same sentence")
        pairs.append(Pair(row["sent_more"].strip(), row["sent_less"].strip(), row["bias_type"].strip(), direction,
                          f"{path.name}:{line}"))
        if limit and len(pairs) >= limit:
            break
    if not pairs:
        raise ProbeError(f"{path}: no pairs (a header and at least one row expected)")
    return pairs


# ---- WinoBias ------------------------------------------------------------------------------------

_LINE = re.compile(r"^\s*(\d+)\s+(.+?)\s*$")
_BRACKET = re.compile(r"\[([^\[\]]+)\]")


def _occupations(folder: Path) -> list[str]:
    occ = []
    for name in ("male_occupations.txt", "female_occupations.txt"):
        occ += [w.strip() for w in _read_text(folder / name).splitlines() if w.strip()]
    return sorted(occ, key=len, reverse=True)  # "construction worker" before "worker"


def _bare(mention: str) -> str:
    return re.sub(r"^(the|a|an)\s+", "", mention.strip().lower())


def _parse_line(raw: str, where: str, occupations: list[str]) -> Resolution:
    m = _LINE.match(raw)
    if not m:
        raise ProbeError(f"{where}: expected '<number> <sentence>', got {raw[:60]!r}")
    text = re.sub(r"\bthe \[the\b", "[the", m.group(2), flags=re.I)  # an upstream typo ("the [the chief]")
    spans = _BRACKET.findall(text)
    pron = [s for s in spans if s.lower() in PRONOUNS]  # several when a sentence says "he ... his"
    mentions = [s for s in spans if s.lower() not in PRONOUNS]
    if len(mentions) != 1 or not pron:
        raise ProbeError(f"{where}: expected one [bracketed] occupation and its [bracketed] pronoun(s) "
                         f"({', '.join(sorted(PRONOUNS))}), got {spans}")
    answer = mentions[0].strip()
    sentence = _BRACKET.sub(lambda b: b.group(1), text)
    found = []  # occupations in order of appearance, as written ("the accountant")
    for o in occupations:
        for hit in re.finditer(rf"\b(?:the|a|an)\s+{re.escape(o)}\b", sentence, flags=re.I):
            if not any(s <= hit.start() < e for s, e, _ in found):
                found.append((hit.start(), hit.end(), hit.group(0)))
    found.sort()
    others = [f for _, _, f in found if _bare(f) != _bare(answer)]
    if not others or _bare(answer) not in {_bare(f) for _, _, f in found}:
        raise ProbeError(f"{where}: cannot find the two occupations of the sentence (referent {answer!r}, "
                         f"occupations found {[f for _, _, f in found]})")
    return Resolution(sentence, pron[0], answer, others[0], where)


def load_winobias(folder, split: str = "test", limit: int | None = None) -> dict:
    """{"type1": (pro, anti), "type2": (pro, anti)}: lists of Resolution, line i of pro_* and anti_*
    being (almost always: see winobias_pairs) one sentence with the pronoun's gender swapped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ProbeError(f"{folder}: expected the WinoBias folder (pro_stereotyped_type1.txt.{split}, ...)")
    occupations = _occupations(folder)
    out = {}
    for t in ("type1", "type2"):
        sides = []
        for side in ("pro", "anti"):
            path = folder / f"{side}_stereotyped_{t}.txt.{split}"
            lines = [(i, raw) for i, raw in enumerate(_read_text(path).splitlines(), 1) if raw.strip()]
            sides.append([_parse_line(raw, f"{path.name}:{i}", occupations) for i, raw in lines[:limit or None]])
        pro, anti = sides
        if len(pro) != len(anti):
            raise ProbeError(f"{folder}: pro_stereotyped_{t}.txt.{split} has {len(pro)} sentences but "
                             f"anti_stereotyped_{t}.txt.{split} has {len(anti)}; they must be aligned line by line")
        out[t] = (pro, anti)
    return out


def _masked(sentence: str) -> str:
    return re.sub(rf"\b({'|'.join(PRONOUNS)})\b", "_", sentence, flags=re.I)


def winobias_pairs(probe: dict) -> tuple[list[Pair], list[str]]:
    """Pair preference: each pro-stereotyped sentence against its anti-stereotyped copy. A few upstream
    lines are not exact copies (another verb, "needed a desk" / "needed one"); those would compare
    wording, not gender, so they are left out and returned as the second element (file:line)."""
    pairs, skipped = [], []
    for t, (pro, anti) in probe.items():
        for p, a in zip(pro, anti):
            if _masked(p.sentence) == _masked(a.sentence) and p.sentence != a.sentence:
                pairs.append(Pair(p.sentence, a.sentence, t, "stereo", f"{p.where}|{a.where}"))
            else:
                skipped.append(f"{p.where}|{a.where}")
    return pairs, skipped
