"""A tiny language model that has seen some Shakespeare, for the engine and server tests.

A few hundred optimizer steps on 100 kB are enough for it to write mostly-English letters and
spaces (so replies decode to readable text, not stray bytes) while staying fast to build."""

from __future__ import annotations

import contextlib
import functools
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from reference import generate

from pocketlm.model.gpt import GPT, ModelConfig
from pocketlm.tokenizer import Tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[1] / "pocketlm" / "data" / "bundled" / "tinyshakespeare.txt"


@functools.lru_cache(maxsize=None)
def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train([SHAKESPEARE.read_text()[:100_000]], vocab_size=384)


def tiny_lm(arch: str = "llama", steps: int = 150, seed: int = 0, block_size: int = 1024) -> tuple[GPT, Tokenizer]:
    return _trained(arch, steps, seed, block_size)


@functools.lru_cache(maxsize=None)
def _trained(arch, steps, seed, block_size):
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=4,
                      n_kv_head=2 if arch == "llama" else None, n_embd=64)
    model = GPT(cfg)
    data = torch.tensor(tok.encode(SHAKESPEARE.read_text()[:100_000]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster, and immune to a busy machine
    try:
        _train(model, opt, data, g, steps)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), tok


def _train(model, opt, data, g, steps):
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (16,), generator=g)
        batch = torch.stack([data[s:s + 65] for s in starts.tolist()])
        _, loss = model(batch[:, :-1], targets=batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def clone(model: GPT) -> GPT:
    """A private copy (engines may cast a model to bf16 in place)."""
    copy = GPT(model.cfg)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def tiny_adapter(model: GPT, out: Path, scale: float = 0.3) -> tuple[Path, GPT]:
    """A PEFT-format LoRA adapter for `model` with random (nonzero) updates on every projection,
    saved to `out`; returns its path and the merged model (base + adapter) to compare against."""
    from pocketlm.model.lora import add_lora, apply_adapter, lora_modules, save_adapter

    adapted = add_lora(clone(model), rank=4, alpha=8, targets="all")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(adapted).values():  # B starts at zero (a no-op); make it change the output
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * scale)
    save_adapter(adapted, out)
    return out, apply_adapter(clone(model), out).eval()


def reference_greedy(model: GPT, ids: list[int], n: int) -> list[int]:
    """n greedy tokens by recomputing the whole sequence each step (no KV cache)."""
    out = generate(model, torch.tensor([ids]), n, use_cache=False)
    return out[0, len(ids):].tolist()


@contextlib.contextmanager
def running_server(checkpoint: Path, *extra_args: str, timeout: float = 120.0):
    """`pocketlm serve` on a free loopback port, in its own process; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "pocketlm.cli", "serve", "--model", str(checkpoint), "--model-name", "tiny",
           "--port", str(port), "--dtype", "fp32", "--threads", "1", *extra_args]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"server did not start: {log.read().decode(errors='replace')[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def in_process(app, api_key: str | None = None):
    """FastAPI's TestClient over `app` (engine thread started), torch on one thread as for tiny_lm."""
    from fastapi.testclient import TestClient

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with TestClient(app) as c:
            if api_key:
                c.headers["Authorization"] = f"Bearer {api_key}"
            yield c
    finally:
        torch.set_num_threads(threads)


def wide_checkpoint(out: Path, block_size: int = 65536) -> Path:
    """An untrained tiny model with a long context (its replies are noise; tests that need long
    prompts or long replies use it with ignore_eos)."""
    from pocketlm.model import save_checkpoint

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=4,
                      n_kv_head=2, n_embd=64)
    return save_checkpoint(out, GPT(cfg).eval(), tok)
