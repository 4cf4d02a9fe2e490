"""tokenizer / prepare: raw text in, a tokenizer and token shards out."""

from __future__ import annotations


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
            split_blank_lines=args.split_blank_lines, text_field=args.text_field, workers=args.workers)


def _add_corpus_args(sp):
    sp.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl files, directories or globs")
    sp.add_argument("--split-blank-lines", action="store_true", help="in .txt files, each blank-line-separated block is a document")
    sp.add_argument("--text-field", default="text", help="field holding the text in .jsonl files (default: text)")


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

    pr = sub.add_parser("prepare", help="tokenize a corpus into train/val token shards")
    _add_corpus_args(pr)
    pr.add_argument("--tokenizer", required=True, help="tokenizer directory (or a model/run that has one)")
    pr.add_argument("--out", required=True)
    pr.add_argument("--val-fraction", type=float, default=0.1, help="share of the corpus (its end) held out for validation")
    pr.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: one per core)")
    pr.set_defaults(func=_prepare)
