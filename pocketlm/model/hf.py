"""Hugging Face model folders in and out.

Import reads config.json, the safetensors weights (one file or shards listed in
model.safetensors.index.json) and tokenizer.json/tokenizer_config.json, and maps them onto GPT:

    Llama, Mistral, Qwen2   model.layers.N.self_attn.q_proj   ->  layers.N.attn.q_proj  (same layout)
    GPT-2                   h.N.attn.c_attn (Conv1D, fused)   ->  layers.N.attn.{q,k,v}_proj (split, transposed)

Export writes the reverse: a folder transformers loads with no custom code (LlamaForCausalLM or
GPT2LMHeadModel). A QKV bias (Qwen2) is exported as Llama's attention_bias with a zero o_proj bias,
not as Qwen2: transformers 5 loads any model_type "qwen2" folder with its own Qwen2Tokenizer, whose
pre-tokenizer replaces the one in tokenizer.json, so a pocketlm-trained tokenizer would silently change.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pocketlm.model.checkpoint import CheckpointError, atomic_dir
from pocketlm.model.gpt import GPT, ModelConfig
from pocketlm.tokenizer import Tokenizer

LLAMA_STYLE = ("llama", "mistral", "qwen2")
SUPPORTED = (*LLAMA_STYLE, "gpt2")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

# HF Llama name fragment <-> pocketlm name fragment (the rest of the name is shared)
LLAMA_RENAMES = [("self_attn.", "attn."), ("input_layernorm.", "attn_norm."), ("post_attention_layernorm.", "mlp_norm.")]
# GPT-2: HF name (after the "transformer." prefix) -> pocketlm name; Conv1D weights are (in, out)
GPT2_RENAMES = {"wte": "embed_tokens", "wpe": "embed_positions", "ln_f": "norm", "ln_1": "attn_norm",
                "ln_2": "mlp_norm", "attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


# ---- config -------------------------------------------------------------------------------
def config_from_hf(raw: dict, file) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict; refuses what GPT cannot compute exactly."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        arch = ", ".join(raw.get("architectures") or []) or "no architectures listed"
        raise CheckpointError(f"{file}: model_type {model_type!r} ({arch}) is not supported; "
                              f"pocketlm imports Llama-style ({', '.join(LLAMA_STYLE)}) and gpt2 models")

    def need(*keys):
        for k in keys:
            if k not in raw:
                raise CheckpointError(f"{file}: missing field {k!r} (expected in a {model_type} config)")
        return [raw[k] for k in keys]

    def refuse(what, expected):
        raise CheckpointError(f"{file}: {what} is not supported (expected {expected})")

    if model_type == "gpt2":
        n_embd, n_layer, n_head, vocab, n_pos = need("n_embd", "n_layer", "n_head", "vocab_size", "n_positions")
        if raw.get("activation_function", "gelu_new") not in GELU_TANH:
            refuse(f"activation_function={raw['activation_function']!r}", "gelu_new")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if raw.get(flag):
                refuse(f"{flag}=true", "false")
        if raw.get("scale_attn_weights") is False:
            refuse("scale_attn_weights=false", "true")
        return ModelConfig(arch="gpt2", vocab_size=vocab, block_size=n_pos, n_layer=n_layer, n_head=n_head,
                           n_embd=n_embd, intermediate_size=raw.get("n_inner") or 4 * n_embd,
                           norm_eps=raw.get("layer_norm_epsilon", 1e-5),
                           tie_embeddings=raw.get("tie_word_embeddings", True))

    hidden, n_layer, n_head, vocab, inter = need("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                 "vocab_size", "intermediate_size")
    if raw.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act={raw['hidden_act']!r}", "silu")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse(f"RoPE scaling {rope}", "rope_type 'default'")
    if raw.get("mlp_bias"):
        refuse("mlp_bias=true", "false")
    window = raw.get("sliding_window")
    uses_window = raw.get("use_sliding_window", False) if model_type == "qwen2" else window is not None
    if uses_window and window is not None and window < raw.get("max_position_embeddings", 0):
        refuse(f"sliding-window attention (sliding_window={window})", "sliding_window null")
    return ModelConfig(
        arch="llama", vocab_size=vocab, block_size=raw.get("max_position_embeddings", 2048), n_layer=n_layer,
        n_head=n_head, n_kv_head=raw.get("num_key_value_heads") or n_head, n_embd=hidden,
        head_dim=raw.get("head_dim") or hidden // n_head, intermediate_size=inter,
        qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias")), tie_embeddings=raw.get("tie_word_embeddings", False),
        rope_theta=float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        norm_eps=raw.get("rms_norm_eps", 1e-6))


def config_to_hf(cfg: ModelConfig, tokenizer: Tokenizer) -> dict:
    pad = tokenizer.config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
           "pad_token_id": tokenizer.token_id(pad) if pad else None}
    if cfg.arch == "gpt2":
        if cfg.n_kv_head != cfg.n_head or cfg.head_dim * cfg.n_head != cfg.n_embd:
            raise CheckpointError("GPT-2 export needs n_kv_head == n_head and head_dim * n_head == n_embd "
                                  f"(got n_head={cfg.n_head}, n_kv_head={cfg.n_kv_head}, head_dim={cfg.head_dim})")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                "n_inner": cfg.intermediate_size, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.attention_dropout,
                "torch_dtype": "float32", **ids}
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
           "max_position_embeddings": cfg.block_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.intermediate_size,
           "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
           "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
           # rope_theta for transformers 4.x, rope_parameters for 5.x
           "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
           "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": cfg.attention_dropout, "torch_dtype": "float32", **ids}
    return {**out, "attention_bias": cfg.qkv_bias, "mlp_bias": False}


# ---- weights ------------------------------------------------------------------------------
def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder: model.safetensors, or the shards model.safetensors.index.json lists."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map' of tensor name -> shard file ({e})") from e
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
    elif (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    else:
        found = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        hint = f" (found {found[:3]}: pickle weights are not loaded, for safety)" if found else ""
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
    sd = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    sd[k] = fh.get_tensor(k)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors weights ({e})") from e
    return sd


def state_from_hf(sd: dict, cfg: ModelConfig, source) -> dict[str, torch.Tensor]:
    out = {}
    if cfg.arch == "llama":
        for name, t in sd.items():
            if name.endswith("rotary_emb.inv_freq"):  # recomputed from rope_theta
                continue
            if name.endswith("o_proj.bias"):  # Llama's attention_bias covers o_proj too; ours must be zero
                if t.any():
                    raise CheckpointError(f"{source}: {name} is non-zero; pocketlm supports a bias on q/k/v only")
                continue
            name = name.removeprefix("model.")
            for hf_part, ours in LLAMA_RENAMES:
                name = name.replace(hf_part, ours)
            out[name] = t
        return out
    for name, t in sd.items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
            continue
        if any(name.endswith(f"{c}.weight") for c in GPT2_CONV1D):
            t = t.t()
        if ".attn.c_attn." in name:
            for part, chunk in zip("qkv", t.chunk(3, dim=0)):
                out[_gpt2_rename(name.replace("attn.c_attn", f"attn.{part}_proj"), to_hf=False)] = chunk.contiguous()
            continue
        out[_gpt2_rename(name, to_hf=False)] = t.contiguous()
    return out


def _gpt2_rename(name: str, to_hf: bool) -> str:
    table = {b: a for a, b in GPT2_RENAMES.items()} if to_hf else GPT2_RENAMES
    for a, b in table.items():
        name = re.sub(rf"(^|\.){re.escape(a)}\.", rf"\g<1>{b}.", name, count=1)
    return re.sub(r"^layers\.(\d+)\.", r"h.\1.", name) if to_hf else re.sub(r"^h\.(\d+)\.", r"layers.\1.", name)


def state_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight")  # transformers re-ties it from tie_word_embeddings
    if cfg.arch == "llama":
        out = {}
        for name, t in sd.items():
            if name != "lm_head.weight":
                for hf_part, ours in LLAMA_RENAMES:
                    name = name.replace(ours, hf_part)
                name = "model." + name
            out[name] = t.contiguous()
            if name.endswith("q_proj.bias"):  # attention_bias also declares an o_proj bias
                out[name.replace("q_proj", "o_proj")] = torch.zeros(cfg.n_embd, dtype=t.dtype)
        return out
    out = {}
    for name, t in sd.items():
        if ".attn.k_proj." in name or ".attn.v_proj." in name:
            continue
        if ".attn.q_proj." in name:
            parts = [sd[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            t, name = torch.cat(parts, dim=0), name.replace("attn.q_proj", "attn.c_attn")
        name = _gpt2_rename(name, to_hf=True)
        if name.endswith(".weight") and any(name.endswith(f"{c}.weight") for c in GPT2_CONV1D):
            t = t.t()
        out[name if name == "lm_head.weight" else "transformer." + name] = t.contiguous()
    return out


def model_from_state(cfg: ModelConfig, sd: dict[str, torch.Tensor], source, device="cpu",
                     dtype=torch.float32) -> GPT:
    """Build GPT on the meta device and adopt the given tensors (no second copy, no random init)."""
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    for k, t in sd.items():
        sd[k] = t.to(device=device, dtype=dtype)
    with torch.device("meta"):
        model = GPT(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"{source}: tensor {k} has shape {tuple(sd[k].shape)}, the config implies {shape}")
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


# ---- tokenizer ----------------------------------------------------------------------------
def load_hf_tokenizer(folder: Path) -> Tokenizer:
    if not (folder / "tokenizer.json").exists():
        have = [f for f in ("tokenizer.model", "vocab.json") if (folder / f).exists()]
        raise CheckpointError(f"{folder}: missing tokenizer.json (the fast-tokenizer file pocketlm reads"
                              + (f"; found only {have}" if have else "") + ")")
    tok = Tokenizer.load(folder)
    extra = folder / "special_tokens_map.json"
    if extra.exists():  # older folders keep bos/eos here rather than in tokenizer_config.json
        for k, v in json.loads(extra.read_text(encoding="utf-8")).items():
            tok.config.setdefault(k, v)
    jinja = folder / "chat_template.jinja"  # transformers >= 4.47 saves the template beside the config
    if not tok.config.get("chat_template") and jinja.exists():
        tok.config["chat_template"] = jinja.read_text(encoding="utf-8")
    return tok


# ---- public API ---------------------------------------------------------------------------
def load_hf(folder, device="cpu", dtype=torch.float32) -> tuple[GPT, Tokenizer]:
    """(GPT, Tokenizer) from a local Hugging Face model folder."""
    folder = Path(folder)
    file = folder / "config.json"
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: missing config.json (expected a Hugging Face model folder)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from e
    cfg = config_from_hf(raw, file)
    tokenizer = load_hf_tokenizer(folder)
    model = model_from_state(cfg, state_from_hf(read_safetensors(folder), cfg, folder), folder, device, dtype)
    return model, tokenizer


def export_hf(model: GPT, tokenizer: Tokenizer, out, towers=()) -> Path:
    """Write a folder that transformers' Auto classes load with no custom code. `towers`: (tower,
    config dict) pairs of a vision or speech model, whose encoder and projector go beside the LM
    in their safetensors file, with their config section in config.json (transformers ignores
    both; pocketlm's --model reads the folder as the multimodal model it was)."""
    from pocketlm.model.vision import tower_state

    if tokenizer is None:
        raise CheckpointError("export needs the model's tokenizer, and this checkpoint has none")
    out = Path(out)
    config = config_to_hf(model.cfg, tokenizer)
    config.update({tower.config_key: tower_config for tower, tower_config in towers})
    sd = state_to_hf(model)
    stops = tokenizer.stop_ids
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops if len(stops) > 1 else tokenizer.eos_id,
                  "pad_token_id": config["pad_token_id"]}
    with atomic_dir(out) as tmp:
        save_file({k: v.float() for k, v in sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for tower, _ in towers:
            save_file(tower_state(tower), str(tmp / tower.weights_file), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({k: v for k, v in generation.items() if v is not None}, indent=2))
        tok = Tokenizer(tokenizer.hf, {**tokenizer.config, "chat_template": tokenizer.chat_template,
                                       # tokenizer.json is complete; this class loads it as written
                                       "tokenizer_class": "PreTrainedTokenizerFast"})
        tok.save(tmp)
    return out
