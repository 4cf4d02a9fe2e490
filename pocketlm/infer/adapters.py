"""Per-row LoRA adapters: each row of one batch can run its own adapter over the shared base weights.

    y = base(x) + x A[slot]^T B[slot]^T      for the row's adapter slot (none for -1, the base model)

Each adapter gets a slot (Slots): its number is the id its rows pass in `batch.adapter_ids`, and it
keeps it until unloaded, so loading or unloading one writes that slot of every adapted projection and
nothing else (a hot load costs its own bytes, not a re-stack of the others). Each adapted projection
of the engine's copy is wrapped in a RowLoRA holding every slot's A and B stacked (RowLoRA says how a
step applies them). Wrappers are installed when the first adapter is added, so an engine without
adapters runs the plain kernels.

An adapter is given as a PEFT-format folder (what `pocketlm finetune --lora` writes) or as a list of
(module name, A, B, scaling) as `pocketlm.model.lora.adapter_updates` returns them.
"""

from __future__ import annotations

import functools
import hashlib
import warnings

import torch
import torch.nn as nn

from pocketlm.errors import InputError


class RowLoRA(nn.Module):
    """A linear plus a per-row low-rank update chosen by batch.adapter_ids.

    Every slot's A sits in one (slots, R, in) stack (the parts' ranks side by side: q, k, v of a fused
    qkv) and each part's B^T in its own (slots, r, out) stack, so no zeros of a block-diagonal B are
    read. A step's tokens are laid out by slot, (slots the step uses, m, in) with m the most tokens
    any one slot has, and batched matmuls over the stacks' slices apply each slot's update to its own
    tokens only: each adapter's weights are read once a step and nothing is computed for the others.
    When the rows already come in that layout (rows on slots s, s+1, ... in order, or one row's
    prompt: the usual decode batch and every prefill) it is a view; otherwise the few tokens are
    copied into it and the updates added back by index (StepPlan).

    Measured on the Zen 5 at one thread (load ~6), 8 rows on 8 rank-8 all-projection adapters, one
    SmolLM2 layer's four projections: 111 us (rows in slot order) and 223 us (shuffled) against 289 us for
    the scheme before (one matmul over every adapter's stacked columns for every row, masked to the row's
    own: 8x the arithmetic). The stacks stay fp32: torch's bf16 bmm took ~8x fp32's time at these shapes.
    Decoding, this is bound by reading the stacks (9.8 MB a rank-8 all-projection adapter in fp32), and
    aten's bmm reads a rank-8 B at about half the speed of a plain read (2026-12-02, load ~20: 25.7 us
    against 16.0 for a 393 KB stack not in cache). So a step of at most KERNEL_TOKENS tokens (decode)
    runs row_lora.cpp instead: each token's A x and its B products in one call per projection, added
    into y in place, any slot order without copies. Eight streams on eight all-projection adapters,
    SmolLM2's whole decode step at one thread: 15.5 ms over the plain step against 25 ms with the
    matmuls (load ~23); bf16 copies of the stacks (half the bytes) were tried and were no faster
    (0.752 of the plain step's speed against 0.770 for fp32, same process, load ~17). Longer steps
    (prefill) keep the matmuls, whose kernels win at many tokens. The engine's C++ decode step (cstep.py)
    runs the same loop inside its step on these stacks, so its rows match this module's."""
    takes_batch = True

    def __init__(self, base: nn.Module, parts: dict[str, int], n_in: int):
        super().__init__()
        self.base, self.parts, self.n_in = base, parts, n_in  # parts: projection name -> its output rows
        self.n_out = sum(parts.values())
        self.ranks = {name: 0 for name in parts}  # each part's rank (the most any slot has)
        self.A = None  # (slots, sum of ranks, in) fp32; None: no slot adapts this projection
        self.Bt: dict[str, torch.Tensor] = {}  # part -> (slots, its rank, its output rows)
        self.layout: list[tuple[str, int, int, int, int]] = []  # (part, A row, rank, output column, width)
        self.filled: frozenset[int] = frozenset()  # slots holding an update of this projection
        self._cached: dict = {}
        self._kernel_args = None  # row_lora_'s arguments (_kernel_stacks)

    @property
    def slots(self) -> int:
        return 0 if self.A is None else self.A.size(0)

    def forward(self, x, batch=None):
        y = self.base(x)
        ids = None if batch is None else batch.adapter_ids
        if ids is None or not self.filled:
            return y
        plan = step_plan(batch, self.filled)
        if plan is None:  # no row of this step runs an adapter that touches this projection
            return y
        x2, y2 = x.reshape(-1, self.n_in), y.view(-1, self.n_out)
        # (x fp32 or bf16 and y either: the bf16 copy's qkv and gate/up take the norm's fp32 output)
        if x2.size(0) <= KERNEL_TOKENS and {x2.dtype, y.dtype} <= {torch.float32, torch.bfloat16} and kernel():
            A, Bt, rows, cols = self._kernel_stacks()
            row_lora_(x2.contiguous(), y2, plan.token_slots, A, Bt, rows, cols)
            return y
        lo, hi, m = plan.lo, plan.hi, plan.m
        At, parts = self._views(lo, hi)
        if plan.dest is None:  # the tokens are already laid out by slot
            xs, y3 = x2.view(hi - lo, m, self.n_in).float(), y2.view(hi - lo, m, self.n_out)
        else:
            xs = x2.new_zeros((hi - lo) * m, self.n_in, dtype=torch.float32)
            xs = xs.index_copy_(0, plan.dest, x2.index_select(0, plan.tokens).float()).view(hi - lo, m, self.n_in)
        h = torch.bmm(xs, At)  # (slots, m, sum of ranks)
        for Bt, row, rank, col, width in parts:
            u = torch.bmm(h if rank == h.size(2) else h.narrow(2, row, rank), Bt)  # (slots, m, width)
            if plan.dest is None:
                (y3 if width == self.n_out else y3.narrow(2, col, width)).add_(u)
            else:
                u = u.view(-1, width).index_select(0, plan.dest).to(y.dtype)
                (y2 if width == self.n_out else y2.narrow(1, col, width)).index_add_(0, plan.tokens, u)
        return y

    def _views(self, lo: int, hi: int):
        """A^T and each part's B^T for slots lo:hi, kept (as views, they see every later write to a
        slot; only a reallocation drops them): slicing tensors in Python costs microseconds a call."""
        if (lo, hi) not in self._cached:
            self._cached[lo, hi] = (self.A[lo:hi].transpose(1, 2),
                                    [(self.Bt[name][lo:hi], row, rank, col, width)
                                     for name, row, rank, col, width in self.layout])
        return self._cached[lo, hi]

    def _kernel_stacks(self):
        """(A, the B stacks, their rows in A, their columns in y): row_lora_'s arguments, kept (the
        stacks are written in place; only a reallocation drops them)."""
        if self._kernel_args is None:
            self._kernel_args = (self.A, [self.Bt[name] for name, *_ in self.layout],
                                 [row for _, row, *_ in self.layout], [col for _, _, _, col, _ in self.layout])
        return self._kernel_args

    def write(self, slot: int, updates: dict[str, tuple[torch.Tensor, torch.Tensor]], reserve: int = 0) -> None:
        """Put one adapter's updates of this module's parts into `slot`, or empty it (no updates). Only a
        higher rank or a slot past the stacks reallocates them (to at least `reserve` slots)."""
        mine = {name: updates[name] for name in self.parts if name in updates}
        for name, (a, b) in mine.items():
            if a.size(1) != self.n_in or b.size(0) != self.parts[name] or b.size(1) != a.size(0):
                raise InputError(f"adapter for {name}: A{tuple(a.shape)} B{tuple(b.shape)} do not fit "
                                 f"{self.n_in} -> {self.parts[name]}; was it trained on another model?")
        ranks = {name: max(r, mine[name][0].size(0) if name in mine else 0) for name, r in self.ranks.items()}
        if mine and (ranks != self.ranks or slot >= self.slots):
            self._grow(ranks, max(slot + 1, 2 * self.slots, reserve))
        if self.A is not None and slot < self.slots:
            self.A[slot] = 0
            for name, row, rank, _, _ in self.layout:
                self.Bt[name][slot] = 0
                if name in mine:
                    a, b = mine[name]
                    self.A[slot, row:row + a.size(0)] = a
                    self.Bt[name][slot, :a.size(0)] = b.t()
        self.filled = self.filled | {slot} if mine else self.filled - {slot}

    def _grow(self, ranks: dict[str, int], slots: int) -> None:
        """New stacks with these ranks and slots, holding what the old ones held."""
        old, old_layout, old_slots = self.A, self.layout, self.slots
        self.layout, row, col = [], 0, 0
        for name, width in self.parts.items():
            if ranks[name]:
                self.layout.append((name, row, ranks[name], col, width))
            row, col = row + ranks[name], col + width
        self.A = torch.zeros(slots, row, self.n_in)
        Bt = {name: torch.zeros(slots, r, width) for name, _, r, _, width in self.layout}
        if old is not None:
            now = {name: r for name, r, _, _, _ in self.layout}
            for name, r, rank, _, _ in old_layout:
                self.A[:old_slots, now[name]:now[name] + rank] = old[:, r:r + rank]
                Bt[name][:old_slots, :rank] = self.Bt[name]
        self.Bt, self.ranks, self._cached, self._kernel_args = Bt, dict(ranks), {}, None


KERNEL_TOKENS = 16  # a step of up to this many tokens (decode) runs row_lora_; more (prefill) the bmm path


@functools.cache
def kernel() -> bool:
    """Whether row_lora.cpp runs here (AVX512F, POCKETLM_KERNELS not 0, the build works); else the
    batched matmuls do the same arithmetic."""
    from pocketlm import native
    from pocketlm.infer import gemv

    if not gemv.enabled() or not native.has("avx512f"):
        return False
    try:
        native.build("pocketlm_row_lora", "row_lora.cpp", [])
        return True
    except Exception as e:  # noqa: BLE001 (an unusual toolchain: the matmuls still work)
        warnings.warn(f"row_lora.cpp is unavailable, per-row adapters use batched matmuls ({type(e).__name__}: {e})")
        return False


def row_lora_(x, y, token_slots, A, Bt, rows, cols) -> None:
    """y (T, out) += each token's update from its slot of A and the Bt stacks (row_lora.cpp), in place."""
    torch.ops.pocketlm.row_lora_(x, y, token_slots, A, Bt, rows, cols)


class StepPlan:
    """Where one step's tokens go in the (hi - lo, m) by-slot layout, for the projections whose filled
    slots are `filled`: tokens (N,) the rows of x (flattened) that run an adapter there, dest (N,)
    their places in the layout; dest None when x already is the layout."""

    def __init__(self, ids: list[int], T: int, filled: frozenset[int], device=None):
        rows = [(s, r) for r, s in enumerate(ids) if s in filled]
        self.empty = not rows
        if self.empty:
            return
        # each token's slot, -1 for rows whose adapter leaves this projection alone (row_lora_'s input)
        self.token_slots = torch.tensor([s if s in filled else -1 for s in ids for _ in range(T)], device=device)
        slots = [s for s, _ in rows]
        self.lo, self.hi = min(slots), max(slots) + 1
        counts = [0] * (self.hi - self.lo)
        for s in slots:
            counts[s - self.lo] += 1
        self.m = max(counts) * T
        in_place = len(rows) == len(ids) and slots == sorted(slots) and min(counts) == max(counts)
        self.tokens = self.dest = None
        if not in_place:
            seen = [0] * (self.hi - self.lo)
            tokens, dest = [], []
            for s, r in rows:
                for t in range(T):
                    tokens.append(r * T + t)
                    dest.append((s - self.lo) * self.m + seen[s - self.lo])
                    seen[s - self.lo] += 1
            self.tokens, self.dest = torch.tensor(tokens, device=device), torch.tensor(dest, device=device)


_PLANS: dict = {}  # (ids, T, filled) -> StepPlan, kept across steps while the batch's adapters stay the same


def step_plan(batch, filled: frozenset[int]) -> StepPlan | None:
    """The step's plan for projections with these filled slots: made once per step (on the batch) and
    reused by later steps with the same rows on the same adapters (a decode batch between joins)."""
    cache = batch.__dict__.setdefault("_lora_plans", {})
    if filled not in cache:
        if "_ids" not in cache:
            cache["_ids"] = (tuple(batch.adapter_ids.tolist()), batch.positions.size(1), batch.adapter_ids.device)
        key = (*cache["_ids"], filled)
        if key not in _PLANS:
            if len(_PLANS) > 64:
                _PLANS.clear()
            _PLANS[key] = StepPlan(list(key[0]), key[1], filled, key[2])
        cache[filled] = None if _PLANS[key].empty else _PLANS[key]
    return cache[filled]


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


class Slots:
    """The engine's adapters by name, each in its own slot of every RowLoRA of the copy (the slot is
    the adapter id its rows pass in a step). A slot is kept until its adapter is removed and reused by
    the next one added, so adding or removing writes one slot, never the others."""

    def __init__(self, model):
        self.model = model
        self.index: dict[str, int] = {}
        self.reserve = 0  # slots to allocate at once (serve --max-loras): later loads write in place

    def add(self, name: str, updates) -> int:
        """Write `updates` ((module, A, B, scaling) as read_adapter gives) into the lowest free slot."""
        if name in self.index:
            raise InputError(f"adapter {name!r} is already loaded; remove it first")
        per_layer = [{} for _ in self.model.layers]  # layer -> {proj: (A, B scaled)}
        for module, a, b, scaling in updates:
            parts = module.split(".")  # layers.3.attn.q_proj
            if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit() or int(parts[1]) >= len(per_layer):
                raise InputError(f"adapter module {module!r}: expected layers.N.attn|mlp.PROJ of this model")
            per_layer[int(parts[1])][parts[3]] = (a.float(), b.float() * scaling)
        slot = next(i for i in range(len(self.index) + 1) if i not in self.index.values())
        try:
            for lin, layer in self._modules():
                lin.write(slot, per_layer[layer], self.reserve)
        except Exception:
            self._clear(slot)
            raise
        self.index[name] = slot
        return slot

    def remove(self, name: str) -> None:
        self._clear(self.index.pop(name))

    def _clear(self, slot: int) -> None:
        for lin, _ in self._modules():
            lin.write(slot, {})

    def _modules(self):
        """(RowLoRA, layer number) for every projection of the copy, wrapping them on first use."""
        for i, layer in enumerate(self.model.layers):
            for where, name, n_in, parts in _projections(self.model.cfg):
                parent = getattr(layer, where)
                lin = getattr(parent, name)
                if not isinstance(lin, RowLoRA):
                    lin = RowLoRA(lin, parts, n_in)
                    setattr(parent, name, lin)
                yield lin, i
