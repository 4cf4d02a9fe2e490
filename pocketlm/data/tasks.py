"""The resumable pieces of `prepare`: atomic files, the work directory, the scan of each input file.

A task's outputs are written to temporary names, fsynced and renamed; its completion marker (a JSON
file) is written last, so a marker present means every output of the task is complete. A killed run
restarts, finds the markers and redoes only what has none. For the tests, which kill at exact points:
POCKETLM_PREPARE_KILL_AFTER=k makes the process SIGKILL itself right after its k-th completed task, and
POCKETLM_PREPARE_KILL_AT=NAME:committed once task NAME's shards are in place but before its marker.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import signal
from pathlib import Path

import numpy as np

from pocketlm.data.corpus import iter_documents

KILL_ENV = "POCKETLM_PREPARE_KILL_AFTER"
KILL_AT_ENV = "POCKETLM_PREPARE_KILL_AT"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class TokenFile:
    """A shard being written: token ids appended as `dtype`, hashed as they go, renamed into place by
    `commit` (nothing is left behind for an empty split)."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype = path, dtype
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.fh = None
        self.sha = hashlib.sha256()
        self.tokens = 0

    def write(self, ids) -> None:
        if self.fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(self.tmp, "wb")
        data = np.asarray(ids, dtype=self.dtype).tobytes()
        self.fh.write(data)
        self.sha.update(data)
        self.tokens += len(ids)

    def commit(self) -> dict | None:
        if self.fh is None:
            self.path.unlink(missing_ok=True)  # a stale shard of an earlier attempt
            return None
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        return {"tokens": self.tokens, "sha256": self.sha.hexdigest()}


class WorkDir:
    """out/.prepare: the plan this work belongs to, scan results and task markers."""

    def __init__(self, out: Path, plan: dict):
        self.root = out / ".prepare"
        self.plan = plan
        self.completed = 0
        limit = os.environ.get(KILL_ENV)
        self.kill_after = int(limit) if limit else None

    def matches(self) -> bool:
        f = self.root / "plan.json"
        return f.exists() and json.loads(f.read_text()) == json.loads(json.dumps(self.plan, sort_keys=True))

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.root / "plan.json", self.plan)

    def marker(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def done(self, name: str) -> dict | None:
        f = self.marker(name)
        return json.loads(f.read_text()) if f.exists() else None

    def finish(self, name: str, record: dict) -> None:
        if os.environ.get(KILL_AT_ENV) == f"{name}:committed":
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write_json(self.marker(name), record)
        self.completed += 1
        if self.kill_after is not None and self.completed >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


def scan_file(path: Path, split_blank_lines: bool, text_field: str, task_chars: int) -> dict:
    """Count a file's documents and characters (the val cut needs each source's length before any
    shard is written) and cut it into tasks of about `task_chars` characters: [first doc, first char]."""
    docs = chars = 0
    chunks, in_chunk = [[0, 0]], 0
    for d in iter_documents([path], split_blank_lines, text_field):
        if in_chunk >= task_chars:
            chunks.append([docs, chars])
            in_chunk = 0
        docs, chars, in_chunk = docs + 1, chars + len(d.text), in_chunk + len(d.text)
    return {"docs": docs, "chars": chars, "chunks": chunks}


def plan_tasks(scans: list[dict], task_chars: int) -> list[dict]:
    """Group the scanned chunks of a source's files into tasks of about `task_chars` characters, in
    corpus order: a big file's chunks are tasks of their own, consecutive small files share one (so a
    folder of many small files does not become as many tiny shards). A task is a contiguous range of the
    source: {"start": its first character, "segments": [[file, first doc, end doc], ...], "chars": n}."""
    tasks: list[dict] = []
    offset = 0
    for f, scan in enumerate(scans):
        bounds = [c[0] for c in scan["chunks"]] + [scan["docs"]]
        chars = [c[1] for c in scan["chunks"]] + [scan["chars"]]
        for c in range(len(scan["chunks"])):
            if bounds[c + 1] == bounds[c]:
                continue  # a file without documents
            if not tasks or tasks[-1]["chars"] >= task_chars:
                tasks.append({"start": offset + chars[c], "segments": [], "chars": 0})
            tasks[-1]["segments"].append([f, bounds[c], bounds[c + 1]])
            tasks[-1]["chars"] += chars[c + 1] - chars[c]
        offset += scan["chars"]
    return tasks


class FileCursor:
    """Documents of a source's files by (file, first doc, end doc) segments, taken in order: reading
    goes on where the previous segment ended, and a resumed run skips the finished documents once."""

    def __init__(self, files, split_blank_lines: bool, text_field: str):
        self.files, self.split_blank_lines, self.text_field = files, split_blank_lines, text_field
        self.file, self.pos, self.docs = None, 0, iter(())

    def take(self, f: int, first: int, end: int):
        if self.file != f or self.pos > first:
            self.docs = iter_documents([self.files[f]], self.split_blank_lines, self.text_field)
            self.file, self.pos = f, 0
        for _ in itertools.islice(self.docs, first - self.pos):
            pass
        self.pos = end
        return itertools.islice(self.docs, end - first)

    def documents(self, segments):
        return itertools.chain.from_iterable(self.take(*seg) for seg in segments)
