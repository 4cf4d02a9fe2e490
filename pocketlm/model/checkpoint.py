"""Checkpoint directories: weights (safetensors), config and tokenizer beside them; training state apart.

    step-000100/
      model.safetensors     weights only, loadable without unpickling
      config.json           {"model": ModelConfig fields}
      tokenizer.json, tokenizer_config.json
      dcp/                  a training run's model + optimizer state through torch.distributed.checkpoint
                            (every rank's shards; any world size resumes it: pocketlm/train/dcp.py)
      optim.pt              a LoRA run's optimizer state, in place of dcp/ (torch.save; loaded with
                            weights_only=True)
      state.json            step, RNG states, data cursor, metrics

A LoRA run's checkpoints hold the adapter (adapter_config.json + adapter_model.safetensors, PEFT's
format) in place of model.safetensors: the base model is read again from where it came from.

A checkpoint is written under a temporary name and renamed into place, so a killed run never
leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pocketlm.model.gpt import GPT, ModelConfig
from pocketlm.model.lora import ADAPTER_WEIGHTS
from pocketlm.tokenizer import Tokenizer
from pocketlm.errors import PocketLMError

WEIGHTS = "model.safetensors"


class CheckpointError(PocketLMError):
    pass


def model_state(model: GPT) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # the same tensor as embed_tokens.weight
    return sd


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield a temporary sibling directory; on success its files are fsynced and it replaces `path`
    by rename, so readers see the old directory or the complete new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)


def save_checkpoint(path, model: GPT, tokenizer: Tokenizer | None, state: dict | None = None,
                    optimizer_state: dict | None = None, extra_config: dict | None = None, save_weights=None) -> Path:
    """save_weights(dir, model), if given, writes the model's weights instead of model.safetensors
    (a LoRA run writes only its adapter), inside the same atomic directory."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        if save_weights is None:
            save_file(model_state(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        else:
            save_weights(tmp, model)
        (tmp / "config.json").write_text(json.dumps({"model": model.cfg.to_dict(), **(extra_config or {})}, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optim.pt")
        if state is not None:
            (tmp / "state.json").write_text(json.dumps(state))
    return path


def read_config(path) -> ModelConfig:
    file = Path(path) / "config.json"
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; a checkpoint directory holds config.json and {WEIGHTS}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if "model" not in raw:
        raise CheckpointError(f"{file}: no 'model' section (is this a Hugging Face folder? use `pocketlm import`)")
    try:
        return ModelConfig.from_dict(raw["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {e}") from e


def load_weights(model: GPT, file) -> None:
    try:
        sd = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors weights ({e})") from e
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (model.cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{file}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_checkpoint(path, device="cpu") -> tuple[GPT, Tokenizer | None]:
    path = Path(path)
    cfg = read_config(path)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    load_weights(model, path / WEIGHTS)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if cfg.arch == "llama":
        model._rope_cache = None
    tok = Tokenizer.load(path) if (path / "tokenizer.json").exists() else None
    return model.eval(), tok


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are skipped)."""
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    done = [p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith("step-")
            and ((p / WEIGHTS).exists() or (p / ADAPTER_WEIGHTS).exists())]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def resolve_checkpoint(path) -> Path:
    """A run directory means its best checkpoint if it kept one, else its newest."""
    path = Path(path)
    if (path / WEIGHTS).exists():
        return path
    if (path / "checkpoints" / "best" / WEIGHTS).exists():
        return path / "checkpoints" / "best"
    found = list_checkpoints(path)
    if (path / ADAPTER_WEIGHTS).exists() or (found and not (found[-1] / WEIGHTS).exists()):
        raise CheckpointError(f"{path}: a LoRA run or adapter holds no model weights, only the adapter; "
                              f"load its base model with it: --model BASE --adapter {path}")
    if not found:
        raise CheckpointError(f"{path}: no checkpoint found (expected {WEIGHTS} or checkpoints/step-N/)")
    return found[-1]
