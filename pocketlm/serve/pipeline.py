"""One request's way through the server, the same for every generating route:

    body -> cheap checks (auth done by the guard; model, unsupported fields, counts, sizes)
         -> input checks (ctx.input_checks: memory, moderation)
         -> prompt ids (tokenized off the event loop)
         -> engine (with ctx.output_filters) -> response (JSON or server-sent events)
"""

from __future__ import annotations

import asyncio
import inspect

from jinja2 import TemplateError

from pocketlm.infer.generate import encode_chat, encode_completion
from pocketlm.infer.sampling import SamplingError, SamplingParams
from pocketlm.serve import media
from pocketlm.serve.context import ServerContext, Turn
from pocketlm.serve.errors import APIError
from pocketlm.serve.responses import respond
from pocketlm.tokenizer import TokenizerError


async def run_turn(ctx: ServerContext, turn: Turn):
    if ctx.memory_store is not None:  # a user's own fine-tuned adapter, named as the model (finetune --user)
        from pocketlm.serve.personal import user_adapter

        turn.adapter = await user_adapter(ctx, turn)
    cheap_checks(ctx, turn)
    for check in ctx.input_checks:
        result = check(turn)
        if inspect.isawaitable(result):
            await result
    loop = asyncio.get_running_loop()
    turn.ids = await loop.run_in_executor(ctx.tokenize_pool, prompt_ids, ctx, turn)
    params = sampling(ctx, turn)
    filters = [make(turn) for make in ctx.output_filters]
    return await respond(ctx, turn, params, filters)


def _refuse(param: str, message: str, code: str = "invalid_value", status: int = 400):
    raise APIError(status, f"{param}: {message}", param=param, code=code)


def cheap_checks(ctx: ServerContext, turn: Turn) -> None:
    """Everything that needs no tokenizer, so a bad request costs next to nothing."""
    body, limits = turn.body, ctx.limits
    if turn.adapter is None:
        turn.adapter = ctx.loras.resolve(body.model, body.lora, ctx.model_name)  # 404 for an unknown model
    if ctx.engine.queue_depth >= limits.max_queue:  # overloaded: refuse before spending a tokenizer on it
        raise APIError(429, f"{ctx.engine.queue_depth} requests are waiting; try again shortly",
                       code="queue_full", type="rate_limit_error")
    if (field := body.unsupported()) is not None:
        _refuse(field, "this server does not support this field yet (leave it out, or null)", "unsupported_parameter")
    stop = body.stop_list()
    if len(stop) > limits.max_stop:
        _refuse("stop", f"at most {limits.max_stop} stop strings, got {len(stop)}")
    if any(len(s) > limits.max_stop_chars for s in stop):
        _refuse("stop", f"a stop string is at most {limits.max_stop_chars} characters")
    if turn.messages is not None and len(turn.messages) > limits.max_messages:
        _refuse("messages", f"at most {limits.max_messages} messages, got {len(turn.messages)}")
    if turn.max_tokens is not None and turn.max_tokens >= ctx.engine.max_seq_len:
        raise APIError(400, f"max_tokens is {turn.max_tokens} but this model's context is {ctx.engine.max_seq_len} "
                       "tokens, prompt included", param="max_tokens", code="context_length_exceeded")
    # a token stands for at most `longest` bytes, so a text over longest x max_prompt_tokens bytes is
    # surely too long: refuse it without tokenizing
    text = (sum(len(m["content"]) for m in turn.messages) if turn.messages is not None
            else len(turn.prompt) if isinstance(turn.prompt, str) else 0)
    if text > ctx.longest_token * ctx.max_prompt_tokens:  # characters <= bytes: never refuses a prompt that fits
        _too_long(ctx, turn, f"over {ctx.max_prompt_tokens}")


def _too_long(ctx: ServerContext, turn: Turn, n) -> None:
    raise APIError(400, f"this server takes prompts of up to {ctx.max_prompt_tokens} tokens (the model's context is "
                   f"{ctx.engine.max_seq_len}) and this one has {n}", param=_prompt_field(turn),
                   code="context_length_exceeded")


def _prompt_field(turn: Turn) -> str:
    return "messages" if turn.kind == "chat" else "prompt"


def prompt_ids(ctx: ServerContext, turn: Turn) -> list[int]:
    """Runs in the tokenize pool. Message contents are text; only the template makes turn markers."""
    tok = ctx.engine.tokenizer
    if turn.images:  # a chat with image parts (media.py)
        ids, turn.input_embeds = media.image_prompt(ctx, turn)
    elif turn.audio:  # ... with audio parts
        ids, turn.input_embeds = media.audio_prompt(ctx, turn)
    elif turn.messages is not None:
        try:
            ids = encode_chat(tok, turn.messages)
        except (TokenizerError, TemplateError, ValueError) as e:  # the model's template refused these messages
            raise APIError(400, f"messages: {e}", param="messages") from None
    elif isinstance(turn.prompt, str):
        ids = encode_completion(tok, turn.prompt, special=turn.body.allow_special_tokens)
    else:
        if any(t >= tok.vocab_size for t in turn.prompt):
            _refuse("prompt", f"token ids must be in [0, {tok.vocab_size})")
        ids = list(turn.prompt)
    if not ids:
        _refuse(_prompt_field(turn), "the prompt is empty")
    if len(ids) > ctx.max_prompt_tokens:
        _too_long(ctx, turn, len(ids))
    return ids


def sampling(ctx: ServerContext, turn: Turn) -> SamplingParams:
    room = ctx.engine.max_seq_len - len(turn.ids)
    if turn.max_tokens is not None and turn.max_tokens > room:
        raise APIError(400, f"max_tokens is {turn.max_tokens} but the prompt ({len(turn.ids)} tokens) leaves room for "
                       f"{room} in this model's {ctx.engine.max_seq_len}-token context", param="max_tokens",
                       code="context_length_exceeded")
    try:
        params = turn.body.sampling(turn.max_tokens or room)
        params.check_vocabulary(ctx.engine.model.cfg.vocab_size)  # here, so it is a 422 and not the engine's error
    except SamplingError as e:
        raise APIError(422, str(e), code="invalid_value") from None
    return params
