"""From engine events to HTTP: a whole JSON reply, or server-sent events as the reply is decoded.
The engine runs in its own thread; each request's events cross into the event loop through an
asyncio queue, and a request whose client went away is cancelled, which frees its slot."""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import time
import uuid

from fastapi.responses import StreamingResponse

from pocketlm.errors import InputError
from pocketlm.infer.engine import ContextLengthError, Event
from pocketlm.serve.context import ServerContext, Turn
from pocketlm.serve.errors import APIError, error_body, error_response, log


def usage(req) -> dict:
    return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.output_ids),
            "total_tokens": len(req.prompt_ids) + len(req.output_ids)}


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


async def respond(ctx: ServerContext, turn: Turn, params, filters: list):
    chat = turn.kind == "chat"
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    events = _run(ctx, turn.ids, params, filters, turn.processors, turn.adapter, turn.input_embeds)
    body = turn.body
    if body.stream:
        await events.__anext__()  # submitted (errors surface here, as a status, before the stream starts)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(ctx, turn, rid, events, chat, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await events.__anext__()
    text, req = await _until_done(events, turn.http)
    if req is None:  # the client went away
        return error_response(499, "client disconnected")
    if req.finish_reason == "error":
        log.error("generation failed: %s", req.error)
        raise APIError(500, "generation failed (logged on the server)", type="server_error")
    for done in turn.on_done:
        await _finished(done(text))
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
               "finish_reason": req.finish_reason} if chat else
              {"index": 0, "text": text, "logprobs": None, "finish_reason": req.finish_reason})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": turn.adapter or ctx.model_name, "choices": [choice], "usage": usage(req), **turn.extra}


async def _run(ctx: ServerContext, ids, params, filters, processors=(), adapter=None, input_embeds=None):
    """Yields None once submitted, then the request's events as they come out of the engine thread;
    cancels the request when abandoned."""
    events = _Handoff(asyncio.get_running_loop())
    extras = {"output_filters": filters} if filters else {}  # engines before the output-filter hook take none
    if processors:
        extras["processors"] = processors
    if adapter is not None:
        extras["adapter_id"] = adapter
    if input_embeds is not None:  # the images' embeddings (media.py)
        extras["input_embeds"] = input_embeds
    try:
        req = ctx.engine.submit(ids, params, events.put, **extras)
    except ContextLengthError as e:
        raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from None
    except InputError as e:  # the adapter was unloaded after the request was checked
        if adapter is None:
            raise
        raise APIError(404, str(e), param="model", code="lora_not_found") from None
    try:
        yield None
        while True:
            event = await events.get()
            if event.finish_reason is not None:
                ctx.metrics.generation_done(req)
            yield event
            if event.finish_reason is not None:
                return
            # let the next tokens gather for a moment: one chunk then carries several, and the client and
            # this loop parse, encode and send a third as many (their CPU is the engine's on a small machine)
            await asyncio.sleep(ctx.limits.stream_interval)
    finally:
        if not req.finished:
            ctx.engine.cancel(req)


class _Handoff:
    """One request's events from the engine thread to the event loop. get() returns every event that
    has arrived as one (clients join deltas), so a loaded server writes fewer chunks, not later ones;
    the engine thread wakes the loop only for the first event of a batch, not for every token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.events, self.arrived = loop, collections.deque(), asyncio.Event()

    def put(self, event: Event) -> None:  # (the engine thread; the loop is the only one taking)
        self.events.append(event)
        if len(self.events) == 1:  # the loop took all before this one: it may be waiting
            self.loop.call_soon_threadsafe(self.arrived.set)

    async def get(self) -> Event:
        while not self.events:
            self.arrived.clear()
            if not self.events:  # (checked after clearing: an event put meanwhile set it again)
                await self.arrived.wait()
        event = self.events.popleft()
        text = [event.text]
        while event.finish_reason is None and self.events:
            event = self.events.popleft()
            text.append(event.text)
        return event if len(text) == 1 else Event(event.request, "".join(text), event.finish_reason)


async def _finished(result) -> None:
    """An on_done hook may hand back an awaitable (a history write): the reply waits for it."""
    if inspect.isawaitable(result):
        await result


async def _until_done(events, http):
    """Collect a whole reply; stop early (and free the slot) if the client disconnects."""
    parts = []

    async def collect():
        async for ev in events:
            parts.append(ev.text)
            if ev.finish_reason is not None:
                return ev.request

    task = asyncio.ensure_future(collect())
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return "".join(parts), task.result()
        if await http.is_disconnected():
            task.cancel()  # raises inside _run(), whose finally cancels the engine request
            await asyncio.gather(task, return_exceptions=True)
            return "", None


async def _sse(ctx: ServerContext, turn: Turn, rid, events, chat: bool, include_usage: bool):
    created_at = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text=None, finish=None, role=False, usage_=None, choices=True, extra=None):
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        data = {"id": rid, "object": obj, "created": created_at, "model": turn.adapter or ctx.model_name,
                "choices": [choice] if choices else []}
        if include_usage:
            data["usage"] = usage_
        return f"data: {_json({**data, **(extra or {})})}\n\n"

    try:
        if chat:
            yield chunk(role=True, extra=turn.extra)
        parts = []
        async for ev in events:
            if ev.finish_reason == "error":
                log.error("generation failed: %s", ev.request.error)
                yield f"data: {_json(error_body('generation failed (logged on the server)', 'server_error'))}\n\n"
                break
            if ev.text:
                parts.append(ev.text)
                yield chunk(ev.text)
            if ev.finish_reason is not None:
                try:
                    for done in turn.on_done:
                        await _finished(done("".join(parts)))
                except APIError as e:  # the reply is refused after all (a schema that could not be followed)
                    yield f"data: {_json(error_body(e.message, e.type, e.param, e.code))}\n\n"
                    break
                yield chunk(finish=ev.finish_reason)
                if include_usage:
                    yield chunk(usage_=usage(ev.request), choices=False)
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()  # a client that hung up: cancel the request now, not at garbage collection
