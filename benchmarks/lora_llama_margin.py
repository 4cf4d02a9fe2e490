"""Where pocketlm's greedy tokens part from llama.cpp's, with and without a LoRA: is it the adapter's
conversion or a near tie? llama.cpp (its GGUF LoRA from multi_lora.py) generates 32 greedy tokens; the  # noqa: E402
fp32 model (base, or base with the adapter merged) is teacher-forced on them; printed: the first position
where fp32's top-1 differs from llama.cpp's token and the logit margin there, against the median margin.

    python benchmarks/lora_llama_margin.py      # SmolLM2-135M-Instruct Q4_1, the random rank-8 adapters of multi_lora.py
"""
import copy
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from multi_lora import QUESTIONS, default_gguf, make_adapter, write_gguf_lora
from pocketlm.infer.generate import encode_chat  # noqa: E402
from pocketlm.model import load_model  # noqa: E402
from pocketlm.model.lora import apply_adapter  # noqa: E402
from llama_cpp import Llama  # noqa: E402

torch.set_num_threads(1)
g = default_gguf()
base, tok = load_model(str(g))
tmp = Path(tempfile.mkdtemp())
for label, targets in (("qv", "q_proj,v_proj"), ("all", "all")):
    f = make_adapter(base, tmp / label, targets, 8, seed=0)
    lora = write_gguf_lora(base, f, tmp / f"{label}.gguf")
    prompt = encode_chat(tok, [{"role": "user", "content": QUESTIONS[0]}])
    for path in ((None,) if label == "qv" else ()) + (lora,):  # the base model once: llama.cpp's arithmetic alone
        llm = Llama(model_path=str(g), lora_path=str(path) if path else None, n_ctx=256, n_threads=1, verbose=False)
        out = []
        for t in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(t)
            if len(out) == 32: break
        llm.close()
        model = apply_adapter(copy.deepcopy(base), f, merge=True) if path else base
        model.eval()
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out]))[0].float()
        pos = len(prompt) - 1
        rows = logits[pos:pos + 32]
        top = rows.argmax(-1).tolist()
        first = next((i for i in range(32) if top[i] != out[i]), None)
        top2 = rows.topk(2, -1).values
        margins = (top2[:, 0] - top2[:, 1]).tolist()
        desc = "base" if path is None else label
        if first is None:
            print(desc, "fp32 agrees with llama.cpp on all 32 tokens; min margin", round(min(margins), 3))
        else:
            m = rows[first]
            print(desc, f"first disagreement at {first}: fp32 top {top[first]} ({m[top[first]]:.3f}) vs llama {out[first]} ({m[out[first]]:.3f}); "
                  f"margin there {m[top[first]] - m[out[first]]:.3f}; median margin {sorted(margins)[16]:.3f}")
