"""Moderation in the server: POST /v1/moderations in OpenAI's shape, and the pipeline hooks of
`serve --moderation input,output`.

- input: every user message (or the text prompt) is checked before tokenizing; a flagged one gets
  OpenAI's 400 with code "content_filter" naming the categories;
- output: each reply goes through pocketlm.safety.ModerationFilter, which ends it with
  finish_reason "content_filter" before a flagged word is shown (streaming included).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from pocketlm.safety import ModerationError, ModerationFilter, moderation_inputs, moderation_response
from pocketlm.serve.errors import APIError

WHERE = ("input", "output")
router = APIRouter(prefix="/v1")


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: Any
    model: str | None = None


@router.post("/moderations")
async def moderations(body: ModerationRequest, request: Request):
    backend = request.app.state.moderation
    try:
        texts = moderation_inputs(body.input)
    except ModerationError as e:
        raise APIError(400, str(e), param="input", code="invalid_value") from None
    if sum(map(len, texts)) > request.app.state.ctx.limits.max_body_bytes:
        raise APIError(400, "input: too long", param="input")
    return moderation_response(texts, backend, model=body.model or backend.name)


def parse_where(value) -> tuple[str, ...]:
    """'input,output' | ('input',) -> the parts moderated; raises ModerationError naming what is wrong."""
    parts = [p.strip() for p in (value.split(",") if isinstance(value, str) else value or ()) if p.strip()]
    bad = [p for p in parts if p not in WHERE]
    if bad:
        raise ModerationError(f"--moderation: expected a comma list of {', '.join(WHERE)}, got {', '.join(bad)}")
    return tuple(dict.fromkeys(parts))


def install(app, backend, where=()) -> None:
    """Serve /v1/moderations with `backend`, and moderate the input and/or output of every request."""
    ctx = app.state.ctx
    app.state.moderation = backend
    where = parse_where(where)
    if "input" in where:
        async def check_input(turn):
            texts = ([m["content"] for m in turn.messages if m["role"] == "user"] if turn.messages is not None
                     else [turn.prompt] if isinstance(turn.prompt, str) else [])
            for text in texts:
                if hasattr(backend, "lookup"):  # the rules backend: well under a millisecond
                    verdict = backend.check(text)
                else:  # a classifier or a guard model: off the event loop
                    verdict = await asyncio.get_running_loop().run_in_executor(ctx.tokenize_pool, backend.check, text)
                if verdict.flagged:
                    cats = [c for c, on in verdict.categories.items() if on] or verdict.detail.get("categories", [])
                    raise APIError(400, "the input was flagged by moderation" + (f" ({', '.join(cats)})" if cats else ""),
                                   param="messages" if turn.messages is not None else "prompt", code="content_filter")
        ctx.input_checks.append(check_input)
    if "output" in where:
        if not hasattr(backend, "lookup") and not hasattr(backend, "check_many"):
            raise ModerationError("--moderation output needs the rules or classifier backend (a guard model is too "
                                  "slow to run at every token); moderate the input with the guard instead")
        ctx.output_filters.append(lambda turn: ModerationFilter(backend))
