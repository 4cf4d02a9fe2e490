"""`pocketlm prepare`: tokenize a corpus into flat train/val token shards plus meta.json.

    out/
      train-00000.bin ...   uint16 (vocab < 65536) or uint32 token ids, raw, memory-mapped at train time
      val-00000.bin ...
      meta.json             dtype, vocab size, tokenizer fingerprint, token/byte/document counts

Every document starts with the tokenizer's BOS token (the document boundary). Encoding runs through
`tokenizers`' batch encoder, which spreads the work over all cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pocketlm.data.corpus import chunk_for_encoding, read_documents, split_train_val
from pocketlm.tokenizer import Tokenizer

SHARD_TOKENS = 100_000_000  # ~200 MB of uint16 per shard


def load_tokenizer_from(path) -> Tokenizer:
    """A tokenizer directory, or a run/checkpoint/model that carries one."""
    path = Path(path)
    if (path / "tokenizer.json").exists() or path.suffix == ".json":
        return Tokenizer.load(path)
    from pocketlm.model import load_model
    return load_model(path)[1]


class ShardWriter:
    def __init__(self, out: Path, split: str, dtype):
        self.out, self.split, self.dtype = out, split, dtype
        self.index, self.fill, self.tokens = 0, 0, 0
        self.fh = None

    def write(self, ids):
        arr = np.asarray(ids, dtype=self.dtype)
        while len(arr):
            if self.fh is None:
                self.fh = open(self.out / f"{self.split}-{self.index:05d}.bin", "wb")
            take = min(len(arr), SHARD_TOKENS - self.fill)
            arr[:take].tofile(self.fh)
            arr, self.fill, self.tokens = arr[take:], self.fill + take, self.tokens + take
            if self.fill == SHARD_TOKENS:
                self.close()
                self.index, self.fill = self.index + 1, 0

    def close(self):
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def _encode_split(tok: Tokenizer, docs, writer: ShardWriter, desc: str, batch_chars: int = 1 << 20):
    bos = tok.bos_id
    n_bytes = 0
    bar = tqdm(total=sum(len(d.text) for d in docs), unit="char", unit_scale=True, desc=desc, disable=None)
    for d in docs:
        if bos is not None:
            writer.write([bos])
        pieces = chunk_for_encoding(d.text)
        for i in range(0, len(pieces), 32):  # batches of pieces: encode_batch runs them in parallel
            batch = pieces[i:i + 32]
            for ids in tok.encode_batch(batch):
                writer.write(ids)
            bar.update(sum(len(p) for p in batch))
        n_bytes += len(d.text.encode("utf-8"))
    bar.close()
    writer.close()
    return writer.tokens, n_bytes


def prepare(inputs, tokenizer, out, val_fraction: float = 0.1, split_blank_lines: bool = False,
            text_field: str = "text", workers: int = 0) -> dict:
    out = Path(out)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer_from(tokenizer)
    if workers:
        os.environ["RAYON_NUM_THREADS"] = str(workers)
    docs = read_documents(inputs, split_blank_lines=split_blank_lines, text_field=text_field)
    train_docs, val_docs = split_train_val(docs, val_fraction)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.bin"):
        old.unlink()
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, "tokenizer": tok.fingerprint(),
            "bos_id": tok.bos_id, "val_fraction": val_fraction, "sources": [str(i) for i in inputs]}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        tokens, n_bytes = _encode_split(tok, split_docs, ShardWriter(out, split, dtype), split)
        meta[split] = {"tokens": tokens, "bytes": n_bytes, "documents": len(split_docs)}
    tok.save(out / "tokenizer")
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"prepared {out}: train {meta['train']['tokens']:,} tokens ({meta['train']['bytes']:,} bytes), "
          f"val {meta['val']['tokens']:,} tokens ({meta['val']['bytes']:,} bytes)")
    return meta
