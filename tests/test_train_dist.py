"""Two gloo ranks under `python -m torch.distributed.run` with a time budget, then a resume.

Rank 1's clock runs at twice the speed of rank 0's, as a slow or late-starting rank's would drift: a
rank that decided the stop from its own clock would leave the loop before the other (a collective
mismatch: a hang or an error) and train with a different lr. The run must stop on the same step on
both ranks with identical weights, and a resume must give each rank back its own RNG state.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent('''
    import json, sys, time, types
    from pathlib import Path
    import torch
    from pocketlm.config import load_config
    from pocketlm.data.loader import PretrainBatches
    from pocketlm.model.gpt import GPT, ModelConfig
    from pocketlm.tokenizer import Tokenizer
    from pocketlm.train import checkpointer, dist, loop

    data, out, minutes, resume = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "resume"
    info = dist.setup_distributed()
    if info.rank == 1:  # this rank's clock runs twice as fast
        loop.time = types.SimpleNamespace(perf_counter=lambda: 2 * time.perf_counter())
    cfg = load_config(None, {"train.max_steps": 100000, "train.max_minutes": minutes, "train.batch_size": 2,
                             "train.seq_len": 32, "train.dtype": "fp32", "train.warmup_steps": 1, "train.lr": 1e-2,
                             "train.log_every": 1, "model.dropout": 0.1,
                             "train.dist": "ddp"})  # replicas: each rank's whole weights, compared below
    rng = out / "rng"
    rng.mkdir(parents=True, exist_ok=True)
    save, restore = checkpointer.Checkpointer.save, checkpointer.Checkpointer.restore
    def recording_save(self, step, state, name=None):  # each rank's own generator when it checkpoints
        torch.save(torch.get_rng_state(), rng / f"saved-{info.rank}-{step}.pt")
        save(self, step, state, name)
    def recording_restore(self):
        state = restore(self)
        torch.save(torch.get_rng_state(), rng / f"restored-{info.rank}.pt")
        return state
    checkpointer.Checkpointer.save, checkpointer.Checkpointer.restore = recording_save, recording_restore
    tok = Tokenizer.load(data / "tokenizer")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.1))
    batches = PretrainBatches(data, 2, 32, seed=cfg.train.seed, rank=info.rank, world_size=info.world_size)
    result = loop.train(model, tok, cfg.train, batches, None, out / "run", resume=resume, dist=info)
    torch.save(model.state_dict(), out / f"weights-{info.rank}.pt")
    (out / f"result-{info.rank}.json").write_text(json.dumps(result))
    dist.teardown()
''')


def torchrun(script, data_dir, out, minutes, mode):
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           str(script), str(data_dir), str(out), str(minutes), mode]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        # a hung run: SIGTERM lets torchrun stop its workers (they wait on a collective, in sessions of
        # their own); SIGKILL to the launcher's group only if that does not end it
        proc.terminate()
        try:
            log, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
        pytest.fail(f"the 2-rank run hung (ranks out of step?):\n{log[-3000:]}")
    assert proc.returncode == 0, log[-3000:]
    results = [json.loads((out / f"result-{r}.json").read_text()) for r in range(2)]
    weights = [torch.load(out / f"weights-{r}.pt", weights_only=True) for r in range(2)]
    return results, weights, log


@pytest.mark.slow
def test_two_ranks_stop_together_on_a_time_budget_and_resume_their_own_rng(data_dir, tmp_path):
    script = tmp_path / "run_two.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    results, weights, _ = torchrun(script, data_dir, out, 0.05, "fresh")
    step = results[0]["step"]
    assert [r["stop_reason"] for r in results] == ["time budget"] * 2 and results[1]["step"] == step >= 2
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # one lr schedule for both
    saved = [torch.load(out / "rng" / f"saved-{r}-{step}.pt") for r in range(2)]
    assert not torch.equal(saved[0], saved[1])  # the ranks' dropout streams differ

    results, weights, log = torchrun(script, data_dir, out, 0.1, "resume")
    assert f"resumed from step {step}" in log
    for r in range(2):  # each rank continues its own dropout stream, not rank 0's
        assert torch.equal(torch.load(out / "rng" / f"restored-{r}.pt"), saved[r]), f"rank {r}"
    assert [r["stop_reason"] for r in results] == ["time budget"] * 2 and results[1]["step"] == results[0]["step"] > step
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    state = json.loads(sorted((out / "run" / "checkpoints").glob("step-*"))[-1].joinpath("state.json").read_text())
    assert len(state["rng"]) == 2
