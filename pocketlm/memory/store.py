"""The per-user store: users (API keys kept hashed), memories with an FTS5 index, conversation history.

One SQLite file under the data dir (stdlib sqlite3, WAL). Every method that reads or writes a user's rows
takes that user's id and puts it in the WHERE clause: there is no way to reach a memory by its id alone.

Erase means erased: `secure_delete` zeroes freed cells and pages; the FTS5 index is external-content
(it keeps no copy of the text, only terms) and is merged with 'optimize' after every delete, which
drops the deleted rows' terms; the WAL is then checkpointed with TRUNCATE so no old page image lingers.
(SQLite 3.40 here has no contentless_delete tables; 'optimize' does the same job.)
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
import time
from pathlib import Path

from pocketlm.errors import PocketLMError

DB_NAME = "pocketlm.db"
KINDS = ("preference", "fact", "instruction")
MAX_TEXT = 2000  # characters of one memory: a note, not a document
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
KEY_PREFIX = "plm-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users(
  id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, key_hash TEXT NOT NULL UNIQUE,
  history_days REAL NOT NULL DEFAULT 0, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS memories(
  id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  text TEXT NOT NULL, kind TEXT NOT NULL CHECK (kind IN ('preference','fact','instruction')),
  enabled INTEGER NOT NULL DEFAULT 1, slot TEXT, created REAL NOT NULL, updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS memories_user ON memories(user_id);
CREATE UNIQUE INDEX IF NOT EXISTS memories_slot ON memories(user_id, slot) WHERE slot IS NOT NULL;
CREATE VIRTUAL TABLE IF NOT EXISTS memories_fts USING fts5(
  text, content='memories', content_rowid='id', tokenize='porter unicode61');
CREATE TRIGGER IF NOT EXISTS memories_ai AFTER INSERT ON memories BEGIN
  INSERT INTO memories_fts(rowid, text) VALUES (new.id, new.text); END;
CREATE TRIGGER IF NOT EXISTS memories_ad AFTER DELETE ON memories BEGIN
  INSERT INTO memories_fts(memories_fts, rowid, text) VALUES ('delete', old.id, old.text); END;
CREATE TRIGGER IF NOT EXISTS memories_au AFTER UPDATE OF text ON memories BEGIN
  INSERT INTO memories_fts(memories_fts, rowid, text) VALUES ('delete', old.id, old.text);
  INSERT INTO memories_fts(rowid, text) VALUES (new.id, new.text); END;
CREATE TABLE IF NOT EXISTS history(
  id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  conversation TEXT NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS history_user ON history(user_id, created);
CREATE TABLE IF NOT EXISTS adapters(
  id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  name TEXT NOT NULL, path TEXT NOT NULL, created REAL NOT NULL, UNIQUE(user_id, name));
"""
_MEMORY_COLS = "id, text, kind, enabled, created, updated"


class MemoryStoreError(PocketLMError):
    """A field given to the store (a user name, a memory's text or kind, an id) is wrong."""


class UnknownUser(MemoryStoreError):
    pass


class UnknownMemory(MemoryStoreError):
    pass


class UserExists(MemoryStoreError):
    pass


def hash_key(key: str) -> str:
    # keys are 256-bit random tokens: a plain sha256 is enough (no dictionary to attack, unlike passwords)
    return hashlib.sha256(key.encode()).hexdigest()


def check_user_name(name) -> str:
    if not isinstance(name, str) or not USER_NAME.fullmatch(name):
        raise MemoryStoreError(f"user: expected 1-64 letters, digits, '_', '.' or '-' (starting with a letter or "
                               f"digit), got {name!r}")
    return name


def check_text(text, field: str = "text") -> str:
    if not isinstance(text, str) or not text.strip():
        raise MemoryStoreError(f"{field}: expected a non-empty string, got {text!r}")
    text = text.strip()
    if len(text) > MAX_TEXT:
        raise MemoryStoreError(f"{field}: at most {MAX_TEXT} characters, got {len(text)}")
    return text


def check_kind(kind) -> str:
    if kind not in KINDS:
        raise MemoryStoreError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    return kind


def check_id(memory_id) -> int:
    if isinstance(memory_id, bool) or not isinstance(memory_id, int) or memory_id < 1:
        raise MemoryStoreError(f"id: expected a positive integer, got {memory_id!r}")
    return memory_id


def _row(r) -> dict:
    return {"id": r[0], "text": r[1], "kind": r[2], "enabled": bool(r[3]), "created": r[4], "updated": r[5]}


class Store:
    """One connection, serialized by a lock: the server's threads and the event loop share it, and a
    single writer is what SQLite wants anyway. Use as a context manager or call close()."""

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise MemoryStoreError(f"data_dir: {self.dir} is not a directory")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = self.dir / DB_NAME
        # keys' hashes and users' notes are the owner's only; SQLite gives the -wal file the same mode
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=10, check_same_thread=False, isolation_level=None)
        # temp_store: sorts and temp tables stay in memory, never in a temp file on disk
        for pragma in ("journal_mode=WAL", "secure_delete=ON", "foreign_keys=ON", "synchronous=FULL",
                       "temp_store=MEMORY"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.executescript(_SCHEMA)
        # key checks run on the server's event loop: a second connection (WAL readers never wait for
        # the writer) so they do not queue behind a delete's FTS merge and checkpoint
        self._reader = sqlite3.connect(self.path, timeout=10, check_same_thread=False, isolation_level=None)
        self._reader_lock = threading.Lock()

    def close(self):
        with self._lock, self._reader_lock:
            self._reader.close()
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- transactions ----------------------------------------------------------------------------
    def _tx(self):
        store = self

        class _Tx:
            def __enter__(self):
                store._lock.acquire()
                store._db.execute("BEGIN IMMEDIATE")
                return store._db

            def __exit__(self, et, e, tb):
                try:
                    store._db.execute("ROLLBACK" if et else "COMMIT")
                finally:
                    store._lock.release()
        return _Tx()

    def _scrub(self):
        """After a delete: rebuild the FTS segments without the deleted rows, then fold the WAL into
        the file and truncate it, so the text's bytes are in neither."""
        with self._tx() as db:
            db.execute("INSERT INTO memories_fts(memories_fts) VALUES ('optimize')")
        for _ in range(50):
            with self._lock:
                busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                return True
            time.sleep(0.02)  # another process is reading a snapshot: wait for it to finish
        return False  # still busy after a second: the next delete's checkpoint completes this one

    # ---- users -----------------------------------------------------------------------------------
    def user_add(self, name: str, history_days: float = 0) -> str:
        check_user_name(name)
        if not isinstance(history_days, (int, float)) or isinstance(history_days, bool) or history_days < 0:
            raise MemoryStoreError(f"history_days: expected a number >= 0, got {history_days!r}")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise UserExists(f"user: {name!r} exists already (erase it first, or pick another name)")
            db.execute("INSERT INTO users(name, key_hash, history_days, created) VALUES (?, ?, ?, ?)",
                       (name, hash_key(key), float(history_days), time.time()))
        return key

    def user_id(self, name: str) -> int:
        check_user_name(name)
        with self._lock:
            r = self._db.execute("SELECT id FROM users WHERE name = ?", (name,)).fetchone()
        if r is None:
            raise UnknownUser(f"user: no user named {name!r}")
        return r[0]

    def user_name(self, user_id: int) -> str:
        return self._user_field(user_id, "name")

    def _user_field(self, user_id: int, column: str):
        with self._lock:
            r = self._db.execute(f"SELECT {column} FROM users WHERE id = ?", (user_id,)).fetchone()
        if r is None:
            raise UnknownUser(f"user: no user with id {user_id}")
        return r[0]

    def users(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT name FROM users ORDER BY name")]

    def authenticate(self, key: str) -> int | None:
        """The user id a key belongs to, or None."""
        found = self.authenticate_user(key)
        return found[0] if found else None

    def authenticate_user(self, key: str) -> tuple[int, str] | None:
        """(user id, name) of the user a key belongs to, or None."""
        if not isinstance(key, str) or not key.startswith(KEY_PREFIX):
            return None
        digest = hash_key(key)
        with self._reader_lock:
            # fetchall: the statement runs to its end, so no read snapshot outlives the call
            rows = self._reader.execute("SELECT id, name, key_hash FROM users WHERE key_hash = ?", (digest,)).fetchall()
        r = rows[0] if rows else None
        # the lookup is by hash (a timing difference there says nothing about the key); compare anyway
        return (r[0], r[1]) if r is not None and hmac.compare_digest(r[2], digest) else None

    def user_erase(self, user_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM memories WHERE user_id = ?", (user_id,))  # fires the FTS delete trigger
            db.execute("DELETE FROM history WHERE user_id = ?", (user_id,))
            db.execute("DELETE FROM adapters WHERE user_id = ?", (user_id,))
            if db.execute("DELETE FROM users WHERE id = ?", (user_id,)).rowcount == 0:
                raise UnknownUser(f"user: no user with id {user_id}")
        self._scrub()
        from pocketlm.memory.adapters import shred

        shred(self.dir / "adapters" / f"u{user_id}")  # its fine-tuned adapters (pocketlm finetune --user)

    # ---- memories --------------------------------------------------------------------------------
    def memory_add(self, user_id: int, text: str, kind: str = "fact", *, enabled: bool = True,
                   slot: str | None = None) -> dict:
        text, kind = check_text(text), check_kind(kind)
        now = time.time()
        with self._tx() as db:
            self._require_user(db, user_id)
            cur = db.execute("INSERT INTO memories(user_id, text, kind, enabled, slot, created, updated) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", (user_id, text, kind, int(bool(enabled)), slot, now, now))
            return self._get(db, user_id, cur.lastrowid)

    def memory_get(self, user_id: int, memory_id: int) -> dict:
        check_id(memory_id)
        with self._lock:
            return self._get(self._db, user_id, memory_id)

    def memory_list(self, user_id: int, kind: str | None = None, enabled: bool | None = None) -> list[dict]:
        sql, args = f"SELECT {_MEMORY_COLS} FROM memories WHERE user_id = ?", [user_id]
        if kind is not None:
            sql, args = sql + " AND kind = ?", args + [check_kind(kind)]
        if enabled is not None:
            sql, args = sql + " AND enabled = ?", args + [int(bool(enabled))]
        with self._lock:
            self._require_user(self._db, user_id)
            return [_row(r) for r in self._db.execute(sql + " ORDER BY id", args)]

    def memory_by_slot(self, user_id: int, slot: str) -> dict | None:
        with self._lock:
            r = self._db.execute(f"SELECT {_MEMORY_COLS} FROM memories WHERE user_id = ? AND slot = ?",
                                 (user_id, slot)).fetchone()
        return _row(r) if r else None

    def memory_edit(self, user_id: int, memory_id: int, *, text: str | None = None, kind: str | None = None,
                    enabled: bool | None = None) -> dict:
        check_id(memory_id)
        sets, args = [], []
        if text is not None:
            sets, args = sets + ["text = ?"], args + [check_text(text)]
        if kind is not None:
            sets, args = sets + ["kind = ?"], args + [check_kind(kind)]
        if enabled is not None:
            if not isinstance(enabled, bool):
                raise MemoryStoreError(f"enabled: expected true or false, got {enabled!r}")
            sets, args = sets + ["enabled = ?"], args + [int(enabled)]
        if not sets:
            raise MemoryStoreError("text, kind, enabled: give at least one field to change")
        with self._tx() as db:
            old = self._get(db, user_id, memory_id)
            db.execute(f"UPDATE memories SET {', '.join(sets)}, updated = ? WHERE id = ? AND user_id = ?",
                       args + [time.time(), memory_id, user_id])
            new = self._get(db, user_id, memory_id)
        if new["text"] != old["text"]:
            self._forget_history(user_id, old["text"])
            self._scrub()  # the old wording goes as a delete would
        return new

    def memory_delete(self, user_id: int, memory_id: int) -> dict:
        check_id(memory_id)
        with self._tx() as db:
            old = self._get(db, user_id, memory_id)
            db.execute("DELETE FROM memories WHERE id = ? AND user_id = ?", (memory_id, user_id))
        self._forget_history(user_id, old["text"])
        self._scrub()
        return old

    def search(self, user_id: int, query: str, k: int = 5, kinds=KINDS, enabled_only: bool = True) -> list[dict]:
        """The user's (enabled) memories matching an FTS5 query, best BM25 first. (BM25's term statistics
        are the whole index's; they order this user's rows but return nothing of anyone else's.)"""
        if not query:
            return []
        marks = ",".join("?" * len(kinds))
        sql = (f"SELECT m.id, m.text, m.kind, m.enabled, m.created, m.updated, bm25(memories_fts) AS score "
               f"FROM memories_fts JOIN memories m ON m.id = memories_fts.rowid "
               f"WHERE memories_fts MATCH ? AND m.user_id = ? AND m.enabled >= ? AND m.kind IN ({marks}) "
               f"ORDER BY score LIMIT ?")
        with self._lock:
            rows = self._db.execute(sql, [query, user_id, int(enabled_only), *kinds, k]).fetchall()
        return [dict(_row(r), score=r[6]) for r in rows]

    def _require_user(self, db, user_id: int):
        if db.execute("SELECT 1 FROM users WHERE id = ?", (user_id,)).fetchone() is None:
            raise UnknownUser(f"user: no user with id {user_id}")

    def _get(self, db, user_id: int, memory_id: int) -> dict:
        r = db.execute(f"SELECT {_MEMORY_COLS} FROM memories WHERE id = ? AND user_id = ?",
                       (memory_id, user_id)).fetchone()
        if r is None:  # someone else's id reads exactly as a missing one
            raise UnknownMemory(f"id: user has no memory {memory_id}")
        return _row(r)

    # ---- conversation history --------------------------------------------------------------------
    def history_days(self, user_id: int) -> float:
        return self._user_field(user_id, "history_days")

    def set_history_days(self, user_id: int, days: float) -> None:
        if not isinstance(days, (int, float)) or isinstance(days, bool) or days < 0:
            raise MemoryStoreError(f"history_days: expected a number >= 0 (0 keeps no history), got {days!r}")
        with self._tx() as db:
            self._require_user(db, user_id)
            db.execute("UPDATE users SET history_days = ? WHERE id = ?", (float(days), user_id))
        self.history_prune(user_id)

    def history_add(self, user_id: int, conversation: str, role: str, content: str, *more: tuple[str, str]) -> bool:
        """Keep a message (and any further (role, content) pairs, in the same transaction, so a reader never
        sees half a turn) if the user's retention is > 0 days; returns whether they were kept."""
        if self.history_days(user_id) <= 0:
            return False
        now = time.time()
        with self._tx() as db:
            db.executemany("INSERT INTO history(user_id, conversation, role, content, created) VALUES (?, ?, ?, ?, ?)",
                           [(user_id, conversation, r, c, now) for r, c in ((role, content), *more)])
        return True

    def history_list(self, user_id: int, conversation: str | None = None) -> list[dict]:
        sql, args = "SELECT conversation, role, content, created FROM history WHERE user_id = ?", [user_id]
        if conversation is not None:
            sql, args = sql + " AND conversation = ?", args + [conversation]
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        return [{"conversation": c, "role": r, "content": t, "created": at} for c, r, t, at in rows]

    def history_prune(self, user_id: int, now: float | None = None) -> int:
        """Drop the user's messages older than the retention; returns how many went."""
        cutoff = (time.time() if now is None else now) - self.history_days(user_id) * 86400
        with self._tx() as db:
            n = db.execute("DELETE FROM history WHERE user_id = ? AND created < ?", (user_id, cutoff)).rowcount
        if n:
            self._scrub()
        return n

    def history_clear(self, user_id: int) -> int:
        with self._tx() as db:
            n = db.execute("DELETE FROM history WHERE user_id = ?", (user_id,)).rowcount
        self._scrub()
        return n

    def _forget_history(self, user_id: int, text: str):
        # a deleted memory's words may sit verbatim in the message that asked to remember them
        with self._tx() as db:
            db.execute("DELETE FROM history WHERE user_id = ? AND instr(lower(content), lower(?)) > 0",
                       (user_id, text))
