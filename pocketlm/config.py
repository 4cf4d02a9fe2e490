"""Run configuration: a YAML file with `model:` and `train:` sections, plus --key=value overrides.

Both sections are plain dataclasses; an unknown key or a value of the wrong type is an error that
lists what is valid.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from pocketlm.model.gpt import ModelConfig
from pocketlm.errors import PocketLMError


@dataclass
class TrainConfig:
    batch_size: int = 32            # sequences per micro-batch (per process under torchrun)
    seq_len: int = 256              # tokens per sequence
    grad_accum: int = 1             # micro-batches per optimizer step
    optimizer: str = "adamw"        # adamw | muon (Muon on hidden matrices, AdamW on the rest)
    lr: float = 1e-3                # peak learning rate (AdamW)
    muon_lr: float = 0.02           # peak learning rate of the Muon matrices
    min_lr_ratio: float = 0.1       # final lr = lr * min_lr_ratio
    schedule: str = "cosine"        # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 50
    decay_fraction: float = 0.2     # wsd: share of steps spent decaying
    weight_decay: float = 0.1       # decoupled, on matrices only (not norms, biases, embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0          # max global grad norm; 0 disables
    max_steps: int = 1000
    max_minutes: float = 0.0        # time budget; 0 = none. The schedule is stretched to fit it.
    eval_every: int = 100           # steps between validation passes
    eval_batches: int = 20          # micro-batches per validation pass
    eval_at_start: bool = False     # also validate before the first step (the "before" of a fine-tune)
    ckpt_every: int = 0             # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2       # newest N kept (plus `best`)
    early_stopping_patience: int = 0  # stop after N evals without val improvement; 0 = off
    dtype: str = "bf16"             # autocast dtype: bf16 | fp32
    compile: bool = False           # torch.compile the model
    compile_scope: str = "model"    # model: one graph, fastest steps | blocks: each block alone, a
                                    # ~2.5x quicker cold compile for ~10% slower steps (measured on CPU)
    seed: int = 1337
    log_every: int = 10

    def __post_init__(self):
        choices = {"optimizer": ("adamw", "muon"), "schedule": ("cosine", "wsd", "constant"), "dtype": ("bf16", "fp32"),
                   "compile_scope": ("model", "blocks")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(f"train.{key}: expected one of {valid}, got {getattr(self, key)!r}")
        for key in ("batch_size", "seq_len", "grad_accum", "max_steps", "eval_batches", "log_every", "eval_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key}: expected a positive integer, got {getattr(self, key)}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}


class ConfigError(PocketLMError):
    pass


def _coerce(section: str, f: dataclasses.Field, value):
    """Parse override strings and check YAML values against the field's annotated type."""
    kind = typing.get_type_hints(ModelConfig if section == "model" else TrainConfig)[f.name]
    allowed = typing.get_args(kind) or (kind,)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, str):
        if bool in allowed and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if value.lower() in ("none", "null") and type(None) in allowed:
            return None
        for t in (int, float):
            if t in allowed:
                try:
                    return t(value)
                except ValueError:
                    pass
        if str in allowed:
            return value
    else:
        if isinstance(value, bool) and bool not in allowed:
            pass
        elif type(value) in allowed:
            return value
        elif isinstance(value, int) and float in allowed:
            return float(value)
    names = "/".join(t.__name__ for t in allowed)
    raise ConfigError(f"{section}.{f.name}: expected {names}, got {value!r}")


def _fields(section: str):
    return {f.name: f for f in fields(ModelConfig if section == "model" else TrainConfig)}


def load_config(path=None, overrides: dict | None = None) -> RunConfig:
    raw = {"model": {}, "train": {}}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if not isinstance(loaded, dict) or set(loaded) - {"model", "train"}:
            raise ConfigError(f"{path}: expected top-level sections 'model' and 'train', got {list(loaded) if isinstance(loaded, dict) else type(loaded).__name__}")
        for section in raw:
            raw[section].update(loaded.get(section) or {})
    for key, value in (overrides or {}).items():
        section, _, name = key.rpartition(".")
        if not section:  # a bare name: find the one section that has it
            owners = [s for s in raw if name in _fields(s)]
            if len(owners) != 1:
                valid = sorted(f"{s}.{n}" for s in raw for n in _fields(s))
                raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
            section = owners[0]
        raw.setdefault(section, {})[name] = value
    out = {}
    for section, values in raw.items():
        valid = _fields(section) if section in ("model", "train") else {}
        if not valid:
            raise ConfigError(f"unknown config section {section!r}; valid: model, train")
        unknown = set(values) - set(valid)
        if unknown:
            raise ConfigError(f"unknown {section} keys {sorted(unknown)}; valid keys: {', '.join(sorted(valid))}")
        out[section] = {k: _coerce(section, valid[k], v) for k, v in values.items()}
    try:
        return RunConfig(ModelConfig(**out["model"]), TrainConfig(**out["train"]))
    except ValueError as e:
        raise ConfigError(str(e)) from e


def parse_overrides(args: list[str]) -> dict:
    """['--train.lr=3e-4', '--n_layer=6'] -> {'train.lr': '3e-4', 'n_layer': '6'}"""
    out = {}
    for a in args:
        if not a.startswith("--") or "=" not in a:
            raise ConfigError(f"bad override {a!r}: expected --key=value (for example --train.lr=3e-4)")
        k, v = a[2:].split("=", 1)
        out[k.replace("-", "_")] = v
    return out
