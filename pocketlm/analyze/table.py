"""Tables in and out of `pocketlm analyze`: CSV, TSV, JSONL and Parquet in; CSV, TSV or JSONL out.

A table is its column names (in file order) and its rows (dicts, values as the file gives them:
strings from CSV/TSV, JSON values from JSONL, Python values from Parquet). Errors name the file and
the line (or record) that is wrong."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pocketlm.data.jsonl import iter_jsonl
from pocketlm.errors import PocketLMError

READS = (".csv", ".tsv", ".jsonl", ".parquet")
WRITES = (".csv", ".tsv", ".jsonl")


class TableError(PocketLMError):
    pass


@dataclass
class Table:
    path: Path
    columns: list[str]
    rows: list[dict]

    def column(self, name: str, what: str = "column") -> list:
        self.check_columns([name], what)
        return [r.get(name) for r in self.rows]

    def check_columns(self, names, what: str = "column") -> None:
        for name in names:
            if name not in self.columns:
                raise TableError(f"{what} {name!r} is not a column of {self.path}; its columns are: "
                                 f"{', '.join(self.columns)}")


def read_table(path, limit: int | None = None) -> Table:
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in READS:
        raise TableError(f"{path}: unsupported file type {suffix!r} (expected {', '.join(READS)})")
    if suffix == ".parquet":
        columns, rows = _read_parquet(path)
    elif suffix == ".jsonl":
        columns, rows = _read_jsonl(path, limit)
    else:
        columns, rows = _read_delimited(path, "\t" if suffix == ".tsv" else ",", limit)
    if not rows:
        raise TableError(f"{path}: no rows")
    return Table(path, columns, rows[:limit] if limit else rows)


def _read_parquet(path: Path):
    import pyarrow
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(path)
    except (pyarrow.ArrowInvalid, OSError) as e:
        raise TableError(f"{path}: not a readable Parquet file ({e})") from None
    return list(t.column_names), t.to_pylist()


def _read_jsonl(path: Path, limit):
    columns: dict[str, None] = {}  # every key any row has, in first-seen order
    rows = []
    for _, row in iter_jsonl(path, TableError):
        columns.update(dict.fromkeys(row))
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    return list(columns), rows


def _read_delimited(path: Path, delimiter: str, limit):
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: drop the byte-order mark spreadsheets write
    except UnicodeDecodeError as e:
        raise TableError(f"{path}: not UTF-8 text (byte {e.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if not header:
            raise TableError(f"{path}: empty file (expected a header row)")
        header = [h.strip() for h in header]
        dup = next((h for h in header if header.count(h) > 1), None)
        if dup is not None:
            raise TableError(f"{path}:1: column {dup!r} appears twice in the header")
        rows, start = [], reader.line_num + 1
        for values in reader:
            if values:
                if len(values) != len(header):
                    raise TableError(f"{path}:{start}: {len(values)} fields, the header has {len(header)} "
                                     f"({', '.join(header)})")
                rows.append(dict(zip(header, values)))
                if limit and len(rows) >= limit:
                    break
            start = reader.line_num + 1
    except csv.Error as e:
        raise TableError(f"{path}:{reader.line_num}: {e}") from None
    return header, rows


def cell(value) -> str:
    """A value as one CSV cell: strings as they are, None empty, anything else as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one: temp file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_table(path, columns: list[str], rows: list[dict]) -> None:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITES:
        raise TableError(f"{path}: unsupported output type {suffix!r} (expected {', '.join(WRITES)})")
    buf = io.StringIO(newline="")
    if suffix == ".jsonl":
        for r in rows:
            buf.write(json.dumps({c: r.get(c) for c in columns}, ensure_ascii=False) + "\n")
    else:
        w = csv.writer(buf, delimiter="\t" if suffix == ".tsv" else ",", lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([cell(r.get(c)) for c in columns])
    write_atomic(path, buf.getvalue())
