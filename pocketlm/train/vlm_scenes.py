"""The scenes task of the VLM recipe (issue 16): pocketlm/data/scenes.py's seeded pictures and their
attribute / relation / count questions, through the same three stages as the digit sets.

    stage 0  the encoder, with linear heads on each image token that name the cell's contents (empty or
             a colour, the shape, the size) and the cell's row and column
    stage 1  the projector and the tiny LM on captions that list the objects in grid order
    stage 2  the projector and the LM on the questions, a random one of each sampled scene a step

Why per-cell heads: with 64 px scenes, 16 px patches and no pixel shuffle, image token i is the patch of
cell i (row-major, the order the LM reads them in), so a head per token asks the encoder for exactly
what the questions need, cell by cell; a mean-pooled head (the digit sets') would blur the cells into
one vector. The row and column heads keep each token's position in its features: the LM's rotary
positions only say how far apart two tokens are, and "is A left of B" needs where each one is.

Seeds: training scenes are TRAIN_SEEDS' first `scenes`, validation scenes its last `val_limit` (never
trained on, the only ones tuned on), test scenes TEST_SEEDS' first `test_scenes`. The linear probe
answers every question from the scene the stage-0 heads decode (scenes.answer), so it is the encoder's
own figure per kind, beside the chat path's greedy replies.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pocketlm.data import scenes as S
from pocketlm.errors import PocketLMError
from pocketlm.infer.engine import Engine
from pocketlm.infer.sampling import SamplingParams
from pocketlm.model.vision import IMAGE_PLACEHOLDER, VisionConfig, VisionLM, encode_prompt, prepare_images
from pocketlm.tokenizer import Tokenizer
from pocketlm.train.vlm import CAPTION_PROMPT, Schedule, _run, encoder_features, tiny_text_model, train_chat

COLOURS = list(S.COLOURS)
HEADS = {"colour": 1 + len(COLOURS), "shape": len(S.SHAPES), "size": len(S.SIZES), "row": S.GRID, "col": S.GRID}
KINDS = ("attribute", "relation", "count")


class SceneTaskError(PocketLMError):
    pass


@dataclass
class SceneSet:
    """Rendered scenes of one seed range: images (N, SIZE, SIZE, 3) uint8, their objects, and the
    questions asked of them (scenes.questions with the scene's own seed: the evaluation's)."""
    seeds: list[int]
    things: list[list[S.Thing]]
    images: np.ndarray
    questions: list[list[S.Question]]

    @classmethod
    def render(cls, seeds) -> "SceneSet":
        scenes = [S.scene(seed) for seed in seeds]
        return cls(list(seeds), [s.things for s in scenes], np.stack([s.image for s in scenes]),
                   [S.questions(s) for s in scenes])

    def held_out(self, i: int, q: S.Question) -> bool:
        return S.about_held_out(q, S.Scene(self.seeds[i], self.things[i], self.images[i]))


def check_vision(vision: VisionConfig):
    if vision.channels != 3 or vision.image_size != S.SIZE or vision.tokens_per_image != S.GRID ** 2 \
            or vision.grid // vision.shuffle != S.GRID:
        raise SceneTaskError(f"the scenes task needs one image token per cell: channels 3, image_size {S.SIZE} and a "
                         f"{S.GRID}x{S.GRID} token grid (e.g. patch_size {S.SIZE // S.GRID}, shuffle 1); got {vision}")


def cell_labels(things: list[list[S.Thing]]) -> torch.Tensor:
    """(N, cells, heads) targets in HEADS' order; shape and size are -100 (not scored) in empty cells."""
    cells = S.GRID ** 2
    out = torch.full((len(things), cells, len(HEADS)), -100, dtype=torch.long)
    out[:, :, 0] = 0
    out[:, :, 3], out[:, :, 4] = torch.arange(cells) // S.GRID, torch.arange(cells) % S.GRID
    for n, objects in enumerate(things):
        for t in objects:
            out[n, t.row * S.GRID + t.col, :3] = torch.tensor(
                [1 + COLOURS.index(t.colour), S.SHAPES.index(t.shape), S.SIZES.index(t.size)])
    return out


def train_cell_encoder(vlm: VisionLM, images: np.ndarray, labels: torch.Tensor, *, steps: int, cpu_minutes: float = 0.0,
                       batch_size: int = 64, lr: float = 2e-3, seed: int = 0, log=print) -> nn.ModuleDict:
    """Stage 0: the encoder and one linear head per cell attribute on each image token."""
    width = vlm.vision_cfg.width * vlm.vision_cfg.shuffle ** 2
    heads = nn.ModuleDict({name: nn.Linear(width, n) for name, n in HEADS.items()})
    params = [*vlm.encoder.parameters(), *heads.parameters()]
    g = torch.Generator().manual_seed(seed)

    def loss_at(step):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        tokens = vlm.features(prepare_images(images[idx.numpy()], vlm.vision_cfg))
        want = labels[idx]
        return sum(F.cross_entropy(head(tokens).flatten(0, 1), want[..., k].flatten())
                   for k, head in enumerate(heads.values()))

    vlm.encoder.train()
    _run(params, Schedule(steps, cpu_minutes), lr, 0.05, loss_at, log, "stage 0", 100)
    vlm.encoder.eval()
    return heads


@torch.no_grad()
def scene_features(vlm: VisionLM, images: np.ndarray, chunk: int = 500) -> torch.Tensor:
    """The frozen encoder's token features of uint8 scenes, converted a chunk at a time (10,000 scenes
    as floats at once would hold 0.5 GB more)."""
    return torch.cat([encoder_features(vlm, prepare_images(images[i:i + chunk], vlm.vision_cfg))
                      for i in range(0, len(images), chunk)])


@torch.no_grad()
def decode_scenes(heads: nn.ModuleDict, features: torch.Tensor) -> list[list[S.Thing]]:
    """The objects the stage-0 heads read off each scene's (cells, width) token features."""
    picks = {name: head(features).argmax(-1) for name, head in heads.items()}
    out = []
    for n in range(len(features)):
        out.append([S.Thing(COLOURS[c - 1], S.SHAPES[int(picks["shape"][n, i])], S.SIZES[int(picks["size"][n, i])],
                            i // S.GRID, i % S.GRID)
                    for i, c in enumerate(picks["colour"][n].tolist()) if c])
    return out


def score(data: SceneSet, replies: list[list[str | None]]) -> dict:
    """Accuracy per kind, overall, and on the questions answered off the held-out pair ("held_out")
    and the rest ("not_held_out"), with each group's question count. replies[i][j] answers
    data.questions[i][j]; a reply is right when its first word is the answer (case and a full stop aside)."""
    right, total = defaultdict(int), defaultdict(int)
    for i, (qs, rs) in enumerate(zip(data.questions, replies)):
        for q, r in zip(qs, rs):
            ok = r is not None and (r.strip().lower().rstrip(".").split() or [""])[0] == q.answer
            for group in (q.kind, "all", "held_out" if data.held_out(i, q) else "not_held_out"):
                right[group] += ok
                total[group] += 1
    return {g: {"accuracy": right[g] / total[g], "questions": total[g]} for g in total}


def probe_figures(heads: nn.ModuleDict, features: torch.Tensor, data: SceneSet) -> dict:
    """The linear probe: each question answered from the scene the heads decode, and the share of
    scenes decoded exactly."""
    decoded = decode_scenes(heads, features)
    figures = score(data, [[S.answer(q.text, d) for q in qs] for d, qs in zip(decoded, data.questions)])
    figures["scenes_exact"] = sum(sorted(d, key=str) == sorted(t, key=str)
                                  for d, t in zip(decoded, data.things)) / len(decoded)
    return figures


def caption(things: list[S.Thing]) -> str:
    """Stage 1's caption: the objects in grid order (the order their tokens come in)."""
    return ", ".join(f"{t.size} {t.name}" for t in sorted(things, key=lambda t: (t.row, t.col))) + "."


class QuestionRows:
    """Chat rows of several (user text, reply) pairs per scene; batch(scenes) takes a random pair of
    each scene: its prompt with the image holes, the reply and the end-of-turn token, scored on the
    reply only. Texts repeat a lot, so each is tokenized once."""

    def __init__(self, tokenizer: Tokenizer, pairs: list[list[tuple[str, str]]], tokens_per_image: int, seed: int = 0):
        cache: dict = {}

        def encode(user, reply):
            if user not in cache:
                cache[user] = encode_prompt(tokenizer, [{"role": "user", "content": user}], tokens_per_image)
            return cache[user], tokenizer.encode(reply, special=False) + [tokenizer.eos_id]

        self.pairs = [[encode(u, r) for u, r in scene] for scene in pairs]
        self.rng = np.random.default_rng(seed)

    def batch(self, scenes) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.pairs[s][self.rng.integers(len(self.pairs[s]))] for s in scenes]
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        targets = torch.full((len(rows), width), -100, dtype=torch.long)
        for row, (p, a) in enumerate(rows):
            ids[row, :len(p) + len(a)] = torch.tensor(p + a)
            targets[row, len(p) - 1:len(p) - 1 + len(a)] = torch.tensor(a)  # position t predicts token t+1
        return ids, targets


def question_text(q: S.Question) -> str:
    return f"{IMAGE_PLACEHOLDER}\n{q.text}"


def training_pairs(data: SceneSet, draws: int) -> list[list[tuple[str, str]]]:
    """`draws` question sets per training scene (scenes.questions with other seeds than the scene's)."""
    return [[(question_text(q), q.answer) for k in range(draws)
             for q in S.questions(S.Scene(seed, things, None), seed=(k + 1) << 40 | seed)]
            for seed, things in zip(data.seeds, data.things)]


def chat_replies(vlm: VisionLM, tokenizer: Tokenizer, features: torch.Tensor, data: SceneSet, *,
                 max_tokens: int = 3, max_batch: int = 32, chunk: int = 64) -> list[list[str]]:
    """Greedy replies through the Engine to every question of every scene, the image as input_embeds
    (from the encoder's precomputed features: the same numbers vlm.embeds gives)."""
    engine = Engine(vlm.lm, tokenizer, max_batch=max_batch)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    prompts: dict = {}
    out = []
    with torch.no_grad():
        for start in range(0, len(features), chunk):
            embeds = vlm.projector(features[start:start + chunk])
            reqs = []
            for e, qs in zip(embeds, data.questions[start:start + chunk]):
                for q in qs:
                    text = question_text(q)
                    if text not in prompts:
                        prompts[text] = encode_prompt(tokenizer, [{"role": "user", "content": text}], vlm.tokens_per_image)
                    reqs.append(engine.submit(prompts[text], params, input_embeds=e))
            while engine.step():
                pass
            it = iter(r.text for r in reqs)
            out += [[next(it) for _ in qs] for qs in data.questions[start:start + chunk]]
    return out


def run_scenes(out, vision: VisionConfig, recipe, log=print) -> dict:
    """Every stage on the scenes, the model saved to `out`, then the figures (the recipe's result dict)."""
    check_vision(vision)
    c0, t0 = time.process_time(), time.perf_counter()
    timings: dict[str, dict] = {}

    def mark(name):
        timings[name] = {"cpu_s": round(time.process_time() - c0, 1), "wall_s": round(time.perf_counter() - t0, 1)}

    val_start = S.TRAIN_SEEDS.stop - recipe.val_limit
    if recipe.scenes > val_start:
        raise SceneTaskError(f"recipe.scenes {recipe.scenes}: training seeds would reach the validation seeds from {val_start}")
    data = {"train": SceneSet.render(range(recipe.scenes)),
            "val": SceneSet.render(range(val_start, S.TRAIN_SEEDS.stop)),
            "test": SceneSet.render(range(S.TEST_SEEDS.start, S.TEST_SEEDS.start + recipe.test_scenes))}
    mark("data")
    pairs = training_pairs(data["train"], recipe.question_draws)
    captions = [caption(t) for t in data["train"].things]
    texts = [u for scene in pairs for u, _ in scene] + [a for scene in pairs for _, a in scene] + captions
    lm, tok = tiny_text_model(texts[::7] + [CAPTION_PROMPT] * 20, recipe.seed, n_embd=recipe.lm_width,
                              n_layer=recipe.lm_layers, n_head=max(1, recipe.lm_width // 32), vocab_size=recipe.vocab_size)
    vlm = VisionLM(lm, vision)
    log(f"vision encoder {sum(p.numel() for p in vlm.encoder.parameters()):,} params, projector "
        f"{sum(p.numel() for p in vlm.projector.parameters()):,}, LM {sum(p.numel() for p in lm.parameters()):,}; "
        f"scenes {recipe.scenes} train, {recipe.val_limit} val, {recipe.test_scenes} test")

    heads = train_cell_encoder(vlm, data["train"].images, cell_labels(data["train"].things), steps=recipe.stage0_steps,
                               cpu_minutes=recipe.stage0_cpu_minutes, batch_size=recipe.stage0_batch,
                               lr=recipe.stage0_lr, seed=recipe.seed, log=log)
    mark("stage0")
    feats = {k: scene_features(vlm, d.images) for k, d in data.items()}
    result: dict = {"probe": {k: probe_figures(heads, feats[k], data[k]) for k in ("val", "test")}}
    for k, f in result["probe"].items():
        log(f"stage 0 linear probe {k}: " + ", ".join(f"{g} {f[g]['accuracy']:.4f}" for g in (*KINDS, "held_out") if g in f)
            + f", scenes decoded exactly {f['scenes_exact']:.4f}")
    mark("probe")
    scene_ids = torch.arange(recipe.scenes)
    for stage, steps, budget, rows in (
            ("stage 1", recipe.stage1_steps, recipe.stage1_cpu_minutes, [[(CAPTION_PROMPT, c)] for c in captions]),
            ("stage 2", recipe.stage2_steps, recipe.stage2_cpu_minutes, pairs)):
        task = (QuestionRows(tok, rows, vlm.tokens_per_image, recipe.seed), feats["train"], scene_ids)
        losses = train_chat(vlm, [task], steps=steps, cpu_minutes=budget, train_lm=True, batch_size=recipe.chat_batch,
                            lr=recipe.chat_lr, seed=recipe.seed + int(stage[-1]), stage=stage, log=log)
        key = stage.replace(" ", "")
        result[f"{key}_steps"], result[f"{key}_loss"] = len(losses), losses[-1]
        mark(key)
    result["train_cpu_minutes"] = round(timings["stage2"]["cpu_s"] / 60, 2)  # rendering and the probe included
    vlm.eval().save(out, tok)  # before the evaluation: a killed evaluation keeps the trained model
    max_tokens = max(len(tok.encode(q.answer)) for qs in data["test"].questions for q in qs) + 1
    result["chat"] = {}
    for k in ("val", "test"):
        replies = chat_replies(vlm, tok, feats[k], data[k], max_tokens=max_tokens)
        result["chat"][k] = score(data[k], replies)
        if k == "test":
            result["sample_replies"] = [[q.text, q.answer, r] for q, r in zip(data[k].questions[0], replies[0])]
        mark(f"eval_{k}")
    result["timings"] = timings
    return result


def report(result: dict) -> str:
    groups = (*KINDS, "all", "held_out", "not_held_out")
    lines = [f"{'scenes':12s} {'probe val':>9s} {'probe test':>10s} {'chat val':>9s} {'chat test':>10s}  test questions"]
    def cell(figures, group, width):  # (validation scenes never hold the held-out pair)
        return f"{figures[group]['accuracy']:{width}.4f}" if group in figures else f"{'-':>{width}s}"

    p, c = result["probe"], result["chat"]
    for g in groups:
        lines.append(f"{g:12s} {cell(p['val'], g, 9)} {cell(p['test'], g, 10)} {cell(c['val'], g, 9)} "
                     f"{cell(c['test'], g, 10)}  {c['test'].get(g, {}).get('questions', 0)}")
    test = c["test"]
    gap = test["not_held_out"]["accuracy"] - test["held_out"]["accuracy"] if "held_out" in test else float("nan")
    t = result["timings"]
    lines.append(f"held-out gap (test, chat): {gap * 100:+.1f} points; scenes decoded exactly by the probe: "
                 f"val {result['probe']['val']['scenes_exact']:.4f}, test {result['probe']['test']['scenes_exact']:.4f}")
    lines.append(f"training: {result['train_cpu_minutes']} CPU-minutes (rendering {t['data']['cpu_s']:.0f} s, stage 0 "
                 f"{t['stage0']['cpu_s'] - t['data']['cpu_s']:.0f} s, stages 1-2 {t['stage2']['cpu_s'] - t['probe']['cpu_s']:.0f} s); "
                 f"steps {result['stage1_steps']} + {result['stage2_steps']} after stage 0")
    return "\n".join(lines)
