"""The OpenAI-compatible server, driven by the official `openai` client against `pocketlm serve` on
loopback, plus in-process checks (API key, metrics, page) and a fuzz test: no body makes it answer 5xx."""

import asyncio
import json
import time

import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_lm import reference_greedy, running_server, tiny_adapter, tiny_lm

from pocketlm.infer.engine import Engine
from pocketlm.infer.generate import encode_chat, encode_completion
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
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it really streamed
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
    from pocketlm.serve.app import MAX_BODY_BYTES

    sent = 0

    def body():  # 256 MiB in chunks, with no Content-Length: the server must count and stop reading
        nonlocal sent
        for _ in range(4096):
            sent += 65536
            yield b" " * 65536

    r = httpx.post(server + "/v1/completions", content=body(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert sent < 16 * MAX_BODY_BYTES  # the limit plus what socket buffers took, far from 256 MiB
    ok = httpx.post(server + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_client_that_disconnects_frees_its_slot(server):
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 200, "temperature": 0.8, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break  # hang up mid-reply
    for _ in range(100):
        health = httpx.get(server + "/health", timeout=30).json()
        if health["running"] == 0:
            break
        time.sleep(0.1)
    assert health["running"] == 0 and health["waiting"] == 0
    metrics = httpx.get(server + "/metrics", timeout=30).text
    assert 'pocketlm_requests_total{endpoint="/v1/chat/completions",code="200"}' in metrics
    assert "pocketlm_queue_depth 0" in metrics and "pocketlm_completion_tokens_total" in metrics


# ---- in-process (FastAPI's TestClient): API key, page, fuzzing -----------------------------------
@pytest.fixture(scope="module")
def app_client(lm):
    from fastapi.testclient import TestClient

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = lm
    app = create_app(Engine(model, tok, max_batch=2, max_seq_len=48), "tiny", api_key="sesame")
    with TestClient(app) as c:
        c.headers["Authorization"] = "Bearer sesame"
        yield c
    torch.set_num_threads(threads)


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
    from fastapi.testclient import TestClient

    from pocketlm.tokenizer import Tokenizer

    model, tok = lm
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('a conversation starts with a user turn') }}"
                "{% endif %}{{ messages[0]['content'] }}")
    strict = Tokenizer(tok.hf, {**tok.config, "chat_template": template})
    with TestClient(create_app(Engine(model, strict, max_batch=1, max_seq_len=48), "tiny")) as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                 "messages": [{"role": "assistant", "content": "Hi"}]})
        assert r.status_code == 400 and "starts with a user turn" in r.json()["error"]["message"]
        ok = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": "Hi"}]})
        assert ok.status_code == 200


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", 3]),
                                           "content": st.text(max_size=40) | json_values}), max_size=3)
fields = {"model": st.sampled_from(["tiny", "other", ""]) | json_values, "messages": messages | json_values,
          "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 500), max_size=5) | json_values,
          "max_tokens": st.integers(-3, 60) | json_values, "temperature": st.floats(-1, 3) | json_values,
          "top_p": st.floats(-0.5, 1.5) | json_values, "top_k": st.integers(-2, 500), "min_p": st.floats(-1, 2),
          "repetition_penalty": st.floats(-1, 3), "seed": st.integers(-2**70, 2**70) | json_values,
          "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3) | json_values,
          "stream": st.booleans() | json_values, "n": st.integers(-1, 3),
          "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values}
valid = {"max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2),
         "top_p": st.floats(0.01, 1), "top_k": st.integers(0, 50), "min_p": st.floats(0, 1), "seed": st.integers(0, 99),
         "repetition_penalty": st.floats(0.5, 2), "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2),
         "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})}
chat_base = st.fixed_dictionaries({"model": st.just("tiny"), "messages": st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=40)}), min_size=1, max_size=3)},
    optional=valid)
completion_base = st.fixed_dictionaries({"model": st.just("tiny"), "prompt": st.text(min_size=1, max_size=40)},
                                        optional=valid)
# a valid body with 0-2 fields replaced by anything at all, or an arbitrary JSON value
mutations = st.dictionaries(st.sampled_from(sorted(fields)), st.none(), max_size=2).flatmap(
    lambda keys: st.fixed_dictionaries({k: fields[k] for k in keys}))
bodies = st.one_of(st.tuples(chat_base | completion_base, mutations).map(lambda bm: {**bm[0], **bm[1]}), json_values)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(body=bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
       raw=st.none() | st.binary(max_size=40))
def test_fuzzed_bodies_never_get_a_server_error(app_client, body, path, raw):
    content = raw if raw is not None else json.dumps(body).encode()
    r = app_client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
