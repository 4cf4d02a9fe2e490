"""Grounded mode: passages retrieved by BM25, numbered in one system block, replies that cite [n] or
abstain; the SQuAD v2 recipe's data and score; `generate --documents` and the server's `documents`
(and `serve --documents`) through the official openai client."""

import json

import pytest
import torch
from tiny_lm import running_server, tiny_lm

from pocketlm.cli import main
from pocketlm.errors import PocketLMError
from pocketlm.infer.generate import encode_chat
from pocketlm.model import save_checkpoint
from pocketlm.safety.grounded import (ABSTAIN, Index, answer_text, block, cited, grounded_messages, is_abstention,
                                      load_documents, passages_from, split_passages)
from pocketlm.safety.grounded_data import score, squad_grounded

DOCS = {"castles.txt": "Elsinore castle stands on the coast of Denmark.\n\nIts walls were built of grey stone in 1420.",
        "fruit/bananas.md": "Bananas are yellow when ripe and grow in warm places."}
QUESTION = "When were the grey stone walls built?"


@pytest.fixture
def docs(tmp_path):
    for name, text in DOCS.items():
        (tmp_path / "docs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "docs" / name).write_text(text)
    return tmp_path / "docs"


def test_bm25_finds_the_passage_and_the_block_numbers_it(docs):
    passages = load_documents(docs)
    assert [p.source for p in passages] == ["castles.txt", "castles.txt", "fruit/bananas.md"]  # one per paragraph
    found = Index(passages).search(QUESTION, k=2)
    assert [p.text for p in found] == ["Its walls were built of grey stone in 1420."]  # only passages sharing a word
    assert Index(passages).search("what is it?") == []  # no content word: nothing, not everything
    messages, used = grounded_messages([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": QUESTION}], Index(passages), k=1)
    assert messages[0]["content"] == "Be brief.\n\n" + block(used) and messages[1]["content"] == QUESTION
    assert f"[1] {used[0].text}" in block(used) and ABSTAIN in block(used)
    assert len(split_passages("one two three four five", "x", max_words=2)) == 3


def test_reading_replies():
    assert cited("In 1420 [2], see also [1] and [2].") == [2, 1]
    assert answer_text("In 1420 [2].") == "In 1420 ."
    assert is_abstention(ABSTAIN) and is_abstention("I don\u2019t know.") and not is_abstention("1420 [1]")


def test_document_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(PocketLMError, match="nowhere: --documents expects a folder"):
        load_documents(tmp_path / "nowhere")
    with pytest.raises(PocketLMError, match="no .txt/.md/.rst files"):
        load_documents(tmp_path)
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(PocketLMError, match=r"bad\.txt: not UTF-8 text \(byte 3\)"):
        load_documents(tmp_path)
    with pytest.raises(PocketLMError, match=r"documents\[1\]: expected a string"):
        passages_from(["fine", {"title": "no text"}])


SQUAD = {"version": "v2.0", "data": [{"title": "Castles", "paragraphs": [
    {"context": "Elsinore castle was built in 1420 on the coast of Denmark.", "qas": [
        {"id": "a", "question": "When was Elsinore castle built?", "is_impossible": False,
         "answers": [{"text": "1420", "answer_start": 29}]},
        {"id": "b", "question": "When was Elsinore castle sold?", "is_impossible": True, "answers": []}]},
    {"context": "Kronborg's towers were rebuilt after a fire in 1629.", "qas": [
        {"id": "c", "question": "When did the towers of the castle burn?", "is_impossible": False,
         "answers": [{"text": "1629", "answer_start": 47}]}]},
    {"context": "Denmark's coast has many harbours and castles.", "qas": []}]}]}


def test_the_squad_recipe_rows_and_their_score(tmp_path):
    (tmp_path / "squad.json").write_text(json.dumps(SQUAD))
    rows = squad_grounded(tmp_path / "squad.json", k=2)
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    for r in rows:  # gold mode: the question's paragraph is always among the passages
        assert r["gold_passage"] is not None and len(r["passages"]) == 2
        assert r["messages"][0]["content"] == block_of(r) and r["messages"][1]["role"] == "user"
    a, b, _ = rows
    assert a["messages"][2]["content"] == f"1420 [{a['gold_passage']}]" and b["messages"][2]["content"] == ABSTAIN
    test = squad_grounded(tmp_path / "squad.json", passages="retrieved", k=1, keep=lambda i: i != 1)
    assert [r["id"] for r in test] == ["a", "c"]
    perfect = score(test, [r["messages"][2]["content"] for r in test])
    assert perfect["answerable_f1"] == 100.0 and perfect["answers_supported"] == 100.0
    # an answer citing the wrong passage is not supported; an abstention on an answerable question scores 0
    wrong = score(rows, [f"1420 [{3 - a['gold_passage']}]", ABSTAIN, ABSTAIN])
    assert wrong["abstention_unanswerable"] == 100.0 and wrong["answerable_f1"] == 50.0
    assert wrong["answers_cited"] == 100.0 and wrong["answers_supported"] == 0.0


def block_of(row):
    from pocketlm.safety.grounded import Passage
    return block([Passage(t, "") for t in row["passages"]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = tiny_lm()
    torch.set_num_threads(threads)
    return save_checkpoint(tmp_path_factory.mktemp("grounded") / "tiny", model, tok), tok


def test_generate_with_documents_prompts_with_the_passages(checkpoint, docs, monkeypatch, capsys):
    import pocketlm.infer.generate as gen

    ckpt, _ = checkpoint
    seen = []
    monkeypatch.setattr(gen, "encode_chat", lambda tok, messages: seen.append(messages) or encode_chat(tok, messages))
    assert main(["generate", "--model", str(ckpt), "--documents", str(docs), "--prompt", QUESTION, "--dtype", "fp32",
                 "--max-new-tokens", "4", "--temperature", "0"]) == 0
    system, user = seen[0]
    assert "[1] Its walls were built of grey stone in 1420." in system["content"] and user["content"] == QUESTION
    # a reply that cites a passage gets its source printed under it (the tiny model cannot cite: feign one)
    monkeypatch.setattr(gen, "stream_to", lambda engine, ids, params, out, input_embeds=None: (out.write("In 1420 [1]."), "In 1420 [1].")[1])
    capsys.readouterr()
    assert main(["generate", "--model", str(ckpt), "--documents", str(docs), "--prompt", QUESTION, "--dtype", "fp32"]) == 0
    assert "In 1420 [1].\n  [1] castles.txt: Its walls were built of grey stone in 1420.\n" in capsys.readouterr().out
    assert main(["generate", "--model", str(ckpt), "--documents", str(docs / "none"), "--prompt", "x"]) == 2
    assert "none: --documents expects a folder" in capsys.readouterr().err


def test_eval_grounded_scores_a_models_replies(checkpoint, tmp_path):
    from pocketlm.safety.grounded_data import eval_grounded, read_jsonl, write_jsonl

    (tmp_path / "squad.json").write_text(json.dumps(SQUAD))
    rows = write_jsonl(squad_grounded(tmp_path / "squad.json", passages="retrieved"), tmp_path / "test.jsonl")
    r = eval_grounded(checkpoint[0], rows, dtype="fp32", max_new_tokens=4)
    assert r["n"] == 3 and r["answerable"] == 2 and r["unanswerable"] == 1 and len(r["examples"]) == 3
    assert r["abstention_unanswerable"] in (0.0, 100.0) and r["retrieval_recall"] == 100.0
    again = score(read_jsonl(rows), [e["reply"] for e in r["examples"]])  # the figures are those replies' score
    assert all(r[k] == v for k, v in again.items())


openai = pytest.importorskip("openai")


def test_server_documents_with_the_official_client(checkpoint, docs):
    ckpt, tok = checkpoint
    ask = [{"role": "user", "content": QUESTION}]
    own = ["Hamlet sailed in a ship built in Norway.", {"title": "walls", "text": "The walls of Elsinore castle were built in 1420."}]
    with running_server(ckpt, "--documents", str(docs)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        kw = dict(model="tiny", messages=ask, max_tokens=3, temperature=0)
        served = client.chat.completions.create(**kw)  # grounded in --documents
        assert served.passages[0] == {"index": 1, "source": "castles.txt", "text": "Its walls were built of grey stone in 1420."}
        index = Index(load_documents(docs))
        assert served.usage.prompt_tokens == len(encode_chat(tok, grounded_messages(ask, index)[0]))
        mine = client.chat.completions.create(**kw, extra_body={"documents": own})  # the request's own win
        assert [p["source"] for p in mine.passages] == ["walls", "0"]
        assert mine.usage.prompt_tokens == len(encode_chat(tok, grounded_messages(ask, Index(passages_from(own)))[0]))
        plain = client.chat.completions.create(**kw, extra_body={"documents": []})  # none: not grounded
        assert plain.usage.prompt_tokens == len(encode_chat(tok, ask)) and not hasattr(plain, "passages")
        chunks = list(client.chat.completions.create(**kw, stream=True, extra_body={"documents": own}))
        assert chunks[0].passages == mine.passages
        with pytest.raises(openai.UnprocessableEntityError, match="documents"):
            client.chat.completions.create(**kw, extra_body={"documents": [{"title": "no text"}]})
