"""Run configuration: a YAML file with `model:`, `train:` (and for fine-tuning `finetune:`) sections,
plus --key=value overrides.

Every section is a plain dataclass, parsed by the same code: an unknown key is an error that lists the
valid keys, and a value is checked against the field's annotated type (an override string is parsed to
it: `--finetune.pack=ture` is an error, not False).
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
    batch_size: int = 32            # sequences per micro-batch (per process under torchrun); with
                                    # global_batch: the largest micro-batch a rank may run
    seq_len: int = 256              # tokens per sequence
    grad_accum: int = 1             # micro-batches per optimizer step (derived when global_batch is set)
    global_batch: int = 0           # sequences per optimizer step over all ranks; 0 = batch_size x
                                    # grad_accum x ranks. Micro-batch and accumulation follow the world size
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
    budget_clock: str = "wall"      # what max_minutes counts: wall | cpu (this process's CPU time, all its
                                    # threads: a budget of CPU-minutes holds on a machine other jobs share)
    eval_every: int = 100           # steps between validation passes
    eval_batches: int = 20          # micro-batches per validation pass
    eval_at_start: bool = False     # also validate before the first step (the "before" of a fine-tune)
    ckpt_every: int = 0             # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2       # newest N kept (plus `best`)
    early_stopping_patience: int = 0  # stop after N evals without val improvement; 0 = off
    dtype: str = "bf16"             # autocast dtype: bf16 | fp32
    compile: bool = False           # torch.compile the model
    compile_scope: str = "model"    # model: one graph, fastest steps | blocks: one graph all blocks share,
                                    # a shorter cold compile for ~10% slower steps (measured on CPU)
    seed: int = 1337
    log_every: int = 10
    dist: str = "auto"              # under torchrun: auto (FSDP2; DDP for LoRA) | ddp | fsdp; one process
                                    # trains the plain model (fsdp under a one-rank torchrun still shards)

    def __post_init__(self):
        choices = {"optimizer": ("adamw", "muon"), "schedule": ("cosine", "wsd", "constant"), "dtype": ("bf16", "fp32"),
                   "compile_scope": ("model", "blocks"), "dist": ("auto", "ddp", "fsdp"),
                   "budget_clock": ("wall", "cpu")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(f"train.{key}: expected one of {valid}, got {getattr(self, key)!r}")
        for key in ("batch_size", "seq_len", "grad_accum", "max_steps", "eval_batches", "log_every", "eval_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key}: expected a positive integer, got {getattr(self, key)}")
        if self.global_batch < 0:
            raise ConfigError(f"train.global_batch: expected 0 (off) or a positive number of sequences, got {self.global_batch}")

    def for_world(self, world_size: int) -> "TrainConfig":
        """This config with batch_size (the micro-batch) and grad_accum derived from global_batch for
        `world_size` ranks: each rank runs global_batch / world_size sequences a step, in the fewest
        equal micro-batches of at most batch_size. Every micro-batch holds the same number of sequences,
        so a step's loss (a mean of means) is the mean over the global batch at any world size."""
        if not self.global_batch or self.batch_size * self.grad_accum * world_size == self.global_batch:
            return self  # off, or already derived for this world size
        if self.grad_accum != 1:
            raise ConfigError(f"train.grad_accum: derived from train.global_batch; leave it at 1 (got {self.grad_accum})")
        if self.global_batch % world_size:
            raise ConfigError(f"train.global_batch: {self.global_batch} sequences do not split evenly over "
                              f"{world_size} ranks; use a multiple of {world_size}")
        per_rank = self.global_batch // world_size
        micro = max(d for d in range(1, min(self.batch_size, per_rank) + 1) if per_rank % d == 0)
        return dataclasses.replace(self, batch_size=micro, grad_accum=per_rank // micro)


@dataclass
class FinetuneConfig:
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    val_fraction: float = 0.05      # held out of the training file when there is no --val-data
    max_val_examples: int = 500
    group_by_length: bool = True    # batch examples of similar length (less padding)
    # Pack short examples into rows of up to seq_len tokens (batch_size then counts rows). Off by default:
    # on 2 CPU cores, grouping by length already leaves ~1% padding, and packed epochs ran ~12% slower
    # (longer rows, masked attention; benchmarks/packing.py). It pays where grouping cannot (37% padding unsorted).
    pack: bool = False
    system: str | None = None
    instruction: str | None = None
    labels: str | None = None       # classification: "0=negative,1=positive"
    no_answer: str | None = None    # QA reply for unanswerable questions
    limit: int = 0                  # use only the first N training rows (0: all)
    skip_invalid: bool = False      # leave out rows that fail validation (counted and reported) instead of stopping


# Fine-tuning wants gentler settings than pre-training's TrainConfig defaults; a config file or a
# --key=value override replaces any of them.
FINETUNE_TRAIN_DEFAULTS = {"batch_size": 8, "seq_len": 1024, "max_steps": 300, "warmup_steps": 20, "lr": 3e-5,
                           "weight_decay": 0.0, "min_lr_ratio": 0.0, "eval_every": 50, "eval_batches": 50,
                           "log_every": 10}
LORA_LR = 5e-4


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}


class ConfigError(PocketLMError):
    pass


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "finetune": FinetuneConfig}


def _coerce(section: str, f: dataclasses.Field, value, cls=None):
    """Parse override strings and check YAML values against the field's annotated type."""
    kind = typing.get_type_hints(cls or SECTIONS[section])[f.name]
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
    names = "/".join("None" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"{section}.{f.name}: expected {names}, got {value!r}")


def _fields(section: str) -> dict:
    return {f.name: f for f in fields(SECTIONS[section])}


def read_sections(path, sections: tuple[str, ...]) -> dict[str, dict]:
    """The YAML file's sections (each a dict, possibly empty); None reads as no file."""
    raw = {s: {} for s in sections}
    if path is None:
        return raw
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(loaded, dict) or set(loaded) - set(sections):
        got = list(loaded) if isinstance(loaded, dict) else type(loaded).__name__
        raise ConfigError(f"{path}: expected top-level sections {', '.join(map(repr, sections))}, got {got}")
    for section in sections:
        values = loaded.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r}: expected key: value pairs, got {values!r}")
        raw[section].update(values)
    return raw


def apply_overrides(raw: dict[str, dict], overrides: dict | None, keys: dict[str, set] | None = None) -> dict[str, dict]:
    """Merge {'train.lr': '3e-4', 'n_layer': '6'} into raw's sections. A bare name goes to the one
    section that has it; `keys` (section -> names) narrows which names a bare key may mean."""
    keys = keys or {s: set(_fields(s)) for s in raw}
    for key, value in (overrides or {}).items():
        section, _, name = key.rpartition(".")
        if not section:
            owners = [s for s in raw if name in keys[s]]
            if len(owners) != 1:
                valid = sorted(f"{s}.{n}" for s in raw for n in keys[s])
                raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
            section = owners[0]
        if section not in raw:
            raise ConfigError(f"unknown config section {section!r} in --{key}; valid: {', '.join(raw)}")
        raw[section][name] = value
    return raw


def parse_section(section: str, values: dict, cls=None):
    """One section's dataclass (SECTIONS[section], or `cls`) from a dict of YAML values or override
    strings, every key validated."""
    cls = cls or SECTIONS[section]
    valid = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(valid)
    if unknown:
        raise ConfigError(f"unknown {section} keys {sorted(unknown)}; valid keys: {', '.join(sorted(valid))}")
    typed = {k: _coerce(section, valid[k], v, cls) for k, v in values.items()}
    try:
        return cls(**typed)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def load_config(path=None, overrides: dict | None = None) -> RunConfig:
    """Pre-training: model + train from defaults < the YAML file < overrides."""
    raw = apply_overrides(read_sections(path, ("model", "train")), overrides)
    return RunConfig(parse_section("model", raw["model"]), parse_section("train", raw["train"]))


@dataclass
class FinetuneRunConfig:
    train: TrainConfig
    finetune: FinetuneConfig
    dropout: float | None = None    # model.dropout, the one model key that applies (None: the model's own)


def load_finetune_config(path=None, overrides: dict | None = None, flags: dict | None = None) -> FinetuneRunConfig:
    """Fine-tuning: train (FINETUNE_TRAIN_DEFAULTS, LoRA's lr) + finetune + model.dropout, from
    defaults < the YAML file < flags and overrides. The architecture comes from the model itself."""
    raw = read_sections(path, ("model", "train", "finetune"))
    if set(raw["model"]) - {"dropout"}:
        raise ConfigError(f"{path}: model section: only 'dropout' applies when fine-tuning "
                          f"(the architecture comes from --model), got {sorted(raw['model'])}")
    for key in overrides or {}:
        if key.startswith("model.") and key != "model.dropout":
            raise ConfigError(f"--{key}: only model.dropout applies when fine-tuning")
    keys = {"model": {"dropout"}, "train": set(_fields("train")), "finetune": set(_fields("finetune"))}
    raw = apply_overrides(raw, overrides, keys)
    raw["finetune"].update({k: v for k, v in (flags or {}).items() if v is not None})
    ft = parse_section("finetune", raw["finetune"])
    defaults = {**FINETUNE_TRAIN_DEFAULTS, **({"lr": LORA_LR} if ft.lora else {})}
    train = parse_section("train", {**defaults, **raw["train"]})
    dropout = raw["model"].get("dropout")
    if dropout is not None:
        dropout = _coerce("model", _fields("model")["dropout"], dropout)
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.dropout: expected a value in [0, 1), got {dropout}")
    return FinetuneRunConfig(train, ft, dropout)


def parse_overrides(args: list[str]) -> dict:
    """['--train.lr=3e-4', '--n_layer=6'] -> {'train.lr': '3e-4', 'n_layer': '6'}"""
    out = {}
    for a in args:
        if not a.startswith("--") or "=" not in a:
            raise ConfigError(f"bad override {a!r}: expected --key=value (for example --train.lr=3e-4)")
        k, v = a[2:].split("=", 1)
        out[k.replace("-", "_")] = v
    return out
