"""LoRA (Hu et al., 2021): train a low-rank update B @ A beside each frozen projection.

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r), B starts at zero

`LoRALinear` is an `nn.Linear` subclass that keeps the base `weight`/`bias` under their own names,
so a model with adapters still loads, saves and exports its base weights unchanged.

Adapters are saved in PEFT's format (adapter_config.json + adapter_model.safetensors, keys named
after the Hugging Face export of the base model), so `peft.PeftModel.from_pretrained` loads them
onto `pocketlm export`'s output. GPT-2 exports fuse q/k/v into one `c_attn` matrix; there the
q/k/v adapters are saved as one adapter of rank (r x number of fused targets) whose A stacks the
A's and whose B is block-diagonal, which is the same update.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pocketlm.model.gpt import GPT
from pocketlm.errors import PocketLMError

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTN_TARGETS + MLP_TARGETS
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FUSED_QKV = ("q_proj", "k_proj", "v_proj")  # order of the rows of GPT-2's c_attn


class AdapterError(PocketLMError):
    pass


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank update (unmerged until `merge()`)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: no copy
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):  # cast the input once, not once per matmul
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = F.linear(x, self.weight, self.bias)
        # the scaling goes into the small B matrix rather than over the (tokens x out) result
        z = F.linear(F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype)), (self.lora_B * self.scaling).to(x.dtype))
        return y + z

    def delta(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W + scaling * B @ A (the adapter costs nothing at inference)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight.float() + self.delta())
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def parse_targets(targets, cfg) -> list[str]:
    """'q_proj,v_proj' or 'all' / 'attn' / 'mlp' -> the projection names this architecture has."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    names = []
    for t in targets:
        expand = {"all": ALL_TARGETS, "attn": ATTN_TARGETS, "mlp": MLP_TARGETS}.get(t, (t,))
        for n in expand:
            if n not in ALL_TARGETS:
                raise AdapterError(f"lora target {n!r}: expected some of {', '.join(ALL_TARGETS)} (or all/attn/mlp)")
            if n == "gate_proj" and cfg.arch == "gpt2":
                if t == "gate_proj":
                    raise AdapterError("lora target 'gate_proj': GPT-2 style models have no gate_proj (their MLP is up_proj, down_proj)")
                continue
            if n not in names:
                names.append(n)
    if not names:
        raise AdapterError("lora targets: empty list")
    return names


def _target_modules(model: GPT, targets):
    for i, layer in enumerate(model.layers):
        for name in targets:
            parent = layer.attn if name in ATTN_TARGETS else layer.mlp
            yield f"layers.{i}.{'attn' if name in ATTN_TARGETS else 'mlp'}.{name}", parent, name


def add_lora(model: GPT, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj") -> GPT:
    """Freeze the model and wrap the target projections of every layer in LoRALinear (in place)."""
    if rank <= 0:
        raise AdapterError(f"lora rank: expected a positive integer, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise AdapterError(f"lora dropout: expected a value in [0, 1), got {dropout}")
    names = parse_targets(targets, model.cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, parent, name in _target_modules(model, names):
        base = getattr(parent, name)
        if isinstance(base, LoRALinear):
            raise AdapterError(f"{name} already has an adapter; merge it first")
        setattr(parent, name, LoRALinear(base, rank, alpha, dropout))
    model.lora = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": names}
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our own names (layers.0.attn.q_proj.lora_A): what the training loop checkpoints."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its base weight and put plain nn.Linear modules back."""
    for name, mod in list(lora_modules(model).items()):
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, mod.merged_linear())
    model.lora = None
    return model


# ---- PEFT format -------------------------------------------------------------------------------

def _hf_name(cfg, ours: str) -> str:
    """layers.3.attn.q_proj -> the module's name in the Hugging Face export."""
    m = re.fullmatch(r"layers\.(\d+)\.(attn|mlp)\.(\w+)", ours)
    i, part, proj = m.groups()
    if cfg.arch == "llama":
        return f"model.layers.{i}.{'self_attn' if part == 'attn' else 'mlp'}.{proj}"
    hf = {"q_proj": "attn.c_attn", "k_proj": "attn.c_attn", "v_proj": "attn.c_attn", "o_proj": "attn.c_proj",
          "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"}[proj]
    return f"transformer.h.{i}.{hf}"


def _hf_targets(cfg, targets) -> list[str]:
    if cfg.arch == "llama":
        return list(targets)
    return sorted({_hf_name(cfg, f"layers.0.{'attn' if t in ATTN_TARGETS else 'mlp'}.{t}").split(".", 3)[3] for t in targets})


def save_adapter(model: GPT, out, base_model: str | None = None, extra_files: dict | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's layout."""
    info = getattr(model, "lora", None)
    mods = lora_modules(model)
    if not info or not mods:
        raise AdapterError("model has no LoRA adapters to save")
    cfg, r, alpha = model.cfg, info["rank"], info["alpha"]
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    fused = [t for t in FUSED_QKV if t in info["targets"]] if cfg.arch == "gpt2" else []
    for ours, mod in mods.items():
        key = "base_model.model." + _hf_name(cfg, ours)
        if ours.rsplit(".", 1)[1] in fused:
            continue
        tensors[key + ".lora_A.weight"] = mod.lora_A.detach().float().contiguous()
        tensors[key + ".lora_B.weight"] = mod.lora_B.detach().float().contiguous()
    if fused:  # GPT-2: stack the q/k/v adapters into one adapter on c_attn
        n = len(fused)
        rank_pattern["attn.c_attn"], alpha_pattern["attn.c_attn"] = r * n, alpha * n  # same alpha/r scaling
        for i, layer in enumerate(model.layers):
            a = torch.cat([getattr(layer.attn, t).lora_A.detach().float() for t in fused])
            width = layer.attn.q_proj.out_features
            b = torch.zeros(3 * width, r * n)
            for j, t in enumerate(fused):
                row = FUSED_QKV.index(t) * width
                b[row:row + width, j * r:(j + 1) * r] = getattr(layer.attn, t).lora_B.detach().float()
            key = f"base_model.model.transformer.h.{i}.attn.c_attn"
            tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = a.contiguous(), b
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "lora_dropout": info["dropout"], "target_modules": _hf_targets(cfg, info["targets"]),
        "bias": "none", "fan_in_fan_out": cfg.arch == "gpt2", "modules_to_save": None, "inference_mode": True,
        "init_lora_weights": True, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "use_rslora": False, "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "pocketlm_targets": ",".join(info["targets"])}
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata=meta)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    for name, text in (extra_files or {}).items():
        (out / name).write_text(text)
    return out


def resolve_adapter(path) -> Path:
    """An adapter folder, or a LoRA fine-tuning run (its adapter/ folder)."""
    path = Path(path)
    for p in (path, path / "adapter"):
        if (p / ADAPTER_CONFIG).exists() and (p / ADAPTER_WEIGHTS).exists():
            return p
    return path  # _read_adapter names what is missing


def _read_adapter(path: Path):
    cfg_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.exists() or not weights.exists():
        raise AdapterError(f"{path}: not an adapter directory (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_file}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("use_dora", "use_rslora"):
        if config.get(key):
            raise AdapterError(f"{cfg_file}: {key}=true is not supported")
    try:
        tensors = load_file(str(weights))
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights}: cannot read safetensors ({e})") from None
    return config, tensors, meta


def _scaling(config, hf_module: str, rank: int) -> float:
    """PEFT's rule: alpha_pattern keys are regexes matched against the end of the module name."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", hf_module):
            alpha = value
            break
    return alpha / rank


def adapter_updates(model: GPT, path):
    """Read a PEFT-format LoRA adapter for `model`: its adapter_config.json and a list of
    (module name, A, B, scaling), one per adapted projection, checked against the model's shapes."""
    path = resolve_adapter(path)
    config, tensors, meta = _read_adapter(path)
    cfg = model.cfg
    # GPT-2 adapters we wrote say which of q/k/v are stacked in c_attn; a PEFT-trained one is dense
    ours_targets = meta.get("pocketlm_targets", "").split(",")
    fused = [t for t in FUSED_QKV if t in ours_targets]
    hf_to_ours: dict[str, list[str]] = {}
    for ours, _, _ in _target_modules(model, parse_targets("all", cfg)):
        hf_to_ours.setdefault(_hf_name(cfg, ours), []).append(ours)
    used, updates = set(), []
    for hf, ours_list in hf_to_ours.items():
        ka, kb = f"base_model.model.{hf}.lora_A.weight", f"base_model.model.{hf}.lora_B.weight"
        if ka not in tensors:
            continue
        a, b = tensors[ka], tensors[kb] if kb in tensors else None
        if b is None:
            raise AdapterError(f"{path / ADAPTER_WEIGHTS}: {ka} has no matching lora_B")
        used.update((ka, kb))
        scaling = _scaling(config, hf, a.size(0))
        for ours in ours_list:
            proj = ours.rsplit(".", 1)[1]
            base = model.get_submodule(ours)
            aa, bb = a, b
            if len(ours_list) > 1:  # GPT-2 fused c_attn: this projection's rows of B
                rows = base.out_features  # c_attn stacks q, k, v of equal width
                j = FUSED_QKV.index(proj)
                bb = b[j * rows:(j + 1) * rows]
                if fused:  # block-diagonal: keep only this projection's own rank-r block
                    if proj not in fused:
                        continue
                    r = a.size(0) // len(fused)
                    cols = slice(fused.index(proj) * r, (fused.index(proj) + 1) * r)
                    aa, bb = a[cols], bb[:, cols]
            if aa.size(1) != base.in_features or bb.size(0) != base.out_features or bb.size(1) != aa.size(0):
                raise AdapterError(f"{path / ADAPTER_WEIGHTS}: {ka}: shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit "
                                   f"{ours} ({base.in_features} -> {base.out_features}); was it trained on another model?")
            if len(ours_list) > 1 and not fused and not bb.any():
                continue  # this projection was not a target
            updates.append((ours, aa, bb, scaling))
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise AdapterError(f"{path / ADAPTER_WEIGHTS}: tensors {unknown[:3]} match no {cfg.arch} projection of this model")
    if not used:
        raise AdapterError(f"{path / ADAPTER_WEIGHTS}: no LoRA tensors found")
    return config, updates


def apply_adapter(model: GPT, path, merge: bool = True, dropout: float = 0.0) -> GPT:
    """Load a PEFT-format LoRA adapter onto `model`. merge=True folds it into the weights (inference);
    merge=False leaves trainable LoRALinear modules (to continue training)."""
    config, updates = adapter_updates(model, path)
    ranks = set()
    for ours, a, b, scaling in updates:
        parent_name, proj = ours.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        base = getattr(parent, proj)
        if isinstance(base, LoRALinear):
            raise AdapterError(f"{ours} already has an adapter; merge it first")
        lin = LoRALinear(base, a.size(0), scaling * a.size(0), dropout)
        with torch.no_grad():
            lin.lora_A.copy_(a)
            lin.lora_B.copy_(b)
        setattr(parent, proj, lin)
        ranks.add(a.size(0))
    if merge:
        return merge_lora(model)
    targets = sorted({n.rsplit(".", 1)[1] for n in lora_modules(model)}, key=ALL_TARGETS.index)
    if len(ranks) > 1:
        raise AdapterError(f"{path}: adapters of different ranks {sorted(ranks)} can be merged but not trained further")
    model.lora = {"rank": ranks.pop(), "alpha": config.get("lora_alpha", 8), "dropout": dropout, "targets": targets}
    return model


def load_adapter_weights(model: GPT, path) -> None:
    """Copy a saved adapter into the model's own LoRA modules, in place (an optimizer keeps holding
    the same parameters): how a LoRA run resumes from a checkpoint that holds only its adapter.
    The adapter must cover exactly those modules, at the same rank and scaling."""
    mods = lora_modules(model)
    loaded = set()
    for ours, a, b, scaling in adapter_updates(model, path)[1]:
        mod = mods.get(ours)
        if mod is None or mod.lora_A.shape != a.shape or not math.isclose(mod.scaling, scaling, rel_tol=1e-6):
            have = f"rank {mod.rank}, scaling {mod.scaling:g}" if mod else "no adapter"
            raise AdapterError(f"{path}: the adapter for {ours} (rank {a.size(0)}, scaling {scaling:g}) does not fit "
                               f"this model's ({have}); resume with the LoRA settings the run was started with")
        with torch.no_grad():
            mod.lora_A.copy_(a)
            mod.lora_B.copy_(b)
        loaded.add(ours)
    missing = sorted(set(mods) - loaded)
    if missing:
        raise AdapterError(f"{path}: no adapter weights for {missing[:3]} ({len(missing)} modules); "
                           "resume with the LoRA targets the run was started with")


def load_model_with_adapter(source, adapter=None, device="cpu", merge: bool = True):
    """`load_model` plus an optional adapter folded in: what generate/chat/serve/eval call for --adapter."""
    from pocketlm.model import load_model

    model, tok = load_model(source, device=device)
    if adapter:
        model = apply_adapter(model, adapter, merge=merge)
    return model, tok
