"""`pocketlm finetune --user U --data-dir DIR`: a LoRA trained from the user's conversation history (or
--data), registered under the user, served to that user's key only (its greedy reply is the merged
model's; another key naming it gets a 404, /v1/models lists it to no one), and shredded by an erase
over HTTP or the CLI. CLI through pocketlm.cli.main, HTTP through `pocketlm serve` and the openai client."""

import json
from pathlib import Path

import httpx
import openai
import pytest
from tiny_lm import clone, reference_greedy, running_server, tiny_lm

from pocketlm.cli import main
from pocketlm.infer.generate import encode_chat
from pocketlm.memory import Store, user_add
from pocketlm.memory.adapters import adapter_list
from pocketlm.model import save_checkpoint
from pocketlm.model.lora import ADAPTER_WEIGHTS, apply_adapter

ADMIN = "admin-key-for-tests-0123456789"
FAST = ["--max-steps", "25", "--train.batch_size=4", "--train.seq_len=64", "--train.dtype=fp32",
        "--train.warmup_steps=1", "--train.lr=3e-2", "--train.log_every=5", "--lora-rank", "4"]
QUESTION = [{"role": "user", "content": "Who are you?"}]
N = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Users cy (history kept, so its adapter trains on it) and bob (no history: trains on --data)."""
    model, tok = tiny_lm()
    tmp = tmp_path_factory.mktemp("userft")
    ckpt = save_checkpoint(tmp / "tiny", model, tok)
    d = tmp / "data"
    keys = {"cy": user_add("cy", d, history_days=1), "bob": user_add("bob", d), "dee": user_add("dee", d)}
    with Store(d) as store:
        uid = store.user_id("cy")
        for i in range(12):  # what serve keeps of cy's chats
            store.history_add(uid, f"c{i}", "user", "Who are you?")
            store.history_add(uid, f"c{i}", "assistant", "I am the ghost of Hamlet's father.")
    assert main(["finetune", "--user", "cy", "--data-dir", str(d), "--model", str(ckpt), *FAST]) == 0
    bob_data = tmp / "bob.jsonl"
    bob_data.write_text("".join(json.dumps({"messages": [*QUESTION, {"role": "assistant", "content": "A fool, sir."}]})
                                + "\n" for _ in range(12)))
    assert main(["finetune", "--user", "bob", "--data-dir", str(d), "--model", str(ckpt), "--data", str(bob_data),
                 *FAST]) == 0
    return model, tok, ckpt, d, keys


def test_the_adapter_is_registered_under_the_user_and_the_history_copy_is_gone(trained):
    model, tok, _, d, _ = trained
    with Store(d) as store:
        entries = {u: adapter_list(store, store.user_id(u)) for u in ("cy", "bob", "dee")}
        run = d / "adapters" / f"u{store.user_id('cy')}" / "personal"
    assert [e["name"] for e in entries["cy"]] == ["personal"] and entries["dee"] == []
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / "history.jsonl").exists()  # the training copy of the history was shredded
    assert not (run / "checkpoints").exists()  # so were the run's checkpoints: the adapter is what is kept
    ids = encode_chat(tok, QUESTION)
    base = reference_greedy(model, ids, N)
    merged = {u: reference_greedy(_merged(model, entries[u][0]["path"]), ids, N) for u in ("cy", "bob")}
    assert merged["cy"] != base and merged["bob"] != base and merged["cy"] != merged["bob"]  # they learned


def _merged(model, path):
    return apply_adapter(clone(model), path).eval()


def test_finetune_user_refuses_bad_input_in_one_line(trained, capsys, tmp_path):
    _, _, ckpt, d, _ = trained
    assert main(["finetune", "--user", "dee", "--data-dir", str(d), "--model", str(ckpt), *FAST]) == 2
    assert "has no conversation history" in capsys.readouterr().err
    assert main(["finetune", "--user", "nobody", "--data-dir", str(d), "--model", str(ckpt), *FAST]) == 2
    assert "no user named 'nobody'" in capsys.readouterr().err
    assert main(["finetune", "--user", "dee", "--data-dir", str(d), "--model", str(ckpt), "--out", str(tmp_path)]) == 2
    assert "no --out" in capsys.readouterr().err
    assert main(["finetune", "--model", str(ckpt), "--out", str(tmp_path)]) == 2
    assert "give --data" in capsys.readouterr().err


def test_served_to_its_user_only_and_erased_with_it(trained):
    model, tok, ckpt, d, keys = trained
    ids = encode_chat(tok, QUESTION)
    with Store(d) as store:
        paths = {u: adapter_list(store, store.user_id(u))[0]["path"] for u in ("cy", "bob")}
        cy_folder = d / "adapters" / f"u{store.user_id('cy')}"
    def reply(m):  # the server ends a reply at a stop token, so the reference does too
        out = reference_greedy(m, ids, N)
        stops = [i for i, t in enumerate(out) if t in tok.stop_ids]
        return tok.decode(out[:stops[0]] if stops else out)

    want = {u: reply(_merged(model, p)) for u, p in paths.items()}
    want[None] = reply(model)
    with running_server(ckpt, "--max-batch", "2", "--data-dir", str(d), "--api-key", ADMIN, "--max-loras", "1") as url:
        def ask(key, model_name="personal", **extra):
            c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
            r = c.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=N, temperature=0,
                                          extra_body=extra or None)
            return r.choices[0].message.content

        # one adapter slot (--max-loras 1): each user's request loads its own, evicting the other's
        for _ in range(2):
            assert ask(keys["cy"]) == want["cy"]
            assert ask(keys["bob"]) == want["bob"]
        assert ask(keys["cy"], "tiny") == want[None]
        assert ask(ADMIN, user="cy") == want["cy"]  # the admin on cy's behalf
        with pytest.raises(openai.NotFoundError):  # dee has no adapter named personal: nobody else's is reachable
            ask(keys["dee"])
        models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {keys['cy']}"}).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        r = httpx.request("DELETE", url + "/v1/users/cy", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
        assert r.status_code == 200
        assert not cy_folder.exists() and list(d.rglob("*.safetensors")) == [Path(paths["bob"]) / ADAPTER_WEIGHTS]
        with pytest.raises(openai.AuthenticationError):
            ask(keys["cy"])
        with pytest.raises(openai.NotFoundError):
            ask(ADMIN, user="cy")
    assert main(["user", "erase", "bob", "--data-dir", str(d)]) == 0
    assert not any(d.rglob("*.safetensors"))  # bob's adapter files went with bob
