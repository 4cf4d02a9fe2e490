"""Optimizers and learning-rate schedules, from torch's own optimizers."""

from __future__ import annotations

import math

import torch
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from pocketlm.config import TrainConfig


class Muon(torch.optim.Muon):
    """torch's Muon, also on FSDP2's sharded (DTensor) weights. Orthogonalizing a shard is not
    orthogonalizing the matrix, so for a DTensor the momentum update (elementwise: exact on the shard)
    is gathered into the full matrix, orthogonalized by torch's own Newton-Schulz, and each rank keeps
    its slice: the same numbers one process computes. Plain tensors take torch's step unchanged.
    (torch 2.13 has no DTensor path for Muon; its helpers are reused here, not rewritten.)"""

    @torch.no_grad()
    def step(self, closure=None):
        from torch.distributed.tensor import DTensor, Replicate

        if not any(isinstance(p, DTensor) for g in self.param_groups for p in g["params"]):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                full = update.full_tensor() if isinstance(update, DTensor) else update
                ortho = _zeropower_via_newtonschulz(full, group["ns_coefficients"], group["ns_steps"], group["eps"])
                if isinstance(p, DTensor):  # Replicate -> the parameter's Shard placements: a local slice
                    ortho = DTensor.from_local(ortho, p.device_mesh, [Replicate()] * p.device_mesh.ndim,
                                               run_check=False).redistribute(p.device_mesh, p.placements)
                p.mul_(1 - lr * wd)
                p.add_(ortho, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def param_groups(model: torch.nn.Module):
    """Split trainable parameters: hidden matrices (decayed, Muon-eligible), and the rest
    (embeddings, lm_head, norms, biases: no weight decay, always AdamW)."""
    matrices, others = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = "embed" in name or "lm_head" in name
        (matrices if p.dim() >= 2 and not is_embedding else others).append(p)
    return matrices, others


def build_optimizers(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    matrices, others = param_groups(model)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "muon" and matrices:
        # Muon orthogonalizes updates of the hidden matrices; embeddings, head, norms stay on AdamW.
        muon = Muon(matrices, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=0.95)
        adam = torch.optim.AdamW([{"params": others, "weight_decay": 0.0}], lr=cfg.lr, betas=betas, fused=False)
        return [muon, adam] if others else [muon]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": others, "weight_decay": 0.0}]
    # fused: one kernel per step instead of a dozen foreach passes (torch supports it on CPU and CUDA)
    return [torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=betas, fused=True)]


def lr_factor(cfg: TrainConfig, progress: float, step: int) -> float:
    """Multiplier on the peak lr. `progress` in [0, 1] is the share of the run done (by steps or by
    the time budget, whichever is further), so a time-budgeted run still decays to the end."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    # wsd: hold the peak, then decay linearly over the last decay_fraction of the run
    start = 1 - cfg.decay_fraction
    if progress < start:
        return 1.0
    return floor + (1 - floor) * max(0.0, 1 - (progress - start) / cfg.decay_fraction)


def set_lr(optimizers, cfg: TrainConfig, factor: float) -> None:
    for opt in optimizers:
        base = cfg.muon_lr if isinstance(opt, torch.optim.Muon) else cfg.lr
        for g in opt.param_groups:
            g["lr"] = base * factor
