"""GGUF files (llama.cpp's format) in: metadata -> ModelConfig, tensors -> GPT weights, vocabulary -> Tokenizer.

The `gguf` package reads the file (memory-mapped) and dequantizes every block format it knows
(F16, BF16, Q8_0, Q4_0, Q4_1, the K-quants, ...) with numpy. Three things differ from a Hugging Face folder:
  - dims are listed fastest-varying first, so a (out, in) matrix is stored as [in, out];
  - llama.cpp's converter permutes the rows of the Llama Q/K projections so each head's rotary
    pairs sit side by side (GPT-J layout); pocketlm, like HF, rotates halves, so that is undone;
  - there is no tokenizer.json: the vocabulary, merges and token types are metadata, from which a
    byte-level BPE `tokenizers` pipeline is rebuilt, with the split regex llama.cpp uses for that model.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from pocketlm.model.checkpoint import CheckpointError
from pocketlm.model.gpt import GPT, ModelConfig
from pocketlm.model.hf import model_from_state
from pocketlm.tokenizer import Tokenizer

ARCHS = ("llama", "qwen2", "gpt2")
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # llama.cpp's token types

# GGUF tensor name -> pocketlm name ("{i}" is the layer index)
TENSOR_NAMES = {
    "token_embd.weight": "embed_tokens.weight", "position_embd.weight": "embed_positions.weight",
    "output_norm.weight": "norm.weight", "output_norm.bias": "norm.bias", "output.weight": "lm_head.weight",
    "attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj", "attn_output": "attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Pre-tokenizer splits by `tokenizer.ggml.pre`, as llama.cpp applies them (regexes run in order)
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "phi-2", "jina-es", "jina-de"), [GPT2_SPLIT]),
    # digits one by one, then GPT-2's split
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), [r"\p{N}", GPT2_SPLIT]),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), [LLAMA3_SPLIT]),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), [QWEN2_SPLIT]),
}
IGNORE_MERGES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")  # whole-word vocabulary hits win, as in Llama 3


class GGUFFile:
    """Metadata access with errors that name the file and key."""

    def __init__(self, path: Path):
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
        except (ValueError, OSError, KeyError, IndexError, TypeError) as e:
            raise CheckpointError(f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from e
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def __getitem__(self, key):
        field = self.reader.fields.get(key)
        if field is None:
            raise CheckpointError(f"{self.path}: missing metadata key {key!r}")
        return field.contents()

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor as float32 in PyTorch's (out, in) order."""
        import gguf

        t = self.tensors[name]
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor {name!r} has type {t.tensor_type.name}, which the gguf "
                                  "package cannot dequantize (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, K- and IQ-quants can be read)") from None
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists the fastest-varying dim first
        values = np.asarray(values, dtype=np.float32).reshape(shape)
        if not values.flags.writeable:  # F32 tensors come back as views of the read-only file map
            values = values.copy()
        return torch.from_numpy(values)


def read_config(f: GGUFFile) -> ModelConfig:
    arch = f["general.architecture"]
    if arch not in ARCHS:
        raise CheckpointError(f"{f.path}: architecture {arch!r} is not supported; pocketlm reads GGUF files of {', '.join(ARCHS)}")
    if "token_embd.weight" not in f.tensors:
        raise CheckpointError(f"{f.path}: no token_embd.weight tensor")
    vocab = int(f.tensors["token_embd.weight"].shape[1])

    def key(name, default=...):
        value = f.get(f"{arch}.{name}", None if default is ... else default)
        if value is None:
            raise CheckpointError(f"{f.path}: missing metadata key {arch}.{name!r}")
        if isinstance(value, list):
            raise CheckpointError(f"{f.path}: {arch}.{name} differs per layer ({value[:4]}...), which pocketlm does not support")
        return value

    common = dict(vocab_size=vocab, block_size=key("context_length"), n_layer=key("block_count"),
                  n_head=key("attention.head_count"), n_embd=key("embedding_length"),
                  intermediate_size=key("feed_forward_length"), tie_embeddings="output.weight" not in f.tensors)
    if arch == "gpt2":
        return ModelConfig(arch="gpt2", norm_eps=key("attention.layer_norm_epsilon"), **common)
    n_head = common["n_head"]
    head_dim = key("attention.key_length", common["n_embd"] // n_head)
    rotary = key("rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise CheckpointError(f"{f.path}: partial RoPE ({arch}.rope.dimension_count={rotary}, head size {head_dim}) is not supported")
    scaling = f.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in f.tensors:
        raise CheckpointError(f"{f.path}: RoPE scaling ({scaling}, rope_freqs) is not supported; expected plain RoPE")
    return ModelConfig(arch="llama", n_kv_head=key("attention.head_count_kv", n_head), head_dim=head_dim,
                       rope_theta=float(key("rope.freq_base", 10000.0)), norm_eps=key("attention.layer_norm_rms_epsilon"),
                       qkv_bias="blk.0.attn_q.bias" in f.tensors, **common)


def _rotate_half_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: within each head, rows (0, half, 1, half+1, ...) -> (0, 1, ..., half, ...)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_state(f: GGUFFile, cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    sd = {}
    for name in f.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
        if m is None:
            if name not in TENSOR_NAMES:
                raise CheckpointError(f"{f.path}: unexpected tensor {name!r} for a {arch} model")
            sd[TENSOR_NAMES[name]] = f.tensor(name)
            continue
        layer, part, kind = m.groups()
        prefix = f"layers.{layer}."
        if part == "attn_qkv":  # GPT-2 keeps q, k, v fused
            for p, chunk in zip("qkv", f.tensor(name).chunk(3, dim=0)):
                sd[f"{prefix}attn.{p}_proj.{kind}"] = chunk.contiguous()
            continue
        if part not in TENSOR_NAMES:
            raise CheckpointError(f"{f.path}: unexpected tensor {name!r} for a {arch} model")
        t = f.tensor(name)
        if arch == "llama" and part in ("attn_q", "attn_k"):  # Qwen2 files are stored unpermuted
            t = _rotate_half_rows(t, cfg.n_head if part == "attn_q" else cfg.n_kv_head)
        sd[f"{prefix}{TENSOR_NAMES[part]}.{kind}"] = t
    return sd


def read_tokenizer(f: GGUFFile, block_size: int) -> Tokenizer:
    kind = f.get("tokenizer.ggml.model")
    if kind is None or f.get("tokenizer.ggml.tokens") is None:
        raise CheckpointError(f"{f.path}: no tokenizer in the file (missing tokenizer.ggml.model / tokenizer.ggml.tokens)")
    if kind != "gpt2":
        raise CheckpointError(f"{f.path}: tokenizer.ggml.model={kind!r} is not supported; pocketlm rebuilds byte-level BPE ('gpt2') vocabularies")
    pre = f.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_SPLITS:
        raise CheckpointError(f"{f.path}: tokenizer.ggml.pre={pre!r} is not a known pre-tokenizer; known: {sorted(PRE_SPLITS)}")
    tokens = f["tokenizer.ggml.tokens"]
    merges = f.get("tokenizer.ggml.merges")
    if merges is None:
        raise CheckpointError(f"{f.path}: missing tokenizer.ggml.merges (a byte-level BPE vocabulary needs its merges)")
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                                ignore_merges=pre in IGNORE_MERGES))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    # control tokens (<|im_start|> ...) and user-defined ones must match whole, never be split by BPE
    types = f.get("tokenizer.ggml.token_type") or []
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL])
    hf.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
              "add_bos_token": bool(f.get("tokenizer.ggml.add_bos_token", False))}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        i = f.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= i < len(tokens):
            config[name] = tokens[i]
    template = f.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return Tokenizer(hf, config)


def source_quant(f: GGUFFile) -> str:
    """The block type most of the file's matrices are stored in ("Q4_1", "Q8_0", "F16", ...): what
    the engine's faithful precision (dtype "auto") follows. Norms and biases (1-D, F32) do not count."""
    from collections import Counter

    kinds = Counter(t.tensor_type.name for t in f.reader.tensors if len(t.shape) == 2)
    return kinds.most_common(1)[0][0] if kinds else "F32"


def load_gguf(file, device="cpu", dtype=torch.float32) -> tuple[GPT, Tokenizer]:
    """(GPT, Tokenizer) from a .gguf file; quantized weights are dequantized to `dtype`, the file's
    block type is kept as `model.source_quant`."""
    path = Path(file)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    f = GGUFFile(path)
    cfg = read_config(f)
    tokenizer = read_tokenizer(f, cfg.block_size)
    model = model_from_state(cfg, read_state(f, cfg, f["general.architecture"]), path, device, dtype)
    model.source_quant = source_quant(f)
    return model, tokenizer
