"""The grounded-answer recipe's data and its score, from SQuAD v2 (../shared/data/squad_v2).

Training rows (`squad_grounded(..., passages="gold")`): the question's own paragraph and the k-1
other paragraphs of its article that BM25 ranks highest for the question, in a seeded random order;
the reply is the first gold answer and the gold paragraph's number ("Warsaw [2]"), or ABSTAIN for
an unanswerable question. SQuAD's unanswerable questions were written against that very paragraph
(plausible but absent answers), so abstaining has to be learned from close distractors, not from
off-topic text. Evaluation rows (`passages="retrieved"`) are what grounded mode does at inference:
the article's top-k paragraphs by BM25, gold paragraph or not.

Rows are chat conversations (`messages`), so `pocketlm finetune` reads them like any chat data; the
extra fields (answers, passages, gold) are for `score`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pocketlm.eval.metrics import normalize_answer, token_f1
from pocketlm.safety.grounded import (ABSTAIN, TOP_K, GroundingError, Index, Passage, answer_text, block, cited,
                                      is_abstention)


def _articles(squad) -> list[dict]:
    try:
        data = json.loads(Path(squad).read_text(encoding="utf-8"))["data"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise GroundingError(f"{squad}: not a SQuAD v2 JSON file ({e})") from None
    return data


def squad_grounded(squad, articles=None, k: int = TOP_K, passages: str = "gold", seed: int = 0,
                   keep=lambda i: True) -> list[dict]:
    """Grounded chat rows for the questions of `articles` (indices; default all) whose running
    number i across them passes keep(i). passages: "gold" (training) or "retrieved" (inference)."""
    if passages not in ("gold", "retrieved"):
        raise GroundingError(f"passages: expected 'gold' or 'retrieved', got {passages!r}")
    data, rng, rows, i = _articles(squad), random.Random(seed), [], 0
    for a in (range(len(data)) if articles is None else articles):
        paras = [Passage(p["context"], f"{data[a]['title']}/{j}") for j, p in enumerate(data[a]["paragraphs"])]
        index = Index(paras)
        for j, p in enumerate(data[a]["paragraphs"]):
            for q in p["qas"]:
                i += 1
                if not keep(i - 1):
                    continue
                found = index.search(q["question"], k if passages == "retrieved" else k + 1)
                if passages == "gold":
                    found = [paras[j]] + [x for x in found if x is not paras[j]][:k - 1]
                    rng.shuffle(found)
                answers = [] if q.get("is_impossible") else [x["text"] for x in q["answers"]]
                gold = next((n for n, x in enumerate(found, 1) if x is paras[j]), None)
                if answers and gold is not None:
                    reply = f"{answers[0]} [{gold}]"
                else:  # unanswerable, or (retrieved) the paragraph holding the answer was not found
                    reply = ABSTAIN
                rows.append({"messages": [{"role": "system", "content": block(found)},
                                          {"role": "user", "content": q["question"]},
                                          {"role": "assistant", "content": reply}],
                             "answers": answers, "gold_passage": gold, "passages": [x.text for x in found],
                             "id": q.get("id")})
    return rows


def write_jsonl(rows: list[dict], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _supported(answer: str, passages: list[str], numbers: list[int]) -> bool:
    """Some cited passage contains the answer (SQuAD-normalized)."""
    a = normalize_answer(answer)
    return bool(a) and any(1 <= n <= len(passages) and a in normalize_answer(passages[n - 1]) for n in numbers)


def score(rows: list[dict], replies: list[str]) -> dict:
    """The grounded figures, in percent:
      abstention_unanswerable: unanswerable questions answered with the abstention phrase;
      answerable f1 / exact-free: token F1 of the answer (citations removed; an abstention scores 0);
      answers_cited / answers_supported: of the replies that answer, those citing a passage, and
      those citing a passage that contains the answer;
      retrieval_recall: answerable questions whose paragraph was among the passages."""
    has = [(r, y) for r, y in zip(rows, replies) if r["answers"]]
    no = [(r, y) for r, y in zip(rows, replies) if not r["answers"]]
    answered = [(r, y) for r, y in zip(rows, replies) if not is_abstention(y)]
    pct = lambda n, d: round(100 * n / d, 1) if d else None  # noqa: E731
    f1 = [0.0 if is_abstention(y) else max(token_f1(answer_text(y), g) for g in r["answers"]) for r, y in has]
    return {
        "n": len(rows), "answerable": len(has), "unanswerable": len(no),
        "abstention_unanswerable": pct(sum(is_abstention(y) for _, y in no), len(no)),
        "abstention_answerable": pct(sum(is_abstention(y) for _, y in has), len(has)),
        "answerable_f1": pct(sum(f1), len(has)),
        "answers": len(answered),
        "answers_cited": pct(sum(bool(cited(y)) for _, y in answered), len(answered)),
        "answers_supported": pct(sum(_supported(answer_text(y), r["passages"], cited(y)) for r, y in answered),
                                 len(answered)),
        "retrieval_recall": pct(sum(r["gold_passage"] is not None for r, _ in has), len(has)),
    }


def read_jsonl(path) -> list[dict]:
    from pocketlm.data.jsonl import iter_jsonl

    return [row for _, row in iter_jsonl(Path(path), GroundingError)]


def eval_grounded(model_source, rows, adapter=None, limit: int | None = None, batch_size: int = 8,
                  dtype: str = "bf16", max_new_tokens: int = 32, keep_examples: int = 10) -> dict:
    """Greedy replies of a model (and adapter) to grounded rows (a list, or a .jsonl of them), scored."""
    from tqdm import tqdm

    from pocketlm.eval.tasks import autocast, greedy_generate, native_dtype, prompt_ids
    from pocketlm.model.lora import load_model_with_adapter

    rows = (rows if isinstance(rows, list) else read_jsonl(rows))[:limit]
    dtype = native_dtype(dtype)
    model, tokenizer = load_model_with_adapter(model_source, adapter)
    model.eval()
    prompts = [prompt_ids(tokenizer, r["messages"]) for r in rows]
    with autocast(dtype), tqdm(total=len(prompts), desc="eval grounded", unit="ex") as bar:
        out = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, bar, dtype)
    replies = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in out]
    return {**score(rows, replies), "model": str(model_source), "adapter": str(adapter) if adapter else None,
            "examples": [{"question": r["messages"][-2]["content"], "gold": r["answers"], "reply": y}
                         for r, y in list(zip(rows, replies))[:keep_examples]]}
