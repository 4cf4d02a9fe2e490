"""`pocketlm serve`: an OpenAI-compatible HTTP API over the engine, and a web chat page at /.

    POST /v1/chat/completions   POST /v1/completions   (stream: server-sent events, then `data: [DONE]`)
    POST /v1/embeddings         with a sentence encoder (routes/embeddings.py)
    GET  /v1/models             GET /health            GET /metrics (Prometheus)     GET / (chat page)
    POST /v1/moderations        (moderation.py; with --moderation also the input and output of replies)
    "documents" on chat         grounded answers citing [n] (grounding.py; or serve --documents DIR)
    /v1/users/...               with --data-dir: users' memories and erasure (routes/users.py, personal.py)
    POST /v1/load_lora_adapter  POST /v1/unload_lora_adapter   adapters at run time (routes/loras.py, loras.py)

Errors take OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 unreadable body, an
unsupported field, a limit exceeded, or a prompt the context cannot hold; 401 bad API key; 404
unknown model, adapter or route; 408 body too slow; 413 body too large; 421 unknown Host; 422 a field of the
wrong type or out of range; 403 another user's data; 409 a user that exists, an adapter loaded
or in use, or --max-loras reached; 429 queue full.
This module only assembles: schemas.py (bodies), errors.py, guard.py (middleware), pipeline.py
(body -> checks -> ids -> engine -> reply), responses.py, routes/ (one router per area),
personal.py (users and memory), server.py (uvicorn, timeouts).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from pocketlm.infer.engine import Engine
from pocketlm.serve import errors
from pocketlm.serve import moderation as moderation_routes
from pocketlm.serve.context import Limits, ServerContext
from pocketlm.serve import grounding, media, personal, structured
from pocketlm.serve.guard import Guard
from pocketlm.serve.loras import LoraSet
from pocketlm.serve.routes import embeddings, openai, ops
from pocketlm.serve.routes import loras as lora_routes
from pocketlm.serve.routes.ops import STATIC
from pocketlm.serve.server import serve  # noqa: F401  (pocketlm.serve.app.serve, the library verb)

MAX_BODY_BYTES = Limits.max_body_bytes


def create_app(engine: Engine, model_name: str, api_key: str | None = None, *, limits: Limits | None = None,
               allowed_hosts: tuple[str, ...] | None = None, max_queue: int | None = None,
               data_dir=None, memory_tokens: int = 300, memory_extract: str = "rules", moderation=(),
               moderation_backend=None, embedding_model=None, loras: dict | None = None, max_loras: int = 8,
               documents=None) -> FastAPI:
    """loras: {name: PEFT folder} served beside the base model (routes/loras.py adds more at run time).
    documents: a pocketlm.safety.grounded.Index every chat without its own `documents` answers from."""
    limits = limits or Limits()
    if max_queue is not None:
        limits.max_queue = max_queue
    ctx = ServerContext(engine, model_name, limits, api_key=api_key,
                        allowed_hosts=tuple(h.lower() for h in allowed_hosts) if allowed_hosts else None,
                        memory_tokens=memory_tokens, memory_extract=memory_extract)
    ctx.loras = LoraSet.from_flags(engine, loras, max_loras)
    if data_dir is not None:  # users, their keys and memories (pocketlm.memory)
        from pocketlm.memory import Store

        ctx.memory_store = Store(data_dir)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()
        ctx.tokenize_pool.shutdown(wait=False, cancel_futures=True)
        if ctx.memory_store is not None:
            ctx.memory_store.close()

    media.install(ctx)  # image parts in chat messages
    structured.install(ctx)  # response_format
    ctx.longest_token  # computed now rather than at the first request
    app = FastAPI(title="pocketlm", version="0.1.0", lifespan=lifespan)
    app.state.ctx = ctx
    app.state.engine, app.state.metrics = engine, ctx.metrics
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    errors.install(app)
    app.add_middleware(Guard, ctx=ctx)
    app.include_router(ops.router)
    app.include_router(openai.router)
    app.include_router(lora_routes.router)
    app.include_router(moderation_routes.router)
    from pocketlm.safety import get_backend
    moderation_routes.install(app, moderation_backend or get_backend("rules"), moderation)
    grounding.install(ctx, documents)  # after input moderation: a refused request is not indexed
    if ctx.memory_store is not None:
        personal.install(app, ctx)  # (caches the chat openings, memory's among them)
    else:  # the template's opening, prefilled once rather than per request (the engine is not started yet)
        engine.between_steps(lambda: personal.cache_chat_starts(engine, memory=False)).result()
    if embeddings.available(embedding_model):  # /v1/embeddings (None: the default model if installed)
        app.state.embedder = embeddings.Embedder(embedding_model)
        app.include_router(embeddings.router)
    return app
