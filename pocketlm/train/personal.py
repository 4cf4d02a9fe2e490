"""`pocketlm finetune --user U --data-dir DIR`: a LoRA adapter trained for one user and registered under
that user (pocketlm.memory.adapters): `serve --data-dir DIR` runs it for requests with that user's key
that name it as their model, and `user erase` shreds it.

The training data is the user's conversation history (what `serve` kept under the user's retention
setting, one chat example per conversation), or a file given with --data (any fine-tuning format).
A copy of the history is written into the run folder for the loader and shredded after training, as
are a finished run's checkpoints (RUN/adapter stays; a killed run keeps them and resumes with --resume).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pocketlm.errors import PocketLMError


def history_examples(store, user_id: int) -> list[dict]:
    """The user's kept conversations as chat examples (a conversation with no reply is left out)."""
    conversations: dict[str, list[dict]] = {}
    for m in store.history_list(user_id):
        conversations.setdefault(m["conversation"], []).append({"role": m["role"], "content": m["content"]})
    return [{"messages": msgs} for msgs in conversations.values()
            if any(m["role"] == "assistant" for m in msgs) and msgs[0]["role"] == "user"]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finetune_user(model_source, user: str, data_dir, data=None, name: str = "personal", *, flags: dict | None = None,
                  **kwargs) -> dict:
    """Train a LoRA for `user` (from its history, or `data`) into DATA_DIR/adapters/u<id>/<name>/ and
    register it; returns finetune's result with the adapter's name and path."""
    from pocketlm.memory.adapters import adapter_dir, adapter_register, check_adapter_name, shred, shred_file
    from pocketlm.memory.api import open_store
    from pocketlm.memory.store import UnknownUser
    from pocketlm.train.finetune import finetune

    check_adapter_name(name)
    if (flags or {}).get("lora") is False:
        raise PocketLMError("finetune --user trains a LoRA adapter (the base model stays shared); leave out --lora=false")
    with open_store(data_dir) as store:
        uid = store.user_id(user)
        out = adapter_dir(store, uid, name)
        copy = None
        if data is None:
            rows = history_examples(store, uid)
            if not rows:
                raise PocketLMError(f"user {user!r} has no conversation history to train on (serve keeps it only "
                                    f"with a retention over 0 days: pocketlm user add {user} --history-days N); "
                                    "or give a file with --data")
            out.mkdir(parents=True, exist_ok=True)
            copy = data = out / "history.jsonl"
            _write_jsonl(copy, rows)
    try:
        result = finetune(model_source, data, out, flags={**(flags or {}), "lora": True}, **kwargs)
    finally:
        if copy is not None and copy.exists():
            shred_file(copy)
    shred(out / "checkpoints")  # (optimizer state and every step's adapter) the final adapter is what is kept
    with open_store(data_dir) as store:
        try:
            adapter_register(store, store.user_id(user), name, result["adapter"])
        except UnknownUser:  # erased while it trained: what the run wrote since goes too
            shred(out)
            raise
    return {**result, "user": user, "adapter_name": name}
