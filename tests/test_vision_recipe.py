"""The VLM recipe through its command line: a few steps of every stage on MNIST save a folder that
`pocketlm generate --model` reads and that answers through the chat path; a bad config names the key.
The real run (`make vlm`, configs/vlm.yaml) is the accuracy figure; this only proves the plumbing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pocketlm.config import ConfigError
from pocketlm.data import images as image_data
from pocketlm.model.vision import load_vision_model
from pocketlm.train.vlm import TASKS
from pocketlm.train.vlm_recipe import Recipe, load_recipe, main

ROOT = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(not (image_data.data_root() / "mnist_test").is_dir(), reason="shared data not here")


def test_the_shipped_config_parses():
    vision, recipe = load_recipe(ROOT / "configs" / "vlm.yaml")
    assert vision.stem == "conv" and vision.tokens_per_image == 16
    assert set(recipe.set_names) <= set(TASKS) and recipe.stage0_cpu_minutes + recipe.stage1_cpu_minutes \
        + recipe.stage2_cpu_minutes <= 30  # the issue's budget for every stage together


def test_bad_configs_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe keys.*stage9_steps"):
        Recipe.from_dict({"stage9_steps": 3})
    with pytest.raises(ConfigError, match="recipe.stage0_steps: expected int"):
        Recipe.from_dict({"stage0_steps": "many"})
    with pytest.raises(ConfigError, match="unknown image set 'cifar'"):
        Recipe.from_dict({"sets": "mnist,cifar"})
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"vision": {"stem": "resnet"}}))
    with pytest.raises(ConfigError, match="vision.stem"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="--recipe.KEY=VALUE"):
        load_recipe(None, {"steps": "3"})


@needs_data
def test_a_few_steps_of_the_recipe_make_a_model_the_cli_reads(tmp_path, capsys):
    out = tmp_path / "vlm"
    main(["--config", str(ROOT / "configs" / "vlm.yaml"), "--out", str(out), "--recipe.sets=mnist",
          "--recipe.stage0_steps=6", "--recipe.stage1_steps=4", "--recipe.stage2_steps=4", "--recipe.eval_limit=8",
          "--recipe.val_limit=8", "--recipe.feature_limit=64", "--recipe.threads=1", "--vision.width=32", "--vision.heads=2"])
    printed = capsys.readouterr().out
    assert "mnist" in printed and "CPU-minutes" in printed
    result = json.loads((out / "results.json").read_text())
    figures = result["sets"]["mnist"]
    assert figures["test_images"] == 8 and 0 <= figures["chat_test"] <= 1 and result["stage2_steps"] == 4
    model, _ = load_vision_model(out)
    assert model.vision_cfg.width == 32
    png = tmp_path / "digit.png"
    from PIL import Image

    Image.fromarray(image_data.load_mnist_test()[0][0]).save(png)
    done = subprocess.run([sys.executable, "-m", "pocketlm.cli", "generate", "--model", str(out), "--image", str(png),
                           "--prompt", "What digit is this?", "--max-new-tokens", "3", "--temperature", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
