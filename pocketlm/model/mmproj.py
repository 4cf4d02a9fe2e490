"""The vision tower as a llama.cpp mmproj file: a GGUF of architecture "clip" that llama.cpp's
multimodal tools (llama-mtmd-cli, llama-server --mmproj, libmtmd) load beside the LM's own GGUF.

Projector type "lfm2" is the one whose graph is ours (llama.cpp tools/mtmd/models/siglip.cpp):
a SigLIP ViT (one strided conv, learned positions, pre-norm blocks, a final LayerNorm), then the
pixel unshuffle in the same order as pixel_shuffle here (each token holds its f x f patches row by
row, tokens row-major), then fc1 -> GELU(tanh) -> fc2 with biases (the input LayerNorm is optional
there, and we have none). The others do not fit: idefics3 projects with one bias-free linear,
internvl puts a LayerNorm before the MLP and needs a CLS token, nemotron_v2_vl has RMSNorm, ReLU^2
and register tokens, llava's "mlp" does no pixel shuffle.

Preprocessing is lfm2's, not ours: llama.cpp resizes (bilinear, aspect ratio kept) to a multiple of
patch_size*shuffle whose token count lies in [image_min_tokens, image_max_tokens], by default
64..256, and interpolates the learned positions to the new grid. Our encoder sees image_size pixels
(tokens_per_image tokens) only, so run llama.cpp with image_min_tokens = image_max_tokens =
tokens_per_image (llama-mtmd-cli --image-min-tokens N --image-max-tokens N): a square image is then
resized to image_size x image_size, and one at image_size already goes in as it is. Without those
flags a 32 px image is doubled to 64 px and gets 4x the tokens, which the model never saw.

The "conv" stem (convs, BatchNorm, ReLU, max-pools) has no counterpart in clip's graph: refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pocketlm.model.vision import VisionError, VisionLM

PROJECTOR_TYPE = "lfm2"
# pocketlm's encode() centres pixels in [0, 1] as (x - 0.5) / 0.5: clip's mean and std per channel
IMAGE_MEAN, IMAGE_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def mmproj_tensors(model: VisionLM) -> dict[str, torch.Tensor]:
    """clip tensor name -> float32 tensor in PyTorch's (out, in) layout (the gguf writer reverses the dims)."""
    cfg = model.vision_cfg
    if cfg.stem != "patch":
        raise VisionError(f"mmproj export: the {cfg.stem!r} stem (3x3 convs, BatchNorm, ReLU and max-pools per halving) "
                          f"has no equivalent in llama.cpp's clip graph, whose patch embedding is one strided conv "
                          f"(v.patch_embd.weight); only an encoder trained with vision.stem: patch can be exported")
    enc, proj = model.encoder, model.projector
    patch = enc.patch_embed.weight.detach()
    if cfg.channels == 1:
        # clip always feeds RGB; prepare_images averages RGB for a grey encoder, and
        # (mean(rgb) - 0.5) / 0.5 == mean((rgb - 0.5) / 0.5), so w/3 on each channel is the same sum
        patch = patch.expand(-1, 3, -1, -1) / 3
    elif cfg.channels != 3:
        raise VisionError(f"mmproj export: clip takes RGB images; this encoder has {cfg.channels} channels (1 or 3 export)")
    t = {"v.patch_embd.weight": patch, "v.patch_embd.bias": enc.patch_embed.bias,
         "v.position_embd.weight": enc.positions[0],
         "v.post_ln.weight": enc.norm.weight, "v.post_ln.bias": enc.norm.bias,
         "mm.1.weight": proj.fc1.weight, "mm.1.bias": proj.fc1.bias,
         "mm.2.weight": proj.fc2.weight, "mm.2.bias": proj.fc2.bias}
    for i, b in enumerate(enc.blocks):
        # qkv rows are [q heads | k heads | v heads], the fused layout clip's build_vit slices
        for ours, theirs in (("norm1", "ln1"), ("qkv", "attn_qkv"), ("out", "attn_out"), ("norm2", "ln2"),
                             ("fc1", "ffn_up"), ("fc2", "ffn_down")):
            layer = getattr(b, ours)
            t[f"v.blk.{i}.{theirs}.weight"], t[f"v.blk.{i}.{theirs}.bias"] = layer.weight, layer.bias
    return {k: v.detach().float().contiguous() for k, v in t.items()}


def export_mmproj(model: VisionLM, out, name: str = "pocketlm vision tower") -> Path:
    """Write model's encoder and projector as an mmproj GGUF at `out` (float32; written to a
    temporary name first, so a failed export leaves no half file)."""
    import gguf

    cfg = model.vision_cfg
    tensors = mmproj_tensors(model)  # refuses what clip cannot express before anything is written
    out = Path(out)
    if out.suffix != ".gguf":
        raise VisionError(f"{out}: an mmproj file is a .gguf file (e.g. --out mmproj-model.gguf)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(PROJECTOR_TYPE)
    w.add_vision_projection_dim(model.lm.cfg.n_embd)
    w.add_vision_image_size(cfg.image_size)
    w.add_vision_patch_size(cfg.patch_size)
    w.add_vision_embedding_length(cfg.width)
    w.add_vision_feed_forward_length(cfg.mlp_ratio * cfg.width)
    w.add_vision_block_count(cfg.depth)
    w.add_vision_head_count(cfg.heads)
    w.add_vision_attention_layernorm_eps(cfg.norm_eps)
    w.add_vision_projector_scale_factor(cfg.shuffle)
    w.add_vision_use_gelu(True)  # ggml_gelu is the tanh approximation, as the encoder's F.gelu(approximate="tanh")
    w.add_vision_image_mean(IMAGE_MEAN)
    w.add_vision_image_std(IMAGE_STD)
    for k, v in tensors.items():
        w.add_tensor(k, v.cpu().numpy())
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
