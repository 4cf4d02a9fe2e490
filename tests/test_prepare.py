import json

import numpy as np

from pocketlm.cli import main
from pocketlm.data.corpus import chunk_for_encoding, split_train_val, Document
from pocketlm.data.loader import EvalBatches, PretrainBatches
from pocketlm.tokenizer import Tokenizer


def test_shards_and_meta(data_dir, tokenizer_dir, shakespeare_small):
    meta = json.loads((data_dir / "meta.json").read_text())
    tok = Tokenizer.load(tokenizer_dir)
    assert meta["tokenizer"] == tok.fingerprint()
    text = shakespeare_small.read_text()
    assert meta["train"]["bytes"] + meta["val"]["bytes"] == len(text.encode())
    train = np.fromfile(data_dir / "train-00000.bin", dtype=np.uint16)
    val = np.fromfile(data_dir / "val-00000.bin", dtype=np.uint16)
    assert train[0] == tok.bos_id and val[0] == tok.bos_id  # document boundary
    # shards decode back to exactly the corpus, split at a line break near 90%
    decoded = tok.decode(train[1:].tolist()) + tok.decode(val[1:].tolist())
    assert decoded == text
    assert abs(len(tok.decode(train[1:].tolist())) / len(text) - 0.9) < 0.01


def test_chunked_encoding_equals_whole(tokenizer_dir, shakespeare_small):
    tok = Tokenizer.load(tokenizer_dir)
    text = shakespeare_small.read_text()[:50_000]
    pieces = chunk_for_encoding(text, size=1000)
    assert len(pieces) > 10
    assert sum((tok.encode(p) for p in pieces), []) == tok.encode(text)


def test_jsonl_dirs_globs_and_errors(tmp_path, tokenizer_dir, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "To be, or not to be."}\n\n{"text": "That is the question."}\n' * 20)
    (corpus / "b.txt").write_text("Whether 'tis nobler in the mind\n\nto suffer the slings\n\n" * 20)
    out = tmp_path / "out"
    assert main(["prepare", "--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                 "--split-blank-lines"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    # 40 records + 40 blocks; the one straddling the 90% cut counts in both splits
    assert meta["train"]["documents"] + meta["val"]["documents"] == 40 + 40 + 1
    assert main(["prepare", "--input", str(tmp_path / "corpus" / "*.jsonl"), "--tokenizer", str(tokenizer_dir),
                 "--out", str(tmp_path / "g")]) == 0

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    assert main(["prepare", "--input", str(bad), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "'text'" in err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    assert main(["prepare", "--input", str(broken), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "y")]) == 2
    assert "broken.jsonl:2: invalid JSON" in capsys.readouterr().err


def test_val_split_is_the_corpus_end():
    docs = [Document("a\n" * 50, "x"), Document("b\n" * 50, "y")]
    train, val = split_train_val(docs, 0.1)
    assert "".join(d.text for d in train) + "".join(d.text for d in val) == "a\n" * 50 + "b\n" * 50
    assert "".join(d.text for d in val) == "b\n" * 10


def test_batches_are_deterministic_and_rank_sliced(data_dir):
    one = PretrainBatches(data_dir, batch_size=4, seq_len=16, seed=3)
    x, y = one.next_batch()
    assert x.shape == (4, 16) and (x[:, 1:] == y[:, :-1]).all()
    r0 = PretrainBatches(data_dir, batch_size=2, seq_len=16, seed=3, rank=0, world_size=2).next_batch()[0]
    r1 = PretrainBatches(data_dir, batch_size=2, seq_len=16, seed=3, rank=1, world_size=2).next_batch()[0]
    assert (np.concatenate([r0, r1]) == x.numpy()).all()
    again = PretrainBatches(data_dir, batch_size=4, seq_len=16, seed=3)
    again.load_state_dict({"step": 1})
    assert (again.next_batch()[0] == one.next_batch()[0]).all()
    val = list(EvalBatches(data_dir, 8, 16)())
    assert sum(v[0].shape[0] for v in val) == (EvalBatches(data_dir, 8, 16).tokens.__len__() - 1) // 16


def test_compressed_and_parquet_inputs_give_the_same_tokens(tmp_path, tokenizer_dir, shakespeare_small):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = [b.strip("\n") for b in shakespeare_small.read_text()[:40_000].split("\n\n") if b.strip()]
    lines = "".join(json.dumps({"body": t}) + "\n" for t in texts).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as fh:
        fh.write(lines)
    half = len(lines) // 2  # two zstd frames: a reader must go on across the frame boundary
    cut = lines.index(b"\n", half) + 1
    c = zstandard.ZstdCompressor()
    (tmp_path / "a.jsonl.zst").write_bytes(c.compress(lines[:cut]) + c.compress(lines[cut:]))
    pq.write_table(pa.table({"id": list(range(len(texts))), "body": texts}), tmp_path / "a.parquet",
                   row_group_size=7)  # many row groups, read one at a time
    assert pq.ParquetFile(tmp_path / "a.parquet").num_row_groups > 5
    streams = {}
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.parquet"):
        out = tmp_path / ("out-" + name)
        assert main(["prepare", "--input", str(tmp_path / name), "--text-field", "body", "--tokenizer", str(tokenizer_dir),
                     "--out", str(out)]) == 0
        streams[name] = b"".join((out / f).read_bytes() for split in ("train", "val")
                                 for f in json.loads((out / "meta.json").read_text())["mixture"][0][split]["shards"])
        meta = json.loads((out / "meta.json").read_text())
        assert meta["train"]["documents"] + meta["val"]["documents"] == len(texts) + 1
    assert len(set(streams.values())) == 1 and len(streams["a.jsonl"]) > 10_000

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "b.parquet")
    assert main(["prepare", "--input", str(tmp_path / "b.parquet"), "--tokenizer", str(tokenizer_dir),
                 "--out", str(tmp_path / "b")]) == 2


def test_input_form_dedup_flag(tmp_path, tokenizer_dir, capsys):
    docs = [f"line {i} of a document that repeats\n" * 5 for i in range(20)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs + docs[:7]))
    assert main(["prepare", "--input", str(tmp_path / "d.jsonl"), "--dedup", "exact", "--tokenizer", str(tokenizer_dir),
                 "--out", str(tmp_path / "o"), "--val-fraction", "0.3"]) == 0
    assert "dropped 7 exact and 0 near duplicates" in capsys.readouterr().out
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    # 20 distinct documents kept; the one straddling the 70% cut (the 19th) counts in both splits, and
    # validation is its tail plus the 20th: the repeats in the corpus's last share were dropped
    assert (meta["train"]["documents"], meta["val"]["documents"]) == (19, 2)
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["dedup"]["dropped"] == {"exact": 7, "near": 0}
