"""ms per int8g batch-1 decode step of SmolLM2-135M (the per-op step: the C++ one has no int8g format),
this tree's Int8GroupLinear against the one at a git commit, in one process: both engine copies are
built from the same loaded model and timed in turns (A, B, A, B, ...), so load on a shared machine
hits both alike.

    PYTHONPATH=$PWD python benchmarks/int8g_step_ab.py COMMIT [ROUNDS]
"""
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import decode_step_ms  # noqa: E402
from multi_lora import default_gguf  # noqa: E402

import pocketlm.infer.linears as linears  # noqa: E402
from pocketlm.infer.batch import KVStore  # noqa: E402
from pocketlm.infer.fused import inference_copy  # noqa: E402
from pocketlm.model import load_model  # noqa: E402

commit, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4
source = subprocess.run(["git", "show", f"{commit}:pocketlm/infer/linears.py"], capture_output=True, text=True,
                        check=True, cwd=Path(__file__).resolve().parents[1]).stdout
with tempfile.NamedTemporaryFile("w", suffix=".py") as f:
    f.write(source)
    f.flush()
    spec = importlib.util.spec_from_file_location("linears_then", f.name)
    then = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(then)
torch.set_num_threads(2)
model, _ = load_model(str(default_gguf()))
copies = {"this tree": inference_copy(model, "int8g")}
mine = linears.Int8GroupLinear
linears.Int8GroupLinear = then.Int8GroupLinear  # make_linear builds int8g from the module's name
copies[commit[:7]] = inference_copy(model, "int8g")
linears.Int8GroupLinear = mine
del model
store = KVStore(copies["this tree"].cfg, 1, 256, dtype=torch.bfloat16)
times = {k: [] for k in copies}
with torch.inference_mode():
    for _ in range(rounds):
        for name, m in copies.items():
            times[name].append(decode_step_ms(m, m, store, steps=32, warmup=4))
for name, v in times.items():
    print(f"{name:10s} ms/step", " ".join(f"{x:.1f}" for x in v), "median", f"{sorted(v)[len(v) // 2]:.1f}", flush=True)
