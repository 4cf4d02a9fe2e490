"""Speech into the language model, the same way images go in (pocketlm/model/vision.py): log-mel
features, a small conv + transformer encoder, frames stacked into a few audio tokens, a projector
into the LM's embedding width, and the splice at `<audio>` placeholders of the chat template.

    waveform (16 kHz, <= max_seconds) -> log-mel (n_mels, frames) -> 2 strided convs (frames/4, width)
        -> pre-norm blocks -> stack frames/tokens neighbours (tokens, width*k) -> projector (tokens, n_embd)

Log-mel is computed here with torch.stft and a triangular mel filterbank: torchaudio's PyPI wheel
does not match this torch, and these thirty lines are all of it that is needed. Every clip is padded
to max_seconds, so a clip always costs `tokens` LM positions (like an image's tokens_per_image).

On disk a speech model is the LM's checkpoint directory plus `speech.safetensors` and a "speech"
section in config.json (vision.py's layout, with its own file and section).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm.errors import InputError, PocketLMError
from pocketlm.model.gpt import GPT
from pocketlm.model.vision import EncoderBlock, encode_prompt, load_tower, load_tower_model, save_tower

AUDIO_PLACEHOLDER = "<audio>"
SPEECH_WEIGHTS = "speech.safetensors"


class SpeechError(PocketLMError):
    pass


@dataclass
class SpeechConfig:
    sample_rate: int = 16000
    max_seconds: float = 1.5    # every clip is padded to this; a longer one (after trimming silence) is refused
    n_fft: int = 400            # 25 ms windows
    hop: int = 160              # every 10 ms
    n_mels: int = 40
    width: int = 96
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    tokens: int = 4             # LM positions per clip: the encoder's frames stacked into this many
    projector_hidden: int = 256
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.width % self.heads:
            raise InputError(f"speech: width {self.width} must be a multiple of heads {self.heads}")
        if self.tokens < 1 or self.tokens > self.encoder_frames:
            raise InputError(f"speech: tokens must be in [1, {self.encoder_frames}] (the encoder's frames), got {self.tokens}")

    @property
    def samples(self) -> int:
        return int(round(self.max_seconds * self.sample_rate))

    @property
    def frames(self) -> int:
        return self.samples // self.hop + 1  # torch.stft with center=True

    @property
    def encoder_frames(self) -> int:
        n = self.frames
        for _ in range(2):  # two convs, kernel 3, stride 2, padding 1
            n = (n - 1) // 2 + 1
        return n

    @property
    def stack(self) -> int:
        return math.ceil(self.encoder_frames / self.tokens)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SpeechConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise SpeechError(f"unknown speech config keys {sorted(unknown)}")
        return cls(**d)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """(n_fft//2+1, n_mels) triangular filters evenly spaced on the HTK mel scale, 0 Hz to Nyquist."""
    def mel(hz):
        return 2595.0 * math.log10(1.0 + hz / 700.0)

    edges = torch.linspace(mel(0.0), mel(sample_rate / 2), n_mels + 2)
    hz = 700.0 * (10 ** (edges / 2595.0) - 1.0)
    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lo, mid, hi = hz[:-2], hz[1:-1], hz[2:]
    up = (bins[:, None] - lo) / (mid - lo)
    down = (hi - bins[:, None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0)


def log_mel(waves: torch.Tensor, cfg: SpeechConfig) -> torch.Tensor:
    """(N, samples) float waveforms in [-1, 1] -> (N, n_mels, frames) log-mel, scaled to about [-1, 1]:
    log10 power floored 6 decades under the clip's peak, then (x + 4) / 4. The floor keeps a silent pad
    from -inf, and sits near where a recording's own noise does, so clean and noisy clips read alike."""
    window = torch.hann_window(cfg.n_fft, device=waves.device)
    spec = torch.stft(waves, cfg.n_fft, cfg.hop, window=window, center=True, return_complex=True).abs() ** 2
    mel = torch.einsum("nft,fm->nmt", spec, mel_filterbank(cfg.n_fft, cfg.n_mels, cfg.sample_rate).to(waves.device))
    logs = torch.clamp(mel, min=1e-10).log10()
    logs = torch.maximum(logs, logs.amax(dim=(1, 2), keepdim=True) - 6.0)
    return (logs + 4.0) / 4.0


def prepare_clips(waves, cfg: SpeechConfig) -> torch.Tensor:
    """A list of 1-D float waveforms at cfg.sample_rate (pocketlm.data.speech reads files into these)
    -> (N, n_mels, frames) log-mel, each clip's leading and trailing silence trimmed, its peak scaled
    to 0.5, then zero-padded to max_seconds."""
    batch = torch.zeros(len(waves), cfg.samples)
    for i, w in enumerate(waves):
        w = clean_clip(w)
        if len(w) > cfg.samples:
            raise InputError(f"audio clip {i}: {len(w) / cfg.sample_rate:.2f} s of sound after trimming silence; "
                             f"this model takes at most {cfg.max_seconds} s")
        batch[i, :len(w)] = w
    return log_mel(batch, cfg)


def clean_clip(w) -> torch.Tensor:
    """A waveform trimmed of leading and trailing silence, its peak scaled to 0.5 (the same level for a
    whisper and a shout)."""
    w = trim_silence(torch.as_tensor(w, dtype=torch.float32).flatten())
    return w * (0.5 / w.abs().max()) if len(w) and w.abs().max() > 0 else w


def trim_silence(w: torch.Tensor, floor: float = 0.02) -> torch.Tensor:
    """The clip from its first to its last sample louder than `floor` x its peak (all of it if silent)."""
    if not len(w):
        return w
    loud = torch.nonzero(w.abs() > floor * w.abs().max()).flatten()
    return w[int(loud[0]):int(loud[-1]) + 1] if len(loud) else w


class AudioEncoder(nn.Module):
    """Two strided 1-D convs over the mel frames (Whisper's front end, at toy size), learned positions,
    pre-norm bidirectional blocks (the vision encoder's), a final LayerNorm: (N, frames/4, width)."""

    def __init__(self, cfg: SpeechConfig):
        super().__init__()
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(cfg.width, cfg.width, 3, stride=2, padding=1)
        self.positions = nn.Parameter(torch.randn(1, cfg.encoder_frames, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)

    def forward(self, mels):
        x = F.gelu(self.conv2(F.gelu(self.conv1(mels)))).transpose(1, 2) + self.positions
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class SpeechProjector(nn.Module):
    def __init__(self, cfg: SpeechConfig, n_embd: int):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width * cfg.stack, cfg.projector_hidden)
        self.fc2 = nn.Linear(cfg.projector_hidden, n_embd)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SpeechLM(nn.Module):
    """A text GPT plus an audio encoder and projector; `lm` is the unchanged text model. It offers the
    media-tower interface train/vlm.py and the engine use: placeholder, tokens_per_item, features,
    projector, embeds and engine_prompt."""

    placeholder = AUDIO_PLACEHOLDER
    weights_file, config_key = SPEECH_WEIGHTS, "speech"

    def __init__(self, lm: GPT, cfg: SpeechConfig):
        super().__init__()
        self.lm, self.speech_cfg = lm, cfg
        self.encoder = AudioEncoder(cfg)
        self.projector = SpeechProjector(cfg, lm.cfg.n_embd)

    @property
    def tokens_per_item(self) -> int:
        return self.speech_cfg.tokens

    def _check(self, mels):
        cfg = self.speech_cfg
        if mels.dim() != 3 or tuple(mels.shape[1:]) != (cfg.n_mels, cfg.frames):
            raise InputError(f"mels: expected (N, {cfg.n_mels}, {cfg.frames}), got {tuple(mels.shape)} (use prepare_clips)")

    def encode(self, mels) -> torch.Tensor:
        self._check(mels)
        return self.encoder(mels)

    def features(self, mels) -> torch.Tensor:
        """The encoder's frames, neighbours stacked into tokens (zero frames pad the last), before the projector."""
        x = self.encode(mels)
        cfg = self.speech_cfg
        x = F.pad(x, (0, 0, 0, cfg.stack * cfg.tokens - x.size(1)))
        return x.reshape(x.size(0), cfg.tokens, cfg.stack * x.size(-1))

    def embeds(self, mels) -> torch.Tensor:
        """(N, n_mels, frames) log-mel -> (N, tokens, n_embd)."""
        return self.projector(self.features(mels))

    @torch.no_grad()
    def engine_prompt(self, tokenizer, messages: list[dict], mels) -> tuple[list[int], torch.Tensor | None]:
        """(prompt ids, input_embeds (holes, n_embd) or None) for Engine.submit: one `<audio>` per clip."""
        ids = encode_prompt(tokenizer, messages, self.tokens_per_item, placeholder=AUDIO_PLACEHOLDER)
        holes = sum(t < 0 for t in ids)
        n = 0 if mels is None else len(mels)
        if holes != n * self.tokens_per_item:
            raise InputError(f"the messages have {holes // self.tokens_per_item} {AUDIO_PLACEHOLDER} placeholder(s) "
                             f"for {n} audio clip(s)")
        return ids, (self.embeds(mels).reshape(holes, -1) if n else None)

    def save(self, path, tokenizer):
        """The LM's checkpoint directory with the audio encoder and projector beside it (safetensors)."""
        return save_tower(self, path, tokenizer, self.speech_cfg.to_dict())


def speech_tower(source, lm, device="cpu") -> "SpeechLM | None":
    """The audio encoder and projector saved beside the checkpoint `source` was loaded from, around
    `lm`, or None for a model without one."""
    return load_tower(source, lm, SpeechLM, SpeechConfig, device)


def load_speech_model(path, device="cpu"):
    """(SpeechLM, tokenizer) from a directory SpeechLM.save wrote."""
    return load_tower_model(path, SpeechLM, SpeechConfig, device)
