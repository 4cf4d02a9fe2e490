"""Multi-LoRA serving (serve --lora, /v1/load_lora_adapter, /v1/unload_lora_adapter), through HTTP with
the official openai client against `pocketlm serve`: each request's reply is the greedy reply of the
base model with its own adapter merged, while requests on other adapters decode beside it; adapters
come and go under traffic without failing a request; bad input is an OpenAI-shaped 4xx."""

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import torch
from tiny_lm import clone, in_process, reference_greedy, running_server, tiny_adapter, tiny_lm, tiny_tokenizer

from pocketlm.infer.engine import Engine
from pocketlm.infer.generate import encode_completion
from pocketlm.model import save_checkpoint
from pocketlm.model.gpt import GPT, ModelConfig
from pocketlm.serve.app import create_app

PROMPT = "ROMEO:"
N = 24


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def setup(lm, tmp_path_factory):
    """A server with adapters a and b at start (c loads at run time), and the merged references."""
    model, tok = lm
    tmp = tmp_path_factory.mktemp("multilora")
    ckpt = save_checkpoint(tmp / "tiny", model, tok)
    adapters = {name: tiny_adapter(model, tmp / name, scale=s) for name, s in (("a", 0.3), ("b", -0.3), ("c", 0.5))}
    ids = encode_completion(tok, PROMPT)
    want = {name: tok.decode(reference_greedy(merged, ids, N)) for name, (_, merged) in adapters.items()}
    want[None] = tok.decode(reference_greedy(model, ids, N))
    assert len(set(want.values())) == 4  # the adapters change the reply: the routing tests can fail
    with running_server(ckpt, "--max-batch", "4", "--max-loras", "3", "--lora", f"a={adapters['a'][0]}",
                        "--lora", f"b={adapters['b'][0]}") as url:
        yield url, {name: path for name, (path, _) in adapters.items()}, want


def _client(url):
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


async def _stream(client, model, **extra):
    """(text, arrival time of each chunk) of one greedy streamed completion."""
    text, times = [], []
    stream = await client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0, stream=True,
                                             extra_body=extra or None)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            text.append(chunk.choices[0].text)
            times.append(time.monotonic())
    return "".join(text), times


def test_each_request_gets_its_own_adapter_in_one_batch(setup):
    url, _, want = setup

    async def run():
        client = _client(url)
        return await asyncio.gather(_stream(client, "a"), _stream(client, "tiny"), _stream(client, "b"),
                                    _stream(client, "tiny", lora="a"), _stream(client, "tiny", lora={"name": "b"}))

    results = asyncio.run(run())
    assert [text for text, _ in results] == [want["a"], want[None], want["b"], want["a"], want["b"]]
    kinds = ["a", None, "b", "a", "b"]
    spans = [(t[0], t[-1]) for _, t in results]
    at_once = max((sum(s <= t0 <= e for s, e in spans), {k for k, (s, e) in zip(kinds, spans) if s <= t0 <= e})
                  for t0, _ in spans)
    assert at_once[0] >= 4 and len(at_once[1]) >= 2  # 4 slots: four decoded side by side, on different adapters


def test_models_lists_the_adapters_with_their_base(setup):
    url, paths, _ = setup
    models = {m.id: m for m in openai.OpenAI(base_url=url + "/v1", api_key="x").models.list()}
    assert models["tiny"].model_extra["parent"] is None
    assert models["a"].model_extra["parent"] == "tiny" and models["a"].model_extra["root"] == str(paths["a"])
    assert models["b"].model_extra["parent"] == "tiny"


def test_unknown_adapter_and_bad_folders_are_4xx(setup, tmp_path):
    url, paths, _ = setup
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="zzz"):
        client.completions.create(model="zzz", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="zzz"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, extra_body={"lora": "zzz"})
    with pytest.raises(openai.BadRequestError, match="scale"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, extra_body={"lora": {"name": "a", "scale": 2}})

    def load(name, path):
        return httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=60)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    (broken / "adapter_model.safetensors").write_bytes(b"x")
    r = load("x", broken)
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    (broken / "adapter_config.json").write_text((paths["a"] / "adapter_config.json").read_text())
    r = load("x", broken)
    assert r.status_code == 400 and "adapter_model.safetensors" in r.json()["error"]["message"]
    r = load("x", tmp_path / "nowhere")
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    assert load("a", paths["c"]).status_code == 409  # the name is taken
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "zzz"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "lora_not_found"
    assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x"}).status_code == 422


def test_load_and_unload_under_traffic_fail_no_request(setup):
    url, paths, want = setup
    failures, done, stop = [], [], threading.Event()

    def traffic(model):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        while not stop.is_set():
            try:
                text = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0).choices[0].text
                (done if text == want[None if model == "tiny" else model] else failures).append(model)
            except Exception as e:  # noqa: BLE001 - counted, the assertion below names it
                failures.append(f"{model}: {e!r}")

    threads = [threading.Thread(target=traffic, args=(m,)) for m in ("tiny", "b")]
    for t in threads:
        t.start()
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    try:
        for _ in range(3):
            r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(paths["c"])}, timeout=60)
            assert r.status_code == 200, r.text
            assert client.completions.create(model="c", prompt=PROMPT, max_tokens=N, temperature=0).choices[0].text == want["c"]
            # over --max-loras 3 (a, b, c)
            r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "d", "lora_path": str(paths["c"])}, timeout=60)
            assert r.status_code == 409 and r.json()["error"]["code"] == "too_many_loras"
            r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "c"}, timeout=60)
            assert r.status_code == 200, r.text
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model="c", prompt=PROMPT, max_tokens=2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures and len(done) >= 4, failures


def test_unloading_an_adapter_a_stream_is_using_is_a_409_and_the_stream_goes_on(setup):
    url, _, _ = setup
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    stream = client.completions.create(model="a", prompt=PROMPT, max_tokens=400, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "a"}, timeout=60)
    assert r.status_code == 409 and r.json()["error"]["code"] == "lora_in_use"
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]


def test_adapter_routes_take_the_admin_key_and_a_compiled_engine_refuses(lm, tmp_path):
    model, tok = lm
    path, _ = tiny_adapter(model, tmp_path / "a")
    body = {"lora_name": "a", "lora_path": str(path)}
    with in_process(create_app(Engine(model, tok, max_batch=2), "tiny", api_key="admin-key")) as c:
        assert c.post("/v1/load_lora_adapter", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.post("/v1/load_lora_adapter", json=body, headers={"Authorization": "Bearer admin-key"}).status_code == 200
    with pytest.raises(ValueError, match="--max-loras 0"):
        create_app(Engine(model, tok, max_batch=1), "tiny", loras={"a": str(path)}, max_loras=0)
    compiled = Engine(model, tok, max_batch=1)
    compiled.compiled = True  # what add_adapter and the server check (compiling itself takes minutes)
    with in_process(create_app(compiled, "tiny")) as c:
        r = c.post("/v1/load_lora_adapter", json=body)
        assert r.status_code == 400 and "--compile" in r.json()["error"]["message"]


def _five_mb_adapter(out):
    """A random model whose rank-16 adapter on every projection is ~5 MB of fp32 safetensors."""
    from pocketlm.model.lora import add_lora, save_adapter

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=tok.vocab_size, block_size=256, n_layer=8, n_head=8, n_kv_head=4,
                      n_embd=512)
    model = GPT(cfg).eval()
    ckpt = save_checkpoint(out / "wide", model, tok)
    adapted = add_lora(GPT(cfg), rank=16, alpha=32, targets="all")
    save_adapter(adapted, out / "five")
    return ckpt, out / "five"


def test_hot_load_time_of_a_five_megabyte_adapter(tmp_path):
    ckpt, adapter = _five_mb_adapter(tmp_path)
    size = (adapter / "adapter_model.safetensors").stat().st_size
    assert 4e6 < size < 7e6
    with running_server(ckpt, "--max-loras", "2") as url, httpx.Client(base_url=url, timeout=60) as http:
        times, health = [], []
        for i in range(3):
            t0 = time.perf_counter()
            assert http.get("/health").status_code == 200
            t1 = time.perf_counter()
            r = http.post("/v1/load_lora_adapter", json={"lora_name": f"x{i}", "lora_path": str(adapter)})
            times.append(time.perf_counter() - t1)
            health.append(t1 - t0)
            assert r.status_code == 200, r.text
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": f"x{i}"}).status_code == 200
        reply = json.loads(r.text)
    best = min(times)
    print(f"\nhot-load of a {size / 1e6:.1f} MB adapter over HTTP: best {best * 1000:.0f} ms of "
          f"{[round(t * 1000) for t in times]} ms (server-side {reply['load_ms']} ms; a GET /health takes "
          f"{min(health) * 1000:.0f} ms; target <= 200 ms)")
    assert best < 2.0  # the 200 ms target is measured, not asserted, on this shared 2-core machine


def test_one_batch_of_mixed_adapters_matches_the_merged_models_logits(lm, tmp_path):
    """At fp32, each row of one forward (adapter a, none, b) has the logits of its merged model to 1e-3."""
    model, tok = lm
    (path_a, merged_a), (path_b, merged_b) = tiny_adapter(model, tmp_path / "a"), tiny_adapter(model, tmp_path / "b", -0.3)
    engine = Engine(model, tok, max_batch=3)
    engine.add_adapter("a", path_a)
    engine.add_adapter("b", path_b)
    ids = torch.tensor([encode_completion(tok, PROMPT)] * 3)
    with torch.inference_mode():
        batch = engine.cache.step(0, 3, ids, adapter_ids=[0, -1, 1])
        got = engine.model(ids, batch=batch)[:, -1]
        want = torch.stack([m(ids[:1])[0, -1] for m in (merged_a, model, merged_b)])
    assert (got - want).abs().max() < 1e-3
    assert (want[0] - want[1]).abs().max() > 0.1 and (want[2] - want[1]).abs().max() > 0.1  # the adapters matter



def _adapter(model, out, targets, rank, seed):
    """A random adapter of this rank on these projections, and the model with it merged."""
    from pocketlm.model.lora import add_lora, apply_adapter, lora_modules, save_adapter

    torch.manual_seed(seed)
    adapted = add_lora(clone(model), rank=rank, alpha=2 * rank, targets=targets)
    with torch.no_grad():
        for m in lora_modules(adapted).values():
            m.lora_B.normal_(0, 0.3)
    save_adapter(adapted, out)
    return out, apply_adapter(clone(model), out).eval()


@pytest.mark.parametrize("route", ["kernel", "matmuls"])
@pytest.mark.parametrize("rows", [[0, 1, 2], [1, 1], [2, 1], [2, 0, 2, -1]])
def test_rows_in_any_slot_order_match_their_merged_models_after_a_slot_is_reused(lm, tmp_path, rows, route,
                                                                                monkeypatch):
    """Adapters of different ranks and projections; one unloaded and its slot taken by the next. Each
    row of a prefill over several rows, then of a decode step, has its merged model's logits at fp32:
    through row_lora.cpp (a step of few tokens) and through the batched matmuls (prefill's path), with
    rows already in slot order (the update is a view of the stacks) and shuffled ones (copied in)."""
    from pocketlm.infer import adapters

    if route == "kernel" and not adapters.kernel():
        pytest.skip("row_lora.cpp does not run here (no AVX512F, or POCKETLM_KERNELS=0)")
    monkeypatch.setattr(adapters, "KERNEL_TOKENS", 16 if route == "kernel" else 0)
    calls, real = [], adapters.row_lora_
    monkeypatch.setattr(adapters, "row_lora_", lambda *a: (calls.append(1), real(*a)))
    model, tok = lm
    a, gone, b, c = (_adapter(model, tmp_path / n, t, r, seed) for n, t, r, seed in
                     (("a", "q_proj,v_proj", 2, 1), ("gone", "all", 8, 2), ("b", "all", 4, 3), ("c", "o_proj,up_proj", 8, 4)))
    engine = Engine(model, tok, max_batch=len(rows))
    for name, (path, _) in (("a", a), ("gone", gone), ("b", b)):
        engine.add_adapter(name, path)
    engine.remove_adapter("gone")
    engine.add_adapter("c", c[0])
    assert {n: engine.adapter_slots.index[n] for n in "abc"} == {"a": 0, "c": 1, "b": 2}  # b kept its slot
    merged = {-1: model, 0: a[1], 1: c[1], 2: b[1]}
    prompt = encode_completion(tok, PROMPT)
    ids = torch.tensor([prompt] * len(rows))
    with torch.inference_mode():
        got = engine.model(ids, batch=engine.cache.step(0, len(rows), ids, adapter_ids=rows))[:, -1]
        nxt = got.argmax(-1)[:, None]
        got_next = engine.model(nxt, batch=engine.cache.step(0, len(rows), nxt, adapter_ids=rows))[:, -1]
        want = torch.stack([merged[r](ids[:1])[0, -1] for r in rows])
        want_next = torch.stack([merged[r](torch.cat([ids[i:i + 1], nxt[i:i + 1]], 1))[0, -1] for i, r in enumerate(rows)])
        plain = model(ids[:1])[0, -1]
    assert (got - want).abs().max() < 1e-3 and (got_next - want_next).abs().max() < 1e-3
    assert all((w - plain).abs().max() > 0.1 for w, r in zip(want, rows) if r >= 0)  # every adapter matters
    assert bool(calls) == (route == "kernel")

@pytest.mark.parametrize("args,message", [(["--lora", "nodir"], "expected NAME=DIR"),
                                          (["--lora", "a=x", "--lora", "a=y"], "given twice"),
                                          (["--lora", "a=x", "--compile"], "without --compile")])
def test_serve_refuses_bad_lora_flags_in_one_line_before_loading(args, message, capsys):
    from pocketlm.cli import main

    assert main(["serve", "--model", "/nonexistent/model", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_randomized_joins_and_leaves_on_mixed_adapters_give_each_request_its_merged_reply(lm, tmp_path):
    """Requests on a, b or the base model arrive between steps and run for random lengths, so decode
    batches and batched prefills see every layout of rows (gaps, repeats, any slot order)."""
    import random

    from pocketlm.infer.sampling import SamplingParams

    model, tok = lm
    (path_a, merged_a), (path_b, merged_b) = tiny_adapter(model, tmp_path / "a"), tiny_adapter(model, tmp_path / "b", -0.3)
    engine = Engine(model, tok, max_batch=4)
    engine.add_adapter("a", path_a)
    engine.add_adapter("b", path_b)
    ids = encode_completion(tok, PROMPT)
    want = {name: reference_greedy(m, ids, N) for name, m in (("a", merged_a), ("b", merged_b), (None, model))}
    rng = random.Random(0)
    for _ in range(6):
        reqs = []
        for _ in range(rng.randrange(2, 7)):
            adapter = rng.choice(["a", "b", None])
            reqs.append((adapter, engine.submit(ids, SamplingParams(max_tokens=rng.randrange(1, N), temperature=0,
                                                                    ignore_eos=True), adapter_id=adapter)))
            for _ in range(rng.randrange(3)):
                engine.step()
        while engine.step():
            pass
        for adapter, r in reqs:
            assert r.error is None and r.output_ids == want[adapter][:len(r.output_ids)], (adapter, r.error)
