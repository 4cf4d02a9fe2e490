"""The vision-language recipe: every stage of pocketlm/train/vlm.py on the image sets a YAML file
names, saved as one model folder, then the accuracies through the chat path.

    python -m pocketlm.train.vlm_recipe --config configs/vlm.yaml --out runs/vlm [--recipe.KEY=VALUE ...]

The config has a `vision:` section (pocketlm.model.vision.VisionConfig) and a `recipe:` section
(Recipe below). Stage budgets are CPU-minutes of this process (all its threads), so they hold on a
machine other jobs share. The saved folder is a checkpoint every verb's --model reads; results.json
beside it holds the figures, the step counts and the CPU-seconds of every part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from pocketlm.config import ConfigError, read_sections
from pocketlm.data import images as image_data
from pocketlm.errors import PocketLMError
from pocketlm.model.vision import VisionConfig, VisionLM, prepare_images
from pocketlm.train import vlm_scenes
from pocketlm.train.vlm import (CAPTION_PROMPT, TASKS, ChatRows, chat_accuracy, encoder_features, probe_accuracy,
                                tiny_text_model, train_chat, train_encoder)


@dataclass
class Recipe:
    sets: str = "mnist"            # comma-separated image sets (pocketlm.data.images.labelled_splits),
                                   # or "scenes" alone (pocketlm/train/vlm_scenes.py)
    seed: int = 0
    threads: int = 2
    stage0_steps: int = 1500
    stage0_cpu_minutes: float = 0.0  # 0: no budget (the step count ends the stage)
    stage0_lr: float = 2e-3
    stage0_batch: int = 64
    shift: int = 2                 # stage-0 augmentation: random shifts of up to this many pixels
    stage1_steps: int = 150
    stage1_cpu_minutes: float = 0.0
    stage2_steps: int = 300
    stage2_cpu_minutes: float = 0.0
    chat_lr: float = 3e-3
    chat_batch: int = 32
    feature_limit: int = 12000     # training images per set whose features stages 1-2 use
    eval_limit: int = 0            # evaluate on the first N test images of each set (0: all)
    val_limit: int = 1000          # ... and on the first N validation images through the chat path
    lm_layers: int = 2             # the tiny LM: layers, width, vocabulary
    lm_width: int = 64
    vocab_size: int = 320
    scenes: int = 10000            # scenes only: training scenes, test scenes (val_limit: validation scenes),
    test_scenes: int = 2000        # question sets drawn per training scene for stage 2
    question_draws: int = 4

    @classmethod
    def from_dict(cls, values: dict) -> "Recipe":
        kinds = {f.name: f.type for f in fields(cls)}
        unknown = set(values) - set(kinds)
        if unknown:
            raise ConfigError(f"unknown recipe keys {sorted(unknown)}; valid keys: {', '.join(sorted(kinds))}")
        typed = {}
        for k, v in values.items():
            want = {"int": int, "float": float, "str": str}[kinds[k]]
            try:
                typed[k] = want(v) if not isinstance(v, bool) else _bad(k, v, want)
            except (TypeError, ValueError):
                _bad(k, v, want)
        recipe = cls(**typed)
        if "scenes" in recipe.set_names and recipe.set_names != ["scenes"]:
            raise ConfigError(f"recipe.sets: 'scenes' trains alone (its own encoder and heads), got {recipe.sets!r}")
        for name in recipe.set_names:
            if name not in (*TASKS, "scenes"):
                raise ConfigError(f"recipe.sets: unknown image set {name!r}; valid: {', '.join(TASKS)}, or scenes")
        return recipe

    @property
    def set_names(self) -> list[str]:
        return [s.strip() for s in self.sets.split(",") if s.strip()]


def _bad(key, value, want):
    raise ConfigError(f"recipe.{key}: expected {want.__name__}, got {value!r}")


def load_recipe(path, overrides: dict | None = None) -> tuple[VisionConfig, Recipe]:
    raw = read_sections(path, ("vision", "recipe"))
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if section not in raw or not name:
            raise ConfigError(f"--{key}: expected --vision.KEY=VALUE or --recipe.KEY=VALUE")
        if section == "vision":
            kind = {f.name: f.type for f in fields(VisionConfig)}.get(name)
            value = {"int": int, "float": float}.get(kind, str)(value)
        raw[section][name] = value
    try:
        vision = VisionConfig.from_dict(raw["vision"])
    except (TypeError, PocketLMError) as e:  # (a bad value, or VisionConfig's own checks)
        raise ConfigError(f"{path}: {e}") from None
    return vision, Recipe.from_dict(raw["recipe"])


def run_recipe(out, vision: VisionConfig, recipe: Recipe, data_root=None, log=print) -> dict:
    """Every stage, the model saved to `out`, then the figures (also in out/results.json)."""
    torch.set_num_threads(recipe.threads)
    if recipe.set_names == ["scenes"]:
        return _saved(out, vlm_scenes.run_scenes(out, vision, recipe, log), vision, recipe)
    c0, t0 = time.process_time(), time.perf_counter()
    timings: dict[str, dict] = {}

    def mark(name):
        timings[name] = {"cpu_s": round(time.process_time() - c0, 1), "wall_s": round(time.perf_counter() - t0, 1)}

    names, TRAIN = recipe.set_names, "train"
    data = {}
    for name in names:
        splits = image_data.labelled_splits(name, recipe.seed, data_root)
        if recipe.eval_limit:
            x, y = splits["test"]
            splits["test"] = (x[:recipe.eval_limit], y[:recipe.eval_limit])
        data[name] = {k: (prepare_images(x, vision), torch.as_tensor(y)) for k, (x, y) in splits.items()}
    mark("data")
    tasks = [TASKS[n] for n in names]
    texts = [t for task in tasks for t in (*task.captions, *task.answers, task.question)] + [CAPTION_PROMPT]
    lm, tok = tiny_text_model(texts * 20, recipe.seed)
    vlm = VisionLM(lm, vision)
    log(f"vision encoder {sum(p.numel() for p in vlm.encoder.parameters()):,} params, projector "
        f"{sum(p.numel() for p in vlm.projector.parameters()):,}, LM {sum(p.numel() for p in lm.parameters()):,}; "
        f"sets {', '.join(f'{n} ({len(data[n][TRAIN][1])} train)' for n in names)}")

    heads = train_encoder(vlm, [data[n]["train"] for n in names], steps=recipe.stage0_steps,
                          cpu_minutes=recipe.stage0_cpu_minutes, batch_size=recipe.stage0_batch, lr=recipe.stage0_lr,
                          shift=recipe.shift, seed=recipe.seed, log=log)
    mark("stage0")
    result: dict = {"sets": {}}
    for name, head in zip(names, heads):
        result["sets"][name] = {f"probe_{k}": probe_accuracy(vlm, head, *data[name][k]) for k in ("val", "test")}
        log(f"stage 0 {name}: linear probe val {result['sets'][name]['probe_val']:.4f}, "
            f"test {result['sets'][name]['probe_test']:.4f}")
    feats = {n: (encoder_features(vlm, data[n]["train"][0][:recipe.feature_limit]),
                 data[n]["train"][1][:recipe.feature_limit]) for n in names}
    for stage, steps, budget, replies, seed in (("stage 1", recipe.stage1_steps, recipe.stage1_cpu_minutes, "captions", 0),
                                               ("stage 2", recipe.stage2_steps, recipe.stage2_cpu_minutes, "answers", 1)):
        rows = []
        for name, task in zip(names, tasks):
            user = CAPTION_PROMPT if replies == "captions" else task.question
            rows.append((ChatRows.build(tok, user, getattr(task, replies), vlm.tokens_per_image), *feats[name]))
        losses = train_chat(vlm, rows, steps=steps, cpu_minutes=budget, train_lm=True, batch_size=recipe.chat_batch,
                            lr=recipe.chat_lr, seed=recipe.seed + seed, stage=stage, log=log)
        result[f"{stage.replace(' ', '')}_steps"], result[f"{stage.replace(' ', '')}_loss"] = len(losses), losses[-1]
        mark(stage.replace(" ", ""))
    result["train_cpu_minutes"] = round(timings["stage2"]["cpu_s"] / 60, 2)
    out = Path(out)
    vlm.eval().save(out, tok)  # before the evaluation: a killed evaluation keeps the trained model
    for name, task in zip(names, tasks):
        figures = result["sets"][name]
        x, y = data[name]["val"]
        figures["chat_val"], _ = chat_accuracy(vlm, tok, x[:recipe.val_limit], y[:recipe.val_limit], task)
        figures["chat_test"], replies = chat_accuracy(vlm, tok, *data[name]["test"], task)
        figures["test_images"], figures["sample_replies"] = len(data[name]["test"][1]), replies[:5]
        mark(f"eval_{name}")
    result["timings"] = timings
    return _saved(out, result, vision, recipe)


def _saved(out, result: dict, vision: VisionConfig, recipe: Recipe) -> dict:
    result["config"] = {"vision": vision.to_dict(), "recipe": dataclasses.asdict(recipe)}
    (Path(out) / "results.json").write_text(json.dumps(result, indent=2))
    return result


def report(result: dict) -> str:
    if "chat" in result:  # the scenes task's figures
        return vlm_scenes.report(result)
    lines = [f"{'set':8s} {'probe val':>9s} {'probe test':>10s} {'chat val':>9s} {'chat test':>10s}  test images"]
    for name, f in result["sets"].items():
        lines.append(f"{name:8s} {f['probe_val']:9.4f} {f['probe_test']:10.4f} {f['chat_val']:9.4f} "
                     f"{f['chat_test']:10.4f}  {f['test_images']}")
    t = result["timings"]
    lines.append(f"training: {result['train_cpu_minutes']} CPU-minutes (stage 0 {t['stage0']['cpu_s'] - t['data']['cpu_s']:.0f} s, "
                 f"stages 1-2 {t['stage2']['cpu_s'] - t['stage0']['cpu_s']:.0f} s); "
                 f"steps {result['stage1_steps']} + {result['stage2_steps']} after stage 0")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    args, rest = ap.parse_known_args(argv)
    overrides = {}
    for item in rest:
        key, sep, value = item.removeprefix("--").partition("=")
        if not item.startswith("--") or not sep:
            ap.error(f"unrecognised argument {item!r} (overrides are --section.key=value)")
        overrides[key] = value
    try:
        vision, recipe = load_recipe(args.config, overrides)
        result = run_recipe(args.out, vision, recipe)
    except (image_data.ImageDataError, ConfigError, vlm_scenes.SceneTaskError) as e:
        raise SystemExit(f"error: {e}") from None
    print(report(result))
    print(f"model saved to {args.out} (results.json beside it)")


if __name__ == "__main__":
    main()
