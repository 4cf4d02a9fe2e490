"""One training of the tiny model, under `python -m torch.distributed.run` or in one process, for
tests/test_scale.py. Every rank records the global sample index and a hash of every row it trains on,
and (on request) the full training state right after a resume and right after the last save, so the
test can compare runs at different world sizes. Run as `scale_worker.py JOB.json`; one process may also
call `run(job)` directly.

job: {"data", "out", "tag", "overrides": {config key: value}, "runs": [[dist, optimizer], ...] (several
trainings in one launch, for the comparison test), "dump_state": bool, "kill": {"rank", "step", "when":
"batch" | "save", "once": marker path or null}, "muon_check": bool}
"""

import contextlib
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

from pocketlm.config import load_config
from pocketlm.data.loader import PretrainBatches
from pocketlm.model.gpt import GPT, ModelConfig
from pocketlm.tokenizer import Tokenizer
from pocketlm.train import checkpointer, dist, loop
from pocketlm.train.dcp import full_weights


def full_state(model, optimizers) -> dict:
    """Model and optimizer state, whole, on rank 0 (a collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizers, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": msd, "optim": osd}


def die(marker):
    if marker:
        if Path(marker).exists():
            return
        Path(marker).write_text("killed once")
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def instrument(job, info, out: Path, tag: str):
    """Hooks on the Checkpointer (undone on exit): state dumps and a SIGKILL in the middle of a save."""
    kill = job.get("kill") or {}
    save, wait, restore = checkpointer.Checkpointer.save, checkpointer.Checkpointer.wait, checkpointer.Checkpointer.restore

    def dumping_save(self, step, state, name=None, blocking=True):
        save(self, step, state, name, blocking)
        if job.get("dump_state") and name is None and step == self.cfg.max_steps:
            sd = full_state(self.model, self.optimizers)
            if info.is_main:
                torch.save(sd, out / f"saved-{tag}.pt")

    def killing_wait(self):
        if self._pending is not None and kill.get("when") == "save" and info.rank == kill["rank"] \
                and self._pending[0] == f"step-{kill['step']:06d}":
            die(kill.get("once"))  # the shards are written, the checkpoint is not in place yet
        wait(self)

    def dumping_restore(self):
        state = restore(self)
        if job.get("dump_state") and state is not None:
            sd = full_state(self.model, self.optimizers)
            if info.is_main:
                torch.save(sd, out / f"restored-{tag}.pt")
        return state

    checkpointer.Checkpointer.save = dumping_save
    checkpointer.Checkpointer.wait = killing_wait
    checkpointer.Checkpointer.restore = dumping_restore
    try:
        yield
    finally:
        checkpointer.Checkpointer.save, checkpointer.Checkpointer.wait, checkpointer.Checkpointer.restore = save, wait, restore


def recording(batches, info, file: Path, kill: dict, global_batch: int):
    """next_batch that logs (global sample index, sha256 of the row) and may SIGKILL this rank."""
    inner = batches.next_batch

    def next_batch():
        start = batches.samples + batches.rank * batches.batch_size
        if kill.get("when") == "batch" and info.rank == kill["rank"] and start // global_batch == kill["step"]:
            die(kill.get("once"))
        x, y = inner()
        rows = torch.cat([x, y[:, -1:]], dim=1)
        with open(file, "a") as f:
            for i, row in enumerate(rows):
                f.write(json.dumps([start + i, hashlib.sha256(row.numpy().tobytes()).hexdigest()]) + "\n")
        return x, y

    batches.next_batch = next_batch


def muon_check(info, out: Path) -> None:
    """Three Muon steps on a 7x5 matrix sharded over the ranks (uneven: FSDP2 pads; on two nodes
    replicated across them) against torch's Muon on the whole matrix in this process: the gathered
    result must be bitwise equal."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from pocketlm.train.optim import Muon

    torch.manual_seed(0)
    w, grads = torch.randn(7, 5), [torch.randn(7, 5) for _ in range(3)]
    sharded = torch.nn.Linear(5, 7, bias=False)
    sharded.weight.data.copy_(w)
    fully_shard(sharded, mesh=dist.device_mesh(info))
    reference = torch.nn.Parameter(w.clone())
    opt, ref = Muon(sharded.parameters(), lr=0.02, weight_decay=0.1), torch.optim.Muon([reference], lr=0.02, weight_decay=0.1)
    for g in grads:
        sharded.weight.grad = distribute_tensor(g, sharded.weight.device_mesh, sharded.weight.placements)
        reference.grad = g.clone()
        opt.step()
        ref.step()
    full = sharded.weight.full_tensor()
    if info.is_main:
        (out / "muon.json").write_text(json.dumps({"equal": torch.equal(full, reference.detach()),
                                                   "local_rows": sharded.weight.to_local().shape[0],
                                                   "mesh": list(sharded.weight.device_mesh.shape)}))


def train_once(job, info, out: Path, tag: str, strategy: str | None = None, optimizer: str | None = None) -> None:
    data = Path(job["data"])
    overrides = {**job.get("overrides", {}), **({"train.dist": strategy} if strategy else {}),
                 **({"train.optimizer": optimizer} if optimizer else {})}
    cfg = load_config(None, overrides).train.for_world(info.world_size)
    tok = Tokenizer.load(data / "tokenizer")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0))
    batches = PretrainBatches(data, cfg.batch_size, cfg.seq_len, seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    global_batch = cfg.batch_size * cfg.grad_accum * info.world_size
    recording(batches, info, out / f"batches-{tag}-{info.rank}.jsonl", job.get("kill") or {}, global_batch)
    result = loop.train(model, tok, cfg, batches, None, out / f"run-{job.get('run', tag)}", resume=True, dist=info)
    weights = full_weights(model)
    if info.is_main:
        torch.save(weights, out / f"weights-{tag}.pt")
        (out / f"result-{tag}.json").write_text(json.dumps(result))


def run(job: dict) -> None:
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    info = dist.setup_distributed()
    try:
        if job.get("muon_check"):
            muon_check(info, out)
        with instrument(job, info, out, job["tag"]):
            for strategy, optimizer in job.get("runs") or [[None, None]]:
                tag = f"{job['tag']}-{strategy}-{optimizer}" if strategy else job["tag"]
                train_once(job if strategy is None else {**job, "run": tag}, info, out, tag, strategy, optimizer)
    finally:
        dist.teardown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(json.loads(Path(sys.argv[1]).read_text()))
    # Every result is on disk and the groups are destroyed: skip interpreter shutdown, where a gloo
    # thread outliving Python aborts a rank now and then on a loaded 2-core CI (pytorch/pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
