"""A thin adapter that gives today's Engine per-request logits processors (the engine contract's
`submit(..., processors=[...])`), until the engine branch that builds them in has landed; then this
file goes and `analyze` passes processors to Engine.submit directly.

Every row of a constrained request samples through its processors (the greedy fast path, which
takes the argmax of the whole batch at once, is skipped for those rows); a processor that is done
ends its request with "stop". Forced tokens are not yet fed as one extend: the mask leaves them as
the only choice, so they cost one decode step each, which is correct but slower."""

from __future__ import annotations

import torch

from pocketlm.infer.engine import Engine
from pocketlm.infer.sampling import sample_token


class ProcessorEngine(Engine):
    def submit(self, prompt_ids, params, on_event=None, *, processors=()):
        req = super().submit(prompt_ids, params, on_event)  # no thread runs: nothing steps before we return
        req._processors = list(processors)
        if req._processors:
            # a `seen` mask routes the row through _sample (penalty 1.0 leaves the logits as they are)
            req._seen = torch.zeros(self.model.cfg.vocab_size, dtype=torch.bool)
        return req

    def _sample(self, req, logits):
        for p in getattr(req, "_processors", ()):
            logits = p.process(logits)
        return sample_token(logits, req.params, req._generator, req._seen)

    def _accept(self, req, token):
        procs = getattr(req, "_processors", ())
        for p in procs:
            p.accept(token)
        super()._accept(req, token)
        if procs and not req.finished and all(p.is_done() for p in procs):
            req.text += req._decoder.flush()
            self._finish(req, "stop")
