"""The tests' reference decoder: plain greedy decoding with GPT.forward, with or without a KV store.

The product decodes through pocketlm.infer.engine.Engine only; this loop is what the engine, the
fused kernels and the importers are checked against."""

from __future__ import annotations

import torch

from pocketlm.infer.batch import KVStore


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, use_cache: bool = True) -> torch.Tensor:
    """idx (B, T) followed by max_new_tokens greedy tokens per row."""
    store = KVStore(model.cfg, idx.size(0), idx.size(1) + max_new_tokens, dtype=model.embed_tokens.weight.dtype,
                    device=idx.device) if use_cache else None
    out, step_in = idx, idx
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model(step_in, batch=store.step(0, idx.size(0), step_in))
        else:
            logits = model(out)
        nxt = logits[:, -1].float().argmax(-1, keepdim=True)
        out = torch.cat((out, nxt), dim=1)
        step_in = nxt
    return out
