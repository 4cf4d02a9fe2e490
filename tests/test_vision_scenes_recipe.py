"""The scenes task of the VLM recipe: the per-cell stage-0 targets and their decoding, the scoring per
kind and on the held-out pair, the question rows, and a few steps of every stage through the recipe's
command line into a folder that `pocketlm chat --image` answers from. The accuracy figures come from
the real run (configs/vlm_scenes.yaml, BENCHMARKS.md); this proves the plumbing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pocketlm.data import scenes as S
from pocketlm.model.vision import load_vision_model
from pocketlm.train import vlm_scenes as V
from pocketlm.train.vlm import tiny_text_model
from pocketlm.train.vlm_recipe import load_recipe, main

ROOT = Path(__file__).resolve().parents[1]


def one_hot_heads(labels):
    """Features that spell each cell's labels one-hot, and linear heads that read them back."""
    sizes = list(V.HEADS.values())
    feats = torch.cat([nn.functional.one_hot(labels[..., k].clamp(min=0), n).float()
                       for k, n in enumerate(sizes)], -1)
    heads, start = nn.ModuleDict(), 0
    for name, n in V.HEADS.items():
        head = nn.Linear(feats.size(-1), n)
        with torch.no_grad():
            head.weight.zero_(), head.bias.zero_()
            head.weight[:, start:start + n] = torch.eye(n)
        heads[name], start = head, start + n
    return feats, heads


def test_the_cell_targets_decode_back_to_the_scene():
    data = V.SceneSet.render(range(30))
    labels = V.cell_labels(data.things)
    assert labels.shape == (30, S.GRID ** 2, len(V.HEADS))
    assert ((labels[..., 0] > 0).sum(1) == torch.tensor([len(t) for t in data.things])).all()
    assert (labels[..., 1][labels[..., 0] == 0] == -100).all()  # no shape is scored in an empty cell
    feats, heads = one_hot_heads(labels)
    for decoded, truth in zip(V.decode_scenes(heads, feats), data.things):
        assert sorted(decoded, key=str) == sorted(truth, key=str)
    figures = V.probe_figures(heads, feats, data)
    assert figures["all"]["accuracy"] == 1.0 and figures["scenes_exact"] == 1.0


def test_scores_per_kind_and_the_held_out_pair_apart():
    data = V.SceneSet.render(range(S.TEST_SEEDS.start, S.TEST_SEEDS.start + 300))
    right = [[q.answer + "." if q.kind != "relation" else "maybe" for q in qs] for qs in data.questions]
    figures = V.score(data, right)
    assert figures["attribute"]["accuracy"] == figures["count"]["accuracy"] == 1.0
    assert figures["relation"]["accuracy"] == 0.0
    held = figures["held_out"]["questions"]
    assert held > 10 and held + figures["not_held_out"]["questions"] == figures["all"]["questions"]
    assert V.score(data, [[None] * len(qs) for qs in data.questions])["all"]["accuracy"] == 0.0


def test_question_rows_score_the_reply_only_and_hold_one_image_each():
    data = V.SceneSet.render(range(20))
    pairs = V.training_pairs(data, draws=2)
    _, tok = tiny_text_model([u for p in pairs for u, _ in p] + [a for p in pairs for _, a in p], vocab_size=400)
    rows = V.QuestionRows(tok, pairs, S.GRID ** 2)
    ids, targets = rows.batch(list(range(20)))
    assert ((ids < 0).sum(1) == S.GRID ** 2).all()
    answers = {a for p in pairs for _, a in p}
    for row in range(20):
        scored = targets[row][targets[row] >= 0].tolist()
        assert scored[-1] == tok.eos_id and tok.decode(scored[:-1]) in answers


def test_the_shipped_scenes_config_fits_its_budget():
    vision, recipe = load_recipe(ROOT / "configs" / "vlm_scenes.yaml")
    V.check_vision(vision)
    assert recipe.set_names == ["scenes"]
    assert recipe.stage0_cpu_minutes + recipe.stage1_cpu_minutes + recipe.stage2_cpu_minutes <= 15
    with pytest.raises(V.SceneTaskError, match="one image token per cell"):
        V.check_vision(load_recipe(ROOT / "configs" / "vlm.yaml")[0])


def test_a_few_steps_of_the_scenes_recipe_make_a_model_chat_answers_from(tmp_path, capsys):
    out = tmp_path / "scenes"
    main(["--config", str(ROOT / "configs" / "vlm_scenes.yaml"), "--out", str(out), "--recipe.scenes=60",
          "--recipe.val_limit=10", "--recipe.test_scenes=10", "--recipe.stage0_steps=4", "--recipe.stage1_steps=3",
          "--recipe.stage2_steps=3", "--recipe.stage0_batch=8", "--recipe.chat_batch=8", "--recipe.threads=1",
          "--recipe.lm_layers=1", "--recipe.lm_width=32", "--recipe.vocab_size=400", "--vision.width=32", "--vision.heads=2"])
    printed = capsys.readouterr().out
    assert "held-out gap" in printed and "CPU-minutes" in printed
    result = json.loads((out / "results.json").read_text())
    assert result["stage2_steps"] == 3 and set(V.KINDS) <= set(result["chat"]["test"])
    assert 0 <= result["chat"]["test"]["all"]["accuracy"] <= 1 and result["probe"]["val"]["all"]["questions"] >= 10
    model, _ = load_vision_model(out)
    assert model.vision_cfg.channels == 3 and model.tokens_per_image == S.GRID ** 2
    from PIL import Image

    png = tmp_path / "scene.png"
    Image.fromarray(S.scene(S.TEST_SEEDS.start).image).save(png)
    done = subprocess.run([sys.executable, "-m", "pocketlm.cli", "chat", "--model", str(out), "--image", str(png),
                           "--max-new-tokens", "3", "--temperature", "0"], input="How many circles are there?\n/quit\n",
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0 and "bot> " in done.stdout, done.stderr
