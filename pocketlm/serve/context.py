"""What the server's parts share: its limits, the engine, and the hooks later features plug into.

    ctx.input_checks.append(check)      # check(turn) -> None | awaitable; raise APIError to refuse,
                                        # or edit turn.messages (memory adds context, moderation blocks)
    ctx.output_filters.append(make)     # make(turn) -> an OutputFilter (engine contract), one per request
    turn.extra[name] = value            # a field of the reply (the JSON body; the first chunk of a stream)
    turn.on_done.append(f)              # f(reply text) -> None | awaitable when the reply is complete
                                        # (history: the reply waits for the write)
    turn.processors.append(p)           # a logits processor (engine contract) for this request (response_format)
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from pocketlm.serve.metrics import Metrics

if TYPE_CHECKING:  # the CLI reads Limits' defaults without importing torch
    from pocketlm.infer.engine import Engine

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Limits:
    """Caps on what one client can ask for; each breach is a 4xx (or a closed connection, for the timeouts)."""
    max_body_bytes: int = 2 * 1024 * 1024  # far beyond any prompt a 2k-token context can hold
    max_messages: int = 256                # messages in one chat request
    max_stop: int = 16                     # stop strings per request (each is searched at every step)
    max_stop_chars: int = 256              # characters in one stop string
    max_prompt_tokens: int | None = None   # default: the context, less one position for the reply
    max_queue: int = 256                   # waiting requests beyond this get 429
    header_timeout: float = 10.0           # seconds a client has to send a request's headers
    body_timeout: float = 30.0             # seconds it has to send the body
    keep_alive_timeout: float = 5.0        # an idle kept-alive connection is closed after this
    max_connections: int = 512             # open connections + requests; beyond this uvicorn answers 503
    max_images: int = 8                    # image parts in one chat request (serve/media.py)
    stream_interval: float = 0.02          # seconds a stream waits after a chunk for more tokens to join the next


@dataclass
class Turn:
    """One request on its way through the pipeline."""
    kind: str                         # "chat" | "completion"
    body: Any                         # the validated schemas.* body
    http: Any                         # the starlette Request (headers, client; who is asking)
    messages: list[dict] | None = None  # chat: [{"role", "content"}], what the template renders
    prompt: str | list[int] | None = None  # completion: text or token ids
    max_tokens: int | None = None     # None: what the context leaves room for
    ids: list[int] | None = None      # filled by the pipeline
    adapter: str | None = None        # the LoRA adapter the request runs under (serve --lora), None: the base
    extra: dict = field(default_factory=dict)  # top-level fields hooks add to the reply (memory_updates)
    on_done: list[Callable] = field(default_factory=list)  # f(reply text) once the reply is complete
    processors: list = field(default_factory=list)  # the request's logits processors (structured.py)
    images: list = field(default_factory=list)  # decoded image parts, uint8 arrays in order (media.py)
    audio: list = field(default_factory=list)   # decoded audio parts, float waveforms in order (media.py)
    input_embeds: Any = None          # (image or audio positions, n_embd) for the engine, when media were sent


@dataclass
class ServerContext:
    engine: "Engine"
    model_name: str
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] | None = None  # Host header names accepted (None: any)
    metrics: Metrics = field(default_factory=Metrics)
    input_checks: list[Callable] = field(default_factory=list)
    output_filters: list[Callable] = field(default_factory=list)
    memory_store: Any = None          # pocketlm.memory.Store with --data-dir: users, their keys and memories
    memory_tokens: int = 300          # the most prompt tokens a user's memory block may add
    memory_extract: str = "rules"     # "model": the model also extracts memories from each turn (extract.py)
    loras: Any = None                 # loras.LoraSet: the adapters requests may pick (serve --lora)
    created: int = field(default_factory=lambda: int(time.time()))
    # tokenizing a long prompt takes a while: off the event loop, in a few threads (tokenizers releases
    # the GIL), so /health and streaming replies never wait for it
    tokenize_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize"))

    @functools.cached_property
    def longest_token(self) -> int:
        """The most bytes one token stands for (bounds a prompt's token count from its length)."""
        return max(1, *self.engine.tokenizer.token_byte_lengths())

    @property
    def max_prompt_tokens(self) -> int:
        room = self.engine.max_seq_len - 1
        return min(room, self.limits.max_prompt_tokens) if self.limits.max_prompt_tokens else room
