"""Data at scale: weighted mixtures, dedup, resumable prepare, and a loader whose position is one number."""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from pocketlm.cli import main
from pocketlm.data.corpus import split_at
from pocketlm.data.loader import PretrainBatches
from pocketlm.data.mixture import MAX_PERIOD, Mixture
from pocketlm.data.prepare import prepare
from pocketlm.data.tasks import KILL_AT_ENV, KILL_ENV
from pocketlm.errors import InputError
from pocketlm.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = ("thou art the king of every castle and the sea is wide but we shall find our way home "
         "before the night falls on the old town where the bells ring").split()


def _doc(i: int, n_words: int = 60) -> str:
    rng = np.random.default_rng(i)
    lines = [" ".join(rng.choice(WORDS, 12)) for _ in range(n_words // 12)]
    return f"Document {i}.\n" + "\n".join(lines) + "\n"


def _jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _mixture_dir(tmp_path: Path, texts: dict | None = None) -> Path:
    """Two sources of three files each, a few duplicates in each (their texts, in order, into `texts`)."""
    for name, base in (("web", 0), ("books", 1000)):
        d = tmp_path / name
        d.mkdir()
        for f in range(3):
            docs = [_doc(base + 10 * f + i) for i in range(10)]
            docs.insert(3, docs[0].upper())  # an exact duplicate after normalization
            _jsonl(d / f"part{f}.jsonl", docs)
            if texts is not None:
                texts.setdefault(name, []).extend(docs)
    (tmp_path / "sources.yaml").write_text(
        "sources:\n"
        "  - name: web\n    inputs: [web/*.jsonl]\n    weight: 3\n"
        "  - name: books\n    inputs: [books/]\n    weight: 1\n    dedup: exact\n")
    return tmp_path / "sources.yaml"


def _max_deviation(sources: np.ndarray, p, q) -> float:
    """max over prefixes n and sources s of |count_s(n) - n p_s/q|, computed in integers."""
    counts = np.cumsum(np.eye(len(p), dtype=np.int64)[sources], axis=0)
    n = np.arange(1, len(sources) + 1)[:, None]
    return float(np.abs(counts * q - n * np.asarray(p)[None]).max() / q)


@settings(max_examples=30, deadline=None)
@example([24, 24, 24, 24, 24, 0.001])  # a share below 1/MAX_PERIOD: hypothesis found it
@given(st.lists(st.one_of(st.integers(1, 50), st.floats(0.001, 10).map(lambda w: round(w, 3))), min_size=1, max_size=7))
def test_every_prefix_within_one_sample_of_its_share(weights):
    weights = [w if w > 0 else 1 for w in weights]
    try:
        mix = Mixture(weights)
    except InputError as e:  # refused only for a share too small to schedule, and said so
        assert "cannot be scheduled" in str(e) and min(weights) / sum(weights) < 1 / MAX_PERIOD
        return
    total = sum(weights)
    assert all(abs(share - w / total) <= 1 / mix.q for share, w in zip(mix.shares, weights))
    n = min(2 * mix.q + 7, 30_000)
    src, index = mix.lookup(0, n)
    assert _max_deviation(src, mix.p, mix.q) < 1
    for s in range(len(weights)):  # the index within a source counts that source's samples
        assert (index[src == s] == np.arange((src == s).sum())).all()
    # random access far out equals the sequence read from the start
    far = 10 * mix.q + 3
    assert (mix.lookup(far, 50)[0] == mix.lookup(0, far + 50)[0][far:]).all()


def test_three_way_skew_stays_within_one_sample():
    mix = Mixture([0.7, 0.25, 0.05])
    assert mix.q == 20 and mix.p == [14, 5, 1]
    src, _ = mix.lookup(0, 1000)
    assert _max_deviation(src, mix.p, mix.q) < 1


def test_prepare_mixture_dedup_manifest_and_loader(tmp_path, tokenizer_dir):
    texts = {}
    yaml_file = _mixture_dir(tmp_path, texts)
    out = tmp_path / "out"
    assert main(["prepare", "--sources", str(yaml_file), "--tokenizer", str(tokenizer_dir), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    by_name = {s["name"]: s for s in manifest["sources"]}
    for name in ("web", "books"):
        assert by_name[name]["documents"] == 33 and by_name[name]["dropped_duplicates"] == {"exact": 3, "near": 0}
    assert manifest["dedup"] == {"documents": 66, "dropped": {"exact": 6, "near": 0}, "kept": 60}
    for shard in manifest["shards"]:
        data = (out / shard["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == 2 * shard["tokens"]
        assert shard["path"].startswith(shard["source"] + "/")
    assert [m["share"] for m in meta["mixture"]] == [0.75, 0.25]
    assert meta["train"]["tokens"] == sum(m["train"]["tokens"] for m in meta["mixture"])
    # each source holds out its own last 10% of characters (small files: one task, one shard per split)
    tok = Tokenizer.load(tokenizer_dir)
    for m in meta["mixture"]:
        assert m["train"]["shards"] == [f"{m['name']}/train-00000.bin"] and m["val"]["shards"] == [f"{m['name']}/val-00000.bin"]
        docs = texts[m["name"]]
        cut, seen = int(sum(map(len, docs)) * 0.9), 0
        for i, d in enumerate(docs):
            if seen + len(d) > cut:
                break
            seen += len(d)
        expect = d[split_at(d, cut - seen):] + "".join(docs[i + 1:])
        val = np.fromfile(out / m["val"]["shards"][0], dtype=np.uint16).tolist()
        assert tok.decode(val, skip_special_tokens=True) == expect and val.count(tok.bos_id) == len(docs) - i

    # the loader: one global sample sequence, sliced by rank, resumable at another world size
    one = PretrainBatches(out, batch_size=8, seq_len=16, seed=5)
    src, _ = one.sample_sources(0, 400)
    assert _max_deviation(src, one.mixture.p, one.mixture.q) < 1
    batches = [one.next_batch()[0] for _ in range(3)]
    two = [PretrainBatches(out, batch_size=4, seq_len=16, seed=5, rank=r, world_size=2) for r in range(2)]
    for p in two:
        p.load_state_dict({"samples": 8})  # resume after one 8-sample step of the single process
    assert (np.concatenate([p.next_batch()[0] for p in two]) == batches[1].numpy()).all()
    four = [PretrainBatches(out, batch_size=2, seq_len=16, seed=5, rank=r, world_size=4) for r in range(4)]
    for p in four:
        p.load_state_dict(two[0].state_dict())
    assert two[0].state_dict() == {"samples": 16}
    assert (np.concatenate([p.next_batch()[0] for p in four]) == batches[2].numpy()).all()
    # each row is the window of the source the schedule names, read here straight from its shard files
    src, starts = one.sample_sources(0, 8)
    raw = [np.concatenate([np.fromfile(out / f, dtype=np.uint16) for f in m["train"]["shards"]]) for m in meta["mixture"]]
    expect = np.stack([raw[s][w:w + 16] for s, w in zip(src, starts)])
    assert (batches[0].numpy() == expect).all() and set(src.tolist()) == {0, 1}


def test_near_duplicates_need_minhash(tmp_path, tokenizer_dir):
    base = [_doc(i, 120) for i in range(8)]
    near = [t.replace("Document", "Doc.", 1) + "one more line\n" for t in base[:3]]  # small edits
    _jsonl(tmp_path / "a.jsonl", base + near + [base[5]])
    results = {}
    for mode in ("none", "exact", "minhash"):
        (tmp_path / f"{mode}.yaml").write_text(f"sources:\n  - name: a\n    inputs: [a.jsonl]\n    dedup: {mode}\n")
        prepare(sources=tmp_path / f"{mode}.yaml", tokenizer=tokenizer_dir, out=tmp_path / mode)
        results[mode] = json.loads((tmp_path / mode / "manifest.json").read_text())["sources"][0]["dropped_duplicates"]
    assert results == {"none": {"exact": 0, "near": 0}, "exact": {"exact": 1, "near": 0},
                       "minhash": {"exact": 1, "near": 3}}


def _run_prepare(yaml_file, tokenizer_dir, out, kill_after=None, kill_at=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(KILL_ENV, None)
    env.pop(KILL_AT_ENV, None)
    if kill_after is not None:
        env[KILL_ENV] = str(kill_after)
    if kill_at is not None:
        env[KILL_AT_ENV] = kill_at
    return subprocess.run([sys.executable, "-m", "pocketlm.cli", "prepare", "--sources", str(yaml_file),
                           "--tokenizer", str(tokenizer_dir), "--out", str(out), "--task-chars", "2000"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_killed_prepare_resumes_byte_identical(tmp_path, tokenizer_dir):
    yaml_file = _mixture_dir(tmp_path)
    prepare(sources=yaml_file, tokenizer=tokenizer_dir, out=tmp_path / "whole", task_chars=2000)
    out = tmp_path / "killed"
    # 6 scan tasks, then encode tasks: die after the 2nd encode task, then again 3 tasks later
    first = _run_prepare(yaml_file, tokenizer_dir, out, kill_after=8)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert not (out / "manifest.json").exists()
    done = sorted(p.name for p in (out / ".prepare").glob("task-*.json"))
    assert done == ["task-web-00000.json", "task-web-00001.json"]
    kept = (out / "web" / "train-00000.bin").stat().st_ino
    second = _run_prepare(yaml_file, tokenizer_dir, out, kill_after=3)
    assert second.returncode == -signal.SIGKILL, second.stderr
    assert len(list((out / ".prepare").glob("task-*.json"))) == 5
    assert (out / ".prepare" / "task-books-00000.json").exists()
    # killed once a task's shards are in place but before its marker: the task is done again
    third = _run_prepare(yaml_file, tokenizer_dir, out, kill_at="task-books-00001:committed")
    assert third.returncode == -signal.SIGKILL, third.stderr
    assert (out / "books" / "train-00001.bin").exists() and not (out / ".prepare" / "task-books-00001.json").exists()
    (out / "web" / ".train-00009.bin.tmp-99999").write_bytes(b"\0" * 10)  # as a kill mid-write leaves
    last = _run_prepare(yaml_file, tokenizer_dir, out)
    assert last.returncode == 0, last.stderr
    assert not list(out.rglob(".*.tmp-*"))
    assert (out / "web" / "train-00000.bin").stat().st_ino == kept  # a finished task was not redone
    assert not (out / ".prepare").exists()
    whole = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert json.loads((out / "manifest.json").read_text()) == whole
    assert len(whole["shards"]) > 8
    for shard in whole["shards"]:
        assert (out / shard["path"]).read_bytes() == (tmp_path / "whole" / shard["path"]).read_bytes()
    assert (out / "meta.json").read_text() == (tmp_path / "whole" / "meta.json").read_text()


def test_changed_inputs_start_over(tmp_path, tokenizer_dir):
    yaml_file = _mixture_dir(tmp_path)
    out = tmp_path / "out"
    assert _run_prepare(yaml_file, tokenizer_dir, out, kill_after=8).returncode == -signal.SIGKILL
    _jsonl(tmp_path / "web" / "part0.jsonl", [_doc(i) for i in range(500, 505)])  # edited since the kill
    assert _run_prepare(yaml_file, tokenizer_dir, out).returncode == 0
    fresh = tmp_path / "fresh"
    prepare(sources=yaml_file, tokenizer=tokenizer_dir, out=fresh, task_chars=2000)
    assert (out / "manifest.json").read_text() == (fresh / "manifest.json").read_text()


@pytest.mark.parametrize("text, where", [
    ("sources:\n  - name: a\n    weight: 1\n", ":2: sources[0]: missing field 'inputs'"),
    ("sources:\n  - name: a\n    inputs: [x.txt]\n    weight: -2\n", ":4: sources[0] (a): weight: expected a number > 0"),
    ("sources:\n  - name: a\n    inputs: [x.txt]\n    dedup: fuzzy\n", ":4: sources[0] (a): dedup: expected one of exact"),
    ("sources:\n  - name: a\n    inputs: [x.txt]\n    wieght: 1\n", ":4: sources[0]: unknown field 'wieght'"),
    ("sources:\n  - name: a\n    inputs: [x.txt]\n  - name: a\n    inputs: [y.txt]\n", ":4: sources[1] (a): name: 'a' is used twice"),
    ("sources:\n  - name: a\n    inputs: [x.txt\n", ":4: invalid YAML (expected ',' or ']'"),
    ("source:\n  - name: a\n", ":1: sources: expected a non-empty list"),
])
def test_bad_sources_yaml_names_file_line_and_field(tmp_path, tokenizer_dir, capsys, text, where):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["prepare", "--sources", str(bad), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"bad.yaml{where}" in err and len(err.strip().splitlines()) == 1


def test_bad_line_in_compressed_jsonl_names_file_and_line(tmp_path, tokenizer_dir, capsys):
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as fh:
        fh.write('{"text": "fine"}\n{"text": 3}\n')
    (tmp_path / "s.yaml").write_text("sources:\n  - name: c\n    inputs: [c.jsonl.gz]\n")
    assert main(["prepare", "--sources", str(tmp_path / "s.yaml"), "--tokenizer", str(tokenizer_dir),
                 "--out", str(tmp_path / "o")]) == 2
    assert "c.jsonl.gz:2: field 'text' must be a string, got int" in capsys.readouterr().err


def test_small_files_share_a_task_and_big_ones_are_cut(tmp_path):
    from pocketlm.data.tasks import plan_tasks, scan_file

    for i in range(5):
        _jsonl(tmp_path / f"small{i}.jsonl", [_doc(i)])
    (tmp_path / "empty.jsonl").write_text("\n")
    _jsonl(tmp_path / "big.jsonl", [_doc(100 + i) for i in range(20)])
    files = [tmp_path / f"small{i}.jsonl" for i in range(5)] + [tmp_path / "empty.jsonl", tmp_path / "big.jsonl"]
    scans = [scan_file(f, False, "text", 1500) for f in files]
    tasks = plan_tasks(scans, 1500)
    # ~370 characters each: the five small files (the empty one skipped) and big's first chunk fill one task
    assert [s[0] for s in tasks[0]["segments"]] == [0, 1, 2, 3, 4, 6]
    assert all(len(t["segments"]) == 1 and t["segments"][0][0] == 6 for t in tasks[1:]) and len(tasks) > 3
    # contiguous: each task starts where the previous ended, and they cover the source exactly
    assert [t["start"] for t in tasks] == list(np.cumsum([0] + [t["chars"] for t in tasks[:-1]]))
    assert sum(t["chars"] for t in tasks) == sum(s["chars"] for s in scans)


def test_pretrain_on_a_mixture(tmp_path, tokenizer_dir):
    from conftest import TINY

    yaml_file = _mixture_dir(tmp_path)
    data = tmp_path / "data"
    prepare(sources=yaml_file, tokenizer=tokenizer_dir, out=data)
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(data), "--out", str(run), "--max-steps", "3", *TINY]) == 0
    states = [json.loads(f.read_text()) for f in run.rglob("state.json")]
    assert states and max(s["data"]["samples"] for s in states) == 3 * 4  # 3 steps of 4 sequences
    assert json.loads((run / "results.json").read_text())["full_val_tokens"] > 0
