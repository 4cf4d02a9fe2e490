"""`pocketlm analyze`: through the CLI (a subprocess, killed with SIGKILL and resumed) and the Python API.

The model is a tiny GPT with random weights: whatever it writes is noise, so every valid label and
every schema-valid row is the constraint's doing (checked with `jsonschema`)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import torch

from pocketlm.analyze import analyze
from pocketlm.analyze.journal import JournalError
from pocketlm.analyze.table import TableError
from pocketlm.cli import main
from pocketlm.errors import PocketLMError
from pocketlm.infer.constrain import SchemaError, parse_fields
from pocketlm.model.checkpoint import save_checkpoint
from pocketlm.model.gpt import GPT, ModelConfig
from tiny_lm import tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
LABELS = ["refund", "cancel order", "track"]
MESSAGES = ["my parcel never came", "I want my money back", "please cancel order 1234", "where is it?",
            "refund!!", "stop the order", "héllo", "what is the status of 55"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is far faster than two on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=tok.vocab_size, block_size=512, n_layer=2, n_head=4, n_kv_head=2,
                      n_embd=64)
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny", GPT(cfg).eval(), tok)


def tickets(path: Path, n: int) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "message", "intent", "date", "channel"])
        for i in range(n):
            w.writerow([i, MESSAGES[i % len(MESSAGES)] + f" #{i}", LABELS[i % 3], f"2024-0{1 + i % 3}-1{i % 10}",
                        "email" if i % 2 else "chat"])
    return path


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_labels_are_always_valid_with_confidence_and_gold_metrics(model_dir, tmp_path):
    src = tickets(tmp_path / "t.csv", 10)
    out = tmp_path / "labelled.csv"
    res = analyze(src, model=model_dir, text="message", labels=",".join(LABELS), out=out, gold="intent",
                  batch_size=4, progress=False)
    rows = read_csv(out)
    assert [r["id"] for r in rows] == [str(i) for i in range(10)]  # input order, input columns first
    assert list(rows[0]) == ["id", "message", "intent", "date", "channel", "label", "confidence", "status"]
    assert all(r["label"] in LABELS and r["status"] == "ok" and 0 < float(r["confidence"]) <= 1 for r in rows)
    accuracy = sum(r["label"] == r["intent"] for r in rows) / len(rows)
    assert res["metrics"]["accuracy"] == pytest.approx(accuracy)
    assert sum(sum(c.values()) for c in res["metrics"]["confusion"].values()) == 10
    assert res["status"] == {"ok": 10}


def test_schema_fields_always_validate(model_dir, tmp_path):
    src = tickets(tmp_path / "t.csv", 6)
    schema = parse_fields("intent refund|cancel|other, order_id str?, urgency int, angry bool")
    schema["properties"]["urgency"].update(minimum=1, maximum=5)  # random weights may write digits forever
    schema["properties"]["order_id"]["anyOf"][0]["maxLength"] = 8
    (tmp_path / "s.json").write_text(json.dumps(schema))
    out = tmp_path / "o.jsonl"
    res = analyze(src, model=model_dir, prompt="Ticket {id} via {channel}: {message}", schema=str(tmp_path / "s.json"),
                  out=out, batch_size=3, max_tokens=120, progress=False)
    names = res["columns"]
    assert names["intent"] == "intent_pred"  # the input has an "intent" column already
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and [r["id"] for r in rows] == [str(i) for i in range(6)]
    for r in rows:
        assert r["status"] == "ok"
        jsonschema.validate({k: r[names[k]] for k in schema["properties"]}, schema)


def test_labels_from_a_column_and_tsv_parquet_inputs(model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_csv(tickets(tmp_path / "t.csv", 5))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    with open(tmp_path / "t.tsv", "w", encoding="utf-8") as f:
        f.write("\t".join(rows[0]) + "\n" + "".join("\t".join(r.values()) + "\n" for r in rows))
    (tmp_path / "labels.txt").write_text("cancel order\nrefund\n\ntrack\n")
    outs = []
    for name, labels in (("t.csv", {"labels_from": "intent"}), ("t.parquet", {"labels": "@" + str(tmp_path / "labels.txt")}),
                         ("t.tsv", {"labels": ["cancel order", "refund", "track"]})):
        out = tmp_path / f"{name}.out.csv"
        analyze(tmp_path / name, model=model_dir, text="message", out=out, batch_size=8, progress=False, **labels)
        outs.append(out.read_text())
    assert outs[0] == outs[1] == outs[2]  # labels_from sorts the column's values: the same list
    assert {r["label"] for r in read_csv(tmp_path / "t.csv.out.csv")} <= set(LABELS)


def run_cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "pocketlm.cli", "analyze", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, **kw)


def test_kill_9_then_resume_equals_an_uninterrupted_run(model_dir, tmp_path):
    n = 64
    src = tickets(tmp_path / "t.csv", n)
    common = ["--model", model_dir, "--text", "message", "--labels", ",".join(LABELS), "--batch-size", "4",
              "--threads", "1", "--quiet"]
    # the uninterrupted run, in this process (one thread too, so the same arithmetic)
    analyze(src, model=model_dir, text="message", labels=LABELS, batch_size=4, out=tmp_path / "full.csv",
            progress=False)

    out, journal = tmp_path / "part.csv", tmp_path / "part.csv.journal"
    proc = run_cli(src, *common, "--out", out)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 3:  # the header and 2 batches
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed"
    assert not out.exists()
    kept = sum(len(json.loads(line)["rows"]) for line in journal.read_text().splitlines()[1:] if line.endswith("}"))
    assert 0 < kept < n

    resumed = run_cli(src, *common, "--out", out, "--resume")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr.decode()
    summary = json.loads(stdout)
    assert summary["new_rows"] == n - kept  # only what the journal did not hold, so at most one batch redone
    assert out.read_bytes() == (tmp_path / "full.csv").read_bytes()


def test_torn_journal_tail_and_fingerprint_mismatch(model_dir, tmp_path):
    src = tickets(tmp_path / "t.csv", 8)
    kw = dict(model=model_dir, text="message", labels=LABELS, batch_size=3, progress=False, instruction="Label:")
    analyze(src, out=tmp_path / "a.csv", **kw)
    journal = tmp_path / "a.csv.journal"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:2]) + lines[2][:25])  # one whole batch, then a torn write
    res = analyze(src, out=tmp_path / "b.csv", journal=journal, resume=True, **kw)
    assert res["new_rows"] == 8 - 3
    assert (tmp_path / "b.csv").read_bytes() == (tmp_path / "a.csv").read_bytes()
    for change, field in [({"temperature": 0.7, "seed": 1}, "sampling"), ({"labels": ["a", "b"]}, "schema"),
                          ({"instruction": "Label it."}, "prompt")]:
        with pytest.raises(JournalError, match=f"the {field} differs"):
            analyze(src, out=tmp_path / "b.csv", journal=journal, resume=True, **{**kw, **change})


def test_report_numbers_come_from_the_rows(model_dir, tmp_path):
    src = tickets(tmp_path / "t.csv", 9)
    report = tmp_path / "report.html"
    res = analyze(src, model=model_dir, text="message", labels=LABELS, out=tmp_path / "o.csv", gold="intent",
                  report=report, group_by="channel", date_column="date", batch_size=4, progress=False)
    rows = read_csv(tmp_path / "o.csv")
    facts = json.loads((tmp_path / "report.json").read_text())
    assert res["report"]["json"] == str(tmp_path / "report.json")
    counts = {s["value"]: s["count"] for s in facts["fields"]["label"]}
    assert counts == {lab: sum(r["label"] == lab for r in rows) for lab in set(r["label"] for r in rows)}
    by_channel = facts["group_by"]["tables"]["label"]
    assert sum(by_channel["email"].values()) == sum(r["channel"] == "email" for r in rows)
    months = facts["by_period"]["tables"]["label"]
    assert sorted(months) == ["2024-01", "2024-02", "2024-03"] and sum(months["2024-02"].values()) == 3
    assert sum(facts["confidence"]["counts"]) == 9
    least = facts["least_confident"][0]["confidence"]
    assert least == min(float(r["confidence"]) for r in rows)
    assert facts["metrics"]["confusion"] == res["metrics"]["confusion"]
    page = report.read_text()
    assert page.count("data:image/png;base64,") >= 3
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained


def test_numbers_not_in_the_facts_are_flagged():
    from pocketlm.analyze.summary import unsupported_numbers

    facts = {"rows": 12, "fields": {"label": [{"value": "refund", "count": 7, "share": 0.5833},
                                              {"value": "track", "count": 5, "share": 0.4167}]},
             "by_period": {"tables": {"label": {"2024-03": {"refund": 3}}}}}
    text = ("Of 12 rows, 58.3% asked for a refund (7 rows, a share of 0.58) and 41.7 percent to track an "
            "order; 2024-03 had 3. About 9 were angry, 1,234 were late, 12.5 on average, 60% by email, "
            "order_66 aside.")
    assert unsupported_numbers(text, facts) == ["9", "1,234", "12.5", "60%"]


def test_summary_by_the_model_with_its_numbers_checked(model_dir, tmp_path, capsys):
    from pocketlm.analyze.summary import schema, unsupported_numbers
    from pocketlm.cli import main

    src = tickets(tmp_path / "t.csv", 6)
    args = ["analyze", str(src), "--model", str(model_dir), "--text", "message", "--labels", ",".join(LABELS),
            "--out", str(tmp_path / "o.csv"), "--quiet", "--summary"]
    assert main(args) == 2 and "give report too" in capsys.readouterr().err
    assert main(args + ["--report", str(tmp_path / "r.html"), "--gold", "intent"]) == 0
    facts = json.loads((tmp_path / "r.json").read_text())
    summary = facts.pop("summary")
    assert summary["status"] == "ok"
    jsonschema.validate({"summary": summary["text"]}, schema(800))  # random weights, still a bounded string
    assert summary["unsupported_numbers"] == unsupported_numbers(summary["text"], facts)
    page = (tmp_path / "r.html").read_text()
    assert "<h2>summary</h2>" in page and page.count('<mark title="not in report.json">') == \
        len(summary["unsupported_numbers"])


def test_a_row_too_long_for_the_context_is_reported_not_fatal(model_dir, tmp_path):
    src = tmp_path / "t.jsonl"
    src.write_text(json.dumps({"message": "short"}) + "\n" + json.dumps({"message": "word " * 600}) + "\n")
    res = analyze(src, model=model_dir, text="message", labels=LABELS, out=tmp_path / "o.jsonl", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert rows[0]["status"] == "ok" and rows[0]["label"] in LABELS
    assert rows[1]["status"].startswith("error: the prompt has") and rows[1]["label"] is None
    assert res["status"] == {"ok": 1, rows[1]["status"]: 1}


def test_shared_prefix_reuse_gives_the_same_answers(model_dir, tmp_path):
    src = tickets(tmp_path / "t.csv", 6)
    kw = dict(model=model_dir, text="message", labels=LABELS, batch_size=3, progress=False)
    res = analyze(src, out=tmp_path / "a.csv", **kw)
    analyze(src, out=tmp_path / "b.csv", reuse_prefix=False, **kw)
    assert res["shared_prefix_tokens"] > 10 and res["prompt_tokens_reused"] == 6 * res["shared_prefix_tokens"]
    a, b = read_csv(tmp_path / "a.csv"), read_csv(tmp_path / "b.csv")
    assert [r["label"] for r in a] == [r["label"] for r in b]
    assert [float(r["confidence"]) for r in a] == pytest.approx([float(r["confidence"]) for r in b], abs=1e-4)


def test_the_kv_cache_is_sized_to_the_longest_row_and_its_reply(model_dir, tmp_path, monkeypatch):
    """The engine's slots hold the longest prompt plus max_tokens (not 2048 positions each); the
    answers are those of an engine with the default context."""
    from pocketlm.analyze import label as label_module

    made, real = [], label_module.Engine
    monkeypatch.setattr(label_module, "Engine", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    src = tickets(tmp_path / "t.csv", 6)
    kw = dict(model=model_dir, text="message", labels=LABELS, batch_size=4, max_tokens=9, progress=False)
    longest = analyze(src, dry_run=True, **kw)["max_prompt_tokens"]
    analyze(src, out=tmp_path / "a.csv", **kw)
    assert [e.max_seq_len for e in made] == [longest + 9] * 2
    monkeypatch.setattr(label_module, "Engine", lambda *a, **kw: real(*a, **{**kw, "max_seq_len": None}))
    analyze(src, out=tmp_path / "b.csv", **kw)
    assert read_csv(tmp_path / "a.csv") == read_csv(tmp_path / "b.csv")


def test_a_fine_tuned_models_task_file_gives_prompt_labels_and_gold_words(model_dir, tmp_path):
    """`finetune` writes task.json beside what it trains (raw label -> the word the model says, its
    system message and instruction); analyze reads it as `pocketlm eval` does: the same prompt, the
    label words when none are given, and gold values such as "0" scored as the word "negative"."""
    import shutil

    from pocketlm.data.sft import TaskSpec, load_examples
    from pocketlm.eval.tasks import prompt_ids
    from pocketlm.model import load_model

    tuned = shutil.copytree(model_dir, tmp_path / "tuned")
    spec = TaskSpec(format="classification", system="Rate it.", instruction="Sentiment?",
                    labels={"0": "negative", "1": "positive"})
    (tuned / "task.json").write_text(spec.to_json())
    src = tmp_path / "dev.tsv"
    src.write_text("label\tcontent\n" + "".join(f"{i % 2}\t{MESSAGES[i]}\n" for i in range(6)))
    out = tmp_path / "o.csv"
    res = analyze(src, model=tuned, text="content", gold="label", out=out, batch_size=4, progress=False)
    rows = read_csv(out)
    assert {r["label_pred"] for r in rows} <= {"negative", "positive"} and res["status"] == {"ok": 6}
    words = {"0": "negative", "1": "positive"}
    assert res["metrics"]["accuracy"] == pytest.approx(sum(words[r["label"]] == r["label_pred"] for r in rows) / 6)
    assert set(res["metrics"]["confusion"]) == {"negative", "positive"}  # gold "0"/"1" counted as words
    # labels_from the raw column gives the same words and the same answers
    analyze(src, model=tuned, text="content", labels_from="label", out=tmp_path / "p.csv", batch_size=4, progress=False)
    assert [r["label_pred"] for r in read_csv(tmp_path / "p.csv")] == [r["label_pred"] for r in rows]
    # the prompt is the one eval scores: its tokens, rendered from the same file
    dry = analyze(src, model=tuned, text="content", dry_run=True)
    _, tok = load_model(tuned)
    examples, _ = load_examples(src, spec)
    assert dry["prompt"] == tok.apply_chat_template(examples[0].messages[:-1], add_generation_prompt=True)
    assert dry["prompt_tokens"] == len(prompt_ids(tok, examples[0].messages))
    with pytest.raises(PocketLMError, match="exactly one of labels, labels_from or schema"):
        analyze(src, model=model_dir, text="content", progress=False)  # no task file: labels are needed
    # the command line takes the labels from the task file too, and without one says what is missing
    assert main(["analyze", str(src), "--model", str(tuned), "--text", "content", "--out", str(tmp_path / "c.csv")]) == 0
    assert [r["label_pred"] for r in read_csv(tmp_path / "c.csv")] == [r["label_pred"] for r in rows]
    assert main(["analyze", str(src), "--model", str(model_dir), "--text", "content", "--out", str(tmp_path / "d.csv")]) == 2


def test_dry_run(model_dir, tmp_path):
    src = tickets(tmp_path / "t.csv", 4)
    res = analyze(src, model=model_dir, text="message", labels=LABELS, dry_run=True, out=tmp_path / "o.csv")
    assert MESSAGES[0] in res["prompt"] and "refund, cancel order, track" in res["prompt"]
    assert res["rows"] == 4 and res["prompt_tokens"] > 0 and res["total_prompt_tokens"] >= 4 * res["shared_prefix_tokens"]
    assert res["shared_prefix_tokens"] > 10  # the instruction comes first, so rows share it
    assert not (tmp_path / "o.csv").exists()


def test_bad_inputs_name_the_file_line_column_or_field(model_dir, tmp_path):
    kw = dict(model=model_dir, labels=LABELS, progress=False)
    src = tickets(tmp_path / "t.csv", 3)
    with pytest.raises(TableError, match="'msg' is not a column of .*t.csv; its columns are: id, message"):
        analyze(src, text="msg", **kw)
    with pytest.raises(TableError, match=r"placeholder \{body\} is not a column"):
        analyze(src, prompt="{message} {body}", **kw)
    with pytest.raises(TableError, match="gold 'truth' is not a column"):
        analyze(src, text="message", gold="truth", **kw)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,message\n1,hello\n2,a,b\n")
    with pytest.raises(TableError, match=r"bad.csv:3: 3 fields, the header has 2"):
        analyze(bad, text="message", **kw)
    badj = tmp_path / "bad.jsonl"
    badj.write_text('{"message": "a"}\n{"message": \n')
    with pytest.raises(TableError, match=r"bad.jsonl:2: invalid JSON"):
        analyze(badj, text="message", **kw)
    with pytest.raises(TableError, match="no such file"):
        analyze(tmp_path / "missing.csv", text="message", **kw)
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(TableError, match="unsupported file type '.xlsx'"):
        analyze(tmp_path / "t.xlsx", text="message", **kw)
    with pytest.raises(SchemaError, match="'uniqueItems'"):
        analyze(src, model=model_dir, text="message", schema={"type": "array", "uniqueItems": True})
    with pytest.raises(SchemaError, match="'urgency' has unknown type 'integr'"):
        analyze(src, model=model_dir, text="message", schema="intent, urgency integr")
    with pytest.raises(PocketLMError, match="exactly one of labels"):
        analyze(src, model=model_dir, text="message")
    # the CLI prints these as one line and exits 2
    proc = run_cli(src, "--model", model_dir, "--text", "nope", "--labels", "a,b")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.decode().strip().count("\n") == 0 and "'nope' is not a column" in err.decode()


def test_constrained_and_free_requests_share_a_batch(model_dir):
    from pocketlm.infer.engine import Engine
    from pocketlm.infer.constrain import Choice
    from pocketlm.infer.sampling import SamplingParams
    from pocketlm.model.checkpoint import load_checkpoint

    model, tok = load_checkpoint(model_dir)
    engine = Engine(model, tok, max_batch=4)
    ids = tok.encode("ROMEO: hello there")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = engine.generate(ids, params).output_ids
    decoded = []  # the requests of every decode step
    real_decode = engine._decode
    engine._decode = lambda running: (decoded.append(list(running)), real_decode(running))
    labels = ["a b", "a c", "x b", "x c"]  # two choices in a row: the second is a decode step
    free = engine.submit(ids, params)
    choices = [Choice(tok, labels) for _ in range(3)]
    reqs = [engine.submit(tok.encode(m), SamplingParams(max_tokens=32, temperature=0), processors=[c])
            for m, c in zip(MESSAGES, choices)]
    while engine.step():
        pass
    assert free.output_ids == alone  # constrained neighbours do not change a free row
    assert all(r.finish_reason == "stop" and c.label in labels and r.text == c.label for r, c in zip(reqs, choices))
    assert any(free in step and any(r in step for r in reqs) for step in decoded)  # one batch, both kinds
