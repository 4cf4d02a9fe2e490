"""The transformer: one decoder-only class for both GPT-2 style and Llama style models.

`arch="gpt2"`: learned positions, LayerNorm, GELU (tanh), biases, tied embeddings.
`arch="llama"`: RoPE, RMSNorm, SwiGLU, grouped-query attention, optional QKV bias (Qwen2).
Module names follow Hugging Face's Llama naming (q_proj, gate_proj, ...) so that import,
export and PEFT adapters map one to one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm.model.kernels import FusedCrossEntropy, GeluKernel, on_kernels, training_attention
from pocketlm.errors import InputError

ARCHS = ("gpt2", "llama")


@dataclass
class ModelConfig:
    arch: str = "llama"
    vocab_size: int = 4096
    block_size: int = 256          # longest context the model is built for
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None   # None: same as n_head (no GQA)
    n_embd: int = 128
    head_dim: int | None = None    # None: n_embd // n_head
    intermediate_size: int | None = None  # None: 4*d (gelu) or ~8/3*d rounded to 32 (swiglu)
    qkv_bias: bool = False         # llama only; gpt2 always has biases
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0           # embedding, attention and residual dropout
    attn_dropout: float | None = None  # attention-probability dropout alone; None: same as dropout.
    # (0 keeps compiled CPU training on the fast causal-attention path: measured ~1.8x a step here)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise InputError(f"model.arch: expected one of {ARCHS}, got {self.arch!r}")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise InputError(f"model.n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.intermediate_size is None:
            if self.arch == "gpt2":
                self.intermediate_size = 4 * self.n_embd
            else:
                self.intermediate_size = 32 * math.ceil(8 * self.n_embd / 3 / 32)
        for key in ("dropout", "attn_dropout"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value < 1.0:
                raise InputError(f"model.{key}: expected a value in [0, 1), got {value}")

    @property
    def attention_dropout(self) -> float:
        return self.dropout if self.attn_dropout is None else self.attn_dropout

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        valid = {f.name for f in fields(cls)}
        unknown = set(d) - valid
        if unknown:
            raise InputError(f"unknown model config keys {sorted(unknown)}; valid keys: {sorted(valid)}")
        return cls(**d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "gpt2":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
    return RMSNorm(cfg.n_embd, cfg.norm_eps)


def rope_tables(cfg: ModelConfig, length: int, device=None):
    """cos/sin tables of shape (length, head_dim), in the 'rotate half' layout HF Llama uses."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim))
    t = torch.arange(length, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    # x: (B, H, T, D); cos/sin: (B or 1, 1, T, D)
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def packed_positions_and_mask(doc_ids):
    """For rows packed with several examples: each token's position within its example, and a
    (B, 1, T, T) mask letting a token see earlier tokens of its own example only."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.cummax(torch.where(starts, idx, 0), dim=1).values  # index where each token's example starts
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return idx - first, (same & causal).unsqueeze(1)


GELU_C = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(x):
    # GPT-2's tanh GELU. Compiled, the identical sigmoid form is ~2x faster here (tanh vectorizes
    # poorly on this CPU); eager, aten's fused kernel wins over the five ops.
    if x.numel() % 16 == 0 and on_kernels(x):  # a bf16 training step on a CPU with AVX512-BF16
        return GeluKernel.apply(x)
    if torch.compiler.is_compiling():
        return x * torch.sigmoid(GELU_C * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate="tanh")


def project(linear: nn.Module, x, batch):
    """Every projection is called through here. A module that declares `takes_batch` (the engine's
    per-row adapters, pocketlm/infer/adapters.py) also gets the step's batch; nn.Linear and the
    engine's kernels take x alone. The engine installs those modules; this file never asks which."""
    return linear(x, batch) if getattr(linear, "takes_batch", False) else linear(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        bias = cfg.arch == "gpt2"
        qkv_bias = bias or cfg.qkv_bias
        self.cfg, self.layer_idx = cfg, layer_idx
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def project_qkv(self, x, batch):
        """q, k, v (B, T, heads x head_dim); the engine's copy overrides this with one fused matrix."""
        return project(self.q_proj, x, batch), project(self.k_proj, x, batch), project(self.v_proj, x, batch)

    def forward(self, x, rope, batch, mask):
        B, T, _ = x.shape
        cfg = self.cfg
        q, k, v = self.project_qkv(x, batch)
        q = q.view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k = k.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        v = v.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if batch is not None:  # a KV-cached step: store the new keys/values, attend over the row's past
            k, v = batch.write(self.layer_idx, k, v)
        dropout = cfg.attention_dropout if self.training else 0.0
        gqa = cfg.n_kv_head != cfg.n_head
        y = None
        if mask is None and T > 1 and dropout == 0.0 and q.device.type == "cpu" and torch.is_grad_enabled():
            y = training_attention(q, k, v, cfg.n_head // cfg.n_kv_head)  # None where SDPA is the better choice
        if y is None:  # no mask: training or a full prefill from position 0, the fused causal kernel
            # a plain bool: under symbolic lengths `T > 1` is a SymBool, and SDPA given one breaks the graph
            causal = mask is None and bool(T > 1)
            if getattr(batch, "attend", None) is not None:  # a step that lays its rows out its own way (together.py)
                y = batch.attend(q, k, v, gqa)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                   dropout_p=dropout, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim)
        return self.resid_dropout(project(self.o_proj, y, batch))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.arch == "llama"
        bias = cfg.arch == "gpt2"
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def hidden(self, x, batch):
        """The activations before down_proj; the engine's copy overrides this with one fused gate/up."""
        if self.swiglu:
            return F.silu(project(self.gate_proj, x, batch)) * project(self.up_proj, x, batch)
        return gelu_tanh(project(self.up_proj, x, batch))

    def forward(self, x, batch=None):
        return self.dropout(project(self.down_proj, self.hidden(x, batch), batch))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, batch, mask):
        x = x + self.attn(self.attn_norm(x), rope, batch, mask)
        return x + self.mlp(self.mlp_norm(x), batch)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.arch == "gpt2":
            self.embed_positions = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._rope_cache = None
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if self.cfg.arch == "gpt2":
                n -= self.embed_positions.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N (forward + backward matmuls, lm_head included) + attention.
        Frozen weights (LoRA) cost 4N: their backward computes input gradients but no weight gradients."""
        cfg, T = self.cfg, seq_len or self.cfg.block_size
        n = self.num_params(non_embedding=True) + self.lm_head.weight.numel()
        lookups = {id(self.embed_tokens.weight), id(self.lm_head.weight)}  # the head is added on its own below
        if self.cfg.arch == "gpt2":
            lookups.add(id(self.embed_positions.weight))
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad and id(p) not in lookups)
        frozen += 0 if self.lm_head.weight.requires_grad else self.lm_head.weight.numel()
        return 6 * n - 2 * frozen + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

    def _rope(self, positions, end: int, device):
        """cos/sin for the positions (all < end): a slice when they are 0..end-1 (training), a gather otherwise."""
        if self._rope_cache is None or self._rope_cache[0].size(0) < end or self._rope_cache[0].device != device:
            self._rope_cache = rope_tables(self.cfg, max(end, self.cfg.block_size), device)
        cos, sin = self._rope_cache
        if positions is None:
            return cos[None, None, :end], sin[None, None, :end]
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (B, 1, T, D)

    def forward(self, idx=None, targets=None, *, input_embeds=None, batch=None, doc_ids=None):
        """The one forward: training, scoring, and the engine's inference copy (pocketlm/infer/fused.py,
        the same class with its linears swapped for per-precision kernels).

        idx: (B, T) token ids, or input_embeds: (B, T, n_embd) embeddings in their place; with both,
        ids < 0 mark where the embeddings go (a multimodal prompt). batch: a StepBatch
        (pocketlm/infer/batch.py) for a KV-cached step: its positions, mask and per-row adapters, and
        where the new keys/values go. Returns logits (the last position's only if batch.last_only),
        or (logits, mean loss) when targets are given. Targets equal to -100 are ignored; when some
        are (fine-tuning scores only the replies), the head runs only where there is a target and the
        logits returned are those rows, (n_scored, V). doc_ids (B, T), for packed rows: which example
        each token belongs to (non-decreasing along a row). Tokens attend only within their own
        example and positions restart at each example."""
        ref = idx if idx is not None else input_embeds
        if ref is None:
            raise InputError("GPT.forward needs token ids or input embeddings")
        B, T = ref.shape[0], ref.shape[1]
        positions = mask = None  # no batch: positions 0..T-1, plain causal attention (compile-friendly)
        end = T
        if batch is not None:
            if doc_ids is not None:
                raise InputError("doc_ids (packed rows) is for training and scoring, not with a KV cache")
            positions, mask, end = batch.positions, batch.mask, batch.end
        elif doc_ids is not None:
            positions, mask = packed_positions_and_mask(doc_ids)
        if end > self.cfg.block_size and self.cfg.arch == "gpt2":
            raise InputError(f"sequence of {end} tokens exceeds block_size {self.cfg.block_size} (learned positions)")
        if input_embeds is None:
            x = self.embed_tokens(idx)
        elif idx is None:
            x = input_embeds
        else:
            x = torch.where((idx < 0).unsqueeze(-1), input_embeds, self.embed_tokens(idx.clamp(min=0)))
        rope = None
        if self.cfg.arch == "gpt2":
            x = x + (self.embed_positions.weight[:T] if positions is None else self.embed_positions(positions))
        else:
            rope = self._rope(positions, end, ref.device)
        x = self.embed_dropout(x)
        for layer in self.layers:
            x = layer(x, rope, batch, mask)
        if batch is not None and batch.last_only:  # (last: rows padded to one length end at their own)
            x = x[:, -1:] if batch.last is None else x[torch.arange(B, device=x.device), batch.last][:, None]
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x)
        scored = targets != -100
        # (a compiled graph keeps the full head rather than break on a data-dependent branch)
        if not torch.compiler.is_compiling() and not bool(scored.all()):  # skip the vocabulary-wide head and softmax on unscored positions
            x, targets = x[scored], targets[scored]
        logits = self.lm_head(x)
        flat, flat_targets = logits.view(-1, logits.size(-1)), targets.reshape(-1)
        if logits.size(-1) % 16 == 0 and on_kernels(logits):
            loss = FusedCrossEntropy.apply(flat, flat_targets)
        else:
            loss = F.cross_entropy(flat.float(), flat_targets, ignore_index=-100)
        return logits, loss
