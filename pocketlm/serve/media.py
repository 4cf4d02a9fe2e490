"""Images and audio in chat messages, OpenAI's content parts:

    {"role": "user", "content": [{"type": "text", "text": "What digit is this?"},
                                 {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}
    {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "<base64 WAV>", "format": "wav"}}]}

Audio parts go the same way as images, through the model's speech tower (engine.speech, beside a
speech checkpoint: pocketlm/model/speech.py): WAV only; a clip too long for the model, corrupt
base64, another format, audio for a model without a speech tower, or audio and images in one request
is a 400 naming the part.

An input check (first of all) finds the image parts, refuses what cannot be served and decodes the
rest off the event loop (Pillow, with a pixel cap checked before decoding); the pipeline's prompt
step then asks the model's vision tower (engine.vision, loaded beside a vision checkpoint) for the
prompt ids, with tokens_per_image positions per image, and their embeddings. Those positions count
in usage.prompt_tokens like any other. Every bad image is a 400 naming the part: a remote URL (a
server fetches nothing on a client's behalf), corrupt base64, a type that is not an image, a
decompression bomb, more than Limits.max_images images, an image outside a user message, or any
image sent to a text-only model.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

from pocketlm.serve.context import ServerContext, Turn
from pocketlm.serve.errors import APIError


def install(ctx: ServerContext) -> None:
    async def check(turn: Turn):
        for kind in KINDS:
            await read_media(ctx, turn, kind)

    ctx.input_checks.insert(0, check)  # before memory and moderation spend anything on the request


@dataclass(frozen=True)
class MediaKind:
    part: str          # the content part's type
    field: str         # where its payload sits in the part, as a param path
    tower: str         # the engine attribute that reads it
    noun: str
    code: str          # the error codes' stem: image_not_supported, too_many_images, ...
    turn_attr: str     # where the decoded parts go on the Turn
    missing: str       # what a model without the tower is told
    decode: Callable   # (param, part) -> array, in the tokenize pool; raises APIError


def _parts(turn: Turn, kind: MediaKind) -> list[tuple[str, object, str]]:
    """(param path, part, role) of every part of this kind, in the order the template renders them."""
    return [(f"messages.{i}.content.{j}.{kind.field}", part, m.role)
            for i, m in enumerate(turn.body.messages) if isinstance(m.content, list)
            for j, part in enumerate(m.content) if part.type == kind.part]


async def read_media(ctx: ServerContext, turn: Turn, kind: "MediaKind") -> None:
    """Check and decode the request's parts of one kind into turn.images / turn.audio."""
    if turn.kind != "chat":
        return
    parts = _parts(turn, kind)
    if not parts:
        return
    first = parts[0][0]
    if getattr(ctx.engine, kind.tower, None) is None:
        raise APIError(400, f"{first}: {ctx.model_name} {kind.missing}", param=first, code=f"{kind.code}_not_supported")
    if turn.images and kind.tower == "speech":
        raise APIError(400, f"{first}: images and audio in one request are not supported; send one kind", param=first)
    if len(parts) > ctx.limits.max_images:
        raise APIError(400, f"messages: at most {ctx.limits.max_images} {kind.noun} per request, got {len(parts)}",
                       param="messages", code=f"too_many_{kind.noun.replace(' ', '_')}")
    for param, _, role in parts:
        if role != "user":
            raise APIError(400, f"{param}: {kind.noun} go in user messages, not {role!r} ones", param=param)
    loop = asyncio.get_running_loop()
    setattr(turn, kind.turn_attr, [await loop.run_in_executor(ctx.tokenize_pool, kind.decode, param, part)
                                   for param, part, _ in parts])


def _decode(param: str, part):
    from pocketlm.data.images import ImageDataError, decode_data_url

    try:
        return decode_data_url(part.image_url.url, param)
    except ImageDataError as e:
        raise APIError(400, str(e), param=param, code="invalid_image") from None


def image_prompt(ctx: ServerContext, turn: Turn):
    """(prompt ids with -1 at image positions, their embeddings): runs in the tokenize pool."""
    import torch
    from jinja2 import TemplateError

    from pocketlm.model.vision import prepare_images

    vision = ctx.engine.vision
    with torch.no_grad():
        pixels = torch.cat([prepare_images(image[None], vision.vision_cfg) for image in turn.images])
        try:
            return vision.engine_prompt(ctx.engine.tokenizer, turn.messages, pixels)
        except (ValueError, TemplateError) as e:  # a typed <image> beside the parts, or special-token markers
            raise APIError(400, f"messages: {e}", param="messages") from None


def _decode_audio(param: str, part):
    from pocketlm.data.speech import AudioDataError, decode_audio_part

    try:
        return decode_audio_part(part.input_audio.data, part.input_audio.format, param)
    except AudioDataError as e:
        raise APIError(400, str(e), param=param, code="invalid_audio") from None


def audio_prompt(ctx: ServerContext, turn: Turn):
    """(prompt ids with -1 at audio positions, their embeddings): runs in the tokenize pool."""
    import torch
    from jinja2 import TemplateError

    from pocketlm.model.speech import prepare_clips

    speech = ctx.engine.speech
    with torch.no_grad():
        try:
            mels = prepare_clips(turn.audio, speech.speech_cfg)
            return speech.engine_prompt(ctx.engine.tokenizer, turn.messages, mels)
        except (ValueError, TemplateError) as e:  # too long a clip, a typed <audio>, special-token markers
            raise APIError(400, f"messages: {e}", param="messages") from None


KINDS = (MediaKind("image_url", "image_url.url", "vision", "images", "image", "images",
                   "is a text-only model; it cannot read images", _decode),
         MediaKind("input_audio", "input_audio", "speech", "audio clips", "audio", "audio",
                   "has no speech encoder; it cannot read audio", _decode_audio))
