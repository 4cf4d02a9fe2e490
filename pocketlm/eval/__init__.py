"""Evaluation: `evaluate(model, task, data, ...)` returns the figures `pocketlm eval` prints as JSON."""

from pocketlm.eval.tasks import TASKS, evaluate

__all__ = ["TASKS", "evaluate"]
