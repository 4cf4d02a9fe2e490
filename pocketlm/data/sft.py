"""Supervised fine-tuning data: read a file, tell its format, turn every row into a conversation,
and tokenize it through the model's chat template with a loss on the assistant's tokens only.

Formats (detected from the first row's fields; every row is checked and errors name the line):
    chat                {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    prompt/completion   {"prompt", "completion"}; also Alpaca's {"instruction", "input", "output"}
                        and {"instruction", "response"}
    classification      {"text", "label"} (text may be called "sentence" or "content")
    qa                  {"context", "question", "answers"}; answers [] means unanswerable.
                        A SQuAD v2 .json file (data/paragraphs/qas) is read as this format too.
Files: .jsonl, .json (a list of rows, or SQuAD), .csv, .tsv (header row; TSV is unquoted).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pocketlm.data.jsonl import iter_jsonl
from pocketlm.errors import PocketLMError

FORMATS = ("chat", "prompt_completion", "classification", "qa")
ROLES = ("system", "user", "assistant")
TEXT_FIELDS = ("text", "sentence", "content")
FIELDS = {"chat": "messages", "prompt_completion": "prompt+completion, or instruction(+input)+output/response",
          "classification": "text+label", "qa": "context+question+answers"}


class SFTDataError(PocketLMError):
    pass


@dataclass
class TaskSpec:
    """How rows become conversations; saved beside a fine-tuned model so eval renders prompts the same way."""
    format: str = "chat"
    system: str | None = None          # system message (None: the template's default, if any)
    instruction: str | None = None     # classification / QA: put before the text (None: a default below)
    labels: dict[str, str] = field(default_factory=dict)  # classification: raw label -> the word the model says
    no_answer: str = "unanswerable"    # QA: the reply to a question the context does not answer

    def label_names(self) -> list[str]:
        return list(self.labels.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    @classmethod
    def from_file(cls, path) -> "TaskSpec":
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise SFTDataError(f"{path}: not a valid task file ({e})") from None


@dataclass
class Example:
    where: str                   # "file:line" for error messages
    messages: list[dict]         # the conversation; the last message is the assistant's reply
    label: str | None = None     # classification: raw label
    answers: list[str] | None = None  # QA: gold answers, [] when unanswerable


# ---- reading rows -------------------------------------------------------------------------------

def _squad_rows(data: dict, where: str):
    for a, article in enumerate(data.get("data", [])):
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                answers = [] if qa.get("is_impossible") else [x["text"] for x in qa.get("answers", [])]
                yield f"{where}: article {a} question {qa.get('id')}", {
                    "context": paragraph["context"], "question": qa["question"], "answers": answers,
                    "title": article.get("title"), "id": qa.get("id")}


def read_rows(path):
    """(where, dict) for each row of a .jsonl/.json/.csv/.tsv file."""
    path = Path(path)
    if not path.is_file():
        raise SFTDataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for n, row in iter_jsonl(path, SFTDataError):
            yield f"{path}:{n}", row
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SFTDataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if isinstance(data, dict) and "data" in data:
            yield from _squad_rows(data, str(path))
            return
        if not isinstance(data, list):
            raise SFTDataError(f"{path}: expected a JSON list of rows (or a SQuAD file), got {type(data).__name__}")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise SFTDataError(f"{path}: record {i}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}: record {i}", row
    elif suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as fh:  # newline="" also handles CRLF files
            if suffix == ".tsv":
                reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            else:
                reader = csv.reader(fh)
            header = next(reader, None)
            if not header:
                raise SFTDataError(f"{path}: empty file (expected a header row)")
            header = [h.strip() for h in header]
            start = reader.line_num + 1
            for values in reader:
                if values:
                    if len(values) != len(header):
                        raise SFTDataError(f"{path}:{start}: {len(values)} columns, the header has {len(header)} ({', '.join(header)})")
                    yield f"{path}:{start}", dict(zip(header, values))
                start = reader.line_num + 1
    else:
        raise SFTDataError(f"{path}: unsupported file type {suffix!r} (expected .jsonl, .json, .csv or .tsv)")


def detect_format(row: dict, where: str) -> str:
    keys = set(row)
    if "messages" in keys:
        return "chat"
    if {"prompt", "completion"} <= keys or ({"instruction"} <= keys and keys & {"output", "response"}):
        return "prompt_completion"
    if {"context", "question", "answers"} <= keys:
        return "qa"
    if "label" in keys and keys & set(TEXT_FIELDS):
        return "classification"
    raise SFTDataError(f"{where}: cannot tell the data format from fields {sorted(keys)}; expected messages (chat), "
                       "prompt+completion (or instruction+output), text+label (classification), or "
                       "context+question+answers (QA)")


def detect_file_format(path) -> str:
    for where, row in read_rows(path):
        return detect_format(row, where)
    raise SFTDataError(f"{path}: no rows")


def _text(row, key, where, allow_empty=False) -> str:
    v = row.get(key)
    if not isinstance(v, str) or (not allow_empty and not v.strip()):
        raise SFTDataError(f"{where}: field {key!r}: expected a {'string' if allow_empty else 'non-empty string'}, got {v!r}")
    return v


def _answers(row, where) -> list[str]:
    a = row["answers"]
    if isinstance(a, dict):  # HF datasets' SQuAD layout: {"text": [...], "answer_start": [...]}
        a = a.get("text")
    if isinstance(a, list):
        a = [x.get("text") if isinstance(x, dict) else x for x in a]
    if not isinstance(a, list) or not all(isinstance(x, str) and x.strip() for x in a):
        raise SFTDataError(f"{where}: field 'answers': expected a list of non-empty strings ([] when unanswerable), got {row['answers']!r}")
    missing = [x for x in a if x not in row["context"]]
    if missing:
        raise SFTDataError(f"{where}: answer {missing[0]!r} does not occur in the context (extractive QA answers are spans of it)")
    return a


def _user_assistant(spec: TaskSpec, user: str, reply: str) -> list[dict]:
    msgs = [{"role": "system", "content": spec.system}] if spec.system else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def default_classification_instruction(labels) -> str:
    """The instruction `finetune` trains classifiers under; `analyze` asks with it too, so their adapters fit."""
    return f"Classify the text. Answer with one of: {', '.join(labels)}."


def classification_prompt(spec: TaskSpec, text: str) -> str:
    instruction = spec.instruction or default_classification_instruction(spec.label_names())
    return f"{instruction}\n\n{text}"


def qa_prompt(spec: TaskSpec, context: str, question: str) -> str:
    instruction = spec.instruction or ("Answer the question with a short span copied from the context. If the "
                                       f"context does not contain the answer, reply \"{spec.no_answer}\".")
    return f"{instruction}\n\nContext: {context}\n\nQuestion: {question}"


def to_example(fmt: str, row: dict, where: str, spec: TaskSpec) -> Example:
    if fmt == "chat":
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise SFTDataError(f"{where}: field 'messages': expected a non-empty list, got {msgs!r}")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise SFTDataError(f"{where}: messages[{i}]: expected {{'role': one of {ROLES}, 'content': str}}, got {m!r}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise SFTDataError(f"{where}: no assistant message (the loss is on the assistant's replies)")
        return Example(where, [{"role": m["role"], "content": m["content"]} for m in msgs])
    if fmt == "prompt_completion":
        if "prompt" in row:
            prompt, reply = _text(row, "prompt", where), _text(row, "completion", where)
        else:
            prompt = _text(row, "instruction", where)
            extra = row.get("input") or ""
            if not isinstance(extra, str):
                raise SFTDataError(f"{where}: field 'input': expected a string, got {extra!r}")
            prompt = f"{prompt}\n\n{extra}" if extra.strip() else prompt
            reply = _text(row, "output" if "output" in row else "response", where)
        return Example(where, _user_assistant(spec, prompt, reply))
    if fmt == "classification":
        key = next((k for k in TEXT_FIELDS if k in row), None)
        text = _text(row, key, where) if key else _text(row, "text", where)
        label = row.get("label")
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(label, str) or not label.strip():
            raise SFTDataError(f"{where}: field 'label': expected a non-empty string or integer, got {row.get('label')!r}")
        label = label.strip()
        if spec.labels and label not in spec.labels:
            raise SFTDataError(f"{where}: label {label!r} is not one of the task's labels {sorted(spec.labels)}")
        return Example(where, _user_assistant(spec, classification_prompt(spec, text), spec.labels.get(label, label)), label=label)
    if fmt == "qa":
        context, question = _text(row, "context", where), _text(row, "question", where)
        answers = _answers(row, where)
        reply = answers[0] if answers else spec.no_answer
        return Example(where, _user_assistant(spec, qa_prompt(spec, context, question), reply), answers=answers)
    raise SFTDataError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def load_examples(path, spec: TaskSpec | None = None, limit: int | None = None,
                  skipped: list[str] | None = None) -> tuple[list[Example], TaskSpec]:
    """Read and check every row. Without a spec, the format is detected and, for classification,
    the label set is collected from the file (each label says itself). The first invalid row is an
    error, unless a `skipped` list is given: then invalid rows are left out and their errors appended."""
    rows = list(read_rows(path))
    if not rows:
        raise SFTDataError(f"{path}: no rows")
    fmt = detect_format(rows[0][1], rows[0][0])
    if spec is None:
        spec = TaskSpec(format=fmt)
    elif spec.format != fmt:
        raise SFTDataError(f"{rows[0][0]}: this file is {fmt} data, but the task is {spec.format}")
    for where, row in rows:  # every row must be of the same format
        try:
            same = detect_format(row, where) == fmt
        except SFTDataError:
            same = False
        if not same:
            raise SFTDataError(f"{where}: fields {sorted(row)} are not {fmt} data like the first row "
                               f"(expected {FIELDS[fmt]})")
    if fmt == "classification" and not spec.labels:
        seen = sorted({str(r["label"]).strip() for _, r in rows if str(r.get("label", "")).strip()})
        spec.labels = {x: x for x in seen}
    if limit:
        rows = rows[:limit]
    examples = []
    for where, row in rows:
        try:
            examples.append(to_example(fmt, row, where, spec))
        except SFTDataError as e:
            if skipped is None:
                raise
            skipped.append(str(e))
    if not examples:
        raise SFTDataError(f"{path}: no valid rows ({len(skipped or [])} invalid)")
    return examples, spec


def parse_labels(text: str | None) -> dict[str, str]:
    """'0=negative,1=positive' -> {'0': 'negative', '1': 'positive'}; 'neg,pos' -> each names itself."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        raw, _, name = part.partition("=")
        if not raw.strip():
            raise SFTDataError(f"--labels: empty entry in {text!r} (expected RAW=NAME,... or NAME,...)")
        out[raw.strip()] = (name or raw).strip()
    return out


# ---- tokenizing with the chat template ----------------------------------------------------------

def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant replies in it.

    A reply's span is what rendering the conversation up to and including it adds after the
    generation prompt (its text and the end-of-turn token), found by rendering prefixes, so it works
    for any template that renders a prefix of a conversation as a prefix of the text."""
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True) if k else ""
        upto = tokenizer.apply_chat_template(messages[:k + 1], add_generation_prompt=False)
        if not upto.startswith(before) or not full.startswith(upto):
            raise SFTDataError("the chat template does not render a conversation's prefix as a prefix of its text; "
                               "cannot tell which tokens are the assistant's")
        reply = upto[len(before):].rstrip()  # the newline after the end-of-turn token is not the reply
        spans.append((len(before), len(before) + len(reply)))
    return full, spans


def encode_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation and, per token, whether the assistant wrote it. Contents are
    text, markers and all, as the server reads them: a row cannot teach the model forged turns."""
    text, spans = assistant_spans(tokenizer, messages)
    rendered, ids, offsets = tokenizer.encode_chat_with_offsets(messages, add_generation_prompt=False)
    assert rendered == text  # the same template, rendered the same way
    scored = [any(s <= start < e for s, e in spans) for start, _ in offsets]
    return ids, scored


def encode_examples(tokenizer, examples: list[Example], max_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(ids, labels) per example, labels -100 where the loss does not look; cut to max_len tokens.
    Returns the encoded examples and how many were dropped because cutting left no reply token."""
    out, dropped = [], 0
    for ex in examples:
        ids, scored = encode_example(tokenizer, ex.messages)
        ids, scored = ids[:max_len], scored[:max_len]
        if not any(scored[1:]):
            dropped += 1
            continue
        out.append((ids, [t if s else -100 for t, s in zip(ids, scored)]))
    return out, dropped
