"""The library functions behind `pocketlm user …` and `pocketlm memory …` (typed arguments; the CLI
and the server only parse and call). Each opens the data dir's store, does one thing, closes it."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from pocketlm.memory.store import DB_NAME, MemoryStoreError, Store


@contextmanager
def open_store(data_dir: str | Path, create: bool = False):
    path = Path(data_dir)
    if not create and not (path / DB_NAME).is_file():
        raise MemoryStoreError(f"data_dir: no {DB_NAME} in {path} (create a user first: pocketlm user add NAME "
                               f"--data-dir {path})")
    store = Store(path)
    try:
        yield store
    finally:
        store.close()


def user_add(name: str, data_dir: str | Path, history_days: float = 0) -> str:
    """Create a user; returns its API key (shown once: only a hash is kept). `history_days` is how long
    its conversations are kept (0: not at all)."""
    with open_store(data_dir, create=True) as store:
        return store.user_add(name, history_days=history_days)


def user_erase(name: str, data_dir: str | Path) -> None:
    """Delete a user with all its memories and history; the bytes go from the file and its WAL."""
    with open_store(data_dir) as store:
        store.user_erase(store.user_id(name))


def user_list(data_dir: str | Path) -> list[str]:
    with open_store(data_dir) as store:
        return store.users()


def memory_add(user: str, data_dir: str | Path, text: str, kind: str = "fact") -> dict:
    with open_store(data_dir) as store:
        return store.memory_add(store.user_id(user), text, kind)


def memory_list(user: str, data_dir: str | Path, kind: str | None = None) -> list[dict]:
    with open_store(data_dir) as store:
        return store.memory_list(store.user_id(user), kind=kind)


def memory_edit(user: str, data_dir: str | Path, memory_id: int, text: str | None = None,
                kind: str | None = None, enabled: bool | None = None) -> dict:
    with open_store(data_dir) as store:
        return store.memory_edit(store.user_id(user), memory_id, text=text, kind=kind, enabled=enabled)


def memory_delete(user: str, data_dir: str | Path, memory_id: int) -> dict:
    with open_store(data_dir) as store:
        return store.memory_delete(store.user_id(user), memory_id)


def memory_export(user: str, data_dir: str | Path) -> dict:
    """Everything kept about a user: memories and conversation history, as one JSON-ready dict."""
    with open_store(data_dir) as store:
        return export(store, store.user_id(user))


def export(store: Store, user_id: int) -> dict:
    from pocketlm.memory.adapters import adapter_list

    return {"user": store.user_name(user_id), "exported": time.time(), "history_days": store.history_days(user_id),
            "memories": store.memory_list(user_id), "history": store.history_list(user_id),
            "adapters": [{"name": a["name"], "created": a["created"]} for a in adapter_list(store, user_id)]}
