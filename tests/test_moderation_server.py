"""Moderation in the engine and the server: the output filter ends a real decode with content_filter
before the flagged word shows; `serve --moderation input,output` through the official openai client
(POST /v1/moderations, a refused prompt, a flagged stream)."""

import pytest
import torch
from tiny_lm import reference_greedy, running_server, tiny_lm

from pocketlm.infer.engine import Engine
from pocketlm.infer.generate import encode_chat
from pocketlm.infer.sampling import SamplingParams
from pocketlm.model import save_checkpoint
from pocketlm.safety import ModerationFilter
from pocketlm.safety.rules import RulesBackend

openai = pytest.importorskip("openai")
ASK = [{"role": "user", "content": "Speak, good sir, of the king."}]


@pytest.fixture(scope="module")
def lm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_lm()
    torch.set_num_threads(threads)


def blocked_word(lm, ids, n=40):
    """A word the model's greedy reply will contain: the block list of these tests."""
    model, tok = lm
    full = tok.decode(reference_greedy(model, ids, n))
    word = next(w for w in full[len(full) // 3:].split() if len(w) >= 4 and w.isalpha())
    return full, word.lower()


def test_engine_stream_ends_before_the_flagged_word(lm):
    model, tok = lm
    ids = encode_chat(tok, ASK)
    full, word = blocked_word(lm, ids)
    backend = RulesBackend(extra_words={word: (("harassment", 0.9),)})
    first = backend.check(full).hits[0]  # where the filter must cut: the first form of the word
    events = list(Engine(model, tok).stream(ids, SamplingParams(max_tokens=40, temperature=0),
                                            output_filters=[ModerationFilter(backend)]))
    streamed = "".join(e.text for e in events)
    assert events[-1].finish_reason == "content_filter"
    assert streamed == full[:first.start].rstrip() and word not in streamed.lower()


@pytest.fixture(scope="module")
def moderated(lm, tmp_path_factory):
    model, tok = lm
    root = tmp_path_factory.mktemp("moderated")
    ckpt = save_checkpoint(root / "tiny", model, tok)
    full, word = blocked_word(lm, encode_chat(tok, ASK))
    (root / "block.txt").write_text(f"# the tests' block list\n{word} violence\n")
    with running_server(ckpt, "--moderation", "input,output", "--moderation-words", str(root / "block.txt")) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120), full, word


def test_moderations_endpoint_with_the_official_client(moderated):
    client, _, word = moderated
    r = client.moderations.create(input=["Good morrow, cousin.", "you are an idiot", f"the {word} again"])
    assert type(r).__name__ == "ModerationCreateResponse" and r.id.startswith("modr-") and r.model == "pocketlm-rules"
    assert [x.flagged for x in r.results] == [False, True, True]
    assert r.results[1].categories.harassment and r.results[2].categories.violence
    assert r.results[0].category_scores.hate == 0.0 and r.results[0].category_applied_input_types.sexual == ["text"]
    with pytest.raises(openai.BadRequestError) as e:
        client.moderations.create(input=[{"type": "image_url", "image_url": {"url": "http://x/y.png"}}])
    assert "image inputs are not supported" in str(e.value)


def test_flagged_input_is_refused_with_content_filter(moderated):
    client = moderated[0]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "you are a m0r0n"}], max_tokens=4)
    assert e.value.code == "content_filter" and e.value.body["param"] == "messages" and "harassment" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="how do I make a pipe bomb", max_tokens=4)
    assert e.value.code == "content_filter" and e.value.body["param"] == "prompt"


def test_a_flagged_reply_ends_with_content_filter_streaming_and_not(moderated):
    client, full, word = moderated
    stream = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=40, temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["content_filter"] and word not in text.lower() and full.startswith(text)
    r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=40, temperature=0)
    assert r.choices[0].finish_reason == "content_filter" and r.choices[0].message.content == text
    ok = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason == "length"  # a reply that stops before the word is untouched
