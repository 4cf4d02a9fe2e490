"""Scores: classification (accuracy, macro-F1, confusion matrix) and SQuAD v2 exact match / token F1."""

from __future__ import annotations

import collections
import re
import string
from pocketlm.errors import InputError


def classification_report(gold: list[str], pred: list[str | None], labels: list[str]) -> dict:
    """Accuracy, per-label precision/recall/F1, macro-F1 over `labels`, and confusion[gold][pred].
    A prediction outside `labels` (None, or an unparseable generation) counts as wrong and is
    tallied in the confusion matrix under "other"."""
    if len(gold) != len(pred):
        raise InputError(f"{len(gold)} gold labels but {len(pred)} predictions")
    cols = labels + (["other"] if any(p not in labels for p in pred) else [])
    confusion = {g: {p: 0 for p in cols} for g in labels}
    for g, p in zip(gold, pred):
        confusion[g][p if p in labels else "other"] += 1
    per_label = {}
    for lab in labels:
        tp = confusion[lab][lab]
        predicted = sum(confusion[g][lab] for g in labels)
        actual = sum(confusion[lab].values())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[lab] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    correct = sum(g == p for g, p in zip(gold, pred))
    return {"n": len(gold), "accuracy": correct / max(len(gold), 1),
            "macro_f1": sum(v["f1"] for v in per_label.values()) / max(len(labels), 1),
            "per_label": per_label, "confusion": confusion}


# ---- SQuAD v2 -------------------------------------------------------------------------------------
# The official evaluation script's normalisation: lower case, drop punctuation and the articles
# a/an/the, collapse whitespace. An empty prediction means "no answer".

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:  # no-answer: right only when both are empty
        return float(p == g)
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def qa_report(golds: list[list[str]], preds: list[str]) -> dict:
    """golds[i] is the list of acceptable answers ([] for an unanswerable question); preds[i] is ""
    when the model said there is no answer. Scores are the best over the gold answers, in percent,
    overall and apart for answerable (has_ans) and unanswerable (no_ans) questions."""
    em, f1 = [], []
    for gold, pred in zip(golds, preds):
        gold = gold or [""]
        em.append(max(exact_match(pred, g) for g in gold))
        f1.append(max(token_f1(pred, g) for g in gold))

    def summary(idx):
        n = len(idx)
        return {"n": n, "exact": 100 * sum(em[i] for i in idx) / n if n else 0.0,
                "f1": 100 * sum(f1[i] for i in idx) / n if n else 0.0}

    has = [i for i, g in enumerate(golds) if g]
    no = [i for i, g in enumerate(golds) if not g]
    return {**summary(range(len(golds))), "has_ans": summary(has), "no_ans": summary(no)}
