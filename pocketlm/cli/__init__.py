"""`pocketlm VERB`: each verb parses its arguments and calls the library function of the same name.
One module per verb group, each with `register(sub)`; a new group is one file plus one line in GROUPS."""

from __future__ import annotations

import argparse
import importlib
import sys

from pocketlm.errors import PocketLMError

# in `pocketlm --help` order
GROUPS = ("data", "train", "serving", "models", "evaluate", "analyze", "embed", "memory", "rai")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pocketlm", description="Train, fine-tune, evaluate and serve small language models.")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for group in GROUPS:
        importlib.import_module(f"pocketlm.cli.{group}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if getattr(args, "takes_overrides", False):
            args.func(args, extra)
        else:
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.func(args)
    except KeyboardInterrupt:
        return 130
    except (PocketLMError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        # what the user gave was wrong, and the message names it; anything else is a bug and keeps its traceback
        if args.debug:
            raise
        print(f"pocketlm {args.verb}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
