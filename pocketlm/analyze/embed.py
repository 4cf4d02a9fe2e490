"""`pocketlm embed FILE --text COL`: a sentence vector per row (pocketlm.model.bert), then what they
show: the rows nearest a query, k-means themes with their keywords, near-duplicate pairs.

Themes are spherical k-means (k-means++ start, cosine) and keywords class-based tf-idf, both in a
few lines of numpy rather than scikit-learn, which the product does not otherwise need."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from pocketlm.analyze.table import TableError, cell, read_table

OUTS = (".npy", ".parquet")
MAX_PAIRS = 1000  # near-duplicate pairs listed (all are counted)
_WORD = re.compile(r"[^\W\d_]{3,}", re.UNICODE)
_STOP = set("the and for are but not you your with this that have has had was were will would can could "
            "what when where which who how why all any our out its from they them their there then than "
            "into about just been being some such very also more most other only over own same too "
            "please need want like get got let does did doing don yes".split())


def embed(path, *, text: str, model=None, out=None, query: str | None = None, top_k: int = 5,
          themes: int | None = None, near_dup: float | None = None, limit: int | None = None,
          batch_size: int = 64, seed: int = 0, encoder=None) -> dict:
    """Embed column `text` of the table at `path`; returns a summary (and writes `out` if given)."""
    from pocketlm.model.bert import SentenceEncoder

    if out is not None and Path(out).suffix.lower() not in OUTS:
        raise TableError(f"{out}: unsupported output type {Path(out).suffix!r} (expected {', '.join(OUTS)})")
    if top_k < 1:
        raise TableError(f"--top-k: expected a positive number of rows, got {top_k}")
    if near_dup is not None and not 0 < near_dup <= 1:
        raise TableError(f"--near-dup: expected a cosine similarity in (0, 1], got {near_dup}")
    table = read_table(path, limit)
    texts = [cell(v) for v in table.column(text, "--text")]
    if themes is not None and not 1 <= themes <= len(texts):
        raise TableError(f"--themes: expected 1 to {len(texts)} themes (the number of rows), got {themes}")
    enc = encoder or SentenceEncoder(model)
    vectors = enc.encode(texts, batch_size)
    result: dict = {"file": str(table.path), "rows": len(texts), "model": enc.name, "dim": enc.dim}
    labels = None
    if query is not None:
        q = enc.encode([query])[0]
        result["query"] = {"text": query, "matches": nearest(vectors, q, top_k, texts)}
    if themes:
        labels, centers = kmeans(vectors, themes, seed)
        result["themes"] = describe_themes(vectors, labels, centers, texts)
    if near_dup is not None:
        pairs, total = near_duplicates(vectors, near_dup)
        result["near_duplicates"] = {"threshold": near_dup, "pairs": total,
                                     "listed": [{"a": i, "b": j, "cosine": round(s, 4)} for i, j, s in pairs]}
    if out is not None:
        write_vectors(Path(out), vectors, texts, labels)
        result["out"] = str(out)
    return result


def nearest(vectors: np.ndarray, q: np.ndarray, k: int, texts: list[str]) -> list[dict]:
    scores = vectors @ q
    top = np.argsort(-scores, kind="stable")[:k]
    return [{"row": int(i), "cosine": round(float(scores[i]), 4), "text": texts[i]} for i in top]


def kmeans(x: np.ndarray, k: int, seed: int = 0, restarts: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means on unit vectors: labels (N,), unit centers (k, D); the best of a few starts
    (most cosine to the centers), since one k-means++ start can settle in a poor split. Deterministic."""
    rng = np.random.default_rng(seed)
    runs = [_kmeans_once(x, k, rng) for _ in range(restarts)]
    return max(runs, key=lambda run: float((x * run[1][run[0]]).sum()))


def _kmeans_once(x: np.ndarray, k: int, rng, iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    centers = [x[rng.integers(len(x))]]
    d = 1 - x @ centers[0]
    for _ in range(1, k):  # k-means++: each next center far from the ones chosen
        p = np.clip(d, 0, None) ** 2
        i = rng.choice(len(x), p=p / p.sum()) if p.sum() > 0 else rng.integers(len(x))
        centers.append(x[i])
        d = np.minimum(d, 1 - x @ x[i])
    c = np.stack(centers)
    labels = np.full(len(x), -1)
    for _ in range(iters):
        new = np.argmax(x @ c.T, axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                m = members.sum(0)
                c[j] = m / max(np.linalg.norm(m), 1e-12)
    return labels, c


def keywords(texts: list[str], labels: np.ndarray, k: int, n: int = 5) -> list[list[str]]:
    """Per theme, the words most particular to it: class-based tf-idf (a theme's texts as one document)."""
    counts = [Counter() for _ in range(k)]
    for t, lab in zip(texts, labels):
        counts[lab].update(w for w in (m.lower() for m in _WORD.findall(t)) if w not in _STOP)
    df = Counter(w for c in counts for w in c)
    out = []
    for c in counts:
        total = sum(c.values()) or 1
        score = {w: (f / total) * np.log(1 + k / df[w]) for w, f in c.items()}
        out.append([w for w, _ in sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))[:n]])
    return out


def describe_themes(vectors, labels, centers, texts) -> list[dict]:
    k = len(centers)
    words = keywords(texts, labels, k)
    themes = []
    for j in range(k):
        rows = np.flatnonzero(labels == j)
        closest = rows[np.argsort(-(vectors[rows] @ centers[j]), kind="stable")[:3]]
        themes.append({"theme": j, "rows": int(len(rows)), "keywords": words[j],
                       "examples": [{"row": int(i), "text": texts[i]} for i in closest]})
    return sorted(themes, key=lambda t: -t["rows"])


def near_duplicates(x: np.ndarray, threshold: float, block: int = 1024) -> tuple[list[tuple[int, int, float]], int]:
    """Pairs i < j with cosine >= threshold, most similar first (at most MAX_PAIRS listed), and their count."""
    pairs, total = [], 0
    for s in range(0, len(x), block):
        sim = x[s:s + block] @ x.T
        ii, jj = np.nonzero(sim >= threshold)
        keep = jj > ii + s
        ii, jj = ii[keep], jj[keep]
        total += len(ii)
        pairs.extend((int(i + s), int(j), float(sim[i, j])) for i, j in zip(ii, jj))
        pairs = sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))[:MAX_PAIRS]
    return pairs, total


def write_vectors(path: Path, vectors: np.ndarray, texts: list[str], labels=None) -> None:
    """.npy: the (N, D) float32 matrix; .parquet: row, text, embedding (and theme). Atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if path.suffix.lower() == ".npy":
        with open(tmp, "wb") as fh:
            np.save(fh, vectors)
            fh.flush()
            os.fsync(fh.fileno())
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = {"row": pa.array(np.arange(len(texts))), "text": pa.array(texts),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])}
        if labels is not None:
            cols["theme"] = pa.array(labels.astype(np.int32))
        pq.write_table(pa.table(cols), tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, path)
