"""Run checkpoints: step-N directories (and `best`), written atomically, and resume.

A checkpoint holds the weights (or a LoRA adapter), the optimizers, the data cursor, the loop's state
(step, elapsed time, best val loss) and every rank's RNG state, so a resumed run under torchrun
draws each rank's dropout masks where that rank left off, not rank 0's on every rank.

A full-weights run saves the model and optimizers through torch.distributed.checkpoint (`dcp/`, every
rank its own shards; see dcp.py), which any world size loads, beside a consolidated model.safetensors
(what export, generate and serve read). Every rank writes into `.NAME.staging/` (under torchrun on
several nodes, the run directory must be on a filesystem they share); rank 0 then moves it into the
checkpoint's temporary directory and renames that into place. On CUDA a periodic save is
asynchronous: the next save (or the end of the run) completes it. A LoRA run's checkpoint holds its
adapter and optim.pt, written by rank 0 (LoRA trains under DDP: every rank holds the whole state).
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file

from pocketlm.config import TrainConfig
from pocketlm.model.checkpoint import CheckpointError, list_checkpoints, load_weights, save_checkpoint, WEIGHTS
from pocketlm.train import dcp
from pocketlm.train.dist import DistInfo, barrier, gather_objects

DCP_DIR = "dcp"
ASYNC_DEVICES = ("cuda",)  # where periodic saves write in the background (on CPU the copy would cost as much)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


class Checkpointer:
    """Writes step-N checkpoints (and `best`): every rank its DCP shards, rank 0 the rest and the
    rename into place; keeps the newest few, and restores a run at any world size.
    `save_weights(dir, model)` / `load_weights(dir, model)` replace the full-weights save and load
    (a LoRA run saves and restores only its adapter; the frozen base is read from its source again)."""

    def __init__(self, run_dir: Path, model, tokenizer, optimizers, train_data, cfg: TrainConfig, dist: DistInfo,
                 extra_config: dict | None = None, save_weights=None, load_weights=None):
        self.dir = Path(run_dir) / "checkpoints"
        self.model, self.tokenizer, self.optimizers, self.train_data = model, tokenizer, optimizers, train_data
        self.cfg, self.dist, self.extra_config = cfg, dist, extra_config
        self.save_weights, self.load_weights = save_weights, load_weights
        self._pending = None  # (name, staging dir, loop state, async future, safetensors thread): a save to complete
        self._group = None

    def save(self, step: int, state: dict, name: str | None = None, blocking: bool = True) -> None:
        """Called on every rank (it gathers the ranks' RNG states). `blocking=False` lets a CUDA run
        write the DCP shards in the background; the checkpoint appears when the next save completes it."""
        self.wait()
        rngs = gather_objects(rng_state())  # rngs[r]: rank r's generator
        name = name or f"step-{step:06d}"
        full_state = {**state, "step": step, "data": self.train_data.state_dict(), "rng": rngs}
        if self.save_weights is not None:  # a LoRA run: rank 0 holds the whole (small) state
            if self.dist.is_main:
                optim = {"optimizers": [o.state_dict() for o in self.optimizers]}
                save_checkpoint(self.dir / name, self.model, self.tokenizer, state=full_state, optimizer_state=optim,
                                extra_config=self.extra_config, save_weights=self.save_weights)
            self._finished(name)
            return
        staging = self.dir / f".{name}.staging"
        if self.dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        asynchronous = not blocking and self.dist.device.type in ASYNC_DEVICES
        weights = dcp.full_weights(self.model)  # a collective under FSDP2; the whole model, on CPU, on rank 0
        if asynchronous and self.dist.device.type == "cpu":  # on CPU those are the live tensors: copy them
            weights = {k: v.clone() for k, v in weights.items()}
        writer = None
        if self.dist.is_main:  # the consolidated copy: in a thread of its own when the save is asynchronous
            writer = threading.Thread(target=save_file, args=(weights, str(staging / WEIGHTS)),
                                      kwargs={"metadata": {"format": "pt"}})
            writer.start()
            if not asynchronous:
                writer.join()
        future = dcp.save_state(staging / DCP_DIR, self.model, self.optimizers, self._async_group() if asynchronous
                                else None, asynchronous=asynchronous)
        self._pending = (name, staging, full_state, future, writer)
        if not asynchronous:
            self.wait()

    def wait(self) -> None:
        """Complete the save in flight, if any: rank 0 moves its staging directory into place."""
        if self._pending is None:
            return
        name, staging, full_state, future, writer = self._pending
        self._pending = None
        if future is not None:
            future.result()  # on rank 0 this returns once every rank's shards and the metadata are written
        if writer is not None:
            writer.join()

        def move_staged(tmp, model):
            for part in (WEIGHTS, DCP_DIR):
                (staging / part).rename(tmp / part)

        if self.dist.is_main:
            save_checkpoint(self.dir / name, self.model, self.tokenizer, state=full_state,
                            extra_config=self.extra_config, save_weights=move_staged)
            shutil.rmtree(staging)
        self._finished(name)

    def _finished(self, name: str) -> None:
        if self.dist.is_main and name.startswith("step-"):
            for old in list_checkpoints(self.dir.parent)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old)
        barrier()

    def _async_group(self):
        """A gloo group for the background save's collectives, apart from the training's NCCL ones."""
        import torch.distributed as td

        if self._group is None and td.is_initialized():
            self._group = td.new_group(backend="gloo")
        return self._group

    def restore(self) -> dict | None:
        """The newest checkpoint's loop state (None when there is none), its weights, optimizer state,
        data cursor and this rank's RNG restored. A DCP checkpoint loads at any world size."""
        found = list_checkpoints(self.dir.parent)
        if not found:
            return None
        path = found[-1]
        if self.load_weights is not None:
            self.load_weights(path, self.model)
        elif (path / DCP_DIR).is_dir():
            dcp.load_state(path / DCP_DIR, self.model, self.optimizers)
        elif (path / WEIGHTS).exists():  # written before checkpoints went through DCP
            load_weights(self.model, path / WEIGHTS)
        else:
            raise CheckpointError(f"{path}: holds a LoRA adapter, not {WEIGHTS}; resume it as a LoRA run (--lora)")
        if self.load_weights is not None or not (path / DCP_DIR).is_dir():
            optim = torch.load(path / "optim.pt", weights_only=True)
            for opt, sd in zip(self.optimizers, optim["optimizers"]):
                opt.load_state_dict(sd)
        state = json.loads((path / "state.json").read_text())
        self.train_data.load_state_dict(state["data"])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # older checkpoints: rank 0's only
        if self.dist.rank < len(rngs):
            set_rng_state(rngs[self.dist.rank])
        else:  # resumed on more ranks than it was saved from: this rank keeps its fresh seed
            print(f"rank {self.dist.rank}: {path} holds RNG states of {len(rngs)} ranks; this rank's RNG starts "
                  "from its seed", file=sys.stderr)
        return state
