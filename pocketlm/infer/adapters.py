"""Per-row LoRA adapters: each row of one batch can run its own adapter over the shared base weights.

    y = base(x) + x A[id]^T B[id]^T      for the row's adapter id (none for id -1, the base model)

Each adapted projection of the engine's copy is wrapped in a RowLoRA that holds every registered
adapter's A and B stacked (ranks padded with zeros to the largest), and gathers each row's pair from
the step's `batch.adapter_ids` (a batched matmul, two small products per row). A fused matrix (q/k/v,
gate/up) gets the block-diagonal update of its parts' adapters, which is the same update. Wrappers are
installed when the first adapter is added, so an engine without adapters runs the plain kernels.

An adapter is given as a PEFT-format folder (what `pocketlm finetune --lora` writes) or as a list of
(module name, A, B, scaling) as `pocketlm.model.lora.adapter_updates` returns them.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from pocketlm.errors import InputError


class RowLoRA(nn.Module):
    """A linear plus a per-row low-rank update chosen by batch.adapter_ids.

    Every adapter's A is stacked into one (n x r, in) matrix and every B into one (out, n x r): a row's
    update is x A_all^T, masked to its adapter's r columns, times B_all^T. Two plain matmuls and a
    multiply per projection, for any mix of adapters in the batch; the masks are built once a step.
    (A gather of each row's A and B and two batched matmuls did the same with twice the small ops and
    a copy of every row's matrices per projection: on a loaded 2-core machine each small op costs.)"""
    takes_batch = True

    def __init__(self, base: nn.Module, parts: dict[str, int]):
        super().__init__()
        self.base, self.parts = base, parts  # parts: projection name -> its rows of the (fused) output
        self.A = self.B = None               # (n adapters x r, in), (out, n adapters x r) fp32
        self.n = self.rank = 0

    def forward(self, x, batch=None):
        y = self.base(x)
        ids = None if batch is None else batch.adapter_ids
        if ids is None or self.A is None:
            return y
        h = torch.matmul(x.float(), self.A.t()) * row_mask(batch, self.n, self.rank)  # (B, T, n x r)
        return y + torch.matmul(h, self.B.t()).to(y.dtype)

    def load(self, adapters: list[dict[str, tuple[torch.Tensor, torch.Tensor]]], n_in: int) -> None:
        """Stack the adapters' updates of this module's parts: A rows concatenated, B block-diagonal."""
        offsets, row = {}, 0
        for name, width in self.parts.items():
            offsets[name], row = row, row + width
        pairs = []
        for updates in adapters:
            mine = [(name, *updates[name]) for name in self.parts if name in updates]
            rank = sum(a.size(0) for _, a, _ in mine)
            A, B = torch.zeros(rank, n_in), torch.zeros(row, rank)
            r = 0
            for name, a, b in mine:
                if a.size(1) != n_in or b.size(0) != self.parts[name] or b.size(1) != a.size(0):
                    raise InputError(f"adapter for {name}: A{tuple(a.shape)} B{tuple(b.shape)} do not fit "
                                     f"{n_in} -> {self.parts[name]}; was it trained on another model?")
                A[r:r + a.size(0)] = a
                B[offsets[name]:offsets[name] + b.size(0), r:r + a.size(0)] = b
                r += a.size(0)
            pairs.append((A, B))
        rank = max([a.size(0) for a, _ in pairs] + [0])
        if rank == 0:  # no adapter touches this projection (a q,v adapter and o_proj): the plain kernel only
            self.A = self.B = None
            return
        pad = torch.nn.functional.pad
        self.n, self.rank = len(pairs), rank
        self.A = torch.cat([pad(a, (0, 0, 0, rank - a.size(0))) for a, _ in pairs])
        self.B = torch.cat([pad(b, (0, rank - b.size(1))) for _, b in pairs], dim=1)


def row_mask(batch, n: int, rank: int) -> torch.Tensor:
    """(B, 1, n x rank) fp32: ones over each row's adapter's columns, zeros elsewhere (all zeros for a
    row on the base model); one per step and shape, kept on the step's batch."""
    masks = batch.__dict__.setdefault("_lora_masks", {})
    if (n, rank) not in masks:
        ids = batch.adapter_ids
        onehot = torch.nn.functional.one_hot(ids.clamp(min=0), n).float() * (ids >= 0).float()[:, None]
        masks[n, rank] = onehot.repeat_interleave(rank, dim=1)[:, None, :]
    return masks[n, rank]


def read_adapter(cfg, adapter) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """(module name, A, B, scaling) per adapted projection, from a PEFT folder or such a list."""
    if isinstance(adapter, (list, tuple)):
        return list(adapter)
    from pocketlm.model.lora import adapter_updates

    return adapter_updates(skeleton(cfg), adapter)[1]


def content_hash(updates) -> str:
    """An adapter's identity: a hash of its modules, scalings and weights (not of its name or path), so
    a cache keyed by it never mixes two adapters, nor a reloaded name with changed contents."""
    h = hashlib.sha256()
    for name, a, b, scaling in sorted(updates, key=lambda u: u[0]):
        h.update(f"{name}:{float(scaling)!r}:{tuple(a.shape)}:{tuple(b.shape)}".encode())
        for t in (a, b):
            h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


_SKELETONS: dict[str, nn.Module] = {}


def skeleton(cfg):
    """adapter_updates checks shapes against a model (only reads it); a weightless one is enough. Kept,
    since building one runs every initializer even on the meta device (~200 ms of a hot load)."""
    key = repr(cfg)
    if key not in _SKELETONS:
        from pocketlm.model.gpt import GPT

        with torch.device("meta"):
            _SKELETONS[key] = GPT(cfg)
    return _SKELETONS[key]


def _projections(cfg):
    """(attention or mlp, attribute in the copy, input width, {projection name: output rows})."""
    hd = cfg.head_dim
    yield "attn", "qkv", cfg.n_embd, {"q_proj": cfg.n_head * hd, "k_proj": cfg.n_kv_head * hd, "v_proj": cfg.n_kv_head * hd}
    yield "attn", "o_proj", cfg.n_head * hd, {"o_proj": cfg.n_embd}
    gate = {"gate_proj": cfg.intermediate_size} if cfg.arch == "llama" else {}
    yield "mlp", "up", cfg.n_embd, {**gate, "up_proj": cfg.intermediate_size}
    yield "mlp", "down_proj", cfg.intermediate_size, {"down_proj": cfg.n_embd}


def install(model, adapters: list[list[tuple[str, torch.Tensor, torch.Tensor, float]]]) -> None:
    """Point every projection of the inference copy at these adapters (index = adapter id)."""
    per_layer = [[{} for _ in adapters] for _ in model.layers]  # layer -> adapter -> {proj: (A, B scaled)}
    for j, updates in enumerate(adapters):
        for name, a, b, scaling in updates:
            parts = name.split(".")  # layers.3.attn.q_proj
            if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit() or int(parts[1]) >= len(model.layers):
                raise InputError(f"adapter module {name!r}: expected layers.N.attn|mlp.PROJ of this model")
            per_layer[int(parts[1])][j][parts[3]] = (a.float(), b.float() * scaling)
    for i, layer in enumerate(model.layers):
        for where, name, n_in, parts in _projections(model.cfg):
            parent = getattr(layer, where)
            lin = getattr(parent, name)
            if not isinstance(lin, RowLoRA):
                lin = RowLoRA(lin, parts)
                setattr(parent, name, lin)
            lin.load(per_layer[i], n_in)
