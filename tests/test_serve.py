"""The OpenAI-compatible server, driven by the official `openai` client against `pocketlm serve` on
loopback, plus in-process checks (API key, page). Hostile input (fuzzing, limits, timeouts): test_serve_limits.py."""

import asyncio
import time

import httpx
import openai
import pytest
import torch
from tiny_lm import in_process, reference_greedy, running_server, tiny_adapter, tiny_lm

from pocketlm.infer.engine import Engine
from pocketlm.infer.generate import encode_chat, encode_completion
from pocketlm.infer.processors import LogitBias, ReplyPenalties
from pocketlm.model import save_checkpoint
from pocketlm.serve.app import create_app


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def server(lm, tmp_path_factory):
    model, tok = lm
    ckpt = save_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", model, tok)
    with running_server(ckpt, "--max-batch", "4") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat_reference(lm, messages, n):
    model, tok = lm
    ids = reference_greedy(model, encode_chat(tok, messages), n)
    return tok.decode(ids)


HELLO = [{"role": "system", "content": "You are a player."}, {"role": "user", "content": "Speak, good sir."}]


def test_chat_completion(client, lm):
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == chat_reference(lm, HELLO, 12)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len(encode_chat(lm[1], HELLO))


def test_chat_completion_streaming_with_usage(client, lm):
    stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat_reference(lm, HELLO, 12)
    # it really streamed: a role chunk, content, the finish and the usage each in their own event (how many
    # content chunks depends on timing: tokens that queued while the loop was busy share one)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == 12
    assert any(c.choices and c.choices[0].delta.content for c in chunks[1:-2])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_text_completion_plain_and_streaming(client, lm):
    model, tok = lm
    expected = tok.decode(reference_greedy(model, encode_completion(tok, "ROMEO:"), 10))
    r = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=10, temperature=0)
    assert r.choices[0].text == expected and r.usage.completion_tokens == 10
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="ROMEO:", max_tokens=10, temperature=0, stream=True))
    assert streamed == expected


def test_stop_sequence_and_seed(client):
    base = dict(model="tiny", messages=HELLO, max_tokens=30, temperature=1.0, seed=3)
    a = client.chat.completions.create(**base).choices[0].message.content
    assert a == client.chat.completions.create(**base).choices[0].message.content
    stop = a[5:8]
    cut = client.chat.completions.create(**base, stop=[stop])
    assert cut.choices[0].message.content == a[:a.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_errors_have_openai_shape(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=HELLO)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, temperature=-1)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 1100}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=10**9)
    r = httpx.post(server + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server + "/v1/nothing", timeout=30).json()["error"]["code"] == "not_found"


def test_two_concurrent_streams(server, lm):
    aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)
    conversations = [HELLO, [{"role": "user", "content": "What news from Rome?"}]]

    async def one(messages):
        arrivals, parts = [], []
        stream = await aclient.chat.completions.create(model="tiny", messages=messages, max_tokens=40,
                                                       temperature=0, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.perf_counter())
                parts.append(chunk.choices[0].delta.content)
        return "".join(parts), arrivals

    async def both():
        return await asyncio.gather(*(one(m) for m in conversations))

    (text_a, times_a), (text_b, times_b) = asyncio.run(both())
    assert text_a == chat_reference(lm, conversations[0], 40)
    assert text_b == chat_reference(lm, conversations[1], 40)
    assert times_b[0] < times_a[-1] and times_a[0] < times_b[-1]  # decoded side by side, not one after the other


def test_serve_applies_an_adapter(lm, server, tmp_path):
    model, tok = lm
    ckpt = save_checkpoint(tmp_path / "tiny", model, tok)
    adapter, merged = tiny_adapter(model, tmp_path / "adapter")
    body = {"model": "tiny", "prompt": "ROMEO:", "max_tokens": 12, "temperature": 0}
    with running_server(ckpt, "--adapter", str(adapter)) as url:
        adapted = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    plain = httpx.post(server + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    assert adapted == tok.decode(reference_greedy(merged, encode_completion(tok, "ROMEO:"), 12))
    assert adapted != plain


def test_chunked_body_over_the_limit_gets_413_and_is_not_read_to_the_end(server):
    from pocketlm.serve.context import Limits

    sent = 0

    def body():  # 256 MiB in chunks, with no Content-Length: the server must count and stop reading
        nonlocal sent
        for _ in range(4096):
            sent += 65536
            yield b" " * 65536

    r = httpx.post(server + "/v1/completions", content=body(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert sent < 16 * Limits.max_body_bytes  # the limit plus what socket buffers took, far from 256 MiB
    ok = httpx.post(server + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


# ---- in-process (FastAPI's TestClient): API key, page, fuzzing -----------------------------------
@pytest.fixture(scope="module")
def app_client(lm):
    model, tok = lm
    with in_process(create_app(Engine(model, tok, max_batch=2, max_seq_len=48), "tiny", api_key="sesame"),
                    api_key="sesame") as c:
        yield c


def test_api_key_is_required_on_v1(app_client):
    assert app_client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    r = app_client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert app_client.get("/health", headers={"Authorization": ""}).status_code == 200


def test_web_page_and_static_files_are_served(app_client):
    page = app_client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text and app_client.get(asset).status_code == 200


def test_oversized_body_gets_413(app_client):
    r = app_client.post("/v1/completions", content=b"x" * (3 * 1024 * 1024), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_a_chat_template_that_refuses_the_messages_gives_400(lm):
    from pocketlm.tokenizer import Tokenizer

    model, tok = lm
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('a conversation starts with a user turn') }}"
                "{% endif %}{{ messages[0]['content'] }}")
    strict = Tokenizer(tok.hf, {**tok.config, "chat_template": template})
    with in_process(create_app(Engine(model, strict, max_batch=1, max_seq_len=48), "tiny")) as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                 "messages": [{"role": "assistant", "content": "Hi"}]})
        assert r.status_code == 400 and "starts with a user turn" in r.json()["error"]["message"]
        ok = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "Hi"}]})
        assert ok.status_code == 200


def test_input_check_hooks_can_refuse_or_add_context(lm):
    """The pipeline's extension point (memory, moderation): ctx.input_checks run before tokenizing."""
    from pocketlm.serve.errors import APIError

    model, tok = lm
    app = create_app(Engine(model, tok, max_batch=1, max_seq_len=96), "tiny")

    def no_swearing(turn):
        if any("zounds" in m["content"] for m in turn.messages or []):
            raise APIError(400, "messages: not here", param="messages", code="content_policy")

    async def remember(turn):  # a hook may be async, and may edit the conversation
        if turn.messages is not None:
            turn.messages.insert(0, {"role": "system", "content": "The user's name is Kate."})

    app.state.ctx.input_checks += [no_swearing, remember]
    body = {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
    with in_process(app) as c:
        r = c.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "zounds"}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "content_policy"
        used = c.post("/v1/chat/completions", json=body).json()["usage"]["prompt_tokens"]
    with_memory = [{"role": "system", "content": "The user's name is Kate."}, {"role": "user", "content": "Hi"}]
    assert used == len(encode_chat(tok, with_memory))


def test_tokens_decoded_during_the_stream_interval_share_a_chunk(lm):
    """After each chunk a stream waits stream_interval for more tokens: with a long one, the tiny model's
    reply after its first token arrives as one chunk, and the text is the whole greedy reply."""
    import json

    from pocketlm.serve.context import Limits

    model, tok = lm
    app = create_app(Engine(model, tok, max_batch=1, max_seq_len=96), "tiny", limits=Limits(stream_interval=1.0))
    with in_process(app) as c:
        body = {"model": "tiny", "messages": HELLO, "max_tokens": 12, "temperature": 0, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    content = [e["choices"][0]["delta"]["content"] for e in events if e["choices"][0]["delta"].get("content")]
    assert "".join(content) == chat_reference(lm, HELLO, 12)
    assert len(content) <= 2  # the first token at once, the other eleven together


# OpenAI's logit_bias, presence_penalty and frequency_penalty (accepted and silently ignored before)
SPEAK = [{"role": "user", "content": "Speak, good sir."}]


def reply(client, n=8, **kw):
    r = client.chat.completions.create(model="tiny", messages=SPEAK, max_tokens=n, temperature=0, **kw)
    return r.choices[0].message.content


def test_a_bias_of_100_forces_a_token_and_minus_100_bans_one(client, lm):
    _, tok = lm
    forced = tok.encode("the")[-1]
    assert reply(client, 5, logit_bias={str(forced): 100}) == tok.decode([forced]) * 5
    plain = reply(client)
    first = tok.encode(plain)[0]
    banned = reply(client, logit_bias={str(first): -100})
    assert banned != plain and not banned.startswith(tok.decode([first]))


def test_penalties_change_a_greedy_reply_and_streaming_agrees(client):
    plain = reply(client, 40)
    penalised = reply(client, 40, presence_penalty=2.0, frequency_penalty=2.0)
    assert penalised != plain
    chunks = client.chat.completions.create(model="tiny", messages=SPEAK, max_tokens=40, temperature=0, stream=True,
                                            presence_penalty=2.0, frequency_penalty=2.0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == penalised


@pytest.mark.parametrize("field,value,says", [
    ("logit_bias", {"abc": 1}, "logit_bias: keys are token ids"),
    ("logit_bias", {"5": 101}, "logit_bias[5]"),
    ("logit_bias", {"999999": 1}, "outside this model's vocabulary"),
    ("frequency_penalty", 2.5, "frequency_penalty"),
])
def test_bad_values_are_4xx_naming_the_field(client, field, value, says):
    with pytest.raises(openai.APIStatusError) as e:
        reply(client, **{field: value})
    assert e.value.status_code in (400, 422) and says in str(e.value)


def test_penalties_follow_openais_formula():
    p = ReplyPenalties(frequency=0.5, presence=1.0, vocab_size=4)
    for t in (2, 2, 3):
        p.accept(t)
    out = p.process(torch.zeros(4))
    assert out.tolist() == [0.0, 0.0, -2.0, -1.5]  # token 2: 0.5 x 2 + 1; token 3: 0.5 x 1 + 1
    assert LogitBias({1: 3.0, 3: -2.0}).process(torch.ones(4)).tolist() == [1.0, 4.0, 1.0, -1.0]
