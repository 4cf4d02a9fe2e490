"""For operators and people: /health, /metrics (Prometheus), and the chat page at /."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, PlainTextResponse

STATIC = Path(__file__).resolve().parents[1] / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC / "index.html")


@router.get("/health")
async def health(request: Request):
    ctx = request.app.state.ctx
    return {"status": "ok", "model": ctx.model_name, "running": ctx.engine.running, "waiting": ctx.engine.queue_depth}


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(request: Request):
    ctx = request.app.state.ctx
    return ctx.metrics.render(ctx.engine.queue_depth, ctx.engine.running, ctx.engine.max_batch)
