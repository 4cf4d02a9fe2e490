"""Reading raw text as a stream of documents: .txt/.md, .jsonl (plain, .gz, .zst) and Parquet files,
directories and globs.

Files are read one line (or, for Parquet, one row group) at a time, so memory holds at most one
document, never the corpus; the only exception is a .txt file without `split_blank_lines`, which is one
document by definition. Errors name the file and line (row, for Parquet).

The train/validation split is by position in the corpus (its last `val_fraction` of characters), so a
single file such as Tiny Shakespeare splits the way nanoGPT does, and the tokenizer trainer and the shard
writer hold out exactly the same text. `prepare` applies the same rule to each source of a mixture.
"""

from __future__ import annotations

import glob
import gzip
import io
from dataclasses import dataclass
from pathlib import Path

from pocketlm.data.jsonl import parse_lines
from pocketlm.errors import PocketLMError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
READABLE = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


class CorpusError(PocketLMError):
    pass


@dataclass
class Document:
    text: str
    source: str  # "file", "file:line" or "file:row N"


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in READABLE if name.endswith(s)), None)


def expand_inputs(inputs) -> list[Path]:
    """Files named directly, every readable file under a directory (sorted), or the matches of a glob."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f))
            if not found:
                raise CorpusError(f"{p}: directory holds no {', '.join(READABLE)} files")
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


def _open_binary(path: Path):
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True,
                                                                                read_across_frames=True))
    return open(path, "rb")


def _check_text(value, where: str, text_field: str) -> str:
    if not isinstance(value, str):
        raise CorpusError(f"{where}: field {text_field!r} must be a string, got {type(value).__name__}")
    return value


def _read_jsonl(path: Path, text_field: str):
    def decoded(fh):
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start} of the line") from None
            yield lineno, line.removeprefix("\ufeff") if lineno == 1 else line

    with _open_binary(path) as fh:
        try:
            for lineno, record in parse_lines(decoded(fh), path, CorpusError):
                if text_field not in record:
                    raise CorpusError(f"{path}:{lineno}: expected an object with a {text_field!r} field")
                yield Document(_check_text(record[text_field], f"{path}:{lineno}", text_field), f"{path}:{lineno}")
        except (OSError, EOFError) as e:  # truncated or corrupt gzip/zstd stream
            raise CorpusError(f"{path}: cannot decompress ({e})") from None


def _read_parquet(path: Path, text_field: str):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a file that is not Parquet
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise CorpusError(f"{path}: no column {text_field!r} (columns: {', '.join(names)})")
    row = 0
    for g in range(pf.num_row_groups):  # one row group in memory at a time
        for value in pf.read_row_group(g, columns=[text_field]).column(0).to_pylist():
            row += 1
            if value is not None:
                yield Document(_check_text(value, f"{path}:row {row}", text_field), f"{path}:row {row}")


def read_file(path: Path, split_blank_lines: bool = False, text_field: str = "text"):
    path = Path(path)
    kind = _kind(path)
    if kind in JSONL_SUFFIXES:
        yield from _read_jsonl(path, text_field)
    elif kind in PARQUET_SUFFIXES:
        yield from _read_parquet(path, text_field)
    elif split_blank_lines:
        lineno = 1
        for block in _read_text(path).split("\n\n"):
            if block.strip():
                yield Document(block.strip("\n"), f"{path}:{lineno}")
            lineno += block.count("\n") + 2
    else:
        yield Document(_read_text(path), str(path))


def iter_documents(files, split_blank_lines: bool = False, text_field: str = "text"):
    """The non-empty documents of `files`, in order, as a stream."""
    for f in files:
        yield from (d for d in read_file(f, split_blank_lines, text_field) if d.text)


def read_documents(inputs, split_blank_lines: bool = False, text_field: str = "text") -> list[Document]:
    docs = list(iter_documents(expand_inputs(inputs), split_blank_lines, text_field))
    if not docs:
        raise CorpusError(f"empty corpus: no text found in {', '.join(map(str, inputs))}")
    return docs


def split_at(text: str, at: int) -> int:
    """Where a document straddling the train/val cut `at` characters in is split: the line break
    nearest before it (or the cut itself when there is none)."""
    nl = text.rfind("\n", 0, at)
    return nl + 1 if nl > 0 else at


def val_cut(total_chars: int, val_fraction: float) -> int:
    if not 0.0 <= val_fraction < 1.0:
        raise CorpusError(f"val_fraction: expected a value in [0, 1), got {val_fraction}")
    return total_chars if val_fraction == 0 else int(total_chars * (1 - val_fraction))


def split_train_val(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """The last `val_fraction` of the corpus's characters is validation. The document that straddles
    the cut is split at the line break nearest to it."""
    cut = val_cut(sum(len(d.text) for d in docs), val_fraction)
    if val_fraction == 0:
        return docs, []
    train, val, seen = [], [], 0
    for d in docs:
        if seen + len(d.text) <= cut:
            train.append(d)
        elif seen >= cut:
            val.append(d)
        else:
            at = split_at(d.text, cut - seen)
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
