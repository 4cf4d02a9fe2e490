"""`analyze --summary`: the model writes one paragraph about the report's facts, and every number in
it is checked against report.json.

The paragraph comes back under a JSON schema (one string field of bounded length, so the reply
parses and ends), from a prompt holding the report's facts as JSON. The model is never trusted
with arithmetic: each number it writes must be one of the facts, as written there or rounded (a share
0.2543 may appear as 0.25, 25% or 25.4 percent); any other number is listed in `unsupported_numbers`
and marked in the HTML. Nothing the model writes is executed."""

from __future__ import annotations

import json
import re

from pocketlm.infer.constrain import JsonSchema
from pocketlm.infer.sampling import SamplingParams

MAX_CHARS = 800  # the paragraph's length at most (less when the model's context is short)


def schema(max_chars: int) -> dict:
    return {"type": "object", "properties": {"summary": {"type": "string", "maxLength": max_chars}},
            "required": ["summary"], "additionalProperties": False}

INSTRUCTION = ("Below are the facts of a data-analysis report, as JSON. Write one paragraph for a busy reader "
               "about what they show: the largest groups, any trend, how reliable the labels are. Use only "
               "numbers that appear in the facts. Answer with JSON: {\"summary\": \"...\"}.")
# a number not glued to a word (an id such as order_2 is not one), with thousands commas, decimals, and a percent
NUMBER = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?(?:\s?%|\s?percent\b)?")


def prompt_facts(facts: dict) -> dict:
    """What the model reads: the report without its long tables (least-confident rows, full confusion)."""
    keep = {k: v for k, v in facts.items() if k not in ("least_confident", "summary")}
    if "metrics" in keep:
        keep["metrics"] = {k: v for k, v in keep["metrics"].items() if k in ("n", "accuracy", "macro_f1")}
    return keep


def fact_numbers(obj) -> list[float]:
    """Every number in the facts: the values, and the numbers written inside strings and keys (dates, ids)."""
    out: list[float] = []
    if isinstance(obj, bool) or obj is None:
        return out
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, str):
        return [_value(m.group())[0] for m in NUMBER.finditer(obj)]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += fact_numbers(str(k)) + fact_numbers(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out += fact_numbers(v)
    return out


def _value(text: str) -> tuple[float, int, bool]:
    """'1,234.5 %' -> (1234.5, decimals 1, a percentage True)."""
    percent = text.endswith(("%", "percent"))
    digits = text.replace("percent", "").rstrip("% ").replace(",", "")
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    return float(digits), decimals, percent


def unsupported_numbers(text: str, facts: dict) -> list[str]:
    """The numbers in `text` that are no fact rounded to the precision they are written with (a
    percentage: no fact x 100)."""
    known = fact_numbers(facts)
    bad = []
    for m in NUMBER.finditer(text):
        v, decimals, percent = _value(m.group())
        tol = 0.5 * 10 ** -decimals + 1e-9
        if not any(abs(v - f) <= tol or (percent and abs(v - 100 * f) <= tol) for f in known):
            bad.append(m.group())
    return bad


def write_summary(engine, facts: dict) -> dict:
    """{"text", "unsupported_numbers", "status"}: the model's paragraph and the numbers it made up."""
    tok = engine.tokenizer
    body = json.dumps(prompt_facts(facts), ensure_ascii=False, separators=(",", ":"))
    keep = engine.max_seq_len // 2  # the facts get half the context, the reply the rest
    while True:  # a report too big for that is cut short (the check below still sees all of it)
        ids = tok.encode_chat([{"role": "user", "content": f"{INSTRUCTION}\n\n{body}"}])
        if len(ids) <= keep or not body:
            break
        body = body[:len(body) * keep // len(ids) - 1]
    # room for two tokens a character (plain escapes); a reply that runs out anyway gets status "length"
    max_chars = min(MAX_CHARS, (engine.max_seq_len - len(ids) - 24) // 2)
    proc = JsonSchema(tok, schema(max_chars), engine.model.cfg.vocab_size)
    req = engine.generate(ids, SamplingParams(max_tokens=2 * max_chars + 16, temperature=0), processors=[proc])
    if req.finish_reason != "stop" or not proc.is_done():
        return {"text": None, "unsupported_numbers": [], "status": req.error or req.finish_reason or "error"}
    text = json.loads(req.text)["summary"]
    return {"text": text, "unsupported_numbers": unsupported_numbers(text, facts), "status": "ok"}
