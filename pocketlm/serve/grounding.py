"""Grounded chat (pocketlm.safety.grounded): a chat request with `documents`, or any chat on a server
started with `--documents DIR`, is answered from the passages BM25 finds for its last user turn.
They join the system turn, numbered, and the reply's `passages` field lists them ([{"index", "source",
"text"}], in the first chunk of a stream) so a client can show what [n] cites. A request's own
documents win over the server's; `"documents": []` asks for no grounding."""

from __future__ import annotations

import asyncio

from pocketlm.safety.grounded import Index, grounded_messages, passages_from, sources
from pocketlm.serve.context import ServerContext, Turn


def install(ctx: ServerContext, index: Index | None = None) -> None:
    async def check(turn: Turn):
        if turn.kind != "chat":
            return
        docs = turn.body.documents
        if (docs is None and index is None) or docs == []:
            return
        loop = asyncio.get_running_loop()  # indexing a request's documents: off the event loop
        turn.messages, found = await loop.run_in_executor(ctx.tokenize_pool, _ground, turn.messages, docs, index)
        turn.extra["passages"] = sources(found)

    ctx.input_checks.append(check)


def _ground(messages, docs, index):
    if docs is not None:
        index = Index(passages_from([d if isinstance(d, str) else d.model_dump() for d in docs]))
    return grounded_messages(messages, index)
