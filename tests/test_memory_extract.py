"""Model-driven memory extraction (`serve --memory-extract model`): under the JSON schema the engine's
constrained decoding enforces, a tiny model's output always parses and validates (sampled, over many
seeds), its memories are written once each and reported in memory_updates with "source": "model",
over HTTP as through the library; `"memory": false` runs no extraction."""

import json

import httpx
import jsonschema
import openai
import pytest
from tiny_lm import running_server, tiny_lm

from pocketlm.infer.engine import Engine
from pocketlm.infer.sampling import SamplingParams
from pocketlm.memory import Store, user_add
from pocketlm.model import save_checkpoint
from pocketlm.serve import extract

ADMIN = "admin-key-for-tests-0123456789"
MESSAGE = "I live in Paris and I love green tea. Always answer briefly."


@pytest.fixture(scope="module")
def engine():
    model, tok = tiny_lm()
    return Engine(model, tok, max_batch=2, precision="fp32")


def test_the_output_always_parses_and_fits_the_schema(engine):
    found = []
    for seed in range(5):  # sampled: the tiny model's free choices wander everywhere the schema allows
        req = extract.run(engine, MESSAGE, SamplingParams(max_tokens=extract.MAX_TOKENS, temperature=1.0, seed=seed))
        assert req.finish_reason == "stop", req.text  # complete within the token bound
        value = json.loads(req.text)
        jsonschema.validate(value, extract.SCHEMA)
        found += value["memories"]
    assert found  # some seeds list memories: the write test below has something to write


def test_writes_new_memories_once_and_reports_them(engine, tmp_path):
    with Store(tmp_path) as store:
        store.user_add("ann")
        uid = store.user_id("ann")
        store.memory_add(uid, "The user lives in Paris.", "fact")
        items = [{"kind": "fact", "text": "the user lives in paris."}, {"kind": "preference", "text": "Likes  tea"},
                 {"kind": "preference", "text": "likes tea"}]
        updates = extract.write(store, uid, items)
        assert [(u["action"], u["text"], u["kind"], u["source"]) for u in updates] == [
            ("add", "Likes tea", "preference", "model")]
        assert [m["text"] for m in store.memory_list(uid)] == ["The user lives in Paris.", "Likes tea"]


def test_over_http_the_updates_are_what_was_written(engine, tmp_path):
    model, tok = tiny_lm()
    ckpt = save_checkpoint(tmp_path / "tiny", model, tok)
    d = tmp_path / "data"
    key = user_add("ann", d)
    want = extract.extract(engine, MESSAGE)  # greedy, as the server runs it
    with running_server(ckpt, "--data-dir", str(d), "--api-key", ADMIN, "--memory-extract", "model") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": MESSAGE}],
                                           max_tokens=4, temperature=0)
        updates = r.model_extra["memory_updates"]
        by_model = [u for u in updates if u.get("source") == "model"]
        assert [(u["kind"], u["text"]) for u in by_model] == [(w["kind"], " ".join(w["text"].split())) for w in want
                                                              if len(" ".join(w["text"].split())) >= 3][:len(by_model)]
        held = httpx.get(url + "/v1/users/ann/memories", headers={"Authorization": f"Bearer {key}"}).json()["data"]
        assert sorted(m["id"] for m in held) == sorted(u["id"] for u in updates if u["action"] == "add")
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "I own a red kayak."}],
                                           max_tokens=4, temperature=0, extra_body={"memory": False})
        assert "memory_updates" not in r.model_extra
        after = httpx.get(url + "/v1/users/ann/memories", headers={"Authorization": f"Bearer {key}"}).json()["data"]
        assert after == held
