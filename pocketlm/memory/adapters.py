"""Per-user LoRA adapters (`pocketlm finetune --user U`): registered in the user's rows of the store,
their files under DATA_DIR/adapters/u<id>/<name>/, served only to that user's key (and the admin's on
its behalf), and erased with the user: the files are overwritten with zeros, synced, then unlinked.

(Overwriting is what a file system lets a program do; a copy-on-write or journaling file system, or
an SSD's remapping, may keep old blocks the program cannot reach. The database side is exact.)
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from pocketlm.memory.store import MemoryStoreError, Store

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class UnknownAdapter(MemoryStoreError):
    pass


def check_adapter_name(name) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise MemoryStoreError(f"adapter name: expected 1-64 letters, digits, '.', '_' or '-' (starting with a "
                               f"letter or digit), got {name!r}")
    return name


def adapter_dir(store: Store, user_id: int, name: str) -> Path:
    """Where a user's adapter run lives (one folder per user, so an erase takes it whole)."""
    return store.dir / "adapters" / f"u{user_id}" / check_adapter_name(name)


def adapter_register(store: Store, user_id: int, name: str, path: str | Path) -> dict:
    """Record (or replace) the user's adapter `name` at `path` (a PEFT folder)."""
    check_adapter_name(name)
    with store._tx() as db:
        store._require_user(db, user_id)
        db.execute("INSERT INTO adapters(user_id, name, path, created) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT(user_id, name) DO UPDATE SET path = excluded.path, created = excluded.created",
                   (user_id, name, str(path), time.time()))
    return adapter_get(store, user_id, name)


def adapter_get(store: Store, user_id: int, name: str) -> dict:
    with store._lock:
        r = store._db.execute("SELECT name, path, created FROM adapters WHERE user_id = ? AND name = ?",
                              (user_id, name)).fetchone()
    if r is None:
        raise UnknownAdapter(f"adapter: the user has no adapter named {name!r}")
    return {"name": r[0], "path": r[1], "created": r[2]}


def adapter_list(store: Store, user_id: int) -> list[dict]:
    with store._lock:
        rows = store._db.execute("SELECT name, path, created FROM adapters WHERE user_id = ? ORDER BY name",
                                 (user_id,)).fetchall()
    return [{"name": n, "path": p, "created": c} for n, p, c in rows]


def shred_file(path: Path) -> None:
    """Overwrite a file with zeros, sync, unlink."""
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.write(b"\0" * size)
        fh.flush()
        os.fsync(fh.fileno())
    path.unlink()


def shred(folder: Path) -> None:
    """shred_file every file under `folder`, then delete the folder."""
    if not folder.exists():
        return
    for root, _, files in os.walk(folder):
        for f in files:
            path = Path(root) / f
            if not path.is_symlink():
                shred_file(path)
    shutil.rmtree(folder)
