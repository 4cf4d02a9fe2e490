"""The training loop's time budget and gradient accumulation, through `pretrain` and `train()`."""

import copy
import json

import pytest
import torch

from conftest import TINY
from pocketlm.cli import main
from pocketlm.config import load_config
from pocketlm.model import GPT, ModelConfig
from pocketlm.tokenizer import Tokenizer
from pocketlm.train.loop import train

QUICK = [*TINY, "--train.eval_every=100000", "--train.dtype=fp32", "--train.warmup_steps=1"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is ~30x quicker per step than two contending
    OpenMP threads, and the time-budget test wants steps, not spin-waits."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def results(run):
    return json.loads((run / "results.json").read_text())


def logged(run, key):
    return [r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


def test_max_minutes_stops_the_run_and_the_schedule_decays_to_it(data_dir, tmp_path):
    run = tmp_path / "run"
    budget_s = 3.0
    common = ["pretrain", "--data", str(data_dir), "--out", str(run), "--max-steps", "100000", *QUICK]
    assert main([*common, "--max-minutes", str(budget_s / 60)]) == 0
    r = results(run)
    assert r["stop_reason"] == "time budget" and 5 <= r["step"] < 100000
    assert budget_s <= r["elapsed_s"] < budget_s + 10
    lrs = logged(run, "lr")
    # the cosine spans the budget: the lr falls step by step and the last step ran near the floor
    # (lr 1e-2, min_lr_ratio 0.1)
    assert lrs[0] == pytest.approx(1e-2) and lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.3e-2
    # the budget is the run's, not the process's: a resume with the same budget has nothing left
    assert main([*common, "--max-minutes", str(budget_s / 60), "--resume"]) == 0
    assert results(run)["step"] == r["step"] and results(run)["stop_reason"] == "time budget"
    # a longer budget continues from where the time ran out
    assert main([*common, "--max-minutes", str(2 * budget_s / 60), "--resume"]) == 0
    longer = results(run)
    assert longer["step"] > r["step"] and 2 * budget_s <= longer["elapsed_s"] and longer["stop_reason"] == "time budget"


def test_a_cpu_budget_counts_this_process_cpu_time_not_the_wall(data_dir, tmp_path, monkeypatch):
    """train.budget_clock: cpu. Each batch here also waits 50 ms without computing (as a step does when
    other jobs hold the cores): the wall clock runs on, the CPU budget does not."""
    import time

    from pocketlm.train import loop

    unpack = loop._unpack
    monkeypatch.setattr(loop, "_unpack", lambda *a: (time.sleep(0.05), unpack(*a))[1])
    run, budget_s = tmp_path / "run", 1.0
    t0 = time.perf_counter()
    assert main(["pretrain", "--data", str(data_dir), "--out", str(run), "--max-steps", "100000", *QUICK,
                 "--max-minutes", str(budget_s / 60), "--train.budget_clock=cpu"]) == 0
    wall, r = time.perf_counter() - t0, results(run)
    assert r["stop_reason"] == "time budget" and budget_s <= r["elapsed_s"] < budget_s + 5
    assert wall > r["elapsed_s"] + 0.9 * 0.05 * r["step"]  # the waits are not in the budget


class Batches:
    """Fixed batches; each one of `big` is served whole or as `parts` micro-batches of equal rows."""

    def __init__(self, big, parts):
        self.micro = [b for x in big for b in zip(x[0].chunk(parts), x[1].chunk(parts))]
        self.i = 0

    def next_batch(self):
        self.i += 1
        return self.micro[self.i - 1]

    def state_dict(self):
        return {"i": self.i}


def test_gradient_accumulation_equals_a_bigger_batch(tokenizer_dir, tmp_path):
    tok = Tokenizer.load(tokenizer_dir)
    g = torch.Generator().manual_seed(0)
    steps, rows, seq = 4, 8, 16
    big = [(lambda t: (t[:, :-1], t[:, 1:]))(torch.randint(0, tok.vocab_size, (rows, seq + 1), generator=g))
           for _ in range(steps)]
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=seq))
    out = {}
    for accum in (1, 4):
        cfg = load_config(None, {"train.max_steps": steps, "train.dtype": "fp32", "train.log_every": 1, "train.lr": 1e-3,
                                 "train.warmup_steps": 1, "train.batch_size": rows // accum, "train.seq_len": seq,
                                 "train.grad_accum": accum, "train.grad_clip": 0.5}).train  # the clip sees the whole step
        m = copy.deepcopy(model)
        result = train(m, tok, cfg, Batches(big, accum), None, tmp_path / f"accum{accum}")
        out[accum] = m, logged(tmp_path / f"accum{accum}", "loss"), result
    (m1, loss1, r1), (m4, loss4, r4) = out[1], out[4]
    assert len(loss1) == steps and loss4 == pytest.approx(loss1, rel=1e-5)
    assert r1["tokens"] == r4["tokens"] == steps * rows * seq
    for (name, a), b in zip(m1.state_dict().items(), m4.state_dict().values()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0, msg=name)
    assert not torch.equal(m1.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])  # it trained
