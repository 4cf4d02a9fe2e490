"""The ASGI middleware every request passes first: Host allow-list, API key, body size and read
time, request counts for /metrics, and the last-resort handler (an exception nothing else caught
becomes a JSON 500 without internals; its traceback goes to the server's log). Plain ASGI rather
than @app.middleware, which buffers streamed responses and hides client disconnects."""

from __future__ import annotations

import asyncio
import time

from starlette.exceptions import HTTPException as StarletteHTTPException

from pocketlm.serve.context import ServerContext
from pocketlm.serve.errors import error_response, internal_error, log
from pocketlm.serve.personal import principal

KNOWN_PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
               "/v1/embeddings", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}


def _host_name(host: str) -> str:
    """`Host: [::1]:8000` -> `::1`, `localhost:8000` -> `localhost`."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    def __init__(self, app, ctx: ServerContext):
        self.app, self.ctx = app, ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, limits = scope["path"], self.ctx.limits
        headers = dict(scope["headers"])
        status = [500, False]  # the response's status, and whether it started

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0], status[1] = message["status"], True
            await send(message)

        received, body_done, deadline = 0, False, time.monotonic() + limits.body_timeout

        async def receive_within_limits():
            # A chunked body has no Content-Length to refuse up front: count it as it arrives and stop
            # reading at the limit; a body that trickles in past the deadline ends the request too (the
            # route's body parsing turns both into responses). Once the body is in, receive() only
            # waits for a disconnect, without a deadline.
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise StarletteHTTPException(408, f"the request body did not arrive within {limits.body_timeout:g} s",
                                             headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limits.max_body_bytes:
                    # closing the connection is what makes the server stop reading; otherwise it drains the rest
                    raise StarletteHTTPException(413, f"the request body is over {limits.max_body_bytes} bytes",
                                                 headers={"Connection": "close"})
            return message

        refusal = self._refusal(path, headers, scope)
        try:
            await (refusal or self.app)(scope, receive_within_limits, send_and_note)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), path)
            if not status[1]:
                await internal_error()(scope, receive, send_and_note)
        finally:
            self.ctx.metrics.request_done(path if path in KNOWN_PATHS else "other", status[0])

    def _refusal(self, path: str, headers: dict, scope):
        limits, ctx = self.ctx.limits, self.ctx
        host = headers.get(b"host", b"").decode("latin-1")
        if ctx.allowed_hosts is not None and _host_name(host).lower() not in ctx.allowed_hosts:
            # bound to loopback, a browser page on another site can still reach us by DNS rebinding
            # (its name now resolving to 127.0.0.1); its requests carry that name in Host
            return error_response(421, f"this server does not answer to the host name {host!r} (allowed: "
                                  f"{', '.join(ctx.allowed_hosts)}; see --allow-host)", code="invalid_host")
        try:
            length = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            length = 0
        if length > limits.max_body_bytes:
            return error_response(413, f"the request body is over {limits.max_body_bytes} bytes",
                                  code="request_too_large", headers={"Connection": "close"})
        if path.startswith("/v1"):
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            who = principal(ctx.memory_store, ctx.api_key, token.strip() if scheme.lower() == "bearer" else None)
            if who is None:
                return error_response(401, "missing or incorrect API key (send `Authorization: Bearer KEY`)",
                                      code="invalid_api_key")
            scope.setdefault("state", {})["principal"] = who
        return None
