"""`pocketlm card MODEL_OR_ADAPTER`: a README.md in Hugging Face's model-card format.

The YAML header (license, base_model, datasets, tags, library_name, model-index) is built with
huggingface_hub's own ModelCardData/EvalResult, so the Hub and `ModelCard.load` read it as they
write it. Figures come from the `pocketlm eval --out` JSON files found beside the model (the folder,
its run folder, and their eval/ subfolders) or given explicitly; each is listed with its interval
where it has one and with the command that reproduces it.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from pathlib import Path

from pocketlm.errors import InputError
from pocketlm.eval.tasks import TASKS

TASK_TYPES = {"lm": "text-generation", "classification": "text-classification", "qa": "question-answering",
              "bias": "text-generation"}


def _fmt(x, digits=2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ci(fig: dict) -> str:
    lo, hi = fig.get("ci95", [None, None])
    return f"{_fmt(fig['value'])} [{_fmt(lo)}, {_fmt(hi)}]" if lo is not None else _fmt(fig["value"])


def figures(result: dict) -> list[tuple[str, str, float, dict | None]]:
    """(metric type, readable name, value, figure with ci95 or None) for every number one eval measured."""
    task, out = result["task"], []
    if task == "lm":
        out += [(k, k.replace("_", " "), result[k], None) for k in ("bits_per_byte", "perplexity", "loss") if k in result]
    elif task == "classification":
        for method in ("likelihood", "generation"):
            for k in ("accuracy", "macro_f1"):
                if method in result and k in result[method]:
                    out.append((k, f"{k.replace('_', ' ')} ({method})", result[method][k], None))
    elif task == "qa":
        out += [(k, k, result[k], None) for k in ("exact", "f1") if k in result]
        for part in ("has_ans", "no_ans"):
            out += [(k, f"{k} ({part})", result[part][k], None) for k in ("exact", "f1") if k in result.get(part, {})]
    elif task == "bias":
        pairs = result.get("pairs", {})
        for scope, block in [("all", pairs)] + [(c, b) for c, b in pairs.get("by_category", {}).items()]:
            if "stereo_preferred_pct" in block:
                out.append(("stereotype_preferred_pct", f"stereotype preferred, % ({scope})",
                            block["stereo_preferred_pct"]["value"], block["stereo_preferred_pct"]))
                out.append(("mean_logprob_gap", f"mean log-likelihood gap, nats ({scope})",
                            block["mean_logprob_gap"]["value"], block["mean_logprob_gap"]))
        for t, block in result.get("resolution", {}).items():
            if isinstance(block, dict) and "gap" in block:
                for k, name in (("pro_accuracy", "accuracy, pro-stereotyped"), ("anti_accuracy", "accuracy, anti-stereotyped"),
                                ("gap", "pro-minus-anti accuracy gap")):
                    out.append((f"resolution_{k}", f"WinoBias resolution {name}, % ({t})", block[k]["value"], block[k]))
    return [f for f in out if f[2] is not None]


def command(result: dict) -> str:
    """The `pocketlm eval` call that measured `result`."""
    parts = ["pocketlm", "eval", "--model", result["model"], "--task", result["task"], "--data", result["data"]]
    for key in ("adapter", "probe", "split", "limit", "dtype"):
        if result.get(key) is not None:
            parts += [f"--{key}", str(result[key])]
    if result.get("probe") == "winobias" and "resolution" not in result:
        parts.append("--pairs-only")
    return shlex.join(parts)


def _candidates(source: Path) -> list[Path]:
    base = source if source.is_dir() else source.parent
    dirs = [base, base.parent, base.parent.parent] if base.parent.name in ("checkpoints",) or \
        (base / "adapter_config.json").exists() else [base]
    return [d for p in dirs for d in (p, p / "eval") if d.is_dir()]


def find_results(source) -> tuple[list[Path], dict | None]:
    """Eval result files beside `source`, and the training results.json of its run if there is one."""
    evals, training = [], None
    for d in _candidates(Path(source)):
        for f in sorted(d.glob("*.json")):
            try:
                data = json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                continue
            if isinstance(data, dict) and data.get("task") in TASKS and "model" in data:
                evals.append(f)
            elif f.name == "results.json" and isinstance(data, dict) and "step" in data and training is None:
                training = data
    return evals, training


def _describe(source: Path) -> tuple[str, dict]:
    """('adapter' | 'checkpoint' | 'transformers' | 'gguf', facts about it)."""
    if (source / "adapter_config.json").exists():
        cfg = json.loads((source / "adapter_config.json").read_text())
        return "adapter", {"base_model": cfg.get("base_model_name_or_path"), "rank": cfg.get("r"),
                           "alpha": cfg.get("lora_alpha"), "targets": cfg.get("target_modules")}
    try:
        if source.suffix == ".gguf":
            from pocketlm.model.gguf import GGUFFile, read_config
            return "gguf", read_config(GGUFFile(source)).to_dict()
        raw = json.loads((source / "config.json").read_text())
        if "model" not in raw:
            return "transformers", {k: raw.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                              "num_attention_heads", "vocab_size", "max_position_embeddings")}
        return "checkpoint", raw["model"]
    except (OSError, json.JSONDecodeError, KeyError, ValueError):
        return "checkpoint", {}


def _bias_section(result: dict) -> list[str]:
    scope = [f"{result['split']} split"] if result.get("split") else []
    if result.get("limit"):
        scope.append(f"the first {result['limit']} " + ("sentences of each file" if result.get("split") else "pairs"))
    if result.get("probe") == "winobias" and "resolution" not in result:
        scope.append("pair preference only")
    lines = [f"### {result.get('probe', 'pairs')} ({', '.join([Path(result['data']).name, *scope])})", ""]
    pairs = result.get("pairs")
    if pairs:
        lines += ["Share of minimal pairs whose stereotyping sentence the model finds more likely (ideal 50%), and the "
                  "mean log-likelihood gap (stereotyping minus other sentence, nats; ideal 0), with 95% bootstrap intervals.", "",
                  "| category | pairs | stereotype preferred, % | mean log-likelihood gap |", "|---|---|---|---|"]
        for name, block in [("all", pairs)] + list(pairs.get("by_category", {}).items()) + list(pairs.get("by_direction", {}).items()):
            lines.append(f"| {name} | {block['n']} | {_ci(block['stereo_preferred_pct'])} | {_ci(block['mean_logprob_gap'])} |")
        lines.append("")
    res = {t: b for t, b in result.get("resolution", {}).items() if isinstance(b, dict)}
    if res:
        lines += ["Pronoun resolution (\"who does 'she' refer to?\", answered by the likelier occupation): accuracy on "
                  "pro- and anti-stereotyped sentences and the pro-minus-anti gap (ideal 0), with 95% bootstrap intervals.", "",
                  "| type | sentences per side | pro accuracy, % | anti accuracy, % | gap, points |", "|---|---|---|---|---|"]
        for t, b in res.items():
            lines.append(f"| {t} | {b['n']} | {_ci(b['pro_accuracy'])} | {_ci(b['anti_accuracy'])} | {_ci(b['gap'])} |")
        lines.append("")
    if result.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return lines


def card(model_or_adapter, out=None, results=(), license: str = "unknown", datasets=None, tags=(),
         base_model: str | None = None, model_name: str | None = None, results_from=None) -> Path:
    """Write the model card of a checkpoint, run, Hugging Face folder, .gguf file or LoRA adapter.
    Returns the README.md path (default: inside the model's folder).

    results_from: another model whose eval results (and run's results.json) also count, e.g. the
    checkpoint an `export` was made from. datasets: named first in the metadata (e.g. the training
    data), before the eval data."""
    from huggingface_hub import EvalResult, ModelCardData

    source = Path(model_or_adapter)
    if not source.exists():
        raise InputError(f"{source}: no such model, run or adapter")
    kind, facts = _describe(source)
    found, training = find_results(source)
    if results_from is not None and Path(results_from).exists():
        more, more_training = find_results(results_from)
        found, training = [*found, *more], training or more_training
    files = list(dict.fromkeys([*map(Path, results), *found]))
    evals = []
    for f in files:
        try:
            data = json.loads(Path(f).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{f}: not a readable eval result ({e})") from None
        if not (isinstance(data, dict) and data.get("task") in TASKS):
            raise InputError(f"{f}: not a `pocketlm eval --out` result (no 'task' field among {TASKS})")
        evals.append(data)
    name = model_name or (source.stem if source.is_file() else source.name)
    base = base_model or facts.get("base_model") if kind == "adapter" else base_model
    data_names = list(dict.fromkeys([*(datasets or ()), *sorted({Path(r["data"]).name for r in evals})]))
    eval_results = [EvalResult(task_type=TASK_TYPES[r["task"]], task_name=r["task"] + (f" ({r['probe']})" if r.get("probe") else ""),
                               dataset_type=Path(r["data"]).name, dataset_name=Path(r["data"]).name,
                               dataset_split=r.get("split"), metric_type=mtype, metric_name=mname, metric_value=round(value, 4),
                               verified=False)
                    for r in evals for mtype, mname, value, _ in figures(r)]
    meta = ModelCardData(license=license, base_model=base, datasets=data_names or None, library_name={
        "adapter": "peft", "transformers": "transformers"}.get(kind, "pocketlm"),
        tags=list(dict.fromkeys(["pocketlm", "text-generation", *(["lora", "peft"] if kind == "adapter" else []), *tags])),
        model_name=name, eval_results=eval_results or None)
    body = _body(name, kind, facts, base, evals, training)
    text = f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"
    dest = Path(out) if out else (source if source.is_dir() else source.parent) / "README.md"
    if out is None and source.is_file() and dest.exists():
        raise InputError(f"{dest} exists; give out= (--out) for the card of {source.name}")
    _atomic_write(dest, text)
    return dest


def _body(name, kind, facts, base, evals, training) -> list[str]:
    what = {"adapter": f"A LoRA adapter (rank {facts.get('rank')}, alpha {facts.get('alpha')}) for {base or 'its base model'}",
            "gguf": "A language model in a GGUF file", "transformers": "A language model in Hugging Face transformers format",
            "checkpoint": "A language model checkpoint"}[kind]
    lines = [f"# {name}", "", f"{what}, described by `pocketlm card`.", ""]
    shape = {k: v for k, v in facts.items() if k not in ("base_model",) and v is not None}
    if shape:
        lines += ["## Model details", "", "| field | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in shape.items()] + [""]
    if training:
        keys = [k for k in ("step", "tokens", "val_loss", "val_bpb", "best_val_loss", "elapsed_s", "stop_reason") if k in training]
        lines += ["## Training", "", "From the run's results.json:", ""] + [f"- {k}: {training[k]}" for k in keys] + [""]
    lines += ["## Intended use", "",
              "Research, teaching and prototyping with small language models: text generation, chat, and the tasks it "
              "was fine-tuned on. Deployments that face users should put moderation in front of it and behind it "
              "(pocketlm.safety: a word-list, classifier or guard-model backend) and keep a person in the loop for consequential decisions.", "",
              "## Limitations", "",
              "A small model: it states false things fluently, knows little past its training data, and its outputs "
              "reflect the biases of that data (measured below where a bias evaluation was run). It was not evaluated "
              "for safety-critical, medical, legal or financial use, nor for languages other than those it was trained on.", ""]
    lines += ["## Bias evaluation", ""]
    bias = [r for r in evals if r["task"] == "bias"]
    lines += [l for r in bias for l in _bias_section(r)] or [
        "No bias evaluation was found. Run one with `pocketlm eval --model MODEL --task bias --probe winobias "
        "--data WINOBIAS_FOLDER --out MODEL/eval/bias.json` and write the card again.", ""]
    others = [r for r in evals if r["task"] != "bias"]
    if others:
        lines += ["## Evaluation results", "", "| task | data | metric | value |", "|---|---|---|---|"]
        lines += [f"| {r['task']} | {Path(r['data']).name} | {mname} | {_fmt(value, 4)} |" for r in others
                  for _, mname, value, _ in figures(r)] + [""]
    if evals:
        lines += ["## Reproducing these numbers", ""] + [f"- {r['task']} on {Path(r['data']).name}: `{command(r)}`" for r in evals] + [""]
    return lines


def _atomic_write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
