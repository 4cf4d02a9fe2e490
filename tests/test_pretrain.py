import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY
from pocketlm.cli import main

FP32 = TINY + ["--train.dtype=fp32", "--train.ckpt_every=4"]


def weights(run, step):
    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_writes_a_self_describing_run(data_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(data_dir), "--out", str(run), "--max-steps", "12", *TINY]) == 0
    ck = run / "checkpoints" / "step-000012"
    assert {"model.safetensors", "config.json", "tokenizer.json", "dcp", "state.json"} <= {p.name for p in ck.iterdir()}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_bpb" in r for r in records) and any("tokens_per_s" in r for r in records)
    assert (run / "loss.png").stat().st_size > 1000
    results = json.loads((run / "results.json").read_text())
    assert results["step"] == 12 and 0 < results["full_val_bpb"] < 8
    losses = [r["loss"] for r in records if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])  # it learns


def test_resume_is_bitwise_identical(data_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["pretrain", "--data", str(data_dir), "--out", str(straight), "--max-steps", "16", *FP32,
                 "--model.dropout=0.1"]) == 0
    # the same run, stopped at step 8 and resumed: max_steps must be the same so the lr schedule is
    assert main(["pretrain", "--data", str(data_dir), "--out", str(split), "--max-steps", "16", *FP32,
                 "--model.dropout=0.1", "--train.keep_checkpoints=10"]) == 0
    import shutil
    for late in ("step-000012", "step-000016"):
        shutil.rmtree(split / "checkpoints" / late)
    assert main(["pretrain", "--data", str(data_dir), "--out", str(split), "--max-steps", "16", *FP32,
                 "--model.dropout=0.1", "--resume"]) == 0
    assert same(weights(straight, 16), weights(split, 16))


def test_resume_after_sigkill(data_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ["--data", str(data_dir), "--max-steps", "40", *FP32, "--train.eval_every=1000"]
    assert main(["pretrain", "--out", str(straight), *args]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "pocketlm.cli", "pretrain", "--out", str(killed), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-000008").exists() and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert "step-000040" not in done, "the run finished before it was killed; the test proves nothing"
    assert main(["pretrain", "--out", str(killed), *args, "--resume"]) == 0
    assert same(weights(straight, 40), weights(killed, 40))


@pytest.mark.parametrize("override,match", [("--train.lr=fast", "train.lr: expected float"),
                                            ("--train.bogus=1", "unknown train keys ['bogus']"),
                                            ("--train.optimizer=sgd", "adamw"),
                                            ("--n_layers=2", "valid keys")])
def test_bad_config_names_the_key(data_dir, tmp_path, capsys, override, match):
    assert main(["pretrain", "--data", str(data_dir), "--out", str(tmp_path / "r"), override]) == 2
    assert match in capsys.readouterr().err


def test_muon_and_wsd_train(data_dir, tmp_path):
    run = tmp_path / "muon"
    assert main(["pretrain", "--data", str(data_dir), "--out", str(run), "--max-steps", "10", *TINY,
                 "--train.optimizer=muon", "--train.schedule=wsd"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_ddp_two_processes_match_one(data_dir, tmp_path):
    """torchrun with 2 gloo processes of batch 2 follows the same loss curve as 1 process of batch 4."""
    common = ["--data", str(data_dir), "--max-steps", "6", *TINY, "--train.dtype=fp32", "--train.eval_every=1000"]
    one = tmp_path / "one"
    assert main(["pretrain", "--out", str(one), *common, "--train.batch_size=4"]) == 0
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
                    "-m", "pocketlm.cli", "pretrain", "--out", str(two), *common, "--train.batch_size=2"],
                   check=True, env=env, capture_output=True, timeout=300)
    curve = lambda run: [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert curve(one) == pytest.approx(curve(two), rel=1e-4)
    w1, w2 = weights(one, 6), weights(two, 6)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
