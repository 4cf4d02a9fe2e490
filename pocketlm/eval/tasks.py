"""`pocketlm eval`: language modelling (bits per byte, perplexity), classification and extractive QA.

Classification is scored two ways: by likelihood (the label whose reply, end-of-turn token included,
the model finds most probable) and by generation (greedy reply matched against the label words).
QA is generation only: the reply is compared with the gold answers; replying the task's no-answer
phrase counts as saying "no answer".
"""

from __future__ import annotations

import contextlib
import string
from pathlib import Path

import torch
from tqdm import tqdm

from pocketlm.data.sft import TaskSpec, encode_example, load_examples
from pocketlm.data.sft_batches import pad_batch
from pocketlm.eval.metrics import classification_report, normalize_answer, qa_report
from pocketlm.errors import InputError

TASKS = ("lm", "classification", "qa", "bias")


def autocast(dtype: str):
    if dtype == "bf16":
        return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def native_dtype(dtype: str) -> str:
    """bf16 where the machine computes it natively, else fp32: on an AVX2-only CPU aten emulates bf16,
    ~20x slower (pocketlm.train.loop.cpu_lacks_bf16)."""
    if dtype != "bf16" or torch.cuda.is_available():
        return dtype
    from pocketlm.train.loop import cpu_lacks_bf16

    return "fp32" if cpu_lacks_bf16(torch.device("cpu")) else dtype


def _device(model):
    return next(model.parameters()).device


# ---- building blocks ----------------------------------------------------------------------------

@torch.no_grad()
def sequence_logprobs(model, rows, pad_id: int) -> list[float]:
    """Sum of log p(token) over each row's scored tokens (labels != -100), for (ids, labels) rows."""
    x, y = pad_batch(rows, pad_id)
    x, y = x.to(_device(model)), y.to(_device(model))
    logits, _ = model(x, y)  # the head runs only on the scored positions: (n_scored, V)
    scored = y != -100
    if logits.dim() == 3:  # every position scored (no padding, no prompt): the head ran on all of them
        logits = logits[scored]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, y[scored].unsqueeze(-1)).squeeze(-1)
    row = scored.nonzero()[:, 0]
    return torch.zeros(len(rows), device=logp.device).index_add_(0, row, logp).tolist()


def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8,
                    progress=None, dtype: str = "fp32") -> list[list[int]]:
    """Greedy replies (token ids, the end-of-turn token left off) to token prompts of different
    lengths, through the serving engine: the one decode loop, continuous batching over batch_size
    rows, the same numbers `pocketlm serve --dtype` gives. dtype: the engine's precision."""
    from pocketlm.infer.engine import Engine
    from pocketlm.infer.sampling import SamplingParams

    if not prompts:
        return []
    longest = max(map(len, prompts)) + max_new_tokens
    precision = dtype if dtype in ("fp32", "bf16") else "fp32"
    engine = Engine(model, tokenizer, max_batch=min(batch_size, len(prompts)), precision=precision,
                    max_seq_len=min(longest + 1, model.cfg.block_size))
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0)
    done = (lambda e: e.finish_reason and progress.update(1)) if progress is not None else None
    reqs = [engine.submit(p, params, done) for p in prompts]
    while engine.step():
        pass
    stops = set(tokenizer.stop_ids)
    for r in reqs:
        if r.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"generation failed: {r.error or r.finish_reason}")
    return [r.output_ids[:-1] if r.output_ids and r.output_ids[-1] in stops else r.output_ids for r in reqs]


def prompt_ids(tokenizer, messages) -> list[int]:
    """The conversation without its last (assistant) message, ending in the generation prompt."""
    return tokenizer.encode_chat(messages[:-1])  # contents as text, as the server and fine-tuning encode them


# ---- tasks --------------------------------------------------------------------------------------

def eval_lm(model, tokenizer, path, limit: int | None = None, seq_len: int = 1024, batch_size: int = 4,
            dtype: str = "bf16") -> dict:
    """Next-token loss over a text file (.txt/.md/.jsonl), in windows of seq_len tokens: each document
    starts with the BOS token, every later token is a target once."""
    from pocketlm.data.corpus import read_documents
    from pocketlm.train.metrics import evaluate_lm

    docs = read_documents([path])
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    stream = [t for d in docs for t in bos + tokenizer.encode(d.text)]
    seq_len = min(seq_len, model.cfg.block_size)
    n_windows = max(0, (len(stream) - 1) // seq_len)
    if n_windows == 0:  # a short text: one window of what there is
        if len(stream) < 2:
            raise InputError(f"{path}: fewer than 2 tokens of text")
        n_windows, seq_len = 1, len(stream) - 1
    if limit:
        n_windows = min(n_windows, limit)
    windows = torch.tensor(stream[:n_windows * seq_len + 1])

    def batches(max_batches=None):
        for i in tqdm(range(0, n_windows, batch_size), desc="eval lm", unit="batch", leave=False):
            rows = [windows[w * seq_len:(w + 1) * seq_len + 1] for w in range(i, min(i + batch_size, n_windows))]
            t = torch.stack(rows)
            yield t[:, :-1], t[:, 1:]

    lengths = torch.tensor(tokenizer.token_byte_lengths(), device=_device(model))
    r = evaluate_lm(model, batches, lengths, autocast(dtype))
    model.eval()
    return {"loss": r["val_loss"], "perplexity": r["val_ppl"], "bits_per_byte": r["val_bpb"],
            "tokens": r["val_tokens"], "windows": n_windows, "seq_len": seq_len}


def _match_label(text: str, names: list[str]) -> str | None:
    t = text.strip().strip(string.punctuation + " ").lower()
    for name in names:
        if t == name.lower():
            return name
    starts = [n for n in names if t.startswith(n.lower())]
    if starts:
        return max(starts, key=len)
    # a sentence ("The sentiment of this review is positive."): the one label word it contains
    words = set(t.translate(str.maketrans(string.punctuation, " " * len(string.punctuation))).split())
    found = [n for n in names if n.lower() in words]
    return found[0] if len(found) == 1 else None


def eval_classification(model, tokenizer, spec: TaskSpec, examples, batch_size: int = 8, dtype: str = "bf16",
                        methods=("likelihood", "generation")) -> dict:
    names = spec.label_names()
    gold = [spec.labels[ex.label] for ex in examples]
    pad = tokenizer.eos_id or 0
    result = {"labels": names}
    with autocast(dtype):
        if "likelihood" in methods:
            preds = []
            for i in tqdm(range(0, len(examples), batch_size), desc="eval classification (likelihood)", unit="batch"):
                chunk = examples[i:i + batch_size]
                rows = []
                for ex in chunk:
                    for name in names:
                        ids, scored = encode_example(tokenizer, ex.messages[:-1] + [{"role": "assistant", "content": name}])
                        rows.append((ids, [t if s else -100 for t, s in zip(ids, scored)]))
                scores = sequence_logprobs(model, rows, pad)
                for j in range(len(chunk)):
                    s = scores[j * len(names):(j + 1) * len(names)]
                    preds.append(names[max(range(len(names)), key=s.__getitem__)])
            result["likelihood"] = classification_report(gold, preds, names)
        if "generation" in methods:
            # room for a short sentence around the label: a model that was not fine-tuned rarely says one word
            longest = max(max(len(tokenizer.encode(n)) for n in names), 10)
            prompts = [prompt_ids(tokenizer, ex.messages) for ex in examples]
            with tqdm(total=len(prompts), desc="eval classification (generation)", unit="ex") as bar:
                replies = greedy_generate(model, tokenizer, prompts, longest + 2, batch_size, bar, dtype)
            preds = [_match_label(tokenizer.decode(r, skip_special_tokens=True), names) for r in replies]
            result["generation"] = classification_report(gold, preds, names)
    return result


def eval_qa(model, tokenizer, spec: TaskSpec, examples, batch_size: int = 8, dtype: str = "bf16",
            max_new_tokens: int = 32, keep_predictions: int = 20) -> dict:
    prompts = [prompt_ids(tokenizer, ex.messages) for ex in examples]
    with autocast(dtype), tqdm(total=len(prompts), desc="eval qa", unit="ex") as bar:
        replies = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, bar, dtype)
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in replies]
    no_answer = normalize_answer(spec.no_answer)
    preds = ["" if normalize_answer(t) == no_answer else t for t in texts]
    report = qa_report([ex.answers for ex in examples], preds)
    report["examples"] = [{"question": ex.messages[-2]["content"].rsplit("Question: ", 1)[-1], "gold": ex.answers,
                           "prediction": t} for ex, t in list(zip(examples, texts))[:keep_predictions]]
    return report


def find_task_spec(*places) -> TaskSpec | None:
    """task.json saved by `pocketlm finetune` beside an adapter or a fine-tuned model."""
    for place in places:
        if place is None:
            continue
        p = Path(place)
        for candidate in (p / "task.json", p.parent / "task.json", p.parent.parent / "task.json"):
            if p.is_dir() and candidate.exists():
                return TaskSpec.from_file(candidate)
    return None


def evaluate(model_source, task: str, data, adapter=None, limit: int | None = None, spec_overrides: dict | None = None,
             batch_size: int = 8, seq_len: int = 1024, dtype: str = "bf16", methods=("likelihood", "generation"),
             probe: str = "winobias", split: str = "test", resolution: bool = True) -> dict:
    from pocketlm.model.lora import load_model_with_adapter

    if task not in TASKS:
        raise InputError(f"--task: expected one of {TASKS}, got {task!r}")
    model, tokenizer = load_model_with_adapter(model_source, adapter)
    if tokenizer is None:
        raise InputError(f"{model_source}: has no tokenizer")
    model.eval()
    result = {"task": task, "model": str(model_source), "adapter": str(adapter) if adapter else None, "data": str(data),
              "limit": limit, "dtype": dtype}  # with the above, what `pocketlm card` needs to print the command
    if native_dtype(dtype) != dtype:  # bf16 emulated on this CPU (no AVX512-BF16 or AMX), ~20x slower
        dtype = result["computed_dtype"] = native_dtype(dtype)
    if task == "lm":
        # whole-vocabulary logits of long windows are large: few windows per batch
        return {**result, **eval_lm(model, tokenizer, data, limit, seq_len, min(batch_size, 2), dtype)}
    if task == "bias":  # pocketlm/eval/bias.py: stereotype preference and WinoBias resolution
        from pocketlm.eval.bias import eval_bias
        return {**result, **eval_bias(model, tokenizer, data, probe, limit, batch_size, dtype, split,
                                                      resolution=resolution)}
    spec = find_task_spec(adapter, model_source)
    if spec is not None and spec.format != task:
        spec = None  # a model fine-tuned on another task: start from this file's defaults
    spec = spec or TaskSpec(format=task)
    for k, v in (spec_overrides or {}).items():
        if v is not None and v != {}:
            setattr(spec, k, v)
    examples, spec = load_examples(data, spec, limit=limit)
    result["task_spec"] = {"instruction": spec.instruction, "system": spec.system,
                           **({"labels": spec.labels} if task == "classification" else {"no_answer": spec.no_answer})}
    if task == "classification":
        return {**result, **eval_classification(model, tokenizer, spec, examples, batch_size, dtype, methods)}
    return {**result, **eval_qa(model, tokenizer, spec, examples, batch_size, dtype)}
