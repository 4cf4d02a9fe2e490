"""Run checkpoints: step-N directories (and `best`), written atomically by rank 0, and resume.

A checkpoint holds the weights (or a LoRA adapter), the optimizers, the data cursor, the loop's state
(step, elapsed time, best val loss) and every rank's RNG state, so a resumed run under torchrun
draws each rank's dropout masks where that rank left off, not rank 0's on every rank.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from pocketlm.config import TrainConfig
from pocketlm.model.checkpoint import CheckpointError, list_checkpoints, load_weights, save_checkpoint, WEIGHTS
from pocketlm.train.dist import DistInfo, barrier, gather_objects


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
    """Writes step-N checkpoints (and `best`) on rank 0, keeps the newest few, and restores a run.
    `save_weights(dir, model)` / `load_weights(dir, model)` replace the full-weights save and load
    (a LoRA run saves and restores only its adapter; the frozen base is read from its source again)."""

    def __init__(self, run_dir: Path, model, tokenizer, optimizers, train_data, cfg: TrainConfig, dist: DistInfo,
                 extra_config: dict | None = None, save_weights=None, load_weights=None):
        self.dir = Path(run_dir) / "checkpoints"
        self.model, self.tokenizer, self.optimizers, self.train_data = model, tokenizer, optimizers, train_data
        self.cfg, self.dist, self.extra_config = cfg, dist, extra_config
        self.save_weights, self.load_weights = save_weights, load_weights

    def save(self, step: int, state: dict, name: str | None = None) -> None:
        """Called on every rank (it gathers the ranks' RNG states); rank 0 writes."""
        rngs = gather_objects(rng_state())  # rngs[r]: rank r's generator
        if self.dist.is_main:
            path = self.dir / (name or f"step-{step:06d}")
            full_state = {**state, "step": step, "data": self.train_data.state_dict(), "rng": rngs}
            optim = {"optimizers": [o.state_dict() for o in self.optimizers]}
            save_checkpoint(path, self.model, self.tokenizer, state=full_state, optimizer_state=optim,
                            extra_config=self.extra_config, save_weights=self.save_weights)
            if name is None:
                for old in list_checkpoints(self.dir.parent)[: -self.cfg.keep_checkpoints]:
                    shutil.rmtree(old)
        barrier()

    def restore(self) -> dict | None:
        """The newest checkpoint's loop state (None when there is none), its weights, optimizer state,
        data cursor and this rank's RNG restored."""
        found = list_checkpoints(self.dir.parent)
        if not found:
            return None
        path = found[-1]
        if self.load_weights is not None:
            self.load_weights(path, self.model)
        elif (path / WEIGHTS).exists():
            load_weights(self.model, path / WEIGHTS)
        else:
            raise CheckpointError(f"{path}: holds a LoRA adapter, not {WEIGHTS}; resume it as a LoRA run (--lora)")
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
