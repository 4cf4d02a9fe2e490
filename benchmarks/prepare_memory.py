"""`prepare`'s peak memory as the corpus grows: it streams, so 4x the corpus should cost ~1x the memory.

A synthetic two-source mixture (jsonl.zst and Parquet files of random-word documents, 3% exact repeats)
is written at 1x and 4x size; each size is prepared in a fresh subprocess (exact dedup, the default),
which reports its peak RSS (ru_maxrss) and its RSS after imports, before `prepare` started.

    .venv/bin/python benchmarks/prepare_memory.py [--mb 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FILE_MB = 1  # per input file: 1x has `mb` files, 4x four times as many

CHILD = r"""
import json, resource, sys
from pocketlm.data.prepare import prepare
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
before = rss_mb()
meta = prepare(sources=sys.argv[1], tokenizer=sys.argv[2], out=sys.argv[3])
print(json.dumps({"rss_before_mb": before, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "train_tokens": meta["train"]["tokens"]}))
"""


def _docs(rng, vocab, n_chars):
    words = vocab[rng.integers(0, len(vocab), n_chars // 5)]  # ~5.5 characters a word with its space
    lines = [" ".join(words[i:i + 10]) for i in range(0, len(words), 10)]
    out, at = [], 0
    while at < len(lines):
        if out and rng.random() < 0.03:
            out.append(out[int(rng.integers(len(out)))])  # an exact repeat, for dedup to drop
            continue
        n = int(rng.integers(3, 30))
        out.append("\n".join(lines[at:at + n]))
        at += n
    return out


def write_corpus(root: Path, mb: int, seed: int = 0) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = np.random.default_rng(seed)
    vocab = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), int(rng.integers(2, 9)))) for _ in range(5000)])
    n_files = max(1, mb // FILE_MB)
    for name in ("web", "books"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        docs = _docs(rng, vocab, FILE_MB << 20)
        if i % 2 == 0:
            lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
            (root / "web" / f"part-{i:04d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
        else:
            pq.write_table(pa.table({"text": docs}), root / "books" / f"part-{i:04d}.parquet", row_group_size=2000)
    (root / "sources.yaml").write_text("sources:\n  - name: web\n    inputs: [web/]\n    weight: 2\n"
                                       "  - name: books\n    inputs: [books/]\n    weight: 1\n")
    return root / "sources.yaml"


def run(sources: Path, tokenizer: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(sources), str(tokenizer), str(out)], capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, check=True)
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "seconds": round(time.perf_counter() - t0, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=3, help="corpus size at 1x, in MB of text")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from pocketlm.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = (REPO / "pocketlm" / "data" / "bundled" / "tinyshakespeare.txt").read_text()[:300_000]
        Tokenizer.train([text], vocab_size=1024).save(tmp / "tok")
        results = {}
        for scale in (1, 4):
            sources = write_corpus(tmp / f"corpus{scale}", args.mb * scale)
            results[scale] = r = run(sources, tmp / "tok", tmp / f"out{scale}")
            print(json.dumps({"scale": f"{scale}x", "corpus_mb": args.mb * scale, **r}))
        print(json.dumps({"peak_rss_ratio_4x_over_1x": round(results[4]["peak_rss_mb"] / results[1]["peak_rss_mb"], 3),
                          "above_imports_ratio": round((results[4]["peak_rss_mb"] - results[4]["rss_before_mb"])
                                                       / (results[1]["peak_rss_mb"] - results[1]["rss_before_mb"]), 3),
                          "peak_growth_mb": round(results[4]["peak_rss_mb"] - results[1]["peak_rss_mb"], 1)}))


if __name__ == "__main__":
    main()
