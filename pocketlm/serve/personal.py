"""Users and memory in the server (`serve --data-dir`): who a request is, and the chat hook that gives
a user's requests its memory (pocketlm.memory) and reports what the turn wrote (`memory_updates`).

Keys: the admin key (--api-key) reaches everything, and with the admin key a chat's `user` field
picks whose memory it uses; a user's key (pocketlm user add) reaches its own data only, and its
`user` field is ignored. `"memory": false` in a chat request is a temporary chat: nothing read,
nothing written, no history.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

from pocketlm.errors import PocketLMError
from pocketlm.serve.errors import APIError


@dataclass(frozen=True)
class Principal:
    """Who a request is: the admin, a user (by id and name), or anonymous."""
    admin: bool = False
    user_id: int | None = None
    name: str | None = None


def principal(store, admin_key: str | None, token: str | None) -> Principal | None:
    """A bearer token -> who it is; None for a key this server refuses (a 401).

    With an admin key set, every /v1 request needs that key or a user's. Without one, the server is
    open as before users existed: a request without a user's key is anonymous (it chats, without
    memory), and, on a server with no data dir either, the admin."""
    if token and admin_key is not None and secrets.compare_digest(token.encode("latin-1"), admin_key.encode()):
        return Principal(admin=True)
    if token and store is not None:
        from pocketlm.memory.store import KEY_PREFIX

        found = store.authenticate_user(token) if token.startswith(KEY_PREFIX) else None
        if found is not None:
            return Principal(user_id=found[0], name=found[1])
    if admin_key is not None:
        return None
    return Principal(admin=store is None)


def who(request) -> Principal:
    return request.scope.get("state", {}).get("principal") or Principal()


def install(app, ctx) -> None:
    """Users' routes and the chat hook, for a context with a memory store."""
    from pocketlm.serve.routes import users

    ctx.input_checks.append(lambda turn: _with_memory(ctx, turn))
    app.include_router(users.router)
    ctx.engine.between_steps(lambda: cache_chat_starts(ctx.engine)).result()  # (now: the engine is not started)


def cache_chat_starts(engine, memory: bool = True) -> list[int]:
    """Compute once (Engine.cache_prefix) the tokens chat prompts share: the template's opening of a chat
    with no system turn (SmolLM2's has its own default system prompt: ~27 of a short question's ~37
    tokens; every server caches it, as llama-server's slots keep their last prompt) and, with `memory`,
    of one whose system turn is a memory block, up to where the block's items begin. Memory then costs
    a request the prefill of its own items only, not of the block's fixed header (~40 tokens; at one
    thread a prompt's prefill grows with its length). Cached for the base model and for each adapter
    loaded now (serve --lora, e.g. the memory LoRA of configs/finetune_memory.yaml), each under its own
    weights. Returns the lengths cached."""
    from pocketlm.infer.generate import encode_chat

    def shared(a: list[int], b: list[int]) -> list[int]:
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return a[:max(0, n - 1)]  # less one: the last shared token might merge with what follows

    question = [[{"role": "user", "content": q}] for q in ("Hello there.", "What time is it?")]
    starts = [shared(*(encode_chat(engine.tokenizer, m) for m in question))]
    if memory:
        from pocketlm.memory.retrieval import block_starts, with_block

        first, second, other = (encode_chat(engine.tokenizer, with_block(question[0], b)) for b in block_starts())
        starts += [shared(first, second), shared(first, other)]
    for adapter in [None, *engine.adapters]:
        for ids in starts:
            if 1 < len(ids) < engine.max_seq_len // 2:  # (a tiny context keeps its room for the conversation)
                engine.cache_prefix(ids, adapter)
    return [len(ids) for ids in starts]


async def user_adapter(ctx, turn) -> str | None:
    """The engine's name for the requesting user's own adapter named as `model` (loaded on first use),
    or None (the name is the base model, a shared adapter, or nothing of this user's)."""
    body, loras = turn.body, ctx.loras
    if body.lora is not None or body.model == ctx.model_name or body.model in loras.public():
        return None
    uid = _chat_user(ctx, turn)
    if uid is None:
        return None
    from pocketlm.memory.adapters import adapter_get

    try:
        entry = await asyncio.to_thread(adapter_get, ctx.memory_store, uid, body.model)
    except PocketLMError:  # no such adapter (or a name no adapter can have): resolve's 404
        return None
    # keyed by the registration time too: a user id SQLite hands out again after an erase never
    # reaches the erased user's weights
    name = f"u{uid}-{entry['name']}-{int(entry['created'] * 1000)}"
    await loras.load_owned(name, entry["path"], uid)
    return name


async def _extracted(ctx, uid: int, last: str) -> list[dict]:
    from pocketlm.serve import extract

    try:
        found = await asyncio.to_thread(extract.extract, ctx.engine, last[:extract.MAX_INPUT])
    except PocketLMError:  # e.g. a turn too long for the model's context with the instruction: no extraction
        return []
    return await asyncio.to_thread(extract.write, ctx.memory_store, uid, found)


def _chat_user(ctx, turn) -> int | None:
    """Whose memory this chat uses, if anyone's."""
    p, body = who(turn.http), turn.body
    if p.admin and getattr(body, "user", None) is not None:  # (completions have no user field)
        from pocketlm.memory import MemoryStoreError

        try:
            return ctx.memory_store.user_id(body.user)
        except MemoryStoreError as e:
            raise APIError(404, str(e), param="user", code="user_not_found") from None
    return p.user_id


async def _with_memory(ctx, turn) -> None:
    if turn.kind != "chat" or not turn.body.memory:
        return
    uid = _chat_user(ctx, turn)
    if uid is None:
        return
    from pocketlm.memory import UnknownUser, personalize

    store, tok = ctx.memory_store, ctx.engine.tokenizer
    last = next((m["content"] for m in reversed(turn.messages) if m["role"] == "user"), None)
    try:
        messages, updates, _ = await asyncio.to_thread(personalize, store, uid, turn.messages,
                                                       lambda text: len(tok.encode(text, special=False)),
                                                       budget=ctx.memory_tokens)
        if ctx.memory_extract == "model" and last:  # the model's own reading of the turn (serve/extract.py)
            updates = updates + await _extracted(ctx, uid, last)
        keep_history = last is not None and store.history_days(uid) > 0
    except UnknownUser as e:  # erased since the key was checked
        raise APIError(404, str(e), param="user", code="user_not_found") from None
    turn.messages = messages
    turn.extra["memory_updates"] = updates
    if keep_history:
        conversation = turn.http.headers.get("x-conversation-id") or "default"

        def keep(reply: str):  # called on the event loop: the write goes to a thread, and the reply waits for it
            return asyncio.to_thread(store.history_add, uid, conversation, "user", last, ("assistant", reply))
        turn.on_done.append(keep)
