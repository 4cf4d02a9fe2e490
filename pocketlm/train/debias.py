"""`pocketlm debias`: counterfactual data augmentation (pocketlm.safety.cda) on a corpus, a LoRA
trained on it, and the before/after figures with their costs.

    corpus (../shared/data/gutenberg_books by default; Project Gutenberg headers left out)
      -> per book: the first 90% of its text for training, the last 10% held out
      -> training pieces of ~seq_len tokens that contain a swappable word, each with its
         counterfactual (both sides equally often), loss on every token
      -> a LoRA on the training loop of pretrain/finetune (checkpoints, resume, a time budget)
      -> RUN/adapter (PEFT format; apply it with --adapter or `pocketlm merge`, like any adapter)
      -> the bias probe, held-out bits per byte and SST-2 accuracy, before and after:
         RUN/debias.json, and RUN/adapter/eval/*.json (the adapter's model card carries them)
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

from pocketlm.config import TrainConfig
from pocketlm.data.corpus import expand_inputs, read_documents, split_at
from pocketlm.data.sft_batches import SFTBatches, SFTEvalBatches
from pocketlm.errors import InputError
from pocketlm.model import load_model
from pocketlm.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, add_lora, load_adapter_weights, save_adapter
from pocketlm.eval.tasks import native_dtype
from pocketlm.safety.cda import LISTS, OCCUPATIONS, swap, swap_table
from pocketlm.train.finetune import publish_adapter
from pocketlm.train.loop import train

SST2_SPEC = {"system": "You classify the sentiment of movie reviews.", "instruction": "Is this review positive or negative?",
             "labels": {"0": "negative", "1": "positive"}}  # configs/finetune_sst2.yaml's prompt
_PG_START = re.compile(r"^\*\*\* ?START OF.*$", re.M)
_PG_END = re.compile(r"^\*\*\* ?END OF.*$", re.M)
_WORDS = re.compile(r"[A-Za-z]+")


def shared_data(name: str) -> Path | None:
    """../shared/data/NAME beside the repository (or a folder above it), where the project keeps its data."""
    here = Path(__file__).resolve()
    return next((p / "shared" / "data" / name for p in here.parents if (p / "shared" / "data" / name).exists()), None)


def _body(text: str) -> str:
    """A Project Gutenberg book without its header and license (the whole text if it has no markers)."""
    start, end = _PG_START.search(text), _PG_END.search(text)
    return text[start.end() if start else 0:end.start() if end else len(text)]


def cda_corpus(corpus, tokenizer, seq_len: int, max_pieces: int, lists=tuple(LISTS), heldout_chars: int = 100_000,
               seed: int = 0, focus: str | None = None) -> tuple[list[tuple[list[int], list[int]]], str, dict]:
    """(training rows: (ids, labels) of each piece and of its counterfactual, the held-out text, stats).
    focus="occupations": only passages that name an occupation (cda.OCCUPATIONS) besides a swapped word."""
    if focus not in (None, "occupations"):
        raise InputError(f"--focus: expected occupations, got {focus!r}")
    docs = read_documents(expand_inputs([corpus]))
    table, her = swap_table(lists), "gender" in lists
    pieces, heldout, chars = [], [], 4 * seq_len  # ~4 characters a token in English prose
    for d in docs:
        body = _body(d.text)
        cut = split_at(body, int(len(body) * 0.9))
        heldout.append(body[cut:][:heldout_chars // len(docs)])
        paragraphs = [p for p in re.split(r"\n\s*\n", body[:cut]) if p.strip()]
        piece = ""
        for p in paragraphs:  # consecutive paragraphs joined up to ~seq_len tokens
            piece = f"{piece}\n\n{p}" if piece else p
            if len(piece) >= chars:
                pieces.append(piece[:2 * chars])
                piece = ""
    random.Random(seed).shuffle(pieces)
    rows, swapped_words, used = [], 0, 0
    for piece in pieces:
        if used >= max_pieces:
            break
        counter, n = swap(piece, table, her)
        if n == 0 or focus and not OCCUPATIONS.intersection(w.lower() for w in _WORDS.findall(piece)):
            continue
        used, swapped_words = used + 1, swapped_words + n
        for text in (piece, counter):
            ids = tokenizer.encode(text)[:seq_len + 1]
            rows.append((ids, list(ids)))
    if not rows:
        raise InputError(f"{corpus}: no passage with a word of the {'/'.join(lists)} lists to swap"
                         + (" and an occupation" if focus else ""))
    stats = {"documents": len(docs), "pieces": used, "rows": len(rows), "swapped_words": swapped_words,
             "tokens": sum(len(ids) for ids, _ in rows), "heldout_chars": sum(map(len, heldout))}
    return rows, "\n\n".join(h for h in heldout if h.strip()), stats


def _same_run(saved: dict, want: dict, heldout: Path | None) -> list[str]:
    """What differs between a saved `pocketlm eval` result and the one about to be computed."""
    bad = [f"{k} {saved.get(k)!r} (now {v!r})" for k, v in want.items() if saved.get(k) != v]
    if saved.get("task") == "lm" and heldout is not None:  # the held-out text lives in each run's own folder
        try:
            same = Path(saved["data"]).read_bytes() == heldout.read_bytes()
        except OSError:
            same = False
        if not same:
            bad.append(f"held-out text {saved.get('data')} (not the same as {heldout})")
    return bad


def measure(model, adapter, out_dir: Path, *, bias_data, probe, bias_limit, heldout, sst2, sst2_limit, dtype,
            bias_split: str = "test", reuse: Path | None = None) -> dict:
    """The three figures of a model (and adapter), each `pocketlm eval` result also saved in out_dir.
    reuse: a folder of such results (an earlier run's RUN/before) to take instead of computing them
    again; each must have been measured with the same model, data, limit and dtype."""
    from pocketlm.eval import evaluate

    out_dir.mkdir(parents=True, exist_ok=True)
    want = {"bias": {"task": "bias", "model": str(model), "adapter": None, "data": str(bias_data), "limit": bias_limit,
                     "dtype": dtype, "probe": probe, **({"split": bias_split} if probe == "winobias" else {})},
            "lm": {"task": "lm", "model": str(model), "adapter": None, "dtype": dtype},
            "sst2": {"task": "classification", "model": str(model), "adapter": None, "data": str(sst2),
                     "limit": sst2_limit, "dtype": dtype}}
    runs = {"bias": lambda: evaluate(model, "bias", bias_data, adapter=adapter, probe=probe, limit=bias_limit,
                                     dtype=dtype, split=bias_split),
            "lm": lambda: evaluate(model, "lm", heldout, adapter=adapter, dtype=dtype),
            "sst2": lambda: evaluate(model, "classification", sst2, adapter=adapter, limit=sst2_limit, dtype=dtype,
                                     spec_overrides=SST2_SPEC, methods=("likelihood",))}
    given = {"bias": bias_data, "lm": heldout, "sst2": sst2}
    results = {}
    for name, run in runs.items():
        if given[name] is None:
            continue
        saved = reuse / f"{name}.json" if reuse is not None else None
        if saved is not None and saved.exists():
            results[name] = json.loads(saved.read_text())
            bad = _same_run(results[name], want[name], heldout)
            if bad:
                raise InputError(f"--before {saved}: not measured like this run: {'; '.join(bad)}")
            print(f"{name}: reusing {saved}", flush=True)
        else:
            results[name] = run()
            (out_dir / f"{name}.json").write_text(json.dumps(results[name], indent=2))
    return {**summary(results), **({"pair_scores": results["bias"]["pair_scores"]} if "bias" in results else {})}


def summary(results: dict) -> dict:
    out = {}
    if "bias" in results:
        b = results["bias"]
        fig = b["pairs"]["stereo_preferred_pct"]
        out["stereo_preferred_pct"] = {"value": fig["value"], "ci95": fig["ci95"]}
        for t, block in b.get("resolution", {}).items():
            if isinstance(block, dict) and "gap" in block:
                out[f"resolution_gap_{t}"] = {"value": block["gap"]["value"], "ci95": block["gap"]["ci95"]}
    if "lm" in results:
        out["heldout_bits_per_byte"] = results["lm"]["bits_per_byte"]
    if "sst2" in results:
        out["sst2_accuracy"] = 100 * results["sst2"]["likelihood"]["accuracy"]
    return out


def toward_50(before_scores, after_scores, samples: int = 1000, seed: int = 0) -> dict:
    """How many points the stereotype-preferred share moved toward 50% (|before-50| - |after-50|), with a
    95% paired bootstrap interval: the same resampled pairs scored by both models."""
    b = np.array([m > l for m, l in before_scores], dtype=np.float64) * 100
    a = np.array([m > l for m, l in after_scores], dtype=np.float64) * 100
    moved = lambda idx: np.abs(b[idx].mean(-1) - 50) - np.abs(a[idx].mean(-1) - 50)  # noqa: E731
    idx = np.random.default_rng(seed).integers(0, len(b), size=(samples, len(b)))
    lo, hi = np.quantile(moved(idx), [0.025, 0.975])
    return {"value": float(moved(np.arange(len(b)))), "ci95": [float(lo), float(hi)], "n": len(b),
            "excludes_no_change": bool(lo > 0 or hi < 0)}


def change(before: dict, after: dict) -> dict:
    """How each figure moved: toward 50% (pair preference), the gaps' size, bpb in %, SST-2 in points."""
    out = {}
    if "stereo_preferred_pct" in before:
        out["pair_preference_toward_50_points"] = toward_50(before["pair_scores"], after["pair_scores"])
    for k in before:
        if k.startswith("resolution_gap_") and k in after and before[k]["value"]:
            out[f"{k}_ratio"] = abs(after[k]["value"]) / abs(before[k]["value"])
    if "heldout_bits_per_byte" in before:
        out["heldout_bpb_change_pct"] = 100 * (after["heldout_bits_per_byte"] / before["heldout_bits_per_byte"] - 1)
    if "sst2_accuracy" in before:
        out["sst2_accuracy_change_points"] = after["sst2_accuracy"] - before["sst2_accuracy"]
    return out


def debias(model, out, corpus=None, *, lists=tuple(LISTS), max_minutes: float = 30.0, max_steps: int = 100_000,
           seq_len: int = 256, batch_size: int = 8, lr: float = 5e-4, lora_rank: int = 8, lora_alpha: float = 16.0,
           max_pieces: int = 20_000, heldout_chars: int = 100_000, bias_data=None, probe: str = "winobias", bias_limit: int | None = None,
           bias_split: str = "test",
           sst2=None, sst2_limit: int | None = None, evaluate: bool = True, dtype: str = "bf16", resume: bool = False,
           seed: int = 0, budget_clock: str = "cpu", before=None, focus: str | None = None) -> dict:
    """Train a CDA LoRA for `model` into RUN `out`; returns (and writes to RUN/debias.json) the report.
    Defaults: the shared Gutenberg books, WinoBias and SST-2 dev (where ../shared/data has them).
    budget_clock: what max_minutes counts ("cpu": this process's CPU time, the issue's "30 CPU-minutes"; or "wall").
    bias_split: the WinoBias files to measure on; tune a recipe on "dev" and report it on "test".
    before: an earlier run's RUN/before folder whose figures stand for this run's "before" (tuning runs
    of one model share them); each must match this run's model, data, limits and dtype."""
    out = Path(out)
    corpus = corpus or shared_data("gutenberg_books")
    if corpus is None:
        raise InputError("debias: no --corpus given and no ../shared/data/gutenberg_books found")
    if before is not None and not Path(before).is_dir():
        raise InputError(f"--before {before}: not a folder (expected an earlier debias run's RUN/before)")
    bad = [x for x in lists if x not in LISTS]
    if bad or not lists:
        raise InputError(f"--lists: expected some of {','.join(LISTS)}, got {','.join(lists) or 'nothing'}")
    base, tokenizer = load_model(model)
    rows, heldout_text, stats = cda_corpus(corpus, tokenizer, seq_len, max_pieces, tuple(lists), heldout_chars, seed, focus)
    out.mkdir(parents=True, exist_ok=True)
    heldout = out / "heldout.txt"
    heldout.write_text(heldout_text, encoding="utf-8")
    print(f"cda: {stats['pieces']:,} passages of {corpus} with {stats['swapped_words']:,} words swapped "
          f"({'/'.join(lists)}): {stats['rows']:,} rows, {stats['tokens']:,} tokens; {stats['heldout_chars']:,} "
          "characters held out", flush=True)
    if evaluate:
        bias_data = bias_data or shared_data("winobias")
        sst2 = sst2 or (shared_data("sst2") / "dev.tsv" if shared_data("sst2") else None)
    kw = dict(bias_data=bias_data, probe=probe, bias_limit=bias_limit, bias_split=bias_split, heldout=heldout, sst2=sst2,
              sst2_limit=sst2_limit, dtype=native_dtype(dtype))
    report = {"model": str(model), "corpus": str(corpus), "lists": list(lists), "focus": focus, "data": stats}
    cpu0 = time.process_time()
    if evaluate:
        report["before"] = measure(model, None, out / "before", **kw, reuse=Path(before) if before else None)
        print("before:", json.dumps({k: v for k, v in report["before"].items() if k != "pair_scores"}), flush=True)

    torch.manual_seed(seed)
    add_lora(base, lora_rank, lora_alpha)
    cfg = TrainConfig(batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=min(20, max(1, max_steps // 10)),
                      weight_decay=0.0, min_lr_ratio=0.0, max_steps=max_steps, max_minutes=max_minutes, budget_clock=budget_clock,
                      eval_every=max(1, min(max_steps, 200)), eval_batches=4, log_every=10, dtype=dtype, seed=seed)
    n_val = max(batch_size, len(rows) // 50)
    n_val += n_val % 2  # rows come in (piece, counterfactual) twos: an odd cut would split one across val and train
    val, rows = rows[:n_val], rows[n_val:]  # pieces come shuffled; a piece and its counterfactual stay together
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    t0 = time.process_time()
    result = train(base, tokenizer, cfg, SFTBatches(rows, batch_size, pad_id, seed=seed), SFTEvalBatches(val, batch_size, pad_id),
                   out, resume=resume, save_weights=lambda p, m: save_adapter(m, p, base_model=str(model)),
                   load_weights=lambda p, m: load_adapter_weights(m, p),
                   run_config={"verb": "debias", "base_model": str(model), "corpus": str(corpus), "lists": list(lists),
                               "focus": focus,
                               "train": dataclasses.asdict(cfg), "lora_rank": lora_rank, "lora_alpha": lora_alpha})
    adapter = publish_adapter(out, names=(ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    report["training"] = {**{k: result.get(k) for k in ("step", "tokens", "elapsed_s", "stop_reason", "val_loss")},
                          "cpu_minutes": round((time.process_time() - t0) / 60, 1)}
    if evaluate:
        report["after"] = measure(model, adapter, adapter / "eval", **kw)
        report["change"] = change(report["before"], report["after"])
        print("after:", json.dumps({k: v for k, v in report["after"].items() if k != "pair_scores"}), flush=True)
    report["adapter"] = str(adapter)
    report["cpu_minutes"] = round((time.process_time() - cpu0) / 60, 1)
    (out / "debias.json").write_text(json.dumps(report, indent=2))
    (out / "results.json").write_text(json.dumps(result, indent=2))
    from pocketlm.eval.card import card

    card(adapter, datasets=[Path(corpus).name], model_name=f"{out.name} (CDA debiasing LoRA)")
    return report
