"""Running the app: load the engine, then uvicorn with the connection limits of ServerContext.limits.
uvicorn closes idle kept-alive connections and caps connections, but gives a client all the time in
the world to send its headers, so TimedH11 adds that deadline (the body's is the guard's)."""

from __future__ import annotations

from pathlib import Path

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from pocketlm.errors import PocketLMError
from pocketlm.serve.context import LOOPBACK, Limits


class TimedH11(H11Protocol):
    """uvicorn's h11 protocol, plus: a request's headers must be in within `header_timeout` seconds of
    the connection opening (or of the previous response on a kept-alive one), else it is closed."""
    header_timeout = 10.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self):
        super().on_response_complete()
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in
            self._disarm()

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)

    def _arm(self):
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self):
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _too_slow(self):
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()


def serve(model, *, adapter=None, dtype: str = "auto", host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, model_name: str | None = None, max_batch: int = 8, max_seq_len: int = 2048,
          compile: bool = False, threads: int | None = None, limits: Limits | None = None,
          allow_hosts: tuple[str, ...] = (), data_dir=None, memory_tokens: int = 300, memory_extract: str = "rules",
          moderation=(), moderation_backend: str = "rules", guard_model=None, moderation_words=None,
          embedding_model=None, loras: dict | None = None, max_loras: int = 8, documents=None) -> None:
    """Serve `model` over HTTP until interrupted. Bound to loopback, only requests naming a loopback
    host (or one of `allow_hosts`) are answered, so a web page cannot reach the API by DNS rebinding.
    documents: a folder every chat is grounded in (pocketlm.safety.grounded), unless it brings its own."""
    import uvicorn

    from pocketlm.infer.generate import load_engine
    from pocketlm.serve.app import create_app

    from pocketlm.serve.moderation import parse_where
    limits, moderation = limits or Limits(), parse_where(moderation)  # a bad --moderation fails before loading
    if memory_extract not in ("rules", "model"):
        raise PocketLMError(f"--memory-extract {memory_extract!r}: expected rules or model")
    folder = documents
    if documents is not None:  # a bad --documents too
        from pocketlm.safety.grounded import Index, load_documents
        documents = Index(load_documents(documents))
    if loras and compile:  # a compiled step has the weights frozen in; it cannot run per-row adapters
        raise PocketLMError("--lora needs an engine without --compile (adapters run per request, unmerged)")
    engine = load_engine(model, adapter=adapter, dtype=dtype, max_batch=max_batch, max_seq_len=max_seq_len,
                         compile=compile, threads=threads)
    import os

    import torch

    threads_now = torch.get_num_threads()
    # the engine takes every core: leave one to HTTP while a single stream decodes (POCKETLM_SOLO_THREADS=0: off)
    if threads_now > 1 and threads_now >= (os.cpu_count() or 1) and os.environ.get("POCKETLM_SOLO_THREADS") != "0":
        engine.solo_threads = threads_now - 1
    name = model_name or Path(model).name
    print(f"pocketlm serve: {name}, {engine.max_batch} slots x {engine.max_seq_len} positions "
          f"(KV cache {engine.kv_cache_bytes / 2**20:.1f} MiB), http://{host}:{port}/"
          f"{'' if api_key else '  (no API key)'}", flush=True)
    allowed = (*LOOPBACK, *allow_hosts) if host in LOOPBACK or allow_hosts else None
    if host not in LOOPBACK and not api_key:
        print(f"warning: listening on {host} without an API key; anyone who can reach it can use it", flush=True)
    if data_dir is not None:
        note = "" if api_key else "  (no admin key: manage users with `pocketlm user`)"
        print(f"users and memory: {Path(data_dir) / 'pocketlm.db'}{note}", flush=True)
    from pocketlm.safety import get_backend
    backend = get_backend(moderation_backend, guard_model=guard_model, words=moderation_words)
    app = create_app(engine, name, api_key=api_key, limits=limits, allowed_hosts=allowed, data_dir=data_dir,
                     memory_tokens=memory_tokens, memory_extract=memory_extract, moderation=moderation,
                     moderation_backend=backend, embedding_model=embedding_model, loras=loras, max_loras=max_loras,
                     documents=documents)
    if documents is not None:
        print(f"grounded in {len(documents.passages)} passages of {folder}", flush=True)
    if loras:
        print(f"LoRA adapters (pick one with \"model\": NAME): {', '.join(loras)}", flush=True)
    protocol = type("TimedH11", (TimedH11,), {"header_timeout": limits.header_timeout})
    uvicorn.run(app, host=host, port=port, log_level="warning", http=protocol,
                timeout_keep_alive=limits.keep_alive_timeout, limit_concurrency=limits.max_connections)
