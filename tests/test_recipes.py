"""The scale-out recipes: each config loads, builds the model it names (~124M parameters) and keeps one
global batch at every world size."""

import pytest
import torch

from pocketlm.config import load_config
from pocketlm.model.gpt import GPT

RECIPES = ["configs/gpt2-124m.yaml", "configs/llama-124m.yaml"]


@pytest.mark.parametrize("path", RECIPES)
def test_recipe_builds_a_124m_model(path):
    cfg = load_config(path)
    model_cfg = cfg.model.__class__(**{**vars(cfg.model), "vocab_size": 50304})
    with torch.device("meta"):  # shapes only: no 500 MB of weights in the test
        model = GPT(model_cfg)
    params = sum(p.numel() for p in model.parameters())
    assert 118e6 < params < 130e6, params


@pytest.mark.parametrize("path", RECIPES)
@pytest.mark.parametrize("world", [1, 2, 8, 16, 64])
def test_recipe_global_batch_is_the_same_at_every_world_size(path, world):
    train = load_config(path).train.for_world(world)
    assert train.batch_size <= 32
    assert train.batch_size * train.grad_accum * world == 512


def test_slurm_example_resumes_and_restarts():
    script = open("configs/slurm-gpt2-124m.sh").read()
    for part in ("--max-restarts", "--rdzv-backend c10d", "--resume", "configs/gpt2-124m.yaml"):
        assert part in script
