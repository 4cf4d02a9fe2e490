"""Argument groups that more than one verb group shares."""

from __future__ import annotations


def add_task_args(sp):
    """How rows become prompts (saved in task.json by finetune; eval reads it back)."""
    sp.add_argument("--labels", help="classification: RAW=WORD pairs, e.g. 0=negative,1=positive (default: labels as written)")
    sp.add_argument("--instruction", help="classification/QA: instruction put before the text")
    sp.add_argument("--system", help="system message of every conversation")
    sp.add_argument("--no-answer", help="QA: the reply meaning the context has no answer (default: unanswerable)")
