"""Grounded answers: the model answers from numbered passages, cites them as [n], and says a fixed
phrase (ABSTAIN) when they do not contain the answer.

    documents -> passages (paragraphs, long ones cut at ~MAX_WORDS words)
              -> the top-k for the question by BM25 (SQLite FTS5, as pocketlm.memory retrieves)
              -> one system block numbering them [1]..[k] (grounded_messages)
              -> the reply: "ANSWER [n]" or ABSTAIN; cited(), answer_text() and is_abstention() read it

The same block is what the fine-tuning recipe (grounded_data.py, configs/finetune_grounded.yaml)
trains on, so a model taught the format sees at inference exactly what it saw in training. Used by
`pocketlm generate/chat --documents DIR` and by the server (a `documents` field on chat
completions, or `serve --documents DIR`).
"""

from __future__ import annotations

import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from pocketlm.errors import InputError
from pocketlm.memory.retrieval import fts_query, with_block

ABSTAIN = "I don't know: the documents do not say."
INSTRUCTION = ("Answer the question using only the numbered passages below, and cite the passage you used as [n]. "
               f"If the passages do not contain the answer, reply exactly: {ABSTAIN}")
NO_PASSAGES = "(No passage matches the question.)"
MAX_WORDS = 200    # a SQuAD paragraph (~120-150 words) stays whole; a long section is cut into pieces
TOP_K = 3          # three ~180-token passages and the question fit SmolLM2's context with room to answer
SUFFIXES = (".txt", ".md", ".rst")
_CITE = re.compile(r"\[(\d+)\]")


class GroundingError(InputError):
    pass


@dataclass(frozen=True)
class Passage:
    text: str
    source: str  # the document it came from: a file's path in --documents, or "0", "1"... in a request


def split_passages(text: str, source: str, max_words: int = MAX_WORDS) -> list[Passage]:
    """A document's paragraphs (blank-line separated), each cut into pieces of at most max_words words."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        words = para.split()
        for i in range(0, len(words), max_words):
            out.append(Passage(" ".join(words[i:i + max_words]), source))
    return out


def passages_from(documents, max_words: int = MAX_WORDS) -> list[Passage]:
    """Request documents: strings, or {"text", "title"?} dicts -> passages (source: title, else the index)."""
    out = []
    for i, doc in enumerate(documents):
        text, title = (doc, None) if isinstance(doc, str) else (doc.get("text"), doc.get("title"))
        if not isinstance(text, str):
            raise GroundingError(f"documents[{i}]: expected a string or an object with a 'text' string")
        out += split_passages(text, title or str(i), max_words)
    return out


def load_documents(folder, max_words: int = MAX_WORDS) -> list[Passage]:
    """The passages of every .txt/.md/.rst file under `folder` (sources: paths relative to it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GroundingError(f"{folder}: --documents expects a folder of {'/'.join(SUFFIXES)} files")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise GroundingError(f"{folder}: no {'/'.join(SUFFIXES)} files in it")
    out = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise GroundingError(f"{f}: not UTF-8 text (byte {e.start})") from None
        out += split_passages(text, str(f.relative_to(folder)), max_words)
    return out


class Index:
    """BM25 over passages in an in-memory FTS5 table (porter stemming, as the memory store)."""

    def __init__(self, passages: list[Passage]):
        self.passages = list(passages)
        self._db = sqlite3.connect(":memory:", check_same_thread=False)  # the server searches from its pool
        self._lock = threading.Lock()
        self._db.execute("CREATE VIRTUAL TABLE p USING fts5(text, tokenize='porter unicode61')")
        self._db.executemany("INSERT INTO p(rowid, text) VALUES (?, ?)", ((i, p.text) for i, p in enumerate(self.passages)))

    def search(self, query: str, k: int = TOP_K) -> list[Passage]:
        """The k best passages for `query`, best first; [] when no content word of it occurs."""
        q = fts_query(query)
        if not q:
            return []
        with self._lock:
            rows = self._db.execute("SELECT rowid FROM p WHERE p MATCH ? ORDER BY bm25(p) LIMIT ?", (q, k)).fetchall()
        return [self.passages[r] for (r,) in rows]


def block(passages: list[Passage]) -> str:
    """The system block: the instruction, then the passages numbered from 1."""
    body = "\n\n".join(f"[{n}] {p.text}" for n, p in enumerate(passages, 1)) or NO_PASSAGES
    return f"{INSTRUCTION}\n\n{body}"


def last_user_text(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def grounded_messages(messages: list[dict], index: Index, k: int = TOP_K) -> tuple[list[dict], list[Passage]]:
    """(the messages with the passages for the last user turn as a system block, those passages)."""
    found = index.search(last_user_text(messages), k)
    return with_block(messages, block(found)), found


def cited(reply: str) -> list[int]:
    """The passage numbers a reply cites, in order, each once."""
    return list(dict.fromkeys(int(n) for n in _CITE.findall(reply)))


def answer_text(reply: str) -> str:
    """The reply without its citations."""
    return " ".join(_CITE.sub(" ", reply).split())


def is_abstention(reply: str) -> bool:
    start = reply.strip().lower().replace("\u2019", "'")
    return start.startswith(("i don't know", "i do not know"))


def sources(passages: list[Passage]) -> list[dict]:
    """What a client needs to show the citations: each passage with its number."""
    return [{"index": n, "source": p.source, "text": p.text} for n, p in enumerate(passages, 1)]
