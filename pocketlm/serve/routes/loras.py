"""Adapters at run time, in vLLM's shapes (serve --lora; pocketlm/serve/loras.py does the work):

    POST /v1/load_lora_adapter     {"lora_name", "lora_path"}: a PEFT folder on the server's disk
    POST /v1/unload_lora_adapter   {"lora_name"}

Admin only: with an API key set, that key (a user's key gets 403); without one, anyone who can reach
the server (loopback by default), as for the rest of the API.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from pocketlm.serve.errors import APIError
from pocketlm.serve.personal import who
from pocketlm.serve.schemas import Text

router = APIRouter(prefix="/v1")


class LoadLora(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    lora_name: Text = Field(min_length=1, max_length=128)
    lora_path: Text = Field(min_length=1, max_length=4096)


class UnloadLora(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    lora_name: Text = Field(min_length=1, max_length=128)


def _loras(request: Request):
    ctx = request.app.state.ctx
    p = who(request)
    if not (p.admin or (ctx.api_key is None and p.user_id is None)):
        raise APIError(403, "loading and unloading adapters takes the admin key", code="forbidden",
                       type="permission_error")
    return ctx.loras


@router.post("/load_lora_adapter")
async def load_lora_adapter(body: LoadLora, request: Request):
    seconds = await _loras(request).load(body.lora_name, body.lora_path)
    return {"object": "lora_adapter", "id": body.lora_name, "loaded": True, "load_ms": round(seconds * 1000, 1)}


@router.post("/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLora, request: Request):
    await _loras(request).unload(body.lora_name)
    return {"object": "lora_adapter", "id": body.lora_name, "loaded": False}
