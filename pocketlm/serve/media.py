"""Images in chat messages, OpenAI's content parts:

    {"role": "user", "content": [{"type": "text", "text": "What digit is this?"},
                                 {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}

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

from pocketlm.serve.context import ServerContext, Turn
from pocketlm.serve.errors import APIError


def install(ctx: ServerContext) -> None:
    async def check(turn: Turn):
        await read_images(ctx, turn)

    ctx.input_checks.insert(0, check)  # before memory and moderation spend anything on the request


def _image_parts(turn: Turn) -> list[tuple[str, object, str]]:
    """(param path, part, role) of every image part, in the order the template renders them."""
    return [(f"messages.{i}.content.{j}.image_url.url", part, m.role)
            for i, m in enumerate(turn.body.messages) if isinstance(m.content, list)
            for j, part in enumerate(m.content) if part.type == "image_url"]


async def read_images(ctx: ServerContext, turn: Turn) -> None:
    if turn.kind != "chat":
        return
    parts = _image_parts(turn)
    if not parts:
        return
    first = parts[0][0]
    if getattr(ctx.engine, "vision", None) is None:
        raise APIError(400, f"{first}: {ctx.model_name} is a text-only model; it cannot read images",
                       param=first, code="image_not_supported")
    if len(parts) > ctx.limits.max_images:
        raise APIError(400, f"messages: at most {ctx.limits.max_images} images per request, got {len(parts)}",
                       param="messages", code="too_many_images")
    for param, _, role in parts:
        if role != "user":
            raise APIError(400, f"{param}: images go in user messages, not {role!r} ones", param=param)
    loop = asyncio.get_running_loop()
    turn.images = [await loop.run_in_executor(ctx.tokenize_pool, _decode, param, part.image_url.url)
                   for param, part, _ in parts]


def _decode(param: str, url: str):
    from pocketlm.data.images import ImageDataError, decode_data_url

    try:
        return decode_data_url(url, param)
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
