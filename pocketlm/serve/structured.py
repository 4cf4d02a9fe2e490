"""`response_format`: replies that are JSON, valid by construction (pocketlm.infer.constrain.JsonSchema).

    {"type": "text"}                                             no constraint (the default)
    {"type": "json_object"}                                      any JSON object
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}}
                                                                 JSON valid against `schema`

As OpenAI's API defines them, on /v1/chat/completions (and, as vLLM does, /v1/completions). The
constraint holds whether or not `strict` is set, and the JSON is compact (no whitespace between
tokens, so none can run on to max_tokens); a reply cut by max_tokens ends with finish_reason
"length" and is then incomplete JSON, as with OpenAI. A schema keyword that cannot be enforced is a
400 naming it (never ignored). The schema is not added to the prompt: tell the model what to write.

Compiling a schema takes milliseconds to a second (a large enum), so it runs in the tokenize pool,
off the event loop; the grammars of recent schemas are cached. Size and nesting are capped before
the grammar library sees a schema (its parser recurses). A pathological schema the library accepts
but cannot follow (a $ref cycle with no way out) must not fail the other requests of the engine step,
so the processor is wrapped: on a failure it ends its own reply, and the request gets a 400.
"""

from __future__ import annotations

import asyncio
import functools
import json

import torch

from pocketlm.infer.constrain import NEG_INF, JsonSchema, SchemaError, compile_schema, end_token
from pocketlm.serve.context import ServerContext, Turn
from pocketlm.serve.errors import APIError

MAX_SCHEMA_BYTES = 128 * 1024  # the schema as compact JSON; OpenAI caps a schema's strings near this too
MAX_SCHEMA_DEPTH = 64          # nested objects and arrays in the schema's JSON
ANY_OBJECT = {"type": "object"}
PARAM = "response_format"


def install(ctx: ServerContext) -> None:
    async def check(turn: Turn):
        schema = requested_schema(turn.body)
        if schema is None:
            return
        text = _serialized(schema)
        loop = asyncio.get_running_loop()
        guarded = Guarded(await loop.run_in_executor(ctx.tokenize_pool, processor, ctx, text), ctx.engine.tokenizer)
        turn.processors.append(guarded)
        turn.on_done.append(guarded.check)

    ctx.input_checks.append(check)


def requested_schema(body) -> dict | None:
    """The JSON Schema the reply must follow, or None for free text."""
    fmt = getattr(body, "response_format", None)
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ANY_OBJECT
    return {} if fmt.json_schema.schema_ is None else fmt.json_schema.schema_  # {}: any JSON value


def _refuse(message: str, status: int = 400, code: str = "invalid_schema"):
    raise APIError(status, f"{PARAM}.json_schema.schema: {message}", param=PARAM, code=code)


def _serialized(schema: dict) -> str:
    """The schema as compact JSON (key order kept: it is the order the reply writes properties in),
    after the cheap checks: nesting, size, text UTF-8 can encode."""
    _check_depth(schema)
    try:
        text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:  # Python's JSON reader takes NaN and Infinity, which JSON has not
        _refuse("NaN and Infinity are not JSON numbers")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        _refuse(f"not valid Unicode text: a lone surrogate at character {e.start} of the schema", 422, "invalid_value")
    if size > MAX_SCHEMA_BYTES:
        _refuse(f"the schema is {size} bytes as compact JSON; this server takes up to {MAX_SCHEMA_BYTES}")
    return text


def _check_depth(schema) -> None:
    stack = [(schema, 1)]
    while stack:  # iterative: a deeply nested body must not exhaust the stack here either
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            _refuse(f"nested over {MAX_SCHEMA_DEPTH} levels deep")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def processor(ctx: ServerContext, schema_text: str) -> JsonSchema:
    """Runs in the tokenize pool: the request's processor, from a cached grammar when there is one."""
    engine = ctx.engine
    vocab = engine.model.cfg.vocab_size
    try:
        grammar = _grammar(engine.tokenizer, vocab, schema_text)
        return JsonSchema(engine.tokenizer, None, vocab, grammar=grammar)
    except SchemaError as e:  # its message starts "schema..." and names the keyword
        raise APIError(400, f"{PARAM}.json_schema.{e}", param=PARAM, code="invalid_schema") from None


@functools.lru_cache(maxsize=64)
def _grammar(tokenizer, vocab_size: int, schema_text: str) -> str:
    return compile_schema(json.loads(schema_text), tokenizer, vocab_size)


class Guarded:
    """A JsonSchema that never raises inside the engine: a failure (the grammar library's, or a
    grammar that stops short of a complete value) ends the reply at once; check() then refuses it."""

    def __init__(self, inner: JsonSchema, tokenizer):
        self.inner, self.end = inner, end_token(tokenizer)
        self.failure: str | None = None
        self.ended = False

    def _fail(self, e) -> None:
        self.failure = self.failure or str(e)

    def process(self, logits):
        if self.failure is None:
            try:
                out = self.inner.process(logits)
                if bool(torch.isfinite(out).any()):
                    return out
                self._fail("the grammar allows no next token")  # sampling from all -inf would fail the step
            except Exception as e:  # noqa: BLE001 - ends this reply only
                self._fail(e)
        out = logits.new_full(logits.shape, NEG_INF)
        out[self.end] = 0.0
        return out

    def allows(self, token: int) -> bool:  # (the engine's greedy fast path: Processor.allows)
        try:
            return self.failure is None and self.inner.allows(token)
        except Exception:  # noqa: BLE001 - process() then meets the failure and ends the reply
            return False

    def accept(self, token: int) -> None:
        if self.failure is None:
            try:
                self.inner.accept(token)
                if self.inner.is_done() and not self.inner.matcher.is_accepting():
                    self._fail("the grammar ended before a complete JSON value (a $ref cycle with no way out?)")
            except Exception as e:  # noqa: BLE001
                self._fail(e)
        if self.failure is not None:
            self.ended = self.ended or token == self.end

    def forced(self) -> list[int]:
        if self.failure is None:
            try:
                return self.inner.forced()
            except Exception as e:  # noqa: BLE001
                self._fail(e)
        return [] if self.ended else [self.end]

    def is_done(self) -> bool:
        return self.ended or (self.failure is None and self.inner.is_done())

    def check(self, text: str) -> None:
        """turn.on_done: a reply whose constraint failed is refused rather than returned as if valid."""
        if self.failure is not None:
            raise APIError(400, f"{PARAM}.json_schema.schema: this schema could not be followed while decoding "
                           f"({self.failure.splitlines()[0][:300]})", param=PARAM, code="invalid_schema")
