"""The engine's extension points, through its public API (ARCHITECTURE.md's engine contract):
processors, output filters, prompts as embeddings, extends of a running row, shared-prefix copies and
per-row adapters. Each test compares against an independent computation and fails without the feature."""

import pytest
import torch
from reference import generate
from tiny_lm import reference_greedy, tiny_adapter, tiny_lm

from pocketlm.infer.batch import KVStore
from pocketlm.infer import engine as engine_module
from pocketlm.infer.engine import Engine
from pocketlm.infer.fused import inference_copy
from pocketlm.infer.processors import BanTokens, Processor
from pocketlm.infer.sampling import SamplingParams
from pocketlm.infer.textstream import OutputFilter

PROMPT = "First Citizen:\nBefore we proceed"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny matmuls run faster on one thread


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0, **kw)


class Ban(Processor):
    def __init__(self, token):
        self.token, self.accepted = token, []

    def process(self, logits):
        logits = logits.clone()
        logits[self.token] = -float("inf")
        return logits

    def accept(self, token):
        self.accepted.append(token)


def test_a_processor_bans_a_token(lm):
    model, tok = lm
    ids = tok.encode(PROMPT)
    ref = reference_greedy(model, ids, 30)
    banned = max(set(ref), key=ref.count)  # the reply's most frequent token
    engine = Engine(model, tok, max_batch=2)
    ban = Ban(banned)
    req = engine.submit(ids, greedy(30), processors=[ban])
    sampled = engine.submit(ids, SamplingParams(max_tokens=30, temperature=1.5, seed=0), processors=[BanTokens([banned])])
    while engine.step():
        pass
    assert banned in ref and banned not in req.output_ids and banned not in sampled.output_ids
    assert ban.accepted == req.output_ids
    assert req.output_ids[:ref.index(banned)] == ref[:ref.index(banned)]  # the same until the ban bites


class Redact(OutputFilter):
    def __init__(self, word, finish=None):
        self.word, self.finish = word, finish
        self.holdback = len(word) - 1  # the end of the text might be the word's start

    def __call__(self, text):
        if self.finish and self.word in text:
            return text[:text.index(self.word)], self.finish
        return text.replace(self.word, "[redacted]"), None


def _word_in_reply(model, tok, ids, n):
    full = tok.decode(reference_greedy(model, ids, n))
    word = next(w for w in full[len(full) // 3:].split() if len(w) >= 3 and w.isalpha())
    return full, word


def test_an_output_filter_redacts_a_word_mid_stream(lm):
    model, tok = lm
    ids = tok.encode(PROMPT)
    full, word = _word_in_reply(model, tok, ids, 40)
    events = list(Engine(model, tok).stream(ids, greedy(40), output_filters=[Redact(word)]))
    deltas = [e.text for e in events]
    streamed = "".join(deltas)
    assert word in full and word not in streamed
    assert streamed == events[-1].request.text == full.replace(word, "[redacted]")
    assert events[-1].finish_reason == "length" and sum(bool(d) for d in deltas) > 3  # streamed in pieces


def test_an_output_filter_ends_the_request_with_content_filter(lm):
    model, tok = lm
    ids = tok.encode(PROMPT)
    full, word = _word_in_reply(model, tok, ids, 40)
    events = list(Engine(model, tok).stream(ids, greedy(40), output_filters=[Redact(word, "content_filter")]))
    req = events[-1].request
    assert req.finish_reason == events[-1].finish_reason == "content_filter"
    assert "".join(e.text for e in events) == req.text == full[:full.index(word)]
    assert len(req.output_ids) < 40


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_prompt_given_as_embeddings(arch):
    model, tok = tiny_lm(arch)
    ids = tok.encode(PROMPT)
    want = reference_greedy(model, ids, 20)
    embeds = model.embed_tokens.weight[ids].detach()
    engine = Engine(model, tok, max_batch=2)
    whole = engine.submit(None, greedy(20), input_embeds=embeds)
    holes = [-1 if i % 3 == 1 else t for i, t in enumerate(ids)]  # some positions as ids, some as embeddings
    mixed = engine.submit(holes, greedy(20), input_embeds=embeds[[i for i, t in enumerate(holes) if t < 0]])
    while engine.step():
        pass
    assert whole.output_ids == want and mixed.output_ids == want
    other = tok.encode("ROMEO:\nWhat say you")  # another prompt's embeddings give that prompt's reply
    got = Engine(model, tok).generate(None, greedy(20), input_embeds=model.embed_tokens.weight[other].detach())
    assert got.output_ids == reference_greedy(model, other, 20)
    with pytest.raises(ValueError, match="input_embeds"):
        engine.submit(holes, greedy(5), input_embeds=embeds)


def test_requests_with_embeddings_are_told_apart_by_identity():
    """A Request compared by value compares its input_embeds tensors, which raises (found by image
    requests decoding together): cancelling one queued behind another must free only that one."""
    model, tok = tiny_lm("llama")
    embeds = model.embed_tokens.weight[tok.encode(PROMPT)].detach()
    engine = Engine(model, tok, max_batch=1)
    running, queued, cancelled = (engine.submit(None, greedy(4), input_embeds=embeds.clone()) for _ in range(3))
    engine.cancel(cancelled)
    while engine.step():
        pass
    assert (running.finish_reason, queued.finish_reason, cancelled.finish_reason) == ("length", "length", "cancelled")
    assert running.output_ids == queued.output_ids == reference_greedy(model, tok.encode(PROMPT), 4)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_an_extend_of_a_running_row_equals_a_prefill_of_the_whole(lm, precision):
    model, _ = lm
    copy = inference_copy(model, precision)
    seq = torch.randint(0, model.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    other = torch.randint(0, model.cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = KVStore(model.cfg, 1, 32, dtype=copy.embed_tokens.weight.dtype)
        want = copy(seq, batch=whole.step(0, 1, seq, last_only=False))
        store = KVStore(model.cfg, 2, 32, dtype=copy.embed_tokens.weight.dtype)
        copy(other, batch=store.step(0, 1, other))            # another row is running beside it
        copy(seq[:, :5], batch=store.step(1, 2, seq[:, :5]))  # prefill 5
        step = torch.cat([other[:, :1], seq[:, 5:6]])
        copy(step, batch=store.step(0, 2, step))              # one decode step of both rows
        got = copy(seq[:, 6:], batch=store.step(1, 2, seq[:, 6:], last_only=False))  # extend by 6
    assert store.lengths == [8, 12]
    tol = {"fp32": 1e-4, "int8": 3e-2}[precision]  # int8: bf16 activations, rounded where the kernels differ
    torch.testing.assert_close(got, want[:, 6:], atol=tol, rtol=tol)
    assert torch.equal(got.argmax(-1), want[:, 6:].argmax(-1))


def test_forced_tokens_are_fed_as_one_extend(lm, monkeypatch):
    model, tok = lm
    ids = tok.encode(PROMPT)
    forced = tok.encode(" the king")

    class Force(Processor):  # after the first token, the constraint dictates the next few
        def __init__(self):
            self.n = 0

        def accept(self, token):
            self.n += 1

        def forced(self):
            return forced if self.n == 1 else []

    engine = Engine(model, tok)
    steps = []
    real = engine.cache.step
    monkeypatch.setattr(engine.cache, "step", lambda *a, **k: steps.append(real(*a, **k)) or steps[-1])
    req = engine.generate(ids, greedy(12), processors=[Force()])
    first = reference_greedy(model, ids, 1)
    rest = reference_greedy(model, ids + first + forced, 12 - 1 - len(forced))
    assert req.output_ids == first + forced + rest
    widths = [s.positions.size(1) for s in steps]
    assert widths == [len(ids), 1 + len(forced)] + [1] * (len(rest) - 1)  # prefill, one extend, decode steps

    # two rows forced at once, by different amounts: one extend forward for both, each reply still exact
    other = tok.encode("MENENIUS:")
    steps.clear()
    engine = Engine(model, tok, max_batch=2)
    monkeypatch.setattr(engine.cache, "step", lambda *a, **k: steps.append(real.__func__(engine.cache, *a, **k))
                        or steps[-1])
    reqs = [engine.submit(p, greedy(12), processors=[Force()]) for p in (ids, other)]
    while engine.step():
        pass
    for p, r in zip((ids, other), reqs):
        first = reference_greedy(model, p, 1)
        assert r.output_ids == first + forced + reference_greedy(model, p + first + forced, 12 - 1 - len(forced))
    assert [tuple(s.positions.shape) for s in steps[:2]] == [(2, max(len(ids), len(other))), (2, 1 + len(forced))]


def test_copy_prefix_then_extend_equals_a_full_prefill(lm):
    model, _ = lm
    seq = torch.randint(0, model.cfg.vocab_size, (1, 14), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = model(seq)
        store = KVStore(model.cfg, 3, 32)
        model(seq[:, :9], batch=store.step(0, 1, seq[:, :9]))   # a conversation so far in slot 0
        store.copy_prefix(0, 2, 6)                              # slot 2 shares its first 6 positions
        got = model(seq[:, 6:], batch=store.step(2, 3, seq[:, 6:], last_only=False))
    assert store.lengths == [9, 0, 14]
    torch.testing.assert_close(got, want[:, 6:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="holds 9"):
        store.copy_prefix(0, 1, 10)


def test_short_prompts_prefill_together_after_a_cached_prefix(lm, monkeypatch):
    """Rows sharing an instruction: the prefix is computed once, the rest of the prompts (different
    lengths) prefill in one packed forward (laid end to end, no padding), beside a running row; every
    reply equals its own greedy one."""
    model, tok = lm
    head = tok.encode("First Citizen:\n")
    prompts = [head + tok.encode(t) for t in ("Before we proceed", "You are all resolved rather to die", "Speak.")]
    engine = Engine(model, tok, max_batch=4)
    engine.cache_prefix(head)
    other = tok.encode("MENENIUS:")
    quick, running = engine.submit(other, greedy(1)), engine.submit(other, greedy(14))
    engine.step()  # quick finishes: slot 0 frees, slot 1 keeps decoding in the middle of the next prefill
    fed, real = [], engine_module.feed_packed
    monkeypatch.setattr(engine_module, "feed_packed", lambda e, pack: fed.append([r.slot for r in pack]) or real(e, pack))
    reqs = [engine.submit(p, greedy(10)) for p in prompts]
    while engine.step():
        pass
    assert [r.slot for r in (quick, running)] == [0, 1] and sorted(r.slot for r in reqs) == [0, 2, 3]
    assert [r.output_ids for r in reqs] == [reference_greedy(model, p, 10) for p in prompts]
    assert running.output_ids == reference_greedy(model, other, 14)
    assert fed[0] == [0, 2, 3]  # one forward for the three prompts
    assert engine.reused_tokens == 3 * len(head)


class ForceAfterFirst(Processor):
    """After the first token, the constraint dictates the next few."""

    def __init__(self, tokens):
        self.tokens, self.n = tokens, 0

    def accept(self, token):
        self.n += 1

    def forced(self):
        return self.tokens if self.n == 1 else []


def test_packs_keep_to_their_own_prefix_and_adapter(lm, tmp_path, monkeypatch):
    """Rows on two cached prefixes, under two adapters, and one on none, admitted together: each
    (prefix, adapter) packs apart, the rest goes alone, and every reply (forced extends included)
    is its own model's greedy one."""
    model, tok = lm
    path, merged = tiny_adapter(model, tmp_path / "a", scale=0.3)
    engine = Engine(model, tok, max_batch=6)
    engine.add_adapter("a", path)
    head, other, forced = tok.encode("First Citizen:\n"), tok.encode("MENENIUS:\n"), tok.encode(" the king")
    engine.cache_prefix(head)
    engine.cache_prefix(other)
    engine.cache_prefix(head, adapter="a")
    texts = [tok.encode(t) for t in ("Before we proceed", "Speak, speak.", "You are all resolved")]
    rows = [(head + texts[0], None), (other + texts[1], None), (head + texts[2], "a"), (head + texts[1], None),
            (tok.encode("ROMEO: what"), None), (head + texts[0], "a")]
    fed, real = [], engine_module.feed_packed
    monkeypatch.setattr(engine_module, "feed_packed", lambda e, pack: fed.append([r.slot for r in pack]) or real(e, pack))
    n = len(forced) + 4
    reqs = [engine.submit(ids, greedy(n), adapter_id=a, processors=[ForceAfterFirst(forced)]) for ids, a in rows]
    while engine.step():
        pass
    assert fed[:6] == [[0, 3], [1], [2, 5]] * 2  # the prefills, then the forced extends: base/head, base/other, a/head
    for (ids, a), r in zip(rows, reqs):
        m = merged if a else model
        first = reference_greedy(m, ids, 1)
        assert r.output_ids == first + forced + reference_greedy(m, ids + first + forced, n - 1 - len(forced))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rows_of_one_batch_run_different_adapters(arch, tmp_path):
    model, tok = tiny_lm(arch)
    path_a, merged_a = tiny_adapter(model, tmp_path / "a", scale=0.3)
    path_b, merged_b = tiny_adapter(model, tmp_path / "b", scale=-0.3)
    engine = Engine(model, tok, max_batch=3)
    engine.add_adapter("a", path_a)
    engine.add_adapter("b", path_b)
    ids = tok.encode(PROMPT)
    reqs = [engine.submit(ids, greedy(20), adapter_id=name) for name in ("a", None, "b")]
    steps = 0
    while engine.step():
        steps += 1
    want = [reference_greedy(m, ids, 20) for m in (merged_a, model, merged_b)]
    assert [r.output_ids for r in reqs] == want
    assert len({tuple(w) for w in want}) == 3 and steps <= 21  # three different replies, decoded together
    with pytest.raises(ValueError, match="adapter_id"):
        engine.submit(ids, greedy(5), adapter_id="c")
    engine.remove_adapter("a")
    assert engine.generate(ids, greedy(20), adapter_id="b").output_ids == want[2]  # ids renumbered


def test_reference_decoder_matches_the_engine(lm):
    """The tests' reference loop with a KV store and without one agree (it is what the rest trusts)."""
    model, tok = lm
    ids = torch.tensor([tok.encode(PROMPT)])
    assert torch.equal(generate(model, ids, 10), generate(model, ids, 10, use_cache=False))
