"""`pocketlm analyze FILE`: label or extract fields over every row of a table, output that always parses.

    analyze("tickets.csv", text="message", labels=["refund", "cancel", "other"], model="smollm2.gguf",
            out="labelled.csv", gold="intent", report="report.html")

Each row becomes one chat request (instruction first, so every row shares that prefix; the row's
text last), constrained to one of the labels (`Choice`) or to a JSON schema (`JsonSchema`). Rows go
to the engine a batch at a time (rows of similar prompt lengths together: on a CPU a padded token
costs what a real one does), all of a batch submitted at once so they decode in one continuous
batch (the engine feeds the tokens a constraint forces as one extend); the shared start of the
prompts is computed once (Engine.cache_prefix), and the rows' own texts prefill together in one
forward. Each finished batch is appended to the journal, which is what `resume` continues from."""

from __future__ import annotations

import copy
import json
import string
import sys
import time
from collections import Counter
from pathlib import Path

from pocketlm.analyze.journal import Journal
from pocketlm.analyze.table import Table, TableError, cell, read_table, write_table
from pocketlm.data.sft import default_classification_instruction
from pocketlm.errors import InputError
from pocketlm.infer.engine import ContextLengthError, Engine
from pocketlm.infer.constrain import Choice, JsonSchema, check_labels, compile_schema, load_schema
from pocketlm.infer.sampling import SamplingParams

PREFIX_SAMPLE = 64  # rows whose common start is the shared prefix (a row that differs just prefills in full)
WINDOW = 16  # batches whose rows are sorted by prompt length together (see _batches)
MAX_CONTEXT = 2048  # positions a row may use at most (prompt and reply), the engine's default
SCHEMA_INSTRUCTION = "Extract these fields from the text and answer with JSON only, matching this schema: {schema}"


def analyze(path, *, model, text=None, prompt=None, labels=None, labels_from=None, schema=None, adapter=None,
            out=None, gold=None, limit=None, dry_run=False, resume=False, temperature=0.0, top_k=0, top_p=1.0,
            min_p=0.0, seed=None, max_tokens=None, system=None, instruction=None, batch_size=16, dtype="fp32",
            journal=None, report=None, group_by=None, date_column=None, threads=None, progress=True,
            reuse_prefix=True, summary=False) -> dict:
    """Label (labels / labels_from) or extract (schema) every row of `path`; returns a summary dict
    (and writes `out`, its journal, and the report when asked). See the module docstring."""
    table = read_table(path, limit)
    if (text is None) == (prompt is None):
        raise InputError("give exactly one of text (a column) or prompt (a template with {column} placeholders)")
    spec = _task_spec(adapter, model) if schema is None else None
    given = sum(x is not None for x in (labels, labels_from, schema))
    if given > 1 or (given == 0 and not (spec and spec.labels)):  # an adapter's task.json may name its labels
        raise InputError("give exactly one of labels, labels_from or schema (or an adapter whose task.json names its labels)")
    template = render_template(table, text, prompt)
    system = system if system is not None else (spec.system if spec else None)
    if schema is None:
        labels = _labels(table, labels, labels_from, spec)
        instruction = instruction or (spec.instruction if spec else None) or default_classification_instruction(labels)
        fields, schema_dict = ["label"], None
    else:
        schema_dict = load_schema(schema)
        compile_schema(schema_dict)  # refuse a bad schema before the model loads
        instruction = instruction or SCHEMA_INSTRUCTION.format(schema=json.dumps(schema_dict, separators=(",", ":")))
        # an object's properties become columns; any other schema's value is one column, "value"
        fields = list(schema_dict.get("properties", {})) if schema_dict.get("type") == "object" else []
    if summary and report is None:
        raise InputError("summary: the paragraph goes into the report; give report too")
    if gold is not None:
        if labels is None:
            raise InputError("gold: scores labels; it needs labels or labels_from, not a schema")
        table.check_columns([gold], "gold")
    for name, what in ((group_by, "group_by"), (date_column, "date_column")):
        if name is not None:
            table.check_columns([name], what)
    params = SamplingParams(max_tokens=max_tokens or (64 if labels else 256), temperature=temperature, top_k=top_k,
                            top_p=top_p, min_p=min_p, seed=seed)
    out = Path(out) if out else _default_out(table.path)
    journal_path = Path(journal) if journal else out.with_name(out.name + ".journal")

    weights, tok = _load(model, adapter, threads)

    def messages(row):
        user = f"{instruction}\n\n{template(row)}"
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]

    def encode(row):
        return tok.encode_chat(messages(row))  # contents as text: a row cannot forge a turn

    # the KV cache is batch_size slots of this many positions, all allocated up front: the longest
    # prompt and its reply, not the default 2048 (64 slots of SmolLM2 at 2048 would hold 6 GB). The
    # summary's prompt is longer than any row's: with one, the engine keeps the default.
    context = None if summary or not table.rows else \
        min(max(len(encode(r)) for r in table.rows) + params.max_tokens, MAX_CONTEXT)
    engine = Engine(weights, tok, max_batch=batch_size, precision=dtype, max_seq_len=context)

    if dry_run:
        return _dry_run(engine, table, messages, encode, params, labels, schema_dict)

    fingerprint = {"model": _identity(model), "adapter": _identity(adapter) if adapter else None,
                   "prompt": {"system": system, "instruction": instruction, "text": text, "template": prompt},
                   "schema": schema_dict if schema_dict is not None else {"labels": labels},
                   "sampling": {k: getattr(params, k) for k in ("max_tokens", "temperature", "top_k", "top_p",
                                                                 "min_p", "seed")},
                   "input": {"path": str(Path(path).resolve()), "rows": len(table.rows)},
                   "batching": {"batch_size": batch_size, "dtype": dtype, "reuse_prefix": reuse_prefix,
                                "sorted_window": WINDOW}}
    log = Journal(journal_path, fingerprint, resume)
    if reuse_prefix:  # the instruction every row starts with: computed once (the first rows decide it)
        head = [encode(r) for r in table.rows[:PREFIX_SAMPLE]]
        engine.cache_prefix(common_prefix(head)[:min(len(h) for h in head) - 1])
    grammar = compile_schema(schema_dict, tok, engine.model.cfg.vocab_size) if schema_dict is not None else None

    trie = Choice(tok, labels) if labels is not None else None  # the labels tokenized once, not once a row

    def constraint():
        if trie is not None:
            return copy.copy(trie)  # a fresh walk over the shared (never modified) trie
        return JsonSchema(tok, schema_dict, engine.model.cfg.vocab_size, grammar=grammar)

    t0, n_new = time.perf_counter(), 0
    bar = _progress(len(table.rows), len(log.done), progress)
    for idx, prompts in _batches(table, encode, batch_size, log.done):
        records = _run_batch(engine, idx, prompts, constraint, params, fields, labels is not None)
        log.append(records)
        n_new += len(idx)
        bar.update(len(idx))
    bar.close()
    seconds = time.perf_counter() - t0

    names = _output_names(table.columns, (fields or ["value"]) + (["confidence"] if labels else []) + ["status"])
    rows = []
    for i, row in enumerate(table.rows):
        rec = log.done[i]
        values = {**rec["fields"], **({"confidence": rec["confidence"]} if labels else {}), "status": rec["status"]}
        rows.append({**row, **{names[k]: v for k, v in values.items()}})
    columns = table.columns + [names[k] for k in values]
    write_table(out, columns, rows)

    result = {"input": str(table.path), "rows": len(rows), "out": str(out), "journal": str(journal_path),
              "columns": {k: names[k] for k in values}, "status": dict(Counter(r[names["status"]] for r in rows)),
              "new_rows": n_new, "seconds": round(seconds, 3),
              "shared_prefix_tokens": engine.prefixes.longest(),
              "prompt_tokens_reused": engine.reused_tokens,
              "rows_per_second": round(n_new / seconds, 3) if seconds > 0 and n_new else None}
    if gold is not None:
        from pocketlm.eval.metrics import classification_report

        words = spec.labels if spec else {}  # the adapter's raw gold values -> its label words ("0" -> "negative")
        golds = [words.get(g, g) for g in (cell(g).strip() for g in table.column(gold))]
        preds = [r[names["label"]] for r in rows]
        scored = labels + sorted(set(golds) - set(labels))  # a gold label the run did not offer still counts
        result["metrics"] = classification_report(golds, preds, scored)
    if report is not None:
        from pocketlm.analyze.report import build_report, write_report

        facts = build_report(rows, names, fields, labels, group_by=group_by, date_column=date_column,
                             metrics=result.get("metrics"), text_column=text)
        if summary:  # by the base model (a label adapter would only ever answer with a label)
            from pocketlm.analyze.summary import write_summary

            writer = engine if adapter is None else _engine(model, None, dtype, 1, threads)
            facts["summary"] = write_summary(writer, facts)
        result["report"] = write_report(facts, report)
    return result


# ---- the pieces ----------------------------------------------------------------------------------------
def common_prefix(seqs: list[list[int]]) -> list[int]:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for j in range(n):
        if any(s[j] != first[j] for s in seqs):
            return first[:j]
    return first[:n]


def render_template(table: Table, text: str | None, prompt: str | None):
    """row -> the row's text: one column, or a template whose {column} placeholders are filled in."""
    if text is not None:
        table.check_columns([text], "text")
        return lambda row: cell(row.get(text))
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None]
    except ValueError as e:
        raise InputError(f"prompt: {e} (write {{{{ and }}}} for literal braces)") from None
    if not names:
        raise InputError("prompt: no {column} placeholder; name at least one column, e.g. 'Ticket: {message}'")
    for name in names:
        if not name or name not in table.columns:
            raise TableError(f"prompt: placeholder {{{name}}} is not a column of {table.path}; its columns are: "
                             f"{', '.join(table.columns)}")
    return lambda row: prompt.format_map({n: cell(row.get(n)) for n in names})


def _labels(table: Table, labels, labels_from, spec) -> list[str]:
    """The label list; an adapter's task.json (spec) maps raw values to the words it was trained to
    say, and gives the list itself when none is asked for, as `pocketlm eval` reads it."""
    words = spec.labels if spec else {}
    if labels is None and labels_from is None:
        return check_labels(spec.label_names())
    if labels_from is not None:
        values = sorted({words.get(v, v) for v in (cell(v).strip() for v in table.column(labels_from, "labels_from"))}
                        - {""})
        if not values:
            raise InputError(f"labels_from: column {labels_from!r} of {table.path} has no values")
        return values
    if isinstance(labels, str):
        if labels.startswith("@"):
            f = Path(labels[1:])
            if not f.is_file():
                raise InputError(f"labels: {f}: no such file (expected one label a line)")
            labels = [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            labels = [s.strip() for s in labels.split(",")]
    return check_labels(list(labels))


def _task_spec(adapter, model):
    """How `finetune` wrote prompts for this adapter (task.json), so its instruction is reused."""
    from pocketlm.eval.tasks import find_task_spec

    spec = find_task_spec(adapter, model)
    return spec if spec is not None and spec.format == "classification" else None


def _identity(source) -> dict:
    """A model or adapter as the fingerprint sees it: where it is and how many bytes it holds."""
    p = Path(source)
    files = [p] if p.is_file() else sorted(f for f in p.glob("*") if f.is_file()) if p.is_dir() else []
    return {"path": str(p.resolve()), "bytes": sum(f.stat().st_size for f in files)}


def _default_out(path: Path) -> Path:
    suffix = path.suffix.lower() if path.suffix.lower() in (".csv", ".tsv", ".jsonl") else ".jsonl"
    return path.with_name(f"{path.stem}.labelled{suffix}")


def _output_names(columns: list[str], keys: list[str]) -> dict[str, str]:
    """Output column per result key; a name the input already has gets _pred appended."""
    names, taken = {}, set(columns)
    for k in keys:
        name = k
        while name in taken:
            name += "_pred"
        names[k] = name
        taken.add(name)
    return names


def _load(model, adapter, threads):
    """(weights, tokenizer): the model with its adapter merged in, if any."""
    import torch

    from pocketlm.model.lora import load_model_with_adapter

    if threads:
        torch.set_num_threads(threads)
    m, tok = load_model_with_adapter(model, adapter)
    if tok is None:
        raise InputError(f"{model}: has no tokenizer.json beside the weights")
    return m, tok


def _engine(model, adapter, dtype, batch_size, threads) -> Engine:
    return Engine(*_load(model, adapter, threads), max_batch=batch_size, precision=dtype)


def _batches(table, encode, batch_size, done):
    """(row indices, {row: prompt ids}) per batch not yet in the journal. Rows of similar prompt lengths
    go together: within a window of WINDOW batches the rows are sorted by length (then index) before
    they are dealt out, so a batch's rows prefill side by side with little padding. The windows and
    the sort depend on the table alone, so a resumed run deals the same batches."""
    n = len(table.rows)
    for w in range(0, n, batch_size * WINDOW):
        prompts = {i: encode(table.rows[i]) for i in range(w, min(w + batch_size * WINDOW, n))}
        order = sorted(prompts, key=lambda i: (len(prompts[i]), i))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if not all(i in done for i in idx):
                yield idx, {i: prompts[i] for i in idx}


def _run_batch(engine, idx, prompts, constraint, params, fields, is_labels) -> list[dict]:
    """Submit every row of the batch at once (they decode together), step until all are done."""
    reqs = []
    # submitted shortest first: neighbouring slots then hold prompts of similar lengths, which the engine
    # prefills together with little padding; the records still come out in input order
    for i in sorted(idx, key=lambda i: len(prompts[i])):
        proc = constraint()
        p = params if params.seed is None else SamplingParams(**{**params.__dict__, "seed": params.seed + i})
        try:
            reqs.append((i, proc, engine.submit(prompts[i], p, processors=[proc])))
        except ContextLengthError as e:  # this row's text is too long: the row says so, the run goes on
            reqs.append((i, proc, str(e)))
    while not all(isinstance(r, str) or r.finished for _, _, r in reqs):
        engine.step()
    return [_record(i, proc, req, fields, is_labels) for i, proc, req in sorted(reqs, key=lambda x: x[0])]


def _record(i, proc, req, fields, is_labels) -> dict:
    if isinstance(req, str):
        status = f"error: {req}"
    elif req.finish_reason == "stop" and proc.is_done():
        status = "ok"
    else:  # "length": the reply budget ran out first (a string the model never closed, say)
        status = f"error: {req.error}" if req.error else req.finish_reason or "error"
    if is_labels:
        ok = status == "ok"
        return {"row": i, "fields": {"label": proc.label if ok else None},
                "confidence": round(proc.confidence, 6) if ok else None, "status": status}
    value = json.loads(req.text) if status == "ok" else None  # valid by construction: never bad input
    if fields:
        values = {f: value.get(f) if value is not None else None for f in fields}
    else:
        values = {"value": value}
    return {"row": i, "fields": values, "status": status}


def _progress(total, done, enabled):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="row", desc="analyze", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def _dry_run(engine, table, messages, encode, params, labels, schema) -> dict:
    """Row 1's prompt, the token counts, and the time row 1 takes alone (an upper bound per row:
    batching shares each decode step among many rows)."""
    first = table.rows[0]
    ids = encode(first)
    lengths = [len(encode(r)) for r in table.rows]
    proc = Choice(engine.tokenizer, labels) if labels is not None else \
        JsonSchema(engine.tokenizer, schema, engine.model.cfg.vocab_size)
    t = time.perf_counter()
    req = engine.submit(ids, params, processors=[proc])
    while not req.finished:
        engine.step()
    row_seconds = time.perf_counter() - t
    rendered = engine.tokenizer.apply_chat_template(messages(first), add_generation_prompt=True)
    return {"rows": len(table.rows), "prompt": rendered, "prompt_tokens": len(ids),
            "total_prompt_tokens": sum(lengths), "max_prompt_tokens": max(lengths),
            "shared_prefix_tokens": len(common_prefix([encode(r) for r in table.rows[:PREFIX_SAMPLE]])),
            "row1_reply": req.text, "row1_seconds": round(row_seconds, 3),
            "estimated_seconds_at_most": round(row_seconds * len(table.rows), 1)}
