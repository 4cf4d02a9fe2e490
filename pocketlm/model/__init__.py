"""Model, checkpoints, and loading from any source a user can point at."""

from __future__ import annotations

import json
from pathlib import Path

from pocketlm.model.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from pocketlm.model.gpt import GPT, ModelConfig

__all__ = ["GPT", "ModelConfig", "load_model", "save_checkpoint", "CheckpointError"]


def load_model(source, device="cpu"):
    """(model, tokenizer) from a run directory, a checkpoint directory, a Hugging Face folder or a .gguf file."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory (expected a run, a checkpoint, a Hugging Face folder or a .gguf file)")
    if path.suffix == ".gguf":
        from pocketlm.model.gguf import load_gguf
        return load_gguf(path, device=device)
    config = path / "config.json"
    if path.is_dir() and config.exists():
        try:
            raw = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config}: invalid JSON at line {e.lineno}: {e.msg}") from e
        if "model" not in raw:  # a Hugging Face folder (config.json holds model_type/architectures)
            from pocketlm.model.hf import load_hf
            return load_hf(path, device=device)
    return load_checkpoint(resolve_checkpoint(path), device=device)
