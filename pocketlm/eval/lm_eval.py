"""pocketlm as an lm-evaluation-harness model: any lm-eval task runs on any model pocketlm loads.

    python -m pocketlm.eval.lm_eval --model pocketlm --model_args path=RUN,adapter=DIR --tasks TASK
    (or, in Python: import pocketlm.eval.lm_eval, then lm_eval.simple_evaluate(model="pocketlm", ...))

lm-eval finds models only in its own registry (it has no plugin entry point), so importing this
module registers "pocketlm"; `python -m pocketlm.eval.lm_eval` is lm-eval's own CLI with it registered.
Scoring goes through the same forward as `pocketlm eval`; generation is greedy (tasks.greedy_generate).
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from pocketlm.data.sft_batches import pad_batch
from pocketlm.errors import InputError


@register_model("pocketlm")
class PocketLM(LM):
    def __init__(self, path=None, adapter=None, batch_size=8, max_length=None, dtype: str = "fp32",
                 device: str | None = "cpu", model=None, tokenizer=None, **_ignored):
        super().__init__()
        if str(device or "cpu").startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval passes its default device, cuda, even on machines without one
        device = device or "cpu"
        if model is None:
            if path is None:
                raise InputError("pocketlm lm-eval model: give model_args path=MODEL (run, checkpoint, HF folder or .gguf)")
            from pocketlm.model.lora import load_model_with_adapter
            model, tokenizer = load_model_with_adapter(path, adapter, device=device)
        if tokenizer is None:
            raise InputError(f"{path}: has no tokenizer")
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # lm-eval may pass "auto"
        self.max_length = int(max_length or model.cfg.block_size)
        self.dtype, self.path = dtype, str(path)
        self._device = torch.device(device)
        # the token every text is conditioned on (BOS, or end-of-text for models without one, as lm-eval does)
        self.prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id

    # ---- scoring ---------------------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Spaces at the end of the context belong to the continuation (BPE attaches them to the next word)."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context) if context else []
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else self.tok.encode(continuation)
        return ([self.prefix] if self.prefix is not None else []) + ctx, cont

    @torch.no_grad()
    def _score(self, rows) -> list[tuple[float, bool]]:
        """(sum of log p over the scored tokens, whether each scored token is the argmax) per row."""
        from pocketlm.eval.tasks import autocast

        out = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        pad = self.tok.eos_id or 0
        for i in tqdm(range(0, len(order), self.batch_size), desc="lm-eval score", unit="batch", leave=False):
            chunk = order[i:i + self.batch_size]
            x, y = pad_batch([rows[j] for j in chunk], pad)
            x, y = x.to(self._device), y.to(self._device)
            with autocast(self.dtype):
                logits, _ = self.model(x, y)
            scored = y != -100
            if logits.dim() == 3:  # every position scored: the head ran on all of them
                logits = logits[scored]
            logp = torch.log_softmax(logits.float(), -1)
            target = y[scored]
            tok_lp = logp.gather(-1, target[:, None])[:, 0]
            hit = (logp.argmax(-1) == target).float()
            row = scored.nonzero()[:, 0]
            sums = torch.zeros(len(chunk)).index_add_(0, row.cpu(), tok_lp.cpu())
            misses = torch.zeros(len(chunk)).index_add_(0, row.cpu(), 1 - hit.cpu())
            for k, j in enumerate(chunk):
                out[j] = (float(sums[k]), bool(misses[k] == 0))
        return out

    def _row(self, context: list[int], continuation: list[int]):
        ids = (context + continuation)[-(self.max_length + 1):]  # keep the continuation, cut context from the left
        n = min(len(continuation), len(ids) - 1)
        return ids, [-100] * (len(ids) - n) + ids[len(ids) - n:]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows = []
        for req in requests:
            context, continuation = req.args
            rows.append(self._row(*self._encode_pair(context, continuation)))
        return self._score(rows)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in disjoint windows of at most max_length predicted tokens, each
        with as much context as fits (lm-eval's own window helpers)."""
        rows, owner = [], []
        for k, req in enumerate(requests):
            tokens = self.tok.encode(req.args[0])
            for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, self.prefix if self.prefix is not None else tokens[0], self.max_length, context_len=1)):
                rows.append((ctx + pred, [-100] * len(ctx) + pred))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (lp, _) in zip(owner, self._score(rows)):
            totals[k] += lp
        return totals

    # ---- generation ------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from pocketlm.eval.tasks import greedy_generate

        jobs = {}  # requests with the same length limit decode as one batch
        for k, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0) or 0) > 0:
                raise InputError("pocketlm lm-eval model: generation is greedy only (do_sample=false, temperature=0)")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            ids = self.tok.encode(context)
            ids = ([self.prefix] if self.prefix is not None and not ids else []) + ids
            jobs.setdefault(max_new, []).append((k, ids[-max(1, self.max_length - max_new):], until))
        out = [""] * len(requests)
        for max_new, items in jobs.items():
            replies = greedy_generate(self.model, self.tok, [ids for _, ids, _ in items], max_new,
                                      batch_size=self.batch_size, dtype=self.dtype)
            for (k, _, until), reply in zip(items, replies):
                text = self.tok.decode(reply, skip_special_tokens=True)
                for stop in until:  # lm-eval's stop sequences: cut at the first one
                    if stop and stop in text:
                        text = text[:text.index(stop)]
                out[k] = text
        return out

    # ---- chat templates (lm-eval --apply_chat_template) --------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return f"pocketlm-{self.tok.fingerprint()}"

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        return self.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)


def main():
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
