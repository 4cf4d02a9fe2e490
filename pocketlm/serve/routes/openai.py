"""OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Request

from pocketlm.serve.context import Turn
from pocketlm.serve.errors import APIError
from pocketlm.serve.pipeline import run_turn
from pocketlm.serve.schemas import ChatCompletionRequest, CompletionRequest, chat_max_tokens

router = APIRouter(prefix="/v1")


@router.get("/models")
async def models(request: Request):
    ctx = request.app.state.ctx
    base = {"id": ctx.model_name, "object": "model", "created": ctx.created, "owned_by": "pocketlm",
            "root": ctx.model_name, "parent": None, "max_model_len": ctx.engine.max_seq_len}
    # adapters as vLLM lists them: their own id, the folder as root, the base model as parent
    loras = [{**base, "id": name, "created": ctx.loras.created[name], "root": path, "parent": ctx.model_name}
             for name, path in ctx.loras.public().items()]  # a user's own adapters are nobody else's business
    return {"object": "list", "data": [base, *loras]}


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    turn = Turn("chat", body, request, messages=messages, max_tokens=chat_max_tokens(body))
    return await run_turn(request.app.state.ctx, turn)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "prompt: give one prompt per request", param="prompt")
        prompt = prompt[0]
    if not prompt:
        raise APIError(400, "prompt: the prompt is empty", param="prompt")
    turn = Turn("completion", body, request, prompt=prompt, max_tokens=body.requested_max_tokens())
    return await run_turn(request.app.state.ctx, turn)
