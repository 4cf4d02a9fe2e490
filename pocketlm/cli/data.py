"""tokenizer / prepare: raw text in, a tokenizer and token shards out."""

from __future__ import annotations

TASK_CHARS = 64 << 20  # pocketlm.data.prepare.TASK_CHARS, not imported here to keep `--help` fast


def _tokenizer_train(args):
    from pocketlm.data.corpus import read_documents, split_train_val
    from pocketlm.tokenizer import Tokenizer

    docs = read_documents(args.input, split_blank_lines=args.split_blank_lines, text_field=args.text_field)
    docs = split_train_val(docs, args.val_fraction)[0]  # never learn merges from validation text
    tok = Tokenizer.train((d.text for d in docs), vocab_size=args.vocab_size)
    tok.save(args.out)
    print(f"trained byte-level BPE: {tok.vocab_size} tokens -> {args.out}/tokenizer.json")


def _prepare(args):
    from pocketlm.data.prepare import prepare

    prepare(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction,
            split_blank_lines=args.split_blank_lines, text_field=args.text_field, workers=args.workers,
            sources=args.sources, dedup=args.dedup, task_chars=args.task_chars)


def _add_corpus_args(sp, inputs=None):
    (inputs or sp).add_argument("--input", nargs="+", required=inputs is None,
                                help=".txt/.md/.jsonl(.gz/.zst)/.parquet files, directories or globs")
    sp.add_argument("--split-blank-lines", action="store_true", help="in .txt files, each blank-line-separated block is a document")
    sp.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet files (default: text)")


def register(sub):
    tk = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tk_sub = tk.add_subparsers(dest="action", required=True)
    tt = tk_sub.add_parser("train", help="train on text files")
    _add_corpus_args(tt)
    tt.add_argument("--vocab-size", type=int, default=4096)
    tt.add_argument("--val-fraction", type=float, default=0.0,
                    help="hold out the corpus's last share, as `prepare --val-fraction` does (default: 0)")
    tt.add_argument("--out", required=True, help="directory for tokenizer.json")
    tt.set_defaults(func=_tokenizer_train)

    pr = sub.add_parser("prepare", help="tokenize a corpus, or a weighted mixture of sources, into train/val token shards")
    src = pr.add_mutually_exclusive_group(required=True)
    _add_corpus_args(pr, inputs=src)
    src.add_argument("--sources", help="sources.yaml: a list under 'sources:' of name, inputs, text_field, weight, dedup "
                                       "(per source; --split-blank-lines and --text-field apply to --input only)")
    pr.add_argument("--dedup", choices=("exact", "minhash", "none"), default="none",
                    help="with --input: drop exact or near (MinHash) duplicate documents (default: none; "
                         "sources.yaml sets it per source, default exact)")
    pr.add_argument("--task-chars", type=int, default=TASK_CHARS,
                    help="characters per resumable task (a killed prepare redoes at most one task)")
    pr.add_argument("--tokenizer", required=True, help="tokenizer directory (or a model/run that has one)")
    pr.add_argument("--out", required=True)
    pr.add_argument("--val-fraction", type=float, default=0.1, help="share of the corpus (its end) held out for validation")
    pr.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: one per core)")
    pr.set_defaults(func=_prepare)
