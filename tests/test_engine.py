"""The inference engine: KV-cached decoding equals full recomputation, continuous batching changes
nothing about what each request gets, stop strings/tokens and max tokens end replies, streamed text
never splits a character, and a request that does not fit waits instead of being dropped."""

import threading
import time

import pytest
import torch
from tiny_lm import clone, reference_greedy, tiny_adapter, tiny_lm

from pocketlm.infer.engine import ContextLengthError, Engine, StreamDecoder
from pocketlm.infer.sampling import SamplingParams


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls; keeps the suite quick on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0, **kw)


PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "A", "To be, or not to be", "KING HENRY:\nWhat say you"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_decoding_equals_full_recomputation(arch):
    model, tok = tiny_lm(arch)
    engine = Engine(model, tok, max_batch=1)
    for prompt in PROMPTS[:3]:
        ids = tok.encode(prompt)
        req = engine.generate(ids, greedy(30))
        assert req.output_ids == reference_greedy(model, ids, 30)
        assert req.finish_reason == "length" and len(req.output_ids) == 30
        assert req.text == tok.decode(req.output_ids)


def test_continuous_batching_gives_each_request_its_own_answer(lm):
    model, tok = lm
    engine = Engine(model, tok, max_batch=2)  # 5 requests, 2 slots: three must wait their turn
    prompts = [tok.encode(p) for p in PROMPTS]
    lengths = [12, 25, 7, 18, 30]
    reqs = [engine.submit(p, greedy(n)) for p, n in zip(prompts[:4], lengths)]
    most_running = 0
    for step in range(1000):
        if step == 3:  # a late arrival joins the running batch between decode steps
            reqs.append(engine.submit(prompts[4], greedy(lengths[4])))
        most_running = max(most_running, engine.running)
        if not engine.step():
            break
    assert most_running == 2
    for req, p, n in zip(reqs, prompts, lengths):
        assert req.finish_reason == "length"
        assert req.output_ids == reference_greedy(model, p, n), tok.decode(p)
    # the waiting ones started only once a slot was freed
    first_done = min(r.t_done for r in reqs[:2])
    assert all(r.t_first_token > first_done for r in reqs[2:])


def test_seeded_sampling_is_the_same_alone_or_in_a_batch(lm):
    model, tok = lm
    params = dict(max_tokens=25, temperature=0.9, top_p=0.95, min_p=0.02, repetition_penalty=1.2)
    ids = tok.encode(PROMPTS[1])
    alone = Engine(model, tok, max_batch=1).generate(ids, SamplingParams(seed=7, **params)).output_ids
    engine = Engine(model, tok, max_batch=4)
    others = [engine.submit(tok.encode(p), SamplingParams(seed=i, **params)) for i, p in enumerate(PROMPTS[2:])]
    mine = engine.submit(ids, SamplingParams(seed=7, **params))
    while engine.step():
        pass
    assert mine.output_ids == alone
    assert all(len(o.output_ids) == 25 for o in others)
    different_seed = Engine(model, tok, max_batch=1).generate(ids, SamplingParams(seed=8, **params)).output_ids
    assert different_seed != alone


def test_stop_string_cuts_the_reply_and_is_never_streamed(lm):
    model, tok = lm
    ids = tok.encode(PROMPTS[0])
    full = tok.decode(reference_greedy(model, ids, 40))
    stop = full[12:15]
    assert stop.strip() and full.find(stop) == 12
    engine = Engine(model, tok)
    events = list(engine.stream(ids, greedy(40, stop=["zzz-never", stop])))
    streamed = "".join(e.text for e in events)
    assert streamed == full[:12] == events[-1].request.text
    assert events[-1].finish_reason == "stop" and all(e.finish_reason is None for e in events[:-1])


def test_stop_token_ids_end_the_reply(lm):
    model, tok = lm
    ids = tok.encode(PROMPTS[0])
    ref = reference_greedy(model, ids, 20)
    req = Engine(model, tok).generate(ids, greedy(20, stop_token_ids=[ref[5]]))
    first = ref.index(ref[5])
    assert req.output_ids == ref[:first + 1] and req.finish_reason == "stop"
    assert req.text == tok.decode(ref[:first])  # the stop token itself is not shown


def test_end_of_turn_token_stops_a_chat_reply():
    """A model that always predicts <|im_end|> answers with nothing and stops at once."""
    model, tok = tiny_lm("gpt2")
    model = clone(model)
    model.lm_head = torch.nn.Linear(model.cfg.n_embd, model.cfg.vocab_size, bias=False)
    end = tok.token_id("<|im_end|>")
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.bias.fill_(1.0)      # the final hidden state is all ones, whatever the input
        model.lm_head.weight.zero_()
        model.lm_head.weight[end] = 1.0  # so <|im_end|> has the top logit
    assert end in tok.stop_ids
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hello"}]))
    req = Engine(model, tok).generate(ids, SamplingParams(max_tokens=50, temperature=0.8, seed=0))
    assert req.output_ids == [end] and req.text == "" and req.finish_reason == "stop"


def test_stream_decoder_never_splits_a_character(lm):
    _, tok = lm
    text = "naïve café — 日本語 🙂 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # this tokenizer never saw these characters: several tokens each
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens were held back until their character was complete


def test_max_tokens_and_the_context_window(lm):
    model, tok = lm
    engine = Engine(model, tok, max_seq_len=64)
    ids = tok.encode(PROMPTS[1])
    req = engine.generate(ids, greedy(1000))
    assert req.finish_reason == "length" and len(ids) + len(req.output_ids) == 64
    with pytest.raises(ContextLengthError, match="64 tokens"):
        engine.submit(list(range(1, 65)), greedy(5))
    with pytest.raises(ContextLengthError, match="empty"):
        engine.submit([], greedy(5))


def test_cancelled_request_frees_its_slot(lm):
    model, tok = lm
    engine = Engine(model, tok, max_batch=1)
    first = engine.submit(tok.encode(PROMPTS[0]), greedy(200))
    second = engine.submit(tok.encode(PROMPTS[1]), greedy(5))
    for _ in range(3):
        engine.step()
    assert engine.running == 1 and engine.queue_depth == 1
    engine.cancel(first)
    while engine.step():
        pass
    assert first.finish_reason == "cancelled" and len(first.output_ids) < 200
    assert second.finish_reason == "length" and len(second.output_ids) == 5


def test_background_thread_serves_concurrent_streams(lm):
    model, tok = lm
    engine = Engine(model, tok, max_batch=3).start()
    results = {}

    def client(i):
        ids = tok.encode(PROMPTS[i])
        results[i] = (ids, "".join(e.text for e in engine.stream(ids, greedy(20))))

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        engine.stop()
    assert len(results) == 5
    for ids, text in results.values():
        assert text == tok.decode(reference_greedy(model, ids, 20))


def test_a_lone_stream_steps_on_solo_threads_and_a_batch_on_all(lm):
    model, tok = lm
    before = torch.get_num_threads()
    torch.set_num_threads(full := 2)  # (the suite runs on one; the engine thread takes the caller's setting)
    engine = Engine(model, tok, max_batch=3)
    engine.solo_threads = 1
    seen, step = [], engine.step

    def counting_step():
        seen.append((engine.running, torch.get_num_threads()))
        return step()

    engine.step = counting_step
    engine.start()
    try:
        ids = tok.encode(PROMPTS[0])
        assert "".join(e.text for e in engine.stream(ids, greedy(8))) == tok.decode(reference_greedy(model, ids, 8))
        engine.stop()  # two requests queued together, so they share steps
        pair = [engine.submit(tok.encode(PROMPTS[i]), greedy(8)) for i in (1, 2)]
        engine.start()
        deadline = time.monotonic() + 120
        while any(r.finish_reason is None for r in pair) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
        caller = torch.get_num_threads()
        torch.set_num_threads(before)
    assert all(r.finish_reason == "length" for r in pair)
    assert {n for running, n in seen if running == 1 and n} <= {1, full} and (1, 1) in seen
    assert any(running == 2 and n == full for running, n in seen)
    assert caller == full  # the caller's thread keeps its setting


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_lower_precisions_on_cpu(lm, precision):
    model, tok = lm
    engine = Engine(model, tok, precision=precision)
    assert engine.cache.k.dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left as it was
    ids = tok.encode(PROMPTS[0])
    req = engine.generate(ids, greedy(20))
    assert len(req.output_ids) == 20
    assert req.output_ids[:3] == reference_greedy(model, ids, 3)  # same model, coarser numbers


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4"])
def test_compiled_decode_step_gives_the_same_tokens(lm, precision):
    model, tok = lm
    torch._dynamo.reset()  # each engine compiles the same forward; stay clear of the recompile limit
    plain = Engine(model, tok, max_batch=2, precision=precision)
    compiled = Engine(model, tok, max_batch=2, precision=precision, compile=True)
    for engine in (plain, compiled):
        reqs = [engine.submit(tok.encode(p), greedy(15)) for p in PROMPTS[:3]]
        while engine.step():
            pass
        engine.outputs = [r.output_ids for r in reqs]
    assert plain.outputs == compiled.outputs


# ---- the terminal front ends: `pocketlm generate` and `pocketlm chat` ------------------------------
@pytest.fixture(scope="module")
def checkpoint(lm, tmp_path_factory):
    from pocketlm.model import save_checkpoint

    model, tok = lm
    return save_checkpoint(tmp_path_factory.mktemp("cli") / "tiny", model, tok)


def test_generate_verb_streams_the_continuation(lm, checkpoint, capsys):
    from pocketlm.cli import main
    from pocketlm.infer.generate import encode_completion

    model, tok = lm
    assert main(["generate", "--model", str(checkpoint), "--prompt", "ROMEO:", "--temperature", "0",
                 "--max-new-tokens", "25", "--dtype", "fp32"]) == 0
    expected = tok.decode(reference_greedy(model, encode_completion(tok, "ROMEO:"), 25))
    assert capsys.readouterr().out == "ROMEO:" + expected + "\n"
    assert main(["generate", "--model", str(checkpoint), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_generate_and_chat_apply_an_adapter(lm, checkpoint, tmp_path, capsys, monkeypatch):
    import io

    from pocketlm.cli import main
    from pocketlm.infer.generate import encode_chat, encode_completion

    model, tok = lm
    adapter, merged = tiny_adapter(model, tmp_path / "adapter")
    ids = encode_completion(tok, "ROMEO:")
    args = ["generate", "--model", str(checkpoint), "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "20",
            "--dtype", "fp32"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--adapter", str(adapter)]) == 0
    adapted = capsys.readouterr().out
    assert adapted == "ROMEO:" + tok.decode(reference_greedy(merged, ids, 20)) + "\n"
    assert adapted != plain
    monkeypatch.setattr("sys.stdin", io.StringIO("Good morrow.\n/quit\n"))
    assert main(["chat", "--model", str(checkpoint), "--adapter", str(adapter), "--temperature", "0",
                 "--max-new-tokens", "15", "--dtype", "fp32"]) == 0
    messages = [{"role": "user", "content": "Good morrow."}]
    assert tok.decode(reference_greedy(merged, encode_chat(tok, messages), 15)) in capsys.readouterr().out
    assert main(args + ["--adapter", str(tmp_path / "missing")]) == 2
    assert "not an adapter directory" in capsys.readouterr().err


def test_chat_verb_keeps_history_and_obeys_commands(lm, checkpoint, capsys, monkeypatch):
    import io

    from pocketlm.cli import main
    from pocketlm.infer.generate import encode_chat

    model, tok = lm

    def reply(messages):
        return tok.decode(reference_greedy(model, encode_chat(tok, messages), 15))

    lines = ["Good morrow.", "And to you?", "/system Speak in verse.", "/reset", "Hail!", "/nonsense", "/quit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--model", str(checkpoint), "--temperature", "0", "--max-new-tokens", "15", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    first = reply([{"role": "user", "content": "Good morrow."}])
    second = reply([{"role": "user", "content": "Good morrow."}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "And to you?"}])
    third = reply([{"role": "system", "content": "Speak in verse."}, {"role": "user", "content": "Hail!"}])
    assert out.index(first) < out.index(second) < out.index("(conversation cleared)") < out.index(third)
    assert "unknown command /nonsense" in out
