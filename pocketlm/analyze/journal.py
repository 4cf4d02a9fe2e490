"""The append-only journal that makes `analyze` resumable.

Line 1 is the run's fingerprint (model, adapter, prompt, schema, sampling, ...); each later line is
one whole batch of row results, written with a single write and fsynced. A kill -9 can only tear the
last line, which resuming drops (so at most one batch is redone); rows are always batched the same
way, so a redone batch computes exactly what it would have the first time."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pocketlm.analyze.table import write_atomic
from pocketlm.errors import PocketLMError


class JournalError(PocketLMError):
    pass


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


class Journal:
    def __init__(self, path, fingerprint: dict, resume: bool):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.done: dict[int, dict] = {}  # row index -> its result
        if resume and self.path.exists():
            self._load()
        else:
            write_atomic(self.path, json.dumps({"fingerprint": fingerprint}, ensure_ascii=False) + "\n")

    def _load(self) -> None:
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        try:
            header = json.loads(lines[0])["fingerprint"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise JournalError(f"{self.path}:1: not an analyze journal (no fingerprint line)") from None
        for key in sorted(set(header) | set(self.fingerprint)):
            if header.get(key) != self.fingerprint.get(key):
                raise JournalError(
                    f"{self.path}: cannot resume, the {key} differs from the interrupted run's "
                    f"(journal: {_short(header.get(key))}, now: {_short(self.fingerprint.get(key))}); "
                    "run without resume to start over")
        good = len(lines[0]) + 1
        for n, line in enumerate(lines[1:], 2):
            if not line.endswith(b"}"):  # the torn last write of a killed run (or the final empty piece)
                break
            try:
                batch = json.loads(line)
            except json.JSONDecodeError:
                break
            for rec in batch["rows"]:
                self.done[rec["row"]] = rec
            good += len(line) + 1
        if good < len(raw):  # cut the torn tail so the next append starts on a fresh line
            with open(self.path, "r+b") as fh:
                fh.truncate(good)
                fh.flush()
                os.fsync(fh.fileno())

    def append(self, records: list[dict]) -> None:
        line = json.dumps({"rows": records}, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        for rec in records:
            self.done[rec["row"]] = rec
