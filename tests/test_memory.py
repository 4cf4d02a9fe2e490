"""Per-user memory: keys, isolation, erase (raw bytes), recall, the write rules, bad input, the CLI."""

import json
import random
import time
from pathlib import Path

import pytest

from pocketlm.errors import PocketLMError
from pocketlm.memory import (MemoryStoreError, Store, UnknownMemory, UnknownUser, apply_rules, memory_add,
                             memory_block, memory_delete, memory_edit, memory_export, memory_list, user_add,
                             user_erase, user_list)
from pocketlm.memory.store import DB_NAME, hash_key


def words(text: str) -> int:  # a token counter for the budget: one token a word is close enough here
    return len(text.split())


def raw_bytes(d: Path) -> bytes:
    """The database file, its WAL and shared memory, as they lie on disk (the FTS shadow tables are
    inside the database file)."""
    return b"".join(p.read_bytes() for p in sorted(d.iterdir()) if p.name.startswith(DB_NAME))


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "mem") as s:
        yield s


def test_keys_are_random_and_stored_hashed(store):
    k1, k2 = store.user_add("alice"), store.user_add("bob")
    assert k1 != k2 and len(k1) > 40
    blob = raw_bytes(store.dir)
    assert k1.encode() not in blob and k2.encode() not in blob
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert hash_key(k1).encode() in raw_bytes(store.dir)
    assert store.authenticate(k1) == store.user_id("alice")
    assert store.authenticate(k2) == store.user_id("bob")
    for wrong in (k1[:-1] + ("A" if k1[-1] != "A" else "B"), "", "plm-", hash_key(k1), None):
        assert store.authenticate(wrong) is None
    with pytest.raises(MemoryStoreError, match="user: 'alice' exists"):
        store.user_add("alice")
    for p in store.dir.iterdir():  # the file, its WAL and shared memory: the owner's only
        assert p.stat().st_mode & 0o077 == 0, p


def test_randomized_cross_user_operations_never_reach_another_user(store):
    rng = random.Random(14)
    for name in ("ann", "ben", "cy", "dee"):
        store.user_add(name)
    users = {name: store.user_id(name) for name in ("ann", "ben", "cy", "dee")}
    expected = {u: {} for u in users.values()}  # user id -> {memory id: text}
    topics = ["coffee", "tea", "bike", "garden", "piano", "locker"]
    for step in range(400):
        name, uid = rng.choice(list(users.items()))
        all_ids = [m for e in expected.values() for m in e]
        op = rng.choice(["add", "add", "edit", "delete", "get", "search", "block"])
        if op == "add" or not all_ids:
            text = f"{name}-secret-{step} likes {rng.choice(topics)}"
            expected[uid][store.memory_add(uid, text, rng.choice(["fact", "preference"]))["id"]] = text
        elif op in ("edit", "delete", "get"):
            mid = rng.choice(all_ids)
            if mid not in expected[uid]:  # someone else's id: indistinguishable from a missing one
                with pytest.raises(UnknownMemory):
                    {"edit": lambda: store.memory_edit(uid, mid, text=f"{name} hijack {step}"),
                     "delete": lambda: store.memory_delete(uid, mid),
                     "get": lambda: store.memory_get(uid, mid)}[op]()
            elif op == "edit":
                text = f"{name}-secret-{step} edited {rng.choice(topics)}"
                assert store.memory_edit(uid, mid, text=text)["text"] == text
                expected[uid][mid] = text
            elif op == "delete":
                assert store.memory_delete(uid, mid)["text"] == expected[uid].pop(mid)
            else:
                assert store.memory_get(uid, mid)["text"] == expected[uid][mid]
        elif op == "search":
            for m in store.search(uid, f'"{rng.choice(topics)}"', k=50):
                assert m["id"] in expected[uid] and m["text"].startswith(f"{name}-")
        else:
            block, used = memory_block(store, uid, f"what about {rng.choice(topics)}?", words, budget=10_000)
            assert all(m["id"] in expected[uid] for m in used)
            for other in users:
                if other != name and block:
                    assert f"{other}-secret" not in block
    for name, uid in users.items():
        assert {m["id"]: m["text"] for m in store.memory_list(uid)} == expected[uid]
    assert sum(len(e) for e in expected.values()) > 50  # the run did exercise the store


def test_delete_edit_and_erase_leave_no_bytes_in_db_wal_or_fts(store):
    store.user_add("alice", history_days=30)
    store.user_add("bob", history_days=30)
    a, b = store.user_id("alice"), store.user_id("bob")
    for i in range(40):  # enough rows that the FTS index spans several segments
        store.memory_add(b, f"bob keeps note {i} about gardening tomatoes")
    store.memory_add(a, "alice neighbour walks a dog named biscuit")
    gone = store.memory_add(a, "my locker code is quokkazebra 4312")
    edited = store.memory_add(a, "my favourite city is vermillionport")
    store.history_add(a, "c1", "user", "remember that my locker code is quokkazebra 4312")
    store.history_add(b, "c2", "user", "bob says xylophonics daily")
    assert b"quokkazebra" in raw_bytes(store.dir)  # the grep does see text that is there

    store.memory_delete(a, gone["id"])
    store.memory_edit(a, edited["id"], text="my favourite city is Porto")
    blob = raw_bytes(store.dir)
    for secret in (b"quokkazebra", b"4312", b"vermillionport"):
        assert secret not in blob, secret
    assert (store.dir / f"{DB_NAME}-wal").stat().st_size == 0
    assert store.history_list(a) == []  # the message that asked to remember it went too
    assert store.search(a, '"quokkazebra"') == [] and store.search(a, '"locker"') == []

    store.user_erase(a)
    blob = raw_bytes(store.dir)
    for secret in (b"biscuit", b"neighbour", b"alice", b"Porto", b"porto"):
        assert secret not in blob, secret
    assert b"xylophonics" in blob and b"tomatoes" in blob  # bob's data stays
    assert len(store.memory_list(b)) == 40
    with pytest.raises(UnknownUser):
        store.memory_list(a)
    # the name can be taken again, and starts empty
    store.user_add("alice")
    assert store.memory_list(store.user_id("alice")) == []


def test_recall_related_question_and_nothing_for_an_unrelated_one(store):
    store.user_add("u")
    uid = store.user_id("u")
    store.memory_add(uid, "My sister Maria lives in Lisbon")
    store.memory_add(uid, "I am allergic to peanuts")
    store.memory_add(uid, "My car is a red Volvo")
    block, used = memory_block(store, uid, "Where does my sister live?", words)
    assert block is not None and "Maria lives in Lisbon" in block and used[0]["text"].startswith("My sister")
    assert "peanuts" not in block
    block, _ = memory_block(store, uid, "Can I eat food containing peanuts?", words)
    assert "allergic to peanuts" in block
    assert memory_block(store, uid, "What is the boiling point of water?", words) == (None, [])
    assert memory_block(store, uid, "what is it?", words) == (None, [])  # only function words
    # disabled memories are not read
    mid = next(m["id"] for m in store.memory_list(uid) if "sister" in m["text"])
    store.memory_edit(uid, mid, enabled=False)
    assert memory_block(store, uid, "Where does my sister live?", words) == (None, [])


def test_preferences_always_and_the_token_budget_holds(store):
    store.user_add("u")
    uid = store.user_id("u")
    store.memory_add(uid, "Answer in one short paragraph", "instruction")
    store.memory_add(uid, "I prefer metric units", "preference")
    for i in range(20):
        store.memory_add(uid, f"Trip {i}: hiking the mountain trail number {i} with friends")
    block, used = memory_block(store, uid, "Tell me about the weather", words, budget=300)
    assert "metric units" in block and "one short paragraph" in block and "hiking" not in block
    block, used = memory_block(store, uid, "Which mountain trail did I hike?", words, budget=90, k=10)
    assert words(block) <= 90 and "Answer in one short paragraph" in block
    assert 0 < sum(m["kind"] == "fact" for m in used) < 10
    assert memory_block(store, uid, "mountain", words, budget=3) == (None, [])  # not even the header fits


def test_rules_remember_forget_and_my_name_is(store):
    store.user_add("u")
    uid = store.user_id("u")
    up = apply_rules(store, uid, "Hi! My name is Ana. Remember that my locker code is 4312.")
    assert [(u["action"], u["text"], u["kind"]) for u in up] == [
        ("add", "The user's name is Ana.", "fact"), ("add", "My locker code is 4312", "fact")]
    assert set(up[0]) == {"id", "action", "text", "kind"}
    up = apply_rules(store, uid, "my name is Ana Lopez and I live in Porto")
    assert [(u["action"], u["text"]) for u in up] == [("update", "The user's name is Ana Lopez.")]
    assert up[0]["id"] == store.memory_list(uid)[0]["id"]  # the same memory: the latest name wins
    up = apply_rules(store, uid, "I prefer short answers. Call me Annie. Please remember to answer in French")
    assert [(u["kind"], u["text"]) for u in up] == [("preference", "The user prefers short answers."),
                                                   ("preference", "Call the user Annie."),
                                                   ("instruction", "Answer in French")]
    assert apply_rules(store, uid, "Do you remember my name? What is my locker code?") == []
    assert apply_rules(store, uid, "remember that my locker code is 4312") == []  # said before
    up = apply_rules(store, uid, "Please forget my locker code.")
    assert [(u["action"], u["text"]) for u in up] == [("delete", "My locker code is 4312")]
    assert "4312" not in json.dumps(store.memory_list(uid))
    assert apply_rules(store, uid, "forget about quantum physics") == []
    assert apply_rules(store, uid, "the weather is nice") == []
    up = apply_rules(store, uid, "forget everything you know about me")
    assert len(up) == 4 and {u["action"] for u in up} == {"delete"} and store.memory_list(uid) == []


def test_history_retention(store):
    store.user_add("off")
    store.user_add("on", history_days=1)
    off, on = store.user_id("off"), store.user_id("on")
    assert store.history_add(off, "c", "user", "not kept") is False and store.history_list(off) == []
    assert store.history_add(on, "c", "user", "kept for a day") is True
    assert [h["content"] for h in store.history_list(on)] == ["kept for a day"]
    assert store.history_prune(on, now=time.time() + 2 * 86400) == 1 and store.history_list(on) == []
    with pytest.raises(MemoryStoreError, match="history_days"):
        store.set_history_days(on, -1)


def test_library_functions_and_export(tmp_path):
    d = tmp_path / "data"
    key = user_add("carol", d)
    assert key.startswith("plm-") and user_list(d) == ["carol"]
    m = memory_add("carol", d, "I prefer window seats", kind="preference")
    assert memory_list("carol", d) == [m]
    m2 = memory_edit("carol", d, m["id"], enabled=False)
    assert m2["enabled"] is False and m2["text"] == m["text"]
    out = memory_export("carol", d)
    assert out["user"] == "carol" and [x["id"] for x in out["memories"]] == [m["id"]]
    json.dumps(out)  # JSON-ready
    assert memory_delete("carol", d, m["id"])["id"] == m["id"] and memory_list("carol", d) == []
    user_erase("carol", d)
    assert user_list(d) == []


@pytest.mark.parametrize("call, field", [
    (lambda d: memory_add("carol", d, "x", kind="opinion"), "kind"),
    (lambda d: memory_add("carol", d, "   "), "text"),
    (lambda d: memory_add("carol", d, "x" * 5000), "text"),
    (lambda d: memory_add("nobody", d, "x"), "user"),
    (lambda d: memory_add("../etc", d, "x"), "user"),
    (lambda d: memory_edit("carol", d, "3", text="x"), "id"),
    (lambda d: memory_edit("carol", d, 1), "text, kind, enabled"),
    (lambda d: memory_edit("carol", d, 1, enabled="yes"), "enabled"),
    (lambda d: memory_delete("carol", d, 999), "id"),
    (lambda d: user_add("carol", d, history_days=-2), "history_days"),
    (lambda d: memory_list("carol", d / "elsewhere"), "data_dir"),
])
def test_bad_input_names_the_field(tmp_path, call, field):
    d = tmp_path / "data"
    user_add("carol", d)
    memory_add("carol", d, "seed")
    with pytest.raises(PocketLMError) as e:
        call(d)
    assert str(e.value).startswith(field + ":"), str(e.value)


def test_personalize_writes_first_then_reads_into_one_system_turn(store):
    from pocketlm.memory import personalize

    store.user_add("u")
    uid = store.user_id("u")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "My name is Ana. What is my name?"}]
    out, updates, used = personalize(store, uid, msgs, words)
    assert [u["action"] for u in updates] == ["add"] and [m["id"] for m in used] == [updates[0]["id"]]
    assert len(out) == 2 and out[0]["content"].startswith("Be brief.\n\n") and "name is Ana" in out[0]["content"]
    assert msgs[0]["content"] == "Be brief."  # the caller's list is left alone
    out, updates, used = personalize(store, uid, [{"role": "user", "content": "Forget my name. Who am I?"}], words)
    assert [u["action"] for u in updates] == ["delete"] and used == []
    assert out == [{"role": "user", "content": "Forget my name. Who am I?"}]  # nothing to say: nothing injected
    out, updates, _ = personalize(store, uid, [{"role": "user", "content": "my name is Bo"}], words, write=False)
    assert updates == [] and store.memory_list(uid) == []



@pytest.fixture
def cli(capsys):
    """`pocketlm ARGS...` in this process -> (exit code, stdout, stderr)."""
    from pocketlm.cli import main

    def run(*argv):
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


def test_cli_round_trip(tmp_path, cli, monkeypatch):
    d = str(tmp_path / "data")
    code, key, err = cli("user", "add", "alice", "--data-dir", d)
    assert code == 0 and "shown only now" in err, err
    key = key.strip()
    assert key.startswith("plm-") and "\n" not in key  # stdout is the key alone: scripts can capture it
    with Store(d) as s:
        assert s.authenticate(key) == s.user_id("alice")
    code, out, err = cli("memory", "add", "I prefer aisle seats", "--kind", "preference", "--user", "alice",
                         "--data-dir", d)
    assert code == 0 and "preference" in out, err
    mid = int(out.split()[0])
    assert cli("memory", "add", "My badge number is 5521", "--user", "alice", "--data-dir", d)[0] == 0
    monkeypatch.setenv("POCKETLM_DATA_DIR", d)  # the data dir from the environment
    code, out, err = cli("memory", "edit", str(mid), "--disable", "--text", "I prefer window seats", "--user", "alice")
    monkeypatch.delenv("POCKETLM_DATA_DIR")
    assert code == 0 and "off" in out and "window" in out, err
    rows = json.loads(cli("memory", "list", "--json", "--user", "alice", "--data-dir", d)[1])
    assert [(m["text"], m["enabled"]) for m in rows] == [("I prefer window seats", False),
                                                        ("My badge number is 5521", True)]
    out = tmp_path / "alice.json"
    assert cli("memory", "export", "--out", str(out), "--user", "alice", "--data-dir", d)[0] == 0
    assert [m["id"] for m in json.loads(out.read_text())["memories"]] == [m["id"] for m in rows]
    assert cli("memory", "delete", str(mid), "--user", "alice", "--data-dir", d)[0] == 0
    assert b"aisle" not in raw_bytes(Path(d)) and b"window" not in raw_bytes(Path(d))

    assert cli("memory", "delete", "999", "--user", "alice", "--data-dir", d) == (
        2, "", "pocketlm memory: error: id: user has no memory 999\n")
    code, _, err = cli("memory", "list", "--user", "bob", "--data-dir", d)
    assert code == 2 and "user: no user named 'bob'" in err
    code, _, err = cli("user", "add", "alice", "--data-dir", d)
    assert code == 2 and "user: 'alice' exists" in err

    assert cli("user", "erase", "alice", "--data-dir", d)[0] == 0
    assert cli("user", "list", "--data-dir", d)[1] == ""
    assert b"5521" not in raw_bytes(Path(d)) and b"badge" not in raw_bytes(Path(d))
