"""benchmarks/squad.py's cut step budget (shared by benchmarks/grounded.py): the warmup shrinks with it."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from squad import budget_overrides  # noqa: E402


def test_a_cut_budget_scales_the_warmup_with_it():
    for name in ("finetune_squad.yaml", "finetune_grounded.yaml"):  # both: warmup 10 of 120 steps
        config = REPO / "configs" / name
        assert budget_overrides(config, 120)["train.warmup_steps"] == 10
        cut = budget_overrides(config, 10)
        assert cut["train.max_steps"] == 10 and cut["train.warmup_steps"] == 1
        assert budget_overrides(config, 60)["train.warmup_steps"] == 5
        assert budget_overrides(config, 2)["train.warmup_steps"] == 1  # never zero
