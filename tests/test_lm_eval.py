"""pocketlm as an lm-evaluation-harness model: local task files (multiple choice, rolling
log-likelihood, generation) run end to end offline, and lm-eval's figures match direct computations."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task files only: nothing may be downloaded
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from pocketlm.eval.tasks import greedy_generate  # noqa: E402
from pocketlm.model import GPT, ModelConfig, load_model, save_checkpoint  # noqa: E402
from pocketlm.tokenizer import Tokenizer  # noqa: E402

MC = [{"question": "To be, or not to", "choices": [" be", " see", " run"], "label": 0},
      {"question": "The king is", "choices": [" dead", " here", " a"], "label": 2},
      {"question": "O Romeo, Romeo,", "choices": [" wherefore", " why"], "label": 0}]
TEXTS = [{"text": "First Citizen: Before we proceed any further, hear me speak."},
         {"text": "All: Speak, speak. " * 12}]  # longer than the 64-token context: several windows
GEN = [{"prompt": "First Citizen:", "answer": "x"}, {"prompt": "You are all resolved", "answer": "y"}]


def task_files(folder: Path, data: Path) -> list[str]:
    for name, rows in (("mc", MC), ("text", TEXTS), ("gen", GEN)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = lambda name: (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data / name}.jsonl\n"
                           "test_split: test\n")
    (folder / "mc.yaml").write_text("task: pocketlm_tiny_mc\n" + common("mc") +
                                    'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
                                    'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n')
    (folder / "ppl.yaml").write_text("task: pocketlm_tiny_ppl\n" + common("text") +
                                     'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                                     "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (folder / "gen.yaml").write_text("task: pocketlm_tiny_gen\n" + common("gen") +
                                     'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
                                     'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
                                     "metric_list:\n  - metric: exact_match\n")
    return ["pocketlm_tiny_mc", "pocketlm_tiny_ppl", "pocketlm_tiny_gen"]


@pytest.fixture(scope="module")
def setup(tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ckpt = save_checkpoint(root / "tiny", model.eval(), tok)
    (root / "tasks").mkdir()
    (root / "data").mkdir()
    return ckpt, root, task_files(root / "tasks", root / "data")


def logprob(model, ids: list[int], start: int) -> float:
    """Sum of log p(ids[i]) for i >= start, from one forward pass."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
    return sum(lp[i - 1, ids[i]].item() for i in range(start, len(ids)))


def test_local_tasks_end_to_end_match_direct_computation(setup):
    import pocketlm.eval.lm_eval  # noqa: F401  registers "pocketlm"
    from lm_eval.tasks import TaskManager

    ckpt, root, tasks = setup
    out = lm_eval.simple_evaluate(model="pocketlm", model_args=f"path={ckpt},dtype=fp32,batch_size=4", tasks=tasks,
                                  task_manager=TaskManager(include_path=str(root / "tasks")), log_samples=True)
    res = out["results"]
    model, tok = load_model(ckpt)
    bos = tok.bos_id
    # multiple choice: the choice with the highest log-likelihood after the question
    hits = 0
    for row in MC:
        ctx = [bos] + tok.encode(row["question"])
        scores = [logprob(model, ctx + tok.encode(row["question"] + c)[len(ctx) - 1:], len(ctx)) for c in row["choices"]]
        hits += max(range(len(scores)), key=scores.__getitem__) == row["label"]
    assert res["pocketlm_tiny_mc"]["acc,none"] == pytest.approx(hits / len(MC))
    # rolling log-likelihood: the first text fits one window, so it is log p(text | BOS)
    first = tok.encode(TEXTS[0]["text"])
    lp_first = logprob(model, [bos] + first, 1)
    sample = next(s for s in out["samples"]["pocketlm_tiny_ppl"] if s["doc"]["text"] == TEXTS[0]["text"])
    assert sample["filtered_resps"][0] == pytest.approx(lp_first, abs=1e-3)
    long = next(s for s in out["samples"]["pocketlm_tiny_ppl"] if s["doc"]["text"] == TEXTS[1]["text"])
    assert len(tok.encode(TEXTS[1]["text"])) > 64 and long["filtered_resps"][0] < lp_first  # several windows, all scored
    total_bytes = sum(len(t["text"].encode()) for t in TEXTS)
    lps = [s["filtered_resps"][0] for s in out["samples"]["pocketlm_tiny_ppl"]]
    assert res["pocketlm_tiny_ppl"]["bits_per_byte,none"] == pytest.approx(-sum(lps) / total_bytes / math.log(2), rel=1e-6)
    # generation: greedy, cut at the first newline
    for s in out["samples"]["pocketlm_tiny_gen"]:
        want = tok.decode(greedy_generate(model, tok, [tok.encode(s["doc"]["prompt"])], 6)[0],
                          skip_special_tokens=True).split("\n")[0]
        assert s["resps"][0][0] == want


@pytest.mark.slow  # a second process importing lm-eval and building the task: about a minute and a half here
def test_the_lm_eval_cli_with_pocketlm_registered(setup, tmp_path):
    ckpt, root, _ = setup
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "pocketlm.eval.lm_eval", "--model", "pocketlm", "--model_args",
                           f"path={ckpt},dtype=fp32", "--tasks", "pocketlm_tiny_mc", "--include_path", str(root / "tasks"),
                           "--output_path", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = list((tmp_path / "out").rglob("results_*.json"))
    assert files and "acc,none" in json.loads(files[0].read_text())["results"]["pocketlm_tiny_mc"]
