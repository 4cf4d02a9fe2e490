"""LoRA adapters served side by side (`serve --lora NAME=DIR --max-loras N`).

A request picks one by `"model": NAME` (as vLLM does) or a `"lora"` field (NAME, or {"name": NAME});
rows of one decode batch each run their own adapter over the shared base weights (the engine's
per-row LoRA, pocketlm/infer/adapters.py). A user's own adapters (`finetune --user`) load here on that
user's first request for them (`owners`): no other key can name them, /v1/models lists them to no one,
and when --max-loras is reached the least recently loaded one not in use makes room. Adapters are
added and removed at run time on the engine's thread between two steps (Engine.between_steps): each
writes its own slot of the stacks, allocated for --max-loras adapters with the first, so running
streams never see a half-written adapter and wait only for one adapter's bytes to be copied. Reading
the folder (safetensors) happens before, off the engine thread.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from pocketlm.errors import PocketLMError
from pocketlm.serve.errors import APIError


@dataclass
class LoraSet:
    engine: object
    max_loras: int = 8
    paths: dict[str, str] = field(default_factory=dict)  # name -> folder it came from
    created: dict[str, int] = field(default_factory=dict)
    owners: dict[str, int] = field(default_factory=dict)  # engine name -> user id, for users' own adapters
    _lock: asyncio.Lock | None = None  # one load/unload at a time (the check and the change stay together)

    def __post_init__(self):
        self.engine.adapter_slots.reserve = self.max_loras  # every slot allocated with the first adapter
        if not self.engine.compiled:  # built now, not during the first hot load (~200 ms)
            from pocketlm.infer.adapters import skeleton

            skeleton(self.engine.model.cfg)

    @classmethod
    def from_flags(cls, engine, loras: dict | None, max_loras: int) -> "LoraSet":
        """The set `serve --lora NAME=DIR ... --max-loras N` starts with; a bad flag is a plain error."""
        if max_loras < 0 or len(loras or ()) > max_loras:
            raise PocketLMError(f"--max-loras {max_loras}: expected at least 0 and at least the "
                                f"{len(loras or ())} --lora given")
        out = cls(engine, max_loras)
        for name, path in (loras or {}).items():
            try:
                out.load_now(name, path)
            except APIError as e:  # before serving: a plain error for the CLI to print
                raise PocketLMError(f"--lora {name}={path}: {e.message}") from None
        return out

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def load_now(self, name: str, path) -> float:
        """Before the server starts (serve --lora): add synchronously; returns the seconds it took."""
        self._check_new(name)
        t0 = time.perf_counter()
        updates = _read(self.engine, path)
        try:
            self.engine.add_adapter(name, updates)
        except PocketLMError as e:
            raise APIError(400, f"lora_path: {e}", param="lora_path", code="invalid_adapter") from None
        self._added(name, path)
        return time.perf_counter() - t0

    def public(self) -> dict[str, str]:
        """The adapters any key may name (and /v1/models lists)."""
        return {n: p for n, p in self.paths.items() if n not in self.owners}

    async def load_owned(self, name: str, path, owner: int) -> None:
        """A user's adapter, loaded unless it is already; makes room by unloading another user's one."""
        async with self.lock:
            if name in self.paths:
                return
            for stale in [n for n in self.owners if n not in self.paths]:  # dropped while in use
                await self._try_unload(stale)
            for other in list(self.owners):  # least recently loaded first
                if len(self.paths) < self.max_loras:
                    break
                await self._try_unload(other)
            await self._load_locked(name, path)
            self.owners[name] = owner

    async def drop_owner(self, owner: int) -> None:
        """After a user erase: its adapters can no longer be named; their weights go once no request runs them."""
        async with self.lock:
            for name in [n for n, o in self.owners.items() if o == owner]:
                self.paths.pop(name, None)
                self.created.pop(name, None)
                await self._try_unload(name)

    async def _try_unload(self, name: str) -> bool:
        try:
            await asyncio.wrap_future(self.engine.between_steps(lambda: self.engine.remove_adapter(name)))
        except PocketLMError:  # in use: stays until a later drop or eviction
            return False
        self.paths.pop(name, None), self.created.pop(name, None), self.owners.pop(name, None)
        return True

    async def load(self, name: str, path) -> float:
        async with self.lock:
            return await self._load_locked(name, path)

    async def _load_locked(self, name: str, path) -> float:
        self._check_new(name)
        t0 = time.perf_counter()
        updates = await asyncio.to_thread(_read, self.engine, path)
        try:
            await asyncio.wrap_future(self.engine.between_steps(lambda: self.engine.add_adapter(name, updates)))
        except PocketLMError as e:
            raise APIError(400, f"lora_path: {e}", param="lora_path", code="invalid_adapter") from None
        self._added(name, path)
        return time.perf_counter() - t0

    async def unload(self, name: str) -> None:
        async with self.lock:
            if name not in self.public():
                raise APIError(404, f"lora_name: no adapter {name!r} is loaded (loaded: {sorted(self.public())})",
                               param="lora_name", code="lora_not_found")
            try:
                await asyncio.wrap_future(self.engine.between_steps(lambda: self.engine.remove_adapter(name)))
            except PocketLMError as e:  # a running or waiting request uses it
                raise APIError(409, f"lora_name: {e}; retry when its requests are done", param="lora_name",
                               code="lora_in_use") from None
            del self.paths[name], self.created[name]

    def resolve(self, model: str, lora, base: str) -> str | None:
        """The adapter a request asks for (None: the base model); 404 for a name nobody loaded."""
        if lora is not None:
            name = lora if isinstance(lora, str) else lora.name
            if not isinstance(lora, str) and lora.scale not in (None, 1.0):
                raise APIError(400, "lora.scale: only 1 (the adapter as trained) is supported; leave it out",
                               param="lora.scale", code="unsupported_parameter")
            if model not in (base, name):
                raise APIError(400, f"lora: the request names model {model!r} and lora {name!r}; give the base "
                               f"model {base!r} (or the adapter's own name) as model", param="lora")
            if name not in self.public():
                raise APIError(404, f"lora: no adapter {name!r} is loaded (loaded: {sorted(self.public())})",
                               param="lora", code="lora_not_found")
            return name
        if model == base:
            return None
        if model in self.public():
            return model
        names = f" or one of its adapters {sorted(self.public())}" if self.public() else ""
        raise APIError(404, f"the model {model!r} does not exist; this server has {base!r}{names}",
                       param="model", code="model_not_found")

    def _check_new(self, name: str) -> None:
        if not name or "/" in name or name.strip() != name:
            raise APIError(400, f"lora_name: {name!r} is not a usable name (no slashes, no surrounding spaces)",
                           param="lora_name")
        if name in self.paths or name in self.engine.adapters:
            raise APIError(409, f"lora_name: an adapter named {name!r} is already loaded (unload it first)",
                           param="lora_name", code="lora_exists")
        if len(self.paths) >= self.max_loras:
            raise APIError(409, f"lora_name: {len(self.paths)} adapters are loaded, the most this server takes "
                           f"(--max-loras {self.max_loras}); unload one first", param="lora_name",
                           code="too_many_loras")
        if self.engine.compiled:
            raise APIError(400, "this server runs a compiled engine (serve --compile), which cannot run "
                           "adapters per request; restart it without --compile", code="lora_unsupported")

    def _added(self, name: str, path) -> None:
        self.paths[name], self.created[name] = str(path), int(time.time())


def _read(engine, path):
    """The folder's (module, A, B, scaling) updates, checked against the model; 400 naming the file."""
    from pocketlm.infer.adapters import read_adapter

    folder = Path(path)
    if not folder.is_dir():
        raise APIError(400, f"lora_path: {folder} is not a folder (expected a PEFT adapter folder with "
                       "adapter_config.json and adapter_model.safetensors)", param="lora_path", code="invalid_adapter")
    try:
        return read_adapter(engine.model.cfg, folder)
    except (PocketLMError, OSError) as e:  # AdapterError names the file and what is wrong in it
        raise APIError(400, f"lora_path: {e}", param="lora_path", code="invalid_adapter") from None
