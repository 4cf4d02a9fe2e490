"""Images into the language model, nanoVLM/LLaVA style: a small SigLIP-shaped encoder, a pixel
shuffle, a projector into the LM's embedding width, and the splice of those embeddings into a prompt.

    pixels (N, C, S, S) -> patches (N, (S/p)^2, width) -> pixel shuffle (N, tokens, width*f^2)
                        -> projector MLP (N, tokens, n_embd)

A prompt marks each image with `<image>` in its text; `encode_prompt` turns every placeholder into
`tokens_per_image` ids of -1, which is how the engine (pocketlm/infer/batch.py) and GPT.forward
know to take those positions' embeddings from `input_embeds`. With no image the text model runs
exactly as it does alone.

On disk, a vision model is the LM's checkpoint directory plus `vision.safetensors` (encoder and
projector) and a "vision" section in its config.json; `load_model` still reads the LM from it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pocketlm.errors import InputError, PocketLMError
from pocketlm.model.gpt import GPT

IMAGE_PLACEHOLDER = "<image>"
VISION_WEIGHTS = "vision.safetensors"


class VisionError(PocketLMError):
    pass


@dataclass
class VisionConfig:
    image_size: int = 32        # images are resized to image_size x image_size
    patch_size: int = 4
    stem: str = "conv"          # patch: one strided conv (SigLIP's patch embedding) | conv: two 3x3
                                # convs and a 2x2 max-pool per halving (a hybrid ViT's stem, conv_stem)
    channels: int = 1           # 1: grey (digits), 3: RGB
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    shuffle: int = 2            # pixel-shuffle factor: each image token holds shuffle^2 patches
    projector_hidden: int = 256
    norm_eps: float = 1e-6

    def __post_init__(self):
        grid = self.image_size // self.patch_size
        if self.image_size % self.patch_size or grid % self.shuffle:
            raise InputError(f"vision: image_size {self.image_size} must be a multiple of patch_size {self.patch_size} "
                             f"and the patch grid ({grid}) a multiple of shuffle {self.shuffle}")
        if self.stem not in ("patch", "conv"):
            raise InputError(f"vision.stem: expected 'patch' or 'conv', got {self.stem!r}")
        if self.stem == "conv" and self.patch_size & (self.patch_size - 1):
            raise InputError(f"vision: the conv stem halves the image log2(patch_size) times; patch_size "
                             f"{self.patch_size} is not a power of 2")
        if self.width % self.heads:
            raise InputError(f"vision: width {self.width} must be a multiple of heads {self.heads}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        return (self.grid // self.shuffle) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise VisionError(f"unknown vision config keys {sorted(unknown)}")
        return cls(**d)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block, bidirectional attention (every patch sees every patch)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.width
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(d, cfg.mlp_ratio * d)
        self.fc2 = nn.Linear(cfg.mlp_ratio * d, d)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + self.out(y)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


def conv_stem(cfg: VisionConfig) -> nn.Sequential:
    """Per halving of the image: two 3x3 convs with BatchNorm and ReLU, then a 2x2 max-pool (32, 64, ...
    channels), then a 1x1 conv to the encoder's width: one feature per patch_size x patch_size square,
    as the patch embedding gives, but local features a few thousand images train quickly. On MNIST 5k
    (300 steps) a plain patch embedding reached a 68% linear probe, one strided-conv pair 81%; after
    100 steps this stem's loss was 0.23 where one conv per halving had 0.80."""
    layers, channels = [], cfg.channels
    for i in range(cfg.patch_size.bit_length() - 1):
        out = 32 * 2 ** i
        for c in (channels, out):
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        layers.append(nn.MaxPool2d(2))
        channels = out
    return nn.Sequential(*layers, nn.Conv2d(channels, cfg.width, 1))


class VisionEncoder(nn.Module):
    """SigLIP's shape at toy size: a patch embedding (a strided conv, or the conv stem), learned
    positions, pre-norm blocks, a final LayerNorm. Returns one feature per patch, (N, grid^2, width)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = (conv_stem(cfg) if cfg.stem == "conv" else
                            nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, stride=cfg.patch_size))
        self.positions = nn.Parameter(torch.randn(1, cfg.grid ** 2, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)

    def forward(self, pixels):
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2) + self.positions
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def pixel_shuffle(x, factor: int):
    """(N, g*g, D) patch features -> (N, (g/f)^2, D*f*f): each f x f square of neighbouring patches
    becomes one token (SmolVLM's space-to-depth), so an image costs f^2 times fewer LM positions."""
    N, P, D = x.shape
    g = int(round(P ** 0.5))
    x = x.view(N, g // factor, factor, g // factor, factor, D).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(N, (g // factor) ** 2, factor * factor * D)


class Projector(nn.Module):
    def __init__(self, cfg: VisionConfig, n_embd: int):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width * cfg.shuffle ** 2, cfg.projector_hidden)
        self.fc2 = nn.Linear(cfg.projector_hidden, n_embd)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionLM(nn.Module):
    """A text GPT plus an image encoder and projector. `lm` is the unchanged text model: a prompt with
    no image runs through it alone."""

    def __init__(self, lm: GPT, cfg: VisionConfig):
        super().__init__()
        self.lm, self.vision_cfg = lm, cfg
        self.encoder = VisionEncoder(cfg)
        self.projector = Projector(cfg, lm.cfg.n_embd)

    @property
    def tokens_per_image(self) -> int:
        return self.vision_cfg.tokens_per_image

    def image_embeds(self, pixels) -> torch.Tensor:
        """(N, C, S, S) float pixels in [0, 1] -> (N, tokens_per_image, n_embd)."""
        cfg = self.vision_cfg
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (cfg.channels, cfg.image_size, cfg.image_size):
            raise InputError(f"pixels: expected (N, {cfg.channels}, {cfg.image_size}, {cfg.image_size}), "
                             f"got {tuple(pixels.shape)} (use prepare_images)")
        return self.projector(self.features(pixels))

    def encode(self, pixels) -> torch.Tensor:
        """The encoder's patch features (N, grid^2, width) of pixels in [0, 1] (centred to [-1, 1])."""
        return self.encoder((pixels - 0.5) / 0.5)

    def features(self, pixels) -> torch.Tensor:
        """The encoder's pixel-shuffled output, before the projector (N, tokens_per_image, width*f^2)."""
        return pixel_shuffle(self.encode(pixels), self.vision_cfg.shuffle)

    def splice(self, ids, pixels) -> torch.Tensor:
        """The (B, T, n_embd) input_embeds for ids (B, T) with tokens_per_image ids < 0 per image:
        image i's embeddings fill the i-th run of holes, in row-major order (several images per row
        work). Positions holding real ids get zeros (GPT.forward takes those from its embedding)."""
        holes = ids < 0
        n_images = int(holes.sum()) // self.tokens_per_image
        if n_images * self.tokens_per_image != int(holes.sum()) or n_images != len(pixels):
            raise InputError(f"the prompt has {int(holes.sum())} image positions; {len(pixels)} image(s) need "
                             f"{len(pixels) * self.tokens_per_image} ({self.tokens_per_image} each)")
        embeds = self.image_embeds(pixels)
        out = torch.zeros(*ids.shape, embeds.size(-1), dtype=embeds.dtype, device=embeds.device)
        return out.index_put((holes,), embeds.reshape(-1, embeds.size(-1)))

    def forward(self, ids, targets=None, pixels=None):
        """GPT.forward with images: pixels (n_images, C, S, S) for the holes of ids, or None for text."""
        if pixels is None:
            return self.lm(ids, targets)
        return self.lm(ids, targets, input_embeds=self.splice(ids, pixels))

    @torch.no_grad()
    def engine_prompt(self, tokenizer, messages: list[dict], pixels) -> tuple[list[int], torch.Tensor | None]:
        """(prompt ids, input_embeds (holes, n_embd) or None) for Engine.submit: a chat whose contents
        hold one `<image>` per image in pixels, in order."""
        ids = encode_prompt(tokenizer, messages, self.tokens_per_image)
        holes = sum(t < 0 for t in ids)
        n = 0 if pixels is None else len(pixels)
        if holes != n * self.tokens_per_image:
            raise InputError(f"the messages have {holes // self.tokens_per_image} {IMAGE_PLACEHOLDER} placeholder(s) "
                             f"for {n} image(s)")
        return ids, (self.image_embeds(pixels).reshape(holes, -1) if n else None)

    # ---- the media-tower interface (train/vlm.py, the engine, speech.py's SpeechLM offers the same) ----
    placeholder = IMAGE_PLACEHOLDER
    weights_file, config_key = VISION_WEIGHTS, "vision"

    @property
    def tokens_per_item(self) -> int:
        return self.tokens_per_image

    def embeds(self, pixels) -> torch.Tensor:
        return self.image_embeds(pixels)

    def save(self, path, tokenizer) -> Path:
        """The LM's checkpoint directory with the vision tower and projector beside it (safetensors)."""
        return save_tower(self, path, tokenizer, self.vision_cfg.to_dict())


def tower_state(tower) -> dict[str, torch.Tensor]:
    """A tower's encoder and projector weights, named as _with_tower reads them back."""
    sd = {f"encoder.{k}": v for k, v in tower.encoder.state_dict().items()}
    sd.update({f"projector.{k}": v for k, v in tower.projector.state_dict().items()})
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_tower(tower, path, tokenizer, config: dict) -> Path:
    """tower.lm's checkpoint directory, with tower_state(tower) in tower.weights_file and `config`
    under tower.config_key in config.json (a vision or a speech tower)."""
    from pocketlm.model.checkpoint import WEIGHTS, model_state, save_checkpoint

    def weights(tmp, lm):
        save_file(model_state(lm), str(tmp / WEIGHTS), metadata={"format": "pt"})
        save_file(tower_state(tower), str(tmp / tower.weights_file), metadata={"format": "pt"})

    return save_checkpoint(path, tower.lm, tokenizer, extra_config={tower.config_key: config}, save_weights=weights)


def load_vision_model(path, device="cpu"):
    """(VisionLM, tokenizer) from a directory VisionLM.save wrote (a run's checkpoint or the folder)."""
    return load_tower_model(path, VisionLM, VisionConfig, device)


def load_tower_model(path, kind, config_cls, device="cpu"):
    """(a `kind` model around its LM, tokenizer) from a directory its save() wrote."""
    from pocketlm.model.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(Path(path))
    raw = _tower_section(path, kind)
    if raw is None:
        raise VisionError(f"{path}: a text-only model (no {kind.config_key!r} section in config.json or no {kind.weights_file})")
    lm, tok = load_checkpoint(path, device=device)
    return _with_tower(path, lm, kind, config_cls.from_dict(raw), device).eval(), tok


def vision_tower(source, lm, device="cpu") -> "VisionLM | None":
    """The encoder and projector saved beside the checkpoint `source` was loaded from, around `lm`,
    or None for a text-only model (a .gguf file, a Hugging Face folder, a plain checkpoint). What the
    engine and the server use to turn images into input_embeds."""
    return load_tower(source, lm, VisionLM, VisionConfig, device)


def load_tower(source, lm, kind, config_cls, device="cpu"):
    """A `kind` tower (VisionLM, SpeechLM) around lm from beside the checkpoint `source`, or None."""
    from pocketlm.model.checkpoint import resolve_checkpoint

    if not Path(source).is_dir():
        return None
    try:
        path = resolve_checkpoint(Path(source))
    except PocketLMError:
        return None
    raw = _tower_section(path, kind)
    return None if raw is None else _with_tower(path, lm, kind, config_cls.from_dict(raw), device).eval()


def _tower_section(path: Path, kind) -> dict | None:
    config = path / "config.json"
    if not config.exists() or not (path / kind.weights_file).exists():
        return None
    return json.loads(config.read_text()).get(kind.config_key)


def _with_tower(path: Path, lm, kind, cfg, device):
    model = kind(lm, cfg).to(device)
    file = path / kind.weights_file
    try:
        sd = load_file(str(file), device=str(device))
    except (SafetensorError, OSError) as e:
        raise VisionError(f"{file}: cannot read safetensors weights ({e})") from e
    for name, module in (("encoder", model.encoder), ("projector", model.projector)):
        part = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        try:
            module.load_state_dict(part)
        except RuntimeError as e:
            raise VisionError(f"{file}: {name} weights do not match the config ({e})") from e
    return model


# ---- prompts and pixels ----------------------------------------------------------------------
def encode_prompt(tokenizer, messages: list[dict], tokens_per_image: int, add_generation_prompt: bool = True,
                  placeholder: str = IMAGE_PLACEHOLDER) -> list[int]:
    """Token ids of a chat with `placeholder`s (`<image>`, or speech's `<audio>`) in its contents, each
    replaced by tokens_per_image ids of -1. The rendered text is cut at the placeholders and each piece is
    tokenized on its own, so no token straddles an image."""
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str) and any(mark in content for mark in tokenizer.markers):
            # (pieces are tokenized with the template's markers as special tokens: refuse forged turns)
            raise InputError(f"messages[{i}].content: special-token markers are not allowed beside images")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt)
    ids: list[int] = []
    for n, piece in enumerate(text.split(placeholder)):
        if n:
            ids += [-1] * tokens_per_image
        ids += tokenizer.encode(piece) if piece else []
    return ids


def prepare_images(images, cfg: VisionConfig) -> torch.Tensor:
    """uint8 arrays (N, H, W) or (N, H, W, C), values 0-255 -> (N, channels, S, S) floats in [0, 1]
    (bilinear resize; grey is repeated for an RGB encoder, RGB averaged for a grey one)."""
    x = torch.from_numpy(np.array(images, dtype=np.float32)) / 255.0  # (a copy: loaders' arrays are read-only)
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    if x.dim() != 4:
        raise InputError(f"images: expected (N, H, W) or (N, H, W, C), got shape {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2)
    if x.size(1) != cfg.channels:
        if cfg.channels == 1:
            x = x[:, :3].mean(1, keepdim=True)  # (an alpha channel is not brightness)
        else:
            x = x[:, :3] if x.size(1) >= 3 else x[:, :1].expand(-1, cfg.channels, -1, -1)
    if x.shape[-2:] != (cfg.image_size, cfg.image_size):
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    return x.contiguous()
