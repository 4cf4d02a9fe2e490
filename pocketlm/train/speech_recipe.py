"""The speech recipe: a spoken-digit model, trained the way the vision model is (train/vlm.py), then
its accuracy through the chat path on voices it never heard.

    python -m pocketlm.train.speech_recipe --config configs/speech.yaml --data runs/spoken_digits --out runs/speech

    stage 0  the audio encoder with a linear head on its mean-pooled frames (the linear-probe figure),
             on clips with noise, shifts and speed changes added on the fly
    stage 1  the projector and pocketlm's tiny GPT on captions ("<audio> What was said?" -> "seven")
    stage 2  ... on questions ("<audio> Which digit is spoken?" -> "7")

The config has a `speech:` section (pocketlm.model.speech.SpeechConfig) and a `recipe:` section
(SpeechRecipe below); budgets are CPU-minutes of this process. Tune on the "val" voices; the "test"
voices are for the reported figure. results.json beside the saved model holds the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm.config import ConfigError, apply_overrides, parse_overrides, parse_section, read_sections
from pocketlm.data import speech as speech_data
from pocketlm.errors import PocketLMError
from pocketlm.model.speech import AUDIO_PLACEHOLDER, SpeechConfig, SpeechLM, clean_clip, log_mel, prepare_clips
from pocketlm.train.vlm import (ChatRows, ImageTask, Schedule, _run, chat_accuracy, probe_accuracy, tiny_text_model,
                                train_chat)

CAPTION = f"{AUDIO_PLACEHOLDER}\nWhat was said?"
TASK = ImageTask(f"{AUDIO_PLACEHOLDER}\nWhich digit is spoken?", tuple(str(d) for d in range(10)),
                 speech_data.DIGIT_WORDS, tuple((str(d), w) for d, w in enumerate(speech_data.DIGIT_WORDS)))


@dataclass
class SpeechRecipe:
    seed: int = 0
    threads: int = 2
    stage0_steps: int = 1500
    stage0_cpu_minutes: float = 0.0
    stage0_lr: float = 2e-3
    stage0_batch: int = 64
    noise_snr_db: float = 10.0   # stage-0 augmentation: white noise from this SNR up to 40 dB (0: none) ...
    clean_share: float = 0.3     # ... on all but this share of the clips (served clips may come clean)
    max_shift_s: float = 0.3     # ... the word placed up to this late in the clip
    speed: float = 0.1           # ... resampled by a factor in [1 - speed, 1 + speed]
    stage1_steps: int = 150
    stage1_cpu_minutes: float = 0.0
    stage2_steps: int = 300
    stage2_cpu_minutes: float = 0.0
    chat_lr: float = 3e-3
    chat_batch: int = 32
    val_limit: int = 1000


def load_recipe(path, overrides: dict | None = None) -> tuple[SpeechConfig, SpeechRecipe]:
    raw = apply_overrides(read_sections(path, ("speech", "recipe")), overrides,
                          {"speech": {f.name for f in dataclasses.fields(SpeechConfig)},
                           "recipe": {f.name for f in dataclasses.fields(SpeechRecipe)}})
    return parse_section("speech", raw["speech"], SpeechConfig), parse_section("recipe", raw["recipe"], SpeechRecipe)


def augmented_mels(clips, idx, cfg: SpeechConfig, recipe: SpeechRecipe, g: torch.Generator) -> torch.Tensor:
    """Log-mel of clips[idx], each sped up or slowed, placed at a random offset, with noise added."""
    batch = torch.zeros(len(idx), cfg.samples)
    for row, i in enumerate(idx.tolist()):
        w = clips[i]
        if recipe.speed:
            factor = 1 + (torch.rand(1, generator=g).item() * 2 - 1) * recipe.speed
            w = F.interpolate(w[None, None], scale_factor=1 / factor, mode="linear", align_corners=False)[0, 0]
        w = w[:cfg.samples]
        room = min(cfg.samples - len(w), int(recipe.max_shift_s * cfg.sample_rate))
        start = int(torch.randint(0, room + 1, (1,), generator=g)) if room > 0 else 0
        batch[row, start:start + len(w)] = w
        if recipe.noise_snr_db and torch.rand(1, generator=g).item() >= recipe.clean_share:
            snr = recipe.noise_snr_db + torch.rand(1, generator=g).item() * (40 - recipe.noise_snr_db)
            power = w.pow(2).mean().clamp(min=1e-8)
            batch[row] += torch.randn(cfg.samples, generator=g) * (power / 10 ** (snr / 10)).sqrt()
    return log_mel(batch, cfg)


def padded_mels(clips, cfg: SpeechConfig, chunk: int = 512) -> torch.Tensor:
    """prepare_clips in chunks (the log-mel of thousands of clips at once would not fit)."""
    return torch.cat([prepare_clips(clips[i:i + chunk], cfg) for i in range(0, len(clips), chunk)])


def train_encoder(slm: SpeechLM, clips, labels, recipe: SpeechRecipe, log=print) -> nn.Linear:
    head = nn.Linear(slm.speech_cfg.width, int(labels.max()) + 1)
    params = [*slm.encoder.parameters(), *head.parameters()]
    g = torch.Generator().manual_seed(recipe.seed)

    def loss_at(step):
        idx = torch.randint(0, len(clips), (recipe.stage0_batch,), generator=g)
        mels = augmented_mels(clips, idx, slm.speech_cfg, recipe, g)
        return F.cross_entropy(head(slm.encode(mels).mean(1)), labels[idx])

    slm.encoder.train()
    _run(params, Schedule(recipe.stage0_steps, recipe.stage0_cpu_minutes), recipe.stage0_lr, 0.05, loss_at, log,
         "stage 0", 100)
    slm.encoder.eval()
    return head


def run_recipe(out, data_dir, cfg: SpeechConfig, recipe: SpeechRecipe, log=print) -> dict:
    """Every stage, the model saved to `out`, then the figures (also in out/results.json)."""
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    c0 = time.process_time()
    splits = speech_data.load_spoken_digits(data_dir)
    clips = {k: [clean_clip(x) for x in w] for k, (w, _) in splits.items()}
    labels = {k: torch.as_tensor(y) for k, (_, y) in splits.items()}
    mels = {k: padded_mels(clips[k], cfg) for k in ("train", "val", "test")}
    texts = [*TASK.captions, *TASK.answers, TASK.question, CAPTION]
    lm, tok = tiny_text_model(texts * 20, recipe.seed)
    slm = SpeechLM(lm, cfg)
    log(f"audio encoder {sum(p.numel() for p in slm.encoder.parameters()):,} params, projector "
        f"{sum(p.numel() for p in slm.projector.parameters()):,}; clips train {len(labels['train'])}, "
        f"val {len(labels['val'])}, test {len(labels['test'])}")
    head = train_encoder(slm, clips["train"], labels["train"], recipe, log)
    result: dict = {f"probe_{k}": probe_accuracy(slm, head, mels[k], labels[k]) for k in ("val", "test")}
    cpu = {"stage0": time.process_time() - c0}
    with torch.no_grad():
        feats = torch.cat([slm.features(mels["train"][i:i + 500]) for i in range(0, len(mels["train"]), 500)])
    for stage, steps, budget, user, replies, seed in (
            ("stage 1", recipe.stage1_steps, recipe.stage1_cpu_minutes, CAPTION, TASK.captions, 0),
            ("stage 2", recipe.stage2_steps, recipe.stage2_cpu_minutes, TASK.question, TASK.answers, 1)):
        rows = ChatRows.build(tok, user, replies, slm.tokens_per_item, placeholder=AUDIO_PLACEHOLDER)
        losses = train_chat(slm, [(rows, feats, labels["train"])], steps=steps, cpu_minutes=budget, train_lm=True,
                            batch_size=recipe.chat_batch, lr=recipe.chat_lr, seed=recipe.seed + seed, stage=stage, log=log)
        result[f"{stage.replace(' ', '')}_steps"] = len(losses)
    result["train_cpu_minutes"] = round((time.process_time() - c0) / 60, 2)
    out = Path(out)
    slm.eval().save(out, tok)  # before the evaluation: a killed evaluation keeps the trained model
    result["chat_val"], _ = chat_accuracy(slm, tok, mels["val"][:recipe.val_limit], labels["val"][:recipe.val_limit], TASK)
    result["chat_test"], replies = chat_accuracy(slm, tok, mels["test"], labels["test"], TASK)
    result.update(test_clips=len(labels["test"]), sample_replies=replies[:5], stage0_cpu_s=round(cpu["stage0"], 1),
                  config={"speech": cfg.to_dict(), "recipe": dataclasses.asdict(recipe)})
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


def report(r: dict) -> str:
    return (f"spoken digits, held-out voices ({r['test_clips']} clips): chat {r['chat_test']:.4f} "
            f"(linear probe {r['probe_test']:.4f}); val voices: chat {r['chat_val']:.4f}, probe {r['probe_val']:.4f}\n"
            f"training: {r['train_cpu_minutes']} CPU-minutes (stage 0 {r['stage0_cpu_s']:.0f} s); "
            f"steps {r['stage1_steps']} + {r['stage2_steps']} after stage 0")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--data", required=True, help="a folder python -m pocketlm.data.speech wrote")
    ap.add_argument("--out", required=True)
    args, rest = ap.parse_known_args(argv)
    try:
        cfg, recipe = load_recipe(args.config, parse_overrides(rest))
        result = run_recipe(args.out, args.data, cfg, recipe)
    except (PocketLMError, ConfigError) as e:
        raise SystemExit(f"error: {e}") from None
    print(report(result))
    print(f"model saved to {args.out} (results.json beside it)")


if __name__ == "__main__":
    main()
