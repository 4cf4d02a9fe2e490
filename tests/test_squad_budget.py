"""benchmarks/squad.py's cut step budget (shared by benchmarks/grounded.py), and grounded.py's targets."""

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


def test_grounded_targets_are_not_met_by_a_model_that_never_answers():
    from grounded import targets

    silent = {"abstention_unanswerable": 100.0, "answers_supported": None}  # abstains on every question
    assert targets(silent, 9.6) == {"abstention_unanswerable>=80": True, "answers_supported==100": False,
                                    "f1_gap<=2": False}
    good = {"abstention_unanswerable": 85.0, "answers_supported": 100.0}
    assert all(targets(good, 1.5).values())
    assert not targets(good, None)["f1_gap<=2"]  # no peer run: no comparison, not a pass
    assert not targets({**good, "answers_supported": 97.0}, 1.5)["answers_supported==100"]
