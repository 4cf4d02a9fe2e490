"""Which error source of int4 and int8g costs agreement with fp32 (issue 17): fp32 models of the same Q4_1
weights re-fitted with bf16 or fp16 scales or as int8 groups, an int8 row-wise head, bf16 matrix inputs or
KV cache, scored as precision_agreement.py scores (teacher-forced along fp32's greedy reply). Slow: every
variant runs in fp32 through the model's step (minutes each on 2 loaded cores).

    python benchmarks/precision_sources.py [PROMPTS] [VARIANT,...]    (names: see VARIANTS; default all)
"""
import copy
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multi_lora import default_gguf  # noqa: E402
from precision_agreement import QUESTIONS, teacher_forced  # noqa: E402

from pocketlm.infer.batch import KVStore  # noqa: E402
from pocketlm.infer.fused import inference_copy  # noqa: E402
from pocketlm.infer.generate import encode_chat  # noqa: E402
from pocketlm.infer.linears import DenseLinear, GemvLinear, Int8GroupLinear  # noqa: E402
from pocketlm.model import load_model  # noqa: E402

G = 32
def fit(w, dt):
    """Int4Linear's two fits as they were before fp16 scales (scale and zero rounded to dt); the fp32
    dense weights. Kept apart from Int4Linear so both roundings can be compared on the same weights."""
    N, K = w.shape
    g = w.view(N, K // G, G)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / 15).clamp(min=1e-12)
    fits = [(s, lo + 8 * s)]
    big = g.gather(-1, g.abs().argmax(-1, keepdim=True)).squeeze(-1)
    s2 = torch.where(big.abs() < 1e-12, torch.full_like(big, 1e-12), big / -8)
    fits.append((s2, torch.zeros_like(s2)))
    best = None
    for s, z in fits:
        s, z = s.to(dt).float(), z.to(dt).float()
        q = torch.round((g - z[..., None]) / s[..., None] + 8).clamp(0, 15)
        d = (q - 8) * s[..., None] + z[..., None]
        err = (d - g).abs().amax(-1)
        if best is None: best = [d, err]
        else:
            b = err < best[1]
            best = [torch.where(b[..., None], d, best[0]), torch.minimum(err, best[1])]
    return best[0].view(N, K)

def int8row(w):
    s = (w.abs().amax(1).clamp(min=1e-12) / 127).to(torch.bfloat16).float()
    # Int8Linear rounds with fp32 scale then stores bf16 scale
    s32 = w.abs().amax(1).clamp(min=1e-12) / 127
    q = torch.round(w / s32[:, None]).clamp(-127, 127)
    return q * s[:, None]

def q8_0(w):
    """int8g before its min/max fit: Q8_0's symmetric fit alone (scale max |w| / 127, fp32)."""
    N, K = w.shape
    g = w.view(N, K // G, G)
    s = g.abs().amax(-1).clamp(min=1e-30) / 127
    return (torch.round(g / s[..., None]).clamp(-127, 127) * s[..., None]).view(N, K)

def variant(model, lin=None, head=None):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, nn.Linear) and "lm_head" not in name and lin is not None:
                mod.weight.copy_(lin(mod.weight.float()))
    return m

def run(name, m, prompts, refs, length, cfg, bf16_act=False, head_w=None, kv=torch.float32):
    ic = inference_copy(m, "fp32")
    if head_w is not None:
        ic.lm_head.fast.weight.copy_(head_w)  # only the head's logits; the token table stays exact
    hooks = []
    if bf16_act:
        for n, mod in ic.named_modules():
            if isinstance(mod, (GemvLinear, DenseLinear)) and not n.startswith("lm_head"):
                hooks.append(mod.register_forward_pre_hook(lambda mod, a: (a[0].to(torch.bfloat16).float(),)))
    store = KVStore(cfg, 1, length, dtype=kv)
    agree = total = 0; kl = []
    t = time.time()
    for p, (want, fed, _) in zip(prompts, refs):
        got, _, _ = teacher_forced(ic, store, p, fed, len(fed), True)
        agree += (got.argmax(-1) == want.argmax(-1)).sum().item(); total += want.size(0)
        kl.append(F.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="none").sum(-1))
    print(f"{name:40s} top-1 {100*agree/total:5.1f}%  KL {torch.cat(kl).mean().item():.5f} ({total} pos, {time.time()-t:.0f}s)", flush=True)

torch.set_num_threads(2)
model, tok = load_model(str(default_gguf()))
n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
prompts = [encode_chat(tok, [{"role": "user", "content": q}]) for q in QUESTIONS[:n]]
length = max(len(p) for p in prompts) + 49
with torch.inference_mode():
    ref = inference_copy(model, "fp32")
    store = KVStore(model.cfg, 1, length, dtype=torch.float32)
    refs = [teacher_forced(ref, store, p, None, 48, True) for p in prompts]
    hw = ref.lm_head.fast.weight.detach().float().clone()
    del ref
    b16, f16 = torch.bfloat16, torch.float16
    head8 = functools.cache(lambda: int8row(hw))  # made once, only where a variant asks for it
    VARIANTS = {  # name: (label, layer weights, run's keywords)
        "fp32": ("fp32 again (sanity)", None, {}),
        "sz-bf16": ("scales/zeros bf16 (Int4Linear fit)", lambda w: fit(w, b16), {}),
        "sz-fp16": ("scales/zeros fp16", lambda w: fit(w, f16), {}),
        "head-int8": ("head int8 row-wise", None, {"head_w": head8}),
        "act-bf16": ("activations bf16 (matrices' inputs)", None, {"bf16_act": True}),
        "w-bf16": ("weights bf16 (dense prefill copy)", lambda w: fit(w, b16).to(b16).float(), {}),
        "all-int4-old": ("all: bf16 s/z + int8 head + bf16 act", lambda w: fit(w, b16), {"bf16_act": True, "head_w": head8}),
        "all-int4": ("fp16 s/z + int8 head + bf16 act", lambda w: fit(w, f16), {"bf16_act": True, "head_w": head8}),
        "int8g-q8_0": ("int8g weights, Q8_0's symmetric fit alone", q8_0, {}),
        "int8g": ("int8g weights (symmetric or min/max fit)", lambda w: Int8GroupLinear(w, None).dequantized(), {}),
        "kv-bf16": ("KV cache bf16", None, {"kv": b16}),
    }
    for key in (sys.argv[2].split(",") if len(sys.argv) > 2 else VARIANTS):
        label, lin, kw = VARIANTS[key]
        kw = {k: v() if callable(v) else v for k, v in kw.items()}
        run(label, model if lin is None else variant(model, lin), prompts, refs, length, model.cfg, **kw)
