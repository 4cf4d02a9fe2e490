"""ms per batch-1 decode step of SmolLM2-135M (int4: through the C++ step; another precision: the
engine's decoder for it, e.g. int8g's per-op step), for tree-against-tree runs interleaved by hand
(run it from each tree with that tree on PYTHONPATH, in turns):

    PYTHONPATH=TREE python benchmarks/int4_step_speed.py REPS LABEL [PRECISION]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import decode_step_ms  # noqa: E402
from multi_lora import default_gguf  # noqa: E402

from pocketlm.infer import cstep  # noqa: E402
from pocketlm.infer.batch import KVStore  # noqa: E402
from pocketlm.infer.fused import inference_copy  # noqa: E402
from pocketlm.model import load_model  # noqa: E402

torch.set_num_threads(2)
model, tok = load_model(str(default_gguf()))
precision = sys.argv[3] if len(sys.argv) > 3 else "int4"
m = inference_copy(model, precision)
store = KVStore(model.cfg, 1, 256, dtype=torch.bfloat16)
assert precision != "int4" or cstep.why_not(m, store) is None, cstep.why_not(m, store)
dec = cstep.decoder(m, store)
with torch.inference_mode():
    out = [decode_step_ms(m, dec, store) for _ in range(int(sys.argv[1]))]
print(sys.argv[2], precision, "ms/step", " ".join(f"{v:.2f}" for v in out), "median", f"{sorted(out)[len(out) // 2]:.2f}", flush=True)
