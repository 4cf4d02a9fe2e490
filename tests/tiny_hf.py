"""Tiny randomly initialised transformers models, the reference side of the import/export parity tests."""

from pathlib import Path

import torch

PROMPTS = ["First Citizen:\nBefore we proceed", "You are all resolved rather to die", "O", "What say you? 12 34"]


def hf_config(kind: str, vocab_size: int):
    import transformers

    common = dict(vocab_size=vocab_size, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if kind == "gpt2":
        return transformers.GPT2Config(n_positions=1024,  # transformers' GGUF loader assumes 1024
                                       n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0, **common)
    llama_like = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, **common)
    if kind == "llama":  # grouped-query attention, untied head, non-default RoPE base
        return transformers.LlamaConfig(rope_theta=5000.0, tie_word_embeddings=False, **llama_like)
    if kind == "qwen2":  # QKV bias, tied head
        return transformers.Qwen2Config(rope_theta=20000.0, tie_word_embeddings=True, **llama_like)
    if kind == "mistral":  # Mistral without a sliding window is Llama
        return transformers.MistralConfig(sliding_window=None, tie_word_embeddings=False, **llama_like)
    raise ValueError(kind)


def make_hf_model(kind: str, vocab_size: int, seed: int = 0):
    """A transformers model whose every parameter (norm weights and biases too) is random."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(kind, vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def save_hf_folder(kind: str, folder: Path, tokenizer_dir: Path, shard: bool = False):
    """Model and tokenizer saved by transformers itself (chat template in chat_template.jinja, as
    transformers 5 writes it); returns the transformers model."""
    import transformers

    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    model = make_hf_model(kind, len(hf_tok))
    model.save_pretrained(folder, max_shard_size="100KB" if shard else "5GB")
    hf_tok.save_pretrained(folder)
    return model


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def our_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0].tolist()


# ---- GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them -------------------------
def _llama_cpp_permute(w, n_head):
    """llama.cpp's converter interleaves each head's rotary halves (what our importer must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model):
    """(gguf name, float32 numpy array in (out, in) order) for a transformers Llama/Qwen2/GPT-2 model."""
    cfg, sd = model.config, {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if cfg.model_type == "gpt2":
        yield "token_embd.weight", sd["transformer.wte.weight"]
        yield "position_embd.weight", sd["transformer.wpe.weight"]
        for i in range(cfg.n_layer):
            h = f"transformer.h.{i}."
            for ours, theirs, conv in (("attn_norm", "ln_1", False), ("attn_qkv", "attn.c_attn", True),
                                       ("attn_output", "attn.c_proj", True), ("ffn_norm", "ln_2", False),
                                       ("ffn_up", "mlp.c_fc", True), ("ffn_down", "mlp.c_proj", True)):
                yield f"blk.{i}.{ours}.weight", sd[h + theirs + ".weight"].T.copy() if conv else sd[h + theirs + ".weight"]
                yield f"blk.{i}.{ours}.bias", sd[h + theirs + ".bias"]
        yield "output_norm.weight", sd["transformer.ln_f.weight"]
        yield "output_norm.bias", sd["transformer.ln_f.bias"]
        yield "output.weight", sd["transformer.wte.weight"]  # the converter writes the tied head out
        return
    permute = cfg.model_type == "llama"
    yield "token_embd.weight", sd["model.embed_tokens.weight"]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for ours, theirs in (("attn_norm", "input_layernorm"), ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                             ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"), ("ffn_norm", "post_attention_layernorm"),
                             ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")):
            for kind in ("weight", "bias"):
                t = sd.get(f"{p}{theirs}.{kind}")
                if t is not None:
                    if permute and ours in ("attn_q", "attn_k"):
                        t = _llama_cpp_permute(t, cfg.num_attention_heads if ours == "attn_q" else cfg.num_key_value_heads)
                    yield f"blk.{i}.{ours}.{kind}", t
    yield "output_norm.weight", sd["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        yield "output.weight", sd["lm_head.weight"]


def write_gguf(model, tok, path, qtype: str = "F32", pre: str = "qwen2", tokenizer: bool = True,
               unsupported: str | None = None, arch: str | None = None):
    """A GGUF file of a transformers model: 2-D weights stored as `qtype`, norms and biases as F32.
    `unsupported` names a tensor written as Q8_1, a type gguf cannot dequantize."""
    import json

    import gguf
    import numpy as np

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch or cfg.model_type)
    if cfg.model_type == "gpt2":
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    if tokenizer:
        vocab = tok.hf.get_vocab(with_added_tokens=True)
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        special = {t.content for t in tok.hf.get_added_tokens_decoder().values() if t.special}
        merges = json.loads(tok.hf.to_str())["model"]["merges"]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3 if t in special else 1 for t in tokens])
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        w.add_bos_token_id(tok.bos_id)
        w.add_eos_token_id(tok.eos_id)
        w.add_chat_template(tok.chat_template)
    q = gguf.GGMLQuantizationType
    for name, t in _gguf_tensors(model):
        t = np.ascontiguousarray(t, dtype=np.float32)
        if name == unsupported:
            block, size = gguf.GGML_QUANT_SIZES[q.Q8_1]
            w.add_tensor(name, np.zeros((t.shape[0], t.shape[1] // block * size), np.uint8), raw_dtype=q.Q8_1)
        elif t.ndim == 1 or qtype == "F32":
            w.add_tensor(name, t)
        elif qtype == "F16":
            w.add_tensor(name, t.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(t, q[qtype]), raw_dtype=q[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
