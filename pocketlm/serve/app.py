"""`pocketlm serve`: an OpenAI-compatible HTTP API over the engine, and a web chat page at /.

    POST /v1/chat/completions   POST /v1/completions   (stream: server-sent events, then `data: [DONE]`)
    GET  /v1/models             GET /health            GET /metrics (Prometheus)     GET / (chat page)

Errors take OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 unreadable body or a
prompt the context cannot hold, 401 bad API key, 404 unknown model or route, 413 body too large,
422 a field of the wrong type or out of range, 429 queue full. The engine runs in its own thread;
each request's events cross into the event loop through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from jinja2 import TemplateError
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from pocketlm.infer.engine import Engine
from pocketlm.infer.generate import encode_chat, encode_completion
from pocketlm.infer.sampling import MIN_PENALTY, SamplingError, SamplingParams
from pocketlm.serve.metrics import Metrics
from pocketlm.tokenizer import TokenizerError

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 2 * 1024 * 1024  # far beyond any prompt a 2k-token context can hold


class BodyTooLarge(StarletteHTTPException):
    def __init__(self):
        # closing the connection is what makes the server stop reading; otherwise it drains the rest
        super().__init__(413, f"the request body is over {MAX_BODY_BYTES} bytes", headers={"Connection": "close"})


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_body(message: str, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- request bodies (strict: "0.5" is not a number, 1.5 is not an integer) -----------------------
class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)                          # not OpenAI's; the name vLLM uses
    min_p: float = Field(0.0, ge=0, le=1)                # idem
    repetition_penalty: float = Field(1.0, ge=MIN_PENALTY, le=10)  # idem
    seed: int | None = None
    stop: str | list[str] | None = Field(None)
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling(self, max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              min_p=self.min_p, repetition_penalty=self.repetition_penalty, seed=self.seed, stop=stop)


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


# ---- the app ----------------------------------------------------------------------------------
def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_queue: int = 256) -> FastAPI:
    metrics = Metrics()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="pocketlm", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(),
                                           code="invalid_json"), status_code=400)
        if tuple(first.get("loc", ())) == ("body",) and not isinstance(first.get("input"), (dict, list)):
            return JSONResponse(error_body("the body must be a JSON object, sent with Content-Type: application/json",
                                           code="invalid_json"), status_code=400)
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: {err.get('msg')}"
                            for err in e.errors()[:5])
        return JSONResponse(error_body(message, param=param, code="invalid_value"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        if e.status_code == 400:  # FastAPI could not read the body (not UTF-8, say)
            return JSONResponse(error_body(f"the body could not be read as UTF-8 JSON ({e.detail})", code="invalid_json"),
                                status_code=400)
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return JSONResponse(error_body(str(e.detail), code=codes.get(e.status_code)), status_code=e.status_code,
                            headers=e.headers)

    app.add_middleware(Guard, api_key=api_key, metrics=metrics)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "running": engine.running, "waiting": engine.queue_depth}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return metrics.render(engine.queue_depth, engine.running, engine.max_batch)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "pocketlm", "max_model_len": engine.max_seq_len}]}

    def prepare(body: _Generation, ids: list[int], max_tokens: int | None) -> SamplingParams:
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server has {model_name!r}",
                           param="model", code="model_not_found")
        room = engine.max_seq_len - len(ids)
        if room < 1:
            raise APIError(400, f"this model's context is {engine.max_seq_len} tokens and the prompt has {len(ids)}",
                           param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"max_tokens is {max_tokens} but the prompt ({len(ids)} tokens) leaves room for "
                           f"{room} in this model's {engine.max_seq_len}-token context", param="max_tokens",
                           code="context_length_exceeded")
        if engine.queue_depth >= max_queue:
            raise APIError(429, f"{engine.queue_depth} requests are waiting; try again shortly",
                           code="queue_full", type="rate_limit_error")
        try:
            return body.sampling(max_tokens or room)
        except SamplingError as e:
            raise APIError(422, str(e), code="invalid_value") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            ids = encode_chat(engine.tokenizer, messages)
        except (TokenizerError, TemplateError, ValueError) as e:  # the model's template refused these messages
            raise APIError(400, f"messages: {e}", param="messages") from None
        params = prepare(body, ids, body.max_completion_tokens or body.max_tokens)
        return await respond(body, ids, params, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "give one prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = encode_completion(engine.tokenizer, prompt)
        elif not prompt or any(not 0 <= t < engine.tokenizer.vocab_size for t in prompt):
            raise APIError(400, f"prompt: token ids must be in [0, {engine.tokenizer.vocab_size}), and at least one",
                           param="prompt")
        else:
            ids = list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        params = prepare(body, ids, body.max_tokens)
        return await respond(body, ids, params, request, chat=False)

    async def respond(body: _Generation, ids, params, request: Request, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        events = run(ids, params)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(rid, events, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, req = await until_done(events, request)
        if req is None:  # the client went away
            return JSONResponse(error_body("client disconnected"), status_code=499)
        if req.finish_reason == "error":
            raise APIError(500, f"generation failed: {req.error}", type="server_error")
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": req.finish_reason} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": req.finish_reason})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name, "choices": [choice], "usage": usage(req)}

    async def run(ids, params):
        """The request's events, as they come out of the engine thread; cancels it when abandoned."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        req = engine.submit(ids, params, on_event=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        try:
            while True:
                event = await queue.get()
                if event.finish_reason is not None:
                    metrics.generation_done(req)
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if not req.finished:
                engine.cancel(req)

    async def until_done(events, request: Request):
        """Collect a whole reply; stop early (and free the slot) if the client disconnects."""
        parts = []

        async def collect():
            async for ev in events:
                parts.append(ev.text)
                if ev.finish_reason is not None:
                    return ev.request

        task = asyncio.ensure_future(collect())
        while True:
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if done:
                return "".join(parts), task.result()
            if await request.is_disconnected():
                task.cancel()  # raises inside run(), whose finally cancels the engine request
                await asyncio.gather(task, return_exceptions=True)
                return "", None

    async def sse(rid, events, chat: bool, include_usage: bool):
        created_at = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text=None, finish=None, role=False, usage_=None, choices=True):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            data = {"id": rid, "object": obj, "created": created_at, "model": model_name,
                    "choices": [choice] if choices else []}
            if include_usage:
                data["usage"] = usage_
            return f"data: {_json(data)}\n\n"

        if chat:
            yield chunk(role=True)
        async for ev in events:
            if ev.finish_reason == "error":
                yield f"data: {_json(error_body(f'generation failed: {ev.request.error}', 'server_error'))}\n\n"
                break
            if ev.text:
                yield chunk(ev.text)
            if ev.finish_reason is not None:
                yield chunk(finish=ev.finish_reason)
                if include_usage:
                    yield chunk(usage_=usage(ev.request), choices=False)
        yield "data: [DONE]\n\n"

    return app


KNOWN_PATHS = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}


def usage(req) -> dict:
    return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.output_ids),
            "total_tokens": len(req.prompt_ids) + len(req.output_ids)}


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class Guard:
    """ASGI middleware: body size limit, API key on /v1, and request counts for /metrics. (Plain ASGI
    rather than @app.middleware, which buffers streamed responses and hides client disconnects.)"""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        status = [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        received = 0

        async def receive_within_limit():
            # A chunked body has no Content-Length to refuse up front: count it as it arrives and stop
            # reading at the limit (the route's body parsing turns this into the 413 response).
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise BodyTooLarge()
            return message

        try:
            length = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            length = 0
        if length > MAX_BODY_BYTES:
            too_large = BodyTooLarge()
            refusal = JSONResponse(error_body(too_large.detail, code="request_too_large"), too_large.status_code,
                                   headers=too_large.headers)
        elif self.api_key and path.startswith("/v1") and not self._authorized(headers):
            refusal = JSONResponse(error_body("missing or incorrect API key (send `Authorization: Bearer KEY`)",
                                              code="invalid_api_key"), 401)
        else:
            refusal = None
        try:
            await (refusal or self.app)(scope, receive_within_limit, send_and_note)
        finally:
            self.metrics.request_done(path if path in KNOWN_PATHS else "other", status[0])

    def _authorized(self, headers) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())


def serve(args) -> None:
    import uvicorn

    from pocketlm.infer.generate import load_engine

    api_key = args.api_key or os.environ.get("POCKETLM_API_KEY") or None
    engine = load_engine(args.model, adapter=args.adapter, dtype=args.dtype, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                         compile=args.compile, threads=args.threads)
    name = args.model_name or Path(args.model).name
    print(f"pocketlm serve: {name}, {engine.max_batch} slots x {engine.max_seq_len} positions "
          f"(KV cache {engine.kv_cache_bytes / 2**20:.1f} MiB), http://{args.host}:{args.port}/"
          f"{'' if api_key else '  (no API key)'}", flush=True)
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host} without an API key; anyone who can reach it can use it", flush=True)
    uvicorn.run(create_app(engine, name, api_key=api_key, max_queue=args.max_queue), host=args.host, port=args.port,
                log_level="warning")
