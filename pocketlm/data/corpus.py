"""Reading raw text: .txt and .jsonl files, directories and globs, into documents.

Errors name the file and line. The train/validation split is by position in the corpus (its last
`val_fraction` of characters), so a single file such as Tiny Shakespeare splits the way nanoGPT does,
and the tokenizer trainer and the shard writer hold out exactly the same text.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from pocketlm.errors import PocketLMError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)


class CorpusError(PocketLMError):
    pass


@dataclass
class Document:
    text: str
    source: str  # "file" or "file:line"


def expand_inputs(inputs) -> list[Path]:
    """Files named directly, every .txt/.md/.jsonl under a directory, or the matches of a glob."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not found:
                raise CorpusError(f"{p}: directory holds no .txt, .md or .jsonl files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True) if Path(m).is_file())
            if not matches:
                raise CorpusError(f"{item}: no such file, directory or glob match")
            files += matches
    return files


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise CorpusError(f"{path}:{line}: invalid UTF-8 at byte {e.start} (expected UTF-8 text)") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def read_file(path: Path, split_blank_lines: bool = False, text_field: str = "text"):
    text = _read_text(path)
    if path.suffix in JSONL_SUFFIXES:
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise CorpusError(f"{path}:{lineno}: expected an object with a {text_field!r} field")
            if not isinstance(record[text_field], str):
                raise CorpusError(f"{path}:{lineno}: field {text_field!r} must be a string, got {type(record[text_field]).__name__}")
            yield Document(record[text_field], f"{path}:{lineno}")
    elif split_blank_lines:
        lineno = 1
        for block in text.split("\n\n"):
            if block.strip():
                yield Document(block.strip("\n"), f"{path}:{lineno}")
            lineno += block.count("\n") + 2
    else:
        yield Document(text, str(path))


def read_documents(inputs, split_blank_lines: bool = False, text_field: str = "text") -> list[Document]:
    docs = [d for f in expand_inputs(inputs) for d in read_file(f, split_blank_lines, text_field) if d.text]
    if not docs:
        raise CorpusError(f"empty corpus: no text found in {', '.join(map(str, inputs))}")
    return docs


def split_train_val(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """The last `val_fraction` of the corpus's characters is validation. The document that straddles
    the cut is split at the line break nearest to it."""
    if not 0.0 <= val_fraction < 1.0:
        raise CorpusError(f"val_fraction: expected a value in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return docs, []
    total = sum(len(d.text) for d in docs)
    cut = int(total * (1 - val_fraction))
    train, val, seen = [], [], 0
    for d in docs:
        if seen + len(d.text) <= cut:
            train.append(d)
        elif seen >= cut:
            val.append(d)
        else:
            at = cut - seen
            nl = d.text.rfind("\n", 0, at)
            at = nl + 1 if nl > 0 else at
            train.append(Document(d.text[:at], d.source))
            val.append(Document(d.text[at:], d.source))
        seen += len(d.text)
    if not val or not any(d.text for d in val):
        raise CorpusError("validation split is empty: the corpus is too small for the requested val_fraction")
    return [d for d in train if d.text], [d for d in val if d.text]


def chunk_for_encoding(text: str, size: int = 1 << 16) -> list[str]:
    """Cut a long text into pieces at a newline followed by a non-space character: no
    pre-tokenization piece spans such a point, so encoding the pieces equals encoding the whole."""
    out, start = [], 0
    while len(text) - start > size:
        at = start + size
        while at < len(text) and not (text[at - 1] == "\n" and not text[at].isspace()):
            at += 1
        out.append(text[start:at])
        start = at
    out.append(text[start:])
    return out
