"""Scale-out on gloo/CPU with the tiny model, through `python -m torch.distributed.run` (tests/scale_worker.py
does the training): FSDP2 against DDP and one process, checkpoints that reshard across world sizes with
byte-identical global batches, bitwise resume after SIGKILL, an elastic restart, and the guard on DCP's
pickled metadata.

Tolerances, after 20 steps of lr 1e-2 in fp32 (observed on this machine in brackets):
- AdamW: weights within 1e-4 absolute of one process [1.6e-5 at 2 and 4 ranks], each step's loss
  within 1e-4 relative [9e-8]; FSDP2 within 1e-5 of DDP [2.4e-7 at 2 ranks, 1.5e-6 at 4]. The ranks'
  gradient sums add in another order than one process's batch: a last-bit difference.
- Muon: Newton-Schulz runs in bf16, which turns those last-bit gradient differences into ~1% steps:
  weights within 10% (relative norm per tensor) of one process [3.6% at 2 ranks, 4.3% at 4] and of DDP
  [bitwise equal at 2 ranks, 3.4% at 4], each step's loss within 1e-3 relative [3.5e-5]. The sharded
  Muon itself (gather, orthogonalize, keep the slice) is checked bitwise against torch's Muon on the
  whole matrix, at every world size.
"""

import hashlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import scale_worker
from pocketlm.cli import main

WORKER = Path(__file__).with_name("scale_worker.py")
REPO = Path(__file__).resolve().parents[1]
BASE = {"train.global_batch": 8, "train.batch_size": 2, "train.seq_len": 32, "train.dtype": "fp32",
        "train.warmup_steps": 1, "train.lr": 1e-2, "train.schedule": "constant", "train.log_every": 1,
        "train.eval_every": 100000}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def launch(job: dict, nproc: int, *torchrun_args, expect_ok: bool = True, nodes: int = 1) -> str:
    """The worker under torchrun with `nproc` gloo ranks (nproc 0: one plain process, no torchrun); with
    `nodes` > 1, that many torchrun agents of `nproc` ranks each on this host, as on separate nodes."""
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    spec = out / f"job-{job['tag']}.json"
    spec.write_text(json.dumps(job))
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if nproc == 0:
        cmds = [[sys.executable, str(WORKER), str(spec)]]
    elif nodes == 1:
        cmds = [[*run, "--standalone", *torchrun_args, str(WORKER), str(spec)]]
    else:
        with socket.socket() as s:  # a free port for node 0's store
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmds = [[*run, "--nnodes", str(nodes), "--node-rank", str(n), "--master-addr", "127.0.0.1",
                 "--master-port", str(port), *torchrun_args, str(WORKER), str(spec)] for n in range(nodes)]
    procs = [subprocess.Popen(c, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for c in cmds]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"{nproc}-rank run hung:\n{proc.communicate()[0][-3000:]}")
    log = "\n".join(logs)
    assert all((p.returncode == 0) == expect_ok for p in procs), f"exit {[p.returncode for p in procs]}:\n{log[-3000:]}"
    return log


def in_process(job: dict) -> None:
    scale_worker.run(job)


def weights(out: Path, tag: str) -> dict:
    return torch.load(out / f"weights-{tag}.pt", weights_only=True)


def losses(out: Path, run: str) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / f"run-{run}" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def global_batches(out: Path, tags: list[str], global_batch: int = 8) -> list[str]:
    """One hash per optimizer step over its global batch: the rows every rank trained on, in global
    sample order. Also checks each step is exactly samples [s*G, (s+1)*G)."""
    rows = {}
    for tag in tags:
        for f in out.glob(f"batches-{tag}-*.jsonl"):
            for line in f.read_text().splitlines():
                i, h = json.loads(line)
                assert rows.setdefault(i, h) == h, f"sample {i} seen twice with different bytes"
    steps = defaultdict(list)
    for i in sorted(rows):
        steps[i // global_batch].append(rows[i])
    assert sorted(rows) == list(range(len(rows))) and all(len(v) == global_batch for v in steps.values())
    return [hashlib.sha256("".join(steps[s]).encode()).hexdigest() for s in sorted(steps)]


def assert_same_state(a: dict, b: dict, where: str) -> None:
    """Bitwise equal nested state (tensors, numbers, lists)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def compare_with_one_process(data_dir, tmp_path, nproc, nodes=1):
    out = tmp_path / "out"
    job = {"data": str(data_dir), "out": str(out), "overrides": {**BASE, "train.max_steps": 20}}
    launch({**job, "tag": "many", "muon_check": True,
            "runs": [["ddp", "adamw"], ["fsdp", "adamw"], ["ddp", "muon"], ["fsdp", "muon"]]}, nproc, nodes=nodes)
    in_process({**job, "tag": "one", "runs": [["auto", "adamw"], ["auto", "muon"]]})
    # 7 rows sharded over a node's ranks (padded to a multiple), replicated across nodes
    mesh = [nodes, nproc] if nodes > 1 else [nproc]  # hybrid: replicate across nodes x shard within one
    assert json.loads((out / "muon.json").read_text()) == {"equal": True, "local_rows": -(-7 // nproc), "mesh": mesh}
    for opt, w_tol, loss_tol in (("adamw", 1e-4, 1e-4), ("muon", 0.1, 1e-3)):
        one = weights(out, f"one-auto-{opt}")
        ref_losses = losses(out, f"one-auto-{opt}")
        assert len(ref_losses) == 20 and ref_losses[-1] < ref_losses[0] - 0.5  # it trained
        for strategy in ("ddp", "fsdp"):
            w = weights(out, f"many-{strategy}-{opt}")
            assert w.keys() == one.keys()
            for k in one:
                if opt == "adamw":
                    assert (w[k] - one[k]).abs().max() < w_tol, (strategy, opt, k)
                else:
                    assert (w[k] - one[k]).norm() / one[k].norm() < w_tol, (strategy, opt, k)
            assert losses(out, f"many-{strategy}-{opt}") == pytest.approx(ref_losses, rel=loss_tol), (strategy, opt)
        ddp, fsdp = weights(out, f"many-ddp-{opt}"), weights(out, f"many-fsdp-{opt}")
        if opt == "adamw":
            assert all((ddp[k] - fsdp[k]).abs().max() < 1e-5 for k in ddp)
        else:  # DDP all-reduces, FSDP2 reduce-scatters: another order of the same sums, then bf16 again
            assert all((ddp[k] - fsdp[k]).norm() / ddp[k].norm() < w_tol for k in ddp)


def test_fsdp2_at_two_ranks_matches_ddp_and_one_process_with_adamw_and_muon(data_dir, tmp_path):
    compare_with_one_process(data_dir, tmp_path, 2)


@pytest.mark.slow
def test_fsdp2_at_four_ranks_matches_ddp_and_one_process(data_dir, tmp_path):
    compare_with_one_process(data_dir, tmp_path, 4)


@pytest.mark.slow
def test_hybrid_sharding_on_two_nodes_of_two_ranks_matches_ddp_and_one_process(data_dir, tmp_path):
    """Two torchrun agents on this host as two nodes (LOCAL_WORLD_SIZE 2 < WORLD_SIZE 4): FSDP2 shards
    within a node and replicates across them, on a 2-D device mesh."""
    compare_with_one_process(data_dir, tmp_path, 2, nodes=2)


@pytest.mark.parametrize("worlds", [(1, 2, 1), pytest.param((1, 2, 4, 1), marks=pytest.mark.slow)])
def test_resumes_across_world_sizes_see_the_same_global_batches_and_reshard_bitwise(data_dir, tmp_path, worlds):
    """One config (global_batch 8) trained in segments of 2 steps at each world size in turn, resuming
    from the last segment's checkpoint (FSDP2 under torchrun): every hop restores the state the
    previous world size saved bit for bit, and every step's global batch is the uninterrupted run's."""
    out = tmp_path / "out"
    job = {"data": str(data_dir), "out": str(out), "dump_state": True}
    for seg, world in enumerate(worlds):
        seg_job = {**job, "tag": f"seg{seg}", "run": "segmented", "overrides": {**BASE, "train.max_steps": 2 * (seg + 1)}}
        if world == 1:
            in_process(seg_job)
        else:
            launch(seg_job, world)
        if seg:  # what this world size restored is what the previous one saved
            assert_same_state(torch.load(out / f"saved-seg{seg - 1}.pt", weights_only=True),
                              torch.load(out / f"restored-seg{seg}.pt", weights_only=True), f"hop {worlds[seg - 1]}->{world}")
    steps = 2 * len(worlds)
    in_process({**job, "tag": "whole", "dump_state": False, "overrides": {**BASE, "train.max_steps": steps}})
    segmented = global_batches(out, [f"seg{s}" for s in range(len(worlds))])
    assert len(segmented) == steps and segmented == global_batches(out, ["whole"])
    # the same model, up to the ranks' reduction order
    final, whole = weights(out, f"seg{len(worlds) - 1}"), weights(out, "whole")
    assert all((final[k] - whole[k]).abs().max() < 1e-4 for k in whole)
    ckpt = out / "run-segmented" / "checkpoints" / f"step-{steps:06d}"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "dcp" / ".metadata").exists()


def start(job: dict, nproc: int, capsys) -> str:
    """A run that is not killed: in this process when nproc is 0 (no interpreter to start), else torchrun."""
    if nproc:
        return launch(job, nproc)
    in_process(job)
    return capsys.readouterr().out


def uninterrupted(data_dir, tmp_path, nproc, capsys):
    """6 steps with a checkpoint every 2: the run a killed one must reproduce."""
    out = tmp_path / "out"
    job = {"data": str(data_dir), "out": str(out), "overrides": {**BASE, "train.max_steps": 6, "train.ckpt_every": 2}}
    start({**job, "tag": "whole"}, nproc, capsys)
    return out, job, weights(out, "whole")


@pytest.mark.parametrize("nproc", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_after_sigkill_mid_checkpoint_is_bitwise_equal(data_dir, tmp_path, nproc, capsys):
    """SIGKILL in the middle of the step-4 save (shards written, not yet renamed into place): the resume
    starts from step 2 and ends with the uninterrupted run's weights, bit for bit (nproc 0: one plain
    process; 2: two FSDP2 ranks)."""
    out, job, whole = uninterrupted(data_dir, tmp_path, nproc, capsys)
    killed = {**job, "tag": "killed", "kill": {"rank": 0, "step": 4, "when": "save", "once": None}}
    launch(killed, nproc, expect_ok=False)
    ckpts = out / "run-killed" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000002"]  # the torn save is not a checkpoint
    log = start({**job, "tag": "resumed", "run": "killed"}, nproc, capsys)
    assert "resumed from step 2" in log
    resumed = weights(out, "resumed")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP's, from its background thread
def test_async_periodic_saves_hold_the_weights_of_their_step(data_dir, tmp_path, capsys, monkeypatch):
    """The CUDA path's asynchronous saves, forced on CPU: each checkpoint holds its own step's weights
    (staged before training goes on), bit for bit those of a blocking run, which trains the same."""
    from safetensors.torch import load_file

    from pocketlm.train import checkpointer

    out, job, whole = uninterrupted(data_dir, tmp_path, 0, capsys)
    monkeypatch.setattr(checkpointer, "ASYNC_DEVICES", ("cpu", "cuda"))
    start({**job, "tag": "async"}, 0, capsys)
    assert all(torch.equal(weights(out, "async")[k], whole[k]) for k in whole)
    for step in (4, 6):  # keep_checkpoints 2
        name = f"step-{step:06d}"
        a, b = (load_file(out / f"run-{r}" / "checkpoints" / name / "model.safetensors") for r in ("async", "whole"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not list((out / "run-async" / "checkpoints").glob(".*"))  # no staging left behind


@pytest.mark.slow
def test_a_killed_rank_under_max_restarts_recovers_from_the_last_checkpoint(data_dir, tmp_path, capsys):
    """Rank 1 SIGKILLs itself in step 3; torchrun (--max-restarts 1) restarts both ranks, which resume
    from the step-2 checkpoint and end where an uninterrupted run does, bit for bit."""
    out, job, whole = uninterrupted(data_dir, tmp_path, 2, capsys)
    marker = out / "killed-once"
    log = launch({**job, "tag": "elastic", "kill": {"rank": 1, "step": 3, "when": "batch", "once": str(marker)}},
                 2, "--max-restarts", "1")
    assert marker.exists() and "resumed from step 2" in log
    elastic = weights(out, "elastic")
    assert all(torch.equal(elastic[k], whole[k]) for k in whole)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_metadata_is_refused_before_it_runs(data_dir, tmp_path):
    """A checkpoint whose DCP .metadata pickles a call to os.system: `pretrain --resume` stops with a
    one-line error naming the file, and the command never runs. torch's own reader would run it."""
    run, marker = tmp_path / "run", tmp_path / "pwned"
    args = ["pretrain", "--data", str(data_dir), "--out", str(run), "--max-steps", "2", "--model.n_layer=2",
            "--model.n_head=2", "--model.n_embd=32", "--train.batch_size=2", "--train.seq_len=32",
            "--train.dtype=fp32", "--train.eval_every=100000"]
    assert main(args) == 0
    metadata = run / "checkpoints" / "step-000002" / "dcp" / ".metadata"
    from pocketlm.train.dcp import read_metadata

    assert read_metadata(metadata).state_dict_metadata  # the genuine file reads
    metadata.write_bytes(pickle.dumps(Payload(marker), protocol=4))
    assert main([*args, "--max-steps", "3", "--resume"]) == 2
    assert not marker.exists()
    from torch.distributed.checkpoint import FileSystemReader

    with pytest.raises(AttributeError):  # the hole this guards: torch's reader runs the payload, then fails
        FileSystemReader(str(metadata.parent)).read_metadata()
    assert marker.exists()


def test_non_tensor_entries_load_weights_only():
    """DCP's default planner reads non-tensor entries with torch.load(weights_only=False); ours does not."""
    import io

    from pocketlm.train.dcp import SafeLoadPlanner

    buf = io.BytesIO()
    torch.save(Payload("/nonexistent/never"), buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        SafeLoadPlanner().load_bytes(None, buf)


def test_auto_picks_fsdp2_under_torchrun_and_ddp_for_lora():
    from pocketlm.model.gpt import GPT, ModelConfig
    from pocketlm.model.lora import add_lora
    from pocketlm.train.dist import DistInfo, choose_strategy

    model = GPT(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=16))
    two = DistInfo(rank=0, world_size=2)
    assert [choose_strategy(model, s, two) for s in ("auto", "ddp", "fsdp")] == ["fsdp", "ddp", "fsdp"]
    assert choose_strategy(model, "auto", DistInfo()) == "none"  # one process: the plain module
    add_lora(model, 4, 8.0, 0.0, "q_proj,v_proj")  # frozen bf16-able base beside fp32 adapters
    assert choose_strategy(model, "auto", two) == "ddp"
