"""JSON Lines rows with errors that name the file and line: one reader for fine-tuning data and tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator


def iter_jsonl(path: Path, error: type[Exception]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; `error` is raised for a line that is not a JSON object."""
    with open(path, encoding="utf-8") as fh:
        yield from parse_lines(enumerate(fh, 1), path, error)


def parse_lines(lines: Iterable[tuple[int, str]], path, error: type[Exception]) -> Iterator[tuple[int, dict]]:
    """The objects of already-decoded (line number, text) pairs: what iter_jsonl and the corpus reader
    (which decodes compressed streams itself) share."""
    for n, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise error(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        yield n, row
