"""`pocketlm prepare`: tokenize one corpus, or a weighted mixture of sources, into token shards.

    out/
      train-00000.bin ...   one source (`--input`): uint16 (vocab < 65536) or uint32 token ids, raw,
      val-00000.bin ...     memory-mapped at train time
      NAME/train-00000.bin  a mixture (`--sources sources.yaml`): each source's shards in its folder
      meta.json             dtype, vocab size, tokenizer fingerprint, counts, the mixture and its shards
      manifest.json         per-source counts (documents, tokens, dropped duplicates) and every shard's sha256

Every document starts with the tokenizer's BOS token (the document boundary). Input is read as a
stream: memory holds the dedup index (16 bytes a document for exact dedup, see dedup.py), one task's
new digests and one encoding batch, never the corpus.

The work runs in tasks of ~task_chars characters (a big file is cut into several, small consecutive
files share one), one after the other in corpus order: a first pass counts each file (the val cut needs
each source's length), a second deduplicates, splits and encodes each task into its own shards.
Markers under out/.prepare make a killed run resume without redoing finished tasks, and the result is
byte-identical to an uninterrupted run. Tasks run in order because dedup keeps the first copy; the
parallelism is inside a task (`tokenizers`' batch encoder spreads the encoding over all cores).

The train/validation split, per source: the last `val_fraction` of that source's characters (counted
before deduplication, in input order) is validation, and the document straddling the cut is split at
the line break nearest before it, as for a single corpus. Duplicates are dropped from both splits, the
first copy kept, so validation never repeats a training document of the same source.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pocketlm.data.corpus import CorpusError, chunk_for_encoding, expand_inputs, split_at, val_cut
from pocketlm.data.dedup import Deduper
from pocketlm.data.mixture import Mixture
from pocketlm.data.sources import DEDUP_MODES, Source, load_sources
from pocketlm.data.tasks import (FileCursor, TokenFile, WorkDir, atomic_write_json, load_arrays, plan_tasks, save_arrays,
                                 scan_file)
from pocketlm.tokenizer import Tokenizer

TASK_CHARS = 64 << 20  # ~64 MB of text per task: 15-60M tokens per shard


def load_tokenizer_from(path) -> Tokenizer:
    """A tokenizer directory, or a run/checkpoint/model that carries one."""
    path = Path(path)
    if (path / "tokenizer.json").exists() or path.suffix == ".json":
        return Tokenizer.load(path)
    from pocketlm.model import load_model
    return load_model(path)[1]


class SplitEncoder:
    """Pieces of documents in, token ids out to a TokenFile, encoded in batches of ~batch_chars
    characters so many small documents still fill the parallel batch encoder (256K characters: the
    tokenizer's per-token Encoding objects made 1M-character batches cost ~100 MB of peak memory)."""

    def __init__(self, tok: Tokenizer, out: Path, rel: str, dtype, batch_chars: int = 1 << 18):
        self.tok, self.rel, self.batch_chars = tok, rel, batch_chars
        self.out = TokenFile(out / rel, dtype)
        self.pieces: list[tuple[bool, str]] = []  # (starts a document, text)
        self.chars = 0
        self.bytes = self.documents = 0

    def add(self, text: str) -> None:
        self.documents += 1
        self.bytes += len(text.encode("utf-8"))
        for i, piece in enumerate(chunk_for_encoding(text)):
            self.pieces.append((i == 0, piece))
            self.chars += len(piece)
            if self.chars >= self.batch_chars:
                self.flush()

    def flush(self) -> None:
        if not self.pieces:
            return
        encoded = self.tok.encode_batch([p for _, p in self.pieces])
        bos = [self.tok.bos_id] if self.tok.bos_id is not None else []
        ids = [t for (first, _), e in zip(self.pieces, encoded) for t in (bos + e if first else e)]
        self.out.write(ids)
        self.pieces, self.chars = [], 0

    def commit(self) -> dict:
        self.flush()
        shard = self.out.commit()
        return {"documents": self.documents, "bytes": self.bytes, "tokens": shard["tokens"] if shard else 0,
                "shard": self.rel if shard else None, "sha256": shard["sha256"] if shard else None}


def _run_task(tok, dtype, out: Path, src: Source, t: int, docs, offset: int, cut: int, dedup: Deduper, bar) -> dict:
    """One task: dedup, split at the source's val cut, encode into train/val shards of task t."""
    enc = {}
    for split in ("train", "val"):
        enc[split] = SplitEncoder(tok, out, (Path(src.subdir) / f"{split}-{t:05d}.bin").as_posix(), dtype)
    counts = {"docs": 0, "exact": 0, "near": 0}
    for d in docs:
        n, pos = len(d.text), offset
        offset += n
        counts["docs"] += 1
        bar.update(n)
        dup = dedup.check(d.text)
        if dup:
            counts[dup] += 1
        elif pos + n <= cut:
            enc["train"].add(d.text)
        elif pos >= cut:
            enc["val"].add(d.text)
        else:
            at = split_at(d.text, cut - pos)
            if at:
                enc["train"].add(d.text[:at])
            enc["val"].add(d.text[at:])
    return {**counts, "train": enc["train"].commit(), "val": enc["val"].commit()}


def _prepare_source(tok, dtype, out: Path, work: WorkDir, src: Source, files, scans, val_fraction, bar):
    total = sum(s["chars"] for s in scans)
    if total == 0:
        raise CorpusError(f"empty corpus: no text found in {', '.join(src.inputs)}" + (f" (source {src.name!r})" if src.subdir else ""))
    cut = val_cut(total, val_fraction)
    if val_fraction and cut >= total:
        raise CorpusError(f"validation split is empty: the corpus is too small for the requested val_fraction"
                          + (f" (source {src.name!r})" if src.subdir else ""))
    dedup = Deduper(src.dedup)
    cursor = FileCursor(files, src.split_blank_lines, src.text_field)
    records, redo = [], False
    for t, task in enumerate(plan_tasks(scans, work.plan["task_chars"])):
        name = f"task-{src.name}-{t:05d}"
        record = None if redo else work.done(name)
        if record is not None:  # finished: restore its dedup state and move on
            dedup.restore(load_arrays(work.root / f"{name}.npz"))
            bar.update(task["chars"])
        else:
            redo = True  # every later task depends on this one's dedup state
            record = _run_task(tok, dtype, out, src, t, cursor.documents(task["segments"]), task["start"], cut, dedup, bar)
            record["files"] = sorted({str(files[f]) for f, _, _ in task["segments"]})
            save_arrays(work.root / f"{name}.npz", dedup.seal())
            work.finish(name, record)
        records.append(record)
    return _source_summary(src, records, len(files))


def _source_summary(src: Source, tasks: list[dict], n_files: int) -> tuple[dict, list[dict]]:
    """The manifest's entry for one source, and its shards."""
    summary = {"name": src.name, "weight": src.weight, "dedup": src.dedup, "inputs": list(src.inputs),
               "files": n_files, "tasks": len(tasks),
               "documents": sum(r["docs"] for r in tasks),
               "dropped_duplicates": {"exact": sum(r["exact"] for r in tasks), "near": sum(r["near"] for r in tasks)}}
    for split in ("train", "val"):
        summary[split] = {k: sum(r[split][k] for r in tasks) for k in ("documents", "bytes", "tokens")}
        summary[split]["shards"] = [r[split]["shard"] for r in tasks if r[split]["shard"]]
    shards = [{"path": r[s]["shard"], "source": src.name, "split": s, "tokens": r[s]["tokens"], "sha256": r[s]["sha256"]}
              for s in ("train", "val") for r in tasks if r[s]["shard"]]
    return summary, shards


def _clear_outputs(out: Path, sources: list[Source]) -> None:
    """Remove what an earlier prepare left in `out` (its shards, meta, manifest, work dir)."""
    shutil.rmtree(out / ".prepare", ignore_errors=True)
    for sub in {""} | {s.subdir for s in sources}:
        for old in (out / sub).glob("*.bin") if (out / sub).is_dir() else ():
            old.unlink()
    for name in ("meta.json", "manifest.json"):
        (out / name).unlink(missing_ok=True)


def prepare(inputs=None, tokenizer=None, out=None, val_fraction: float = 0.1, split_blank_lines: bool = False,
            text_field: str = "text", workers: int = 0, sources=None, dedup: str = "none",
            task_chars: int = TASK_CHARS) -> dict:
    """Either `inputs` (files, directories, globs: one source, shards at the top of `out`, no dedup by
    default) or `sources` (a sources.yaml path or a list of Source)."""
    if (inputs is None) == (sources is None):
        raise CorpusError("prepare: give either inputs (--input) or sources (--sources), not both or neither")
    if task_chars < 1:
        raise CorpusError(f"task_chars: expected a positive number of characters, got {task_chars}")
    if dedup not in DEDUP_MODES:
        raise CorpusError(f"dedup: expected one of {', '.join(DEDUP_MODES)}, got {dedup!r}")
    if isinstance(sources, (str, os.PathLike)):
        sources = load_sources(sources)
    srcs = sources or [Source("train", [str(i) for i in inputs], text_field=text_field, dedup=dedup,
                              split_blank_lines=split_blank_lines)]
    out = Path(out)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer_from(tokenizer)
    if workers:
        os.environ["RAYON_NUM_THREADS"] = str(workers)
    val_cut(0, val_fraction)  # validates the fraction before any work
    files = [expand_inputs(s.inputs) for s in srcs]
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    plan = {"tokenizer": tok.fingerprint(), "val_fraction": val_fraction, "task_chars": task_chars,
            "sources": [dataclasses.asdict(s) for s in srcs],
            "files": [[[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in fs] for fs in files]}
    out.mkdir(parents=True, exist_ok=True)
    work = WorkDir(out, plan)
    if not work.matches():
        _clear_outputs(out, srcs)
        work.start()
    for sub in {".prepare"} | {s.subdir for s in srcs}:  # what a killed run was writing when it died
        for partial in (out / sub).glob(".*.tmp-*"):
            partial.unlink()
    scans = []
    for s, fs in zip(srcs, files):
        scans.append([])
        for i, f in enumerate(fs):
            name = f"scan-{s.name}-{i:05d}"
            record = work.done(name)
            if record is None:
                record = scan_file(f, s.split_blank_lines, s.text_field, task_chars)
                work.finish(name, record)
            scans[-1].append(record)
    summaries, shards = [], []
    with tqdm(total=sum(r["chars"] for sc in scans for r in sc), unit="char", unit_scale=True, desc="prepare",
              disable=None) as bar:
        for s, fs, sc in zip(srcs, files, scans):
            summary, src_shards = _prepare_source(tok, dtype, out, work, s, fs, sc, val_fraction, bar)
            summaries.append(summary)
            shards += src_shards
    return _finish(out, tok, dtype, srcs, summaries, shards, val_fraction, inputs, work)


def _finish(out, tok, dtype, srcs, summaries, shards, val_fraction, inputs, work) -> dict:
    shares = Mixture([s.weight for s in srcs]).shares
    mixture = [{"name": s["name"], "weight": s["weight"], "share": share,
                "train": {"tokens": s["train"]["tokens"], "shards": s["train"]["shards"]},
                "val": {"tokens": s["val"]["tokens"], "shards": s["val"]["shards"]}}
               for s, share in zip(summaries, shares)]
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, "tokenizer": tok.fingerprint(),
            "bos_id": tok.bos_id, "val_fraction": val_fraction,
            "sources": [str(i) for i in inputs] if inputs is not None else [s.name for s in srcs],
            "mixture": mixture}
    for split in ("train", "val"):
        meta[split] = {k: sum(s[split][k] for s in summaries) for k in ("tokens", "bytes", "documents")}
    dropped = {k: sum(s["dropped_duplicates"][k] for s in summaries) for k in ("exact", "near")}
    manifest = {"tokenizer": tok.fingerprint(), "val_fraction": val_fraction, "sources": summaries,
                "dedup": {"documents": sum(s["documents"] for s in summaries), "dropped": dropped,
                          "kept": sum(s["documents"] for s in summaries) - sum(dropped.values())},
                "shards": shards}
    tok.save(out / "tokenizer")
    atomic_write_json(out / "manifest.json", manifest)
    atomic_write_json(out / "meta.json", meta)
    shutil.rmtree(work.root, ignore_errors=True)  # done: the markers are no longer needed
    print(f"prepared {out}: train {meta['train']['tokens']:,} tokens ({meta['train']['bytes']:,} bytes), "
          f"val {meta['val']['tokens']:,} tokens ({meta['val']['bytes']:,} bytes)"
          + (f"; dropped {dropped['exact']:,} exact and {dropped['near']:,} near duplicates"
             if any(s.dedup != "none" for s in srcs) else ""))
    return meta
